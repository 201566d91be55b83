import { createRequire } from 'node:module'
import { Readable } from 'node:stream'
import { decode, encode, type StoredValue } from './codec.js'
import { key, prefixRange, readU64, splitFirst, str, u16, u64, utf8, type PrefixRange } from './keys.js'
import { META, type Store } from './open.js'
import { sublevelOf, type StoreOp, type Sublevel } from './writer.js'

/*
 * LevelPersistence: an aedes-persistence v11 compatible, promise-style persistence on the
 * store's LevelDB (research/persistence-and-deps.md §3.2). Sublevels and keys:
 *
 *   m  meta        'schema' → uint32; 'seq' → uint64 reserved upper bound of the sequence
 *   r  retained    utf8(topic) → packet
 *   s  subs        str(client) ‖ utf8(filter) → { qos, rh, rap, nl, subscriptionIdentifier? }
 *   o  outgoing    str(client) ‖ u64(seq) → packet (a PUBLISH, later possibly a PUBREL)
 *   q  by identity str(client) ‖ str(brokerId) ‖ u64(brokerCounter) → u64(seq)
 *   O  by msg id   str(client) ‖ u16(messageId) → u64(seq)
 *   J  journal     u64(seq) → inbound PUBLISH acknowledged before aedes stored it (FerryMQ's)
 *   e  sessions    str(client) → u64(ms since epoch its client went away) (FerryMQ's, for expiry)
 *   I  published   str(client) ‖ u16(messageId) → '' : the incoming QoS 2 message was queued (FerryMQ's)
 *   i  incoming    str(client) ‖ u16(messageId) → packet (inbound QoS 2)
 *   w  wills       utf8(client) → will packet
 *
 * Every method that writes submits exactly one batch to the group-commit writer and resolves
 * when that batch is written. Subscriptions are mirrored in memory (per client, and a QlobberSub
 * trie for topic matching) and loaded at setup(); the mirror is updated after the batch is written.
 */

const require = createRequire(import.meta.url)

/** What the persistence reads from the aedes broker (`setup(broker)`); `id` is read at call time. */
export interface PersistenceBroker { id: string }
/** An aedes client as the persistence sees it. */
export interface PersistenceClient { id: string }
/** A stored subscription, as aedes passes and expects it back. */
export interface Subscription {
  topic: string
  qos: number
  rh?: number
  rap?: boolean
  nl?: boolean
  subscriptionIdentifier?: number
}
/** A subscription matched by topic (QoS > 0 only), as `subscriptionsByTopic` returns it. */
export interface TopicSubscription {
  clientId: string
  topic: string
  qos: number
  rh?: number
  rap?: boolean
  nl?: boolean
}
/** A packet as aedes hands it over; any further own fields are stored too (see codec.ts). */
export interface PacketLike {
  cmd?: string
  topic?: string
  payload?: Buffer | Uint8Array | string
  qos?: number
  retain?: boolean
  dup?: boolean
  messageId?: number
  brokerId?: string
  brokerCounter?: number
  clientId?: string
  [field: string]: unknown
}

// qlobber and aedes-packet are CommonJS without usable typings; these are the parts used.
interface QlobberSubTrie {
  subscriptionsCount: number
  add (topic: string, sub: TopicSubscription): void
  remove (topic: string, sub: { clientId: string, topic: string }): void
  match (topic: string): TopicSubscription[]
}
interface QlobberTrueMatcher { add (topic: string): void, test (topic: string): boolean }
type QlobberOptions = { wildcard_one: string, wildcard_some: string, separator: string }
const QlobberSub = require('qlobber/aedes/qlobber-sub') as new (opts: QlobberOptions) => QlobberSubTrie
const { QlobberTrue } = require('qlobber') as { QlobberTrue: new (opts: QlobberOptions) => QlobberTrueMatcher }
/** aedes-packet: copies the fields aedes keeps for a queued packet (and sets messageId undefined). */
const AedesPacket = require('aedes-packet') as new (original: PacketLike) => PacketLike

const QLOBBER_OPTIONS: QlobberOptions = { wildcard_one: '+', wildcard_some: '#', separator: '/' }
const SEQ_KEY = Buffer.from('seq')
/** How many sequence numbers one reservation in meta covers. */
const SEQ_BLOCK = 65536

type SubRecord = Omit<Subscription, 'topic'>

/** Options of {@link LevelPersistence}. */
export interface LevelPersistenceOptions {
  /**
   * Whether destroy() closes the store (default true). Pass false when the store is shared with
   * other users of the same database (inbound journal, bridge outboxes) and closed by its owner.
   */
  closeStoreOnDestroy?: boolean
  /**
   * Most messages one client's queue holds (limits.maxQueuedMessages). A message for a full queue
   * is not queued for that client (the newest is dropped, so what is queued keeps its order) and
   * `onQueueFull` is told, so the drop is counted and logged, never silent. Default: no limit.
   */
  maxQueuedMessages?: number
  onQueueFull? (clientId: string, limit: number): void
}

export class LevelPersistence {
  readonly #store: Store
  readonly #closeStoreOnDestroy: boolean
  readonly #maxQueued: number
  readonly #onQueueFull: (clientId: string, limit: number) => void
  /** Entries in each client's queue (sublevel `o`), counted at setup and kept up to date. */
  readonly #queued = new Map<string, number>()
  readonly #meta: Sublevel
  readonly #retained: Sublevel
  readonly #subs: Sublevel
  readonly #outgoing: Sublevel
  readonly #byIdentity: Sublevel
  readonly #byMessageId: Sublevel
  readonly #incoming: Sublevel
  readonly #wills: Sublevel
  readonly #journal: Sublevel
  readonly #sessions: Sublevel
  readonly #incomingPublished: Sublevel
  /** Incoming QoS 2 keys (hex) stored by this process: their publish is known to have run or be running. */
  readonly #incomingThisRun = new Set<string>()
  /**
   * Incoming QoS 2 messages stored but not yet queued, by payload Buffer: aedes' publish pipeline
   * copies the packet but keeps its payload object, so outgoingEnqueueCombi can recognise the
   * message and write its `I` mark in the same batch as its queue entries.
   */
  readonly #unqueuedIncoming = new WeakMap<object, Buffer>()
  /** Per client, the last pending incomingGetPacket lookup: later ones wait for it to settle. */
  readonly #incomingLookups = new Map<string, Promise<void>>()
  #broker: PersistenceBroker | undefined
  /** client id → (filter → record): the in-memory mirror of sublevel `s`. */
  readonly #clientSubs = new Map<string, Map<string, SubRecord>>()
  readonly #trie = new QlobberSub(QLOBBER_OPTIONS)
  /** Per-client chains that serialize subscription changes (they read the mirror, then write). */
  readonly #subLocks = new Map<string, Promise<void>>()
  /** Next sequence number to hand out. */
  #nextSeq = 0
  /** Upper bound reserved in memory; numbers below it may be handed out. */
  #reserved = 0
  /** Upper bound known to be on disk. Writes that use numbers ≥ it carry a new reservation. */
  #durableReserved = 0
  #destroyed = false

  /** Uses `store` (and closes it on destroy(), unless told not to). Call `await setup(broker)` first. */
  constructor (store: Store, options: LevelPersistenceOptions = {}) {
    this.#store = store
    this.#closeStoreOnDestroy = options.closeStoreOnDestroy ?? true
    this.#maxQueued = options.maxQueuedMessages ?? Infinity
    this.#onQueueFull = options.onQueueFull ?? (() => {})
    const sub = (name: string): Sublevel => sublevelOf(store.db, name)
    this.#meta = sub(META)
    this.#retained = sub('r')
    this.#subs = sub('s')
    this.#outgoing = sub('o')
    this.#byIdentity = sub('q')
    this.#byMessageId = sub('O')
    this.#incoming = sub('i')
    this.#wills = sub('w')
    this.#journal = sub('J')
    this.#sessions = sub('e')
    this.#incomingPublished = sub('I')
  }

  /** The broker given to setup() (the abstract suite reads `broker.id`). */
  get broker (): PersistenceBroker | undefined {
    return this.#broker
  }

  /** Loads the sequence reservation and the subscription mirror. A native async function, as aedes requires. */
  async setup (broker: PersistenceBroker): Promise<void> {
    this.#broker = broker
    const seq = await this.#meta.get(SEQ_KEY)
    this.#nextSeq = this.#reserved = this.#durableReserved = seq === undefined ? 0 : readU64(seq)
    for await (const [k, v] of this.#subs.iterator()) {
      const [clientId, filter] = splitFirst(k)
      this.#applyAdd(clientId, [{ topic: filter.toString('utf8'), ...decode<SubRecord>(v) }])
    }
    // Queue lengths by a key scan: O(messages queued). Persisted counters would make it O(1).
    for await (const k of this.#outgoing.keys()) {
      const clientId = splitFirst(k)[0]
      this.#queued.set(clientId, (this.#queued.get(clientId) ?? 0) + 1)
    }
  }

  /** Messages queued for `clientId` now (tests, metrics). */
  queuedMessages (clientId: string): number {
    return this.#queued.get(clientId) ?? 0
  }

  // ---- retained -------------------------------------------------------------------------------

  /** Stores a copy of a retained packet; an empty payload deletes the topic's retained message. */
  async storeRetained (packet: PacketLike): Promise<void> {
    const k = utf8(packet.topic ?? '')
    const empty = packet.payload === undefined || packet.payload.length === 0
    await this.#write(empty
      ? [{ type: 'del', sublevel: this.#retained, key: k }]
      : [{ type: 'put', sublevel: this.#retained, key: k, value: encode(packet) }])
  }

  /** Retained packets matching `pattern`. Deprecated in aedes-persistence; kept for the suite. */
  createRetainedStream (pattern: string): Readable {
    return this.createRetainedStreamCombi([pattern])
  }

  /**
   * Retained packets matching any of `patterns`, each packet once. A filter is served by a range
   * scan over its literal leading levels, then matched; a filter starting with a wildcard does not
   * match topics starting with `$` [MQTT-4.7.2-1].
   */
  createRetainedStreamCombi (patterns: string[]): Readable {
    return Readable.from(this.#retainedMatching(patterns))
  }

  async * #retainedMatching (patterns: string[]): AsyncGenerator<StoredValue> {
    const seen = new Set<string>()
    for (const pattern of patterns) {
      const levels = pattern.split('/')
      const firstWild = levels.findIndex(l => l === '+' || l === '#')
      if (firstWild < 0) {
        const v = seen.has(pattern) ? undefined : await this.#retained.get(utf8(pattern))
        seen.add(pattern)
        if (v !== undefined) yield decode(v)
        continue
      }
      const matcher = new QlobberTrue(QLOBBER_OPTIONS)
      matcher.add(pattern)
      // `a/#` also matches `a`, so its prefix is `a`; `a/+` needs at least `a/`.
      const literal = levels.slice(0, firstWild).join('/')
      const prefix = firstWild === 0 ? '' : levels[firstWild] === '#' ? literal : literal + '/'
      for await (const [k, v] of this.#retained.iterator(prefixRange(utf8(prefix)))) {
        const topic = k.toString('utf8')
        if (seen.has(topic) || (firstWild === 0 && topic.startsWith('$')) || !matcher.test(topic)) continue
        seen.add(topic)
        yield decode(v)
      }
    }
  }

  // ---- subscriptions --------------------------------------------------------------------------

  /** Stores subscriptions (a topic already stored is replaced; within one call the last wins). */
  async addSubscriptions (client: PersistenceClient, subs: Subscription[]): Promise<void> {
    await this.#withSubLock(client.id, async () => {
      await this.#write(subs.map((sub): StoreOp => ({
        type: 'put', sublevel: this.#subs, key: this.#subKey(client.id, sub.topic), value: encode(subRecord(sub))
      })))
      this.#applyAdd(client.id, subs)
    })
  }

  /** Removes the client's subscriptions to the given filters (strings). */
  async removeSubscriptions (client: PersistenceClient, topics: string[]): Promise<void> {
    await this.#withSubLock(client.id, async () => {
      const stored = this.#clientSubs.get(client.id)
      const present = topics.filter(t => stored?.has(t))
      await this.#write(present.map((t): StoreOp => ({ type: 'del', sublevel: this.#subs, key: this.#subKey(client.id, t) })))
      this.#applyRemove(client.id, present)
    })
  }

  /** Removes all of the client's subscriptions. */
  async cleanSubscriptions (client: PersistenceClient): Promise<void> {
    await this.#withSubLock(client.id, async () => {
      const topics = [...(this.#clientSubs.get(client.id)?.keys() ?? [])]
      await this.#write(topics.map((t): StoreOp => ({ type: 'del', sublevel: this.#subs, key: this.#subKey(client.id, t) })))
      this.#applyRemove(client.id, topics)
    })
  }

  /** The client's subscriptions (all QoS), `[]` when none. */
  async subscriptionsByClient (client: PersistenceClient): Promise<Subscription[]> {
    const stored = this.#clientSubs.get(client.id)
    return stored === undefined ? [] : [...stored].map(([topic, record]) => ({ topic, ...record }))
  }

  /** QoS > 0 subscriptions whose filter matches `topic`. */
  async subscriptionsByTopic (topic: string): Promise<TopicSubscription[]> {
    return this.#trie.match(topic)
  }

  /** `subsCount`: QoS > 0 subscriptions; `clientsCount`: clients with any subscription. */
  async countOffline (): Promise<{ subsCount: number, clientsCount: number }> {
    return { subsCount: this.#trie.subscriptionsCount, clientsCount: this.#clientSubs.size }
  }

  /** Ids of the clients subscribed to exactly the filter `topic`. */
  getClientList (topic: string): Readable {
    const ids: string[] = []
    for (const [clientId, stored] of this.#clientSubs) if (stored.has(topic)) ids.push(clientId)
    return Readable.from(ids)
  }

  #subKey (clientId: string, filter: string): Buffer {
    return key(str(clientId), utf8(filter))
  }

  /** Mirror update after an add: same rules as aedes-persistence's in-memory store. */
  #applyAdd (clientId: string, subs: Subscription[]): void {
    let stored = this.#clientSubs.get(clientId)
    if (stored === undefined) {
      stored = new Map()
      this.#clientSubs.set(clientId, stored)
    }
    for (const sub of subs) {
      const previous = stored.get(sub.topic)
      if (sub.qos > 0) {
        this.#trie.add(sub.topic, { clientId, topic: sub.topic, qos: sub.qos, rh: sub.rh, rap: sub.rap, nl: sub.nl })
      } else if (previous !== undefined && previous.qos > 0) {
        this.#trie.remove(sub.topic, { clientId, topic: sub.topic })
      }
      stored.set(sub.topic, subRecord(sub))
    }
  }

  /** Mirror update after a removal. */
  #applyRemove (clientId: string, topics: string[]): void {
    const stored = this.#clientSubs.get(clientId)
    if (stored === undefined) return
    for (const topic of topics) {
      const previous = stored.get(topic)
      if (previous === undefined) continue
      if (previous.qos > 0) this.#trie.remove(topic, { clientId, topic })
      stored.delete(topic)
    }
    if (stored.size === 0) this.#clientSubs.delete(clientId)
  }

  /** Runs `fn` after the client's previous subscription change has finished. */
  #withSubLock (clientId: string, fn: () => Promise<void>): Promise<void> {
    const run = (this.#subLocks.get(clientId) ?? Promise.resolve()).then(fn)
    const tail = run.catch(() => {})
    this.#subLocks.set(clientId, tail)
    void tail.then(() => { if (this.#subLocks.get(clientId) === tail) this.#subLocks.delete(clientId) })
    return run
  }

  // ---- outgoing queues ------------------------------------------------------------------------

  /** Appends `packet` to the queue of `sub.clientId`. */
  async outgoingEnqueue (sub: { clientId: string }, packet: PacketLike): Promise<void> {
    await this.outgoingEnqueueCombi([sub], packet)
  }

  /** Appends one copy of `packet` to the queue of each subscription's client, in one batch. */
  async outgoingEnqueueCombi (subs: Array<{ clientId: string }>, packet: PacketLike): Promise<void> {
    const accepted = subs.filter(({ clientId }) => {
      const n = this.#queued.get(clientId) ?? 0
      if (n >= this.#maxQueued) {
        this.#onQueueFull(clientId, this.#maxQueued)
        return false
      }
      // Counted now, not after the write, so concurrent enqueues cannot overshoot the limit.
      this.#queued.set(clientId, n + 1)
      return true
    })
    const ops: StoreOp[] = []
    // An incoming QoS 2 message is marked queued in the same batch as its queue entries: after a
    // crash, a re-sent PUBLISH is a duplicate exactly when this batch was written.
    const mark = typeof packet.payload === 'object' && packet.payload !== null ? this.#unqueuedIncoming.get(packet.payload) : undefined
    if (mark !== undefined) {
      this.#unqueuedIncoming.delete(packet.payload as object)
      ops.push({ type: 'put', sublevel: this.#incomingPublished, key: mark, value: Buffer.alloc(0) })
    }
    if (accepted.length === 0) {
      await this.#write(ops)
      return
    }
    const stored = new AedesPacket(packet)
    const value = encode(stored)
    const { first, reservation } = this.#allocate(accepted.length, ops)
    let seq = first
    for (const { clientId } of accepted) {
      const seqKey = u64(seq++)
      ops.push({ type: 'put', sublevel: this.#outgoing, key: key(str(clientId), seqKey), value })
      const idKey = this.#identityKey(clientId, stored)
      if (idKey !== undefined) ops.push({ type: 'put', sublevel: this.#byIdentity, key: idKey, value: seqKey })
    }
    try {
      await this.#write(ops, reservation)
    } catch (err) {
      for (const { clientId } of accepted) this.#queued.set(clientId, (this.#queued.get(clientId) ?? 1) - 1)
      throw err
    }
  }

  /**
   * Before a delivery: a packet with brokerId/brokerCounter sets the messageId of the queued entry
   * with that identity. Otherwise (or if no entry has that identity) the entry holding
   * `packet.messageId` is replaced by `packet` (PUBLISH → PUBREL). Rejects `no such packet`.
   * If two live entries are given the same messageId (aedes never does), the id index follows the
   * later one.
   */
  async outgoingUpdate (client: PersistenceClient, packet: PacketLike): Promise<void> {
    const idKey = this.#identityKey(client.id, packet)
    const bySeq = idKey === undefined ? undefined : await this.#byIdentity.get(idKey)
    if (bySeq !== undefined) {
      const current = await this.#outgoing.get(key(str(client.id), bySeq))
      if (current !== undefined) {
        const entry = decode<PacketLike>(current)
        const ops: StoreOp[] = []
        const oldId = entry.messageId
        entry.messageId = packet.messageId
        ops.push({ type: 'put', sublevel: this.#outgoing, key: key(str(client.id), bySeq), value: encode(entry) })
        if (isPacketId(oldId) && oldId !== packet.messageId) {
          const oldIndex = await this.#byMessageId.get(this.#messageIdKey(client.id, oldId))
          if (oldIndex !== undefined && oldIndex.equals(bySeq)) {
            ops.push({ type: 'del', sublevel: this.#byMessageId, key: this.#messageIdKey(client.id, oldId) })
          }
        }
        if (isPacketId(packet.messageId)) {
          ops.push({ type: 'put', sublevel: this.#byMessageId, key: this.#messageIdKey(client.id, packet.messageId), value: bySeq })
        }
        await this.#write(ops)
        return
      }
    }
    if (!isPacketId(packet.messageId)) throw new Error('no such packet')
    const seqKey = await this.#byMessageId.get(this.#messageIdKey(client.id, packet.messageId))
    const current = seqKey === undefined ? undefined : await this.#outgoing.get(key(str(client.id), seqKey))
    if (seqKey === undefined || current === undefined) throw new Error('no such packet')
    const ops: StoreOp[] = [{ type: 'put', sublevel: this.#outgoing, key: key(str(client.id), seqKey), value: encode(packet) }]
    const oldIdKey = this.#identityKey(client.id, decode<PacketLike>(current))
    const newIdKey = this.#identityKey(client.id, packet)
    if (oldIdKey !== undefined && (newIdKey === undefined || !oldIdKey.equals(newIdKey))) {
      ops.push({ type: 'del', sublevel: this.#byIdentity, key: oldIdKey })
    }
    if (newIdKey !== undefined) ops.push({ type: 'put', sublevel: this.#byIdentity, key: newIdKey, value: seqKey })
    await this.#write(ops)
  }

  /** On PUBACK/PUBCOMP: removes the entry holding `packet.messageId` and returns it (undefined if none). */
  async outgoingClearMessageId (client: PersistenceClient, packet: { messageId?: number } | undefined): Promise<PacketLike | undefined> {
    const messageId = packet?.messageId
    if (!isPacketId(messageId)) return undefined
    const idxKey = this.#messageIdKey(client.id, messageId)
    const seqKey = await this.#byMessageId.get(idxKey)
    if (seqKey === undefined) return undefined
    const entryKey = key(str(client.id), seqKey)
    const current = await this.#outgoing.get(entryKey)
    const ops: StoreOp[] = [{ type: 'del', sublevel: this.#byMessageId, key: idxKey }]
    const entry = current === undefined ? undefined : decode<PacketLike>(current)
    if (entry !== undefined) {
      ops.push({ type: 'del', sublevel: this.#outgoing, key: entryKey })
      const idKey = this.#identityKey(client.id, entry)
      if (idKey !== undefined) ops.push({ type: 'del', sublevel: this.#byIdentity, key: idKey })
    }
    await this.#write(ops)
    if (entry !== undefined) {
      const n = (this.#queued.get(client.id) ?? 1) - 1
      if (n > 0) this.#queued.set(client.id, n)
      else this.#queued.delete(client.id)
    }
    return entry
  }

  /** The client's queue in order, as a snapshot taken now. */
  outgoingStream (client: PersistenceClient): Readable {
    // Created here, not on first read, so the iterator's implicit snapshot is taken at call time.
    const iterator = this.#outgoing.iterator(this.#clientRange(client.id))
    async function * entries (): AsyncGenerator<StoredValue> {
      try {
        for await (const [, v] of iterator) yield decode(v)
      } finally {
        await iterator.close()
      }
    }
    return Readable.from(entries())
  }

  /** The `q` key of a packet's aedes identity, or undefined if it has none. */
  #identityKey (clientId: string, packet: PacketLike): Buffer | undefined {
    const { brokerId, brokerCounter } = packet
    if (typeof brokerId !== 'string' || brokerId === '' || typeof brokerCounter !== 'number') return undefined
    if (!Number.isSafeInteger(brokerCounter) || brokerCounter < 0) return undefined
    return key(str(clientId), str(brokerId), u64(brokerCounter))
  }

  #messageIdKey (clientId: string, messageId: number): Buffer {
    return key(str(clientId), u16(messageId))
  }

  #clientRange (clientId: string): PrefixRange {
    return prefixRange(str(clientId))
  }

  /**
   * Hands out `n` consecutive sequence numbers (hi-lo). When they reach beyond the reservation on
   * disk, a new reservation is pushed onto `ops`, so it becomes durable in the same batch as the
   * first key that needs it; it is re-sent with every such batch until one of them has been
   * written (so a failed batch cannot leave a used number above the durable reservation).
   * Returns the first number and the reservation to record once `ops` are written.
   */
  #allocate (n: number, ops: StoreOp[]): { first: number, reservation: number | undefined } {
    const first = this.#nextSeq
    this.#nextSeq += n
    if (this.#nextSeq > this.#reserved) this.#reserved = this.#nextSeq + SEQ_BLOCK
    if (this.#nextSeq <= this.#durableReserved) return { first, reservation: undefined }
    ops.push({ type: 'put', sublevel: this.#meta, key: SEQ_KEY, value: u64(this.#reserved) })
    return { first, reservation: this.#reserved }
  }

  // ---- incoming QoS 2 -------------------------------------------------------------------------

  /** Stores an inbound QoS 2 PUBLISH, keyed by its messageId. */
  async incomingStorePacket (client: PersistenceClient, packet: PacketLike): Promise<void> {
    const stored = new AedesPacket(packet)
    stored.messageId = packet.messageId
    const k = this.#incomingKey(client.id, packet)
    await this.#write([{ type: 'put', sublevel: this.#incoming, key: k, value: encode(stored) }])
    this.#incomingThisRun.add(k.toString('hex'))
    if (typeof packet.payload === 'object' && packet.payload !== null) this.#unqueuedIncoming.set(packet.payload, k)
  }

  /**
   * The stored inbound packet; rejects `no such packet` when absent (aedes reads that as "new").
   * Answers for one client resolve in the order they were asked: aedes handles a socket read's
   * packets concurrently and publishes each QoS 2 message when its lookup settles, so lookups
   * that overtake each other would reorder that publisher's messages.
   */
  async incomingGetPacket (client: PersistenceClient, packet: { messageId?: number }): Promise<PacketLike> {
    const lookup = this.#incoming.get(this.#incomingKey(client.id, packet))
    const previous = this.#incomingLookups.get(client.id)
    const settled = lookup.then(() => {}, () => {})
    const turn = previous === undefined ? settled : previous.then(() => settled)
    this.#incomingLookups.set(client.id, turn)
    await turn
    if (this.#incomingLookups.get(client.id) === turn) this.#incomingLookups.delete(client.id)
    const v = await lookup
    if (v === undefined) throw new Error('no such packet')
    const k = this.#incomingKey(client.id, packet)
    if (!this.#incomingThisRun.has(k.toString('hex')) && await this.#incomingPublished.get(k) === undefined) {
      // Stored by a process that died before the message was queued (no mark): aedes would answer
      // the client's re-send with PUBREC and never publish it. Reported absent, it is published now.
      throw new Error('no such packet')
    }
    return decode<PacketLike>(v)
  }


  /** Deletes a stored inbound packet; rejects `no such packet` when absent, as the in-memory store does. */
  async incomingDelPacket (client: PersistenceClient, packet: { messageId?: number }): Promise<void> {
    const k = this.#incomingKey(client.id, packet)
    if (await this.#incoming.get(k) === undefined) throw new Error('no such packet')
    await this.#write([{ type: 'del', sublevel: this.#incoming, key: k }, { type: 'del', sublevel: this.#incomingPublished, key: k }])
    this.#incomingThisRun.delete(k.toString('hex'))
  }

  /** Deletes every inbound packet of the client (and only that client). */
  async cleanIncoming (client: PersistenceClient): Promise<void> {
    const ops: StoreOp[] = []
    for await (const k of this.#incoming.keys(this.#clientRange(client.id))) {
      ops.push({ type: 'del', sublevel: this.#incoming, key: k }, { type: 'del', sublevel: this.#incomingPublished, key: k })
      this.#incomingThisRun.delete(k.toString('hex'))
    }
    await this.#write(ops)
  }

  #incomingKey (clientId: string, packet: { messageId?: number }): Buffer {
    if (!isPacketId(packet.messageId)) throw new Error('no such packet')
    return this.#messageIdKey(clientId, packet.messageId)
  }

  // ---- wills ----------------------------------------------------------------------------------

  /** Stores the client's will, stamping it with the current broker id and the client id. */
  async putWill (client: PersistenceClient, packet: PacketLike): Promise<void> {
    packet.brokerId = this.#brokerOrThrow().id
    packet.clientId = client.id
    await this.#write([{ type: 'put', sublevel: this.#wills, key: utf8(client.id), value: encode(packet) }])
  }

  /** The client's will, or undefined. */
  async getWill (client: PersistenceClient): Promise<PacketLike | undefined> {
    const v = await this.#wills.get(utf8(client.id))
    return v === undefined ? undefined : decode<PacketLike>(v)
  }

  /** Deletes the client's will and returns it (undefined if there was none). */
  async delWill (client: PersistenceClient): Promise<PacketLike | undefined> {
    const will = await this.getWill(client)
    if (will !== undefined) await this.#write([{ type: 'del', sublevel: this.#wills, key: utf8(client.id) }])
    return will
  }

  /** Wills whose brokerId is not a key of `brokers` (brokers that are alive). */
  streamWill (brokers: Record<string, unknown> = {}): Readable {
    const wills = this.#wills
    async function * orphaned (): AsyncGenerator<PacketLike> {
      for await (const v of wills.values()) {
        const will = decode<PacketLike>(v)
        const id = will.brokerId ?? ''
        if (!(Object.hasOwn(brokers, id) && Boolean(brokers[id]))) yield will
      }
    }
    return Readable.from(orphaned())
  }

  // ---- inbound journal (FerryMQ's, not part of the aedes interface) ----------------------------

  /**
   * Durably records an inbound PUBLISH that is about to be acknowledged, before aedes' publish
   * pipeline has stored its copies (aedes sends the QoS 1 PUBACK first). Returns the entry's key;
   * delete it with journalDelete() once the pipeline's writes are durable. Keys follow the
   * persistence's own sequence, so replay keeps arrival order.
   */
  async journalAppend (packet: JournalPacket): Promise<Buffer> {
    const ops: StoreOp[] = []
    const { first, reservation } = this.#allocate(1, ops)
    const entryKey = u64(first)
    const { cmd, topic, payload, qos, retain, properties, messageExpiry } = packet
    ops.push({ type: 'put', sublevel: this.#journal, key: entryKey, value: encode({ cmd, topic, payload, qos, retain, properties, messageExpiry }) })
    await this.#write(ops, reservation)
    return entryKey
  }

  /** Forgets a journal entry (its message is stored wherever it had to be). */
  async journalDelete (entryKey: Buffer): Promise<void> {
    await this.#write([{ type: 'del', sublevel: this.#journal, key: entryKey }])
  }

  /** Entries left by a process that stopped between acknowledging and storing, oldest first. */
  async * journalEntries (): AsyncGenerator<{ key: Buffer, packet: JournalPacket }> {
    for await (const [entryKey, value] of this.#journal.iterator()) yield { key: entryKey, packet: decode<JournalPacket>(value) }
  }

  // ---- session expiry (FerryMQ's) --------------------------------------------------------------

  /** Records when a persistent session's client went away (ms since the epoch). */
  async sessionDisconnected (clientId: string, at: number): Promise<void> {
    await this.#write([{ type: 'put', sublevel: this.#sessions, key: str(clientId), value: u64(at) }])
  }

  /** The session's client is back: it is no longer counting down. */
  async sessionConnected (clientId: string): Promise<void> {
    await this.#write([{ type: 'del', sublevel: this.#sessions, key: str(clientId) }])
  }

  /**
   * Ends every stored session whose client has been away since before `before`: its
   * subscriptions, queue and incoming QoS 2 state go, in one batch per session. A stored session
   * with no record and not `connected` (its client was online when the process stopped) is
   * recorded as away from `now`. Returns the client ids whose sessions ended.
   */
  async expireSessions (before: number, now: number, connected: (clientId: string) => boolean): Promise<string[]> {
    const away = new Map<string, number>()
    for await (const [k, v] of this.#sessions.iterator()) away.set(splitFirst(k)[0], readU64(v))
    for (const clientId of new Set([...this.#clientSubs.keys(), ...this.#queued.keys()])) {
      if (!away.has(clientId) && !connected(clientId)) {
        await this.sessionDisconnected(clientId, now)
        away.set(clientId, now)
      }
    }
    const ended: string[] = []
    for (const [clientId, at] of away) {
      if (at >= before || connected(clientId)) continue
      await this.#withSubLock(clientId, async () => {
        const topics = [...(this.#clientSubs.get(clientId)?.keys() ?? [])]
        const ops: StoreOp[] = topics.map((t): StoreOp => ({ type: 'del', sublevel: this.#subs, key: this.#subKey(clientId, t) }))
        for (const sublevel of [this.#outgoing, this.#byIdentity, this.#byMessageId, this.#incoming]) {
          for await (const k of sublevel.keys(this.#clientRange(clientId))) ops.push({ type: 'del', sublevel, key: k })
        }
        ops.push({ type: 'del', sublevel: this.#sessions, key: str(clientId) })
        await this.#write(ops)
        this.#applyRemove(clientId, topics)
        this.#queued.delete(clientId)
      })
      ended.push(clientId)
    }
    return ended
  }

  // ---- lifecycle ------------------------------------------------------------------------------

  /**
   * Closes the store (waiting for queued writes), unless `closeStoreOnDestroy: false`. aedes never
   * calls this: the broker must, after aedes has closed. Idempotent.
   */
  async destroy (): Promise<void> {
    if (this.#destroyed) return
    this.#destroyed = true
    if (this.#closeStoreOnDestroy) await this.#store.close()
  }

  #brokerOrThrow (): PersistenceBroker {
    if (this.#broker === undefined) throw new Error('LevelPersistence: setup(broker) has not been called')
    return this.#broker
  }

  /** Submits one batch; once written, records the sequence reservation it carries (if any). */
  async #write (ops: StoreOp[], reservation?: number): Promise<void> {
    if (ops.length === 0) return
    await this.#store.writer.write(ops)
    if (reservation !== undefined && reservation > this.#durableReserved) this.#durableReserved = reservation
  }
}

/** What the inbound journal keeps of a PUBLISH: enough to publish it again. */
export interface JournalPacket {
  cmd: 'publish'
  topic: string
  payload: Buffer | string
  qos: 0 | 1 | 2
  retain: boolean
  properties?: Record<string, unknown>
  messageExpiry?: number
}

/** The per-client record of a subscription: the fields the in-memory store keeps, and only those present. */
function subRecord (sub: Subscription): SubRecord {
  const record: SubRecord = { qos: sub.qos, rh: sub.rh, rap: sub.rap, nl: sub.nl }
  if (sub.subscriptionIdentifier !== undefined) record.subscriptionIdentifier = sub.subscriptionIdentifier
  return record
}

function isPacketId (id: unknown): id is number {
  return typeof id === 'number' && Number.isInteger(id) && id >= 0 && id <= 0xffff
}

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
 *   m  meta        'schema' → uint32; 'seq' → uint64 reserved upper bound of the sequence;
 *                  'qcv' → 1 byte: version of the queue counters (absent: rebuild them by a scan);
 *                  str('qc') ‖ str(client) → u64(messages) ‖ u64(bytes) of that client's queue
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
 * when that batch is written. Every batch that changes a client's queue (`o`) also writes that
 * queue's counters (messages, bytes = sum of the stored value sizes in `o`) into meta, computed
 * in memory when the batch is submitted; the writer applies batches in submission order, so the
 * counters on disk always match `o`, and setup() reads them instead of scanning the queues. Subscriptions are mirrored in memory (per client, and a QlobberSub
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
/** Meta key marking that the queue counters are kept; its value is their layout version. */
const COUNTERS_VERSION_KEY = Buffer.from('qcv')
const COUNTERS_VERSION = 1
/** Meta key prefix of a queue's counters; `qc` ‖ 0x00 cannot collide with `qcv`, `schema`, `seq`. */
const COUNTERS_PREFIX = str('qc')
/** How many identities of dropped messages are remembered for outgoingUpdate (see there). */
const DROPPED_IDS_KEPT = 16_384
/** How many sequence numbers one reservation in meta covers. */
const SEQ_BLOCK = 65536

type SubRecord = Omit<Subscription, 'topic'>

/** What happens to a message for a queue that is full (limits.queueFullPolicy). */
export type QueueFullPolicy = 'drop-new' | 'drop-oldest'

/** What `onQueueFull` is told about one client's full queue (one call per client per message). */
export interface QueueFullEvent {
  clientId: string
  /** The limit the new message would have exceeded: maxQueuedMessages or maxQueuedBytes. */
  limit: 'messages' | 'bytes'
  /** The configured value of that limit. */
  max: number
  policy: QueueFullPolicy
  /**
   * `new`: the new message was not queued for this client (policy drop-new, or drop-oldest when
   * the entries not in flight could not make room). `oldest`: it was queued and `dropped` of the
   * oldest entries not yet sent were deleted in the same batch.
   */
  which: 'new' | 'oldest'
  /** Messages dropped for this client by this event (1 for `new`). */
  dropped: number
}

/** Messages and bytes (stored value sizes) in queues. */
export interface QueueTotals { messages: number, bytes: number }

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
  /**
   * Most bytes one client's queue holds (limits.maxQueuedBytes): the sum of the sizes of its
   * stored entries (the encoded packet: topic, payload, properties, a few bytes of framing).
   * Checked when a message is queued; an entry that is given its messageId or becomes a PUBREL
   * changes size by a few bytes and may take a queue a little past it. Default: no limit.
   */
  maxQueuedBytes?: number
  /**
   * `drop-new` (default): the new message is not queued for a full queue. `drop-oldest`: the
   * oldest entries that are not in flight (never sent: no messageId yet; never a PUBREL) are
   * deleted in the same batch as the new entry, so the queue stays within both limits; if they
   * cannot make room (the queue is all in flight, or the message alone exceeds maxQueuedBytes),
   * the new message is dropped instead.
   */
  queueFullPolicy?: QueueFullPolicy
  /**
   * Told of every drop (never silent). `limit` is the configured value of the limit hit (kept for
   * callers of the first signature); `event` says which limit, which policy, and how many.
   */
  onQueueFull? (clientId: string, limit: number, event: QueueFullEvent): void
}

/**
 * A queue entry some operation has in hand, by hex of its sequence key. Operations that read the
 * queue and then submit a batch (outgoingUpdate, outgoingClearMessageId, a drop-oldest selection,
 * session expiry) check these at submission, because what they read may predate a batch that was
 * submitted meanwhile: `gone` (deleted by a clear, a drop or an expiry), `claim` (given a
 * messageId by outgoingUpdate: in flight, never to be dropped), `append` (queued; kept only in
 * drop-oldest mode, so a selection can see entries not yet written).
 */
interface Mark {
  state: 'append' | 'claim' | 'gone'
  /** Value of the write epoch when the batch that set it was written; undefined until then. */
  writtenAt: number | undefined
  seqKey: Buffer
  size: number
  idKey: Buffer | undefined
}

/** One client's queue: its counters, and what is needed to change it safely under concurrency. */
interface QueueState {
  readonly clientId: string
  messages: number
  bytes: number
  marks: Map<string, Mark>
  /** Operations reading this queue now: token → write epoch when they started. */
  readers: Map<number, number>
  /** Drop-oldest scans start here: every entry before it is in flight or gone (for this process). */
  cursor: Buffer | undefined
}

/** A queue entry a drop-oldest selection may delete. */
interface Victim { hex: string, seqKey: Buffer, size: number, idKey: Buffer | undefined }

export class LevelPersistence {
  readonly #store: Store
  readonly #closeStoreOnDestroy: boolean
  readonly #maxQueued: number
  readonly #maxQueuedBytes: number
  readonly #policy: QueueFullPolicy
  readonly #onQueueFull: (clientId: string, limit: number, event: QueueFullEvent) => void
  /** Each client's queue (sublevel `o`): counters read at setup and kept up to date; see QueueState. */
  readonly #queues = new Map<string, QueueState>()
  /** Sum over #queues, for metrics. */
  readonly #totals: QueueTotals = { messages: 0, bytes: 0 }
  /** Incremented whenever a batch that set marks has been written (see Mark.writtenAt). */
  #epoch = 0
  #nextToken = 0
  /** The store had no queue counters and no queues: the next batch writes the counters marker. */
  #countersMarkerPending = false
  /**
   * Drop-oldest: settles when the last enqueue that had to select victims has submitted its batch.
   * While one is pending every enqueue waits its turn, so batches keep call order.
   */
  #enqueueTurn: Promise<void> | undefined
  /** Hex `q` keys of messages dropped for a full queue (insertion order; at most DROPPED_IDS_KEPT). */
  readonly #droppedIds = new Map<string, true>()
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
  #nextSessionExpiry: number | undefined = undefined
  #heldWill: (clientId: string) => boolean = () => false
  #bridging: IncomingBridging | undefined = undefined
  /** Payload → its `i` key, for inbound QoS 2 messages of this run (the bridges' marks are keyed by it). */
  readonly #incomingKeyOf = new WeakMap<object, Buffer>()
  /** By `i` key (hex): the broker's bridge appends still running for that message. */
  readonly #bridgingNow = new Map<string, Promise<void>>()
  /** Client ids with a record in the sessions sublevel (`e`). */
  readonly #sessionIds = new Set<string>()
  /**
   * Incoming QoS 2 messages stored but not yet queued, by payload Buffer: aedes' publish pipeline
   * copies the packet but keeps its payload object, so outgoingEnqueueCombi can recognise the
   * message and write its `I` mark in the same batch as its queue entries.
   */
  readonly #unqueuedIncoming = new WeakMap<object, Buffer>()
  /** Writes owed with a message's queue entries, by payload Buffer (see writeWithQueued). */
  readonly #withQueued = new WeakMap<object, StoreOp[]>()
  /** Per client, the last pending incomingGetPacket lookup: later ones wait for it to settle. */
  readonly #incomingLookups = new Map<string, Promise<void>>()
  /** Per client, entries its open outgoingStream has read and outgoingUpdate has not yet taken. */
  readonly #streamed = new Map<string, Map<string, { seqKey: Buffer, value: Buffer }>>()
  /** Per client, the last QoS 1 id assignment submitted but maybe not yet written (see #replaceEntry). */
  readonly #pendingIdWrites = new Map<string, Promise<void>>()
  /** Per client, the turn of the last outgoingUpdate: settles once its batch is submitted. */
  readonly #updateTurns = new Map<string, Promise<void>>()
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
    this.#maxQueuedBytes = options.maxQueuedBytes ?? Infinity
    this.#policy = options.queueFullPolicy ?? 'drop-new'
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
    await this.#loadQueueCounters()
    for await (const k of this.#sessions.keys()) this.#sessionIds.add(splitFirst(k)[0])
  }

  /**
   * Reads the queue counters from meta: O(queues). A store without them (written before they
   * existed) gets them once, by a scan of every queue, written in one batch with the marker.
   */
  async #loadQueueCounters (): Promise<void> {
    const version = await this.#meta.get(COUNTERS_VERSION_KEY)
    const stored = new Map<string, Buffer>()
    for await (const [k, v] of this.#meta.iterator(prefixRange(COUNTERS_PREFIX))) {
      stored.set(splitFirst(k.subarray(COUNTERS_PREFIX.length))[0], v)
    }
    if (version !== undefined && version.length === 1 && version[0] === COUNTERS_VERSION && [...stored.values()].every(v => v.length === 16)) {
      for (const [clientId, v] of stored) this.#addCounts(this.#state(clientId), readU64(v, 0), readU64(v, 8))
      return
    }
    // No marker (a store from before the counters), or counters this code cannot read: rebuild.
    const counted = await this.countQueuesByScan()
    const ops: StoreOp[] = []
    for (const clientId of stored.keys()) {
      if (!counted.has(clientId)) ops.push({ type: 'del', sublevel: this.#meta, key: key(COUNTERS_PREFIX, str(clientId)) })
    }
    if (counted.size === 0 && ops.length === 0 && version === undefined) {
      // Nothing to migrate: the marker goes with the next batch (every queue change writes its
      // counters from now on; until the marker is on disk, a restart just counts again).
      this.#countersMarkerPending = true
      return
    }
    for (const [clientId, { messages, bytes }] of counted) {
      this.#addCounts(this.#state(clientId), messages, bytes)
      ops.push(this.#counterOp(clientId))
    }
    ops.push({ type: 'put', sublevel: this.#meta, key: COUNTERS_VERSION_KEY, value: Buffer.from([COUNTERS_VERSION]) })
    await this.#write(ops)
  }

  /**
   * Counts every queue by reading all of sublevel `o`: O(messages queued). setup() uses it once
   * to build the counters of an older store; tests and health checks compare it with them.
   */
  async countQueuesByScan (): Promise<Map<string, QueueTotals>> {
    const counted = new Map<string, QueueTotals>()
    for await (const [k, v] of this.#outgoing.iterator()) {
      const clientId = splitFirst(k)[0]
      const c = counted.get(clientId)
      if (c === undefined) counted.set(clientId, { messages: 1, bytes: v.length })
      else { c.messages++; c.bytes += v.length }
    }
    return counted
  }

  /** Messages queued for `clientId` now (tests, metrics). */
  queuedMessages (clientId: string): number {
    return this.#queues.get(clientId)?.messages ?? 0
  }

  /** Bytes (stored value sizes) queued for `clientId` now. */
  queuedBytes (clientId: string): number {
    return this.#queues.get(clientId)?.bytes ?? 0
  }

  /** Messages and bytes in all queues, O(1) (metrics). Includes batches submitted but not yet written. */
  totalQueued (): QueueTotals {
    return { ...this.#totals }
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
    // "__proto__" (stored by FerryMQ on aedes 1.2.0) is left out: restored together with another
    // filter, aedes 2.0.0-beta.1's dedupe would crash on it (GHSA-52qw-whmv-87c5).
    return stored === undefined ? [] : [...stored].filter(([topic]) => topic !== '__proto__').map(([topic, record]) => ({ topic, ...record }))
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

  /**
   * `ops` are written in the same batch as the queue entries of the message whose payload is
   * `payload` (the first outgoingEnqueueCombi for it), so they are on disk exactly when its copies
   * are. A bridge deletes its inbound QoS 2 state this way: after a crash the upstream's PUBREL
   * finds it only if the message was not queued yet.
   */
  writeWithQueued (payload: Buffer, ops: StoreOp[]): void {
    this.#withQueued.set(payload, ops)
  }

  /** Appends `packet` to the queue of `sub.clientId`. */
  async outgoingEnqueue (sub: { clientId: string }, packet: PacketLike): Promise<void> {
    await this.outgoingEnqueueCombi([sub], packet)
  }

  /**
   * Appends one copy of `packet` to the queue of each subscription's client, in one batch, with
   * those queues' counters. A full queue (maxQueuedMessages / maxQueuedBytes) is handled by the
   * policy and reported to onQueueFull. Batches keep call order (so do the promises' settling).
   */
  async outgoingEnqueueCombi (subs: Array<{ clientId: string }>, packet: PacketLike): Promise<void> {
    const ops: StoreOp[] = []
    // An incoming QoS 2 message is marked queued in the same batch as its queue entries: after a
    // crash, a re-sent PUBLISH is a duplicate exactly when this batch was written.
    const mark = typeof packet.payload === 'object' && packet.payload !== null ? this.#unqueuedIncoming.get(packet.payload) : undefined
    if (mark !== undefined) {
      this.#unqueuedIncoming.delete(packet.payload as object)
      ops.push({ type: 'put', sublevel: this.#incomingPublished, key: mark, value: Buffer.alloc(0) })
    }
    const owed = typeof packet.payload === 'object' && packet.payload !== null ? this.#withQueued.get(packet.payload) : undefined
    if (owed !== undefined) {
      this.#withQueued.delete(packet.payload as object)
      ops.push(...owed)
    }
    try {
      await this.#enqueue(subs, packet, ops)
    } catch (err) {
      // Not queued after all: when its client re-sends it, the message must be published then, not
      // answered as a duplicate (the `I` mark decides, as after a restart).
      if (mark !== undefined) this.#incomingThisRun.delete(mark.toString('hex'))
      throw err
    }
  }

  async #enqueue (subs: Array<{ clientId: string }>, packet: PacketLike, ops: StoreOp[]): Promise<void> {
    if (subs.length === 0) {
      await this.#write(ops)
      return
    }
    const stored = new AedesPacket(packet)
    const value = encode(stored)
    const needsRoom = (): string[] => {
      const occurrences = new Map<string, number>()
      for (const { clientId } of subs) occurrences.set(clientId, (occurrences.get(clientId) ?? 0) + 1)
      return [...occurrences].filter(([clientId, n]) => {
        const q = this.#queues.get(clientId)
        return (q?.messages ?? 0) + n > this.#maxQueued || (q?.bytes ?? 0) + n * value.length > this.#maxQueuedBytes
      }).map(([clientId]) => clientId)
    }
    // Fast path (always for drop-new): decide, count and submit now, synchronously, so concurrent
    // enqueues can neither overshoot a limit nor be reordered.
    if (this.#policy === 'drop-new' || (this.#enqueueTurn === undefined && needsRoom().length === 0)) {
      await this.#submitEnqueue(subs, stored, value, ops, new Map())
      return
    }
    // Drop-oldest with a full queue: choose victims (reads), then submit. Later enqueues wait for
    // this submission, so batches stay in call order.
    const previous = this.#enqueueTurn
    let submitted!: () => void
    const turn = new Promise<void>((resolve) => { submitted = resolve })
    this.#enqueueTurn = turn
    let write: Promise<void>
    const reading: Array<[QueueState, number]> = []
    try {
      await previous
      const victims = new Map<string, Victim[]>()
      for (const clientId of needsRoom()) {
        const q = this.#state(clientId)
        reading.push([q, this.#beginRead(q)])
        victims.set(clientId, await this.#oldestDroppable(clientId, q, subs.filter(s => s.clientId === clientId).length, value.length))
      }
      write = this.#submitEnqueue(subs, stored, value, ops, victims)
    } finally {
      for (const [q, token] of reading) this.#endRead(q, token)
      if (this.#enqueueTurn === turn) this.#enqueueTurn = undefined
      submitted()
    }
    await write
  }

  /**
   * Synchronously: applies the limits and the policy to each subscription (using `victims`, the
   * droppable entries read for full queues under drop-oldest), updates the counters, and submits
   * one batch. Returns its write; on failure the counters and marks are put back.
   */
  #submitEnqueue (subs: Array<{ clientId: string }>, stored: PacketLike, value: Buffer, ops: StoreOp[], victims: Map<string, Victim[]>): Promise<void> {
    const size = value.length
    const accepted: string[] = []
    const dropped: Array<{ q: QueueState, victim: Victim, mark: Mark }> = []
    const touched = new Set<string>()
    const events: QueueFullEvent[] = []
    for (const { clientId } of subs) {
      const q = this.#state(clientId)
      const overCount = q.messages + 1 > this.#maxQueued
      if (overCount || q.bytes + size > this.#maxQueuedBytes) {
        const limit = overCount ? 'messages' : 'bytes'
        const max = overCount ? this.#maxQueued : this.#maxQueuedBytes
        const taken = this.#policy === 'drop-oldest' && size <= this.#maxQueuedBytes
          ? this.#takeVictims(q, victims.get(clientId) ?? [], size)
          : undefined
        if (taken === undefined) {
          events.push({ clientId, limit, max, policy: this.#policy, which: 'new', dropped: 1 })
          const idKey = this.#identityKey(clientId, stored)
          if (idKey !== undefined) this.#rememberDropped(idKey)
          this.#forgetIfIdle(q)
          continue
        }
        for (const victim of taken) {
          const mark: Mark = { state: 'gone', writtenAt: undefined, seqKey: victim.seqKey, size: victim.size, idKey: victim.idKey }
          q.marks.set(victim.hex, mark)
          dropped.push({ q, victim, mark })
          this.#addCounts(q, -1, -victim.size)
          ops.push({ type: 'del', sublevel: this.#outgoing, key: key(str(clientId), victim.seqKey) })
          if (victim.idKey !== undefined) {
            ops.push({ type: 'del', sublevel: this.#byIdentity, key: victim.idKey })
            this.#rememberDropped(victim.idKey)
          }
        }
        events.push({ clientId, limit, max, policy: this.#policy, which: 'oldest', dropped: taken.length })
      }
      // Counted now, not after the write, so concurrent enqueues cannot overshoot the limit.
      this.#addCounts(q, 1, size)
      accepted.push(clientId)
      touched.add(clientId)
    }
    for (const { q } of dropped) touched.add(q.clientId)
    const { first, reservation } = this.#allocate(accepted.length, ops)
    let seq = first
    const appended: Array<{ q: QueueState, hex: string, mark: Mark }> = []
    for (const clientId of accepted) {
      const seqKey = u64(seq++)
      ops.push({ type: 'put', sublevel: this.#outgoing, key: key(str(clientId), seqKey), value })
      const idKey = this.#identityKey(clientId, stored)
      if (idKey !== undefined) ops.push({ type: 'put', sublevel: this.#byIdentity, key: idKey, value: seqKey })
      if (this.#policy === 'drop-oldest') {
        const q = this.#state(clientId)
        const mark: Mark = { state: 'append', writtenAt: undefined, seqKey, size, idKey }
        const hex = seqKey.toString('hex')
        q.marks.set(hex, mark)
        appended.push({ q, hex, mark })
      }
    }
    for (const clientId of touched) ops.push(this.#counterOp(clientId))
    const write = this.#write(ops, reservation)
    const marks = [...dropped.map(d => ({ q: d.q, hex: d.victim.hex, mark: d.mark })), ...appended]
    write.then(() => this.#written(marks), () => {
      for (const clientId of accepted) this.#addCounts(this.#state(clientId), -1, -size)
      for (const { q, victim } of dropped) this.#addCounts(q, 1, victim.size)
      for (const { q, hex, mark } of marks) if (q.marks.get(hex) === mark) q.marks.delete(hex)
      for (const clientId of touched) this.#forgetIfIdle(this.#state(clientId))
    })
    // Told once the batch is submitted, so a throwing callback cannot leave the counters unwritten.
    for (const event of events) this.#onQueueFull(event.clientId, event.max, event)
    return write
  }

  /**
   * The fewest of `candidates` (oldest first) whose removal lets an entry of `size` into queue
   * `q` within both limits, skipping those that became in flight or gone since they were read;
   * undefined if they cannot make room.
   */
  #takeVictims (q: QueueState, candidates: Victim[], size: number): Victim[] | undefined {
    const taken: Victim[] = []
    let messages = q.messages + 1
    let bytes = q.bytes + size
    while (messages > this.#maxQueued || bytes > this.#maxQueuedBytes) {
      const victim = candidates.shift()
      if (victim === undefined) {
        candidates.unshift(...taken)
        return undefined
      }
      const state = q.marks.get(victim.hex)?.state
      if (state === 'claim' || state === 'gone') continue
      taken.push(victim)
      messages--
      bytes -= victim.size
    }
    return taken
  }

  /**
   * Reads the oldest entries of a full queue that may be dropped (not in flight: a PUBLISH with no
   * messageId, not claimed, not gone), enough to make room for `n` entries of `size` bytes, plus
   * some slack for changes while reading. Entries not yet written come last, from the marks.
   */
  async #oldestDroppable (clientId: string, q: QueueState, n: number, size: number): Promise<Victim[]> {
    const needMessages = q.messages + n - this.#maxQueued + 1
    const needBytes = q.bytes + n * size - this.#maxQueuedBytes + 4096
    const victims: Victim[] = []
    let messages = 0
    let bytes = 0
    const enough = (): boolean => messages >= needMessages && bytes >= needBytes
    const prefix = str(clientId)
    const range = this.#clientRange(clientId)
    if (q.cursor !== undefined) range.gte = key(prefix, q.cursor)
    const seen = new Set<string>()
    let cursor: Buffer | undefined
    for await (const [k, v] of this.#outgoing.iterator(range)) {
      const seqKey = Buffer.from(k.subarray(prefix.length))
      const hex = seqKey.toString('hex')
      seen.add(hex)
      const state = q.marks.get(hex)?.state
      if (state === 'gone' || state === 'claim') continue
      const entry = decode<PacketLike>(v)
      if (entry.cmd !== 'publish' || isPacketId(entry.messageId)) {
        if (victims.length === 0) cursor = seqKey
        continue
      }
      if (victims.length === 0) cursor = seqKey
      victims.push({ hex, seqKey, size: v.length, idKey: this.#identityKey(clientId, entry) })
      messages++
      bytes += v.length
      if (enough()) break
    }
    if (cursor !== undefined) q.cursor = cursor
    if (!enough()) {
      for (const [hex, mark] of q.marks) {
        if (mark.state !== 'append' || seen.has(hex)) continue
        victims.push({ hex, seqKey: mark.seqKey, size: mark.size, idKey: mark.idKey })
        messages++
        bytes += mark.size
        if (enough()) break
      }
    }
    return victims
  }

  /**
   * Before a delivery: a packet with brokerId/brokerCounter sets the messageId of the queued entry
   * with that identity. Otherwise (or if no entry has that identity) the entry holding
   * `packet.messageId` is replaced by `packet` (PUBLISH → PUBREL). Rejects `no such packet`.
   * A PUBLISH whose identity was dropped for a full queue resolves without writing: aedes then
   * sends it once, unstored (rejecting would make aedes close the client's connection).
   * If two live entries are given the same messageId (aedes never does), the id index follows the
   * later one.
   */
  async outgoingUpdate (client: PersistenceClient, packet: PacketLike): Promise<void> {
    const q = this.#state(client.id)
    const token = this.#beginRead(q)
    // Updates read concurrently but submit their batches in call order, so they resolve in call
    // order: aedes answers each PUBREC with a PUBREL once its update resolves, and MQTT.js hands a
    // QoS 2 message to the application on PUBREL, so out-of-order updates reorder what it sees.
    const previous = this.#updateTurns.get(client.id) ?? Promise.resolve()
    let release!: () => void
    const turn = new Promise<void>((resolve) => { release = resolve })
    this.#updateTurns.set(client.id, turn)
    try {
      await this.#update(client.id, q, packet, previous, release)
    } finally {
      release()
      if (this.#updateTurns.get(client.id) === turn) this.#updateTurns.delete(client.id)
      this.#endRead(q, token)
    }
  }

  /** `previous`: settles when the update called before this one has submitted its batch; `submitted`: say this one has. */
  async #update (clientId: string, q: QueueState, packet: PacketLike, previous: Promise<void>, submitted: () => void): Promise<void> {
    const idKey = this.#identityKey(clientId, packet)
    // The entry as outgoingStream just read it, when aedes delivers from the queue: no reads then.
    const streamed = idKey === undefined ? undefined : this.#takeStreamed(clientId, idKey)
    // Reading the store: after this client's last QoS 1 id assignment has landed (read your writes).
    if (streamed === undefined) await this.#pendingIdWrites.get(clientId)
    const bySeq = streamed?.seqKey ?? (idKey === undefined ? undefined : await this.#byIdentity.get(idKey))
    if (bySeq !== undefined) {
      const current = streamed?.value ?? await this.#outgoing.get(key(str(clientId), bySeq))
      if (current !== undefined) {
        const entry = decode<PacketLike>(current)
        const ops: StoreOp[] = []
        const oldId = entry.messageId
        entry.messageId = packet.messageId
        const oldIndex = isPacketId(oldId) && oldId !== packet.messageId
          ? await this.#byMessageId.get(this.#messageIdKey(clientId, oldId))
          : undefined
        await previous
        // From here to the submission nothing awaits: the marks checked are current.
        const hex = bySeq.toString('hex')
        if (q.marks.get(hex)?.state === 'gone') return // dropped or cleared meanwhile: as below
        const value = encode(entry)
        ops.push({ type: 'put', sublevel: this.#outgoing, key: key(str(clientId), bySeq), value })
        if (oldIndex !== undefined && oldIndex.equals(bySeq)) {
          ops.push({ type: 'del', sublevel: this.#byMessageId, key: this.#messageIdKey(clientId, oldId as number) })
        }
        if (isPacketId(packet.messageId)) {
          ops.push({ type: 'put', sublevel: this.#byMessageId, key: this.#messageIdKey(clientId, packet.messageId), value: bySeq })
        }
        // A QoS 1 delivery resolves once its id assignment is submitted, not written: losing it in
        // a crash only means the message is sent again under a new id, which QoS 1 allows. aedes
        // drains a queue one message at a time, waiting for this, so the drain no longer waits for
        // a write (and an fsync) per message. QoS 2 keeps waiting: its id must survive [MQTT-4.3.3].
        const deferred = packet.cmd === 'publish' && packet.qos === 1 && isPacketId(packet.messageId)
        await this.#replaceEntry(clientId, q, hex, bySeq, current.length, value, ops, isPacketId(packet.messageId), submitted, deferred)
        return
      }
    }
    if (idKey !== undefined && packet.cmd === 'publish' && this.#droppedIds.delete(idKey.toString('hex'))) return
    if (!isPacketId(packet.messageId)) throw new Error('no such packet')
    // By packet id (a PUBREL): the id may come from a QoS 1 assignment still being written.
    await this.#pendingIdWrites.get(clientId)
    const seqKey = await this.#byMessageId.get(this.#messageIdKey(clientId, packet.messageId))
    const current = seqKey === undefined ? undefined : await this.#outgoing.get(key(str(clientId), seqKey))
    if (seqKey === undefined || current === undefined) throw new Error('no such packet')
    await previous
    const hex = seqKey.toString('hex')
    if (q.marks.get(hex)?.state === 'gone') throw new Error('no such packet')
    const value = encode(packet)
    const ops: StoreOp[] = [{ type: 'put', sublevel: this.#outgoing, key: key(str(clientId), seqKey), value }]
    const oldIdKey = this.#identityKey(clientId, decode<PacketLike>(current))
    const newIdKey = this.#identityKey(clientId, packet)
    if (oldIdKey !== undefined && (newIdKey === undefined || !oldIdKey.equals(newIdKey))) {
      ops.push({ type: 'del', sublevel: this.#byIdentity, key: oldIdKey })
    }
    if (newIdKey !== undefined) ops.push({ type: 'put', sublevel: this.#byIdentity, key: newIdKey, value: seqKey })
    await this.#replaceEntry(clientId, q, hex, seqKey, current.length, value, ops, true, submitted, false)
  }

  /** Submits the batch of an update (the entry's size change counted), claiming the entry as in flight. */
  async #replaceEntry (clientId: string, q: QueueState, hex: string, seqKey: Buffer, oldSize: number, value: Buffer, ops: StoreOp[], inFlight: boolean, submitted: () => void, deferred: boolean): Promise<void> {
    const delta = value.length - oldSize
    this.#addCounts(q, 0, delta)
    if (delta !== 0) ops.push(this.#counterOp(clientId))
    let mark: Mark | undefined
    if (inFlight && this.#policy === 'drop-oldest') {
      mark = { state: 'claim', writtenAt: undefined, seqKey, size: value.length, idKey: undefined }
      q.marks.set(hex, mark)
    }
    const write = this.#write(ops)
    submitted()
    const settled = write.then(() => {
      if (mark !== undefined) this.#written([{ q, hex, mark }])
    }, (err: unknown) => {
      this.#addCounts(q, 0, -delta)
      if (mark !== undefined && q.marks.get(hex) === mark) q.marks.delete(hex)
      throw err
    })
    if (!deferred) return await settled
    // Reads of this client's id index wait for it (outgoingClearMessageId): the writer applies
    // batches in order, so waiting for the last one covers every earlier one.
    const quiet = settled.catch(() => {})
    this.#pendingIdWrites.set(clientId, quiet)
    void quiet.then(() => { if (this.#pendingIdWrites.get(clientId) === quiet) this.#pendingIdWrites.delete(clientId) })
  }

  /** On PUBACK/PUBCOMP: removes the entry holding `packet.messageId` and returns it (undefined if none). */
  async outgoingClearMessageId (client: PersistenceClient, packet: PacketLike | undefined): Promise<PacketLike | undefined> {
    const messageId = packet?.messageId
    // Without a packet id: a queued entry never sent, as aedes 2 hands over when it empties a
    // session's queue (a clean start, an MQTT 5 session that ended); found by its identity.
    const byIdentity = !isPacketId(messageId) && packet !== undefined ? this.#identityKey(client.id, packet) : undefined
    if (!isPacketId(messageId) && byIdentity === undefined) return undefined
    // The id may have been assigned by a write still on its way (a QoS 1 delivery): read after it.
    await this.#pendingIdWrites.get(client.id)
    const q = this.#state(client.id)
    const token = this.#beginRead(q)
    let write: Promise<void>
    let entry: PacketLike | undefined
    let mark: Mark | undefined
    let hex = ''
    try {
      const idxKey = isPacketId(messageId) ? this.#messageIdKey(client.id, messageId) : undefined
      const seqKey = idxKey !== undefined ? await this.#byMessageId.get(idxKey) : await this.#byIdentity.get(byIdentity as Buffer)
      if (seqKey === undefined) return undefined
      const entryKey = key(str(client.id), seqKey)
      const current = await this.#outgoing.get(entryKey)
      // From here to the submission nothing awaits: the marks checked are current.
      const ops: StoreOp[] = idxKey === undefined ? [] : [{ type: 'del', sublevel: this.#byMessageId, key: idxKey }]
      entry = current === undefined ? undefined : decode<PacketLike>(current)
      hex = seqKey.toString('hex')
      if (current !== undefined && entry !== undefined && q.marks.get(hex)?.state !== 'gone') {
        ops.push({ type: 'del', sublevel: this.#outgoing, key: entryKey })
        const idKey = this.#identityKey(client.id, entry)
        if (idKey !== undefined) ops.push({ type: 'del', sublevel: this.#byIdentity, key: idKey })
        mark = { state: 'gone', writtenAt: undefined, seqKey, size: current.length, idKey }
        q.marks.set(hex, mark)
        this.#addCounts(q, -1, -current.length)
        ops.push(this.#counterOp(client.id))
      }
      write = this.#write(ops)
    } finally {
      this.#endRead(q, token)
    }
    try {
      await write
    } catch (err) {
      if (mark !== undefined && q.marks.get(hex) === mark) {
        q.marks.delete(hex)
        this.#addCounts(q, 1, mark.size)
      }
      throw err
    }
    if (mark !== undefined) this.#written([{ q, hex, mark }])
    return entry
  }

  // ---- queue counters and marks ---------------------------------------------------------------

  /** The queue state of `clientId`, created empty if missing. */
  #state (clientId: string): QueueState {
    let q = this.#queues.get(clientId)
    if (q === undefined) {
      q = { clientId, messages: 0, bytes: 0, marks: new Map(), readers: new Map(), cursor: undefined }
      this.#queues.set(clientId, q)
    }
    return q
  }

  /** Drops the state of an empty queue nothing is working on (keeps the map small). */
  #forgetIfIdle (q: QueueState): void {
    if (q.messages === 0 && q.marks.size === 0 && q.readers.size === 0 && this.#queues.get(q.clientId) === q) this.#queues.delete(q.clientId)
  }

  #addCounts (q: QueueState, messages: number, bytes: number): void {
    q.messages += messages
    q.bytes += bytes
    this.#totals.messages += messages
    this.#totals.bytes += bytes
  }

  /** The meta op that stores the client's counters as they are now (a delete when the queue is empty). */
  #counterOp (clientId: string): StoreOp {
    const q = this.#queues.get(clientId)
    const k = key(COUNTERS_PREFIX, str(clientId))
    if (q === undefined || q.messages <= 0) return { type: 'del', sublevel: this.#meta, key: k }
    return { type: 'put', sublevel: this.#meta, key: k, value: key(u64(q.messages), u64(Math.max(0, q.bytes))) }
  }

  /** An operation starts reading the queue: marks set from now on are kept until it ends. */
  #beginRead (q: QueueState): number {
    const token = this.#nextToken++
    q.readers.set(token, this.#epoch)
    return token
  }

  #endRead (q: QueueState, token: number): void {
    q.readers.delete(token)
    this.#purge(q)
  }

  /** The batch that set these marks is written. */
  #written (marks: Array<{ q: QueueState, hex: string, mark: Mark }>): void {
    if (marks.length === 0) return
    const at = ++this.#epoch
    const queues = new Set<QueueState>()
    for (const { q, mark } of marks) {
      mark.writtenAt = at
      queues.add(q)
    }
    for (const q of queues) this.#purge(q)
  }

  /** Forgets marks every current reader of the queue can already see on disk. */
  #purge (q: QueueState): void {
    let oldest = Infinity
    for (const started of q.readers.values()) oldest = Math.min(oldest, started)
    for (const [hex, mark] of q.marks) {
      if (mark.writtenAt !== undefined && mark.writtenAt <= oldest) q.marks.delete(hex)
    }
    this.#forgetIfIdle(q)
  }

  /** Remembers the identity of a dropped message, so its delivery in progress is not an error. */
  #rememberDropped (idKey: Buffer): void {
    this.#droppedIds.set(idKey.toString('hex'), true)
    if (this.#droppedIds.size > DROPPED_IDS_KEPT) {
      const oldest = this.#droppedIds.keys().next()
      if (oldest.done !== true) this.#droppedIds.delete(oldest.value)
    }
  }

  /** The client's queue in order, as a snapshot taken now. */
  outgoingStream (client: PersistenceClient): Readable {
    // Created here, not on first read, so the iterator's implicit snapshot is taken at call time,
    // unless a QoS 1 id assignment is still on its way: then once it is written, before any read.
    const clientId = client.id
    const pending = this.#pendingIdWrites.get(clientId)
    const range = this.#clientRange(clientId)
    const read: StreamRead = { iterator: pending === undefined ? this.#outgoing.iterator(range) : undefined, started: false, ended: false }
    // aedes calls outgoingUpdate for each entry right after reading it: the entry is kept for that
    // call (#takeStreamed), which then reads nothing. Only under drop-new: nothing else deletes an
    // entry that was not sent yet (drop-oldest does, and its updates read the store as before).
    const streamed = new Map<string, { seqKey: Buffer, value: Buffer }>()
    if (this.#policy === 'drop-new') this.#streamed.set(clientId, streamed)
    const end = (): void => {
      if (read.ended) return
      read.ended = true
      if (this.#streamed.get(clientId) === streamed) this.#streamed.delete(clientId)
    }
    const stream = Readable.from(this.#streamEntries(clientId, read, async () => {
      await pending
      return this.#outgoing.iterator(range)
    }, streamed, end))
    // Destroyed before its first read, the generator never runs its finally.
    stream.once('close', () => {
      end()
      if (!read.started) void read.iterator?.close()
    })
    return stream
  }

  async * #streamEntries (clientId: string, read: StreamRead, open: () => Promise<NonNullable<StreamRead['iterator']>>,
    streamed: Map<string, { seqKey: Buffer, value: Buffer }>, end: () => void): AsyncGenerator<StoredValue> {
    read.started = true
    const prefix = str(clientId).length
    try {
      read.iterator ??= await open()
      for await (const [k, v] of read.iterator) {
        const entry = decode<PacketLike>(v)
        const idKey = this.#identityKey(clientId, entry)
        if (idKey !== undefined && this.#streamed.get(clientId) === streamed) streamed.set(idKey.toString('hex'), { seqKey: Buffer.from(k.subarray(prefix)), value: v })
        yield entry
      }
    } finally {
      end()
      await read.iterator?.close()
    }
  }

  /** The entry with aedes identity `idKey` as the client's outgoingStream read it, once (undefined if not). */
  #takeStreamed (clientId: string, idKey: Buffer): { seqKey: Buffer, value: Buffer } | undefined {
    const streamed = this.#streamed.get(clientId)
    if (streamed === undefined) return undefined
    const hex = idKey.toString('hex')
    const entry = streamed.get(hex)
    if (entry !== undefined) streamed.delete(hex)
    return entry
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
    if (typeof packet.payload === 'object' && packet.payload !== null) {
      this.#unqueuedIncoming.set(packet.payload, k)
      this.#incomingKeyOf.set(packet.payload, k)
    }
  }

  // ---- inbound QoS 2 and bridges --------------------------------------------------------------

  /**
   * How the broker's bridges take inbound QoS 2 messages. A message is appended to each bridge's
   * outbox after its local queue copies are written (a separate batch), with a mark per bridge in
   * that batch (bridgedMarkOp). A re-send found as a duplicate is checked for those marks: a bridge
   * whose append a crash (or a failed write) cut off gets the message then, before the PUBREC.
   */
  setBridging (bridging: IncomingBridging): void {
    this.#bridging = bridging
  }

  /** The op that records, in the batch appending an inbound QoS 2 message to bridge `name`'s outbox, that it was appended; undefined for other messages. */
  bridgedMarkOp (payload: unknown, name: string): StoreOp | undefined {
    const k = typeof payload === 'object' && payload !== null ? this.#incomingKeyOf.get(payload) : undefined
    return k === undefined ? undefined : { type: 'put', sublevel: this.#incomingPublished, key: bridgedKey(k, name), value: Buffer.alloc(0) }
  }

  /** The broker's appends of an inbound QoS 2 message to its bridges, while they run: a re-send waits for them. */
  noteBridging (payload: unknown, appends: Promise<unknown>): void {
    const k = typeof payload === 'object' && payload !== null ? this.#incomingKeyOf.get(payload) : undefined
    if (k === undefined) return
    const hex = k.toString('hex')
    const settled = appends.then(() => {}, () => {})
    this.#bridgingNow.set(hex, settled)
    void settled.then(() => { if (this.#bridgingNow.get(hex) === settled) this.#bridgingNow.delete(hex) })
  }

  /** Appends `stored` (found as a re-send under `k`) to the bridges that take it and have no mark for it. */
  async #completeBridging (k: Buffer, stored: PacketLike): Promise<void> {
    const bridging = this.#bridging
    if (bridging === undefined) return
    await this.#bridgingNow.get(k.toString('hex'))
    const missing: string[] = []
    for (const name of bridging.owed(stored)) {
      if (await this.#incomingPublished.get(bridgedKey(k, name)) === undefined) missing.push(name)
    }
    if (missing.length === 0) return
    if (typeof stored.payload === 'object' && stored.payload !== null) this.#incomingKeyOf.set(stored.payload, k)
    await bridging.complete(stored, missing)
  }

  /**
   * The stored inbound packet; rejects `no such packet` when absent (aedes reads that as "new").
   * Answers for one client resolve in the order they were asked: aedes handles a socket read's
   * packets concurrently and publishes each QoS 2 message when its lookup settles, so lookups
   * that overtake each other would reorder that publisher's messages. Every read a lookup needs
   * happens before its turn: a re-send after a restart reads the `I` mark too, and answered after
   * the turn it fell behind the new messages sent after it (found by the kill -9 rounds).
   */
  async incomingGetPacket (client: PersistenceClient, packet: { messageId?: number, cmd?: string, topic?: unknown, payload?: unknown }): Promise<PacketLike> {
    const lookup = this.#lookupIncoming(this.#incomingKey(client.id, packet), packet)
    const previous = this.#incomingLookups.get(client.id)
    const settled = lookup.then(() => {}, () => {})
    const turn = previous === undefined ? settled : previous.then(() => settled)
    this.#incomingLookups.set(client.id, turn)
    await turn
    if (this.#incomingLookups.get(client.id) === turn) this.#incomingLookups.delete(client.id)
    const stored = await lookup
    if (stored === undefined) throw new Error('no such packet')
    return stored
  }

  /** The stored inbound packet under `k` if `packet` is a re-send of it (or a PUBREL for it), else undefined. */
  async #lookupIncoming (k: Buffer, packet: { cmd?: string, topic?: unknown, payload?: unknown }): Promise<PacketLike | undefined> {
    const v = await this.#incoming.get(k)
    if (v === undefined) return undefined
    const stored = decode<PacketLike>(v)
    // A different message under this id: the entry outlived its exchange (aedes answers PUBREL
    // with PUBCOMP even when deleting the entry failed), and the client has reused the id.
    if (isStale(stored, packet)) return undefined
    // Stored by a process that died before the message was queued (no mark): aedes would answer
    // the client's re-send with PUBREC and never publish it. Reported absent, it is published now.
    if (!this.#incomingThisRun.has(k.toString('hex')) && await this.#incomingPublished.get(k) === undefined) return undefined
    // Queued locally, but maybe not in every bridge's outbox: those get it now. If that fails the
    // re-send is reported absent: published again (a local duplicate) rather than lost upstream.
    if (packet.cmd === 'publish') {
      try {
        await this.#completeBridging(k, stored)
      } catch {
        return undefined
      }
    }
    return stored
  }

  /** Deletes a stored inbound packet; rejects `no such packet` when absent, as the in-memory store does. */
  async incomingDelPacket (client: PersistenceClient, packet: { messageId?: number }): Promise<void> {
    const k = this.#incomingKey(client.id, packet)
    if (await this.#incoming.get(k) === undefined) throw new Error('no such packet')
    await this.#write([
      { type: 'del', sublevel: this.#incoming, key: k },
      { type: 'del', sublevel: this.#incomingPublished, key: k },
      ...(this.#bridging?.names ?? []).map((name): StoreOp => ({ type: 'del', sublevel: this.#incomingPublished, key: bridgedKey(k, name) })),
    ])
    this.#incomingThisRun.delete(k.toString('hex'))
  }

  /** Every stored inbound QoS 2 packet id with its client (the broker's cap on them is rebuilt from these at start). */
  async * incomingIds (): AsyncGenerator<{ clientId: string, messageId: number }> {
    for await (const k of this.#incoming.keys()) {
      const [clientId, rest] = splitFirst(k)
      if (rest.length === 2) yield { clientId, messageId: rest.readUInt16BE(0) }
    }
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
  /**
   * Deletes the client's will and returns it (undefined if there was none). Never rejects: aedes
   * 1.2 calls it at CONNECT without a rejection handler (`delWill().finally(...)`), so a store
   * failure here would be an unhandled rejection that ends the process. A will that could not be
   * deleted stays stored; the putWill that follows fails the CONNECT instead.
   */
  async delWill (client: PersistenceClient): Promise<PacketLike | undefined> {
    try {
      const will = await this.getWill(client)
      if (will !== undefined) await this.#write([{ type: 'del', sublevel: this.#wills, key: utf8(client.id) }])
      return will
    } catch {
      return undefined
    }
  }

  /** Wills the broker times itself (MQTT 5 delayed wills after a restart): streamWill() leaves them out. */
  holdWills (held: (clientId: string) => boolean): void {
    this.#heldWill = held
  }

  /** Wills whose brokerId is not a key of `brokers` (brokers that are alive), held ones left out. */
  streamWill (brokers: Record<string, unknown> = {}): Readable {
    const wills = this.#wills
    const held = this.#heldWill
    async function * orphaned (): AsyncGenerator<PacketLike> {
      for await (const v of wills.values()) {
        const will = decode<PacketLike>(v)
        const id = will.brokerId ?? ''
        if (typeof will.clientId === 'string' && held(will.clientId)) continue
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
    const { cmd, topic, payload, qos, retain, properties } = packet
    // MQTT 5 message expiry counts from arrival (aedes stamps it later in its pipeline): a message
    // replayed after a crash keeps its deadline rather than starting its interval again.
    const interval = (properties as { messageExpiryInterval?: unknown } | undefined)?.messageExpiryInterval
    const messageExpiry = packet.messageExpiry ?? (typeof interval === 'number' && interval > 0 ? Date.now() + interval * 1000 : undefined)
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

  /**
   * Records that a persistent session's client went away at `at` (ms since the epoch). An MQTT 5
   * session brings its own expiry interval (seconds; undefined: limits.sessionExpirySeconds) and,
   * when a delayed will is pending, the time it is due.
   */
  async sessionDisconnected (clientId: string, at: number, expirySeconds?: number, willAt?: number): Promise<void> {
    this.#sessionIds.add(clientId)
    await this.#write([{ type: 'put', sublevel: this.#sessions, key: str(clientId), value: sessionValue({ at, expirySeconds, willAt }) }])
  }

  /**
   * The session's client is back: it is no longer counting down. An MQTT 5 session's own expiry
   * interval is kept (a record marked connected), so a stop or a crash while it is connected does not
   * lose it.
   */
  async sessionConnected (clientId: string, expirySeconds?: number): Promise<void> {
    // No record to delete (a clean client connecting, as most do): no write.
    if (expirySeconds === undefined && !this.#sessionIds.delete(clientId)) return
    if (expirySeconds !== undefined) this.#sessionIds.add(clientId)
    await this.#write([expirySeconds === undefined
      ? { type: 'del', sublevel: this.#sessions, key: str(clientId) }
      : { type: 'put', sublevel: this.#sessions, key: str(clientId), value: sessionValue({ at: 0, connected: true, expirySeconds }) }])
  }

  /** Every session record: when its client went away (or that it was connected when last written), its own expiry, a delayed will's due time. */
  async * sessionRecords (): AsyncGenerator<SessionRecord & { clientId: string }> {
    for await (const [k, v] of this.#sessions.iterator()) yield { clientId: splitFirst(k)[0], ...readSessionValue(v) }
  }

  /** The earliest time (ms) a session record's own expiry falls due, as of the last expireSessions(); undefined if none. */
  get nextSessionExpiry (): number | undefined {
    return this.#nextSessionExpiry
  }

  /**
   * Ends every stored session whose client has been away too long: since before `before`, or, for
   * a session with its own expiry interval (MQTT 5), for longer than that interval. Its
   * subscriptions, queue and incoming QoS 2 state go, in one batch per session. A stored session
   * with no record and not `connected` (its client was online when the process stopped) is
   * recorded as away from `now`, as is one recorded as connected. Returns the client ids whose
   * sessions ended.
   */
  async expireSessions (before: number, now: number, connected: (clientId: string) => boolean): Promise<string[]> {
    const away = new Map<string, number>()
    const own = new Map<string, SessionRecord>()
    for await (const record of this.sessionRecords()) {
      if (record.expirySeconds !== undefined) own.set(record.clientId, record)
      if (record.connected === true) {
        if (connected(record.clientId)) continue
        await this.sessionDisconnected(record.clientId, now, record.expirySeconds, record.willAt)
        record.at = now
      }
      away.set(record.clientId, record.at)
    }
    const queued = [...this.#queues.values()].filter(q => q.messages > 0).map(q => q.clientId)
    for (const clientId of new Set([...this.#clientSubs.keys(), ...queued])) {
      if (!away.has(clientId) && !own.has(clientId) && !connected(clientId)) {
        await this.sessionDisconnected(clientId, now)
        away.set(clientId, now)
      }
    }
    let next: number | undefined
    const due = (clientId: string, at: number): boolean => {
      const expiry = own.get(clientId)?.expirySeconds
      if (expiry === undefined) return at < before
      const deadline = at + expiry * 1000
      if (deadline <= now) return true
      next = next === undefined ? deadline : Math.min(next, deadline)
      return false
    }
    const ended: string[] = []
    for (const [clientId, at] of away) {
      if (connected(clientId) || !due(clientId, at)) continue
      await this.#withSubLock(clientId, async () => {
        const topics = [...(this.#clientSubs.get(clientId)?.keys() ?? [])]
        const ops: StoreOp[] = topics.map((t): StoreOp => ({ type: 'del', sublevel: this.#subs, key: this.#subKey(clientId, t) }))
        const q = this.#state(clientId)
        const token = this.#beginRead(q)
        const marks: Array<{ q: QueueState, hex: string, mark: Mark }> = []
        let write: Promise<void>
        try {
          // The queue as read now; entries queued meanwhile stay, and stay counted.
          const prefix = str(clientId)
          const gone: Array<{ hex: string, seqKey: Buffer, size: number }> = []
          for await (const [k, v] of this.#outgoing.iterator(this.#clientRange(clientId))) {
            ops.push({ type: 'del', sublevel: this.#outgoing, key: k })
            const seqKey = Buffer.from(k.subarray(prefix.length))
            gone.push({ hex: seqKey.toString('hex'), seqKey, size: v.length })
          }
          for (const sublevel of [this.#byIdentity, this.#byMessageId, this.#incoming, this.#incomingPublished]) {
            for await (const k of sublevel.keys(this.#clientRange(clientId))) ops.push({ type: 'del', sublevel, key: k })
          }
          // From here to the submission nothing awaits: the marks checked are current.
          for (const { hex, seqKey, size } of gone) {
            if (q.marks.get(hex)?.state === 'gone') continue // already deleted (and uncounted) by another batch
            const mark: Mark = { state: 'gone', writtenAt: undefined, seqKey, size, idKey: undefined }
            q.marks.set(hex, mark)
            marks.push({ q, hex, mark })
            this.#addCounts(q, -1, -size)
          }
          ops.push(this.#counterOp(clientId))
          ops.push({ type: 'del', sublevel: this.#sessions, key: str(clientId) })
          this.#sessionIds.delete(clientId)
          write = this.#write(ops)
        } finally {
          this.#endRead(q, token)
        }
        try {
          await write
        } catch (err) {
          for (const { hex, mark } of marks) {
            if (q.marks.get(hex) === mark) q.marks.delete(hex)
            this.#addCounts(q, 1, mark.size)
          }
          throw err
        }
        this.#written(marks)
        this.#applyRemove(clientId, topics)
      })
      ended.push(clientId)
    }
    this.#nextSessionExpiry = next
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
    const marker = this.#countersMarkerPending
    if (marker) ops.push({ type: 'put', sublevel: this.#meta, key: COUNTERS_VERSION_KEY, value: Buffer.from([COUNTERS_VERSION]) })
    await this.#store.writer.write(ops)
    if (marker) this.#countersMarkerPending = false
    if (reservation !== undefined && reservation > this.#durableReserved) this.#durableReserved = reservation
  }
}

/** An outgoingStream's iterator (opened at once, or once a pending write has landed) and its state. */
interface StreamRead {
  iterator: (AsyncIterable<[Buffer, Buffer]> & { close (): Promise<void> }) | undefined
  started: boolean
  ended: boolean
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

/**
 * True when `incoming` is a PUBLISH that is not a re-send of the stored inbound packet: another
 * topic or payload. (A PUBREL lookup carries neither and is never stale.)
 */
function isStale (stored: PacketLike, incoming: { cmd?: string, topic?: unknown, payload?: unknown }): boolean {
  if (incoming.cmd !== 'publish') return false
  if (incoming.topic !== stored.topic) return true
  const a = incoming.payload
  const b = stored.payload
  const bytes = (p: unknown): Buffer => Buffer.isBuffer(p) ? p : p instanceof Uint8Array ? Buffer.from(p.buffer, p.byteOffset, p.byteLength) : Buffer.from(String(p ?? ''))
  return !bytes(a).equals(bytes(b))
}

function isPacketId (id: unknown): id is number {
  return typeof id === 'number' && Number.isInteger(id) && id >= 0 && id <= 0xffff
}

/** A session record (sublevel `e`): u64 `at`, then, when there is more, msgpack `{ x: expirySeconds, w: willAt, c: connected }`. */
export interface SessionRecord { at: number, connected?: boolean, expirySeconds?: number, willAt?: number }

function sessionValue (record: SessionRecord): Buffer {
  const at = u64(record.at)
  if (record.expirySeconds === undefined && record.willAt === undefined && record.connected !== true) return at
  return Buffer.concat([at, encode({ x: record.expirySeconds, w: record.willAt, c: record.connected === true ? 1 : undefined })])
}

function readSessionValue (v: Buffer): SessionRecord {
  const at = readU64(v.subarray(0, 8))
  if (v.length <= 8) return { at }
  const extra = decode<{ x?: number, w?: number, c?: number }>(v.subarray(8))
  const record: SessionRecord = { at }
  if (extra.c === 1) record.connected = true
  if (typeof extra.x === 'number') record.expirySeconds = extra.x
  if (typeof extra.w === 'number') record.willAt = extra.w
  return record
}

/** What LevelPersistence needs to know of the broker's bridges for inbound QoS 2 (see setBridging). */
export interface IncomingBridging {
  /** Every bridge's name (their marks are deleted with the message). */
  names: string[]
  /** The names of the bridges whose out-mappings take `packet`. */
  owed (packet: PacketLike): string[]
  /** Appends `packet` to the outboxes of bridges `names`, each with its bridgedMarkOp in the same batch. */
  complete (packet: PacketLike, names: string[]): Promise<void>
}

/** The mark that an inbound QoS 2 message under `i` key `k` is in bridge `name`'s outbox (sublevel `I`). */
function bridgedKey (k: Buffer, name: string): Buffer {
  return key(k, Buffer.from([0]), utf8(name))
}

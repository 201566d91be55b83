import { decode, encode } from '../store/codec.js'
import { key, prefixRange, readU64, str, u64 } from '../store/keys.js'
import { META, type Store } from '../store/open.js'
import { sublevelOf, type StoreOp, type Sublevel } from '../store/writer.js'
import type { MessageProperties } from './properties.js'

/*
 * A bridge's outbox: the messages an out-mapping owes the upstream broker, on disk, in order.
 *
 *   b  outbox   str(bridge) ‖ u64(seq) → OutboxEntry
 *   m  meta     str('bc') ‖ str(bridge) → u64(messages) ‖ u64(bytes)   (same batch as every change)
 *
 * Every change is one batch through the store's group-commit writer, so it is as durable as the
 * store's durability mode says. Sequence numbers are the bridge's own: the next one is one past
 * the last key at open. An entry's packet id is stored with it before a QoS 2 message is sent, so
 * after a restart it is re-sent under the same id (exactly once upstream).
 *
 * An entry is a MessagePack map (store codec version 1) of the OutboxEntry fields that are set:
 * topic, payload, qos, retain, enqueuedAt, and only when present messageExpiry, properties (the
 * MQTT 5 application-message properties: userProperties, contentType, correlationData,
 * responseTopic, payloadFormatIndicator, each only when present), packetId and released. An absent
 * field costs nothing, so entries written before `properties` existed decode as messages without
 * them, and an older build reading a newer entry ignores the field it does not know.
 */

/** What the outbox keeps of a message. */
export interface OutboxMessage {
  topic: string
  payload: Buffer
  qos: 0 | 1 | 2
  retain: boolean
  /** MQTT 5 message expiry, seconds from `enqueuedAt`. */
  messageExpiry?: number
  /** MQTT 5 properties of the application message (never topic alias or subscription identifier); absent when none. */
  properties?: MessageProperties
}

export interface OutboxEntry extends OutboxMessage {
  /** ms since the epoch when it was appended. */
  enqueuedAt: number
  /** The upstream packet id it was (or is being) sent under, once assigned. */
  packetId?: number
  /** QoS 2: the upstream answered PUBREC, so what is owed is a PUBREL, not the PUBLISH again. */
  released?: boolean
}

export interface OutboxLimits {
  maxMessages: number
  maxBytes: number
  /** 0: no age limit. */
  maxAgeSeconds: number
  /** `drop-oldest`: the oldest entries not in flight make room; `reject`: the new message is refused. */
  whenFull: 'drop-oldest' | 'reject'
}

/** Thrown by append() when the outbox is full and `whenFull` is `reject`. */
export class OutboxFullError extends Error {
  constructor (readonly bridge: string, readonly limit: 'messages' | 'bytes', readonly max: number) {
    super(`bridge ${bridge}: outbox full (${limit === 'messages' ? 'outbox.maxMessages' : 'outbox.maxBytes'} ${max})`)
    this.name = 'OutboxFullError'
  }
}

/** True when an entry is past the outbox's maxAgeSeconds or its own MQTT 5 message expiry. */
export function isExpired (entry: OutboxEntry, limits: Pick<OutboxLimits, 'maxAgeSeconds'>, now = Date.now()): boolean {
  const age = now - entry.enqueuedAt
  return (limits.maxAgeSeconds > 0 && age >= limits.maxAgeSeconds * 1000) ||
    (entry.messageExpiry !== undefined && age >= entry.messageExpiry * 1000)
}

/** Whether an encoded entry carries a packet id (it was sent, so it is never dropped or expired). */
function hasPacketId (value: Buffer): boolean {
  return decode<OutboxEntry>(value).packetId !== undefined
}

/** A stored entry with its place in the outbox. */
export interface Queued { seq: number, entry: OutboxEntry, size: number }

const COUNTER_PREFIX = str('bc')
/** How much one nextv() of take() may read: a chunk of 1000 entries of up to ~4 KiB each. */
const TAKE_HIGH_WATER_BYTES = 4 * 1024 * 1024

export class Outbox {
  readonly #store: Store
  readonly #name: string
  readonly #limits: OutboxLimits
  readonly #entries: Sublevel
  readonly #meta: Sublevel
  readonly #prefix: Buffer
  #next = 0
  /** Per running scan, the entries deleted since it began. */
  readonly #scans = new Set<Set<number>>()
  /** No entry below this sequence is left (take() starts its scan here or at #cursor, whichever is higher). */
  #floor = 0
  /**
   * Every entry below this sequence is in flight, being deleted or gone: take() starts its scan
   * here, not at the window's worth of entries in flight at the head. Lowered (#rewind) whenever
   * an entry becomes available again; `#rewinds` counts that, so a scan does not raise it past one.
   */
  #cursor = 0
  #rewinds = 0
  #messages = 0
  #bytes = 0
  /** Entries handed out by take() and not yet removed or released: never dropped. */
  readonly #inflight = new Set<number>()
  /** Sequences appended but not yet written: take() stops before the first. */
  readonly #unwritten = new Set<number>()
  /** Entries deleted by a batch not yet written (drop or remove), so take() skips them. */
  readonly #deleting = new Set<number>()
  /** remove() calls of this event-loop turn, written together by #writeRemovals(). */
  #removals: Array<{ queued: Queued, resolve: () => void, reject: (err: unknown) => void }> = []

  private constructor (store: Store, name: string, limits: OutboxLimits) {
    this.#store = store
    this.#name = name
    this.#limits = limits
    this.#entries = sublevelOf(store.db, 'b')
    this.#meta = sublevelOf(store.db, META)
    this.#prefix = str(name)
  }

  /** Opens bridge `name`'s outbox: counters from meta (rebuilt by one scan if absent), the next sequence from the last key. */
  static async open (store: Store, name: string, limits: OutboxLimits): Promise<Outbox> {
    const outbox = new Outbox(store, name, limits)
    await outbox.#load()
    return outbox
  }

  async #load (): Promise<void> {
    const range = prefixRange(this.#prefix)
    const last = await this.#entries.keys({ ...range, reverse: true, limit: 1 }).all()
    this.#next = last.length === 0 ? 0 : readU64(last[0] as Buffer) + 1
    const counters = await this.#meta.get(this.#counterKey())
    if (counters !== undefined && counters.length === 16) {
      this.#messages = readU64(counters, 0)
      this.#bytes = readU64(counters, 8)
      return
    }
    for await (const v of this.#entries.values(range)) {
      this.#messages++
      this.#bytes += v.length
    }
  }

  /** Messages and bytes waiting (in flight included). */
  get size (): { messages: number, bytes: number } {
    return { messages: this.#messages, bytes: this.#bytes }
  }

  /**
   * Appends a message durably; resolves once it is written. When full, per `whenFull`: the oldest
   * entries not in flight are deleted in the same batch (their count is returned), or
   * OutboxFullError is thrown and nothing is written.
   */
  async append (message: OutboxMessage, now = Date.now(), extra: StoreOp[] = []): Promise<{ dropped: number }> {
    const entry: OutboxEntry = { ...message, enqueuedAt: now }
    // An optional field left undefined would be stored (the codec keeps own undefined fields): absent costs nothing.
    if (entry.messageExpiry === undefined) delete entry.messageExpiry
    if (entry.properties === undefined) delete entry.properties
    const value = encode(entry)
    // The place in the outbox is the call order. Until this entry is written, take() hands out
    // nothing from here on, so a later append written first cannot overtake it.
    const seq = this.#next++
    this.#unwritten.add(seq)
    try {
      return await this.#append(seq, value, extra)
    } finally {
      this.#unwritten.delete(seq)
    }
  }

  async #append (seq: number, value: Buffer, extra: StoreOp[]): Promise<{ dropped: number }> {
    const ops: StoreOp[] = []
    let dropped = 0
    let droppedBytes = 0
    // The counters change only in the same synchronous step that submits the batch (below): a
    // batch submitted by someone else while this one scans must not carry counts of deletes that
    // are not in it or before it, or a crash in between leaves the counters on disk too low.
    const over = (): 'messages' | 'bytes' | null =>
      this.#messages - dropped + 1 > this.#limits.maxMessages ? 'messages' : this.#bytes - droppedBytes + value.length > this.#limits.maxBytes ? 'bytes' : null
    const full = over()
    if (full !== null) {
      if (this.#limits.whenFull === 'reject' || value.length > this.#limits.maxBytes) {
        throw new OutboxFullError(this.#name, full, full === 'messages' ? this.#limits.maxMessages : this.#limits.maxBytes)
      }
      for await (const [k, v, seq] of this.#scan()) {
        if (over() === null) break
        if (this.#inflight.has(seq) || this.#deleting.has(seq) || hasPacketId(v)) continue
        this.#deleting.add(seq)
        ops.push({ type: 'del', sublevel: this.#entries, key: k })
        dropped++
        droppedBytes += v.length
      }
      const still = over()
      if (still !== null) {
        // Only messages in flight are left: the new one cannot be kept.
        for (const op of ops) {
          this.#deleting.delete(readU64(op.key))
          this.#rewind(readU64(op.key))
        }
        throw new OutboxFullError(this.#name, still, still === 'messages' ? this.#limits.maxMessages : this.#limits.maxBytes)
      }
    }
    ops.push({ type: 'put', sublevel: this.#entries, key: this.#entryKey(seq), value }, ...extra)
    this.#messages += 1 - dropped
    this.#bytes += value.length - droppedBytes
    ops.push(this.#counterOp())
    try {
      await this.#store.writer.write(ops)
      this.#deleted(ops)
    } catch (err) {
      this.#messages += dropped - 1
      this.#bytes += droppedBytes - value.length
      for (const op of ops) if (op.type === 'del') this.#rewind(readU64(op.key))
      throw err
    } finally {
      for (const op of ops) if (op.type === 'del') this.#deleting.delete(readU64(op.key))
    }
    return { dropped }
  }

  /**
   * Up to `n` entries, oldest first, that are not in flight; they are in flight from now until
   * remove() or release(). The forwarder keeps its window full with it.
   */
  async take (n: number): Promise<Queued[]> {
    const out: Queued[] = []
    if (n <= 0) return out
    // The iterator reads a snapshot taken now: appends written later are not in it, so the first
    // unwritten sequence as of now is where this scan must stop.
    const stop = this.#unwritten.size > 0 ? Math.min(...this.#unwritten) : Infinity
    // Read in chunks (nextv), not an iterator step per entry: the forwarder calls this for every
    // quarter window. The scan starts at #cursor, past the entries in flight at the head.
    const gone = new Set<number>()
    this.#scans.add(gone)
    const start = Math.max(this.#floor, this.#cursor)
    const rewinds = this.#rewinds
    /** One past the last entry this scan handed out or found in flight, deleting or gone. */
    let next = start
    // classic-level ends a nextv() once it holds highWaterMarkBytes (default 16 KiB, ~100 small
    // entries): each chunk would be ten thread-pool round trips, each waiting for an event-loop
    // turn, which under publishing load are 10-20 ms each. The mark is set for a whole chunk.
    // (A classic-level option the sublevel passes on; abstract-level's types do not list it.)
    const options = { ...prefixRange(this.#prefix), gte: this.#entryKey(start), highWaterMarkBytes: TAKE_HIGH_WATER_BYTES }
    const it = this.#entries.iterator(options)
    try {
      let first = true
      for (;;) {
        const chunk = await it.nextv(Math.min(1000, n - out.length + this.#inflight.size + this.#deleting.size))
        if (chunk.length === 0) break
        for (const [k, v] of chunk) {
          const seq = readU64(k)
          if (gone.has(seq)) {
            next = seq + 1
            continue
          }
          // Everything before the first entry still here is gone: later scans start there, not at
          // the tombstones of a million acknowledged entries. (Only known when the scan began at the floor.)
          if (first && start === this.#floor) this.#floor = seq
          first = false
          if (seq > stop) return out
          next = seq + 1
          if (this.#inflight.has(seq) || this.#deleting.has(seq)) continue
          this.#inflight.add(seq)
          out.push({ seq, entry: decode<OutboxEntry>(v), size: v.length })
          if (out.length >= n) return out
        }
      }
      return out
    } finally {
      // Nothing below `next` can be handed out now, unless an entry was given back meanwhile.
      if (this.#rewinds === rewinds) this.#cursor = Math.max(this.#cursor, next)
      this.#scans.delete(gone)
      await it.close()
    }
  }

  /**
   * Packet ids stored with entries near the head of the outbox (QoS 2 messages sent before a
   * restart): the forwarder must not give them to other messages until those entries are done.
   * Ids are assigned in outbox order, so the scan stops at the first QoS 2 entry without one.
   */
  async storedPacketIds (limit = 65_535): Promise<Set<number>> {
    const ids = new Set<number>()
    let seen = 0
    for await (const v of this.#entries.values(prefixRange(this.#prefix))) {
      const entry = decode<OutboxEntry>(v)
      if (entry.packetId !== undefined) ids.add(entry.packetId)
      else if (entry.qos === 2) break
      if (++seen >= limit) break
    }
    return ids
  }

  /** Stores the packet id an entry is sent under (before sending it, for QoS 2). */
  async assignPacketId (queued: Queued, packetId: number): Promise<void> {
    await this.#update([queued], () => ({ packetId }))
  }

  /** Stores the packet ids of several entries in one write (a QoS 2 batch before it is sent). */
  async assignPacketIds (assignments: Array<{ queued: Queued, packetId: number }>): Promise<void> {
    const ids = new Map(assignments.map((a) => [a.queued, a.packetId]))
    await this.#update(assignments.map((a) => a.queued), (q) => ({ packetId: ids.get(q) as number }))
  }

  /** Records that the upstream answered PUBREC (a QoS 2 entry now owes a PUBREL), before the PUBREL is sent. */
  async markReleased (queued: Queued): Promise<void> {
    await this.#update([queued], () => ({ released: true }))
  }

  async #update (list: Queued[], change: (q: Queued) => Partial<OutboxEntry>): Promise<void> {
    if (list.length === 0) return
    const ops: StoreOp[] = []
    const updated = list.map((q) => {
      const entry: OutboxEntry = { ...q.entry, ...change(q) }
      const value = encode(entry)
      ops.push({ type: 'put', sublevel: this.#entries, key: this.#entryKey(q.seq), value })
      return { q, entry, size: value.length }
    })
    const delta = updated.reduce((sum, u) => sum + u.size - u.q.size, 0)
    this.#bytes += delta
    ops.push(this.#counterOp())
    try {
      await this.#store.writer.write(ops)
    } catch (err) {
      this.#bytes -= delta
      throw err
    }
    for (const u of updated) {
      u.q.entry = u.entry
      u.q.size = u.size
    }
  }

  /** Deletes an entry the upstream has acknowledged (PUBACK / PUBCOMP), or one that expired. */
  async remove (queued: Queued): Promise<void> {
    if (this.#deleting.has(queued.seq)) return
    this.#deleting.add(queued.seq)
    // The counters change when the write is submitted (#writeRemovals), not now: see #append.
    // MQTT.js handles one acknowledgement per tick: the removals of one event-loop turn share a
    // write (one delete each and one counter update, not a counter update per entry).
    await new Promise<void>((resolve, reject) => {
      if (this.#removals.push({ queued, resolve, reject }) === 1) setImmediate(() => this.#writeRemovals())
    })
  }

  #writeRemovals (): void {
    const group = this.#removals
    this.#removals = []
    const ops: StoreOp[] = group.map(({ queued }) => ({ type: 'del', sublevel: this.#entries, key: this.#entryKey(queued.seq) }))
    for (const { queued } of group) {
      this.#messages--
      this.#bytes -= queued.size
    }
    ops.push(this.#counterOp())
    const settle = (): void => {
      for (const { queued } of group) {
        this.#deleting.delete(queued.seq)
        this.#inflight.delete(queued.seq)
      }
    }
    this.#store.writer.write(ops).then(() => {
      this.#deleted(ops)
      settle()
      for (const r of group) r.resolve()
    }, (err: unknown) => {
      for (const { queued } of group) {
        this.#messages++
        this.#bytes += queued.size
        this.#floor = Math.min(this.#floor, queued.seq)
        this.#rewind(queued.seq)
      }
      settle()
      for (const r of group) r.reject(err)
    })
  }

  /** Gives an in-flight entry back (the link went down before it was acknowledged): take() hands it out again. */
  release (queued: Queued): void {
    this.#inflight.delete(queued.seq)
    this.#floor = Math.min(this.#floor, queued.seq)
    this.#rewind(queued.seq)
  }

  /** An entry can be handed out again (given back, or its delete failed): take() must see it. */
  #rewind (seq: number): void {
    this.#cursor = Math.min(this.#cursor, seq)
    this.#rewinds++
  }

  /**
   * Deletes entries past `outbox.maxAgeSeconds` or their own message expiry, except those in
   * flight or already sent under a packet id; returns how many. Entries are in append order, so
   * the scan ends at the first one younger than maxAgeSeconds (later message expiries are caught
   * when the forwarder reaches them); with no maxAgeSeconds it reads the whole outbox.
   */
  async expire (now = Date.now()): Promise<number> {
    const ops: StoreOp[] = []
    const maxAge = this.#limits.maxAgeSeconds * 1000
    let removed = 0
    let bytes = 0
    let first = true
    for await (const [k, v, seq] of this.#scan(this.#entryKey(this.#floor))) {
      // As in take(): the first entry still here is the floor (take() starts at #cursor, so it
      // learns the floor only after a rewind; this sweep keeps it from trailing far behind).
      if (first) this.#floor = seq
      first = false
      const entry = decode<OutboxEntry>(v)
      if (maxAge > 0 && now - entry.enqueuedAt < maxAge) break
      if (this.#inflight.has(seq) || this.#deleting.has(seq) || entry.packetId !== undefined) continue
      if (!isExpired(entry, this.#limits, now)) continue
      this.#deleting.add(seq)
      ops.push({ type: 'del', sublevel: this.#entries, key: k })
      removed++
      bytes += v.length
    }
    if (removed === 0) return 0
    this.#messages -= removed
    this.#bytes -= bytes
    ops.push(this.#counterOp())
    try {
      await this.#store.writer.write(ops)
      this.#deleted(ops)
    } catch (err) {
      this.#messages += removed
      this.#bytes += bytes
      for (const op of ops) if (op.type === 'del') this.#rewind(readU64(op.key))
      throw err
    } finally {
      for (const op of ops) if (op.type === 'del') this.#deleting.delete(readU64(op.key))
    }
    return removed
  }

  /** Age in ms of the oldest entry (0 when empty). */
  async oldestAgeMs (now = Date.now()): Promise<number> {
    const first = await this.#entries.values({ ...prefixRange(this.#prefix), limit: 1 }).all()
    return first.length === 0 ? 0 : Math.max(0, now - decode<OutboxEntry>(first[0] as Buffer).enqueuedAt)
  }

  /**
   * The entries from `gte` on, without those deleted while the scan runs: a LevelDB iterator reads
   * a snapshot taken when it was created, so an entry removed after that would come back to life
   * (sent twice, or counted twice when dropped).
   */
  async * #scan (gte?: Buffer): AsyncGenerator<[Buffer, Buffer, number]> {
    const gone = new Set<number>()
    this.#scans.add(gone)
    try {
      for await (const [k, v] of this.#entries.iterator(gte === undefined ? prefixRange(this.#prefix) : { ...prefixRange(this.#prefix), gte })) {
        const seq = readU64(k)
        if (!gone.has(seq)) yield [k, v, seq]
      }
    } finally {
      this.#scans.delete(gone)
    }
  }

  /** Tells the scans running now that these deletes are written. */
  #deleted (ops: StoreOp[]): void {
    if (this.#scans.size === 0) return
    for (const op of ops) {
      if (op.type !== 'del' || op.sublevel !== this.#entries) continue
      const seq = readU64(op.key)
      for (const scan of this.#scans) scan.add(seq)
    }
  }

  #entryKey (seq: number): Buffer {
    return key(this.#prefix, u64(seq))
  }

  #counterKey (): Buffer {
    return key(COUNTER_PREFIX, this.#prefix)
  }

  /** The counters as they are now, to write in the same batch as the change that made them so. */
  #counterOp (): StoreOp {
    // Never below 0, whatever happened before (a store from an older build): a count cannot stop the bridge.
    return { type: 'put', sublevel: this.#meta, key: this.#counterKey(), value: Buffer.concat([u64(Math.max(0, this.#messages)), u64(Math.max(0, this.#bytes))]) }
  }
}

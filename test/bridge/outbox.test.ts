import { afterAll, describe, expect, it } from 'vitest'
import { isExpired, Outbox, OutboxFullError, type OutboxLimits, type OutboxMessage, type Queued } from '../../src/bridge/outbox.js'
import { encode } from '../../src/store/codec.js'
import { key, str, u64 } from '../../src/store/keys.js'
import { openStore, type Store } from '../../src/store/open.js'
import { sublevelOf } from '../../src/store/writer.js'
import { removeTempDirs, tempDir } from '../store/helpers.js'

afterAll(removeTempDirs)

const LIMITS: OutboxLimits = { maxMessages: 1000, maxBytes: 1 << 20, maxAgeSeconds: 0, whenFull: 'drop-oldest' }

function msg (n: number, extra: Partial<OutboxMessage> = {}): OutboxMessage {
  return { topic: 'site/t', payload: Buffer.from(String(n)), qos: 1, retain: false, ...extra }
}

const payloads = (list: Array<{ entry: { payload: Buffer } }>): string[] => list.map((q) => q.entry.payload.toString())

async function open (dir: string, limits: Partial<OutboxLimits> = {}): Promise<{ store: Store, outbox: Outbox }> {
  const store = await openStore(dir, 'fsync')
  return { store, outbox: await Outbox.open(store, 'cloud', { ...LIMITS, ...limits }) }
}

describe('bridge Outbox (LevelDB)', () => {
  it('keeps order, counts and packet ids across a reopen; take() hands out each entry once until removed or released', async () => {
    const dir = tempDir()
    let { store, outbox } = await open(dir)
    for (let i = 0; i < 10; i++) await outbox.append(msg(i))
    const first = await outbox.take(3)
    expect(payloads(first)).toEqual(['0', '1', '2'])
    expect(payloads(await outbox.take(2))).toEqual(['3', '4'])
    const [q0, q1, q2] = first as [Queued, Queued, Queued]
    await outbox.assignPacketId(q0, 7)
    await outbox.remove(q1)
    outbox.release(q2)
    expect(payloads(await outbox.take(1))).toEqual(['2'])
    expect(outbox.size.messages).toBe(9)
    const bytes = outbox.size.bytes
    await store.close()

    ;({ store, outbox } = await open(dir))
    expect(outbox.size).toEqual({ messages: 9, bytes })
    const all = await outbox.take(100)
    expect(payloads(all)).toEqual(['0', '2', '3', '4', '5', '6', '7', '8', '9'])
    expect(all[0]?.entry.packetId).toBe(7)
    // New entries go after what is there.
    await outbox.append(msg(10))
    expect(payloads(await outbox.take(5))).toEqual(['10'])
    await store.close()
  })

  it('drop-oldest: a full outbox drops its oldest entries not in flight, in the same batch as the new one', async () => {
    const { store, outbox } = await open(tempDir(), { maxMessages: 5 })
    for (let i = 0; i < 5; i++) await outbox.append(msg(i))
    const inFlight = await outbox.take(2) // 0 and 1 are being sent: never dropped
    expect(await outbox.append(msg(5))).toEqual({ dropped: 1 })
    expect(await outbox.append(msg(6))).toEqual({ dropped: 1 })
    expect(outbox.size.messages).toBe(5)
    for (const q of inFlight) outbox.release(q)
    expect(payloads(await outbox.take(10))).toEqual(['0', '1', '4', '5', '6'])
    await store.close()
  })

  it('reject: a full outbox refuses the new message with OutboxFullError and keeps what it has', async () => {
    const { store, outbox } = await open(tempDir(), { maxMessages: 3, whenFull: 'reject' })
    for (let i = 0; i < 3; i++) await outbox.append(msg(i))
    await expect(outbox.append(msg(3))).rejects.toThrow(OutboxFullError)
    await expect(outbox.append(msg(3))).rejects.toThrow('bridge cloud: outbox full (outbox.maxMessages 3)')
    expect(outbox.size.messages).toBe(3)
    expect(payloads(await outbox.take(10))).toEqual(['0', '1', '2'])
    await store.close()
  })

  it('the byte limit counts stored sizes; a message larger than maxBytes is refused even under drop-oldest', async () => {
    const { store, outbox } = await open(tempDir(), { maxBytes: 2000 })
    for (let i = 0; i < 10; i++) await outbox.append(msg(i, { payload: Buffer.alloc(300, i) }))
    expect(outbox.size.bytes).toBeLessThanOrEqual(2000)
    expect(outbox.size.messages).toBeLessThan(10)
    await expect(outbox.append(msg(99, { payload: Buffer.alloc(5000) }))).rejects.toThrow('outbox.maxBytes 2000')
    await store.close()
  })

  it('only in-flight entries left: the new message is refused under drop-oldest too', async () => {
    const { store, outbox } = await open(tempDir(), { maxMessages: 2 })
    await outbox.append(msg(0))
    await outbox.append(msg(1))
    await outbox.take(2)
    await expect(outbox.append(msg(2))).rejects.toThrow(OutboxFullError)
    expect(outbox.size.messages).toBe(2)
    await store.close()
  })

  it('expire() removes entries past maxAgeSeconds (and message expiries before the first younger one), not those in flight', async () => {
    const { store, outbox } = await open(tempDir(), { maxAgeSeconds: 60 })
    const t0 = 1_000_000
    await outbox.append(msg(0), t0)
    await outbox.append(msg(1), t0)
    await outbox.append(msg(2, { messageExpiry: 5 }), t0 + 50_000)
    await outbox.append(msg(3), t0 + 50_000)
    const inFlight = await outbox.take(1) // 0
    expect(await outbox.oldestAgeMs(t0 + 1000)).toBe(1000)
    // 1 goes (age). The sweep stops at 2, the first entry younger than maxAgeSeconds: 2's own
    // 5 s expiry is for the forwarder to see when it gets there (isExpired).
    expect(await outbox.expire(t0 + 60_000)).toBe(1)
    for (const q of inFlight) outbox.release(q)
    const left = await outbox.take(10)
    expect(payloads(left)).toEqual(['0', '2', '3'])
    expect(left.map((q) => isExpired(q.entry, { maxAgeSeconds: 60 }, t0 + 60_000))).toEqual([true, true, false])
    expect(outbox.size.messages).toBe(3)
    await store.close()
  })

  it('concurrent appends keep call order even when a full outbox makes the first one read before writing', async () => {
    const { store, outbox } = await open(tempDir(), { maxMessages: 50 })
    for (let i = 0; i < 50; i++) await outbox.append(msg(i))
    await Promise.all(Array.from({ length: 30 }, (_v, i) => outbox.append(msg(100 + i))))
    const all = payloads(await outbox.take(100))
    expect(all).toHaveLength(50)
    expect(all.slice(-30)).toEqual(Array.from({ length: 30 }, (_v, i) => String(100 + i)))
    await store.close()
  })

  it('entries sent under a packet id are never dropped or expired; PUBREC state and stored ids survive a reopen', async () => {
    const dir = tempDir()
    let { store, outbox } = await open(dir, { maxMessages: 4, maxAgeSeconds: 60 })
    const t0 = 1_000_000
    for (let i = 0; i < 4; i++) await outbox.append(msg(i, { qos: 2 }), t0)
    const [a, b] = await outbox.take(2) as [Queued, Queued]
    await outbox.assignPacketIds([{ queued: a, packetId: 11 }, { queued: b, packetId: 12 }])
    await outbox.markReleased(b)
    outbox.release(a)
    outbox.release(b) // the link went down: back in the outbox, but sent under 11 and 12
    expect(await outbox.append(msg(4, { qos: 2 }), t0)).toEqual({ dropped: 1 }) // 2 goes, not 0 or 1
    expect(await outbox.expire(t0 + 120_000)).toBe(2) // 3 and 4; 0 and 1 stay
    await store.close()

    ;({ store, outbox } = await open(dir, { maxMessages: 4, maxAgeSeconds: 60 }))
    expect([...await outbox.storedPacketIds()]).toEqual([11, 12])
    const left = await outbox.take(10)
    expect(left.map((q) => [q.entry.payload.toString(), q.entry.packetId, q.entry.released === true])).toEqual([['0', 11, false], ['1', 12, true]])
    await store.close()
  })

  it('an entry removed while take() is scanning is not handed out again', async () => {
    const { store, outbox } = await open(tempDir(), { maxMessages: 100_000 })
    for (let i = 0; i < 20 * 50; i++) await outbox.append(msg(i))
    // Each round: remove the entries in flight while a take() scans over them (its LevelDB
    // snapshot still has them). Without the fix some round hands out a removed entry again.
    let inFlight = await outbox.take(50)
    for (let round = 1; round < 20; round++) {
      const removing = Promise.all(inFlight.map((q) => outbox.remove(q)))
      const [next] = await Promise.all([outbox.take(50), removing])
      expect(payloads(next)).toEqual(Array.from({ length: 50 }, (_v, i) => String(round * 50 + i)))
      inFlight = next
    }
    await store.close()
  })

  it('take() starts past the entries in flight, and an entry given back while a take() scans is handed out by the next one', async () => {
    const { store, outbox } = await open(tempDir(), { maxMessages: 100_000 })
    for (let i = 0; i < 300; i++) await outbox.append(msg(i))
    const first = await outbox.take(100)
    // Given back while the next take() scans (past it): that scan must not move its start beyond it.
    const scanning = outbox.take(100)
    outbox.release(first[5] as Queued)
    expect(payloads(await scanning)).toEqual(Array.from({ length: 100 }, (_v, i) => String(100 + i)))
    expect(payloads(await outbox.take(2))).toEqual(['5', '200'])
    // Given back after the scans: found again, in order, before anything newer.
    outbox.release(first[1] as Queued)
    outbox.release(first[0] as Queued)
    expect(payloads(await outbox.take(3))).toEqual(['0', '1', '201'])
    await store.close()
  })

  it('the counters written with each batch match the entries on disk after that batch (a crash between batches leaves them right)', async () => {
    const { store, outbox } = await open(tempDir())
    for (let i = 0; i < 10; i++) await outbox.append(msg(i))
    const taken = await outbox.take(5)
    // Removals of this turn are written together later; an append is written before them.
    const removing = Promise.all(taken.map((q) => outbox.remove(q)))
    await outbox.append(msg(10))
    // The state right after the append's batch, before the removals' batch: one snapshot of the
    // whole database (an iterator reads the snapshot of its creation).
    const snapshot = store.db.iterator({ keyEncoding: 'buffer', valueEncoding: 'buffer' })
    const entryPrefix = Buffer.from('!b!')
    const counterKey = Buffer.concat([Buffer.from('!m!'), Buffer.from('bc\u0000cloud\u0000')])
    let entries = 0
    let counted = -1
    for await (const [k, v] of snapshot) {
      if (k.subarray(0, entryPrefix.length).equals(entryPrefix)) entries++
      if (k.equals(counterKey)) counted = Number(v.readBigUInt64BE(0))
    }
    expect(counted).toBe(entries)
    await removing
    expect(outbox.size.messages).toBe(6)
    await store.close()
  })

  it('MQTT 5 properties (repeated user property keys, correlation data as a Buffer) are kept across a reopen; a message without them stores nothing for them', async () => {
    const dir = tempDir()
    let { store, outbox } = await open(dir)
    const properties = {
      userProperties: { site: 'edge-7', tag: ['a', 'b'] },
      contentType: 'application/json',
      correlationData: Buffer.from([0xde, 0xad, 0, 1]),
      responseTopic: 'reply/edge-7',
      payloadFormatIndicator: true,
    }
    const t0 = 1_000_000
    await outbox.append(msg(0, { properties, messageExpiry: 600, qos: 2 }), t0)
    await outbox.append(msg(1), t0)
    await outbox.append(msg(2, { properties: undefined, messageExpiry: undefined }), t0)
    await outbox.append(msg(3, { properties: { contentType: 'text/plain' } }), t0)
    const bytes = outbox.size.bytes
    await store.close()

    ;({ store, outbox } = await open(dir))
    expect(outbox.size).toEqual({ messages: 4, bytes })
    const [a, b, c, d] = await outbox.take(10) as [Queued, Queued, Queued, Queued]
    expect(a.entry.properties).toEqual(properties)
    expect(Buffer.isBuffer(a.entry.properties?.correlationData)).toBe(true)
    expect([a.entry.messageExpiry, a.entry.qos, a.entry.enqueuedAt]).toEqual([600, 2, t0])
    expect(d.entry.properties).toEqual({ contentType: 'text/plain' })
    // Absent properties cost nothing: the entry is what it was before properties existed.
    for (const q of [b, c]) {
      expect(Object.keys(q.entry).sort()).toEqual(['enqueuedAt', 'payload', 'qos', 'retain', 'topic'])
      expect(q.size).toBe(encode({ topic: 'site/t', payload: q.entry.payload, qos: 1, retain: false, enqueuedAt: t0 }).length)
    }
    // The PUBREC state and packet id updates keep them.
    await outbox.assignPacketId(a, 5)
    await outbox.markReleased(a)
    outbox.release(a)
    await store.close()
    ;({ store, outbox } = await open(dir))
    const [again] = await outbox.take(1) as [Queued]
    expect([again.entry.properties, again.entry.packetId, again.entry.released]).toEqual([properties, 5, true])
    await store.close()
  })

  it('an entry written before properties were kept (old format, bytes as stored then) still decodes and is sent; new entries go after it', async () => {
    const dir = tempDir()
    let store = await openStore(dir, 'fsync')
    // encode({ topic: 'site/old', payload: 'legacy', qos: 2, retain: true, messageExpiry: 3600,
    // enqueuedAt: 1_700_000_000_000, packetId: 9 }) as the outbox wrote it, with no counters
    // (rebuilt by a scan at open).
    const old = Buffer.from('01de0007a5746f706963a8736974652f6f6c64a77061796c6f6164c4066c6567616379a3716f7302a672657461696ec3ad6d657373616765457870697279cd0e10aa656e7175657565644174cb4278bcfe56800000a87061636b6574496409', 'hex')
    await store.writer.write([{ type: 'put', sublevel: sublevelOf(store.db, 'b'), key: key(str('cloud'), u64(0)), value: old }])
    await store.close()

    const opened = await open(dir)
    store = opened.store
    const outbox = opened.outbox
    expect(outbox.size).toEqual({ messages: 1, bytes: old.length })
    expect([...await outbox.storedPacketIds()]).toEqual([9])
    await outbox.append(msg(1, { properties: { userProperties: { k: 'v' } } }))
    const [first, second] = await outbox.take(10) as [Queued, Queued]
    expect(first.entry).toEqual({ topic: 'site/old', payload: Buffer.from('legacy'), qos: 2, retain: true, messageExpiry: 3600, enqueuedAt: 1_700_000_000_000, packetId: 9 })
    expect(first.entry.properties).toBeUndefined()
    expect(second.entry.properties).toEqual({ userProperties: { k: 'v' } })
    expect(second.seq).toBe(1)
    await store.close()
  })
})

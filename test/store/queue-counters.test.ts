import { afterAll, describe, expect, it } from 'vitest'
import { key, str, u64 } from '../../src/store/keys.js'
import { META, openStore } from '../../src/store/open.js'
import { LevelPersistence, type PacketLike } from '../../src/store/persistence.js'
import { GroupCommitWriter, sublevelOf, type BatchTarget, type StoreOp } from '../../src/store/writer.js'
import { removeTempDirs, tempDir } from './helpers.js'

afterAll(removeTempDirs)

const COUNTERS_PREFIX = str('qc')
const MARKER = Buffer.from('qcv')

let counter = 0
const publish = (payload: string, extra: Partial<PacketLike> = {}): PacketLike =>
  ({ cmd: 'publish', topic: 't', payload: Buffer.from(payload), qos: 1, retain: false, dup: false, brokerId: 'b', brokerCounter: ++counter, ...extra })

async function open (dir: string): Promise<LevelPersistence> {
  const p = new LevelPersistence(await openStore(dir, 'os'))
  await p.setup({ id: 'b' })
  return p
}

/** Counters kept by `p` equal a scan of the queues, and their sum is totalQueued(). */
async function expectCountersExact (p: LevelPersistence, clients: string[]): Promise<void> {
  const scanned = await p.countQueuesByScan()
  let messages = 0
  let bytes = 0
  for (const id of new Set([...clients, ...scanned.keys()])) {
    const c = scanned.get(id) ?? { messages: 0, bytes: 0 }
    expect({ id, messages: p.queuedMessages(id), bytes: p.queuedBytes(id) }).toEqual({ id, ...c })
    messages += c.messages
    bytes += c.bytes
  }
  expect(p.totalQueued()).toEqual({ messages, bytes })
}

/** The raw meta entries of the queue counters: client → [messages, bytes]; and the marker. */
async function rawCounters (dir: string): Promise<{ counters: Record<string, [number, number]>, marker: Buffer | undefined }> {
  const store = await openStore(dir, 'os')
  const meta = sublevelOf(store.db, META)
  const counters: Record<string, [number, number]> = {}
  for await (const [k, v] of meta.iterator({ gte: COUNTERS_PREFIX, lt: Buffer.concat([COUNTERS_PREFIX.subarray(0, -1), Buffer.from([1])]) })) {
    const id = k.subarray(COUNTERS_PREFIX.length, k.length - 1).toString('utf8')
    counters[id] = [Number(v.readBigUInt64BE(0)), Number(v.readBigUInt64BE(8))]
  }
  const marker = await meta.get(MARKER)
  await store.close()
  return { counters, marker }
}

/** Applies raw ops to the store in `dir` (to fake an older layout, or tamper with counters). */
async function rawWrite (dir: string, ops: (meta: ReturnType<typeof sublevelOf>) => StoreOp[]): Promise<void> {
  const store = await openStore(dir, 'os')
  await store.writer.write(ops(sublevelOf(store.db, META)))
  await store.close()
}

/** Fills a store with the kinds of change each queue op makes: enqueue, update, PUBREL, clear, expiry. */
async function exercise (p: LevelPersistence): Promise<void> {
  for (let i = 0; i < 20; i++) await p.outgoingEnqueueCombi([{ clientId: 'a' }, { clientId: 'b' }, { clientId: 'ünï' }], publish(`m${i}`.repeat(i + 1)))
  const queued = await p.outgoingStream({ id: 'a' }).toArray() as PacketLike[]
  for (let i = 0; i < 6; i++) await p.outgoingUpdate({ id: 'a' }, { ...queued[i], messageId: i + 1 })
  await p.outgoingUpdate({ id: 'a' }, { cmd: 'pubrel', messageId: 2 }) // a PUBLISH replaced by a smaller PUBREL
  await p.outgoingClearMessageId({ id: 'a' }, { messageId: 1 })
  await p.outgoingClearMessageId({ id: 'a' }, { messageId: 2 })
  await p.outgoingClearMessageId({ id: 'a' }, { messageId: 999 }) // nothing to clear
  await p.sessionDisconnected('b', 0)
  expect(await p.expireSessions(1, 2, () => false)).toContain('b')
}

describe('queue counters', () => {
  it('are kept in meta in the same batches as the queues, survive a reopen, and equal a scan', async () => {
    const dir = tempDir()
    let p = await open(dir)
    await exercise(p)
    expect(p.queuedMessages('a')).toBe(18)
    expect(p.queuedMessages('b')).toBe(0)
    expect(p.queuedMessages('ünï')).toBe(20)
    await expectCountersExact(p, ['a', 'b', 'ünï'])
    const before = { a: [p.queuedMessages('a'), p.queuedBytes('a')], ünï: [p.queuedMessages('ünï'), p.queuedBytes('ünï')] }
    await p.destroy()

    const raw = await rawCounters(dir)
    expect(raw.counters).toEqual(before) // 'b' emptied: its counter is deleted
    expect(raw.marker).toEqual(Buffer.from([1]))

    p = await open(dir)
    await expectCountersExact(p, ['a', 'b', 'ünï'])
    await p.destroy()
  })

  it('are read, not counted, at setup once the marker is there (start-up is O(queues))', async () => {
    const dir = tempDir()
    let p = await open(dir)
    await p.outgoingEnqueue({ clientId: 'a' }, publish('x'))
    await p.destroy()
    // A counter with no queue behind it: only a reader of counters would report it.
    await rawWrite(dir, (meta) => [{ type: 'put', sublevel: meta, key: key(COUNTERS_PREFIX, str('ghost')), value: key(u64(7), u64(70)) }])
    p = await open(dir)
    expect([p.queuedMessages('ghost'), p.queuedBytes('ghost')]).toEqual([7, 70])
    expect(p.totalQueued().messages).toBe(8)
    await p.destroy()
  })

  it('are built once by a scan for a store written before they existed (no marker), then kept', async () => {
    const dir = tempDir()
    let p = await open(dir)
    await exercise(p)
    const expected = await p.countQueuesByScan()
    await p.destroy()
    // The previous layout: same queues, no counters, no marker (plus one stray counter, which
    // the rebuild must remove: it trusts only the scan).
    const raw = await rawCounters(dir)
    await rawWrite(dir, (meta) => [
      { type: 'del', sublevel: meta, key: MARKER },
      ...Object.keys(raw.counters).map((id): StoreOp => ({ type: 'del', sublevel: meta, key: key(COUNTERS_PREFIX, str(id)) })),
      { type: 'put', sublevel: meta, key: key(COUNTERS_PREFIX, str('stray')), value: key(u64(1), u64(1)) }
    ])
    expect(await rawCounters(dir)).toEqual({ counters: { stray: [1, 1] }, marker: undefined })

    p = await open(dir)
    await expectCountersExact(p, ['a', 'b', 'ünï', 'stray'])
    expect(await p.countQueuesByScan()).toEqual(expected)
    await p.destroy()
    expect(await rawCounters(dir)).toEqual({ counters: raw.counters, marker: Buffer.from([1]) })

    p = await open(dir)
    await p.outgoingEnqueue({ clientId: 'a' }, publish('after the migration'))
    await expectCountersExact(p, ['a', 'b', 'ünï'])
    await p.destroy()
  })

  it('a new store writes its marker with the first batch, not at setup', async () => {
    const dir = tempDir()
    let p = await open(dir)
    await p.destroy()
    expect((await rawCounters(dir)).marker).toBeUndefined()
    p = await open(dir)
    await p.storeRetained({ cmd: 'publish', topic: 'r', payload: Buffer.from('1'), qos: 0, retain: true })
    await p.destroy()
    expect((await rawCounters(dir)).marker).toEqual(Buffer.from([1]))
  })

  it('a failed batch leaves the counters as they were, in memory and on disk', async () => {
    const dir = tempDir()
    const store = await openStore(dir, 'os')
    let fail = false
    const flaky: BatchTarget = { batch: (ops, options) => fail ? Promise.reject(new Error('disk full')) : store.db.batch(ops, options) }
    const writer = new GroupCommitWriter(flaky, 'os')
    const p = new LevelPersistence({ ...store, writer }, { maxQueuedMessages: 3, queueFullPolicy: 'drop-oldest' })
    await p.setup({ id: 'b' })
    for (let i = 0; i < 3; i++) await p.outgoingEnqueue({ clientId: 'a' }, publish(`m${i}`))
    const queued = await p.outgoingStream({ id: 'a' }).toArray() as PacketLike[]
    await p.outgoingUpdate({ id: 'a' }, { ...queued[0], messageId: 1 })
    const before = [p.queuedMessages('a'), p.queuedBytes('a')]
    fail = true
    await expect(p.outgoingEnqueue({ clientId: 'a' }, publish('drops the oldest unsent'))).rejects.toThrow('disk full')
    expect([p.queuedMessages('a'), p.queuedBytes('a')]).toEqual(before)
    writer.resume()
    await expect(p.outgoingClearMessageId({ id: 'a' }, { messageId: 1 })).rejects.toThrow('disk full')
    expect([p.queuedMessages('a'), p.queuedBytes('a')]).toEqual(before)
    writer.resume()
    fail = false
    // The entry the failed batch would have dropped is still there, and still droppable.
    await p.outgoingEnqueue({ clientId: 'a' }, publish('m3'))
    expect((await p.outgoingStream({ id: 'a' }).toArray() as PacketLike[]).map(x => String(x.payload))).toEqual(['m0', 'm2', 'm3'])
    await expectCountersExact(p, ['a'])
    await p.destroy()
  })

  it('totalQueued() sums every queue', async () => {
    const p = await open(tempDir())
    await p.outgoingEnqueueCombi([{ clientId: 'x' }, { clientId: 'y' }], publish('1'))
    await p.outgoingEnqueue({ clientId: 'x' }, publish('22'))
    expect(p.totalQueued()).toEqual({ messages: 3, bytes: p.queuedBytes('x') + p.queuedBytes('y') })
    await expectCountersExact(p, ['x', 'y'])
    await p.destroy()
  })
})

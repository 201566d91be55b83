import { afterAll, describe, expect, it } from 'vitest'
import { openStore } from '../../src/store/open.js'
import { LevelPersistence, type LevelPersistenceOptions, type PacketLike, type QueueFullEvent } from '../../src/store/persistence.js'
import { removeTempDirs, tempDir } from './helpers.js'

afterAll(removeTempDirs)

const publish = (n: number, payload: string | Buffer = `m${n}`): PacketLike => ({ cmd: 'publish', topic: 'q/t', payload: Buffer.from(payload), qos: 1, retain: false, dup: false, brokerId: 'b', brokerCounter: n })

/** A persistence on `dir` with the given limits; every onQueueFull event lands in `events`. */
async function open (dir: string, options: LevelPersistenceOptions = {}, events: QueueFullEvent[] = []): Promise<LevelPersistence> {
  const p = new LevelPersistence(await openStore(dir, 'os'), { ...options, onQueueFull: (_clientId, _limit, event) => events.push(event) })
  await p.setup({ id: 'b' })
  return p
}

const payloads = async (p: LevelPersistence, id: string): Promise<string[]> =>
  (await p.outgoingStream({ id }).toArray() as PacketLike[]).map(x => String(x.payload))

/** Counters kept by `p` equal a scan of the queues, and their sum is totalQueued(). */
async function expectCountersExact (p: LevelPersistence): Promise<void> {
  const scanned = await p.countQueuesByScan()
  let messages = 0
  let bytes = 0
  for (const [id, c] of scanned) {
    expect({ id, messages: p.queuedMessages(id), bytes: p.queuedBytes(id) }).toEqual({ id, ...c })
    messages += c.messages
    bytes += c.bytes
  }
  expect(p.totalQueued()).toEqual({ messages, bytes })
}

/** The stored size of one queued copy of `packet` (what maxQueuedBytes counts). */
async function storedSize (packet: PacketLike): Promise<number> {
  const p = await open(tempDir())
  await p.outgoingEnqueue({ clientId: 'probe' }, packet)
  const size = p.queuedBytes('probe')
  await p.destroy()
  return size
}

it('queue lengths are restored at setup, so the limit holds across a restart', async () => {
  const dir = tempDir()
  const full: string[] = []
  const reopen = async (): Promise<LevelPersistence> => {
    const p = new LevelPersistence(await openStore(dir, 'os'), { maxQueuedMessages: 4, onQueueFull: (clientId) => full.push(clientId) })
    await p.setup({ id: 'b' })
    return p
  }
  let p = await reopen()
  for (let i = 1; i <= 3; i++) await p.outgoingEnqueueCombi([{ clientId: 'a' }, { clientId: 'b' }], publish(i))
  expect([p.queuedMessages('a'), p.queuedMessages('b')]).toEqual([3, 3])
  await p.destroy()

  p = await reopen()
  expect([p.queuedMessages('a'), p.queuedMessages('b'), p.queuedMessages('c')]).toEqual([3, 3, 0])
  await p.outgoingEnqueueCombi([{ clientId: 'a' }], publish(4))
  await p.outgoingEnqueueCombi([{ clientId: 'a' }, { clientId: 'b' }], publish(5))
  expect(full).toEqual(['a'])
  expect([p.queuedMessages('a'), p.queuedMessages('b')]).toEqual([4, 4])
  await p.destroy()
})

describe('count limit', () => {
  it('drop-new keeps the first messages, in order, and reports each message it drops', async () => {
    const events: QueueFullEvent[] = []
    const p = await open(tempDir(), { maxQueuedMessages: 3 }, events)
    for (let i = 1; i <= 5; i++) await p.outgoingEnqueueCombi([{ clientId: 'a' }, { clientId: 'roomy' }], publish(i))
    expect(await payloads(p, 'a')).toEqual(['m1', 'm2', 'm3'])
    expect(await payloads(p, 'roomy')).toEqual(['m1', 'm2', 'm3'])
    expect(events).toEqual([
      { clientId: 'a', limit: 'messages', max: 3, policy: 'drop-new', which: 'new', dropped: 1 },
      { clientId: 'roomy', limit: 'messages', max: 3, policy: 'drop-new', which: 'new', dropped: 1 },
      { clientId: 'a', limit: 'messages', max: 3, policy: 'drop-new', which: 'new', dropped: 1 },
      { clientId: 'roomy', limit: 'messages', max: 3, policy: 'drop-new', which: 'new', dropped: 1 }
    ])
    await expectCountersExact(p)
    await p.destroy()
  })

  it('drop-oldest keeps the last messages, in order, within the limit, across a restart', async () => {
    const dir = tempDir()
    const events: QueueFullEvent[] = []
    let p = await open(dir, { maxQueuedMessages: 3, queueFullPolicy: 'drop-oldest' }, events)
    for (let i = 1; i <= 5; i++) await p.outgoingEnqueueCombi([{ clientId: 'a' }, { clientId: 'b' }], publish(i))
    expect(await payloads(p, 'a')).toEqual(['m3', 'm4', 'm5'])
    expect(await payloads(p, 'b')).toEqual(['m3', 'm4', 'm5'])
    expect(events.map(e => [e.clientId, e.which, e.dropped, e.limit, e.policy])).toEqual([
      ['a', 'oldest', 1, 'messages', 'drop-oldest'], ['b', 'oldest', 1, 'messages', 'drop-oldest'],
      ['a', 'oldest', 1, 'messages', 'drop-oldest'], ['b', 'oldest', 1, 'messages', 'drop-oldest']
    ])
    await expectCountersExact(p)
    await p.destroy()

    p = await open(dir, { maxQueuedMessages: 3, queueFullPolicy: 'drop-oldest' }, events)
    expect(p.queuedMessages('a')).toBe(3)
    await p.outgoingEnqueue({ clientId: 'a' }, publish(6))
    expect(await payloads(p, 'a')).toEqual(['m4', 'm5', 'm6'])
    await expectCountersExact(p)
    await p.destroy()
  })

  it('a lower limit after a restart: drop-oldest trims the queue down to it at the next message', async () => {
    const dir = tempDir()
    let p = await open(dir)
    for (let i = 1; i <= 6; i++) await p.outgoingEnqueue({ clientId: 'a' }, publish(i))
    await p.destroy()
    const events: QueueFullEvent[] = []
    p = await open(dir, { maxQueuedMessages: 2, queueFullPolicy: 'drop-oldest' }, events)
    await p.outgoingEnqueue({ clientId: 'a' }, publish(7))
    expect(await payloads(p, 'a')).toEqual(['m6', 'm7'])
    expect(events.map(e => e.dropped)).toEqual([5])
    await expectCountersExact(p)
    await p.destroy()
  })
})

describe('byte limit', () => {
  it('drop-new refuses a message that does not fit in the bytes left', async () => {
    const size = await storedSize(publish(1, 'x'.repeat(1000)))
    const events: QueueFullEvent[] = []
    const p = await open(tempDir(), { maxQueuedBytes: size * 3 + 10 }, events)
    for (let i = 1; i <= 5; i++) await p.outgoingEnqueue({ clientId: 'a' }, publish(i, 'x'.repeat(1000)))
    expect((await p.outgoingStream({ id: 'a' }).toArray() as PacketLike[]).map(x => x.brokerCounter)).toEqual([1, 2, 3])
    expect(p.queuedBytes('a')).toBe(size * 3)
    expect(events).toEqual([
      { clientId: 'a', limit: 'bytes', max: size * 3 + 10, policy: 'drop-new', which: 'new', dropped: 1 },
      { clientId: 'a', limit: 'bytes', max: size * 3 + 10, policy: 'drop-new', which: 'new', dropped: 1 }
    ])
    await expectCountersExact(p)
    await p.destroy()
  })

  it('drop-oldest drops as many of the oldest as it takes to fit the new message, and keeps order', async () => {
    const small = await storedSize(publish(1, 's'))
    const large = await storedSize(publish(1, 'L'.repeat(3000)))
    const limit = large + 4 * small
    const events: QueueFullEvent[] = []
    const p = await open(tempDir(), { maxQueuedBytes: limit, queueFullPolicy: 'drop-oldest' }, events)
    for (let i = 1; i <= 8; i++) await p.outgoingEnqueue({ clientId: 'a' }, publish(i, 's'))
    // 8 small ones fit (8 * small < limit); the large one needs room for itself.
    expect(p.queuedBytes('a')).toBe(8 * small)
    await p.outgoingEnqueue({ clientId: 'a' }, publish(9, 'L'.repeat(3000)))
    const kept = (await p.outgoingStream({ id: 'a' }).toArray() as PacketLike[]).map(x => x.brokerCounter)
    expect(kept).toEqual([5, 6, 7, 8, 9])
    expect(p.queuedBytes('a')).toBeLessThanOrEqual(limit)
    expect(events).toEqual([{ clientId: 'a', limit: 'bytes', max: limit, policy: 'drop-oldest', which: 'oldest', dropped: 4 }])
    await expectCountersExact(p)
    await p.destroy()
  })

  it('a message larger than the whole limit is dropped, even under drop-oldest, and nothing else goes', async () => {
    const events: QueueFullEvent[] = []
    const p = await open(tempDir(), { maxQueuedBytes: 2000, queueFullPolicy: 'drop-oldest' }, events)
    await p.outgoingEnqueue({ clientId: 'a' }, publish(1))
    await p.outgoingEnqueue({ clientId: 'a' }, publish(2, 'y'.repeat(5000)))
    expect(await payloads(p, 'a')).toEqual(['m1'])
    expect(events.map(e => [e.limit, e.which, e.dropped])).toEqual([['bytes', 'new', 1]])
    await p.destroy()
  })
})

describe('drop-oldest and messages in flight', () => {
  it('never drops an entry that was sent (has a messageId) or is a PUBREL; when only those are left, drops the new one', async () => {
    const events: QueueFullEvent[] = []
    const p = await open(tempDir(), { maxQueuedMessages: 4, queueFullPolicy: 'drop-oldest' }, events)
    const client = { id: 'a' }
    for (let i = 1; i <= 4; i++) await p.outgoingEnqueue({ clientId: 'a' }, publish(i))
    // m1 and m3 are sent; m3 (QoS 2) is PUBRECed: its entry becomes a PUBREL.
    await p.outgoingUpdate(client, { ...publish(1), messageId: 11 })
    await p.outgoingUpdate(client, { ...publish(3), messageId: 13 })
    await p.outgoingUpdate(client, { cmd: 'pubrel', messageId: 13 })
    await p.outgoingEnqueue({ clientId: 'a' }, publish(5))
    await p.outgoingEnqueue({ clientId: 'a' }, publish(6))
    const kept = (await p.outgoingStream(client).toArray() as PacketLike[]).map(x => x.cmd === 'pubrel' ? 'rel13' : String(x.payload))
    expect(kept).toEqual(['m1', 'rel13', 'm5', 'm6'])
    // Now send m5 and m6 too: everything queued is in flight, so new messages are dropped.
    await p.outgoingUpdate(client, { ...publish(5), messageId: 15 })
    await p.outgoingUpdate(client, { ...publish(6), messageId: 16 })
    await p.outgoingEnqueue({ clientId: 'a' }, publish(7))
    expect(await p.outgoingStream(client).toArray()).toHaveLength(4)
    expect(events.map(e => [e.which, e.dropped])).toEqual([['oldest', 1], ['oldest', 1], ['new', 1]])
    // The in-flight ones are still acknowledged normally.
    expect(String((await p.outgoingClearMessageId(client, { messageId: 11 }))?.payload)).toBe('m1')
    expect((await p.outgoingClearMessageId(client, { messageId: 13 }))?.cmd).toBe('pubrel')
    await expectCountersExact(p)
    await p.destroy()
  })

  it('the delivery of a message dropped meanwhile is not an error: outgoingUpdate resolves and stores nothing', async () => {
    for (const queueFullPolicy of ['drop-new', 'drop-oldest'] as const) {
      const p = await open(tempDir(), { maxQueuedMessages: 1, queueFullPolicy })
      await p.outgoingEnqueue({ clientId: 'a' }, publish(1))
      await p.outgoingEnqueue({ clientId: 'a' }, publish(2))
      const dropped = queueFullPolicy === 'drop-new' ? 2 : 1
      // aedes delivers to a connected client right after enqueueing, with the packet's identity.
      await p.outgoingUpdate({ id: 'a' }, { ...publish(dropped), messageId: 5 })
      expect(await p.outgoingStream({ id: 'a' }).toArray()).toHaveLength(1)
      expect(await p.outgoingClearMessageId({ id: 'a' }, { messageId: 5 })).toBeUndefined()
      // An identity that was never queued still is an error.
      await expect(p.outgoingUpdate({ id: 'a' }, { ...publish(99), messageId: 6 })).rejects.toThrow('no such packet')
      await expectCountersExact(p)
      await p.destroy()
    }
  })

  it('a delivery racing a drop: the entry is either delivered (and kept) or dropped (and the update is a no-op), never both', async () => {
    for (let round = 0; round < 30; round++) {
      const p = await open(tempDir('ferrymq-race-'), { maxQueuedMessages: 3, queueFullPolicy: 'drop-oldest' })
      for (let i = 1; i <= 3; i++) await p.outgoingEnqueue({ clientId: 'a' }, publish(i))
      const updates = [1, 2, 3].map(i => p.outgoingUpdate({ id: 'a' }, { ...publish(i), messageId: i }))
      const enqueues = [4, 5].map(i => p.outgoingEnqueue({ clientId: 'a' }, publish(i)))
      await Promise.all([...updates, ...enqueues])
      const queue = await p.outgoingStream({ id: 'a' }).toArray() as PacketLike[]
      expect(queue.length).toBeLessThanOrEqual(3)
      // Whatever was kept of m1..m3 carries its messageId (the update landed on a live entry).
      for (const entry of queue) if (Number(entry.brokerCounter) <= 3) expect(entry.messageId).toBe(entry.brokerCounter)
      // Acknowledging everything empties the queue of what was sent and keeps the counters exact.
      for (const id of [1, 2, 3]) await p.outgoingClearMessageId({ id: 'a' }, { messageId: id })
      const rest = (await p.outgoingStream({ id: 'a' }).toArray() as PacketLike[]).map(x => x.brokerCounter)
      expect(rest.every(n => Number(n) >= 4)).toBe(true)
      await expectCountersExact(p)
      await p.destroy()
    }
  })
})

describe('concurrency', () => {
  it('concurrent enqueues never overshoot either limit, under both policies', async () => {
    for (const queueFullPolicy of ['drop-new', 'drop-oldest'] as const) {
      const events: QueueFullEvent[] = []
      const p = await open(tempDir(), { maxQueuedMessages: 10, maxQueuedBytes: 65_536, queueFullPolicy }, events)
      await Promise.all(Array.from({ length: 200 }, (_, i) => p.outgoingEnqueueCombi([{ clientId: 'a' }, { clientId: 'b' }], publish(i + 1, 'z'.repeat(100)))))
      const expected = queueFullPolicy === 'drop-new'
        ? Array.from({ length: 10 }, (_, i) => i + 1)
        : Array.from({ length: 10 }, (_, i) => 191 + i)
      for (const id of ['a', 'b']) {
        expect((await p.outgoingStream({ id }).toArray() as PacketLike[]).map(x => x.brokerCounter)).toEqual(expected)
        expect(p.queuedMessages(id)).toBe(10)
        expect(p.queuedBytes(id)).toBeLessThanOrEqual(65_536)
      }
      expect(events.reduce((n, e) => n + e.dropped, 0)).toBe(2 * 190)
      await expectCountersExact(p)
      await p.destroy()
    }
  })

  it('concurrent enqueues with a small byte limit keep the newest under drop-oldest', async () => {
    const size = await storedSize(publish(1, 'w'.repeat(20_000)))
    const p = await open(tempDir(), { maxQueuedBytes: 65_536, queueFullPolicy: 'drop-oldest' })
    await Promise.all(Array.from({ length: 50 }, (_, i) => p.outgoingEnqueue({ clientId: 'a' }, publish(i + 1, 'w'.repeat(20_000)))))
    const fit = Math.floor(65_536 / size)
    expect((await p.outgoingStream({ id: 'a' }).toArray() as PacketLike[]).map(x => x.brokerCounter)).toEqual(Array.from({ length: fit }, (_, i) => 51 - fit + i))
    await expectCountersExact(p)
    await p.destroy()
  })
})

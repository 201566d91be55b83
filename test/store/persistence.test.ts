import { afterAll, describe, expect, it } from 'vitest'
import { readU64, splitFirst } from '../../src/store/keys.js'
import { META, openStore } from '../../src/store/open.js'
import { LevelPersistence, type PacketLike } from '../../src/store/persistence.js'
import { GroupCommitWriter, sublevelOf, type BatchTarget } from '../../src/store/writer.js'
import { removeTempDirs, tempDir } from './helpers.js'

afterAll(removeTempDirs)

/** Opens a LevelPersistence on `dir` and runs setup with a broker of the given id. */
async function open (dir: string, brokerId = 'broker-a'): Promise<LevelPersistence> {
  const p = new LevelPersistence(await openStore(dir, 'fsync'))
  await p.setup({ id: brokerId })
  return p
}

let counter = 0
function publish (topic: string, payload: string, extra: Partial<PacketLike> = {}): PacketLike {
  return { cmd: 'publish', topic, payload: Buffer.from(payload), qos: 1, retain: false, dup: false, brokerId: 'broker-a', brokerCounter: ++counter, ...extra }
}

const payloads = (list: unknown[]): string[] => list.map(p => String((p as PacketLike).payload))

describe('LevelPersistence: outgoing queues', () => {
  it('keeps queue order across close and reopen, with a new broker id and a restarted counter', async () => {
    const dir = tempDir()
    const client = { id: 'dev-1' }
    let p = await open(dir, 'first')
    for (const m of ['m1', 'm2', 'm3']) await p.outgoingEnqueueCombi([{ clientId: client.id }], publish('t', m, { brokerId: 'first', brokerCounter: 9 - Number(m[1]) }))
    await p.destroy()

    p = await open(dir, 'second')
    for (const m of ['m4', 'm5', 'm6']) await p.outgoingEnqueue({ clientId: client.id }, publish('t', m, { brokerId: 'second', brokerCounter: Number(m[1]) - 3 }))
    expect(payloads(await p.outgoingStream(client).toArray())).toEqual(['m1', 'm2', 'm3', 'm4', 'm5', 'm6'])
    await p.destroy()

    p = await open(dir, 'third')
    const queued = await p.outgoingStream(client).toArray() as PacketLike[]
    expect(payloads(queued)).toEqual(['m1', 'm2', 'm3', 'm4', 'm5', 'm6'])
    // Deliver the first two after the restart: identity lookup by the stored brokerId/counter.
    await p.outgoingUpdate(client, { ...queued[0], messageId: 0xff01 })
    await p.outgoingUpdate(client, { ...queued[1], messageId: 2 })
    const cleared = await p.outgoingClearMessageId(client, { messageId: 0xff01 })
    expect(String(cleared?.payload)).toBe('m1')
    expect(cleared?.messageId).toBe(0xff01)
    expect(await p.outgoingClearMessageId(client, { messageId: 0xff01 })).toBeUndefined()
    expect(payloads(await p.outgoingStream(client).toArray())).toEqual(['m2', 'm3', 'm4', 'm5', 'm6'])
    await p.destroy()
  })

  it('allocates sequences hi-lo: a reopen continues above the reservation stored in meta', async () => {
    const dir = tempDir()
    const seqs = async (): Promise<{ queue: number[], reserved: number }> => {
      const store = await openStore(dir, 'os')
      const queue = (await sublevelOf(store.db, 'o').keys().all()).map(k => readU64(splitFirst(k)[1]))
      const reserved = readU64((await sublevelOf(store.db, META).get(Buffer.from('seq'))) as Buffer)
      await store.close()
      return { queue, reserved }
    }
    let p = await open(dir)
    await p.outgoingEnqueueCombi([{ clientId: 'a' }, { clientId: 'b' }], publish('t', '1'))
    await p.destroy()
    const first = await seqs()
    expect(first.queue).toEqual([0, 1])
    expect(first.reserved).toBeGreaterThan(1)

    p = await open(dir)
    await p.outgoingEnqueue({ clientId: 'a' }, publish('t', '2'))
    await p.destroy()
    const second = await seqs()
    expect(second.queue).toEqual([0, first.reserved, 1])
    expect(second.reserved).toBeGreaterThan(first.reserved)
  })

  it('re-sends a sequence reservation whose batch failed, so no used number is ever above the stored one', async () => {
    const dir = tempDir()
    const store = await openStore(dir, 'os')
    let failNext = true
    const flaky: BatchTarget = {
      batch: (ops, options) => {
        if (failNext) { failNext = false; return Promise.reject(new Error('I/O error')) }
        return store.db.batch(ops, options)
      }
    }
    const writer = new GroupCommitWriter(flaky, 'os')
    const p = new LevelPersistence({ ...store, writer })
    await p.setup({ id: 'b' })
    await expect(p.outgoingEnqueue({ clientId: 'c' }, publish('t', 'lost'))).rejects.toThrow('I/O error')
    expect(p.queuedMessages('c')).toBe(0)
    // The writer refuses writes after a failed batch until the store has recovered.
    writer.resume()
    await p.outgoingEnqueue({ clientId: 'c' }, publish('t', 'kept'))
    await p.destroy()

    const reopened = await openStore(dir, 'os')
    const [entryKey] = await sublevelOf(reopened.db, 'o').keys().all()
    const reserved = readU64((await sublevelOf(reopened.db, META).get(Buffer.from('seq'))) as Buffer)
    expect(readU64(entryKey as Buffer)).toBeLessThan(reserved)
    await reopened.close()
  })

  it('keeps the call order of concurrent enqueues in each queue', async () => {
    const p = await open(tempDir())
    const subs = [{ clientId: 'x' }, { clientId: 'y' }]
    await Promise.all(Array.from({ length: 300 }, (_, i) => p.outgoingEnqueueCombi(subs, publish('t', String(i)))))
    const expected = Array.from({ length: 300 }, (_, i) => String(i))
    expect(payloads(await p.outgoingStream({ id: 'x' }).toArray())).toEqual(expected)
    expect(payloads(await p.outgoingStream({ id: 'y' }).toArray())).toEqual(expected)
    await p.destroy()
  })

  it('keeps MQTT 5 properties and messageExpiry of queued packets across a reopen', async () => {
    const dir = tempDir()
    let p = await open(dir)
    const properties = { userProperties: { k: 'v' }, correlationData: Buffer.from([1, 2, 3]), contentType: 'text/plain', subscriptionIdentifier: 5 }
    await p.outgoingEnqueueCombi([{ clientId: 'a' }, { clientId: 'b' }], publish('t/5', 'v5', { properties, messageExpiry: 1_800_000_000_000, length: 99 }))
    await p.destroy()
    p = await open(dir)
    for (const id of ['a', 'b']) {
      const [entry] = await p.outgoingStream({ id }).toArray() as PacketLike[]
      expect(entry?.properties).toEqual(properties)
      expect(entry?.messageExpiry).toBe(1_800_000_000_000)
      expect(entry).not.toHaveProperty('length')
    }
    await p.destroy()
  })

  it('replaces a delivered QoS 2 entry by its PUBREL and clears it on PUBCOMP', async () => {
    const dir = tempDir()
    let p = await open(dir)
    const client = { id: 'q2' }
    const packet = publish('t', 'x', { qos: 2 })
    await p.outgoingEnqueue({ clientId: client.id }, packet)
    await p.outgoingUpdate(client, { ...packet, messageId: 7 })
    await p.outgoingUpdate(client, { cmd: 'pubrel', messageId: 7 })
    await p.destroy()
    p = await open(dir)
    expect(await p.outgoingStream(client).toArray()).toEqual([{ cmd: 'pubrel', messageId: 7 }])
    await expect(p.outgoingUpdate(client, { cmd: 'pubrel', messageId: 8 })).rejects.toThrow('no such packet')
    expect(await p.outgoingClearMessageId(client, { messageId: 7 })).toEqual({ cmd: 'pubrel', messageId: 7 })
    expect(await p.outgoingStream(client).toArray()).toEqual([])
    await p.destroy()
  })

  it('streams a snapshot: entries cleared while streaming are still yielded once', async () => {
    const p = await open(tempDir())
    const client = { id: 'snap' }
    for (let i = 0; i < 40; i++) {
      const packet = publish('t', `m${i}`)
      await p.outgoingEnqueue({ clientId: client.id }, packet)
      await p.outgoingUpdate(client, { ...packet, messageId: i + 1 })
    }
    const seen: string[] = []
    for await (const entry of p.outgoingStream(client)) {
      seen.push(String((entry as PacketLike).payload))
      await p.outgoingClearMessageId(client, entry as PacketLike)
    }
    expect(seen).toEqual(Array.from({ length: 40 }, (_, i) => `m${i}`))
    expect(await p.outgoingStream(client).toArray()).toEqual([])
    await p.destroy()
  })
})

describe('LevelPersistence: retained', () => {
  const topics = ['a', 'a/b', 'a/b/c', 'ab', 'ab/c', 'b/x', '$SYS/broker/uptime', 'ünï/cödé']

  async function withRetained (fn: (p: LevelPersistence) => Promise<void>): Promise<void> {
    const p = await open(tempDir())
    for (const topic of topics) await p.storeRetained({ cmd: 'publish', topic, payload: Buffer.from(topic), qos: 0, retain: true })
    await fn(p)
    await p.destroy()
  }
  const lookup = async (p: LevelPersistence, ...patterns: string[]): Promise<string[]> =>
    (await p.createRetainedStreamCombi(patterns).toArray() as PacketLike[]).map(x => x.topic ?? '').sort()

  it('matches +, #, literal prefixes and exact topics', async () => {
    await withRetained(async (p) => {
      expect(await lookup(p, '#')).toEqual(['a', 'a/b', 'a/b/c', 'ab', 'ab/c', 'b/x', 'ünï/cödé'])
      expect(await lookup(p, '+')).toEqual(['a', 'ab'])
      expect(await lookup(p, 'a/#')).toEqual(['a', 'a/b', 'a/b/c'])
      expect(await lookup(p, 'a/+')).toEqual(['a/b'])
      expect(await lookup(p, '+/b')).toEqual(['a/b'])
      expect(await lookup(p, '+/+/c')).toEqual(['a/b/c'])
      expect(await lookup(p, 'ab')).toEqual(['ab'])
      expect(await lookup(p, 'nope', 'nope/#')).toEqual([])
      expect(await lookup(p, 'ünï/+')).toEqual(['ünï/cödé'])
    })
  })

  it('does not match $ topics with leading wildcards, but does with a literal $ prefix', async () => {
    await withRetained(async (p) => {
      expect(await lookup(p, '#')).not.toContain('$SYS/broker/uptime')
      expect(await lookup(p, '+/broker/#')).toEqual([])
      expect(await lookup(p, '$SYS/#')).toEqual(['$SYS/broker/uptime'])
    })
  })

  it('yields each retained message once when filters overlap, and survives a reopen', async () => {
    const dir = tempDir()
    let p = await open(dir)
    await p.storeRetained({ cmd: 'publish', topic: 'x/y', payload: Buffer.from('1'), qos: 1, retain: true })
    expect((await p.createRetainedStreamCombi(['x/#', 'x/+', 'x/y']).toArray()).length).toBe(1)
    await p.destroy()
    p = await open(dir)
    expect(await lookup(p, 'x/+')).toEqual(['x/y'])
    await p.storeRetained({ cmd: 'publish', topic: 'x/y', payload: Buffer.alloc(0), qos: 1, retain: true })
    expect(await lookup(p, '#')).toEqual([])
    await p.destroy()
  })
})

describe('LevelPersistence: subscriptions, incoming, wills across a reopen', () => {
  it('reloads subscriptions into the trie and the per-client mirror', async () => {
    const dir = tempDir()
    let p = await open(dir)
    await p.addSubscriptions({ id: 'c1' }, [
      { topic: 'a/+', qos: 1, rh: 0, rap: false, nl: false, subscriptionIdentifier: 9 },
      { topic: 'zero', qos: 0, rh: 0, rap: false, nl: false }
    ])
    await p.addSubscriptions({ id: 'c2' }, [{ topic: 'a/#', qos: 2, rh: 0, rap: true, nl: true }])
    await p.addSubscriptions({ id: 'c3' }, [{ topic: 'gone', qos: 1 }])
    await p.cleanSubscriptions({ id: 'c3' })
    await p.destroy()

    p = await open(dir)
    expect(await p.countOffline()).toEqual({ subsCount: 2, clientsCount: 2 })
    expect((await p.subscriptionsByTopic('a/b')).map(s => s.clientId).sort()).toEqual(['c1', 'c2'])
    expect(await p.subscriptionsByTopic('zero')).toEqual([])
    const c1 = await p.subscriptionsByClient({ id: 'c1' })
    expect(c1.find(s => s.topic === 'a/+')?.subscriptionIdentifier).toBe(9)
    expect(await p.subscriptionsByClient({ id: 'c3' })).toEqual([])
    await p.removeSubscriptions({ id: 'c2' }, ['a/#'])
    await p.destroy()

    p = await open(dir)
    expect(await p.countOffline()).toEqual({ subsCount: 1, clientsCount: 1 })
    await p.destroy()
  })

  it('keeps inbound QoS 2 packets and wills', async () => {
    const dir = tempDir()
    let p = await open(dir, 'old-broker')
    const q2 = publish('in', 'q2', { qos: 2, messageId: 0xfffe })
    const other = publish('in', 'other', { qos: 2, messageId: 0xfffe })
    await p.incomingStorePacket({ id: 'c' }, q2)
    await p.incomingStorePacket({ id: 'cc' }, other)
    // aedes' pipeline queues a copy that keeps the payload object: that marks the message queued.
    await p.outgoingEnqueueCombi([], { ...q2 })
    await p.outgoingEnqueueCombi([{ clientId: 'sub' }], { ...other })
    await p.incomingStorePacket({ id: 'c' }, publish('in', 'never queued', { qos: 2, messageId: 7 }))
    await p.putWill({ id: 'c' }, { topic: 'will/c', payload: Buffer.from('bye'), qos: 1, retain: false })
    expect(String((await p.incomingGetPacket({ id: 'c' }, { messageId: 7 })).payload)).toBe('never queued')
    await p.destroy()

    p = await open(dir, 'new-broker')
    // Stored by a process that died before queueing it: reported absent, so a re-send is published.
    await expect(p.incomingGetPacket({ id: 'c' }, { messageId: 7 })).rejects.toThrow('no such packet')
    expect(String((await p.incomingGetPacket({ id: 'c' }, { messageId: 0xfffe })).payload)).toBe('q2')
    await p.cleanIncoming({ id: 'c' })
    await expect(p.incomingGetPacket({ id: 'c' }, { messageId: 0xfffe })).rejects.toThrow('no such packet')
    expect(String((await p.incomingGetPacket({ id: 'cc' }, { messageId: 0xfffe })).payload)).toBe('other')
    const orphaned = await p.streamWill({ 'new-broker': Date.now() }).toArray() as PacketLike[]
    expect(orphaned.map(w => [w.clientId, w.brokerId, w.topic])).toEqual([['c', 'old-broker', 'will/c']])
    expect(await p.streamWill({ 'old-broker': Date.now() }).toArray()).toEqual([])
    expect((await p.delWill({ id: 'c' }))?.topic).toBe('will/c')
    expect(await p.getWill({ id: 'c' })).toBeUndefined()
    await p.destroy()
  })
})

describe('LevelPersistence: inbound QoS 2 entries left behind, and a failing store', () => {
  it('treats a PUBLISH with a stored id but another topic or payload as new (a stale entry), and a re-send as a duplicate', async () => {
    const p = await open(tempDir())
    const client = { id: 'pub-1' }
    await p.incomingStorePacket(client, publish('t/a', 'first', { qos: 2, messageId: 7 }))
    // The re-send: same id, topic and payload (DUP set) is the stored message.
    expect(String((await p.incomingGetPacket(client, publish('t/a', 'first', { qos: 2, messageId: 7, dup: true }))).payload)).toBe('first')
    // PUBREL carries only the id.
    expect(String((await p.incomingGetPacket(client, { messageId: 7 })).payload)).toBe('first')
    // The id reused for another message (its PUBREL was answered but the delete failed): new.
    await expect(p.incomingGetPacket(client, publish('t/a', 'second', { qos: 2, messageId: 7 }))).rejects.toThrow('no such packet')
    await expect(p.incomingGetPacket(client, publish('t/b', 'first', { qos: 2, messageId: 7 }))).rejects.toThrow('no such packet')
    await p.destroy()
  })

  it('an expired session leaves no inbound QoS 2 state behind, the queued marks included', async () => {
    const dir = tempDir()
    const store = await openStore(dir, 'fsync')
    const p = new LevelPersistence(store)
    await p.setup({ id: 'b' })
    const client = { id: 'gone-1' }
    await p.addSubscriptions(client, [{ topic: 'x/#', qos: 2 }])
    const packet = publish('x/1', 'm', { qos: 2, messageId: 3 })
    await p.incomingStorePacket(client, packet)
    await p.outgoingEnqueueCombi([{ clientId: client.id }], packet) // writes the `I` mark too
    expect((await sublevelOf(store.db, 'I').keys().all()).length).toBe(1)
    await p.sessionDisconnected(client.id, 1)
    expect(await p.expireSessions(2, 3, () => false)).toEqual([client.id])
    for (const name of ['i', 'I', 'o', 'q', 'O', 's']) expect(await sublevelOf(store.db, name).keys().all(), name).toEqual([])
    await p.destroy()
  })

  it('delWill resolves (undefined) rather than rejecting when the store cannot be read', async () => {
    const dir = tempDir()
    const store = await openStore(dir, 'fsync')
    const p = new LevelPersistence(store)
    await p.setup({ id: 'b' })
    await p.putWill({ id: 'w-1' }, publish('will/t', 'bye'))
    await store.db.close()
    await expect(p.delWill({ id: 'w-1' })).resolves.toBeUndefined()
    await store.close()
  })
})

describe('LevelPersistence: store ownership', () => {
  it('leaves a shared store open on destroy() with closeStoreOnDestroy: false', async () => {
    const store = await openStore(tempDir(), 'os')
    const p = new LevelPersistence(store, { closeStoreOnDestroy: false })
    await p.setup({ id: 'b' })
    await p.storeRetained({ cmd: 'publish', topic: 'k', payload: Buffer.from('v'), qos: 0, retain: true })
    await p.destroy()
    expect(store.db.status).toBe('open')
    await store.close()
    expect(store.db.status).toBe('closed')
  })
})

import type { Packet } from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { IncomingStore } from '../../src/bridge/incoming.js'
import { key, str, u16 } from '../../src/store/keys.js'
import { openStore, type Store } from '../../src/store/open.js'
import { sublevelOf } from '../../src/store/writer.js'
import { removeTempDirs, tempDir } from '../store/helpers.js'

afterAll(removeTempDirs)

function put (incoming: IncomingStore, packet: object): Promise<void> {
  return new Promise((resolve) => { incoming.put(packet as Packet, () => resolve()) })
}

function get (incoming: IncomingStore, messageId: number): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    incoming.get({ messageId }, (err, packet) => { if (err !== undefined) reject(err); else resolve(packet as unknown as Record<string, unknown>) })
  })
}

async function reopen (dir: string, store?: Store): Promise<{ store: Store, incoming: IncomingStore }> {
  await store?.close()
  const s = await openStore(dir, 'fsync')
  return { store: s, incoming: new IncomingStore(s, 'cloud', (err) => { throw err }) }
}

describe('bridge IncomingStore (inbound QoS 2 awaiting PUBREL)', () => {
  it('keeps a message\'s application properties and its expiry deadline across a reopen, not its topic alias or subscription identifier', async () => {
    const dir = tempDir()
    let { store, incoming } = await reopen(dir)
    const before = Date.now()
    await put(incoming, {
      cmd: 'publish',
      topic: 'site/cmd/x',
      payload: Buffer.from('hi'),
      qos: 2,
      retain: false,
      messageId: 7,
      properties: { topicAlias: 2, subscriptionIdentifier: 4, messageExpiryInterval: 60, contentType: 'text/plain', userProperties: { k: ['1', '2'] }, correlationData: Buffer.from([9]) },
    })
    await put(incoming, { cmd: 'publish', topic: 'site/cmd/y', payload: Buffer.from('plain'), qos: 2, retain: true, messageId: 8 })
    ;({ store, incoming } = await reopen(dir, store))
    const p = await get(incoming, 7)
    expect({ topic: p.topic, payload: p.payload, qos: p.qos, messageId: p.messageId, properties: p.properties })
      .toEqual({ topic: 'site/cmd/x', payload: Buffer.from('hi'), qos: 2, messageId: 7, properties: { contentType: 'text/plain', userProperties: { k: ['1', '2'] }, correlationData: Buffer.from([9]) } })
    expect(p.messageExpiry).toBeGreaterThanOrEqual(before + 60_000)
    expect(p.messageExpiry).toBeLessThanOrEqual(Date.now() + 60_000)
    const plain = await get(incoming, 8)
    expect(Object.keys(plain).sort()).toEqual(['cmd', 'dup', 'messageId', 'payload', 'qos', 'retain', 'topic'])
    await store.close()
  })

  it('an entry written before properties were kept (bytes as stored then) still decodes', async () => {
    const dir = tempDir()
    let { store, incoming } = await reopen(dir)
    // encode({ topic: 'site/cmd/x', payload: 'legacy', qos: 2, retain: false, messageId: 5 }) as IncomingStore wrote it.
    const old = Buffer.from('01de0005a5746f706963aa736974652f636d642f78a77061796c6f6164c4066c6567616379a3716f7302a672657461696ec2a96d657373616765496405', 'hex')
    await store.writer.write([{ type: 'put', sublevel: sublevelOf(store.db, 'n'), key: key(str('cloud'), u16(5)), value: old }])
    ;({ store, incoming } = await reopen(dir, store))
    expect(await get(incoming, 5)).toEqual({ cmd: 'publish', dup: false, topic: 'site/cmd/x', payload: Buffer.from('legacy'), qos: 2, retain: false, messageId: 5 })
    await store.close()
  })
})

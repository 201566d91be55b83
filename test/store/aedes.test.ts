import { once } from 'node:events'
import { createServer, type AddressInfo, type Server } from 'node:net'
import { Aedes } from 'aedes'
import mqtt, { connectAsync, type MqttClient } from 'mqtt'
import { afterAll, describe, expect, it } from 'vitest'
import { openStore } from '../../src/store/open.js'
import { LevelPersistence } from '../../src/store/persistence.js'
import { removeTempDirs, tempDir } from './helpers.js'

afterAll(removeTempDirs)

interface Running { aedes: Aedes, server: Server, persistence: LevelPersistence, url: string }

/** aedes 1.2.0 on a loopback port with a LevelPersistence on `dir`. */
async function start (dir: string): Promise<Running> {
  const persistence = new LevelPersistence(await openStore(dir, 'fsync'))
  const aedes = new Aedes({ persistence })
  await aedes.listen()
  const server = createServer((socket) => aedes.handle(socket))
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  return { aedes, server, persistence, url: `mqtt://127.0.0.1:${(server.address() as AddressInfo).port}` }
}

async function stop (r: Running): Promise<void> {
  await new Promise<void>(resolve => r.server.close(() => resolve()))
  await new Promise<void>(resolve => r.aedes.close(() => resolve()))
  await r.persistence.destroy() // aedes never destroys its persistence
}

async function until (check: () => Promise<boolean>, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error('condition not met in time')
    await new Promise(resolve => setTimeout(resolve, 10))
  }
}

describe('LevelPersistence under aedes 1.2.0', () => {
  it('delivers a persistent session\'s queue in order, and retained messages, after a broker restart', async () => {
    const dir = tempDir()
    let broker = await start(dir)
    const sub = await connectAsync(broker.url, { clientId: 'sub-1', clean: false, reconnectPeriod: 0 })
    await sub.subscribeAsync('t/#', { qos: 1 })
    await sub.endAsync()

    const pub = await connectAsync(broker.url, { clientId: 'pub-1', reconnectPeriod: 0 })
    for (let i = 1; i <= 5; i++) await pub.publishAsync('t/x', `m${i}`, { qos: 1 })
    await pub.publishAsync('r/1', 'kept', { qos: 1, retain: true })
    await pub.endAsync()
    // aedes acks QoS 1 before its pipeline stores the copies; wait for the queue to hold them.
    await until(async () => (await broker.persistence.outgoingStream({ id: 'sub-1' }).toArray()).length === 5)
    await stop(broker)

    broker = await start(dir)
    const received: string[] = []
    let again: MqttClient | undefined
    try {
      // Listening before CONNACK: the queued messages can arrive in the same read as the CONNACK.
      again = mqtt.connect(broker.url, { clientId: 'sub-1', clean: false, reconnectPeriod: 0 })
      again.on('message', (_topic, payload) => received.push(payload.toString()))
      await new Promise<void>((resolve, reject) => {
        again?.once('connect', () => resolve())
        again?.once('error', reject)
      })
      await until(async () => received.length >= 5)
      expect(received).toEqual(['m1', 'm2', 'm3', 'm4', 'm5'])
      // Acknowledged deliveries leave the queue.
      await until(async () => (await broker.persistence.outgoingStream({ id: 'sub-1' }).toArray()).length === 0)

      const fresh = await connectAsync(broker.url, { clientId: 'fresh', reconnectPeriod: 0 })
      const retained = new Promise<[string, Buffer]>(resolve => fresh.once('message', (t, p) => resolve([t, p])))
      await fresh.subscribeAsync('r/+', { qos: 1 })
      const [topic, payload] = await retained
      expect([topic, payload.toString()]).toEqual(['r/1', 'kept'])
      await fresh.endAsync()
    } finally {
      await again?.endAsync()
      await stop(broker)
    }
  })
})

import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, afterEach, expect, it } from 'vitest'
import { startBroker, type TestBroker } from '../helpers/broker.js'
import { collect, connackOf, connect, endAllClients, eventually } from '../helpers/clients.js'

const dirs: string[] = []
/** A data directory of the test's own: sessions of one test must not expire in another's count. */
function freshDir (): string {
  const d = mkdtempSync(join(tmpdir(), 'ferrymq-sessions-'))
  dirs.push(d)
  return d
}
let broker: TestBroker | undefined
afterEach(async () => {
  await endAllClients()
  await broker?.close()
})
afterAll(() => { for (const d of dirs) rmSync(d, { recursive: true, force: true }) })

async function metric (b: TestBroker, sample: string): Promise<number> {
  const text = await (await fetch(`${b.httpUrl}/metrics`)).text()
  const line = text.split('\n').find((l) => l.startsWith(`${sample} `))
  return line === undefined ? 0 : Number(line.slice(sample.length + 1))
}

it('a persistent session queues at most limits.maxQueuedMessages; the rest are dropped, counted, and the queue keeps its order', async () => {
  broker = await startBroker({ storage: { durability: 'os', dir: freshDir() }, limits: { maxQueuedMessages: 5 } })
  const first = await connect(broker.mqttUrl, { clientId: 'limited', clean: false })
  await first.subscribeAsync('limited/#', { qos: 1 })
  await first.endAsync()
  const pub = await connect(broker.mqttUrl, { clientId: 'limited-pub' })
  for (let i = 1; i <= 8; i++) await pub.publishAsync('limited/t', `m${i}`, { qos: 1 })
  expect(await metric(broker, 'ferrymq_messages_dropped_total{reason="queue_full"}')).toBe(3)

  const back = await connect(broker.mqttUrl, { clientId: 'limited', clean: false })
  expect((await collect(back, 5)).map((m) => m.payload)).toEqual(['m1', 'm2', 'm3', 'm4', 'm5'])
  // Drained, the queue takes messages again.
  await back.endAsync()
  await pub.publishAsync('limited/t', 'm9', { qos: 1 })
  const again = await connect(broker.mqttUrl, { clientId: 'limited', clean: false })
  expect((await collect(again, 1))[0]?.payload).toBe('m9')
})

it('a persistent session whose client stays away longer than limits.sessionExpirySeconds ends, with its queue', async () => {
  broker = await startBroker({ storage: { durability: 'os', dir: freshDir() }, limits: { sessionExpirySeconds: 1 } })
  const first = await connect(broker.mqttUrl, { clientId: 'expiring', clean: false })
  await first.subscribeAsync('expiring/#', { qos: 1 })
  await first.endAsync()
  const pub = await connect(broker.mqttUrl, { clientId: 'expiring-pub' })
  await pub.publishAsync('expiring/t', 'queued before expiry', { qos: 1 })

  const b = broker
  await eventually(async () => await metric(b, 'ferrymq_sessions_expired_total') === 1, 5000, 'the session to expire')
  const back = await connect(broker.mqttUrl, { clientId: 'expiring', clean: false })
  expect(connackOf(back).sessionPresent).toBe(false)
  // Nothing queued arrives: the first message this client sees is a marker published after it subscribed.
  const seen = collect(back, 1)
  await back.subscribeAsync('expiring/marker', { qos: 1 })
  await pub.publishAsync('expiring/marker', 'marker', { qos: 1 })
  expect((await seen)[0]?.payload).toBe('marker')
})

it('a persistent session whose client comes back in time is kept', async () => {
  broker = await startBroker({ storage: { durability: 'os', dir: freshDir() }, limits: { sessionExpirySeconds: 3600 } })
  const first = await connect(broker.mqttUrl, { clientId: 'staying', clean: false })
  await first.subscribeAsync('staying/#', { qos: 1 })
  await first.endAsync()
  const back = await connect(broker.mqttUrl, { clientId: 'staying', clean: false })
  expect(connackOf(back).sessionPresent).toBe(true)
})

import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, afterEach, expect, it } from 'vitest'
import { startBroker, type TestBroker } from '../helpers/broker.js'
import { collect, connect, endAllClients } from '../helpers/clients.js'

const dir = mkdtempSync(join(tmpdir(), 'ferrymq-queue-limit-'))
let broker: TestBroker | undefined
afterEach(async () => {
  await endAllClients()
  await broker?.close()
})
afterAll(() => rmSync(dir, { recursive: true, force: true }))

async function metric (b: TestBroker, sample: string): Promise<number> {
  const text = await (await fetch(`${b.httpUrl}/metrics`)).text()
  const line = text.split('\n').find((l) => l.startsWith(`${sample} `))
  return line === undefined ? 0 : Number(line.slice(sample.length + 1))
}

it('a persistent session queues at most limits.maxQueuedMessages; the rest are dropped, counted, and the queue keeps its order', async () => {
  broker = await startBroker({ storage: { durability: 'os', dir }, limits: { maxQueuedMessages: 5 } })
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

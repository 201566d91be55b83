import { afterEach, describe, expect, it } from 'vitest'
import { startBroker, type TestBroker } from '../helpers/broker.js'
import { collect, connect, endAllClients } from '../helpers/clients.js'
import { scrapeMetric } from '../helpers/metrics.js'

let broker: TestBroker | null = null
afterEach(async () => {
  await endAllClients()
  await broker?.close()
  broker = null
})

describe('limits.maxPublishRate', () => {
  it('slows a client past the rate (a one-second burst passes), drops nothing, keeps order, counts it, and leaves other clients alone', async () => {
    const rate = 100
    broker = await startBroker({ limits: { maxPublishRate: rate } })
    const b = broker
    const sub = await connect(b.mqttUrl, { clientId: 'rate-sub' })
    await sub.subscribeAsync('rate/#', { qos: 1 })
    const n = 300
    const got = collect(sub, n + 1, 20_000)

    const fast = await connect(b.mqttUrl, { clientId: 'rate-fast' })
    const started = performance.now()
    let next = 0
    let fastDone = 0
    const flood = Promise.all(Array.from({ length: 50 }, async () => {
      while (next < n) {
        const i = next++
        await fast.publishAsync('rate/fast', String(i), { qos: 1 })
      }
    })).then(() => { fastDone = performance.now() })

    // Another client, at its own pace, is not held back by the first one's limit.
    const calm = await connect(b.mqttUrl, { clientId: 'rate-calm' })
    await calm.publishAsync('rate/calm', 'calm', { qos: 1 })
    const calmDone = performance.now()
    await flood

    // 100 pass at once (the burst), the other 200 at 100/s: at least 2 s in all.
    expect(fastDone - started).toBeGreaterThanOrEqual(1900)
    expect(calmDone).toBeLessThan(fastDone)
    const messages = await got
    expect(messages.filter((m) => m.topic === 'rate/fast').map((m) => Number(m.payload))).toEqual(Array.from({ length: n }, (_v, i) => i))
    expect(await scrapeMetric(b.httpUrl, 'ferrymq_publish_throttled_total')).toBeGreaterThanOrEqual(n - rate - 10)
  }, 30_000)
})

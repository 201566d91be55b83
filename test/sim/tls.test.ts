import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { runSimulation } from '../../firmware-sim/src/run.js'
import { startBroker, type TestBroker } from '../helpers/broker.js'
import { generateCerts, type TestCerts } from '../helpers/certs.js'

let certs: TestCerts
let broker: TestBroker
beforeAll(async () => {
  certs = generateCerts()
  broker = await startBroker({ tls: { cert: certs.serverCert, key: certs.serverKey, requireClientCert: false } })
})
afterAll(async () => {
  await broker?.close()
  certs?.remove()
})

describe('fleet over TLS', () => {
  it.each(['mqtts', 'wss'] as const)('%s: devices and verifier trust the CA, no loss', async (scheme) => {
    const url = scheme === 'mqtts' ? broker.mqttsUrl : broker.wssUrl
    if (url === undefined) throw new Error(`no ${scheme} listener`)
    const s = await runSimulation({
      devices: 10, url, protocol: 5, idPrefix: `${scheme}-`, profileMix: { sensor: 1 }, qosMix: [0, 1, 1], rate: 10, chattyFactor: 10,
      jitter: 0.2, sleepyBurst: 1, sleepSeconds: 1, payloadSize: 0, bufferSize: 100, backoff: { baseMs: 100, maxMs: 1000 },
      keepaliveSeconds: 30, sessionExpirySeconds: 60, connectTimeoutMs: 5000, rampPerSecond: 100, messages: 200,
      tls: { ca: certs.read(certs.caCert) }, verify: { url, topic: 'devices/+/telemetry', qos: 1 }, graceMs: 10_000,
    })
    expect(s.totals.produced).toBe(200)
    expect(s.totals.acked).toBe(200)
    expect(s.totals.received).toBe(200)
    expect(s.ok).toBe(true)
  })
})

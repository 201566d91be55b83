import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { TestBroker } from '../helpers/broker.js'
import { generateCerts, type TestCerts } from '../helpers/certs.js'
import { connect, endAllClients, eventually } from '../helpers/clients.js'
import { hasMosquitto, startMosquitto, type Mosquitto } from '../helpers/mosquitto.js'
import { removeTempDirs } from '../store/helpers.js'
import { deadPort, FAST, logsMatching, metric, metricUntil, SeqTracker, startEdge } from './fixture.js'

/*
 * TLS uplinks to a real Mosquitto that requires client certificates (mTLS), over MQTTS and over
 * WebSocket+TLS, plus the refusals: no client certificate, and a CA that did not sign the server's
 * certificate. One edge carries all four bridges; each maps telemetry/# under its own remote prefix.
 */

let certs: TestCerts
let up: Mosquitto | null = null
let edge: TestBroker | null = null
const logs: Array<Record<string, unknown>> = []

beforeAll(async () => {
  if (!hasMosquitto()) return
  certs = generateCerts()
  const wssPort = await deadPort()
  up = await startMosquitto({
    tls: { ca: certs.caCert, cert: certs.serverCert, key: certs.serverKey, requireCertificate: true },
    extra: [`listener ${wssPort} 127.0.0.1`, 'protocol websockets', `cafile ${certs.caCert}`, `certfile ${certs.serverCert}`,
      `keyfile ${certs.serverKey}`, 'require_certificate true'],
  })
  const mtls = { ca: certs.caCert, cert: certs.clientCert, key: certs.clientKey }
  const bridge = (name: string, url: string, tls: Record<string, string>): Record<string, unknown> => ({
    name, url, tls, ...FAST, topics: [{ pattern: 'telemetry/#', direction: 'out', qos: 1, remotePrefix: `${name}/` }],
  })
  edge = await startEdge([
    bridge('mtls', up.url, mtls),
    bridge('wss', `wss://127.0.0.1:${wssPort}/mqtt`, mtls),
    bridge('nocert', up.url, { ca: certs.caCert }),
    bridge('badca', up.url, { ...mtls, ca: certs.otherCaCert }),
  ], { logs })
})
afterAll(async () => {
  await endAllClients()
  await edge?.close()
  await up?.close()
  certs?.remove()
  removeTempDirs()
})

describe.skipIf(!hasMosquitto())('bridge TLS uplink (needs the mosquitto binary)', () => {
  it('mTLS over mqtts:// and wss:// carries messages; without a client certificate or with a wrong CA the bridge never connects', async () => {
    const e = edge as TestBroker
    const cloud = await connect((up as Mosquitto).url, { ca: certs.read(certs.caCert), cert: certs.read(certs.clientCert), key: certs.read(certs.clientKey) })
    await cloud.subscribeAsync('#', { qos: 1 })
    const mtls = new SeqTracker(cloud, (t) => t === 'mtls/telemetry/dev1', 'mtls')
    const wss = new SeqTracker(cloud, (t) => t === 'wss/telemetry/dev1', 'wss')
    const refused = new SeqTracker(cloud, (t) => t.startsWith('nocert/') || t.startsWith('badca/'))
    await metricUntil(e, 'ferrymq_bridge_connected', { bridge: 'mtls' }, (v) => v === 1)
    await metricUntil(e, 'ferrymq_bridge_connected', { bridge: 'wss' }, (v) => v === 1)

    const local = await connect(e.mqttUrl)
    for (let i = 0; i < 10; i++) await local.publishAsync('telemetry/dev1', String(i), { qos: 1 })
    try {
      await mtls.all(0, 10, 10_000)
      await wss.all(0, 10, 10_000)
    } catch (err) {
      const figures: Record<string, unknown> = {}
      for (const b of ['mtls', 'wss']) {
        for (const m of ['ferrymq_bridge_connected', 'ferrymq_bridge_outbox_messages', 'ferrymq_bridge_reconnects_total']) figures[`${b} ${m}`] = await metric(e, m, { bridge: b })
        figures[`${b} out`] = await metric(e, 'ferrymq_bridge_forwarded_total', { bridge: b, direction: 'out' })
      }
      console.log('DIAG', JSON.stringify(figures), JSON.stringify(logs.filter((l) => l.bridge === 'mtls' || l.bridge === 'wss')),
        (up as Mosquitto).log().split('\n').filter((l) => !l.includes('OpenSSL')).slice(-30).join('\n'))
      throw err
    }
    expect(mtls.firsts).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    expect(wss.firsts).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])

    for (const name of ['nocert', 'badca']) {
      // It keeps trying (back-off) and says why it cannot connect; it is never up.
      await eventually(() => logsMatching(logs, name, 'bridge could not connect').length > 0, 10_000, `"bridge could not connect" logged for ${name}`)
      await metricUntil(e, 'ferrymq_bridge_reconnects_total', { bridge: name }, (v) => v >= 2)
      expect(await metric(e, 'ferrymq_bridge_connected', { bridge: name })).toBe(0)
      expect(await metric(e, 'ferrymq_bridge_outbox_messages', { bridge: name })).toBe(10)
      expect(logsMatching(logs, name, 'bridge connected')).toEqual([])
    }
    const badca = logsMatching(logs, 'badca', 'bridge could not connect')[0] as Record<string, unknown>
    expect(String(badca.err)).toMatch(/certificate|self.signed|verify/i)
    expect(refused.arrivals).toEqual([])
  }, 30_000)
})

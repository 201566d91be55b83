import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { generateCerts, type TestCerts } from '../helpers/certs.js'
import { collect, connackOf, connect, endAllClients, withTimeout } from '../helpers/clients.js'
import { hasMosquitto, startMosquitto, type Mosquitto, type MosquittoOptions } from '../helpers/mosquitto.js'

const fixtures: Mosquitto[] = []
async function mosquitto (options?: MosquittoOptions): Promise<Mosquitto> {
  const m = await startMosquitto(options)
  fixtures.push(m)
  return m
}

afterEach(async () => {
  await endAllClients()
  await Promise.all(fixtures.splice(0).map((m) => m.close()))
})

describe.skipIf(!hasMosquitto())('Mosquitto test fixture (skipped: mosquitto binary not installed)', () => {
  it('starts on a free 127.0.0.1 port and does a QoS 1 publish/subscribe round trip', async () => {
    const m = await mosquitto()
    expect(m.url).toBe(`mqtt://127.0.0.1:${m.port}`)
    expect(m.wsUrl).toBeUndefined()
    expect(m.pid).toBeGreaterThan(0)
    const sub = await connect(m.url)
    await sub.subscribeAsync('fixture/q1', { qos: 1 })
    const pub = await connect(m.url)
    const got = collect(sub, 1)
    await pub.publishAsync('fixture/q1', 'hello mosquitto', { qos: 1 }) // resolves on PUBACK
    expect(await got).toEqual([{ topic: 'fixture/q1', payload: 'hello mosquitto', qos: 1, retain: false, dup: false }])
  })

  it('persistence: a clean:false QoS 1 session and its queued messages survive stop()/restart()', async () => {
    const m = await mosquitto({ persistence: true })
    const session = { clientId: 'fixture-persistent-sub', clean: false }
    const first = await connect(m.url, session)
    expect(connackOf(first).sessionPresent).toBe(false)
    await first.subscribeAsync('fixture/persist', { qos: 1 })
    await first.endAsync()

    const pub = await connect(m.url)
    await pub.publishAsync('fixture/persist', 'queued before restart', { qos: 1 })
    await pub.endAsync()

    const pidBefore = m.pid
    const port = m.port
    await m.stop()
    await m.restart()
    expect(m.port).toBe(port)
    expect(m.pid).not.toBe(pidBefore)

    const pub2 = await connect(m.url)
    await pub2.publishAsync('fixture/persist', 'published while away', { qos: 1 })

    const again = await connect(m.url, session)
    expect(connackOf(again).sessionPresent).toBe(true)
    const got = await collect(again, 2)
    expect(got.map((r) => [r.payload, r.qos])).toEqual([['queued before restart', 1], ['published while away', 1]])
  })

  it('kill() then restart() brings it back on the same port', async () => {
    const m = await mosquitto()
    const pidBefore = m.pid
    await m.kill()
    await expect(connect(m.url, {}, 1000)).rejects.toThrow()
    await m.restart()
    expect(m.pid).not.toBe(pidBefore)
    const c = await connect(m.url)
    expect(c.connected).toBe(true)
  })

  describe('TLS with requireCertificate (mTLS)', () => {
    let certs: TestCerts
    beforeAll(() => { certs = generateCerts() })
    afterAll(() => { certs?.remove() })

    it('accepts a client with a CA-signed certificate and refuses one without', async () => {
      const m = await mosquitto({ tls: { cert: certs.serverCert, key: certs.serverKey, ca: certs.caCert, requireCertificate: true } })
      expect(m.url).toBe(`mqtts://127.0.0.1:${m.port}`)
      const ca = certs.read(certs.caCert)

      const withCert = await connect(m.url, { ca, cert: certs.read(certs.clientCert), key: certs.read(certs.clientKey) })
      await withCert.subscribeAsync('fixture/tls', { qos: 1 })
      const got = collect(withCert, 1)
      await withCert.publishAsync('fixture/tls', 'mutual tls', { qos: 1 })
      expect((await got)[0]?.payload).toBe('mutual tls')

      // Without a client certificate the server aborts the handshake: an error or a close before CONNACK.
      await expect(connect(m.url, { ca }, 3000)).rejects.toThrow()
    })
  })

  it('websockets: MQTT.js connects to wsUrl and exchanges messages with a TCP client', async () => {
    const m = await mosquitto({ websockets: true })
    expect(m.wsPort).toBeDefined()
    expect(m.wsPort).not.toBe(m.port)
    expect(m.wsUrl).toBe(`ws://127.0.0.1:${m.wsPort}`)
    const ws = await connect(m.wsUrl as string)
    await ws.subscribeAsync('fixture/ws', { qos: 1 })
    const tcp = await connect(m.url)
    const got = collect(ws, 1)
    await withTimeout(tcp.publishAsync('fixture/ws', 'tcp to ws', { qos: 1 }), 5000, 'PUBACK')
    expect((await got)[0]).toEqual({ topic: 'fixture/ws', payload: 'tcp to ws', qos: 1, retain: false, dup: false })
  })
})

import { connect as netConnect, type Socket } from 'node:net'
import type { TLSSocket } from 'node:tls'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { ConfigError } from '../../src/config/load.js'
import { loadTlsMaterial } from '../../src/transport/tls-material.js'
import { startBroker, type TestBroker } from '../helpers/broker.js'
import { generateCerts, type TestCerts } from '../helpers/certs.js'
import { collect, connect, endAllClients, withTimeout } from '../helpers/clients.js'
import { RawClient } from '../helpers/raw.js'

let certs: TestCerts
/** Server authentication only: tls.cert + tls.key. */
let b: TestBroker

beforeAll(async () => {
  certs = generateCerts()
  b = await startBroker({ tls: { cert: certs.serverCert, key: certs.serverKey, requireClientCert: false } })
})
afterAll(async () => {
  await b?.close()
  certs?.remove()
})
afterEach(async () => { await endAllClients() })

const trusting = (): { ca: Buffer } => ({ ca: certs.read(certs.caCert) })
const withClientCert = (): { ca: Buffer, cert: Buffer, key: Buffer } =>
  ({ ca: certs.read(certs.caCert), cert: certs.read(certs.clientCert), key: certs.read(certs.clientKey) })

async function connectionsTotal (broker: TestBroker, listener: string): Promise<number> {
  const metric = await broker.broker.metrics.connectionsTotal.get()
  return metric.values.find((v) => v.labels.listener === listener)?.value ?? 0
}

/** Opens a plain TCP socket to `port` and resolves once it is connected. */
async function plainSocket (port: number): Promise<Socket> {
  const socket = netConnect({ host: '127.0.0.1', port })
  socket.on('error', () => {})
  await withTimeout(new Promise((resolve) => socket.once('connect', resolve)), 5000, `TCP connect to ${port}`)
  return socket
}

describe('server authentication (tls.cert + tls.key)', () => {
  it('MQTTS: a client that trusts the CA gets the server certificate and QoS 1 publish/subscribe works', async () => {
    const sub = await connect(b.mqttsUrl as string, trusting())
    const stream = sub.stream as unknown as TLSSocket
    expect(stream.encrypted).toBe(true)
    expect(stream.authorized).toBe(true)
    expect(stream.getPeerCertificate().subject.CN).toBe('localhost')
    await sub.subscribeAsync('tls/q1', { qos: 1 })
    const pub = await connect(b.mqttsUrl as string, trusting())
    const got = collect(sub, 1)
    await pub.publishAsync('tls/q1', 'over tls', { qos: 1 }) // resolves on PUBACK
    expect(await got).toEqual([{ topic: 'tls/q1', payload: 'over tls', qos: 1, retain: false, dup: false }])
  })

  it('WSS: a client that trusts the CA connects at /mqtt and exchanges messages with an MQTTS client', async () => {
    expect(b.wssUrl).toMatch(/^wss:\/\/127\.0\.0\.1:\d+\/mqtt$/)
    const wss = await connect(b.wssUrl as string, trusting())
    const mqtts = await connect(b.mqttsUrl as string, trusting())
    await wss.subscribeAsync('tls/from-mqtts', { qos: 1 })
    await mqtts.subscribeAsync('tls/from-wss', { qos: 1 })
    const atWss = collect(wss, 1)
    const atMqtts = collect(mqtts, 1)
    await mqtts.publishAsync('tls/from-mqtts', 'to wss', { qos: 1 })
    await wss.publishAsync('tls/from-wss', 'to mqtts', { qos: 1 })
    expect(await atWss).toEqual([{ topic: 'tls/from-mqtts', payload: 'to wss', qos: 1, retain: false, dup: false }])
    expect(await atMqtts).toEqual([{ topic: 'tls/from-wss', payload: 'to mqtts', qos: 1, retain: false, dup: false }])
    expect(await connectionsTotal(b, 'wss')).toBeGreaterThanOrEqual(1)
  })

  it('a client that does not trust the CA is refused with a TLS verification error, over MQTTS and WSS', async () => {
    const untrusted = /self[- ]signed certificate|unable to (get local issuer|verify)/i
    await expect(connect(b.mqttsUrl as string)).rejects.toThrow(untrusted)
    await expect(connect(b.wssUrl as string)).rejects.toThrow(untrusted)
    // ...and one that trusts a different CA is refused too.
    await expect(connect(b.mqttsUrl as string, { ca: certs.read(certs.otherCaCert) })).rejects.toThrow(untrusted)
    // The broker keeps serving.
    const ok = await connect(b.mqttsUrl as string, trusting())
    expect(ok.connected).toBe(true)
  })

  it('a plain-TCP MQTT client on the MQTTS port is dropped without an answer, and the broker keeps serving', async () => {
    const before = await connectionsTotal(b, 'mqtts')
    const raw = await RawClient.open(b.port('mqtts'))
    raw.sendConnect({ clientId: 'plain-on-tls' })
    await raw.waitClosed()
    expect(raw.packets).toEqual([])
    // It never reached the MQTT layer.
    expect(await connectionsTotal(b, 'mqtts')).toBe(before)
    // A plain WebSocket client on the WSS port fails as well.
    await expect(connect(`ws://127.0.0.1:${b.port('wss')}/mqtt`)).rejects.toThrow()

    const sub = await connect(b.mqttsUrl as string, trusting())
    await sub.subscribeAsync('tls/after-garbage', { qos: 1 })
    const got = collect(sub, 1)
    const plain = await connect(b.mqttUrl)
    await plain.publishAsync('tls/after-garbage', 'still here', { qos: 1 })
    expect((await got)[0]?.payload).toBe('still here')
  })

  it('close() does not wait for sockets that connected to MQTTS/WSS and never finished a TLS handshake', async () => {
    const other = await startBroker({ tls: { cert: certs.serverCert, key: certs.serverKey, requireClientCert: false } })
    const sockets = [await plainSocket(other.port('mqtts')), await plainSocket(other.port('wss'))]
    const closed = Promise.all(sockets.map((s) => new Promise((resolve) => s.once('close', resolve))))
    try {
      // The TLS handshake timeout is 120 s; closing must not wait for it.
      await withTimeout(other.close(), 5000, 'broker close with sockets in TLS handshake')
      await withTimeout(closed, 5000, 'the broker to drop the silent sockets')
    } finally {
      for (const s of sockets) s.destroy()
    }
  })
})

describe('client authentication (requireClientCert: true + ca)', () => {
  let m: TestBroker
  beforeAll(async () => {
    m = await startBroker({ tls: { cert: certs.serverCert, key: certs.serverKey, ca: certs.caCert, requireClientCert: true } })
  })
  afterAll(async () => { await m?.close() })

  it('a client without a certificate is refused over MQTTS (TLS 1.3 and 1.2) and WSS', async () => {
    await expect(connect(m.mqttsUrl as string, trusting())).rejects.toMatchObject({ code: 'ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED' })
    await expect(connect(m.mqttsUrl as string, { ...trusting(), maxVersion: 'TLSv1.2' } as object)).rejects.toThrow(/alert|handshake/i)
    await expect(connect(m.wssUrl as string, trusting())).rejects.toThrow()
    expect(await connectionsTotal(m, 'mqtts')).toBe(0)
    expect(await connectionsTotal(m, 'wss')).toBe(0)
  })

  it('a client certificate signed by another CA is refused before MQTT starts', async () => {
    const foreign = { ...trusting(), cert: certs.read(certs.otherClientCert), key: certs.read(certs.otherClientKey) }
    const before = await connectionsTotal(m, 'mqtts')
    // Node ends the connection after its own verification of the client chain fails, without a TLS alert.
    await expect(connect(m.mqttsUrl as string, foreign)).rejects.toThrow(/connection closed before CONNACK|unknown ca|ECONNRESET/i)
    expect(await connectionsTotal(m, 'mqtts')).toBe(before)
  })

  it('a client with the CA-signed certificate is served over MQTTS and WSS', async () => {
    const sub = await connect(m.mqttsUrl as string, withClientCert())
    await sub.subscribeAsync('mtls/t', { qos: 1 })
    const got = collect(sub, 2)
    const pub = await connect(m.wssUrl as string, withClientCert())
    await pub.publishAsync('mtls/t', 'one', { qos: 1 })
    await sub.publishAsync('mtls/t', 'two', { qos: 1 })
    expect((await got).map((msg) => [msg.payload, msg.qos])).toEqual([['one', 1], ['two', 1]])
  })
})

describe('without tls', () => {
  it('the MQTTS and WSS listeners are off', async () => {
    const plain = await startBroker()
    try {
      expect(plain.broker.address('mqtts')).toBeUndefined()
      expect(plain.broker.address('wss')).toBeUndefined()
      expect(plain.mqttsUrl).toBeUndefined()
      expect(plain.wssUrl).toBeUndefined()
      expect(plain.broker.address('mqtt')).toBeDefined()
      expect(plain.broker.address('ws')).toBeDefined()
    } finally {
      await plain.close()
    }
  })
})

describe('TLS material errors are ConfigErrors that name the setting', () => {
  const catchError = (fn: () => unknown): Error => {
    try {
      fn()
    } catch (err) {
      return err as Error
    }
    throw new Error('expected an error')
  }

  it('a certificate and key that do not belong together name tls.cert and tls.key', () => {
    const err = catchError(() => loadTlsMaterial({ cert: certs.serverCert, key: certs.clientKey, requireClientCert: false }))
    expect(err).toBeInstanceOf(ConfigError)
    expect(err.message).toMatch(/^tls\.cert, tls\.key: /)
    expect(err.message).toContain(certs.serverCert)
    expect(err.message).toContain(certs.clientKey)
    expect(err.message).toMatch(/key values mismatch/)
  })

  it('a missing file names the setting, the path and the reason', () => {
    const missing = join(certs.dir, 'missing.pem')
    const cert = catchError(() => loadTlsMaterial({ cert: missing, key: certs.serverKey, requireClientCert: false }))
    expect(cert).toBeInstanceOf(ConfigError)
    expect(cert.message).toBe(`tls.cert: cannot read ${missing} (ENOENT)`)
    const key = catchError(() => loadTlsMaterial({ cert: certs.serverCert, key: missing, requireClientCert: false }))
    expect(key).toBeInstanceOf(ConfigError)
    expect(key.message).toBe(`tls.key: cannot read ${missing} (ENOENT)`)
    const ca = catchError(() => loadTlsMaterial({ cert: certs.serverCert, key: certs.serverKey, ca: missing, requireClientCert: true }))
    expect(ca).toBeInstanceOf(ConfigError)
    expect(ca.message).toBe(`tls.ca: cannot read ${missing} (ENOENT)`)
  })

  it('a file that is not PEM names the setting', () => {
    const junk = join(certs.dir, 'junk.pem')
    writeFileSync(junk, 'not a certificate\n')
    const cert = catchError(() => loadTlsMaterial({ cert: junk, key: certs.serverKey, requireClientCert: false }))
    expect(cert).toBeInstanceOf(ConfigError)
    expect(cert.message).toMatch(/^tls\.cert, tls\.key: /)
    const ca = catchError(() => loadTlsMaterial({ cert: certs.serverCert, key: certs.serverKey, ca: junk, requireClientCert: true }))
    expect(ca).toBeInstanceOf(ConfigError)
    expect(ca.message).toMatch(new RegExp(`^tls\\.ca: ${junk.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} is not a usable PEM CA certificate`))
  })

  it('a broker started with a mismatched pair fails to start with that ConfigError', async () => {
    const start = startBroker({ tls: { cert: certs.serverCert, key: certs.clientKey, requireClientCert: false } })
    await expect(start).rejects.toBeInstanceOf(ConfigError)
    await expect(start).rejects.toThrow(/tls\.cert, tls\.key: .*key values mismatch/)
  })
})

import { readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { connect as netConnect, type Socket } from 'node:net'
import { dirname } from 'node:path'
import type { ErrorWithSubackPacket, MqttClient } from 'mqtt'
import mqttPacket from 'mqtt-packet'
import { WebSocket } from 'ws'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { startBroker, type TestBroker } from '../helpers/broker.js'
import { collect, connect, endAllClients, eventually, withTimeout } from '../helpers/clients.js'
import { RawClient } from '../helpers/raw.js'
import { scrapeMetric } from '../helpers/metrics.js'

/*
 * Bad input gets a clear answer (a CONNACK code, or the connection closed), the broker stays up,
 * and the other clients keep working. Each test would fail without the handling it names.
 */

let b: TestBroker
beforeAll(async () => { b = await startBroker() })
afterAll(async () => { await b?.close() })
afterEach(async () => { await endAllClients() })

let unique = 0
/** A name no other test uses (client ids, topics). */
function fresh (prefix: string): string {
  return `${prefix}-${++unique}`
}

// ---------------------------------------------------------------------------------------------
// Bytes by hand, for what mqtt-packet refuses to encode.

function u16 (n: number): Buffer {
  const out = Buffer.alloc(2)
  out.writeUInt16BE(n)
  return out
}

/** An MQTT string: two length bytes, then the bytes as given (not necessarily UTF-8). */
function mqttString (bytes: Buffer | string): Buffer {
  const b = typeof bytes === 'string' ? Buffer.from(bytes, 'utf8') : bytes
  return Buffer.concat([u16(b.length), b])
}

function remainingLength (n: number): Buffer {
  const out: number[] = []
  do {
    let byte = n % 128
    n = Math.floor(n / 128)
    if (n > 0) byte |= 0x80
    out.push(byte)
  } while (n > 0)
  return Buffer.from(out)
}

function packet (firstByte: number, body: Buffer): Buffer {
  return Buffer.concat([Buffer.from([firstByte]), remainingLength(body.length), body])
}

function rawPublish (topic: Buffer | string, payload: Buffer | string, qos: 0 | 1 = 0, messageId = 1): Buffer {
  const id = qos > 0 ? u16(messageId) : Buffer.alloc(0)
  return packet(0x30 | (qos << 1), Buffer.concat([mqttString(topic), id, Buffer.from(payload)]))
}

function rawSubscribe (filter: Buffer | string, qos = 0, messageId = 1): Buffer {
  return packet(0x82, Buffer.concat([u16(messageId), mqttString(filter), Buffer.from([qos])]))
}

/** CONNECT, MQTT 3.1.1, keepalive 60, no will, username or password. */
function rawConnect (clientId: Buffer | string, clean: boolean): Buffer {
  return packet(0x10, Buffer.concat([mqttString('MQTT'), Buffer.from([4, clean ? 0x02 : 0x00]), u16(60), mqttString(clientId)]))
}

/** Size on the wire of a QoS 0 PUBLISH with this topic and a payload of `n` bytes. */
function publishSize (topic: string, n: number): number {
  return mqttPacket.generate({ cmd: 'publish', topic, payload: Buffer.alloc(n), qos: 0, retain: false, dup: false }).length
}

/** The payload length that makes a QoS 0 PUBLISH on `topic` exactly `size` bytes long. */
function payloadFor (topic: string, size: number): number {
  let n = size - publishSize(topic, 0)
  while (publishSize(topic, n) > size) n--
  expect(publishSize(topic, n)).toBe(size)
  return n
}

// ---------------------------------------------------------------------------------------------
// Observing the broker.

async function metricValue (broker: TestBroker, sample: string): Promise<number> {
  return await scrapeMetric(broker.httpUrl, sample) ?? 0
}

const protocolErrors = (broker: TestBroker, reason: string): Promise<number> =>
  metricValue(broker, `ferrymq_protocol_errors_total{reason="${reason}"}`)

/** A new client can still connect, subscribe, publish and receive. */
async function expectServes (url: string): Promise<void> {
  const topic = fresh('alive')
  const c = await connect(url)
  await c.subscribeAsync(topic, { qos: 1 })
  const got = collect(c, 1)
  await c.publishAsync(topic, 'still here', { qos: 1 })
  expect((await got)[0]?.payload).toBe('still here')
  await c.endAsync()
}

/** A connected raw client (CONNACK 0 received). */
async function rawConnected (port: number, clientId = fresh('raw')): Promise<RawClient> {
  const raw = await RawClient.open(port)
  raw.sendConnect({ clientId })
  expect((await raw.next('connack')).returnCode).toBe(0)
  return raw
}

/** Resolves with the milliseconds from now until `socket` closes; rejects after `timeoutMs`. */
function closesWithin (socket: Socket | WebSocket, timeoutMs: number): Promise<number> {
  const start = performance.now()
  return withTimeout(new Promise<number>((resolve) => {
    (socket as Socket).once('close', () => resolve(performance.now() - start))
  }), timeoutMs, 'the broker to close the connection')
}

/** Deterministic "random" bytes (mulberry32). */
function pseudoRandomBytes (n: number, seed: number): Buffer {
  const out = Buffer.alloc(n)
  let a = seed >>> 0
  for (let i = 0; i < n; i++) {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    out[i] = ((t ^ (t >>> 14)) >>> 0) & 0xff
  }
  return out
}

// ---------------------------------------------------------------------------------------------

describe('garbage instead of CONNECT', () => {
  it.each([
    ['an HTTP request', Buffer.from('GET / HTTP/1.1\r\nHost: broker\r\n\r\n')],
    ['0xFF bytes (a Remaining Length longer than four bytes)', Buffer.alloc(64, 0xff)],
    ['pseudo-random bytes', pseudoRandomBytes(4096, 1)],
    ['a CONNECT header over garbage', Buffer.concat([Buffer.from([0x10, 0x20]), pseudoRandomBytes(32, 2)])],
    ['a PUBLISH before CONNECT', rawPublish('before/connect', 'x')],
  ])('%s: the connection is closed at once (not at connectTimeout) and the broker still serves', async (_name, bytes) => {
    const watcher = await connect(b.mqttUrl)
    await watcher.subscribeAsync('#')
    const seen: string[] = []
    watcher.on('message', (topic) => seen.push(topic))

    const raw = await RawClient.open(b.port('mqtt'))
    raw.sendBytes(bytes)
    // connectTimeoutMs is 10 s here: closing within 2 s is the parser refusing the bytes.
    await raw.waitClosed(2000)
    expect(raw.packets).toEqual([])
    await expectServes(b.mqttUrl)
    expect(seen.filter((t) => !t.startsWith('alive-'))).toEqual([])
  })
})

describe('a second CONNECT', () => {
  it('on a connected session is a protocol violation: that client is closed, others keep working', async () => {
    const other = await connect(b.mqttUrl, { clientId: 'dup-other' })
    await other.subscribeAsync('dup/#', { qos: 1 })

    const raw = await rawConnected(b.port('mqtt'), 'dup-raw')
    raw.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: 'dup/raw', qos: 0 }] })
    await raw.next('suback')
    // The second CONNECT claims the other client's id: were it processed, it would take over that session.
    raw.sendConnect({ clientId: 'dup-other' })
    await raw.waitClosed(2000)
    expect(raw.packets.filter((p) => p.cmd === 'connack')).toEqual([])

    const pub = await connect(b.mqttUrl)
    const got = collect(other, 1)
    await pub.publishAsync('dup/after', 'other is fine', { qos: 1 })
    expect((await got)[0]?.payload).toBe('other is fine')
    expect(other.connected).toBe(true)
  })

  it('sent before the CONNACK of the first (two CONNECTs in one write) closes the connection', async () => {
    const raw = await RawClient.open(b.port('mqtt'))
    raw.sendBytes(Buffer.concat([rawConnect('twice-1', true), rawConnect('twice-2', true)]))
    await raw.waitClosed(2000)
    expect(raw.packets.filter((p) => p.cmd === 'connack').length).toBeLessThanOrEqual(1)
    await expectServes(b.mqttUrl)
  })
})

describe('limits.maxPacketSize', () => {
  const LIMIT = 1024
  let small: TestBroker
  beforeAll(async () => { small = await startBroker({ limits: { maxPacketSize: LIMIT } }) })
  afterAll(async () => { await small?.close() })

  /** A subscriber on `topic` that records every payload size it gets. */
  async function sizesOn (url: string, topic: string): Promise<{ client: MqttClient, sizes: number[] }> {
    const client = await connect(url)
    await client.subscribeAsync(topic, { qos: 0 })
    const sizes: number[] = []
    client.on('message', (_t, payload) => sizes.push(payload.length))
    return { client, sizes }
  }

  it('over TCP: a packet of limit + 1 bytes closes the connection and is counted; one of exactly the limit is delivered', async () => {
    const topic = 'size/tcp'
    const watcher = await sizesOn(small.mqttUrl, topic)
    const before = await protocolErrors(small, 'packet_too_large')

    const raw = await rawConnected(small.port('mqtt'))
    const over = rawPublish(topic, Buffer.alloc(payloadFor(topic, LIMIT + 1), 1))
    expect(over.length).toBe(LIMIT + 1)
    raw.sendBytes(over)
    await raw.waitClosed(2000)
    await eventually(async () => await protocolErrors(small, 'packet_too_large') === before + 1, 5000, 'packet_too_large to be counted')

    // Refused on its fixed header: the body is never waited for.
    const headerOnly = await rawConnected(small.port('mqtt'))
    headerOnly.sendBytes(Buffer.from([0x30, ...remainingLength(10 * 1024 * 1024)]))
    await headerOnly.waitClosed(2000)
    await eventually(async () => await protocolErrors(small, 'packet_too_large') === before + 2, 5000, 'packet_too_large to be counted twice')

    const pub = await connect(small.mqttUrl)
    const got = collect(watcher.client, 1)
    const atLimit = payloadFor(topic, LIMIT)
    await pub.publishAsync(topic, Buffer.alloc(atLimit, 2), { qos: 0 })
    await got
    expect(watcher.sizes).toEqual([atLimit])
  })

  it('over WebSocket: an MQTT.js publish over the limit closes that connection and is counted; one of exactly the limit is delivered', async () => {
    const topic = 'size/ws'
    const watcher = await sizesOn(small.wsUrl, topic)
    const before = await protocolErrors(small, 'packet_too_large')

    const big = await connect(small.wsUrl)
    const closed = new Promise<void>((resolve) => big.once('close', () => resolve()))
    big.publish(topic, Buffer.alloc(2 * LIMIT, 1), { qos: 0 })
    await withTimeout(closed, 2000, 'the oversized WebSocket client to be closed')
    await eventually(async () => await protocolErrors(small, 'packet_too_large') === before + 1, 5000, 'packet_too_large to be counted')

    const pub = await connect(small.wsUrl)
    const got = collect(watcher.client, 1)
    const atLimit = payloadFor(topic, LIMIT)
    await pub.publishAsync(topic, Buffer.alloc(atLimit, 2), { qos: 0 })
    await got
    expect(watcher.sizes).toEqual([atLimit])
  })

  it.each([
    ['in one WebSocket message (refused by ws itself)', 1],
    ['cut into several WebSocket messages (refused by the packet meter)', 4],
  ])('over WebSocket, a PUBLISH of limit + 1 bytes %s closes the connection and is counted', async (_name, pieces) => {
    const before = await protocolErrors(small, 'packet_too_large')
    const ws = new WebSocket(small.wsUrl, 'mqtt')
    ws.on('error', () => {})
    await withTimeout(new Promise((resolve) => ws.once('open', resolve)), 5000, 'WebSocket open')
    const connack = new Promise((resolve) => ws.once('message', resolve))
    ws.send(rawConnect(fresh('ws-raw'), true))
    await withTimeout(connack, 5000, 'CONNACK')

    const over = rawPublish('size/ws-raw', Buffer.alloc(payloadFor('size/ws-raw', LIMIT + 1), 1))
    expect(over.length).toBe(LIMIT + 1)
    const closed = closesWithin(ws, 2000)
    const step = Math.ceil(over.length / pieces)
    for (let i = 0; i < over.length; i += step) ws.send(over.subarray(i, i + step))
    await closed
    await eventually(async () => await protocolErrors(small, 'packet_too_large') === before + 1, 5000, 'packet_too_large to be counted once')
    await expectServes(small.wsUrl)
  })
})

describe('invalid topic names in PUBLISH', () => {
  const tooDeep = Array.from({ length: 101 }, () => 'l').join('/')
  const cases: [string, Buffer | string][] = [
    ['a + wildcard', 'bad/+/x'],
    ['a # wildcard', 'bad/#'],
    ['only #', '#'],
    ['an empty topic', ''],
    ['ill-formed UTF-8 (0xC3 0x28)', Buffer.from([0x62, 0x61, 0x64, 0x2f, 0xc3, 0x28])],
    ['U+0000', 'bad/\u0000/x'],
    ['101 levels (limits.maxTopicLevels is 100)', tooDeep],
  ]

  it.each(cases)('%s: the connection is closed without PUBACK, nothing reaches a # subscriber, others keep working', async (_name, topic) => {
    const watcher = await connect(b.mqttUrl)
    await watcher.subscribeAsync('#', { qos: 1 })
    const seen: string[] = []
    watcher.on('message', (t) => seen.push(t))

    const raw = await rawConnected(b.port('mqtt'))
    raw.sendBytes(rawPublish(topic, 'must not be delivered', 1, 7))
    await raw.waitClosed(2000)
    expect(raw.packets.filter((p) => p.cmd === 'puback')).toEqual([])

    // A marker published after the refusal reaches the watcher after anything the bad client sent would have.
    const good = await connect(b.mqttUrl)
    const marker = collect(watcher, 1, 5000, (t) => t === 'good/marker')
    await good.publishAsync('good/marker', 'ok', { qos: 1 })
    await marker
    expect(seen).toEqual(['good/marker'])
  })

  it('the limit is limits.maxTopicLevels: with 3, a topic of 4 levels is refused and one of 3 delivered', async () => {
    const shallow = await startBroker({ limits: { maxTopicLevels: 3 } })
    try {
      const watcher = await connect(shallow.mqttUrl)
      await watcher.subscribeAsync('#')
      const got = collect(watcher, 1)
      const raw = await rawConnected(shallow.port('mqtt'))
      raw.sendBytes(rawPublish('a/b/c/d', 'four'))
      await raw.waitClosed(2000)
      const pub = await connect(shallow.mqttUrl)
      await pub.publishAsync('a/b/c', 'three', { qos: 1 })
      expect(await got).toMatchObject([{ topic: 'a/b/c', payload: 'three' }])
    } finally {
      await endAllClients()
      await shallow.close()
    }
  })
})

describe('invalid topic filters in SUBSCRIBE', () => {
  const cases: [string, Buffer | string][] = [
    ['# not alone in its level (a/b#)', 'a/b#'],
    ['# not last (a/#/b)', 'a/#/b'],
    ['+ not alone in its level (a+/b)', 'a+/b'],
    ['+ not alone in the last level (a/+b)', 'a/+b'],
    ['# not alone in the first level (a#)', 'a#'],
    ['+ at the end of a level (a/b+)', 'a/b+'],
    ['+ at the start of a level (+a/b)', '+a/b'],
    ['an empty filter', ''],
    ['ill-formed UTF-8 (0xC3 0x28)', Buffer.from([0x61, 0x2f, 0xc3, 0x28])],
    ['U+0000', 'a/\u0000'],
    ['101 levels', Array.from({ length: 101 }, () => 'l').join('/')],
  ]

  it.each(cases)('%s: the connection is closed without SUBACK, and the broker keeps serving', async (_name, filter) => {
    const raw = await rawConnected(b.port('mqtt'))
    raw.sendBytes(rawSubscribe(filter, 0, 9))
    await raw.waitClosed(2000)
    expect(raw.packets.filter((p) => p.cmd === 'suback')).toEqual([])
    await expectServes(b.mqttUrl)
  })
})

describe('client identifiers', () => {
  async function connackCode (bytes: Buffer): Promise<{ code: number, raw: RawClient }> {
    const raw = await RawClient.open(b.port('mqtt'))
    raw.sendBytes(bytes)
    const connack = await raw.next('connack')
    return { code: connack.returnCode ?? -1, raw }
  }

  it('one longer than limits.maxClientIdLength (256) gets CONNACK 2 (identifier rejected) and is closed', async () => {
    const { code, raw } = await connackCode(rawConnect('x'.repeat(257), true))
    expect(code).toBe(2)
    await raw.waitClosed(2000)
  })

  it('one of exactly limits.maxClientIdLength (256) is accepted', async () => {
    const { code, raw } = await connackCode(rawConnect('y'.repeat(256), true))
    expect(code).toBe(0)
    raw.destroy()
  })

  it('an empty one with CleanSession = 0 gets CONNACK 2 and is closed [MQTT-3.1.3-8]', async () => {
    const { code, raw } = await connackCode(rawConnect('', false))
    expect(code).toBe(2)
    await raw.waitClosed(2000)
    await expectServes(b.mqttUrl)
  })

  it('an empty one with CleanSession = 1 is accepted, and the client publishes and receives', async () => {
    const { code, raw } = await connackCode(rawConnect('', true))
    expect(code).toBe(0)
    raw.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: 'anon/t', qos: 0 }] })
    await raw.next('suback')
    raw.send({ cmd: 'publish', topic: 'anon/t', payload: Buffer.from('hi'), qos: 0, retain: false, dup: false })
    expect((await raw.next('publish')).payload.toString()).toBe('hi')
    raw.destroy()
  })

  it('an MQTT 3.1 client id over 23 characters gets CONNACK 2', async () => {
    const raw = await RawClient.open(b.port('mqtt'))
    raw.sendConnect({ protocolId: 'MQIsdp', protocolVersion: 3, clientId: 'z'.repeat(24) })
    expect((await raw.next('connack')).returnCode).toBe(2)
    await raw.waitClosed(2000)
  })
})

describe('limits.connectTimeoutMs', () => {
  const TIMEOUT = 300
  let quick: TestBroker
  beforeAll(async () => { quick = await startBroker({ limits: { connectTimeoutMs: TIMEOUT } }) })
  afterAll(async () => { await quick?.close() })

  it('a TCP socket that never sends CONNECT is closed after the timeout, not before', async () => {
    const socket = netConnect({ port: quick.port('mqtt'), host: '127.0.0.1' })
    socket.on('error', () => {})
    const elapsed = closesWithin(socket, 5000)
    const ms = await elapsed
    expect(ms).toBeGreaterThanOrEqual(TIMEOUT - 50)
    expect(ms).toBeLessThan(TIMEOUT + 2000)
    await expectServes(quick.mqttUrl)
  })

  it('a WebSocket that never sends CONNECT is closed after the timeout, not before', async () => {
    const ws = new WebSocket(quick.wsUrl, 'mqtt')
    ws.on('error', () => {})
    const elapsed = closesWithin(ws, 5000)
    const ms = await elapsed
    expect(ms).toBeGreaterThanOrEqual(TIMEOUT - 50)
    expect(ms).toBeLessThan(TIMEOUT + 2000)
  })

  it('a TCP socket to the WebSocket port that never completes the upgrade is closed after about the timeout', async () => {
    const socket = netConnect({ port: quick.port('ws'), host: '127.0.0.1' })
    socket.on('error', () => {})
    socket.write('GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\n') // headers never finished
    const ms = await closesWithin(socket, 5000)
    expect(ms).toBeGreaterThanOrEqual(TIMEOUT - 50)
    // Node checks HTTP timeouts on an interval (here 300 ms): allow for one period and slack.
    expect(ms).toBeLessThan(TIMEOUT + 2000)
  })

  it('a client that sends CONNECT in time stays connected past the timeout', async () => {
    const raw = await rawConnected(quick.port('mqtt'))
    // A socket opened later that never sends CONNECT: its timer fires after the first one's would have.
    const idle = netConnect({ port: quick.port('mqtt'), host: '127.0.0.1' })
    idle.on('error', () => {})
    await closesWithin(idle, 5000)
    raw.send({ cmd: 'pingreq' })
    await raw.next('pingresp')
    expect(raw.socket.destroyed).toBe(false)
    raw.destroy()
  })
})

describe('limits.drainTimeoutMs: a subscriber that stops reading', () => {
  const DRAIN = 1000

  it.each([0, 1] as const)('at QoS %i is dropped after the drain timeout, while a healthy subscriber keeps receiving without a stall', async (qos) => {
    // The client-buffer bound (tested below) would close the slow client before the timer does.
    const broker = await startBroker({ limits: { drainTimeoutMs: DRAIN, maxClientBufferBytes: 1024 ** 3 } })
    try {
      const topic = 'stall/t'
      const slow = await rawConnected(broker.port('mqtt'), 'slow')
      slow.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic, qos }] })
      await slow.next('suback')
      slow.socket.pause() // never reads again: the kernel buffers fill, then the broker's

      const healthy = await connect(broker.mqttUrl, { clientId: 'healthy' })
      await healthy.subscribeAsync(topic, { qos })
      const pub = await connect(broker.mqttUrl, { clientId: 'pub' })
      // A paused socket does not see the broker close it: the broker's $SYS announcement does.
      const watcher = await connect(broker.mqttUrl, { clientId: 'watcher' })
      await watcher.subscribeAsync('$SYS/+/disconnect/clients')

      // Publish one message at a time, each awaited at the healthy subscriber, until the slow one
      // is dropped: each round trip is a delivery to the healthy subscriber while the slow one stalls.
      const start = performance.now()
      let slowDroppedAt: number | null = null
      watcher.on('message', (_t, payload) => {
        if (payload.toString() === 'slow') slowDroppedAt ??= performance.now() - start
      })
      let longest = 0
      let sent = 0
      const roundTrip = async (payload: Buffer): Promise<void> => {
        const t = performance.now()
        const got = collect(healthy, 1, DRAIN * 3, (name) => name === topic)
        await pub.publishAsync(topic, payload, { qos })
        await got
        longest = Math.max(longest, performance.now() - t)
        sent++
      }
      // 40 MB fill the socket buffers on both sides of the slow subscriber (and it is dropped 1 s
      // later); then small messages keep the healthy one busy until the drop, without piling more
      // megabytes up in the broker for the slow one.
      const big = Buffer.alloc(64 * 1024, 0x5a)
      for (let i = 0; i < 640 && slowDroppedAt === null; i++) await roundTrip(big)
      const small = Buffer.from('small')
      const deadline = start + DRAIN + 10_000
      while (slowDroppedAt === null && performance.now() < deadline) await roundTrip(small)
      expect(slowDroppedAt, `slow subscriber still connected after ${sent} messages`).not.toBeNull()
      // Reading again, the slow client finds its connection closed.
      slow.socket.resume()
      await slow.waitClosed(5000)

      // One more after the drop: the healthy subscriber is still served.
      const after = collect(healthy, 1)
      await pub.publishAsync(topic, 'after the drop', { qos })
      expect((await after)[0]?.payload).toBe('after the drop')

      expect(slowDroppedAt as unknown as number).toBeGreaterThanOrEqual(DRAIN - 50)
      expect(longest, `the healthy subscriber waited ${Math.round(longest)} ms for one message`).toBeLessThan(DRAIN / 2)
      // Counted once, not once per message that was waiting.
      await eventually(async () => await protocolErrors(broker, 'drain_timeout') === 1, 5000, 'drain_timeout to be counted once')
      expect(await protocolErrors(broker, 'drain_timeout')).toBe(1)
    } finally {
      await endAllClients()
      await broker.close()
    }
  })
})

describe('limits.maxClientBufferBytes: what the broker holds for a subscriber that stops reading', () => {
  const LIMIT = 1024 * 1024
  const big = Buffer.alloc(64 * 1024, 0x42)

  /** A raw subscriber that subscribes, then never reads again; and a healthy one on the same topic. */
  async function setUp (qos: 0 | 1, clean = true): Promise<{ broker: TestBroker, slow: RawClient, healthy: MqttClient, pub: MqttClient, topic: string }> {
    // A drain timeout far away, so only the buffer bound can act within the test.
    const broker = await startBroker({ limits: { maxClientBufferBytes: LIMIT, drainTimeoutMs: 600_000 } })
    const topic = fresh('buffer')
    const slow = await RawClient.open(broker.port('mqtt'))
    slow.sendConnect({ clientId: 'slow-reader', clean })
    expect((await slow.next('connack')).returnCode).toBe(0)
    slow.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic, qos }] })
    await slow.next('suback')
    slow.socket.pause()
    const healthy = await connect(broker.mqttUrl, { clientId: 'healthy-reader' })
    await healthy.subscribeAsync(topic, { qos })
    const pub = await connect(broker.mqttUrl, { clientId: 'buffer-pub' })
    return { broker, slow, healthy, pub, topic }
  }

  it('past the bound, QoS 0 messages to the slow subscriber are dropped and counted; it stays connected and the healthy one gets every message', async () => {
    const { broker, slow, healthy, pub, topic } = await setUp(0)
    try {
      // 400 × 64 KiB = 25 MiB: far more than the loopback socket buffers (a few MiB) and the 1 MiB
      // bound hold. (640 took over 30 s once when the whole suite ran on two busy cores.)
      const total = 400
      const got = collect(healthy, total, 50_000)
      for (let i = 0; i < total; i++) await pub.publishAsync(topic, big, { qos: 0 })
      expect((await got).length).toBe(total)
      const dropped = await metricValue(broker, 'ferrymq_messages_dropped_total{reason="slow_subscriber"}')
      expect(dropped).toBeGreaterThan(0)
      expect(dropped).toBeLessThan(total)
      expect(slow.socket.destroyed).toBe(false)
      expect(await metricValue(broker, 'ferrymq_clients_connected')).toBe(3)
    } finally {
      slow.destroy()
      await endAllClients()
      await broker.close()
    }
 }, 60_000)

  it('past the bound, a QoS 1 delivery closes the slow subscriber (counted once); its persistent session gets the messages when it returns', async () => {
    const { broker, slow, healthy, pub, topic } = await setUp(1, false)
    try {
      const watcher = await connect(broker.mqttUrl)
      await watcher.subscribeAsync('$SYS/+/disconnect/clients')
      const gone = collect(watcher, 1, 30_000, () => true)
      const total = 640
      const got = collect(healthy, total, 30_000)
      let sent = 0
      let closed = false
      void gone.then(() => { closed = true })
      while (!closed && sent < total) {
        await pub.publishAsync(topic, big, { qos: 1 })
        sent++
      }
      expect((await gone)[0]?.payload).toBe('slow-reader')
      // The rest still go out to the healthy subscriber.
      for (; sent < total; sent++) await pub.publishAsync(topic, big, { qos: 1 })
      expect((await got).length).toBe(total)
      expect(await protocolErrors(broker, 'slow_subscriber')).toBe(1)

      // The slow client comes back with its session: every QoS 1 message is there.
      slow.destroy()
      const back = await connect(broker.mqttUrl, { clientId: 'slow-reader', clean: false })
      const resent = await collect(back, total, 30_000)
      expect(resent.length).toBe(total)
    } finally {
      await endAllClients()
      await broker.close()
    }
  })
})

describe('names of Object.prototype members', () => {
  const names = ['constructor', '__proto__', 'toString', 'hasOwnProperty', 'valueOf']

  it('as client ids and topics: clients connect, subscribe, publish and receive', async () => {
    const clients = await Promise.all(names.map((name) => connect(b.mqttUrl, { clientId: name })))
    // Every filter is granted except exactly "__proto__" (SUBACK 0x80, see authorizeSubscribe):
    // MQTT.js rejects such a SUBSCRIBE, and the error carries the SUBACK.
    const granted = await Promise.all(clients.map((c, i) => c.subscribeAsync([names[i] as string, `${names[i]}/+`], { qos: 1 })
      .then((grants) => grants.map((g) => g.qos), (err: ErrorWithSubackPacket) => err.packet.granted)))
    expect(granted).toEqual(names.map((name) => name === '__proto__' ? [0x80, 1] : [1, 1]))
    const pub = await connect(b.mqttUrl, { clientId: fresh('proto-pub') })
    const got = clients.map((c, i) => collect(c, names[i] === '__proto__' ? 1 : 2))
    for (const name of names) {
      await pub.publishAsync(name, `to ${name}`, { qos: 1 })
      await pub.publishAsync(`${name}/${name}`, `below ${name}`, { qos: 0 })
    }
    for (const [i, name] of names.entries()) {
      // "__proto__": the first message it gets is the one below (the same publisher's earlier one to "__proto__" did not come).
      expect((await got[i] as { topic: string, payload: string }[]).map((m) => [m.topic, m.payload]))
        .toEqual(name === '__proto__' ? [[`${name}/${name}`, `below ${name}`]] : [[name, `to ${name}`], [`${name}/${name}`, `below ${name}`]])
    }
  })

  it('as persistent sessions and retained topics: queued and retained messages come back', async () => {
    for (const name of names) {
      const first = await connect(b.mqttUrl, { clientId: name, clean: false })
      await first.subscribeAsync(`${name}/queued`, { qos: 1 })
      await first.endAsync()
      const pub = await connect(b.mqttUrl)
      await pub.publishAsync(`${name}/queued`, `while away ${name}`, { qos: 1 })
      await pub.publishAsync(name, `retained ${name}`, { qos: 1, retain: true })
      // A raw client keeps every packet from the first byte: the queued one may come with the CONNACK.
      const again = await RawClient.open(b.port('mqtt'))
      again.sendConnect({ clientId: name, clean: false })
      expect(await again.next('connack')).toMatchObject({ returnCode: 0, sessionPresent: true })
      expect(await again.next('publish')).toMatchObject({ topic: `${name}/queued`, qos: 1 })
      again.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: name, qos: 1 }] })
      if (name === '__proto__') {
        // The filter "__proto__" is refused (SUBACK 0x80); the retained message on that topic still
        // comes through a wildcard (which may bring other tests' retained topics first).
        expect(await again.next('suback')).toMatchObject({ messageId: 1, granted: [0x80] })
        again.send({ cmd: 'subscribe', messageId: 2, subscriptions: [{ topic: '+', qos: 1 }] })
      }
      let retained = await again.next('publish')
      while (retained.topic !== name) retained = await again.next('publish')
      expect([retained.topic, retained.payload.toString(), retained.retain]).toEqual([name, `retained ${name}`, true])
      await pub.publishAsync(name, '', { qos: 1, retain: true })
      again.destroy()
      // Leave no session behind for the other tests.
      const clean = await connect(b.mqttUrl, { clientId: name, clean: true })
      await clean.endAsync()
      await pub.endAsync()
    }
    await expectServes(b.mqttUrl)
  })
})

describe('WebSocket upgrade with ~2000 extra headers (CVE-2024-37890)', () => {
  it('is refused without crashing, and an MQTT.js client over ws:// then connects and publishes', async () => {
    // Short header names keep the request under Node's 16 KiB header limit; they come first, so
    // that the WebSocket headers fall past server.maxHeadersCount (2000), which crashed ws < 8.17.1.
    const extra = Array.from({ length: 2000 }, (_, i) => `${i.toString(36)}: a\r\n`).join('')
    const request = 'GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\n' + extra +
      'Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n' +
      'Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n'
    const socket = netConnect({ port: b.port('ws'), host: '127.0.0.1' })
    socket.on('error', () => {})
    let response = ''
    socket.setEncoding('latin1').on('data', (d: string) => { response += d })
    await withTimeout(new Promise((resolve) => socket.once('connect', resolve)), 5000, 'TCP connect')
    socket.write(request)
    await closesWithin(socket, 5000)
    expect(response).toMatch(/^HTTP\/1\.1 4\d\d /)

    const ws = await connect(b.wsUrl)
    await ws.subscribeAsync('cve/after', { qos: 1 })
    const got = collect(ws, 1)
    await ws.publishAsync('cve/after', 'ws works', { qos: 1 })
    expect((await got)[0]?.payload).toBe('ws works')
  })

  it('websocket-stream resolves ws >= 8.17.1', () => {
    const require = createRequire(import.meta.url)
    const fromWebsocketStream = createRequire(require.resolve('websocket-stream'))
    const pkg = JSON.parse(readFileSync(fromWebsocketStream.resolve('ws/package.json'), 'utf8')) as { version: string }
    const [major, minor, patch] = pkg.version.split('.').map((n) => parseInt(n, 10)) as [number, number, number]
    const atLeast = major > 8 || (major === 8 && (minor > 17 || (minor === 17 && patch >= 1)))
    expect(atLeast, `websocket-stream uses ws ${pkg.version} from ${dirname(fromWebsocketStream.resolve('ws/package.json'))}`).toBe(true)
  })
})

describe('a QoS 0 flood whose only subscriber leaves', () => {
  it('does not overflow the stack in aedes\' mqemitter; the broker keeps serving', async () => {
    const broker = await startBroker()
    const crashes: Error[] = []
    const onCrash = (err: Error): void => { crashes.push(err) }
    process.on('uncaughtException', onCrash)
    const publishers: RawClient[] = []
    try {
      const PUBLISHERS = 4
      const PER_PUBLISHER = 20_000
      const LEAVE_AFTER = 2000
      const sub = await connect(broker.mqttUrl, { clientId: 'flood-sub' })
      await sub.subscribeAsync('flood/t', { qos: 0 })
      let received = 0
      const left = new Promise<void>((resolve) => {
        sub.on('message', () => {
          if (++received === LEAVE_AFTER) {
            sub.stream.destroy()
            resolve()
          }
        })
      })
      for (let i = 0; i < PUBLISHERS; i++) publishers.push(await rawConnected(broker.port('mqtt'), `flood-pub-${i}`))
      const one = mqttPacket.generate({ cmd: 'publish', topic: 'flood/t', payload: Buffer.alloc(16, 1), qos: 0, retain: false, dup: false })
      const chunk = Buffer.concat(Array.from({ length: 1000 }, () => one))
      const before = await metricValue(broker, 'ferrymq_messages_received_total{qos="0"}')
      await Promise.all(publishers.map(async (p) => {
        for (let k = 0; k < PER_PUBLISHER / 1000; k++) {
          if (!p.socket.write(chunk)) await withTimeout(new Promise((resolve) => p.socket.once('drain', resolve)), 10_000, 'publisher socket drain')
        }
      }))
      await withTimeout(left, 10_000, `the subscriber to receive ${LEAVE_AFTER} messages (got ${received})`)
      await eventually(async () => await metricValue(broker, 'ferrymq_messages_received_total{qos="0"}') - before >= PUBLISHERS * PER_PUBLISHER,
        15_000, 'the broker to read every flooded message')
      await expectServes(broker.mqttUrl)
      expect(crashes.map((e) => e.message)).toEqual([])
    } finally {
      process.off('uncaughtException', onCrash)
      for (const p of publishers) p.destroy()
      await endAllClients()
      await broker.close()
    }
  })
})

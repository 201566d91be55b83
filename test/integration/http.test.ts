import mqttPacket from 'mqtt-packet'
import { Registry } from 'prom-client'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { createLogger } from '../../src/observability/logger.js'
import { listenHttp } from '../../src/transport/http.js'
import { startBroker, type TestBroker } from '../helpers/broker.js'
import { collect, connect, endAllClients, eventually } from '../helpers/clients.js'

let b: TestBroker
beforeAll(async () => { b = await startBroker() })
afterAll(async () => { await b?.close() })
afterEach(async () => { await endAllClients() })

/** Samples of a Prometheus text exposition, keyed as written: `name` or `name{label="value"}`. */
type Samples = Map<string, number>

function parsePrometheus (text: string): Samples {
  const samples: Samples = new Map()
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$/.exec(line)
    if (match === null) throw new Error(`not a Prometheus sample line: ${JSON.stringify(line)}`)
    samples.set(match[1] as string, Number(match[2]))
  }
  return samples
}

async function scrape (broker: TestBroker): Promise<{ text: string, samples: Samples }> {
  const res = await fetch(`${broker.httpUrl}/metrics`)
  expect(res.status).toBe(200)
  expect(res.headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/)
  const text = await res.text()
  return { text, samples: parsePrometheus(text) }
}

/** Size on the wire of a PUBLISH, as mqtt-packet (and so both MQTT.js and aedes) encodes it. */
function publishSize (topic: string, payload: string, qos: 0 | 1 | 2): number {
  return mqttPacket.generate({ cmd: 'publish', topic, payload: Buffer.from(payload), qos, retain: false, dup: false, ...(qos > 0 ? { messageId: 1 } : {}) }).length
}

describe('health and readiness', () => {
  it('GET /healthz is 200 while the broker runs', async () => {
    const res = await fetch(`${b.httpUrl}/healthz`)
    expect(res.status).toBe(200)
    expect(await res.text()).toBe('ok\n')
  })

  it('GET /readyz is 200 once the broker is ready; a query string is ignored; HEAD works', async () => {
    expect(b.broker.ready).toBe(true)
    const res = await fetch(`${b.httpUrl}/readyz`)
    expect(res.status).toBe(200)
    expect(await res.text()).toBe('ready\n')
    expect((await fetch(`${b.httpUrl}/readyz?verbose=1`)).status).toBe(200)
    const head = await fetch(`${b.httpUrl}/healthz`, { method: 'HEAD' })
    expect(head.status).toBe(200)
    expect(await head.text()).toBe('')
  })

  it('readiness drops as soon as close() starts', async () => {
    const other = await startBroker()
    expect(other.broker.ready).toBe(true)
    const closing = other.close()
    expect(other.broker.ready).toBe(false)
    await closing
  })

  // Once close() has started the HTTP listener stops accepting too, so a 503 from a closing broker
  // cannot be observed without racing; the status mapping is checked on the endpoints themselves.
  it('/readyz and /healthz answer 503 when the broker is not ready or shutting down', async () => {
    let live = true
    let ready = false
    const http = await listenHttp('http', '127.0.0.1', 0, { live: () => live, ready: () => ready, registry: new Registry() }, createLogger('silent'))
    try {
      const url = `http://127.0.0.1:${http.address().port}`
      const notReady = await fetch(`${url}/readyz`)
      expect([notReady.status, await notReady.text()]).toEqual([503, 'not ready\n'])
      ready = true
      expect((await fetch(`${url}/readyz`)).status).toBe(200)
      live = false
      ready = false
      const dying = await fetch(`${url}/healthz`)
      expect([dying.status, await dying.text()]).toEqual([503, 'shutting down\n'])
      expect((await fetch(`${url}/readyz`)).status).toBe(503)
    } finally {
      await http.close()
    }
  })
})

describe('/api/v1/bridges', () => {
  it('is an empty JSON list without bridges (see test/bridge for a bridge\'s entry)', async () => {
    const res = await fetch(`${b.httpUrl}/api/v1/bridges`)
    expect(res.status).toBe(200)
    expect(res.headers.get('content-type')).toBe('application/json')
    expect(await res.json()).toEqual([])
  })
})

describe('errors', () => {
  it('an unknown path is 404 and names the endpoints', async () => {
    const res = await fetch(`${b.httpUrl}/nope`)
    expect(res.status).toBe(404)
    expect(await res.text()).toMatch(/\/healthz.*\/readyz.*\/metrics.*\/api\/v1\/bridges/)
    expect((await fetch(`${b.httpUrl}/`)).status).toBe(404)
    expect((await fetch(`${b.httpUrl}/metrics/extra`)).status).toBe(404)
  })

  it('POST (and other methods) is 405 with Allow: GET, HEAD', async () => {
    for (const method of ['POST', 'PUT', 'DELETE']) {
      const res = await fetch(`${b.httpUrl}/metrics`, { method, body: method === 'DELETE' ? undefined : 'x' })
      expect(res.status).toBe(405)
      expect(res.headers.get('allow')).toBe('GET, HEAD')
      await res.text()
    }
  })

  it('the WebSocket listener answers a plain GET with 426 Upgrade Required', async () => {
    for (const path of ['/mqtt', '/', '/elsewhere']) {
      const res = await fetch(`http://127.0.0.1:${b.port('ws')}${path}`)
      expect(res.status).toBe(426)
      expect(res.headers.get('upgrade')).toBe('websocket')
      expect(await res.text()).toContain('ws://host:port/mqtt')
    }
    // ...and keeps serving MQTT over WebSocket.
    const client = await connect(b.wsUrl)
    expect(client.connected).toBe(true)
  })
})

describe('/metrics', () => {
  it('exports the FerryMQ metrics with HELP and TYPE lines, and process metrics', async () => {
    const { text, samples } = await scrape(b)
    for (const [name, type] of [
      ['ferrymq_clients_connected', 'gauge'],
      ['ferrymq_subscriptions', 'gauge'],
      ['ferrymq_retained_messages', 'gauge'],
      ['ferrymq_connections_total', 'counter'],
      ['ferrymq_messages_received_total', 'counter'],
      ['ferrymq_messages_sent_total', 'counter'],
      ['ferrymq_publish_bytes_received_total', 'counter'],
      ['ferrymq_publish_bytes_sent_total', 'counter'],
      ['ferrymq_process_cpu_user_seconds_total', 'counter'],
    ]) {
      expect(text).toMatch(new RegExp(`^# HELP ${name} \\S`, 'm'))
      expect(text).toContain(`# TYPE ${name} ${type}\n`)
    }
    expect(samples.get('ferrymq_process_cpu_user_seconds_total')).toBeGreaterThan(0)
    expect(samples.get('ferrymq_process_start_time_seconds')).toBeGreaterThan(1_600_000_000)
    expect(samples.get('ferrymq_nodejs_heap_size_used_bytes')).toBeGreaterThan(0)
  })

  it('counts clients, connections per listener, subscriptions, messages and bytes per QoS, and retained messages', async () => {
    const m = await startBroker()
    try {
      const tcpSub = await connect(m.mqttUrl)
      const wsSub = await connect(m.wsUrl)
      const pub = await connect(m.mqttUrl)
      await tcpSub.subscribeAsync({ 'm/#': { qos: 1 }, 'other/x': { qos: 0 } })
      await wsSub.subscribeAsync('m/a', { qos: 1 })

      let s = (await scrape(m)).samples
      expect(s.get('ferrymq_clients_connected')).toBe(3)
      expect(s.get('ferrymq_connections_total{listener="mqtt"}')).toBe(2)
      expect(s.get('ferrymq_connections_total{listener="ws"}')).toBe(1)
      expect(s.get('ferrymq_subscriptions')).toBe(3)
      expect(s.get('ferrymq_retained_messages')).toBe(0)
      expect(s.has('ferrymq_messages_received_total{qos="1"}')).toBe(false)

      const atTcp = collect(tcpSub, 5)
      const atWs = collect(wsSub, 3)
      const q1 = ['one', 'two', 'three'].map((p) => ({ topic: 'm/a', payload: `qos1-${p}` }))
      const q0 = ['one', 'two'].map((p) => ({ topic: 'm/b', payload: `qos0-${p}` }))
      for (const msg of q1) await pub.publishAsync(msg.topic, msg.payload, { qos: 1 })
      for (const msg of q0) await pub.publishAsync(msg.topic, msg.payload, { qos: 0 })
      expect((await atTcp).map((msg) => msg.payload)).toEqual([...q1, ...q0].map((msg) => msg.payload))
      expect((await atWs).map((msg) => msg.qos)).toEqual([1, 1, 1])

      const q1Bytes = q1.reduce((sum, msg) => sum + publishSize(msg.topic, msg.payload, 1), 0)
      const q0Bytes = q0.reduce((sum, msg) => sum + publishSize(msg.topic, msg.payload, 0), 0)
      s = (await scrape(m)).samples
      expect(s.get('ferrymq_messages_received_total{qos="1"}')).toBe(3)
      expect(s.get('ferrymq_messages_received_total{qos="0"}')).toBe(2)
      expect(s.get('ferrymq_messages_sent_total{qos="1"}')).toBe(6) // 3 to each subscriber
      expect(s.get('ferrymq_messages_sent_total{qos="0"}')).toBe(2)
      expect(s.get('ferrymq_publish_bytes_received_total{qos="1"}')).toBe(q1Bytes)
      expect(s.get('ferrymq_publish_bytes_received_total{qos="0"}')).toBe(q0Bytes)
      expect(s.get('ferrymq_publish_bytes_sent_total{qos="1"}')).toBe(2 * q1Bytes)
      expect(s.get('ferrymq_publish_bytes_sent_total{qos="0"}')).toBe(q0Bytes)
      expect(s.get('ferrymq_network_bytes_received_total')).toBeGreaterThan(q1Bytes + q0Bytes)
      expect(s.get('ferrymq_network_bytes_sent_total')).toBeGreaterThan(2 * q1Bytes + q0Bytes)

      await pub.publishAsync('retained/1', 'kept one', { qos: 1, retain: true })
      await pub.publishAsync('retained/2', 'kept two', { qos: 1, retain: true })
      expect((await scrape(m)).samples.get('ferrymq_retained_messages')).toBe(2)
      await pub.publishAsync('retained/1', '', { qos: 1, retain: true })
      expect((await scrape(m)).samples.get('ferrymq_retained_messages')).toBe(1)

      await wsSub.endAsync()
      // The broker notices the DISCONNECT after the client has sent it: poll.
      await eventually(async () => (await scrape(m)).samples.get('ferrymq_clients_connected') === 2, 5000, 'clients_connected to drop to 2')
      s = (await scrape(m)).samples
      expect(s.get('ferrymq_subscriptions')).toBe(2)
      expect(s.get('ferrymq_connections_total{listener="ws"}')).toBe(1)
    } finally {
      await endAllClients()
      await m.close()
    }
  })
})

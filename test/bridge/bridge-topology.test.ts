import { execFileSync } from 'node:child_process'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import type { MqttClient } from 'mqtt'
import { afterEach, describe, expect, it } from 'vitest'
import { startBroker, type TestBroker } from '../helpers/broker.js'
import { connect, eventually } from '../helpers/clients.js'
import { FaultProxy } from '../helpers/fault-proxy.js'
import { hasMosquitto, startMosquitto, type Mosquitto } from '../helpers/mosquitto.js'
import { tempDir } from '../store/helpers.js'
import { closeStarted, deadPort, FAST, logsMatching, metric, metricUntil, SeqTracker, startEdge, untilArrives } from './fixture.js'

/*
 * Where the bridge connects (URL failover) and what it must never do with direction: both
 * (send a message back where it came from, or loop it), against Mosquitto and against a second
 * FerryMQ as the upstream.
 */

let up: Mosquitto | null = null
let upstream: TestBroker | null = null
let edge: TestBroker | null = null
const proxies: FaultProxy[] = []
afterEach(async () => {
  await closeStarted({ edge, upstream, proxies: proxies.splice(0), up })
  edge = null
  upstream = null
  up = null
})

const B = { bridge: 'cloud' }

describe.skipIf(!hasMosquitto())('bridge URL failover (needs the mosquitto binary)', () => {
  it('urls: [dead, good] connects to the second and forwards', async () => {
    up = await startMosquitto()
    const logs: Array<Record<string, unknown>> = []
    const dead = `mqtt://127.0.0.1:${await deadPort()}`
    edge = await startEdge([{ name: 'cloud', urls: [dead, up.url], ...FAST, topics: [{ pattern: 'telemetry/#', qos: 1 }] }], { logs })
    const cloud = await connect(up.url)
    await cloud.subscribeAsync('telemetry/#', { qos: 1 })
    const tracker = new SeqTracker(cloud, (t) => t === 'telemetry/dev1')
    await metricUntil(edge, 'ferrymq_bridge_connected', B, (v) => v === 1)
    expect(logsMatching(logs, 'cloud', 'bridge connected').map((l) => l.url)).toEqual([up.url])
    const local = await connect(edge.mqttUrl)
    for (let i = 0; i < 5; i++) await local.publishAsync('telemetry/dev1', String(i), { qos: 1 })
    await tracker.all(0, 5, 10_000)
    // The admin API names the URL in use and the counters.
    await metricUntil(edge, 'ferrymq_bridge_outbox_messages', B, (v) => v === 0)
    const res = await fetch(`${edge.httpUrl}/api/v1/bridges`)
    expect(res.headers.get('content-type')).toBe('application/json')
    expect(await res.json()).toEqual([{
      name: 'cloud',
      connected: true,
      url: up.url,
      protocolVersion: 4,
      outbox: { messages: 0, bytes: 0, oldestAgeSeconds: 0 },
      inflight: 0,
      forwarded: { out: 5, in: 0 },
      dropped: {},
      expired: 0,
      reconnects: 1,
    }])
  })

  it('goes back to the first URL when it is reachable again and the current link drops', async () => {
    up = await startMosquitto()
    const first = await FaultProxy.start({ port: up.port })
    const second = await FaultProxy.start({ port: up.port })
    proxies.push(first, second)
    first.cut('reset') // accepts and closes at once: the first URL fails
    const logs: Array<Record<string, unknown>> = []
    const urls = [`mqtt://127.0.0.1:${first.port}`, `mqtt://127.0.0.1:${second.port}`]
    edge = await startEdge([{ name: 'cloud', urls, ...FAST, topics: [{ pattern: 'telemetry/#', qos: 1 }] }], { logs })
    const cloud = await connect(up.url)
    await cloud.subscribeAsync('telemetry/#', { qos: 1 })
    const tracker = new SeqTracker(cloud, (t) => t === 'telemetry/dev1')
    await metricUntil(edge, 'ferrymq_bridge_connected', B, (v) => v === 1)
    expect(logsMatching(logs, 'cloud', 'bridge connected').map((l) => l.url)).toEqual([urls[1]])
    expect(second.connections).toBe(1)

    // The link drops while the second URL stays reachable: the bridge must prefer the first again.
    first.restore()
    second.cut('reset')
    second.restore()
    await eventually(() => logsMatching(logs, 'cloud', 'bridge connected').length === 2, 10_000, 'a second "bridge connected"')
    expect(logsMatching(logs, 'cloud', 'bridge connected').map((l) => l.url)).toEqual([urls[1], urls[0]])
    expect(first.connections).toBe(1)
    expect(second.connections).toBe(0)
    const local = await connect(edge.mqttUrl)
    for (let i = 0; i < 5; i++) await local.publishAsync('telemetry/dev1', String(i), { qos: 1 })
    await tracker.all(0, 5, 10_000)
  })
})

/**
 * Both sides subscribe to shared/#; messages are counted per payload. `settle()` publishes a fence
 * on each side and waits until both subscribers have it: any echo or loop copy of an earlier
 * message travels the same ordered paths ahead of a fence, so after it the counts are final.
 */
class TwoSides {
  readonly edgeCounts = new Map<string, number>()
  readonly upCounts = new Map<string, number>()
  #fences = 0

  constructor (readonly edgeClient: MqttClient, readonly upClient: MqttClient) {
    const count = (map: Map<string, number>) => (topic: string, payload: Buffer): void => {
      if (topic.startsWith('shared/probe')) return
      const p = payload.toString()
      map.set(p, (map.get(p) ?? 0) + 1)
    }
    edgeClient.on('message', count(this.edgeCounts))
    upClient.on('message', count(this.upCounts))
  }

  async both (payload: string): Promise<void> {
    await eventually(() => this.edgeCounts.has(payload) && this.upCounts.has(payload), 10_000, `"${payload}" on both sides`)
  }

  async settle (): Promise<void> {
    for (const side of [this.edgeClient, this.upClient, this.edgeClient]) {
      const fence = `fence-${this.#fences++}`
      await side.publishAsync('shared/fence', fence, { qos: 1 })
      await this.both(fence)
    }
  }

  /** Every payload seen on each side, with its count. */
  snapshot (): { edge: Record<string, number>, up: Record<string, number> } {
    return { edge: Object.fromEntries(this.edgeCounts), up: Object.fromEntries(this.upCounts) }
  }
}

async function noLoop (edgeBroker: TestBroker, upUrl: string): Promise<void> {
  const edgeClient = await connect(edgeBroker.mqttUrl, { clientId: 'edge-app' })
  const upClient = await connect(upUrl, { clientId: 'cloud-app' })
  await edgeClient.subscribeAsync('shared/#', { qos: 1 })
  await upClient.subscribeAsync('shared/#', { qos: 1 })
  await metricUntil(edgeBroker, 'ferrymq_bridge_connected', B, (v) => v === 1)
  // The bridge's upstream subscription is in place once a probe from upstream gets through.
  await untilArrives(edgeClient, 'shared/probe', async () => await upClient.publishAsync('shared/probe', 'p', { qos: 1 }))
  const sides = new TwoSides(edgeClient, upClient)

  await edgeClient.publishAsync('shared/x', 'from-edge', { qos: 1 })
  await sides.both('from-edge')
  await upClient.publishAsync('shared/x', 'from-up', { qos: 1 })
  await sides.both('from-up')
  await sides.settle()
  const { edge, up } = sides.snapshot()
  expect(edge).toEqual({ 'from-edge': 1, 'from-up': 1, 'fence-0': 1, 'fence-1': 1, 'fence-2': 1 })
  expect(up).toEqual(edge)
}

describe.skipIf(!hasMosquitto())('bridge direction both: no echo, no loop (needs the mosquitto binary)', () => {
  it('FerryMQ ↔ Mosquitto on shared/#: each message arrives exactly once on each side', async () => {
    up = await startMosquitto()
    edge = await startEdge([{ name: 'cloud', url: up.url, ...FAST, topics: [{ pattern: 'shared/#', direction: 'both', qos: 1 }] }])
    await noLoop(edge, up.url)
  })
})

describe.skipIf(!hasMosquitto())('bridge to an MQTT 5 upstream (needs the mosquitto binary)', () => {
  it('FerryMQ ↔ Mosquitto over MQTT 5 on shared/#: No Local keeps each message to one copy per side', async () => {
    up = await startMosquitto()
    edge = await startEdge([{ name: 'cloud', url: up.url, protocolVersion: 5, ...FAST, topics: [{ pattern: 'shared/#', direction: 'both', qos: 1 }] }])
    await noLoop(edge, up.url)
  })

  it('username and password: the right ones connect and forward; a wrong password is refused, logged and retried', async () => {
    const passwords = join(tempDir('ferrymq-passwd-'), 'passwd')
    writeFileSync(passwords, '')
    execFileSync('mosquitto_passwd', ['-b', passwords, 'edge', 's3cret'])
    up = await startMosquitto({ extra: ['allow_anonymous false', `password_file ${passwords}`] })
    const logs: Array<Record<string, unknown>> = []
    edge = await startEdge([
      { name: 'good', url: up.url, username: 'edge', password: 's3cret', protocolVersion: 5, ...FAST, topics: [{ pattern: 'telemetry/#', qos: 1 }] },
      { name: 'bad', url: up.url, username: 'edge', password: 'wrong', ...FAST, topics: [{ pattern: 'telemetry/#', qos: 1 }] },
    ], { logs })
    const cloud = await connect(up.url, { username: 'edge', password: 's3cret' })
    await cloud.subscribeAsync('telemetry/#', { qos: 1 })
    const tracker = new SeqTracker(cloud, (t) => t === 'telemetry/dev1')
    await metricUntil(edge, 'ferrymq_bridge_connected', { bridge: 'good' }, (v) => v === 1)
    const local = await connect(edge.mqttUrl)
    for (let i = 0; i < 5; i++) await local.publishAsync('telemetry/dev1', String(i), { qos: 1 })
    await tracker.all(0, 5, 10_000)
    await eventually(() => logsMatching(logs, 'bad', 'bridge could not connect').length > 0, 10_000, 'the refused bridge to log it')
    expect(String(logsMatching(logs, 'bad', 'bridge could not connect')[0]?.err)).toMatch(/Not authorized|Bad username or password/)
    await metricUntil(edge, 'ferrymq_bridge_reconnects_total', { bridge: 'bad' }, (v) => v >= 2)
    expect(await metric(edge, 'ferrymq_bridge_connected', { bridge: 'bad' })).toBe(0)
    expect(tracker.duplicates).toBe(0) // the refused bridge sent nothing
  })
})

describe('bridge direction both: no echo, no loop (FerryMQ upstream)', () => {
  it('FerryMQ edge ↔ FerryMQ upstream on shared/#: each message arrives exactly once on each side', async () => {
    upstream = await startBroker()
    edge = await startEdge([{ name: 'cloud', url: upstream.mqttUrl, ...FAST, topics: [{ pattern: 'shared/#', direction: 'both', qos: 1 }] }])
    await noLoop(edge, upstream.mqttUrl)
  })
})

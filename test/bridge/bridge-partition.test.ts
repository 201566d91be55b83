import type { MqttClient } from 'mqtt'
import { afterEach, describe, expect, it } from 'vitest'
import type { TestBroker } from '../helpers/broker.js'
import { collect, connect, eventually } from '../helpers/clients.js'
import { FaultProxy, type CutMode } from '../helpers/fault-proxy.js'
import { hasMosquitto, startMosquitto, type Mosquitto } from '../helpers/mosquitto.js'
import { closeStarted, FAST, metric, metricUntil, outOfOrder, SeqTracker, startEdge, untilArrives } from './fixture.js'

/*
 * Store-and-forward across a partition: a real FerryMQ edge bridges to a real Mosquitto through a
 * TCP fault proxy that cuts the link (reset or black hole) for a random time while a publisher at
 * the edge keeps sending sequence-numbered messages. The upstream subscriber (connected directly
 * to Mosquitto throughout) must see every sequence number, first arrivals in order.
 */

let up: Mosquitto | null = null
let edge: TestBroker | null = null
let proxy: FaultProxy | null = null
afterEach(async () => {
  await closeStarted({ edge, proxies: [proxy], up })
  edge = null
  proxy = null
  up = null
})

const B = { bridge: 'cloud' }

const rand = (min: number, max: number): number => min + Math.floor(Math.random() * (max - min))

async function setup (qos: 1 | 2, maxInflight = 50): Promise<{ cloud: MqttClient, local: MqttClient, tracker: SeqTracker }> {
  up = await startMosquitto()
  proxy = await FaultProxy.start({ port: up.port })
  edge = await startEdge([{
    name: 'cloud',
    url: `mqtt://127.0.0.1:${proxy.port}`,
    ...FAST,
    maxInflight,
    topics: [
      { pattern: 'telemetry/#', direction: 'out', qos, remotePrefix: 'site1/' },
      { pattern: 'cmd/#', direction: 'in', qos: 1, remotePrefix: 'site1/' },
    ],
  }])
  const cloud = await connect(up.url, { clientId: 'cloud-sub' })
  await cloud.subscribeAsync('site1/telemetry/#', { qos })
  const tracker = new SeqTracker(cloud, (t) => t === 'site1/telemetry/dev1')
  const local = await connect(edge.mqttUrl, { clientId: 'edge-pub' })
  await metricUntil(edge, 'ferrymq_bridge_connected', { bridge: 'cloud' }, (v) => v === 1)
  return { cloud, local, tracker }
}

/** Publishes seq from..to-1 at the edge (all in flight at once); the link is cut when `cutAt` is published. */
async function publishUnderLoad (local: MqttClient, qos: 1 | 2, from: number, to: number, cutAt: number | number[], cut: () => void | Promise<void>): Promise<void> {
  const cuts = new Set(Array.isArray(cutAt) ? cutAt : [cutAt])
  const acks: Array<Promise<unknown>> = []
  for (let i = from; i < to; i++) {
    if (cuts.has(i)) await cut()
    acks.push(local.publishAsync('telemetry/dev1', String(i), { qos }))
    // Let the broker take some in between, so the cut lands mid-stream and not before the first byte.
    if (i % 100 === 99) await Promise.all(acks.splice(0))
  }
  await Promise.all(acks)
}

describe.skipIf(!hasMosquitto())('bridge partition (needs the mosquitto binary)', () => {
  it.each(['reset', 'blackhole'] as CutMode[])('QoS 1: every message arrives upstream, first arrivals in order, across a %s partition of random length', async (mode) => {
    const N = mode === 'reset' ? 2000 : 1500
    const { local, tracker } = await setup(1)
    const cutAt = rand(200, N / 2)
    const partitionMs = rand(200, 1200)
    tracker.label = `${mode} cut at seq ${cutAt} for ${partitionMs} ms`
    let restored: Promise<void> = Promise.resolve()
    await publishUnderLoad(local, 1, 0, N, cutAt, () => {
      proxy?.cut(mode)
      restored = (async () => {
        // A black hole must be noticed by the bridge itself (keepalive 1 s) before the link returns;
        // then the partition lasts a random while longer. (Its length is the thing under test, not a synchronisation.)
        if (mode === 'blackhole') await metricUntil(edge as TestBroker, 'ferrymq_bridge_connected', { bridge: 'cloud' }, (v) => v === 0, 8000)
        await new Promise((resolve) => setTimeout(resolve, partitionMs))
        proxy?.restore()
      })()
    })
    await restored
    await tracker.all(0, N, 20_000)
    expect(outOfOrder(tracker.firsts), tracker.label).toEqual([])
    expect(tracker.firsts.length).toBe(N)
    await metricUntil(edge as TestBroker, 'ferrymq_bridge_outbox_messages', { bridge: 'cloud' }, (v) => v === 0)
    expect(await metric(edge as TestBroker, 'ferrymq_bridge_forwarded_total', { bridge: 'cloud', direction: 'out' })).toBeGreaterThanOrEqual(N)
    expect(await metric(edge as TestBroker, 'ferrymq_bridge_connected', { bridge: 'cloud' })).toBe(1)
    expect(await metric(edge as TestBroker, 'ferrymq_bridge_reconnects_total', { bridge: 'cloud' })).toBeGreaterThanOrEqual(1)
  }, 40_000)

  it('QoS 2 mapping: no duplicates at all across three reset partitions', async () => {
    const N = 1000
    const { local, tracker } = await setup(2)
    // Three partitions: each catches a window of QoS 2 messages at a random stage (PUBLISH sent,
    // PUBREC stored, PUBREL sent): re-sending any of them wrongly shows up as a duplicate.
    const cutAts = [rand(100, 300), rand(400, 600), rand(700, 900)]
    tracker.label = `cuts at seq ${cutAts.join(', ')}`
    let restored: Promise<void> = Promise.resolve()
    await publishUnderLoad(local, 2, 0, N, cutAts, async () => {
      await restored
      await metricUntil(edge as TestBroker, 'ferrymq_bridge_connected', { bridge: 'cloud' }, (v) => v === 1)
      proxy?.cut('reset')
      restored = new Promise((resolve) => setTimeout(() => { proxy?.restore(); resolve() }, rand(100, 400)))
    })
    await restored
    await tracker.all(0, N, 20_000)
    await metricUntil(edge as TestBroker, 'ferrymq_bridge_outbox_messages', { bridge: 'cloud' }, (v) => v === 0)
    // A fence after the last one: a late duplicate would arrive before it.
    await local.publishAsync('telemetry/dev1', String(N), { qos: 2 })
    await tracker.all(N, N + 1, 10_000)
    expect(tracker.duplicates, tracker.label).toBe(0)
    expect(tracker.arrivals).toEqual(Array.from({ length: N + 1 }, (_, i) => i))
  }, 40_000)

  it('a command published upstream during the partition reaches the local persistent subscriber after the link returns; metrics and $SYS follow the link', async () => {
    const { cloud, local, tracker } = await setup(1)
    const sysClient = await connect((edge as TestBroker).mqttUrl, { clientId: 'sys-watch' })
    const sys = new Map<string, string[]>()
    sysClient.on('message', (topic, payload) => {
      const list = sys.get(topic) ?? []
      list.push(payload.toString())
      sys.set(topic, list)
    })
    await sysClient.subscribeAsync('$SYS/ferrymq/#', { qos: 0 })
    const sysSaw = async (topic: string, ok: (v: string) => boolean, what: string): Promise<void> =>
      await eventually(() => (sys.get(`$SYS/ferrymq/bridges/cloud/${topic}`) ?? []).some(ok), 5000, `$SYS ${topic} ${what}`)
    await sysSaw('connected', (v) => v === '1', '= 1')

    const operator = await connect((edge as TestBroker).mqttUrl, { clientId: 'operator', clean: false })
    await operator.subscribeAsync('cmd/#', { qos: 1 })
    // The bridge's upstream subscription is in place once a probe command gets through.
    await untilArrives(operator, 'cmd/probe', async () => await cloud.publishAsync('site1/cmd/probe', 'probe', { qos: 1 }))

    proxy?.cut('reset')
    await metricUntil(edge as TestBroker, 'ferrymq_bridge_connected', { bridge: 'cloud' }, (v) => v === 0)
    await sysSaw('connected', (v) => v === '0', '= 0')
    const commands = collect(operator, 1, 15_000, (t) => t === 'cmd/reboot')
    await cloud.publishAsync('site1/cmd/reboot', 'now', { qos: 1 })
    for (let i = 0; i < 20; i++) await local.publishAsync('telemetry/dev1', String(i), { qos: 1 })
    expect(await metric(edge as TestBroker, 'ferrymq_bridge_outbox_messages', { bridge: 'cloud' })).toBe(20)
    await sysSaw('outbox/messages', (v) => v === '20', '= 20')
    expect(tracker.seen.size).toBe(0)

    proxy?.restore()
    expect((await commands)[0]).toMatchObject({ topic: 'cmd/reboot', payload: 'now', qos: 1 })
    await tracker.all(0, 20, 10_000)
    await metricUntil(edge as TestBroker, 'ferrymq_bridge_connected', { bridge: 'cloud' }, (v) => v === 1)
    await metricUntil(edge as TestBroker, 'ferrymq_bridge_outbox_messages', { bridge: 'cloud' }, (v) => v === 0)
    expect(await metric(edge as TestBroker, 'ferrymq_bridge_forwarded_total', { bridge: 'cloud', direction: 'out' })).toBe(20)
    expect(await metric(edge as TestBroker, 'ferrymq_bridge_forwarded_total', { bridge: 'cloud', direction: 'in' })).toBeGreaterThanOrEqual(2)
    await sysSaw('connected', (v) => v === '1', 'back to 1')
    await sysSaw('forwarded/out', (v) => v === '20', '= 20')
    await sysSaw('outbox/messages', (v) => v === '0', 'back to 0')
  }, 40_000)
})

describe.skipIf(!hasMosquitto())('bridge QoS 2 window vs Mosquitto max_inflight_messages (needs the mosquitto binary)', () => {
  // Mosquitto's max_inflight_messages (default 20) caps the QoS 2 messages a client may have
  // awaiting PUBREL; over it, it answers PUBREC 0x97 and drops a 3.1.1 connection, again after
  // every reconnect. The bridge keeps at most maxInflightQos2 (default 20) QoS 2 messages in flight
  // (and, on MQTT 5, no more than the upstream's Receive Maximum); with the old single window of
  // maxInflight (100) this backlog never drained.
  /**
   * 300 QoS 2 messages queued at the edge during a cut, then the link returns: every one must reach
   * a default Mosquitto, in order, and the link must stay up through the drain (Mosquitto refused
   * nothing). `bridge` adds settings to the bridge.
   */
  async function drainQos2Backlog (bridge: Record<string, unknown>): Promise<void> {
    up = await startMosquitto() // max_inflight_messages 20; announced as Receive Maximum on MQTT 5
    proxy = await FaultProxy.start({ port: up.port })
    edge = await startEdge([{ name: 'cloud', url: `mqtt://127.0.0.1:${proxy.port}`, ...bridge, ...FAST, topics: [{ pattern: 'telemetry/#', qos: 2 }] }])
    const cloud = await connect(up.url, { clientId: 'cloud-sub' })
    await cloud.subscribeAsync('telemetry/#', { qos: 2 })
    const tracker = new SeqTracker(cloud, (t) => t === 'telemetry/dev1')
    await metricUntil(edge, 'ferrymq_bridge_connected', B, (v) => v === 1)
    proxy.cut('reset')
    await metricUntil(edge, 'ferrymq_bridge_connected', B, (v) => v === 0)
    const local = await connect(edge.mqttUrl)
    await publishUnderLoad(local, 2, 0, 300, [], () => {})
    await metricUntil(edge, 'ferrymq_bridge_outbox_messages', B, (v) => v === 300, 5000)
    proxy.restore()
    await metricUntil(edge, 'ferrymq_bridge_connected', B, (v) => v === 1)
    const reconnects = await metric(edge, 'ferrymq_bridge_reconnects_total', B)
    await tracker.all(0, 300, 5000)
    expect(tracker.arrivals).toEqual(Array.from({ length: 300 }, (_, i) => i))
    expect(await metric(edge, 'ferrymq_bridge_reconnects_total', B)).toBe(reconnects)
  }

  it('QoS 2 mapping with the default window drains a backlog of 300 into a default Mosquitto, in order', async () => {
    await drainQos2Backlog({})
  }, 20_000)

  it('over MQTT 5 the upstream\'s Receive Maximum bounds the window, whatever maxInflight and maxInflightQos2 say', async () => {
    await drainQos2Backlog({ protocolVersion: 5, maxInflight: 1000, maxInflightQos2: 1000 })
  }, 20_000)
})

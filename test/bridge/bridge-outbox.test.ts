import type { MqttClient } from 'mqtt'
import { afterEach, describe, expect, it } from 'vitest'
import type { TestBroker } from '../helpers/broker.js'
import { connect, withTimeout } from '../helpers/clients.js'
import { FaultProxy } from '../helpers/fault-proxy.js'
import { hasMosquitto, startMosquitto, type Mosquitto } from '../helpers/mosquitto.js'
import { closeStarted, FAST, logsMatching, metric, metricUntil, SeqTracker, startEdge } from './fixture.js'

/*
 * The outbox's limits during a partition, against a real Mosquitto behind a fault proxy:
 * outbox.maxMessages with whenFull drop-oldest and reject, and outbox.maxAgeSeconds.
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

/** Edge → proxy → Mosquitto with the given outbox settings; the link is cut (reset) before it returns. */
async function partitioned (outbox: Record<string, unknown>, logs: Array<Record<string, unknown>> = []): Promise<{ cloud: MqttClient, tracker: SeqTracker }> {
  up = await startMosquitto()
  proxy = await FaultProxy.start({ port: up.port })
  edge = await startEdge([{
    name: 'cloud',
    url: `mqtt://127.0.0.1:${proxy.port}`,
    ...FAST,
    outbox,
    topics: [{ pattern: 'telemetry/#', direction: 'out', qos: 1, remotePrefix: 'site1/' }],
  }], { logs })
  const cloud = await connect(up.url, { clientId: 'cloud-sub' })
  await cloud.subscribeAsync('site1/telemetry/#', { qos: 1 })
  const tracker = new SeqTracker(cloud, (t) => t === 'site1/telemetry/dev1')
  await metricUntil(edge, 'ferrymq_bridge_connected', B, (v) => v === 1)
  proxy.cut('reset')
  await metricUntil(edge, 'ferrymq_bridge_connected', B, (v) => v === 0)
  return { cloud, tracker }
}

/** Publishes seq from..to-1 one after another (each acknowledged before the next). */
async function publishSeq (client: MqttClient, from: number, to: number): Promise<void> {
  for (let i = from; i < to; i++) await client.publishAsync('telemetry/dev1', String(i), { qos: 1 })
}

describe.skipIf(!hasMosquitto())('bridge outbox limits (needs the mosquitto binary)', () => {
  it('drop-oldest: a full outbox keeps the newest maxMessages, counts and logs the drops, and forwarding goes on after the link returns', async () => {
    const logs: Array<Record<string, unknown>> = []
    const { tracker } = await partitioned({ maxMessages: 50, whenFull: 'drop-oldest' }, logs)
    const local = await connect((edge as TestBroker).mqttUrl, { clientId: 'edge-pub' })
    await publishSeq(local, 0, 200)
    // A QoS 1 PUBACK follows the journal write; the outbox append may finish just after it.
    const dropped = await metricUntil(edge as TestBroker, 'ferrymq_bridge_dropped_total', { ...B, reason: 'outbox_full' }, (v) => v >= 150, 5000)
    const held = await metricUntil(edge as TestBroker, 'ferrymq_bridge_outbox_messages', B, (v) => v >= 50, 5000)
    expect({ dropped, held }).toEqual({ dropped: 150, held: 50 })
    const warnings = logsMatching(logs, 'cloud', 'bridge outbox full')
    expect(warnings.length).toBeGreaterThanOrEqual(1)
    expect(warnings[0]).toMatchObject({ level: 40, reason: 'outbox_full' })
    expect(tracker.seen.size).toBe(0)

    proxy?.restore()
    await tracker.all(150, 200, 10_000)
    // Mosquitto #2256: after dropping, the bridge must keep forwarding new messages.
    await publishSeq(local, 200, 260)
    await tracker.all(200, 260, 10_000)
    expect([...tracker.seen].sort((a, b) => a - b)).toEqual(Array.from({ length: 110 }, (_, i) => 150 + i))
    expect(tracker.firsts).toEqual(Array.from({ length: 110 }, (_, i) => 150 + i))
    await metricUntil(edge as TestBroker, 'ferrymq_bridge_outbox_messages', B, (v) => v === 0)
    expect(await metric(edge as TestBroker, 'ferrymq_bridge_forwarded_total', { ...B, direction: 'out' })).toBeGreaterThanOrEqual(110)
    expect(await metric(edge as TestBroker, 'ferrymq_bridge_dropped_total', { ...B, reason: 'outbox_full' })).toBe(150)
  }, 30_000)

  it('reject: a QoS 1 publisher is refused (disconnected) once the outbox is full; after the link returns and the outbox drains it can publish again', async () => {
    const logs: Array<Record<string, unknown>> = []
    const { tracker } = await partitioned({ maxMessages: 50, whenFull: 'reject' }, logs)
    const local = await connect((edge as TestBroker).mqttUrl, { clientId: 'edge-pub' })
    await publishSeq(local, 0, 50)
    await metricUntil(edge as TestBroker, 'ferrymq_bridge_outbox_messages', B, (v) => v === 50, 5000)
    // MQTT 3.1.1 has no reason code for a refused PUBLISH: the broker closes the connection, the PUBACK never comes.
    const closed = new Promise<void>((resolve) => local.once('close', () => resolve()))
    const refused = local.publishAsync('telemetry/dev1', '50', { qos: 1 }).then(() => 'acknowledged', () => 'failed')
    await withTimeout(closed, 5000, 'the publisher is disconnected')
    expect(await Promise.race([refused, Promise.resolve('pending')])).not.toBe('acknowledged')
    expect(await metric(edge as TestBroker, 'ferrymq_bridge_outbox_messages', B)).toBe(50)
    // Counted and logged as the metric's help says ("reject refused it").
    expect(await metric(edge as TestBroker, 'ferrymq_bridge_dropped_total', { ...B, reason: 'outbox_full' })).toBe(1)
    expect(logsMatching(logs, 'cloud', 'bridge outbox full').length).toBe(1)
    // MQTT 5: DISCONNECT 0x97 "Quota exceeded", not aedes' final PUBACK 0x87: the client keeps the
    // message and sends it again when it reconnects.
    const v5 = await connect((edge as TestBroker).mqttUrl, { clientId: 'edge-pub-v5', protocolVersion: 5, reconnectPeriod: 0 })
    const told = new Promise<number | undefined>((resolve) => v5.once('disconnect', (packet) => resolve(packet.reasonCode)))
    const v5refused = v5.publishAsync('telemetry/dev1', '51', { qos: 1 }).then(() => 'acknowledged', (err: { code?: number }) => `refused ${err.code}`)
    expect(await withTimeout(told, 5000, 'the v5 publisher is told why')).toBe(0x97)
    expect(await Promise.race([v5refused, Promise.resolve('pending')])).toBe('pending')

    proxy?.restore()
    await tracker.all(0, 50, 10_000)
    await metricUntil(edge as TestBroker, 'ferrymq_bridge_outbox_messages', B, (v) => v === 0)
    const again = await connect((edge as TestBroker).mqttUrl, { clientId: 'edge-pub-2' })
    await publishSeq(again, 100, 110)
    await tracker.all(100, 110, 10_000)
    expect(tracker.seen.has(50)).toBe(false)
    expect(tracker.seen.has(51)).toBe(false)
    expect(tracker.firsts).toEqual([...Array.from({ length: 50 }, (_, i) => i), ...Array.from({ length: 10 }, (_, i) => 100 + i)])
  }, 30_000)

  it('maxAgeSeconds: messages that waited longer are dropped as expired, not forwarded after the link returns', async () => {
    const logs: Array<Record<string, unknown>> = []
    const { tracker } = await partitioned({ maxAgeSeconds: 1 }, logs)
    const local = await connect((edge as TestBroker).mqttUrl, { clientId: 'edge-pub' })
    await publishSeq(local, 0, 20)
    await metricUntil(edge as TestBroker, 'ferrymq_bridge_outbox_messages', B, (v) => v === 20, 5000)
    // The expiry sweep runs about once a second: wait for it, not for a fixed time.
    await metricUntil(edge as TestBroker, 'ferrymq_bridge_expired_total', B, (v) => v === 20, 8000)
    expect(await metric(edge as TestBroker, 'ferrymq_bridge_outbox_messages', B)).toBe(0)
    expect(logsMatching(logs, 'cloud', 'expired').length).toBeGreaterThanOrEqual(1)

    proxy?.restore()
    await metricUntil(edge as TestBroker, 'ferrymq_bridge_connected', B, (v) => v === 1)
    // A fresh message after the link is back is forwarded; none of the expired ones came before it.
    await publishSeq(local, 100, 101)
    await tracker.all(100, 101, 10_000)
    expect(tracker.arrivals).toEqual([100])
    await metricUntil(edge as TestBroker, 'ferrymq_bridge_outbox_messages', B, (v) => v === 0)
    expect(await metric(edge as TestBroker, 'ferrymq_bridge_forwarded_total', { ...B, direction: 'out' })).toBe(1)
    expect(await metric(edge as TestBroker, 'ferrymq_bridge_expired_total', B)).toBe(20)
  }, 30_000)

  it('MQTT 5 message expiry: a local v5 message that waits in the outbox past its own interval is dropped as expired; one without expiry is forwarded', async () => {
    const { tracker } = await partitioned({})
    const local = await connect((edge as TestBroker).mqttUrl, { clientId: 'edge-pub-v5', protocolVersion: 5 })
    for (let i = 0; i < 10; i++) await local.publishAsync('telemetry/dev1', String(i), { qos: 1, properties: { messageExpiryInterval: 1 } })
    await local.publishAsync('telemetry/dev1', '10', { qos: 1 })
    await metricUntil(edge as TestBroker, 'ferrymq_bridge_outbox_messages', B, (v) => v === 11, 5000)
    // The expiry is a clock: let the 1 s interval run out while the link is down.
    await new Promise<void>((resolve) => setTimeout(resolve, 1500))
    proxy?.restore()
    await tracker.all(10, 11, 10_000)
    expect(tracker.arrivals).toEqual([10])
    expect(await metric(edge as TestBroker, 'ferrymq_bridge_expired_total', B)).toBe(10)
  }, 30_000)
})

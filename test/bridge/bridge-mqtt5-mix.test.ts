import type { EventEmitter } from 'node:events'
import type { IClientOptions, IClientPublishOptions, IPublishPacket, MqttClient } from 'mqtt'
import { afterEach, describe, expect, it } from 'vitest'
import type { TestBroker } from '../helpers/broker.js'
import { connect, waitForEvent, withTimeout } from '../helpers/clients.js'
import { FaultProxy } from '../helpers/fault-proxy.js'
import { hasMosquitto, startMosquitto, type Mosquitto } from '../helpers/mosquitto.js'
import { closeStarted, FAST, metric, metricUntil, outOfOrder, SeqTracker, startEdge, untilArrives } from './fixture.js'

/*
 * MQTT 5 local clients and a bridge to a real Mosquitto (2.0.11, which speaks 3.1.1 and 5), with
 * the bridge speaking either version upstream: what a v5 publisher sends crosses a 3.1.1 hop with
 * payload, QoS and order (its properties cannot), and a v5 hop should carry its properties too;
 * inbound, what a v5 client publishes on Mosquitto reaches local 3.1.1 and v5 subscribers alike.
 */

let up: Mosquitto | null = null
let edge: TestBroker | null = null
let proxy: FaultProxy | null = null
afterEach(async () => {
  await closeStarted({ edge, up, proxies: [proxy] })
  edge = null
  up = null
  proxy = null
})

const B = { bridge: 'cloud' }

function connect5 (url: string, options: IClientOptions = {}): Promise<MqttClient> {
  return connect(url, { protocolVersion: 5, ...options }, 10_000)
}

/** Every message a client receives (whole packets, properties included), with a bounded wait. */
class Inbox {
  readonly messages: IPublishPacket[] = []
  readonly #waiters: Array<() => void> = []

  constructor (client: MqttClient, readonly filter: (topic: string) => boolean = () => true) {
    client.on('message', (topic, _payload, packet) => {
      if (!this.filter(topic)) return
      this.messages.push(packet)
      for (const w of this.#waiters.splice(0)) w()
    })
  }

  async count (n: number, timeoutMs = 10_000): Promise<IPublishPacket[]> {
    await withTimeout(new Promise<void>((resolve) => {
      const test = (): void => { if (this.messages.length >= n) resolve(); else this.#waiters.push(test) }
      test()
    }), timeoutMs, () => `${n} messages; got ${this.messages.length}: ${JSON.stringify(this.messages.slice(0, 5).map((m) => [m.topic, m.payload.toString()]))}`)
    return this.messages
  }
}

/**
 * Publishes `<seq>` payloads for seq in [0, n) on `topic` with up to `window` in flight, each with
 * `options`; resolves with the reason codes of the acknowledgements (PUBACK, or PUBCOMP for QoS 2)
 * once all are acknowledged.
 */
async function publishWindowed (client: MqttClient, topic: string, n: number, window: number, options: IClientPublishOptions): Promise<number[]> {
  const codes: number[] = []
  let next = 0
  await withTimeout(Promise.all(Array.from({ length: window }, async () => {
    while (next < n) {
      const seq = next++
      const ack = await client.publishAsync(topic, String(seq), options)
      codes[seq] = (ack as { reasonCode?: number } | undefined)?.reasonCode ?? 0
    }
  })), 30_000, `publishing ${n} on ${topic}`)
  return codes
}

const V5_PROPERTIES = {
  userProperties: { site: 'edge-7', tag: ['a', 'b'] },
  contentType: 'application/json',
  correlationData: Buffer.from([0xde, 0xad, 0, 1]),
  responseTopic: 'reply/edge-7',
  payloadFormatIndicator: true,
}

describe.skipIf(!hasMosquitto())('MQTT 5 local clients, bridge to Mosquitto (needs the mosquitto binary)', () => {
  it('bridge on 3.1.1: a v5 publisher\'s QoS 1 and QoS 2 messages reach a Mosquitto subscriber with payload, QoS and order (properties cannot cross the 3.1.1 hop)', async () => {
    const N = 60
    up = await startMosquitto()
    edge = await startEdge([{ name: 'cloud', url: up.url, protocolVersion: 4, clientId: 'edge-mix-a', ...FAST, topics: [{ pattern: 'telemetry/#', direction: 'out', qos: 2, remotePrefix: 'site/' }] }])
    const cloud = await connect5(up.url, { clientId: 'cloud-sub-a' })
    await cloud.subscribeAsync('site/telemetry/#', { qos: 2 })
    const q1 = new SeqTracker(cloud, (t) => t === 'site/telemetry/q1', 'QoS 1 upstream')
    const q2 = new SeqTracker(cloud, (t) => t === 'site/telemetry/q2', 'QoS 2 upstream')
    const inbox = new Inbox(cloud)
    await metricUntil(edge, 'ferrymq_bridge_connected', B, (v) => v === 1)

    const local = await connect5(edge.mqttUrl, { clientId: 'v5-pub-a' })
    const props = { ...V5_PROPERTIES, messageExpiryInterval: 600 }
    const [codes1, codes2] = await Promise.all([
      publishWindowed(local, 'telemetry/q1', N, 8, { qos: 1, properties: props }),
      publishWindowed(local, 'telemetry/q2', N, 8, { qos: 2, properties: props }),
    ])
    // Acknowledged at the edge (in the outbox): reason codes below 0x80.
    expect([...codes1, ...codes2].filter((c) => c >= 0x80)).toEqual([])
    await q1.all(0, N, 15_000)
    await q2.all(0, N, 15_000)
    await metricUntil(edge, 'ferrymq_bridge_outbox_messages', B, (v) => v === 0)

    expect(outOfOrder(q1.firsts), 'QoS 1 first arrivals in order').toEqual([])
    expect(q2.arrivals, 'QoS 2: each once, in order').toEqual(Array.from({ length: N }, (_, i) => i))
    const first1 = inbox.messages.find((m) => m.topic === 'site/telemetry/q1') as IPublishPacket
    const first2 = inbox.messages.find((m) => m.topic === 'site/telemetry/q2') as IPublishPacket
    expect([first1.qos, first2.qos]).toEqual([1, 2])
    // 3.1.1 has no properties: nothing of them arrives (and nothing else is made up).
    expect(inbox.messages.filter((m) => m.properties?.userProperties !== undefined || m.properties?.contentType !== undefined ||
      m.properties?.correlationData !== undefined || m.properties?.messageExpiryInterval !== undefined).length).toBe(0)
  }, 45_000)

  it('bridge on MQTT 5: a v5 publisher\'s message reaches a v5 subscriber on Mosquitto, QoS 1 and 2, with its remaining message expiry', async () => {
    up = await startMosquitto()
    edge = await startEdge([{ name: 'cloud', url: up.url, protocolVersion: 5, clientId: 'edge-mix-b', ...FAST, topics: [{ pattern: 'telemetry/#', direction: 'out', qos: 2, remotePrefix: 'site/' }] }])
    const cloud = await connect5(up.url, { clientId: 'cloud-sub-b' })
    await cloud.subscribeAsync('site/telemetry/#', { qos: 2 })
    const inbox = new Inbox(cloud)
    await metricUntil(edge, 'ferrymq_bridge_connected', B, (v) => v === 1)

    const local = await connect5(edge.mqttUrl, { clientId: 'v5-pub-b' })
    await local.publishAsync('telemetry/props', '{"t":1}', { qos: 1, properties: { ...V5_PROPERTIES, messageExpiryInterval: 600 } })
    await local.publishAsync('telemetry/props', '{"t":2}', { qos: 2, properties: { ...V5_PROPERTIES, messageExpiryInterval: 600 } })
    const [m1, m2] = await inbox.count(2) as [IPublishPacket, IPublishPacket]
    expect([m1, m2].map((m) => ({ topic: m.topic, payload: m.payload.toString(), qos: m.qos })))
      .toEqual([{ topic: 'site/telemetry/props', payload: '{"t":1}', qos: 1 }, { topic: 'site/telemetry/props', payload: '{"t":2}', qos: 2 }])
    for (const m of [m1, m2]) {
      expect(m.properties?.messageExpiryInterval).toBeGreaterThan(0)
      expect(m.properties?.messageExpiryInterval).toBeLessThanOrEqual(600)
    }
  }, 30_000)

  it('bridge on MQTT 5: messages a v5 publisher sends by topic alias are bridged under their topic, in order', async () => {
    up = await startMosquitto()
    edge = await startEdge([{ name: 'cloud', url: up.url, protocolVersion: 5, clientId: 'edge-mix-alias', ...FAST, topics: [{ pattern: 'telemetry/#', direction: 'out', qos: 2, remotePrefix: 'site/' }] }])
    const cloud = await connect5(up.url, { clientId: 'cloud-sub-alias' })
    await cloud.subscribeAsync('site/telemetry/#', { qos: 2 })
    const q1 = new SeqTracker(cloud, (t) => t === 'site/telemetry/alias/q1', 'upstream QoS 1')
    const q2 = new SeqTracker(cloud, (t) => t === 'site/telemetry/alias/q2', 'upstream QoS 2')
    await metricUntil(edge, 'ferrymq_bridge_connected', B, (v) => v === 1)
    const local = await connect5(edge.mqttUrl, { clientId: 'v5-pub-alias' })
    // The first PUBLISH of each topic sets its alias; the others carry the alias and an empty
    // topic. One topic per QoS: Mosquitto itself delivers a QoS 2 message at its PUBREL, after
    // QoS 1 messages sent behind it (MQTT orders per topic and QoS).
    await local.publishAsync('telemetry/alias/q1', '0', { qos: 1, properties: { topicAlias: 1 } })
    await local.publishAsync('telemetry/alias/q2', '0', { qos: 2, properties: { topicAlias: 2 } })
    for (let i = 1; i < 5; i++) {
      await local.publishAsync('', String(i), { qos: 1, properties: { topicAlias: 1 } })
      await local.publishAsync('', String(i), { qos: 2, properties: { topicAlias: 2 } })
    }
    await q1.all(0, 5, 10_000)
    await q2.all(0, 5, 10_000)
    expect(outOfOrder(q1.firsts)).toEqual([])
    expect(q2.arrivals).toEqual([0, 1, 2, 3, 4])
  }, 30_000)

  it('bridge outbox full (whenFull: reject): a v5 publisher gets DISCONNECT 0x97 (Quota exceeded), not a PUBACK, and the message it re-sends on reconnect is bridged after the others', async () => {
    up = await startMosquitto()
    proxy = await FaultProxy.start({ port: up.port })
    edge = await startEdge([{
      name: 'cloud', url: `mqtt://127.0.0.1:${proxy.port}`, protocolVersion: 5, clientId: 'edge-mix-full', ...FAST,
      outbox: { maxMessages: 3, whenFull: 'reject' },
      topics: [{ pattern: 'telemetry/#', direction: 'out', qos: 1, remotePrefix: 'site/' }],
    }])
    const cloud = await connect5(up.url, { clientId: 'cloud-sub-full' })
    await cloud.subscribeAsync('site/telemetry/#', { qos: 1 })
    const tracker = new SeqTracker(cloud, (t) => t === 'site/telemetry/full', 'upstream')
    await metricUntil(edge, 'ferrymq_bridge_connected', B, (v) => v === 1)
    proxy.cut('reset')
    await metricUntil(edge, 'ferrymq_bridge_connected', B, (v) => v === 0)

    const pub = await connect5(edge.mqttUrl, { clientId: 'v5-pub-full', clean: false, properties: { sessionExpiryInterval: 600 } })
    const acks: Array<number | undefined> = []
    for (let i = 0; i < 3; i++) acks.push(((await pub.publishAsync('telemetry/full', String(i), { qos: 1 })) as { reasonCode?: number } | undefined)?.reasonCode)
    expect(acks.filter((c) => (c ?? 0) >= 0x80)).toEqual([])
    const disconnect = waitForEvent<[{ reasonCode?: number }]>(pub as unknown as EventEmitter, 'disconnect', 10_000)
    const wire: string[] = []
    pub.on('packetreceive', (p) => wire.push(p.cmd))
    let fourthAcked = false
    const fourth = pub.publishAsync('telemetry/full', '3', { qos: 1 }).then(() => { fourthAcked = true })
    const [packet] = await disconnect
    expect(packet.reasonCode).toBe(0x97)
    expect(wire.filter((c) => c === 'puback'), 'no PUBACK (of any reason code) for the refused message').toEqual([])
    expect(fourthAcked).toBe(false)
    expect(await metric(edge, 'ferrymq_bridge_dropped_total', { bridge: 'cloud', reason: 'outbox_full' })).toBe(1)

    proxy.restore()
    await tracker.all(0, 3, 15_000)
    await metricUntil(edge, 'ferrymq_bridge_outbox_messages', B, (v) => v === 0)
    // Room again: the publisher reconnects (same session) and MQTT.js sends the unacknowledged message again.
    // (reconnect() without the stores would start from empty ones and forget the message.)
    pub.reconnect({ incomingStore: pub.incomingStore, outgoingStore: pub.outgoingStore })
    await withTimeout(fourth, 10_000, 'the re-sent message to be acknowledged')
    await tracker.all(0, 4, 15_000)
    expect(tracker.arrivals).toEqual([0, 1, 2, 3])
  }, 40_000)

  // The outbox entry keeps the application message's properties (src/bridge/properties.ts); the
  // Response Topic is passed unchanged by the mapping (remotePrefix 'site/'), as Mosquitto's bridge does.
  it('bridge on MQTT 5: user properties, content type, correlation data, response topic and payload format of a local v5 message arrive at a v5 subscriber on Mosquitto', async () => {
    up = await startMosquitto()
    edge = await startEdge([{ name: 'cloud', url: up.url, protocolVersion: 5, clientId: 'edge-mix-b2', ...FAST, topics: [{ pattern: 'telemetry/#', direction: 'out', qos: 2, remotePrefix: 'site/' }] }])
    const cloud = await connect5(up.url, { clientId: 'cloud-sub-b2' })
    await cloud.subscribeAsync('site/telemetry/#', { qos: 2 })
    const inbox = new Inbox(cloud)
    await metricUntil(edge, 'ferrymq_bridge_connected', B, (v) => v === 1)

    const local = await connect5(edge.mqttUrl, { clientId: 'v5-pub-b2' })
    await local.publishAsync('telemetry/props', '{"t":1}', { qos: 1, properties: V5_PROPERTIES })
    await local.publishAsync('telemetry/props', '{"t":2}', { qos: 2, properties: V5_PROPERTIES })
    const messages = await inbox.count(2)
    for (const m of messages) {
      expect({
        userProperties: m.properties?.userProperties,
        contentType: m.properties?.contentType,
        correlationData: m.properties?.correlationData,
        responseTopic: m.properties?.responseTopic,
        payloadFormatIndicator: m.properties?.payloadFormatIndicator,
      }, `${m.payload.toString()} (QoS ${m.qos}) arrived with properties ${JSON.stringify(m.properties)}`).toEqual(V5_PROPERTIES)
    }
  }, 30_000)

  for (const protocolVersion of [4, 5] as const) {
    it(`inbound over ${protocolVersion === 5 ? 'MQTT 5' : '3.1.1'}: a v5 publisher on Mosquitto reaches a local 3.1.1 subscriber and a local v5 subscriber, QoS 1 and 2, in order`, async () => {
      const N = 20
      up = await startMosquitto()
      edge = await startEdge([{ name: 'cloud', url: up.url, protocolVersion, clientId: `edge-mix-c${protocolVersion}`, ...FAST, topics: [{ pattern: 'cmd/#', direction: 'in', qos: 2, remotePrefix: 'site/' }] }])
      const v4sub = await connect(edge.mqttUrl, { clientId: 'local-v4-sub', protocolVersion: 4 })
      const v5sub = await connect5(edge.mqttUrl, { clientId: 'local-v5-sub' })
      await v4sub.subscribeAsync('cmd/#', { qos: 2 })
      await v5sub.subscribeAsync('cmd/#', { qos: 2 })
      const cloud = await connect5(up.url, { clientId: `cloud-pub-c${protocolVersion}` })
      // The bridge's upstream subscription is in place once a probe comes through (bounded).
      await untilArrives(v5sub, 'cmd/probe', async () => await cloud.publishAsync('site/cmd/probe', 'probe', { qos: 1 }))
      const trackers = [v4sub, v5sub].flatMap((c, i) => [
        new SeqTracker(c, (t) => t === 'cmd/q1', `${i === 0 ? 'v4' : 'v5'} QoS 1`),
        new SeqTracker(c, (t) => t === 'cmd/q2', `${i === 0 ? 'v4' : 'v5'} QoS 2`),
      ])
      const qos = new Map<string, number[]>()
      for (const [i, c] of [v4sub, v5sub].entries()) {
        c.on('message', (topic, _payload, packet) => { if (topic.startsWith('cmd/q')) qos.set(`${i}:${topic}`, [...(qos.get(`${i}:${topic}`) ?? []), packet.qos]) })
      }

      for (let i = 0; i < N; i++) {
        await cloud.publishAsync('site/cmd/q1', String(i), { qos: 1, properties: { userProperties: { n: String(i) } } })
        await cloud.publishAsync('site/cmd/q2', String(i), { qos: 2, properties: { userProperties: { n: String(i) } } })
      }
      for (const t of trackers) await t.all(0, N, 15_000)
      for (const [i, t] of trackers.entries()) {
        if (i % 2 === 1) expect(t.arrivals, `${t.label}: each once, in order`).toEqual(Array.from({ length: N }, (_, k) => k))
        else expect(outOfOrder(t.firsts), `${t.label}: first arrivals in order`).toEqual([])
      }
      for (const c of [0, 1]) {
        expect(new Set(qos.get(`${c}:cmd/q1`)), `subscriber ${c}: QoS of cmd/q1`).toEqual(new Set([1]))
        expect(new Set(qos.get(`${c}:cmd/q2`)), `subscriber ${c}: QoS of cmd/q2`).toEqual(new Set([2]))
      }
      await metricUntil(edge, 'ferrymq_bridge_forwarded_total', { bridge: 'cloud', direction: 'in' }, (v) => v >= 2 * N)
    }, 40_000)
  }

  // Inbound, the properties go to BridgeHost.publishLocal; QoS 2 ones wait for the PUBREL in
  // IncomingStore with the message.
  it('inbound over MQTT 5: the user properties and content type of a v5 publisher on Mosquitto reach a local v5 subscriber', async () => {
    up = await startMosquitto()
    edge = await startEdge([{ name: 'cloud', url: up.url, protocolVersion: 5, clientId: 'edge-mix-c-props', ...FAST, topics: [{ pattern: 'cmd/#', direction: 'in', qos: 2, remotePrefix: 'site/' }] }])
    const v5sub = await connect5(edge.mqttUrl, { clientId: 'local-v5-sub-props' })
    await v5sub.subscribeAsync('cmd/#', { qos: 2 })
    const cloud = await connect5(up.url, { clientId: 'cloud-pub-c-props' })
    await untilArrives(v5sub, 'cmd/probe', async () => await cloud.publishAsync('site/cmd/probe', 'probe', { qos: 1 }))
    const inbox = new Inbox(v5sub, (t) => t === 'cmd/props')
    await cloud.publishAsync('site/cmd/props', 'one', { qos: 1, properties: { userProperties: { from: 'cloud' }, contentType: 'text/plain' } })
    await cloud.publishAsync('site/cmd/props', 'two', { qos: 2, properties: { userProperties: { from: 'cloud' }, contentType: 'text/plain' } })
    const messages = await inbox.count(2)
    for (const m of messages) {
      expect({ user: m.properties?.userProperties, contentType: m.properties?.contentType }, `${m.payload.toString()} (QoS ${m.qos}): ${JSON.stringify(m.properties)}`)
        .toEqual({ user: { from: 'cloud' }, contentType: 'text/plain' })
    }
  }, 30_000)

  it('inbound over MQTT 5: a message\'s expiry interval goes with it, to a live local subscriber and into an offline session\'s queue (the remaining interval is sent), with its other properties', async () => {
    up = await startMosquitto()
    edge = await startEdge([{ name: 'cloud', url: up.url, protocolVersion: 5, clientId: 'edge-mix-c-exp', ...FAST, topics: [{ pattern: 'cmd/#', direction: 'in', qos: 2, remotePrefix: 'site/' }] }])
    const session = { clientId: 'local-v5-exp-queued', clean: false, properties: { sessionExpiryInterval: 600 } }
    const live = await connect5(edge.mqttUrl, { clientId: 'local-v5-exp-live' })
    let queued = await connect5(edge.mqttUrl, session)
    await live.subscribeAsync('cmd/#', { qos: 2 })
    await queued.subscribeAsync('cmd/#', { qos: 2 })
    const cloud = await connect5(up.url, { clientId: 'cloud-pub-c-exp' })
    await untilArrives(live, 'cmd/probe', async () => await cloud.publishAsync('site/cmd/probe', 'probe', { qos: 1 }))
    await untilArrives(queued, 'cmd/probe', async () => await cloud.publishAsync('site/cmd/probe', 'probe', { qos: 1 }))
    await queued.endAsync()
    const liveInbox = new Inbox(live, (t) => t === 'cmd/exp')
    const before = await metric(edge, 'ferrymq_bridge_forwarded_total', { bridge: 'cloud', direction: 'in' }) ?? 0
    const props = { messageExpiryInterval: 600, userProperties: { k: ['1', '2'] }, correlationData: Buffer.from([1, 2, 3]), responseTopic: 'site/reply/x' }
    await cloud.publishAsync('site/cmd/exp', 'one', { qos: 1, properties: props })
    await cloud.publishAsync('site/cmd/exp', 'two', { qos: 2, properties: props })
    // Both are stored locally (the offline session's queue included) once counted as forwarded in.
    await metricUntil(edge, 'ferrymq_bridge_forwarded_total', { bridge: 'cloud', direction: 'in' }, (v) => v >= before + 2)
    queued = await connect5(edge.mqttUrl, session)
    const queuedInbox = new Inbox(queued, (t) => t === 'cmd/exp')
    for (const [label, inbox] of [['live', liveInbox], ['queued', queuedInbox]] as const) {
      // Once in about five CI runs one inbox had only "one" after 10 s (which one was not recorded):
      // the label now says, and the wait is 20 s, to tell a slow QoS 2 exchange from a lost message.
      const messages = await inbox.count(2, 20_000).catch((err: Error) => { throw new Error(`${label}: ${err.message}`) })
      expect(messages.map((m) => [m.payload.toString(), m.qos]), label).toEqual([['one', 1], ['two', 2]])
      for (const m of messages) {
        const what = `${label} ${m.payload.toString()}: ${JSON.stringify(m.properties)}`
        expect(m.properties?.messageExpiryInterval, what).toBeGreaterThan(0)
        expect(m.properties?.messageExpiryInterval, what).toBeLessThanOrEqual(600)
        expect({ user: m.properties?.userProperties, correlationData: m.properties?.correlationData, responseTopic: m.properties?.responseTopic }, what)
          .toEqual({ user: { k: ['1', '2'] }, correlationData: Buffer.from([1, 2, 3]), responseTopic: 'site/reply/x' })
      }
    }
  }, 60_000)
})

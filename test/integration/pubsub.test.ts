import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { collect, connackOf, connect, endAllClients } from '../helpers/clients.js'
import { RawClient } from '../helpers/raw.js'
import { startBroker, type TestBroker } from '../helpers/broker.js'

let b: TestBroker
beforeAll(async () => { b = await startBroker() })
afterAll(async () => { await b.close() })
afterEach(async () => { await endAllClients() })

describe.each([
  ['TCP', () => b.mqttUrl],
  ['WebSocket', () => b.wsUrl],
])('publish and subscribe over %s', (_name, url) => {
  it.each([0, 1, 2] as const)('a QoS %i message reaches a subscriber at the QoS it was published with', async (qos) => {
    const sub = await connect(url())
    await sub.subscribeAsync(`q/${qos}`, { qos: 2 })
    const pub = await connect(url())
    const got = collect(sub, 1)
    await pub.publishAsync(`q/${qos}`, `m${qos}`, { qos })
    expect(await got).toEqual([{ topic: `q/${qos}`, payload: `m${qos}`, qos, retain: false, dup: false }])
  })
})

it('a message published over WebSocket reaches a TCP subscriber and the other way round', async () => {
  const tcp = await connect(b.mqttUrl)
  const ws = await connect(b.wsUrl)
  await tcp.subscribeAsync('cross/from-ws', { qos: 1 })
  await ws.subscribeAsync('cross/from-tcp', { qos: 1 })
  const atTcp = collect(tcp, 1)
  const atWs = collect(ws, 1)
  await ws.publishAsync('cross/from-ws', 'hello tcp', { qos: 1 })
  await tcp.publishAsync('cross/from-tcp', 'hello ws', { qos: 1 })
  expect((await atTcp)[0]?.payload).toBe('hello tcp')
  expect((await atWs)[0]?.payload).toBe('hello ws')
})

it('the subscription QoS caps the delivery QoS', async () => {
  const sub = await connect(b.mqttUrl)
  await sub.subscribeAsync('cap/#', { qos: 1 })
  const pub = await connect(b.mqttUrl)
  const got = collect(sub, 1)
  await pub.publishAsync('cap/x', 'two', { qos: 2 })
  expect((await got)[0]?.qos).toBe(1)
})

it('a retained message is delivered to a later subscriber with the retain flag, and an empty one clears it', async () => {
  const pub = await connect(b.mqttUrl)
  await pub.publishAsync('retained/a', 'kept', { qos: 1, retain: true })
  const first = await connect(b.mqttUrl)
  const got = collect(first, 1)
  await first.subscribeAsync('retained/#', { qos: 1 })
  expect(await got).toEqual([{ topic: 'retained/a', payload: 'kept', qos: 1, retain: true, dup: false }])

  await pub.publishAsync('retained/a', '', { qos: 1, retain: true })
  const second = await connect(b.mqttUrl)
  const marker = collect(second, 1)
  await second.subscribeAsync('retained/#', { qos: 1 })
  await pub.publishAsync('retained/marker', 'live', { qos: 1 })
  // The first message the new subscriber sees is the live marker: the retained one is gone.
  expect((await marker)[0]).toMatchObject({ topic: 'retained/marker', retain: false })
})

it('the will is published when a client vanishes without DISCONNECT, and not after a clean DISCONNECT', async () => {
  const watcher = await connect(b.mqttUrl)
  await watcher.subscribeAsync('wills/#', { qos: 1 })
  const got = collect(watcher, 1)

  const polite = await connect(b.mqttUrl, { will: { topic: 'wills/polite', payload: Buffer.from('gone'), qos: 1, retain: false } })
  await polite.endAsync()
  const rude = await connect(b.mqttUrl, { will: { topic: 'wills/rude', payload: Buffer.from('lost'), qos: 1, retain: false } })
  rude.stream.destroy()
  expect(await got).toEqual([{ topic: 'wills/rude', payload: 'lost', qos: 1, retain: false, dup: false }])
})

it('a persistent session keeps its subscriptions and receives what was published while it was away', async () => {
  const options = { clientId: 'persistent-1', clean: false }
  const first = await connect(b.mqttUrl, options)
  await first.subscribeAsync('away/+', { qos: 1 })
  await first.endAsync()

  const pub = await connect(b.mqttUrl)
  await pub.publishAsync('away/1', 'while-away-1', { qos: 1 })
  await pub.publishAsync('away/2', 'while-away-2', { qos: 1 })

  const again = await connect(b.mqttUrl, { ...options, manualConnect: false })
  const got = collect(again, 2)
  expect(again.connected).toBe(true)
  expect((await got).map((m) => m.payload)).toEqual(['while-away-1', 'while-away-2'])
})

it('a clean session starts without the old subscriptions', async () => {
  const first = await connect(b.mqttUrl, { clientId: 'clean-1', clean: false })
  await first.subscribeAsync('clean/x', { qos: 1 })
  await first.endAsync()
  const resumed = await connect(b.mqttUrl, { clientId: 'clean-1', clean: false })
  expect(connackOf(resumed).sessionPresent).toBe(true)
  await resumed.endAsync()
  const fresh = await connect(b.mqttUrl, { clientId: 'clean-1', clean: true })
  expect(connackOf(fresh).sessionPresent).toBe(false)
  const pub = await connect(b.mqttUrl)
  const seen: string[] = []
  fresh.on('message', (topic) => seen.push(topic))
  await fresh.subscribeAsync('clean/marker')
  const marker = collect(fresh, 1, 5000, (t) => t === 'clean/marker')
  await pub.publishAsync('clean/x', 'old subscription', { qos: 1 })
  await pub.publishAsync('clean/marker', 'after', { qos: 1 })
  await marker
  expect(seen).toEqual(['clean/marker'])
})

it('an MQTT 3.1 (MQIsdp) client publishes and subscribes', async () => {
  const old = await connect(b.mqttUrl, { protocolId: 'MQIsdp', protocolVersion: 3, clientId: 'old-311' })
  await old.subscribeAsync('v31/t', { qos: 1 })
  const got = collect(old, 1)
  await old.publishAsync('v31/t', 'three-one', { qos: 1 })
  expect((await got)[0]?.payload).toBe('three-one')
})

it('a client that goes silent past 1.5 × its keepalive is disconnected and its will published', async () => {
  const watcher = await connect(b.mqttUrl)
  await watcher.subscribeAsync('ka/will', { qos: 0 })
  const got = collect(watcher, 1, 6000)
  const silent = await RawClient.open(b.port('mqtt'))
  silent.sendConnect({ clientId: 'silent', keepalive: 1, will: { topic: 'ka/will', payload: Buffer.from('timed out'), qos: 0, retain: false } })
  await silent.next('connack')
  await silent.waitClosed(5000)
  expect((await got)[0]?.payload).toBe('timed out')
})

describe('$SYS', () => {
  it('announces client connections and disconnections on $SYS/<broker>/new/clients and disconnect/clients', async () => {
    const watcher = await connect(b.mqttUrl)
    await watcher.subscribeAsync(['$SYS/+/new/clients', '$SYS/+/disconnect/clients'])
    const got = collect(watcher, 2, 5000, (t) => t.includes('/clients'))
    const c = await connect(b.mqttUrl, { clientId: 'sys-watched' })
    await c.endAsync()
    const events = (await got).map((m) => [m.topic.split('/').slice(2).join('/'), m.payload])
    expect(events).toEqual([['new/clients', 'sys-watched'], ['disconnect/clients', 'sys-watched']])
  })

  it('beats $SYS/<broker>/heartbeat every sys.heartbeatSeconds', async () => {
    const beating = await startBroker({ sys: { heartbeatSeconds: 1 } })
    try {
      const watcher = await connect(beating.mqttUrl)
      await watcher.subscribeAsync('$SYS/+/heartbeat')
      const beats = await collect(watcher, 2, 4000)
      expect(beats.map((m) => m.topic)).toEqual([`$SYS/${beats[0]?.payload}/heartbeat`, `$SYS/${beats[0]?.payload}/heartbeat`])
    } finally {
      await endAllClients()
      await beating.close()
    }
  })

  it('publishes broker statistics under $SYS/broker/ and keeps them from # subscribers', async () => {
    const fast = await startBroker({ sys: { intervalSeconds: 1 } })
    try {
      const all = await connect(fast.mqttUrl)
      const leaked: string[] = []
      all.on('message', (topic) => leaked.push(topic))
      await all.subscribeAsync('#')
      const watcher = await connect(fast.mqttUrl)
      await watcher.subscribeAsync('$SYS/broker/#')
      const stats = await collect(watcher, 8, 4000)
      const byTopic = Object.fromEntries(stats.map((m) => [m.topic, m.payload]))
      expect(byTopic['$SYS/broker/version']).toMatch(/^FerryMQ \d+\.\d+\.\d+/)
      expect(Number(byTopic['$SYS/broker/clients/connected'])).toBe(2)
      expect(leaked.filter((t) => t.startsWith('$'))).toEqual([])
    } finally {
      await endAllClients()
      await fast.close()
    }
  })
})

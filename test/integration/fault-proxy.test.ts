import { afterEach, describe, expect, it } from 'vitest'
import { startBroker, type TestBroker } from '../helpers/broker.js'
import { collect, connect, endAllClients, eventually, withTimeout } from '../helpers/clients.js'
import { FaultProxy } from '../helpers/fault-proxy.js'

// The TCP proxy the partition tests (bridge, fleet simulator) stand on: proven against a real broker.

let broker: TestBroker | null = null
let proxy: FaultProxy | null = null
afterEach(async () => {
  await endAllClients()
  await proxy?.close()
  await broker?.close()
  proxy = null
  broker = null
})

describe('FaultProxy', () => {
  it('forwards MQTT both ways, then a reset cut closes the connection and refuses new ones until restored', async () => {
    broker = await startBroker()
    proxy = await FaultProxy.start({ port: broker.port('mqtt') })
    const url = `mqtt://127.0.0.1:${proxy.port}`
    const client = await connect(url, { clientId: 'via-proxy' })
    await client.subscribeAsync('p/t', { qos: 1 })
    const got = collect(client, 1)
    await client.publishAsync('p/t', 'through', { qos: 1 })
    expect((await got)[0]?.payload).toBe('through')
    expect(proxy.bytesUp).toBeGreaterThan(0)
    expect(proxy.bytesDown).toBeGreaterThan(0)

    // (events.once would reject on the 'error' MQTT.js emits first: ECONNRESET.)
    const closed = new Promise<void>((resolve) => client.once('close', () => resolve()))
    proxy.cut('reset')
    await closed
    await expect(connect(url, { clientId: 'refused' }, 2000)).rejects.toThrow()

    proxy.restore()
    const again = await connect(url, { clientId: 'via-proxy-2' })
    await again.publishAsync('p/t', 'after', { qos: 1 })
  })

  it('a blackhole cut carries nothing until restored; the same connection then carries on', async () => {
    broker = await startBroker()
    proxy = await FaultProxy.start({ port: broker.port('mqtt') })
    const p = proxy
    const url = `mqtt://127.0.0.1:${p.port}`
    const sub = await connect(broker.mqttUrl, { clientId: 'direct-sub' })
    await sub.subscribeAsync('b/t', { qos: 1 })
    const pub = await connect(url, { clientId: 'holed', keepalive: 0 })
    p.cut('blackhole')
    let acked = false
    const publish = pub.publishAsync('b/t', 'held', { qos: 1 }).then(() => { acked = true })
    // Nothing gets through while the link is cut: a probe through the broker directly arrives,
    // the held message does not.
    const probe = collect(sub, 1)
    const direct = await connect(broker.mqttUrl, { clientId: 'direct-pub' })
    await direct.publishAsync('b/t', 'probe', { qos: 1 })
    expect((await probe)[0]?.payload).toBe('probe')
    expect(acked).toBe(false)

    const held = collect(sub, 1)
    p.restore()
    await withTimeout(publish, 5000, 'the held publish once restored')
    expect((await held)[0]?.payload).toBe('held')
    await eventually(() => p.connections === 1, 2000, 'one forwarded connection')
  })

  it('delays every chunk by the set latency, in order', async () => {
    broker = await startBroker()
    proxy = await FaultProxy.start({ port: broker.port('mqtt') })
    const client = await connect(`mqtt://127.0.0.1:${proxy.port}`, { clientId: 'slow' })
    await client.subscribeAsync('d/t', { qos: 1 })
    proxy.delay(150)
    const got = collect(client, 5)
    const started = performance.now()
    for (let i = 0; i < 5; i++) client.publish('d/t', String(i), { qos: 1 })
    const messages = await got
    // Up and down again: at least two delays.
    expect(performance.now() - started).toBeGreaterThanOrEqual(290)
    expect(messages.map((m) => m.payload)).toEqual(['0', '1', '2', '3', '4'])
  })
})

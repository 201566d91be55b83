/**
 * MQTT 5 Maximum Packet Size: CONNACK advertises limits.maxPacketSize, and a client that sends a
 * larger packet is told so with DISCONNECT 0x95 before the connection closes (3.1.1 has no reason
 * code: its connection is just closed). Other clients are unaffected. A client's own Maximum
 * Packet Size is honoured: what would not fit is not sent to it [MQTT-3.1.2-24/25].
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startBroker, type TestBroker } from '../helpers/broker.js'
import { collect, connackOf, connect, endAllClients, withTimeout } from '../helpers/clients.js'
import { scrapeMetric } from '../helpers/metrics.js'

let b: TestBroker
beforeAll(async () => { b = await startBroker({ limits: { maxPacketSize: 4096 } }) })
afterAll(async () => {
  await endAllClients()
  await b.close()
})

describe('maximum packet size', () => {
  it('an MQTT 5 client that sends a PUBLISH over limits.maxPacketSize gets DISCONNECT 0x95, and others go on', async () => {
    const bystander = await connect(b.mqttUrl, { clientId: 'size-bystander', protocolVersion: 5 })
    await bystander.subscribeAsync('size/#', { qos: 1 })
    const big = await connect(b.mqttUrl, { clientId: 'size-big', protocolVersion: 5, reconnectPeriod: 0 })
    const told = new Promise<number | undefined>((resolve) => big.once('disconnect', (packet) => resolve(packet.reasonCode)))
    const closed = new Promise<void>((resolve) => big.once('close', () => resolve()))
    big.publish('size/big', Buffer.alloc(8000, 1), { qos: 1 })
    expect(await withTimeout(told, 5000, 'DISCONNECT from the broker')).toBe(0x95)
    await withTimeout(closed, 5000, 'the connection to close')

    const got = collect(bystander, 1)
    const pub = await connect(b.mqttUrl, { clientId: 'size-pub', protocolVersion: 5 })
    await pub.publishAsync('size/small', 'fits', { qos: 1 })
    expect((await got)[0]?.payload).toBe('fits')
  })

  it('a 3.1.1 client that does the same is disconnected without a DISCONNECT (3.1.1 has none from the server)', async () => {
    const big = await connect(b.mqttUrl, { clientId: 'size-big-v4', reconnectPeriod: 0 })
    let told = false
    big.once('disconnect', () => { told = true })
    const closed = new Promise<void>((resolve) => big.once('close', () => resolve()))
    big.publish('size/big', Buffer.alloc(8000, 1), { qos: 1 })
    await withTimeout(closed, 5000, 'the connection to close')
    expect(told).toBe(false)
  })

  it("a message larger than the client's own Maximum Packet Size is not sent to it (live or queued); it stays connected and gets the rest", async () => {
    const session = { clientId: 'size-small-client', protocolVersion: 5 as const, clean: false, properties: { sessionExpiryInterval: 60, maximumPacketSize: 200 } }
    const small = await connect(b.mqttUrl, session)
    await small.subscribeAsync('fit/#', { qos: 1 })
    const pub = await connect(b.mqttUrl, { clientId: 'size-fit-pub', protocolVersion: 5 })
    const got = collect(small, 2)
    await pub.publishAsync('fit/a', 'small 1', { qos: 1 })
    await pub.publishAsync('fit/a', Buffer.alloc(300, 1), { qos: 1 })
    await pub.publishAsync('fit/a', 'small 2', { qos: 1 })
    expect((await got).map((m) => m.payload)).toEqual(['small 1', 'small 2'])
    expect(small.connected).toBe(true)

    // Queued while away: the large one is discarded at delivery too, nothing is left queued.
    await small.endAsync()
    await pub.publishAsync('fit/a', Buffer.alloc(300, 2), { qos: 1 })
    await pub.publishAsync('fit/a', 'small 3', { qos: 1 })
    const back = await connect(b.mqttUrl, session)
    expect(connackOf(back).sessionPresent).toBe(true)
    expect((await collect(back, 1)).map((m) => m.payload)).toEqual(['small 3'])
    expect(await scrapeMetric(b.httpUrl, 'ferrymq_messages_dropped_total{reason="too_large_for_client"}')).toBe(2)
  })
})

/**
 * MQTT 5 Maximum Packet Size: CONNACK advertises limits.maxPacketSize, and a client that sends a
 * larger packet is told so with DISCONNECT 0x95 before the connection closes (3.1.1 has no reason
 * code: its connection is just closed). Other clients are unaffected.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startBroker, type TestBroker } from '../helpers/broker.js'
import { collect, connect, endAllClients, withTimeout } from '../helpers/clients.js'

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
})

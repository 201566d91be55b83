/**
 * One delivery per message per client, and no acknowledged message taken for a copy. aedes' own
 * dedupe dropped a QoS 1 message overtaken by a later QoS 0 one (the QoS 1 message's queue copy for
 * a persistent session was still being written): found by firmware-sim; see src/broker/dedupe.ts.
 */
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, afterEach, describe, expect, it } from 'vitest'
import { startBroker, type TestBroker } from '../helpers/broker.js'
import { connect, endAllClients, eventually } from '../helpers/clients.js'

const dirs: string[] = []
let b: TestBroker | undefined
afterEach(async () => {
  await endAllClients()
  await b?.close()
  b = undefined
})
afterAll(() => { for (const d of dirs) rmSync(d, { recursive: true, force: true }) })

describe.each([4, 5] as const)('MQTT version %i', (protocolVersion) => {
  it('publishers mixing QoS 0 and QoS 1: every acknowledged QoS 1 message reaches a persistent subscriber (durability os)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'ferrymq-dedupe-'))
    dirs.push(dir)
    const broker = await startBroker({ storage: { durability: 'os', dir } })
    b = broker
    const session = protocolVersion === 5 ? { protocolVersion, properties: { sessionExpiryInterval: 600 } } : {}
    const sub = await connect(broker.mqttUrl, { clientId: `dd-sub-${protocolVersion}`, clean: false, ...session })
    const got = new Set<string>()
    sub.on('message', (_topic, payload) => got.add(payload.toString()))
    await sub.subscribeAsync('dd/#', { qos: 1 })
    const acked: string[] = []
    await Promise.all([0, 1, 2, 3].map(async (p) => {
      const pub = await connect(broker.mqttUrl, { clientId: `dd-pub-${protocolVersion}-${p}`, clean: false, protocolVersion })
      const pending: Array<Promise<void>> = []
      for (let i = 0; i < 400; i++) {
        const qos = i % 5 === 0 ? 0 : 1
        const payload = `${qos}:${p}:${i}`
        const sent = pub.publishAsync(`dd/${p}`, payload, { qos }).then(() => { if (qos === 1) acked.push(payload) })
        pending.push(sent)
        if (i % 50 === 49) await Promise.all(pending.splice(0))
      }
      await Promise.all(pending)
    }))
    expect(acked.length).toBe(4 * 320)
    await eventually(() => acked.every((m) => got.has(m)), 10_000, 'every acknowledged QoS 1 message').catch(() => {
      throw new Error(`${acked.filter((m) => !got.has(m)).length} of ${acked.length} acknowledged QoS 1 messages never arrived`)
    })
  })

  it('overlapping subscriptions: a message is delivered once', async () => {
    b = await startBroker()
    const sub = await connect(b.mqttUrl, { clientId: `ov-sub-${protocolVersion}`, protocolVersion })
    const got: string[] = []
    sub.on('message', (_topic, payload) => got.push(payload.toString()))
    await sub.subscribeAsync(['ov/#', 'ov/+', 'ov/a'], { qos: 1 })
    const pub = await connect(b.mqttUrl, { clientId: `ov-pub-${protocolVersion}`, protocolVersion })
    for (let i = 0; i < 20; i++) await pub.publishAsync('ov/a', String(i), { qos: (i % 3) as 0 | 1 | 2 })
    await pub.publishAsync('ov/b', 'marker', { qos: 1 })
    await eventually(() => got.includes('marker'), 5000, 'the marker')
    // Each exactly once (order across QoS levels is not promised).
    expect([...got].sort()).toEqual([...Array.from({ length: 20 }, (_, i) => String(i)), 'marker'].sort())
  })
})

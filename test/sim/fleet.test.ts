import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { runSimulation, type SimulationOptions } from '../../firmware-sim/src/run.js'
import { startBroker, type TestBroker } from '../helpers/broker.js'

/** Real FerryMQ in-process, real sockets: the fleet, the verifier and fault injection end to end. */

let broker: TestBroker
beforeAll(async () => { broker = await startBroker() })
afterAll(async () => { await broker.close() })

function options (over: Partial<SimulationOptions>): SimulationOptions {
  return {
    devices: 50,
    url: broker.mqttUrl,
    protocol: 5,
    idPrefix: `t${Math.random().toString(36).slice(2, 6)}-`,
    profileMix: { sensor: 100 },
    qosMix: [0, 1, 0],
    rate: 5,
    chattyFactor: 10,
    jitter: 0.2,
    sleepyBurst: 3,
    sleepSeconds: 0.5,
    payloadSize: 0,
    bufferSize: 1000,
    backoff: { baseMs: 100, maxMs: 2000 },
    keepaliveSeconds: 30,
    sessionExpirySeconds: 60,
    connectTimeoutMs: 5000,
    rampPerSecond: 200,
    durationMs: 3000,
    verify: { url: broker.mqttUrl, topic: 'devices/+/telemetry', qos: 1 },
    graceMs: 10_000,
    ...over,
  }
}

describe('fleet against FerryMQ', () => {
  it('50 devices with every profile and a QoS mix: the verifier sees no loss', async () => {
    const s = await runSimulation(options({
      profileMix: { sensor: 60, actuator: 20, chatty: 10, sleepy: 10 },
      qosMix: [20, 60, 20],
      commandsPerSecond: 5,
      payloadSize: 256,
    }))
    expect(s.ok).toBe(true)
    expect(s.drained && s.settled).toBe(true)
    expect(s.totals.sent).toBeGreaterThan(500)
    expect(s.totals.acked).toBeGreaterThan(300)
    expect(s.totals.lost).toBe(0)
    expect(s.totals.unacked).toBe(0)
    expect(s.totals.duplicatedQos2).toBe(0)
    expect(s.totals.outOfOrder).toBe(0)
    // Without faults nothing is lost on loopback, QoS 0 included.
    expect(s.totals.received).toBe(s.totals.sent)
    expect(s.latencyMs.count).toBe(s.totals.received)
    expect(s.commands.sent).toBeGreaterThan(0)
    expect(s.commands.answered).toBe(s.commands.sent)
    // Sleepy devices connected more than once.
    expect(s.connects).toBeGreaterThan(50)
  })

  it('20 % of the connections dropped twice mid-run: buffers flushed, no acknowledged QoS 1 message lost', async () => {
    const s = await runSimulation(options({
      rate: 10,
      durationMs: 4000,
      // Reconnects take 300–600 ms: messages produced meanwhile go through the offline buffer.
      backoff: { baseMs: 600, maxMs: 600 },
      faults: { dropPercent: 20, dropAtMs: 1500, dropEveryMs: 1500 },
    }))
    expect(s.faultDrops).toBeGreaterThanOrEqual(15)
    expect(s.disconnects).toBeGreaterThanOrEqual(s.faultDrops)
    expect(s.bufferedTotal).toBeGreaterThan(0)
    expect(s.totals.droppedFromBuffer).toBe(0)
    expect(s.drained).toBe(true)
    expect(s.totals.unacked).toBe(0)
    expect(s.totals.acked).toBe(s.totals.produced)
    expect(s.totals.lost).toBe(0)
    expect(s.ok).toBe(true)
    expect(s.totals.outOfOrder).toBe(0)
  })

  it('a reconnect storm on MQTT 3.1.1 with QoS 2: no loss, no QoS 2 duplicate', async () => {
    const s = await runSimulation(options({
      protocol: 4,
      qosMix: [0, 0, 1],
      durationMs: 2500,
      backoff: { baseMs: 300, maxMs: 1000 },
      faults: { dropPercent: 0, stormAtMs: 1200 },
      // The verifier subscribes at QoS 1: with durability memory a QoS 2 subscription on a
      // persistent session loses messages (see the QoS 2 test below).
      verify: { url: broker.wsUrl, topic: 'devices/+/telemetry', qos: 1 },
    }))
    expect(s.faultDrops).toBe(50)
    expect(s.totals.lost).toBe(0)
    expect(s.totals.unacked).toBe(0)
    expect(s.ok).toBe(true)
  })

  // Found by this simulator: QoS 2 publish → QoS 2 subscription on a persistent session loses
  // about 0.3 % of acknowledged messages with durability memory (aedes' own in-memory store; the
  // same with aedes 1.2.0, so not a regression; not yet fixed, see firmware-sim/README.md). With
  // FerryMQ's store (os here) nothing is lost: that is what this test holds.
  it('QoS 2 end to end with a persistent verifier session: no loss (durability os)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'ferrymq-sim-q2-'))
    const stored = await startBroker({ storage: { durability: 'os', dir } })
    try {
      const s = await runSimulation(options({ url: stored.mqttUrl, qosMix: [0, 0, 1], durationMs: 2500, verify: { url: stored.mqttUrl, topic: 'devices/+/telemetry', qos: 2 } }))
      expect(s.totals.lost).toBe(0)
      expect(s.totals.duplicatedQos2).toBe(0)
    } finally {
      await stored.close()
      rmSync(dir, { recursive: true, force: true })
    }
  })
})

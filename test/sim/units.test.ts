import { describe, expect, it } from 'vitest'
import { backoffCeiling, backoffDelay } from '../../firmware-sim/src/backoff.js'
import { OfflineBuffer, pickQos } from '../../firmware-sim/src/device.js'
import { assignProfiles } from '../../firmware-sim/src/fleet.js'
import { Ledger } from '../../firmware-sim/src/ledger.js'
import { parseArgs, UsageError } from '../../firmware-sim/src/options.js'
import { decodeTelemetry, decodeTelemetryFast, encodeTelemetry, PayloadError, readings } from '../../firmware-sim/src/payload.js'

describe('payload', () => {
  const msg = { run: 'r1', d: 'sim-7', s: 42, t: 1_764_000_000_000, q: 1 as const, r: readings(42) }

  it('round-trips', () => {
    expect(decodeTelemetry(encodeTelemetry(msg))).toEqual(msg)
    expect(decodeTelemetryFast(encodeTelemetry(msg))).toEqual(msg)
  })

  it('pads to exactly the configured size and still decodes', () => {
    for (const size of [200, 512, 4096]) {
      const buf = encodeTelemetry(msg, size)
      expect(buf.length).toBe(size)
      const back = decodeTelemetry(buf)
      expect({ ...back, p: undefined }).toEqual({ ...msg, p: undefined })
    }
    // Never truncated below the natural size.
    expect(encodeTelemetry(msg, 10).length).toBe(encodeTelemetry(msg).length)
  })

  it('rejects what is not telemetry', () => {
    expect(() => decodeTelemetry('nope')).toThrow(PayloadError)
    expect(() => decodeTelemetry(JSON.stringify({ ...msg, s: 0 }))).toThrow(/s/)
    expect(() => decodeTelemetry(JSON.stringify({ ...msg, q: 3 }))).toThrow(PayloadError)
    expect(() => decodeTelemetry(JSON.stringify({ ...msg, extra: 1 }))).toThrow(PayloadError)
    expect(decodeTelemetryFast(Buffer.from('{"d":1}'))).toBeUndefined()
  })
})

describe('backoff', () => {
  const o = { baseMs: 100, maxMs: 5000 }

  it('doubles up to the cap', () => {
    expect([0, 1, 2, 3, 5, 6, 100].map((a) => backoffCeiling(a, o))).toEqual([100, 200, 400, 800, 3200, 5000, 5000])
  })

  it('draws a full-jitter delay in [0, ceiling)', () => {
    expect(backoffDelay(3, o, () => 0)).toBe(0)
    expect(backoffDelay(3, o, () => 0.5)).toBe(400)
    expect(backoffDelay(3, o, () => 0.999_999)).toBe(799)
    for (let i = 0; i < 1000; i++) {
      const d = backoffDelay(i % 12, o)
      expect(d).toBeGreaterThanOrEqual(0)
      expect(d).toBeLessThan(backoffCeiling(i % 12, o))
    }
  })
})

describe('device helpers', () => {
  it('the offline buffer keeps order and drops the oldest when full', () => {
    const b = new OfflineBuffer<number>(3)
    expect([1, 2, 3].map((x) => b.push(x))).toEqual([undefined, undefined, undefined])
    expect(b.push(4)).toBe(1)
    expect([b.shift(), b.shift(), b.shift(), b.shift()]).toEqual([2, 3, 4, undefined])
    expect(new OfflineBuffer<number>(0).push(9)).toBe(9)
  })

  it('picks QoS by weight and spreads profiles', () => {
    expect(pickQos([20, 70, 10], 0.1)).toBe(0)
    expect(pickQos([20, 70, 10], 0.5)).toBe(1)
    expect(pickQos([20, 70, 10], 0.95)).toBe(2)
    expect(pickQos([0, 1, 0], 0)).toBe(1)
    const p = assignProfiles(100, { sensor: 70, actuator: 10, chatty: 10, sleepy: 10 })
    expect(p.filter((x) => x === 'sensor')).toHaveLength(70)
    expect(p.filter((x) => x === 'sleepy')).toHaveLength(10)
    expect(p.slice(0, 10)).toContain('actuator')
  })
})

describe('ledger', () => {
  it('counts lost, duplicated, out of order (per QoS) and QoS 0 not received', () => {
    const l = new Ledger('r').device('d')
    const qos = [1, 1, 2, 0, 1, 0] as const
    qos.forEach((q, i) => { l.produce(i + 1, q); l.markSent(i + 1) })
    for (const s of [1, 2, 3, 5]) l.markAcked(s)
    expect(l.awaiting).toBe(4)
    for (const s of [2, 1, 1, 3, 6]) l.receive(s)
    expect(l.receive(99)).toBe(false)
    expect(l.received).toBe(4)
    expect(l.duplicates).toBe(1)
    expect(l.outOfOrder).toBe(1)
    expect(l.lost()).toEqual([5])
    expect(l.lostCount()).toBe(1)
    expect(l.qos0NotReceived()).toBe(1)
  })
})

describe('flags', () => {
  it('has defaults and parses mixes', () => {
    const c = parseArgs(['--qos-mix', '0:20,1:70,2:10', '--profile-mix=sensor:3,sleepy:1', '--protocol', '4'])
    expect(c.sim.devices).toBe(100)
    expect(c.sim.qosMix).toEqual([20, 70, 10])
    expect(c.sim.profileMix).toEqual({ sensor: 3, sleepy: 1 })
    expect(c.sim.protocol).toBe(4)
    expect(c.sim.durationMs).toBe(30_000)
    expect(c.sim.verify).toMatchObject({ url: 'mqtt://127.0.0.1:1883', topic: 'devices/+/telemetry', qos: 1 })
    expect(parseArgs(['--messages', '10']).sim.durationMs).toBeUndefined()
  })

  it.each([
    [['--devices', '0'], /--devices: expected a device count/],
    [['--devices', 'ten'], /--devices/],
    [['--broker', 'http://x'], /--broker/],
    [['--qos', '3'], /--qos/],
    [['--qos', '1', '--qos-mix', '1:1'], /--qos-mix/],
    [['--qos-mix', '1:x'], /--qos-mix/],
    [['--profile-mix', 'robot:1'], /--profile-mix/],
    [['--protocol', '3'], /--protocol/],
    [['--bogus'], /unknown flag --bogus/],
    [['--rate'], /--rate needs a value/],
    [['--drop-every', '5'], /--drop-percent/],
    [['stray'], /unexpected argument/],
  ])('rejects %j', (argv, message) => {
    expect(() => parseArgs(argv)).toThrow(UsageError)
    expect(() => parseArgs(argv)).toThrow(message)
  })
})

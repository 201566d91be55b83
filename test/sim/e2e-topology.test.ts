import type { MqttClient } from 'mqtt'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { hasMosquitto, startTopology, type Topology } from '../../firmware-sim/src/e2e/topology.js'
import { runScenario, type ScenarioEvent, type ScenarioPlan } from '../../firmware-sim/src/e2e/scenario.js'
import { connect, endAllClients, withTimeout } from '../helpers/clients.js'

/*
 * The end-to-end topology of issue 7 (point 6) with plain MQTT.js clients, no simulator:
 * publishers on FerryMQ (a child process, fsync store) → its bridge → a TCP proxy that the
 * scenario cuts → Mosquitto, where a persistent subscriber records what arrives. The scenario cuts
 * the uplink (reset, then black hole), kills FerryMQ with SIGKILL while its outbox holds messages
 * and again with the link up, and restarts it on the same data dir; the publishers reconnect with
 * clean: false.
 *
 * Every message a publisher got acknowledged (PUBACK; PUBCOMP for QoS 2) must reach the cloud:
 * QoS 1 at least once with first arrivals in publish order, QoS 2 exactly once and in order.
 * The timeline uses timers for when to act; everything else waits for events or conditions.
 */

const MOSQUITTO_MISSING = hasMosquitto() ? '' : ' (skipped: the mosquitto binary is not installed; apt-get install mosquitto, or set MOSQUITTO_BIN)'

/** Publishes `n` = 1, 2, 3, … on `topic` with at most `window` unacknowledged, every `intervalMs`, until stopped. */
class NumberedPublisher {
  /** Numbers acknowledged, in acknowledgement order, and when (performance.now()). */
  readonly acked: number[] = []
  readonly ackedAt = new Map<number, number>()
  sent = 0
  inflight = 0
  #timer: NodeJS.Timeout | undefined
  #idle: Array<() => void> = []

  constructor (readonly client: MqttClient, readonly topic: string, readonly qos: 1 | 2, readonly window = 10, intervalMs = 10) {
    this.#timer = setInterval(() => this.#tick(), intervalMs)
  }

  /** One message per tick (a steady rate, not bursts) while fewer than `window` are unacknowledged. */
  #tick (): void {
    // Publishing while disconnected is fine: MQTT.js keeps QoS 1/2 packets in its store and sends
    // them after the reconnect; the window bounds how many wait.
    if (this.inflight >= this.window) return
    const n = ++this.sent
    this.inflight++
    this.client.publish(this.topic, String(n), { qos: this.qos }, (err) => {
      this.inflight--
      if (err === undefined || err === null) {
        this.acked.push(n)
        this.ackedAt.set(n, performance.now())
      }
      if (this.inflight === 0) for (const resolve of this.#idle.splice(0)) resolve()
    })
  }

  /** Stops publishing and resolves once every message sent is acknowledged. */
  async stop (timeoutMs: number): Promise<void> {
    clearInterval(this.#timer)
    if (this.inflight === 0) return
    await withTimeout(new Promise<void>((resolve) => this.#idle.push(resolve)), timeoutMs,
      () => `${this.topic}: ${this.inflight} of ${this.sent} messages still unacknowledged (client connected: ${String(this.client.connected)})`)
  }
}

/** Arrivals at the cloud per topic: every number in arrival order. */
class Arrivals {
  readonly byTopic = new Map<string, number[]>()
  #waiters: Array<() => void> = []

  constructor (client: MqttClient) {
    client.on('message', (topic, payload) => {
      let list = this.byTopic.get(topic)
      if (list === undefined) this.byTopic.set(topic, list = [])
      list.push(Number(payload.toString()))
      for (const w of this.#waiters.splice(0)) w()
    })
  }

  of (topic: string): number[] {
    return this.byTopic.get(topic) ?? []
  }

  /** Resolves once every number in `expected` has arrived on `topic`. */
  async all (topic: string, expected: readonly number[], timeoutMs: number): Promise<void> {
    const missing = (): number[] => {
      const seen = new Set(this.of(topic))
      return expected.filter((n) => !seen.has(n))
    }
    await withTimeout(new Promise<void>((resolve) => {
      const check = (): void => { if (missing().length === 0) resolve(); else this.#waiters.push(check) }
      check()
    }), timeoutMs, () => `${topic}: ${missing().length} acknowledged messages missing at the cloud, first ${JSON.stringify(missing().slice(0, 10))}`)
  }
}

function firstArrivals (list: readonly number[]): number[] {
  const seen = new Set<number>()
  return list.filter((n) => !seen.has(n) && seen.add(n) !== undefined)
}

function outOfOrder (list: readonly number[]): Array<[number, number]> {
  const bad: Array<[number, number]> = []
  for (let i = 1; i < list.length; i++) if ((list[i] as number) <= (list[i - 1] as number)) bad.push([list[i - 1] as number, list[i] as number])
  return bad
}

describe.skipIf(!hasMosquitto())(`e2e topology: devices → FerryMQ → bridge → Mosquitto, through cuts and kill -9${MOSQUITTO_MISSING}`, () => {
  let topo: Topology | undefined

  beforeAll(async () => {
    // Mapping QoS 2: QoS 1 messages go up at 1, QoS 2 at 2.
    topo = await startTopology({ qos: 2, remotePrefix: 'site1/', quiet: process.env.E2E_VERBOSE === undefined })
  }, 60_000)

  afterAll(async () => {
    await endAllClients()
    await topo?.stop()
  }, 30_000)

  it('delivers every acknowledged message to the cloud, in order, through a partition and two crashes', async () => {
    const t = topo as Topology
    const context = (): string => `\n--- FerryMQ log tail ---\n${t.edgeLog().slice(-4000)}\n--- mosquitto log tail ---\n${t.cloudLog().slice(-1500)}`

    const verifier = await connect(t.cloudUrl, { clientId: 'e2e-verifier', clean: false, reconnectPeriod: 100 })
    const arrivals = new Arrivals(verifier)
    await verifier.subscribeAsync(`${t.remotePrefix}devices/#`, { qos: 2 })

    const devices = {
      q1: await connect(t.edgeUrl, { clientId: 'e2e-dev-q1', clean: false, reconnectPeriod: 100, connectTimeout: 2000 }),
      q2: await connect(t.edgeUrl, { clientId: 'e2e-dev-q2', clean: false, reconnectPeriod: 100, connectTimeout: 2000 }),
    }
    const reconnects = { q1: 0, q2: 0 }
    devices.q1.on('connect', () => { reconnects.q1++ })
    devices.q2.on('connect', () => { reconnects.q2++ })
    const publishers = [
      new NumberedPublisher(devices.q1, 'devices/dev-q1/telemetry', 1),
      new NumberedPublisher(devices.q2, 'devices/dev-q2/telemetry', 2),
    ]

    const plan: ScenarioPlan = [
      { at: 1_500, do: 'cut', mode: 'reset' },
      { at: 3_000, do: 'restore' },
      { at: 4_000, do: 'cut', mode: 'blackhole' },
      // Killed while the link is black-holed: the outbox holds what was acknowledged meanwhile.
      { at: 5_500, do: 'crash' },
      { at: 6_500, do: 'restart' },
      { at: 7_500, do: 'restore' },
      // Killed with the link up, while messages flow.
      { at: 9_000, do: 'crash' },
      { at: 9_500, do: 'restart' },
      { at: 11_000, do: 'mark', label: 'stop publishing' },
    ]
    const events: ScenarioEvent[] = []
    /** What the outbox held just before each crash (read from the admin API). */
    const outboxAtCrash: number[] = []
    const now0 = performance.now()
    const result = await runScenario(t, {
      onEvent: async (e) => {
        events.push(e)
        if (e.type === 'step-start' && e.step?.do === 'crash') outboxAtCrash.push((await t.bridgeStatus()).outbox.messages)
      },
    }, plan, { quiet: process.env.E2E_VERBOSE === undefined })
    expect(result.steps.map((s) => s.step.do)).toEqual(plan.map((s) => s.do))

    for (const p of publishers) await p.stop(15_000)
    await t.waitForOutboxEmpty(20_000)
    for (const p of publishers) await arrivals.all(`${t.remotePrefix}${p.topic}`, p.acked, 10_000).catch((err: Error) => { throw new Error(err.message + context()) })

    // The scenario really exercised the outbox: messages were acknowledged while the uplink was cut
    // (store-and-forward), and both devices reconnected after each crash.
    const stepAt = (i: number): number => now0 + (events.find((e) => e.type === 'step-start' && e.index === i)?.elapsedMs ?? NaN)
    const duringReset = publishers[0]?.acked.filter((n) => {
      const at = publishers[0]?.ackedAt.get(n) ?? 0
      return at > stepAt(0) && at < stepAt(1)
    }) ?? []
    expect(duringReset.length, 'QoS 1 messages acknowledged while the uplink was reset').toBeGreaterThan(0)
    expect(outboxAtCrash[0], 'bridge outbox messages when FerryMQ was killed during the black hole').toBeGreaterThan(0)
    expect(reconnects.q1, 'QoS 1 device reconnects').toBeGreaterThanOrEqual(2)
    expect(reconnects.q2, 'QoS 2 device reconnects').toBeGreaterThanOrEqual(2)

    for (const p of publishers) {
      const topic = `${t.remotePrefix}${p.topic}`
      const got = arrivals.of(topic)
      const firsts = firstArrivals(got)
      const acked = new Set(p.acked)
      expect(p.acked.length, `${p.topic}: acknowledged`).toBeGreaterThan(200)
      // Every acknowledged message arrived (waited for above), first arrivals in publish order.
      expect(outOfOrder(firsts), `${topic}: first arrivals out of order`).toEqual([])
      if (p.qos === 2) {
        const dupes = got.filter((n, i) => got.indexOf(n) !== i)
        expect(dupes, `${topic}: QoS 2 duplicates`).toEqual([])
      }
      const lost = p.acked.filter((n) => !firsts.includes(n))
      expect(lost, `${topic}: acknowledged but lost`).toEqual([])
      const extra = firsts.filter((n) => !acked.has(n))
      // Anything else that arrived was sent (in flight at a crash, acknowledged after it), never invented.
      expect(extra.every((n) => n >= 1 && n <= p.sent), `${topic}: arrivals never sent`).toBe(true)
      console.log(`${topic}: sent ${p.sent}, acknowledged ${p.acked.length}, arrived ${got.length} (${firsts.length} distinct, ${got.length - firsts.length} duplicates)`)
    }
  }, 60_000)
})

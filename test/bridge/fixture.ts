import { createServer } from 'node:net'
import type { MqttClient } from 'mqtt'
import { startBroker, type StartOptions, type TestBroker } from '../helpers/broker.js'
import { endAllClients, eventually, withTimeout } from '../helpers/clients.js'
import type { FaultProxy } from '../helpers/fault-proxy.js'
import type { Mosquitto } from '../helpers/mosquitto.js'
import { removeTempDirs, tempDir } from '../store/helpers.js'

/*
 * Shared pieces of the bridge integration tests: an edge FerryMQ with bridges and fsync storage,
 * metric reads by labels (in any order), and a subscriber that tracks sequence-numbered payloads.
 */

/** Test-friendly bridge timing: fast reconnects and a short keepalive (a black hole is noticed in ~1–2 s). */
export const FAST = { keepaliveSeconds: 1, reconnect: { minDelayMs: 50, maxDelayMs: 500, connectTimeoutMs: 2000, stableMs: 1000 } }

/** Starts the edge broker: fsync storage in a temp dir, the given bridges, $SYS every second. */
export async function startEdge (bridges: unknown[], options: StartOptions = {}, extra: Record<string, unknown> = {}): Promise<TestBroker> {
  return await startBroker({ storage: { durability: 'fsync', dir: tempDir() }, sys: { intervalSeconds: 1 }, bridges, ...extra } as never, options)
}

/** The last /metrics response that lacked a sample asked for (status and start), for timeout messages. */
let lastMiss = ''

/** One sample from /metrics by name and labels (label order does not matter); undefined when absent. */
export async function metric (broker: TestBroker, name: string, labels: Record<string, string> = {}): Promise<number | undefined> {
  const res = await fetch(`${broker.httpUrl}/metrics`, { signal: AbortSignal.timeout(5000) })
  const text = await res.text()
  for (const line of text.split('\n')) {
    const m = /^([a-zA-Z_:][\w:]*)(?:\{([^}]*)\})? (\S+)$/.exec(line)
    if (m === null || m[1] !== name) continue
    const got = Object.fromEntries([...(m[2] ?? '').matchAll(/(\w+)="([^"]*)"/g)].map((l) => [l[1], l[2]]))
    if (Object.entries(labels).every(([k, v]) => got[k] === v)) return Number(m[3])
  }
  lastMiss = `HTTP ${res.status}: ${text.slice(0, 200)}`
  return undefined
}

/** Waits until a metric sample satisfies `ok`. */
export async function metricUntil (broker: TestBroker, name: string, labels: Record<string, string>, ok: (v: number) => boolean, timeoutMs = 10_000): Promise<number> {
  let last: number | undefined
  await eventually(async () => {
    last = await metric(broker, name, labels)
    return last !== undefined && ok(last)
  }, timeoutMs, `${name}${JSON.stringify(labels)} (last value ${String(last)}${last === undefined ? `; ${lastMiss}` : ''})`)
  return last as number
}

/** A port that nothing listens on (it was free a moment ago). */
export async function deadPort (): Promise<number> {
  const server = createServer()
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as { port: number }
  await new Promise((resolve) => server.close(resolve))
  return port
}

/**
 * Tracks sequence-numbered payloads ("<seq>") on topics matching `filter`: every arrival, the
 * order of first arrivals, and the duplicates.
 */
export class SeqTracker {
  readonly arrivals: number[] = []
  readonly firsts: number[] = []
  readonly seen = new Set<number>()
  readonly dupFlags: boolean[] = []
  readonly #waiters: Array<() => void> = []

  constructor (client: MqttClient, filter: (topic: string) => boolean, public label = 'subscriber') {
    client.on('message', (topic, payload, packet) => {
      if (!filter(topic)) return
      const seq = Number(payload.toString())
      this.arrivals.push(seq)
      this.dupFlags.push(packet.dup)
      if (!this.seen.has(seq)) {
        this.seen.add(seq)
        this.firsts.push(seq)
      }
      for (const w of this.#waiters.splice(0)) w()
    })
  }

  get duplicates (): number {
    return this.arrivals.length - this.seen.size
  }

  /** Resolves once `check` holds (re-checked on every arrival). */
  async until (check: () => boolean, timeoutMs: number, what: string): Promise<void> {
    await withTimeout(new Promise<void>((resolve) => {
      const test = (): void => { if (check()) resolve(); else this.#waiters.push(test) }
      test()
    }), timeoutMs, () => `${this.label}: ${what}: ${this.seen.size} distinct, ${this.arrivals.length} arrivals, last firsts ${JSON.stringify(this.firsts.slice(-5))}`)
  }

  /** Resolves once every sequence number in [from, to) has arrived. */
  async all (from: number, to: number, timeoutMs: number): Promise<void> {
    const missing = (): number[] => { const m: number[] = []; for (let i = from; i < to && m.length < 10; i++) if (!this.seen.has(i)) m.push(i); return m }
    await this.until(() => missing().length === 0, timeoutMs, `waiting for seq ${from}..${to - 1} (missing ${JSON.stringify(missing())}…)`)
  }
}

/** Asserts helper: the first arrivals are strictly increasing (FIFO upstream). */
export function outOfOrder (firsts: readonly number[]): Array<[number, number]> {
  const bad: Array<[number, number]> = []
  for (let i = 1; i < firsts.length; i++) if ((firsts[i] as number) <= (firsts[i - 1] as number)) bad.push([firsts[i - 1] as number, firsts[i] as number])
  return bad
}

/** Log lines (pino JSON) with this message text part, for one bridge. */
export function logsMatching (logs: Array<Record<string, unknown>>, bridge: string, text: string): Array<Record<string, unknown>> {
  return logs.filter((l) => l.bridge === bridge && typeof l.msg === 'string' && l.msg.includes(text))
}

/**
 * Publishes `probe()` every 100 ms until `client` receives a message on `topic` (the bridge's
 * upstream subscription is in place); bounded.
 */
export async function untilArrives (client: MqttClient, topic: string, probe: () => Promise<unknown>, timeoutMs = 10_000): Promise<void> {
  let arrived = false
  const onMessage = (t: string): void => { if (t === topic) arrived = true }
  client.on('message', onMessage)
  try {
    const deadline = Date.now() + timeoutMs
    while (!arrived) {
      if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms: no probe arrived on ${topic}`)
      await probe()
      await eventually(() => arrived, 100, 'probe').catch(() => {})
    }
  } finally {
    client.off('message', onMessage)
  }
}

/** What a bridge test started, for closeStarted(). */
export interface Started {
  edge?: TestBroker | null
  upstream?: TestBroker | null
  proxies?: ReadonlyArray<FaultProxy | null>
  up?: Mosquitto | null
}

/** afterEach: ends every client, then closes the edge, the upstream FerryMQ, the proxies and Mosquitto, in that order. */
export async function closeStarted (started: Started): Promise<void> {
  await endAllClients()
  await started.edge?.close()
  await started.upstream?.close()
  for (const p of started.proxies ?? []) await p?.close()
  await started.up?.close()
  removeTempDirs()
}

import { execFileSync } from 'node:child_process'
import { cpus, loadavg, totalmem, release } from 'node:os'
import { fileURLToPath } from 'node:url'
import { VERSION } from '../src/version.js'
import { isPersistent, mosquittoVersion, startPeer, type Peer, type PeerName } from './peers.js'
import { SCENARIOS, type Metric, type Scenario } from './scenarios.js'
import type { Protocol } from './wire.js'

export interface BenchOptions {
  scenarios: readonly string[]
  brokers: readonly PeerName[]
  reps: number
  quick: boolean
  durationMs: number
  /** Also run the publish-side scenarios against the discard sink. */
  ceiling: boolean
  /** MQTT version of every client the load generator opens: 4 (3.1.1, the default) or 5. */
  protocol?: Protocol
  profileDir?: string
  progress? (line: string): void
}

export interface MetricResult {
  scenario: string
  metric: string
  unit: string
  higherIsBetter: boolean
  broker: string
  runs: number[]
  median: number
  min: number
  max: number
  /** Broker CPU seconds per run (user + system, from /proc). */
  cpuSeconds: number[]
  errors: string[]
}

export interface Machine { cpu: string, cores: number, memoryGiB: number, node: string, os: string, mosquitto: string, ferrymq: string }

export interface BenchResult {
  date: string
  mode: 'quick' | 'full'
  /** `protocol`: the clients' MQTT version (absent in results from before the option: 4). */
  options: { reps: number, durationMs: number, brokers: readonly string[], protocol?: Protocol }
  machine: Machine
  /**
   * The 1-minute load average when the run started and ended: other work on the machine shows up
   * here (the bench itself keeps about 2 busy).
   */
  load?: { start: number, end: number }
  scenarios: { name: string, description: string }[]
  results: MetricResult[]
}

/**
 * The FerryMQ measured: the commit of the checkout the bench runs from, marked when src/ differs
 * from it. BENCH_FERRYMQ_REVISION overrides it (a copy without .git, such as an exported commit).
 */
export function revision (): string {
  const given = process.env.BENCH_FERRYMQ_REVISION
  if (given !== undefined && given !== '') return given
  const root = fileURLToPath(new URL('..', import.meta.url))
  const git = (...args: string[]): string => execFileSync('git', ['--no-optional-locks', '-C', root, ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim()
  try {
    const head = git('rev-parse', '--short', 'HEAD')
    return git('status', '--porcelain', '--', 'src') === '' ? head : `${head} + uncommitted changes in src/`
  } catch {
    return 'revision unknown'
  }
}

export function machine (): Machine {
  return {
    cpu: cpus()[0]?.model.trim() ?? 'unknown',
    cores: cpus().length,
    memoryGiB: Math.round(totalmem() / 1024 ** 3),
    node: process.version,
    os: `Linux ${release()}`,
    mosquitto: mosquittoVersion(),
    ferrymq: `${VERSION} (${revision()})`,
  }
}

function median (values: number[]): number {
  const s = [...values].sort((a, b) => a - b)
  const mid = Math.floor(s.length / 2)
  return s.length === 0 ? NaN : s.length % 2 === 1 ? s[mid] as number : ((s[mid - 1] as number) + (s[mid] as number)) / 2
}

/**
 * Runs every scenario against every broker, `reps` times, alternating the brokers' order each
 * round so neither always runs on a warmer or cooler machine. Each run gets a fresh broker.
 */
export async function runBench (options: BenchOptions): Promise<BenchResult> {
  const scenarios = options.scenarios.map((name) => {
    const s = SCENARIOS.find((x) => x.name === name)
    if (s === undefined) throw new Error(`unknown scenario "${name}"; known: ${SCENARIOS.map((x) => x.name).join(', ')}`)
    return s
  })
  const loadAtStart = loadavg()[0] as number
  const results = new Map<string, MetricResult>()
  const plan: { scenario: Scenario, broker: PeerName, rep: number }[] = []
  for (const scenario of scenarios) {
    const brokers: PeerName[] = [...options.brokers, ...(options.ceiling && scenario.againstSink ? ['sink' as const] : [])]
      .filter((b) => (scenario.persistentOnly !== true || isPersistent(b)) && (scenario.applies?.(b) ?? true))
    for (let rep = 0; rep < options.reps; rep++) {
      for (const broker of rep % 2 === 0 ? brokers : [...brokers].reverse()) plan.push({ scenario, broker, rep })
    }
  }

  let step = 0
  for (const { scenario, broker, rep } of plan) {
    step++
    const label = `[${step}/${plan.length}] ${scenario.name} · ${broker} · run ${rep + 1}/${options.reps}`
    const scenarioOptions = { quick: options.quick, durationMs: options.durationMs, protocol: options.protocol ?? 4 }
    const around = await scenario.prepare?.(broker, scenarioOptions)
    let peer: Peer
    try {
      peer = await startPeer(broker, { ...(options.profileDir === undefined ? {} : { profileDir: options.profileDir }), ...around?.start })
    } catch (err) {
      await around?.close()
      throw err
    }
    let metrics: Metric[] = []
    let error: string | null = null
    const cpuBefore = peer.cpuSeconds()
    try {
      metrics = await scenario.run(peer, scenarioOptions)
    } catch (err) {
      error = (err as Error).message
    }
    const cpu = peer.cpuSeconds() - cpuBefore
    await peer.stop()
    await around?.close()
    options.progress?.(`${label}: ${error === null ? metrics.map((m) => `${m.name} ${format(m.value)} ${m.unit}`).join(', ') : `FAILED: ${error}`}`)
    for (const m of metrics) {
      const key = `${scenario.name}\u0000${m.name}\u0000${broker}`
      const r = results.get(key) ?? { scenario: scenario.name, metric: m.name, unit: m.unit, higherIsBetter: m.higherIsBetter, broker, runs: [], median: NaN, min: NaN, max: NaN, cpuSeconds: [], errors: [] }
      r.runs.push(m.value)
      r.cpuSeconds.push(cpu)
      results.set(key, r)
    }
    if (error !== null) {
      const key = `${scenario.name}\u0000(failed)\u0000${broker}`
      const r = results.get(key) ?? { scenario: scenario.name, metric: '(failed)', unit: '', higherIsBetter: true, broker, runs: [], median: NaN, min: NaN, max: NaN, cpuSeconds: [], errors: [] }
      r.errors.push(error)
      results.set(key, r)
    }
  }
  for (const r of results.values()) {
    r.median = median(r.runs)
    r.min = r.runs.length === 0 ? NaN : Math.min(...r.runs)
    r.max = r.runs.length === 0 ? NaN : Math.max(...r.runs)
  }
  return {
    date: new Date().toISOString(),
    mode: options.quick ? 'quick' : 'full',
    options: { reps: options.reps, durationMs: options.durationMs, brokers: options.brokers, protocol: options.protocol ?? 4 },
    machine: machine(),
    load: { start: loadAtStart, end: loadavg()[0] as number },
    scenarios: scenarios.map((s) => ({ name: s.name, description: s.description })),
    results: [...results.values()],
  }
}

export function format (value: number): string {
  if (!Number.isFinite(value)) return '—'
  if (Math.abs(value) >= 100) return Math.round(value).toLocaleString('en-US')
  if (Math.abs(value) >= 10) return value.toFixed(1)
  return value.toFixed(2)
}

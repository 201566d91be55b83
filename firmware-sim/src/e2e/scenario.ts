import type { CutMode, Topology } from './topology.js'

/*
 * Drives a topology on a timeline: cut and restore the uplink, crash and restart FerryMQ, at
 * fixed times from the start. It knows nothing of devices or the verifier: the fleet runs on its
 * own, and whoever needs to know when something happened listens to hooks.onEvent.
 *
 *   await runScenario(topo, { onEvent: (e) => verifier.mark(e) }, [
 *     { at: 5_000, do: 'cut', mode: 'reset' },
 *     { at: 12_000, do: 'restore' },
 *     { at: 16_000, do: 'crash' },
 *     { at: 17_000, do: 'restart' },
 *     { at: 20_000, do: 'drain', timeoutMs: 30_000 },
 *   ])
 *
 * Steps run one after the other in `at` order; a step whose time has come while the previous one
 * still runs (a restart takes about a second) starts as soon as it is done, and its event says how
 * late it was.
 */

export type ScenarioStep =
  | { at: number, do: 'cut', mode?: CutMode }
  | { at: number, do: 'restore', waitForBridge?: boolean }
  | { at: number, do: 'crash' }
  /** waitForBridge: default true unless the uplink is cut at that point. */
  | { at: number, do: 'restart', waitForBridge?: boolean }
  /** Waits until the bridge's outbox is empty (needs the edge running and the uplink restored). */
  | { at: number, do: 'drain', timeoutMs?: number }
  /** Does nothing but emit an event (a marker for the fleet or the verifier, e.g. "stop publishing"). */
  | { at: number, do: 'mark', label: string }

export type ScenarioPlan = readonly ScenarioStep[]

/**
 * The issue's scenario over about 20 s: a partition (reset) of 7 s, then kill -9 of FerryMQ with
 * the link up and a restart a second later. The fleet keeps publishing throughout; the caller
 * drains (waitForOutboxEmpty) after stopping it.
 */
export const DEFAULT_PLAN: ScenarioPlan = [
  { at: 5_000, do: 'cut', mode: 'reset' },
  { at: 12_000, do: 'restore' },
  { at: 16_000, do: 'crash' },
  { at: 17_000, do: 'restart' },
  { at: 20_000, do: 'mark', label: 'end' },
]

/**
 * A plan scaled to `durationMs` (≥ 4 s): a reset partition, a black hole during which FerryMQ is
 * killed (its outbox holding messages) and restarted, the link restored, a second kill with the
 * link up, and a final "end" mark at `durationMs`.
 */
export function planFor (durationMs: number): ScenarioPlan {
  const d = Math.max(4_000, durationMs)
  const at = (fraction: number): number => Math.round(d * fraction)
  return [
    { at: at(0.12), do: 'cut', mode: 'reset' },
    { at: at(0.26), do: 'restore' },
    { at: at(0.36), do: 'cut', mode: 'blackhole' },
    { at: at(0.50), do: 'crash' },
    { at: at(0.58), do: 'restart' },
    { at: at(0.66), do: 'restore' },
    { at: at(0.80), do: 'crash' },
    { at: at(0.85), do: 'restart' },
    { at: d, do: 'mark', label: 'end' },
  ]
}

export interface ScenarioEvent {
  type: 'scenario-start' | 'step-start' | 'step-done' | 'step-failed' | 'scenario-done'
  /** The step (absent on scenario-start / scenario-done). */
  step?: ScenarioStep
  /** Index of the step in the sorted plan. */
  index?: number
  /** Milliseconds since the scenario started. */
  elapsedMs: number
  /** Wall clock (Date.now()). */
  time: number
  /** step-start: how much later than `at` the step started. */
  lateMs?: number
  /** step-done / step-failed: how long the step took. */
  durationMs?: number
  error?: Error
}

export interface ScenarioHooks {
  /** Called for every event, awaited (keep it quick: the timeline waits for it). */
  onEvent? (event: ScenarioEvent): void | Promise<void>
}

export interface ScenarioOptions {
  /** No step lines on stderr. Default false. */
  quiet?: boolean
  /** Stops the timeline before its next step (the running step finishes); runScenario then rejects. */
  signal?: AbortSignal
}

export interface StepResult {
  step: ScenarioStep
  startedAtMs: number
  lateMs: number
  durationMs: number
}

export interface ScenarioResult {
  steps: StepResult[]
  durationMs: number
}

function describe (step: ScenarioStep): string {
  switch (step.do) {
    case 'cut': return `cut uplink (${step.mode ?? 'reset'})`
    case 'restore': return 'restore uplink'
    case 'crash': return 'crash edge (SIGKILL)'
    case 'restart': return 'restart edge'
    case 'drain': return 'wait for the bridge outbox to drain'
    case 'mark': return `mark "${step.label}"`
  }
}

/**
 * Checks that the steps make sense in order: no restore without a cut, no crash of a stopped edge,
 * no restart of a running one, no drain while the edge is down or the uplink is cut. Starting
 * state: edge running, uplink up. Throws with the first problem.
 */
export function validatePlan (plan: ScenarioPlan, initial: { edgeRunning: boolean, uplinkCut: boolean } = { edgeRunning: true, uplinkCut: false }): ScenarioStep[] {
  const steps = [...plan].map((s, i) => ({ s, i })).sort((a, b) => a.s.at - b.s.at || a.i - b.i).map(({ s }) => s)
  let { edgeRunning, uplinkCut } = initial
  steps.forEach((step, i) => {
    const where = `plan step ${i} (at ${step.at} ms, ${step.do})`
    if (!Number.isFinite(step.at) || step.at < 0) throw new Error(`${where}: "at" must be a number of milliseconds ≥ 0`)
    switch (step.do) {
      case 'cut':
        if (uplinkCut) throw new Error(`${where}: the uplink is already cut`)
        uplinkCut = true
        break
      case 'restore':
        if (!uplinkCut) throw new Error(`${where}: the uplink is not cut`)
        uplinkCut = false
        break
      case 'crash':
        if (!edgeRunning) throw new Error(`${where}: the edge is not running`)
        edgeRunning = false
        break
      case 'restart':
        if (edgeRunning) throw new Error(`${where}: the edge is running (crash it first)`)
        edgeRunning = true
        break
      case 'drain':
        if (!edgeRunning || uplinkCut) throw new Error(`${where}: needs the edge running and the uplink up`)
        break
      case 'mark':
        break
    }
  })
  return steps
}

function log (message: string, quiet: boolean): void {
  if (!quiet) process.stderr.write(`[e2e ${new Date().toISOString().slice(11, 23)}] scenario ${message}\n`)
}

/** Waits until `ms` from now, or rejects when `signal` aborts. */
function waitUntil (ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted === true) {
      reject(new Error('scenario aborted'))
      return
    }
    const onAbort = (): void => {
      clearTimeout(timer)
      reject(new Error('scenario aborted'))
    }
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort)
      resolve()
    }, Math.max(0, ms))
    signal?.addEventListener('abort', onAbort, { once: true })
  })
}

async function perform (topology: Topology, step: ScenarioStep): Promise<void> {
  switch (step.do) {
    case 'cut': return await topology.cutUplink(step.mode ?? 'reset')
    case 'restore': return await topology.restoreUplink({ waitForBridge: step.waitForBridge === true })
    case 'crash': return await topology.crashEdge()
    case 'restart': return await topology.restartEdge(step.waitForBridge === undefined ? {} : { waitForBridge: step.waitForBridge })
    case 'drain': await topology.waitForOutboxEmpty(step.timeoutMs ?? 30_000); return
    case 'mark': return
  }
}

/**
 * Runs `plan` against `topology`: each step at its `at` (ms after the start), in order. Resolves
 * with what ran when; rejects at the first failing step (after a step-failed event), leaving the
 * topology as it is (the caller stops it).
 */
export async function runScenario (topology: Topology, hooks: ScenarioHooks, plan: ScenarioPlan, options: ScenarioOptions = {}): Promise<ScenarioResult> {
  const steps = validatePlan(plan, { edgeRunning: topology.edgeRunning, uplinkCut: topology.uplinkCut !== null })
  const quiet = options.quiet === true
  const start = performance.now()
  const elapsed = (): number => Math.round(performance.now() - start)
  const emit = async (event: Omit<ScenarioEvent, 'elapsedMs' | 'time'>): Promise<void> => {
    await hooks.onEvent?.({ ...event, elapsedMs: elapsed(), time: Date.now() })
  }
  const results: StepResult[] = []
  log(`start: ${steps.length} steps over ${steps.at(-1)?.at ?? 0} ms`, quiet)
  await emit({ type: 'scenario-start' })
  for (const [index, step] of steps.entries()) {
    await waitUntil(step.at - (performance.now() - start), options.signal)
    const startedAtMs = elapsed()
    const lateMs = Math.max(0, startedAtMs - step.at)
    log(`+${(startedAtMs / 1000).toFixed(3)}s step ${index + 1}/${steps.length}: ${describe(step)}${lateMs > 50 ? ` (${lateMs} ms late)` : ''}`, quiet)
    await emit({ type: 'step-start', step, index, lateMs })
    try {
      await perform(topology, step)
    } catch (err) {
      const error = err instanceof Error ? err : new Error(String(err))
      const durationMs = elapsed() - startedAtMs
      log(`+${(elapsed() / 1000).toFixed(3)}s step ${index + 1} FAILED after ${durationMs} ms: ${error.message}`, quiet)
      await emit({ type: 'step-failed', step, index, durationMs, error })
      throw error
    }
    const durationMs = elapsed() - startedAtMs
    results.push({ step, startedAtMs, lateMs, durationMs })
    log(`+${(elapsed() / 1000).toFixed(3)}s step ${index + 1} done in ${durationMs} ms`, quiet)
    await emit({ type: 'step-done', step, index, durationMs })
  }
  const durationMs = elapsed()
  log(`done in ${(durationMs / 1000).toFixed(3)} s`, quiet)
  await emit({ type: 'scenario-done' })
  return { steps: results, durationMs }
}

import { parseArgs } from 'node:util'
import { DEFAULT_PLAN, planFor, runScenario, type ScenarioPlan } from './scenario.js'
import { startTopology } from './topology.js'

/*
 * The topology on its own, for manual runs and for pointing a fleet at it by hand:
 *
 *   node --import tsx firmware-sim/src/e2e/topology-cli.ts --hold          # start, print URLs, wait for Ctrl-C
 *   node --import tsx firmware-sim/src/e2e/topology-cli.ts --duration 20000  # run planFor(20 s), drain, stop
 *   node --import tsx firmware-sim/src/e2e/topology-cli.ts --plan default    # the plan (DEFAULT_PLAN)
 *
 * Prints one JSON line on stdout once everything is up ({ edgeUrl, cloudUrl, httpUrl, remotePrefix,
 * dir, pids }), step logs on stderr, and the final bridge status as JSON at the end.
 */

const { values } = parseArgs({
  options: {
    hold: { type: 'boolean', default: false },
    duration: { type: 'string' },
    plan: { type: 'string' },
    qos: { type: 'string', default: '1' },
    keep: { type: 'boolean', default: false },
    quiet: { type: 'boolean', default: false },
  },
})

const qos = values.qos === '2' ? 2 : 1
const topo = await startTopology({ qos, keepTempDir: values.keep, quiet: values.quiet })
let stopping: Promise<never> | undefined
/** Stops everything once (a second signal, e.g. timeout(1) signalling the process and its group, waits for the same stop). */
const stop = (code: number): Promise<never> => {
  stopping ??= topo.stop()
    .catch((err: Error) => console.error(`stop failed: ${err.message}`))
    .then(() => process.exit(code))
  return stopping
}
process.on('SIGINT', () => { void stop(130) })
process.on('SIGTERM', () => { void stop(143) })

console.log(JSON.stringify({ edgeUrl: topo.edgeUrl, cloudUrl: topo.cloudUrl, httpUrl: topo.httpUrl, remotePrefix: topo.remotePrefix, pattern: topo.pattern, dir: topo.dir, pids: topo.pids() }))
if (values.hold) {
  console.error('holding: Ctrl-C stops everything')
} else {
  try {
    const plan: ScenarioPlan = values.plan === 'default' ? DEFAULT_PLAN : planFor(Number(values.duration ?? 20_000))
    await runScenario(topo, {}, plan, { quiet: values.quiet })
    console.log(JSON.stringify(await topo.waitForOutboxEmpty(30_000)))
    await stop(0)
  } catch (err) {
    console.error((err as Error).message)
    await stop(1)
  }
}

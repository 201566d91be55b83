import { existsSync, mkdirSync, writeFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { FERRYMQ_CLI, mosquittoVersion, type PeerName } from './peers.js'
import { markdown, svg } from './report.js'
import { runBench } from './run.js'
import { SCENARIOS } from './scenarios.js'

const PEERS: readonly PeerName[] = ['ferrymq', 'ferrymq-os', 'ferrymq-fsync', 'mosquitto', 'mosquitto-persist']
/** Named sets of scenarios and brokers; --scenario, --brokers and --name still override them. */
const SUITES: Record<string, { scenarios: readonly string[], brokers: readonly PeerName[], description: string }> = {
  durability: {
    scenarios: ['fanin-q1', 'backlog', 'startup'],
    brokers: PEERS,
    description: 'fan-in QoS 1, backlog and start-up with queued messages, every FerryMQ durability mode against Mosquitto with persistence false and true',
  },
  bridge: {
    scenarios: ['bridge-drain', 'bridge-publish-cost'],
    brokers: ['ferrymq-os', 'ferrymq-fsync', 'mosquitto'],
    description: 'store-and-forward bridge to an upstream Mosquitto: outbox drain after an outage and the publish cost of the outbox, FerryMQ\'s bridge (durable modes) against Mosquitto\'s own bridge',
  },
}
const RESULTS = fileURLToPath(new URL('./results/', import.meta.url))

const HELP = `Usage: npm run bench -- [options]

Runs FerryMQ and Mosquitto side by side on loopback, each scenario on each broker, alternating,
and writes bench/results/<date>-<name>.{json,md,svg}.

  --full                 longer runs, 10,000 connections, 100,000-message backlog, 1,000,000 queued at start-up and in a bridge outbox, + mosquitto-persist
  --suite NAME           a named set of scenarios and brokers, written as <date>-NAME.*:
${Object.entries(SUITES).map(([name, s]) => `                           ${name}: ${s.description} (${s.scenarios.join(', ')} on ${s.brokers.join(', ')})`).join('\n')}
  --scenario NAME[,…]    only these scenarios (${SCENARIOS.map((s) => s.name).join(', ')}; startup and bridge-* only on request)
  --brokers NAME[,…]     brokers to run (${PEERS.join(', ')}); default ferrymq,mosquitto (quick)
  --reps N               runs per scenario and broker (default 3)
  --duration MS          measured window of a throughput run (default 2000 quick, 5000 full)
  --json FILE            write the JSON result here instead of bench/results/
  --name NAME            results file name suffix (default: quick or full)
  --protocol 4|5         MQTT version of every client the load generator opens (default 4, 3.1.1); 5 adds -v5 to the default name
  --no-ceiling           skip the load generator's ceiling (runs against a discard sink)
  --profile DIR          run FerryMQ under node --cpu-prof, profiles into DIR
  --help
`

function list (value: string | undefined, fallback: readonly string[]): string[] {
  return value === undefined ? [...fallback] : value.split(',').map((s) => s.trim()).filter((s) => s.length > 0)
}

async function main (): Promise<number> {
  const { values } = parseArgs({
    options: {
      full: { type: 'boolean', default: false },
      suite: { type: 'string' },
      scenario: { type: 'string' },
      brokers: { type: 'string' },
      reps: { type: 'string' },
      duration: { type: 'string' },
      json: { type: 'string' },
      name: { type: 'string' },
      protocol: { type: 'string', default: '4' },
      'no-ceiling': { type: 'boolean', default: false },
      profile: { type: 'string' },
      help: { type: 'boolean', default: false },
    },
    strict: true,
  })
  if (values.help === true) {
    process.stdout.write(HELP)
    return 0
  }
  const full = values.full === true
  const suite = values.suite === undefined ? undefined : SUITES[values.suite]
  if (values.suite !== undefined && suite === undefined) throw new Error(`unknown suite "${values.suite}"; known: ${Object.keys(SUITES).join(', ')}`)
  const brokers = list(values.brokers, suite?.brokers ?? (full ? ['ferrymq', 'mosquitto', 'mosquitto-persist'] : ['ferrymq', 'mosquitto']))
  const unknown = brokers.filter((b) => !PEERS.includes(b as PeerName))
  if (unknown.length > 0) throw new Error(`unknown broker ${unknown.join(', ')}; known: ${PEERS.join(', ')}`)
  if (brokers.some((b) => b.startsWith('mosquitto')) && mosquittoVersion() === 'not installed') {
    throw new Error('mosquitto is not installed (apt-get install mosquitto), or leave it out with --brokers ferrymq')
  }
  if (!existsSync(FERRYMQ_CLI)) throw new Error(`${FERRYMQ_CLI} is missing: run npm run build first`)
  const reps = Number(values.reps ?? 3)
  const durationMs = Number(values.duration ?? (full ? 5000 : 2000))
  if (!Number.isInteger(reps) || reps < 1) throw new Error(`--reps: expected a whole number ≥ 1, got ${values.reps}`)
  if (!Number.isInteger(durationMs) || durationMs < 200) throw new Error(`--duration: expected milliseconds ≥ 200, got ${values.duration}`)
  if (values.protocol !== '4' && values.protocol !== '5') throw new Error(`--protocol: expected 4 (MQTT 3.1.1) or 5, got ${values.protocol}`)
  const protocol = values.protocol === '5' ? 5 : 4

  const started = Date.now()
  const result = await runBench({
    // startup (persistent brokers only, minutes of filling) runs with --suite durability or --scenario startup.
    scenarios: list(values.scenario, suite?.scenarios ?? SCENARIOS.filter((s) => s.persistentOnly !== true && s.onRequest !== true).map((s) => s.name)),
    brokers: brokers as PeerName[],
    reps,
    quick: !full,
    durationMs,
    ceiling: values['no-ceiling'] !== true,
    protocol,
    ...(values.profile === undefined ? {} : { profileDir: values.profile }),
    progress: (line) => process.stderr.write(`${line}  (${Math.round((Date.now() - started) / 1000)} s)\n`),
  })

  const name = `${result.date.slice(0, 10)}-${values.name ?? `${values.suite ?? result.mode}${protocol === 5 ? '-v5' : ''}`}`
  const jsonPath = values.json ?? join(RESULTS, `${name}.json`)
  mkdirSync(dirname(jsonPath), { recursive: true })
  mkdirSync(RESULTS, { recursive: true })
  const table = markdown(result)
  writeFileSync(jsonPath, JSON.stringify(result, null, 2) + '\n')
  writeFileSync(join(RESULTS, `${name}.md`), table)
  writeFileSync(join(RESULTS, `${name}.svg`), svg(result))
  process.stdout.write(`\n${table}\nWrote ${jsonPath}, ${join(RESULTS, `${name}.md`)} and ${join(RESULTS, `${name}.svg`)}\n`)
  return result.results.some((r) => r.errors.length > 0) ? 1 : 0
}

main().then((code) => { process.exitCode = code }, (err: Error) => {
  process.stderr.write(`bench: ${err.message}\n`)
  process.exitCode = 2
})

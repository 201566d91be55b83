#!/usr/bin/env node
/**
 * `npm run sim:e2e -- [sim flags]`: devices → FerryMQ → bridge → Mosquitto (the cloud) → verifier.
 * While the fleet publishes, the uplink is cut and restored, FerryMQ is killed with SIGKILL and
 * restarted (planFor: a reset partition, a black hole with a kill inside it, a second kill with
 * the link up); then the fleet drains, the bridge's outbox empties, and the verifier, subscribed
 * at the cloud, reports. Exit 0: no acknowledged message lost; 1: loss; 2: bad flags or setup.
 *
 * Takes the simulator's flags (`npm run sim -- --help`); `--broker` and `--verify-url` are set
 * here (the edge and the cloud), as is the verify topic. Defaults suited to the scenario: 200
 * devices, 30 s, 2 msg/s each, QoS 1.
 */
import { parseArgs, usage } from '../options.js'
import { formatSummary, runSimulation } from '../run.js'
import { hasMosquitto, planFor, runScenario, startTopology, type Topology } from './index.js'

const DEFAULTS = ['--devices', '200', '--duration', '30', '--rate', '2', '--qos', '1']

async function main (argv: string[]): Promise<number> {
  if (argv.includes('--help')) {
    process.stdout.write('npm run sim:e2e -- [flags]: the simulator through FerryMQ, a bridge and Mosquitto, with partitions and kill -9.\n' +
      `Defaults: ${DEFAULTS.join(' ')}. --broker and --verify-url are set by the scenario.\n\n${usage()}`)
    return 0
  }
  if (!hasMosquitto()) {
    process.stderr.write('firmware-sim e2e: the mosquitto binary is needed (apt-get install mosquitto)\n')
    return 2
  }
  const given = new Set(argv.filter((a) => a.startsWith('--')))
  const defaults: string[] = []
  for (let i = 0; i < DEFAULTS.length; i += 2) if (!given.has(DEFAULTS[i] as string)) defaults.push(DEFAULTS[i] as string, DEFAULTS[i + 1] as string)
  let topology: Topology | undefined
  try {
    // Parsed once before anything starts, so a bad flag costs no processes.
    const probe = parseArgs([...defaults, ...argv, '--broker', 'mqtt://127.0.0.1:1'])
    const qos = probe.sim.qosMix[2] > 0 ? 2 : 1
    topology = await startTopology({ qos, protocolVersion: probe.sim.protocol })
    const cli = parseArgs([...defaults, ...argv, '--broker', topology.edgeUrl, '--verify-url', topology.cloudUrl,
      '--verify-topic', `${topology.remotePrefix}devices/+/telemetry`])
    const durationMs = cli.sim.durationMs ?? 30_000
    const log = (line: string): void => { if (!cli.quiet) process.stderr.write(`e2e: ${line}\n`) }
    log(`edge ${topology.edgeUrl}, cloud ${topology.cloudUrl}, bridge QoS ${qos}; ${cli.sim.devices} devices for ${durationMs / 1000} s`)
    const t = topology
    const [summary] = await Promise.all([
      runSimulation({ ...cli.sim, ...(cli.quiet ? {} : { progress: process.stderr }) }),
      runScenario(t, { onEvent: () => {} }, planFor(durationMs), { quiet: cli.quiet }).then(async () => {
        log('scenario done; waiting for the bridge outbox to empty')
        await t.waitForOutboxEmpty(cli.sim.graceMs)
      }),
    ])
    if (cli.json) process.stdout.write(JSON.stringify({ ...summary, scenario: planFor(durationMs) }) + '\n')
    else process.stdout.write(formatSummary(summary))
    return summary.ok ? 0 : 1
  } catch (err) {
    process.stderr.write(`firmware-sim e2e: ${(err as Error).message}\n`)
    return 2
  } finally {
    await topology?.stop()
  }
}

main(process.argv.slice(2)).then((code) => { process.exitCode = code }, (err: unknown) => {
  process.stderr.write(`firmware-sim e2e: ${(err as Error).stack ?? String(err)}\n`)
  process.exitCode = 2
})

#!/usr/bin/env node
import { parseArgs, usage, UsageError } from './options.js'
import { formatSummary, runSimulation } from './run.js'

/** `npm run sim -- [flags]`: exit 0 no acknowledged message lost, 1 lost, 2 bad flags / setup. */
async function main (argv: string[]): Promise<number> {
  let cli
  try {
    cli = parseArgs(argv)
  } catch (err) {
    if (err instanceof UsageError) {
      process.stderr.write(`firmware-sim: ${err.message}\n`)
      return 2
    }
    throw err
  }
  if (cli.help) { process.stdout.write(usage()); return 0 }
  // Ctrl-C ends production early; the run still drains, settles and reports.
  const abort = new AbortController()
  process.once('SIGINT', () => { abort.abort() })
  const summary = await runSimulation({ ...cli.sim, signal: abort.signal, ...(cli.quiet ? {} : { progress: process.stderr }) }).catch((err: unknown) => {
    process.stderr.write(`firmware-sim: ${(err as Error).message}\n`)
    return undefined
  })
  if (summary === undefined) return 2
  if (cli.json) process.stdout.write(JSON.stringify(summary) + '\n')
  else process.stdout.write(formatSummary(summary))
  return summary.ok ? 0 : 1
}

main(process.argv.slice(2)).then((code) => { process.exitCode = code }, (err: unknown) => {
  process.stderr.write(`firmware-sim: ${(err as Error).stack ?? String(err)}\n`)
  process.exitCode = 2
})

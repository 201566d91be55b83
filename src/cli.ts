#!/usr/bin/env node
import { parseArgs } from 'node:util'
import { createBroker, type Broker } from './broker/broker.js'
import { CONFIG_ENV, ConfigError, OVERRIDES, loadConfig } from './config/load.js'
import type { Config } from './config/schema.js'
import { createLogger } from './observability/logger.js'
import { VERSION } from './version.js'

/** Exit codes: 0 clean shutdown, 1 runtime failure, 2 bad config or flags. */
const EXIT_OK = 0
const EXIT_FAILURE = 1
const EXIT_BAD_CONFIG = 2
/** A shutdown that takes longer than this is cut short (exit 1). */
const SHUTDOWN_DEADLINE_MS = 5000

function usage (): string {
  const width = Math.max(...OVERRIDES.map((o) => o.flag.length)) + 8
  const rows = [
    ['--config FILE', `YAML or JSON config file (env ${CONFIG_ENV})`],
    ...OVERRIDES.map((o) => [`--${o.flag} ${o.kind === 'int' ? 'N' : 'VALUE'}`, `${o.help} (env ${o.env})`]),
    ['--print-config', 'print the effective configuration as JSON and exit'],
    ['--version', 'print the version and exit'],
    ['--help', 'print this help and exit'],
  ]
  return [
    `FerryMQ ${VERSION}: an MQTT broker for the edge.`,
    '',
    'Usage: ferrymq [options]',
    '',
    'Options (flags win over FERRYMQ_* environment variables, which win over the config file):',
    ...rows.map(([flag, help]) => `  ${(flag as string).padEnd(width + 6)} ${help as string}`),
    '',
    'Exit codes: 0 clean shutdown, 1 runtime failure, 2 bad configuration or flags.',
    'Documentation: README.md, section "Configuration".',
  ].join('\n')
}

function parseCommandLine (argv: string[]): { values: Record<string, string | boolean | undefined> } {
  const options: Record<string, { type: 'string' | 'boolean' }> = {
    config: { type: 'string' },
    'print-config': { type: 'boolean' },
    help: { type: 'boolean' },
    version: { type: 'boolean' },
  }
  for (const o of OVERRIDES) options[o.flag] = { type: 'string' }
  try {
    return parseArgs({ args: argv, options, strict: true, allowPositionals: false })
  } catch (err) {
    throw new ConfigError(`${(err as Error).message.replace(/\. To specify a positional.*$/, '')}\nRun ferrymq --help for the options.`)
  }
}

async function main (argv: string[]): Promise<number> {
  let config: Config
  try {
    const { values } = parseCommandLine(argv)
    if (values.help === true) {
      process.stdout.write(usage() + '\n')
      return EXIT_OK
    }
    if (values.version === true) {
      process.stdout.write(`${VERSION}\n`)
      return EXIT_OK
    }
    const flags: Record<string, string> = {}
    for (const o of OVERRIDES) if (typeof values[o.flag] === 'string') flags[o.flag] = values[o.flag] as string
    const file = typeof values.config === 'string' ? values.config : process.env[CONFIG_ENV]
    config = loadConfig({ file, env: process.env, flags })
    if (values['print-config'] === true) {
      process.stdout.write(JSON.stringify(config, null, 2) + '\n')
      return EXIT_OK
    }
  } catch (err) {
    return reportStartupError(err)
  }

  const logger = createLogger(config.log.level)
  // A bug that escapes every handler: logged as the last line, then the process ends as Node's
  // default would (exit 1), for the service manager to restart it. What was acknowledged is on disk.
  const fatal = (what: string) => (err: unknown): void => {
    logger.fatal({ err: err instanceof Error ? { message: err.message, stack: err.stack } : String(err) }, what)
    logger.flush()
    process.exit(EXIT_FAILURE)
  }
  process.on('uncaughtException', fatal('uncaught exception: exiting'))
  process.on('unhandledRejection', fatal('unhandled promise rejection: exiting'))
  const broker = createBroker(config, { logger })
  const stopped = waitForSignal(broker, logger)
  try {
    await broker.start()
  } catch (err) {
    await broker.close().catch(() => {})
    logger.flush()
    return reportStartupError(err)
  }
  return stopped
}

function reportStartupError (err: unknown): number {
  if (err instanceof ConfigError) {
    process.stderr.write(`ferrymq: ${err.message}\n`)
    return EXIT_BAD_CONFIG
  }
  process.stderr.write(`ferrymq: ${err instanceof Error ? err.message : String(err)}\n`)
  return EXIT_FAILURE
}

/** Resolves with the exit code once SIGTERM or SIGINT has shut the broker down. */
function waitForSignal (broker: Broker, logger: ReturnType<typeof createLogger>): Promise<number> {
  return new Promise((resolve) => {
    const onSignal = (signal: NodeJS.Signals): void => {
      process.off('SIGTERM', onSignal)
      process.off('SIGINT', onSignal)
      logger.info({ signal }, 'shutting down')
      const deadline = setTimeout(() => {
        logger.error({ deadlineMs: SHUTDOWN_DEADLINE_MS }, 'shutdown did not finish in time; exiting')
        resolve(EXIT_FAILURE)
      }, SHUTDOWN_DEADLINE_MS)
      deadline.unref()
      broker.close().then(() => {
        clearTimeout(deadline)
        resolve(EXIT_OK)
      }, (err: Error) => {
        logger.error({ err: err.message }, 'shutdown failed')
        resolve(EXIT_FAILURE)
      })
    }
    process.on('SIGTERM', onSignal)
    process.on('SIGINT', onSignal)
  })
}

main(process.argv.slice(2)).then((code) => {
  process.exitCode = code
  // Anything still holding the event loop after close() (a stuck socket) must not keep us alive.
  setTimeout(() => process.exit(code), 200).unref()
}, (err: unknown) => {
  process.stderr.write(`ferrymq: unexpected failure: ${err instanceof Error ? err.stack : String(err)}\n`)
  process.exit(EXIT_FAILURE)
})

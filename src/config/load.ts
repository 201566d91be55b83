import { readFileSync } from 'node:fs'
import { dirname, extname, isAbsolute, resolve } from 'node:path'
import { parse as parseYaml, YAMLParseError } from 'yaml'
import type { z } from 'zod'
import { configSchema, type Config } from './schema.js'

/** A configuration problem the user must fix: the CLI prints `message` and exits with code 2. */
export class ConfigError extends Error {
  readonly code = 'FERRYMQ_BAD_CONFIG'
  constructor (message: string) {
    super(message)
    this.name = 'ConfigError'
  }
}

/** One setting that a command-line flag and an environment variable can both override. */
export interface Override {
  flag: string
  env: string
  path: readonly string[]
  kind: 'int' | 'string'
  help: string
}

export const OVERRIDES: readonly Override[] = [
  { flag: 'port', env: 'FERRYMQ_PORT', path: ['listeners', 'mqtt', 'port'], kind: 'int', help: 'MQTT over TCP port (0 disables; default 1883)' },
  { flag: 'ws-port', env: 'FERRYMQ_WS_PORT', path: ['listeners', 'ws', 'port'], kind: 'int', help: 'MQTT over WebSocket port, path /mqtt (0 disables; default 8083)' },
  { flag: 'mqtts-port', env: 'FERRYMQ_MQTTS_PORT', path: ['listeners', 'mqtts', 'port'], kind: 'int', help: 'MQTT over TLS port, on when tls is configured (0 disables; default 8883)' },
  { flag: 'wss-port', env: 'FERRYMQ_WSS_PORT', path: ['listeners', 'wss', 'port'], kind: 'int', help: 'MQTT over secure WebSocket port, on when tls is configured (0 disables; default 8084)' },
  { flag: 'http-port', env: 'FERRYMQ_HTTP_PORT', path: ['listeners', 'http', 'port'], kind: 'int', help: 'HTTP port for /healthz, /readyz, /metrics (0 disables; default 18083)' },
  { flag: 'data-dir', env: 'FERRYMQ_DATA_DIR', path: ['storage', 'dir'], kind: 'string', help: 'storage directory (default ./data)' },
  { flag: 'durability', env: 'FERRYMQ_DURABILITY', path: ['storage', 'durability'], kind: 'string', help: 'fsync | os | memory (default fsync)' },
  { flag: 'log-level', env: 'FERRYMQ_LOG_LEVEL', path: ['log', 'level'], kind: 'string', help: 'fatal | error | warn | info | debug | trace | silent (default info)' },
]

/** The environment variable that names the config file, beside the per-setting ones above. */
export const CONFIG_ENV = 'FERRYMQ_CONFIG'

export interface ConfigSources {
  /** Path of a YAML or JSON config file, if any. */
  file?: string
  /** `process.env`-like map; only FERRYMQ_* entries are read. */
  env?: Readonly<Record<string, string | undefined>>
  /** Flag values by flag name (without dashes), as strings from the command line. */
  flags?: Readonly<Record<string, string | undefined>>
}

type Raw = Record<string, unknown>

/**
 * Builds the effective configuration: defaults, then the file, then FERRYMQ_* variables, then
 * flags. Throws ConfigError naming the key path, where the bad value came from, and what is wrong.
 */
export function loadConfig (sources: ConfigSources = {}): Config {
  const origins = new Map<string, string>()
  const raw: Raw = sources.file === undefined ? {} : readConfigFile(sources.file)
  const env = sources.env ?? {}

  for (const name of Object.keys(env)) {
    if (name.startsWith('FERRYMQ_') && name !== CONFIG_ENV && !OVERRIDES.some((o) => o.env === name)) {
      throw new ConfigError(`${name}: unknown environment variable; known ones are ${[CONFIG_ENV, ...OVERRIDES.map((o) => o.env)].join(', ')}`)
    }
  }
  for (const o of OVERRIDES) {
    const value = env[o.env]
    if (value !== undefined) setPath(raw, o, value, origins, `from ${o.env}`)
  }
  for (const o of OVERRIDES) {
    const value = sources.flags?.[o.flag]
    if (value !== undefined) setPath(raw, o, value, origins, `from --${o.flag}`)
  }

  const result = configSchema.safeParse(raw, { reportInput: true })
  if (!result.success) {
    throw new ConfigError(result.error.issues.map((issue) => describeIssue(issue, origins, sources.file)).join('\n'))
  }
  const config = result.data
  if (sources.file !== undefined) {
    // TLS files named in a config file are found beside it, wherever the broker is started from.
    const base = dirname(resolve(sources.file))
    const at = (p: string): string => (isAbsolute(p) ? p : resolve(base, p))
    const maybe = (p: string | undefined): string | undefined => (p === undefined ? undefined : at(p))
    if (config.tls !== undefined) config.tls = { ...config.tls, cert: at(config.tls.cert), key: at(config.tls.key), ca: maybe(config.tls.ca) }
    for (const b of config.bridges) {
      if (b.tls !== undefined) b.tls = { ...b.tls, ca: maybe(b.tls.ca), cert: maybe(b.tls.cert), key: maybe(b.tls.key) }
    }
  }
  return config
}

function readConfigFile (file: string): Raw {
  let text: string
  try {
    text = readFileSync(file, 'utf8')
  } catch (err) {
    throw new ConfigError(`config file ${file}: cannot read it (${(err as NodeJS.ErrnoException).code ?? String(err)})`)
  }
  let parsed: unknown
  try {
    parsed = extname(file).toLowerCase() === '.json' ? JSON.parse(text) : parseYaml(text, { uniqueKeys: true })
  } catch (err) {
    const where = err instanceof YAMLParseError && err.linePos !== undefined ? ` at line ${err.linePos[0].line}, column ${err.linePos[0].col}` : ''
    const detail = ((err as Error).message.split('\n')[0] ?? '').replace(/ at line \d+, column \d+:?$/, '')
    throw new ConfigError(`config file ${file}: not valid ${extname(file).toLowerCase() === '.json' ? 'JSON' : 'YAML'}${where}: ${detail}`)
  }
  if (parsed === null || parsed === undefined) return {}
  if (typeof parsed !== 'object' || Array.isArray(parsed)) {
    throw new ConfigError(`config file ${file}: expected a mapping of settings at the top level, got ${describeValue(parsed)}`)
  }
  return parsed as Raw
}

function setPath (raw: Raw, o: Override, value: string, origins: Map<string, string>, origin: string): void {
  let node = raw
  for (const key of o.path.slice(0, -1)) {
    const next = node[key]
    if (typeof next !== 'object' || next === null || Array.isArray(next)) node[key] = {}
    node = node[key] as Raw
  }
  node[o.path[o.path.length - 1] as string] = o.kind === 'int' && /^-?\d+$/.test(value.trim()) ? Number(value) : value
  origins.set(o.path.join('.'), origin)
}

function describeIssue (issue: z.core.$ZodIssue, origins: Map<string, string>, file: string | undefined): string {
  // List items as in the bridge checks: bridges[0].topics[2].pattern.
  const path = issue.path.map((k, i) => (typeof k === 'number' ? `[${k}]` : `${i === 0 ? '' : '.'}${String(k)}`)).join('')
  if (issue.code === 'unrecognized_keys') {
    return issue.keys.map((key) => `${path === '' ? key : `${path}.${key}`}: unknown key${file === undefined ? '' : ` in ${file}`}`).join('\n')
  }
  // A bad value not set by a flag or variable came from the file (defaults are always valid).
  const origin = origins.get(path) ?? (file === undefined ? undefined : `in ${file}`)
  const where = origin === undefined ? '' : ` (${origin})`
  const got = 'input' in issue && issue.code !== 'custom' ? `, got ${describeValue(issue.input)}` : ''
  // Sections and lists carry no message of their own: say what shape was expected, in YAML's words.
  const message = issue.code === 'invalid_type' && issue.message.startsWith('Invalid input')
    ? `expected ${EXPECTED[issue.expected] ?? issue.expected}`
    : issue.message
  return `${path === '' ? '(top level)' : path}${where}: ${message}${got}`
}

const EXPECTED: Record<string, string> = { object: 'a mapping of settings', array: 'a list', string: 'a string', number: 'a number', boolean: 'true or false' }

function describeValue (value: unknown): string {
  if (value === undefined) return 'nothing'
  if (typeof value === 'string') return JSON.stringify(value)
  if (Array.isArray(value)) return 'a list'
  if (value === null) return 'null'
  if (typeof value === 'object') return 'a mapping'
  return String(value)
}

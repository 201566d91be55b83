import { readFileSync } from 'node:fs'
import { z } from 'zod'
import type { Profile } from './device.js'
import type { SimulationOptions } from './run.js'

/** Every CLI flag: name, value placeholder (none for switches), help. */
export const FLAGS: ReadonlyArray<readonly [string, string | null, string]> = [
  ['devices', 'N', 'number of devices (default 100)'],
  ['broker', 'URL', 'mqtt://, mqtts://, ws://, wss:// URL (default mqtt://127.0.0.1:1883)'],
  ['protocol', '4|5', 'MQTT 3.1.1 (4) or 5 (default 5)'],
  ['username', 'NAME', 'username for every device; {id} stands for the device id (the verifier and commander: "verifier")'],
  ['password', 'SECRET', 'password for every device; {id} as in --username'],
  ['id-prefix', 'TEXT', 'device id prefix (default sim-); ids are <prefix><n>'],
  ['duration', 'S', 'produce for this many seconds (default 30 unless --messages)'],
  ['messages', 'N', 'produce this many messages in all, then stop'],
  ['rate', 'R', 'telemetry messages per second per device (default 1; chatty: × --chatty-factor)'],
  ['jitter', 'F', 'interval jitter, fraction 0–1 (default 0.2)'],
  ['payload-size', 'BYTES', 'pad payloads to this size (default 0: natural, ~120 bytes)'],
  ['qos', '0|1|2', 'QoS of every message (default 1)'],
  ['qos-mix', 'MIX', 'QoS weights, e.g. 0:20,1:70,2:10 (instead of --qos)'],
  ['profile-mix', 'MIX', 'profile weights, e.g. sensor:70,actuator:10,chatty:10,sleepy:10 (default sensor:100)'],
  ['chatty-factor', 'N', 'chatty devices send N × --rate (default 10)'],
  ['sleep', 'S', 'sleepy devices: mean sleep between wake-ups, seconds (default 10)'],
  ['sleepy-burst', 'N', 'sleepy devices: messages per wake-up (default 3)'],
  ['ramp', 'N', 'devices started per second (default 500)'],
  ['buffer', 'N', 'offline buffer per device, messages; oldest dropped when full (default 1000)'],
  ['backoff-min', 'MS', 'reconnect backoff base, ms (default 250)'],
  ['backoff-max', 'MS', 'reconnect backoff cap, ms (default 30000)'],
  ['keepalive', 'S', 'MQTT keepalive, seconds (default 60)'],
  ['session-expiry', 'S', 'MQTT 5 session expiry, seconds (default 3600)'],
  ['connect-timeout', 'MS', 'CONNACK timeout, ms (default 10000)'],
  ['drop-percent', 'P', 'fault: drop P % of the connections abruptly (socket destroyed, no DISCONNECT)'],
  ['drop-at', 'S', 'fault: first drop after S seconds (default: --drop-every, or half of --duration)'],
  ['drop-every', 'S', 'fault: drop again every S seconds'],
  ['storm-at', 'S', 'fault: reconnect storm (every device dropped at once) after S seconds'],
  ['commands', 'R', 'commands per second sent to actuators (default 0)'],
  ['verify-url', 'URL', 'where the verifier subscribes (default: --broker)'],
  ['verify-topic', 'FILTER', 'the verifier\'s topic filter (default devices/+/telemetry)'],
  ['verify-qos', '1|2', 'the verifier\'s subscription QoS (default 1)'],
  ['verify-protocol', '4|5', 'the verifier\'s MQTT version (default 5)'],
  ['no-verify', null, 'no verifier (load only; nothing is reported lost)'],
  ['grace', 'S', 'after production: wait up to S s for buffers to drain, then up to S s for the verifier (default 15)'],
  ['ca', 'FILE', 'PEM CA bundle for mqtts:// and wss://'],
  ['insecure', null, 'do not verify the broker\'s TLS certificate'],
  ['json', null, 'print one JSON object instead of the table'],
  ['per-device', null, 'list every device in the summary (default: only those with anomalies)'],
  ['quiet', null, 'no progress lines on stderr'],
  ['progress-every', 'S', 'seconds between progress lines when stderr is not a TTY (default 5)'],
  ['help', null, 'print this help and exit'],
]

export class UsageError extends Error {}

export function usage (): string {
  const lines = ['Usage: npm run sim -- [flags]', '', 'A fleet of simulated MQTT devices with an end-to-end verifier. Flags:']
  for (const [name, arg, help] of FLAGS) lines.push(`  ${`--${name}${arg === null ? '' : ` ${arg}`}`.padEnd(26)} ${help}`)
  lines.push('', 'Exit codes: 0 no acknowledged message lost, 1 acknowledged messages lost, 2 bad flags or setup error.')
  return lines.join('\n') + '\n'
}

/** Splits argv into flag → value ('' for switches); rejects unknown and repeated flags. */
export function tokenize (argv: readonly string[]): Record<string, string> {
  const known = new Map(FLAGS.map(([n, a]) => [n, a]))
  const out: Record<string, string> = {}
  for (let i = 0; i < argv.length; i++) {
    const tok = argv[i]
    if (!tok.startsWith('--')) throw new UsageError(`unexpected argument ${JSON.stringify(tok)}`)
    const eq = tok.indexOf('=')
    const name = tok.slice(2, eq === -1 ? undefined : eq)
    if (!known.has(name)) throw new UsageError(`unknown flag --${name} (see --help)`)
    if (name in out) throw new UsageError(`--${name} given twice`)
    const arg = known.get(name)
    if (arg === null) {
      if (eq !== -1) throw new UsageError(`--${name} takes no value`)
      out[name] = ''
    } else if (eq !== -1) {
      out[name] = tok.slice(eq + 1)
    } else {
      const v = argv[i + 1]
      if (v === undefined || (v.startsWith('--') && v.length > 2)) throw new UsageError(`--${name} needs a value (${arg})`)
      out[name] = v
      i++
    }
  }
  return out
}

const num = (what: string, min: number, max: number, int = false) =>
  z.string().trim().min(1, { error: `expected ${what}` }).transform((s, ctx) => {
    const n = Number(s)
    if (!Number.isFinite(n) || (int && !Number.isInteger(n)) || n < min || n > max) {
      ctx.addIssue({ code: 'custom', message: `expected ${what}, ${int ? 'an integer' : 'a number'} ${min}–${max}, got ${JSON.stringify(s)}` })
      return z.NEVER
    }
    return n
  })

const url = z.string().refine((s) => {
  try { return ['mqtt:', 'mqtts:', 'tcp:', 'tls:', 'ws:', 'wss:'].includes(new URL(s).protocol) } catch { return false }
}, { error: 'expected a mqtt://, mqtts://, ws:// or wss:// URL' })

const protocol = z.enum(['4', '5'], { error: 'expected 4 (MQTT 3.1.1) or 5' }).transform((s) => Number(s) as 4 | 5)

function mix (keys: readonly string[], what: string) {
  return z.string().transform((s, ctx) => {
    const out: Record<string, number> = {}
    for (const part of s.split(',')) {
      const [k, v, extra] = part.split(':')
      const n = Number(v)
      if (extra !== undefined || k === undefined || !keys.includes(k.trim()) || v === undefined || !Number.isFinite(n) || n < 0) {
        ctx.addIssue({ code: 'custom', message: `expected ${what} as ${keys.map((x) => `${x}:WEIGHT`).join(',')} (any subset), got ${JSON.stringify(part)}` })
        return z.NEVER
      }
      if (k.trim() in out) { ctx.addIssue({ code: 'custom', message: `${k} given twice` }); return z.NEVER }
      out[k.trim()] = n
    }
    if (Object.values(out).reduce((a, b) => a + b, 0) <= 0) { ctx.addIssue({ code: 'custom', message: 'the weights add up to 0' }); return z.NEVER }
    return out
  })
}

const flagsSchema = z.strictObject({
  devices: num('a device count', 1, 100_000, true).default(100),
  broker: url.default('mqtt://127.0.0.1:1883'),
  protocol: protocol.default(5),
  username: z.string().optional(),
  password: z.string().optional(),
  'id-prefix': z.string().min(1).regex(/^[^/+#]+$/, { error: 'no / + # in a device id prefix' }).default('sim-'),
  duration: num('seconds', 0.1, 31_536_000).optional(),
  messages: num('a message count', 1, 1_000_000_000, true).optional(),
  rate: num('messages per second', 0.0001, 100_000).default(1),
  jitter: num('a fraction', 0, 1).default(0.2),
  'payload-size': num('a size in bytes', 0, 10_000_000, true).default(0),
  qos: z.enum(['0', '1', '2'], { error: 'expected 0, 1 or 2' }).transform(Number).optional(),
  'qos-mix': mix(['0', '1', '2'], 'a QoS mix').optional(),
  'profile-mix': mix(['sensor', 'actuator', 'chatty', 'sleepy'], 'a profile mix').default({ sensor: 100 }),
  'chatty-factor': num('a factor', 1, 10_000).default(10),
  sleep: num('seconds', 0, 86_400).default(10),
  'sleepy-burst': num('a message count', 1, 100_000, true).default(3),
  ramp: num('devices per second', 0.01, 1_000_000).default(500),
  buffer: num('a message count', 0, 10_000_000, true).default(1000),
  'backoff-min': num('milliseconds', 1, 3_600_000).default(250),
  'backoff-max': num('milliseconds', 1, 3_600_000).default(30_000),
  keepalive: num('seconds', 0, 65_535, true).default(60),
  'session-expiry': num('seconds', 0, 4_294_967_295, true).default(3600),
  'connect-timeout': num('milliseconds', 100, 600_000, true).default(10_000),
  'drop-percent': num('a percentage', 0, 100).default(0),
  'drop-at': num('seconds', 0, 31_536_000).optional(),
  'drop-every': num('seconds', 0.1, 31_536_000).optional(),
  'storm-at': num('seconds', 0, 31_536_000).optional(),
  commands: num('commands per second', 0, 100_000).default(0),
  'verify-url': url.optional(),
  'verify-topic': z.string().min(1).default('devices/+/telemetry'),
  'verify-qos': z.enum(['1', '2'], { error: 'expected 1 or 2' }).transform((s) => Number(s) as 1 | 2).default(1),
  'verify-protocol': protocol.default(5),
  'no-verify': z.literal('').optional(),
  grace: num('seconds', 0, 86_400).default(15),
  ca: z.string().optional(),
  insecure: z.literal('').optional(),
  json: z.literal('').optional(),
  'per-device': z.literal('').optional(),
  quiet: z.literal('').optional(),
  'progress-every': num('seconds', 0.1, 86_400).default(5),
  help: z.literal('').optional(),
}).superRefine((f, ctx) => {
  if (f.qos !== undefined && f['qos-mix'] !== undefined) ctx.addIssue({ code: 'custom', path: ['qos-mix'], message: 'give --qos or --qos-mix, not both' })
  if (f['backoff-min'] > f['backoff-max']) ctx.addIssue({ code: 'custom', path: ['backoff-min'], message: 'must not exceed --backoff-max' })
  if ((f['drop-at'] !== undefined || f['drop-every'] !== undefined) && f['drop-percent'] === 0) ctx.addIssue({ code: 'custom', path: ['drop-percent'], message: '--drop-at/--drop-every need --drop-percent' })
  if (f['no-verify'] !== undefined && (f['verify-url'] !== undefined)) ctx.addIssue({ code: 'custom', path: ['no-verify'], message: 'give --verify-url or --no-verify, not both' })
})

export interface CliOptions { help: boolean, json: boolean, quiet: boolean, sim: SimulationOptions }

/** Parses the command line; throws UsageError with a message naming the flag. */
export function parseArgs (argv: readonly string[]): CliOptions {
  const raw = tokenize(argv)
  const parsed = flagsSchema.safeParse(raw)
  if (!parsed.success) {
    const i = parsed.error.issues[0]
    throw new UsageError(`--${String(i.path[0] ?? '?')}: ${i.message}`)
  }
  const f = parsed.data
  const q = f['qos-mix']
  const qosMix: [number, number, number] = q !== undefined ? [q['0'] ?? 0, q['1'] ?? 0, q['2'] ?? 0] : [f.qos === 0 ? 1 : 0, (f.qos ?? 1) === 1 ? 1 : 0, f.qos === 2 ? 1 : 0]
  let ca: Buffer | undefined
  if (f.ca !== undefined) {
    try { ca = readFileSync(f.ca) } catch (err) { throw new UsageError(`--ca: cannot read ${f.ca}: ${(err as Error).message}`) }
  }
  const tls = f.insecure !== undefined || ca !== undefined ? { rejectUnauthorized: f.insecure === undefined, ...(ca === undefined ? {} : { ca }) } : undefined
  const durationS = f.duration ?? (f.messages === undefined ? 30 : undefined)
  const sim: SimulationOptions = {
    devices: f.devices,
    url: f.broker,
    protocol: f.protocol,
    idPrefix: f['id-prefix'],
    ...(f.username === undefined ? {} : { username: f.username }),
    ...(f.password === undefined ? {} : { password: f.password }),
    profileMix: f['profile-mix'] as Partial<Record<Profile, number>>,
    qosMix,
    rate: f.rate,
    chattyFactor: f['chatty-factor'],
    jitter: f.jitter,
    sleepyBurst: f['sleepy-burst'],
    sleepSeconds: f.sleep,
    payloadSize: f['payload-size'],
    bufferSize: f.buffer,
    backoff: { baseMs: f['backoff-min'], maxMs: f['backoff-max'] },
    keepaliveSeconds: f.keepalive,
    sessionExpirySeconds: f['session-expiry'],
    connectTimeoutMs: f['connect-timeout'],
    rampPerSecond: f.ramp,
    ...(durationS === undefined ? {} : { durationMs: durationS * 1000 }),
    ...(f.messages === undefined ? {} : { messages: f.messages }),
    faults: {
      dropPercent: f['drop-percent'],
      ...(f['drop-at'] === undefined ? {} : { dropAtMs: f['drop-at'] * 1000 }),
      ...(f['drop-every'] === undefined ? {} : { dropEveryMs: f['drop-every'] * 1000 }),
      ...(f['storm-at'] === undefined ? {} : { stormAtMs: f['storm-at'] * 1000 }),
    },
    ...(tls === undefined ? {} : { tls }),
    verify: f['no-verify'] !== undefined ? false : { url: f['verify-url'] ?? f.broker, topic: f['verify-topic'], qos: f['verify-qos'], protocol: f['verify-protocol'], ...(f.username === undefined ? {} : { username: f.username.replaceAll('{id}', 'verifier') }), ...(f.password === undefined ? {} : { password: f.password.replaceAll('{id}', 'verifier') }) },
    graceMs: f.grace * 1000,
    commandsPerSecond: f.commands,
    perDeviceAll: f['per-device'] !== undefined,
    progressEverySeconds: f['progress-every'],
  }
  return { help: f.help !== undefined, json: f.json !== undefined, quiet: f.quiet !== undefined, sim }
}

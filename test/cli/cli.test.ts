import { once } from 'node:events'
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { createServer, type Server } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { OVERRIDES } from '../../src/config/load.js'
import type { MqttClient } from 'mqtt'
import { collect, connect, endAllClients, eventually, withTimeout } from '../helpers/clients.js'
import { freePort, spawnCli, type BrokerProcess } from '../helpers/process.js'
import { RawClient } from '../helpers/raw.js'

/**
 * The built CLI (`node dist/cli.js`) as a real process: flags, environment, config files, exit
 * codes and signals. Run `npm run build` first.
 */

const PACKAGE_VERSION = (JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }).version

let dir: string
const running: BrokerProcess[] = []

beforeAll(() => { dir = mkdtempSync(join(tmpdir(), 'ferrymq-cli-')) })
afterAll(() => { rmSync(dir, { recursive: true, force: true }) })
afterEach(async () => {
  await endAllClients()
  // A test that failed half-way must not leave a broker behind.
  for (const p of running.splice(0)) {
    if (p.proc.exitCode === null && p.proc.signalCode === null) {
      p.proc.kill('SIGKILL')
      await p.exited(5000).catch(() => {})
    }
  }
})

interface Finished { code: number | string, stdout: string, stderr: string }

/** Runs the CLI to completion; resolves once it exited and its output is fully read. */
async function run (args: string[], env: Record<string, string> = {}, timeoutMs = 10_000): Promise<Finished> {
  const p = spawnCli(args, env)
  running.push(p)
  const closed = once(p.proc, 'close')
  const code = await p.exited(timeoutMs)
  await withTimeout(closed, timeoutMs, 'the CLI output to end')
  return { code, stdout: p.stdout(), stderr: p.stderr() }
}

/** Runs the CLI for a configuration error: exit 2, nothing on stdout, and returns stderr. */
async function refused (args: string[], env: Record<string, string> = {}): Promise<string> {
  const r = await run(args, env)
  expect(r, `stderr: ${r.stderr}`).toMatchObject({ code: 2, stdout: '' })
  expect(r.stderr).toMatch(/^ferrymq: /)
  return r.stderr
}

/** The effective configuration as `--print-config` prints it. */
async function printConfig (args: string[], env: Record<string, string> = {}): Promise<Record<string, Record<string, unknown>>> {
  const r = await run([...args, '--print-config'], env)
  expect(r, `stderr: ${r.stderr}`).toMatchObject({ code: 0, stderr: '' })
  return JSON.parse(r.stdout) as Record<string, Record<string, unknown>>
}

function file (name: string, text: string): string {
  const path = join(dir, name)
  writeFileSync(path, text)
  return path
}

async function distinctFreePorts (n: number): Promise<number[]> {
  const ports = new Set<number>()
  while (ports.size < n) ports.add(await freePort())
  return [...ports]
}

interface Started { p: BrokerProcess, mqtt: number, ws: number, http: number }

/** Starts the CLI on free MQTT, WebSocket and HTTP ports and waits for its "FerryMQ is ready" log. */
async function startCli (extra: string[] = [], env: Record<string, string> = {}): Promise<Started> {
  const [mqtt, ws, http] = await distinctFreePorts(3) as [number, number, number]
  const p = spawnCli(['--port', String(mqtt), '--ws-port', String(ws), '--http-port', String(http), '--durability', 'memory', ...extra], env)
  running.push(p)
  await p.ready()
  return { p, mqtt, ws, http }
}

async function httpStatus (url: string): Promise<number> {
  const res = await fetch(url, { signal: AbortSignal.timeout(3000) })
  await res.text()
  return res.status
}

describe('--help and --version', () => {
  it('--help exits 0 and documents every flag with its environment variable', async () => {
    const r = await run(['--help'])
    expect(r.code).toBe(0)
    expect(r.stderr).toBe('')
    const escape = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')
    for (const o of OVERRIDES) {
      const line = new RegExp(`^ {2}--${o.flag} ${o.kind === 'int' ? 'N' : 'VALUE'} +${escape(o.help)} \\(env ${o.env}\\)$`, 'm')
      expect(r.stdout, `--${o.flag}`).toMatch(line)
    }
    expect(r.stdout).toMatch(/^ {2}--config FILE +.*\(env FERRYMQ_CONFIG\)$/m)
    for (const flag of ['--print-config', '--version', '--help']) expect(r.stdout).toMatch(new RegExp(`^ {2}${flag} +\\S`, 'm'))
    expect(r.stdout).toContain('Exit codes: 0 clean shutdown, 1 runtime failure, 2 bad configuration or flags.')
  })

  it('--version prints the package version and exits 0', async () => {
    expect(await run(['--version'])).toEqual({ code: 0, stdout: `${PACKAGE_VERSION}\n`, stderr: '' })
  })
})

describe('bad flags exit 2 with the reason on stderr', () => {
  it('an unknown flag', async () => {
    const stderr = await refused(['--bogus'])
    expect(stderr).toBe("ferrymq: Unknown option '--bogus'\nRun ferrymq --help for the options.\n")
  })

  it('a positional argument', async () => {
    expect(await refused(['start'])).toContain("Unexpected argument 'start'")
  })

  it('--ws-port abc names the setting, the flag and the value', async () => {
    expect(await refused(['--ws-port', 'abc'])).toBe('ferrymq: listeners.ws.port (from --ws-port): expected an integer 0–65535, got "abc"\n')
  })

  it.each(OVERRIDES.filter((o) => o.kind === 'int').flatMap((o) => [[o.flag, o.path.join('.'), 'abc'], [o.flag, o.path.join('.'), '65536'], [o.flag, o.path.join('.'), '1.5']]))(
    '--%s with a bad port (%s = %s)', async (flag, path, value) => {
      const got = /^\d+$/.test(value) ? value : JSON.stringify(value)
      expect(await refused([`--${flag}`, value])).toBe(`ferrymq: ${path} (from --${flag}): expected an integer 0–65535, got ${got}\n`)
    })

  it('--durability nope', async () => {
    expect(await refused(['--durability', 'nope'])).toBe('ferrymq: storage.durability (from --durability): expected one of fsync, os, memory, got "nope"\n')
  })

  it('--log-level loud', async () => {
    expect(await refused(['--log-level', 'loud'])).toContain('log.level (from --log-level): expected one of fatal, error, warn, info, debug, trace, silent, got "loud"')
  })
})

describe('config files', () => {
  it('an unknown key is named by its full path and the file', async () => {
    const f = file('unknown-key.yaml', 'listeners:\n  mqtt:\n    prot: 1883\n')
    expect(await refused(['--config', f])).toBe(`ferrymq: listeners.mqtt.prot: unknown key in ${f}\n`)
  })

  it('a value of the wrong type is named by its path, the file and the value', async () => {
    const f = file('wrong-type.yaml', 'listeners:\n  mqtt:\n    port: "1883x"\n')
    expect(await refused(['--config', f])).toBe(`ferrymq: listeners.mqtt.port (in ${f}): expected an integer 0–65535, got "1883x"\n`)
  })

  it('every problem in the file is reported at once', async () => {
    const f = file('several.yaml', 'log:\n  level: loud\nstorage:\n  durability: 3\nlimits:\n  maxConnections: 0\n')
    const stderr = await refused(['--config', f])
    expect(stderr).toContain(`log.level (in ${f}): expected one of fatal, error, warn, info, debug, trace, silent, got "loud"`)
    expect(stderr).toContain(`storage.durability (in ${f}): expected one of fsync, os, memory, got 3`)
    expect(stderr).toContain(`limits.maxConnections (in ${f}): expected a connection count, an integer 1–1000000, got 0`)
  })

  it('invalid YAML is reported with its line and column', async () => {
    const f = file('invalid.yaml', 'listeners:\n  mqtt:\n    port: 1883\n  ws: [\n  http: 1\n')
    expect(await refused(['--config', f])).toMatch(new RegExp(`^ferrymq: config file ${f}: not valid YAML at line \\d+, column \\d+: \\S`))
    const tab = file('tab.yaml', 'listeners:\n\tmqtt:\n')
    expect(await refused(['--config', tab])).toMatch(new RegExp(`^ferrymq: config file ${tab}: not valid YAML at line 2, column 1: `))
  })

  it('a key given twice is invalid YAML', async () => {
    const f = file('duplicate.yaml', 'listeners:\n  mqtt:\n    port: 1\n    port: 2\n')
    expect(await refused(['--config', f])).toMatch(new RegExp(`^ferrymq: config file ${f}: not valid YAML at line 4, column 5: Map keys must be unique`))
  })

  it('a missing file', async () => {
    const f = join(dir, 'does-not-exist.yaml')
    expect(await refused(['--config', f])).toBe(`ferrymq: config file ${f}: cannot read it (ENOENT)\n`)
  })

  it('a directory given as the config file', async () => {
    const d = join(dir, 'a-directory.yaml')
    mkdirSync(d, { recursive: true })
    expect(await refused(['--config', d])).toBe(`ferrymq: config file ${d}: cannot read it (EISDIR)\n`)
  })

  it('a file that is not a mapping at the top level', async () => {
    const f = file('list.yaml', '- listeners\n')
    expect(await refused(['--config', f])).toBe(`ferrymq: config file ${f}: expected a mapping of settings at the top level, got a list\n`)
  })

  it('an empty file means the defaults', async () => {
    const f = file('empty.yaml', '# nothing set\n')
    expect(await printConfig(['--config', f])).toEqual(await printConfig([]))
  })

  it('a .json file is read as JSON: its settings apply, and its errors are JSON errors', async () => {
    const good = file('good.json', JSON.stringify({ listeners: { mqtt: { port: 1999 } }, limits: { maxConnections: 77 } }))
    const config = await printConfig(['--config', good])
    expect(config.listeners?.mqtt).toEqual({ port: 1999, host: '0.0.0.0' })
    expect(config.limits?.maxConnections).toBe(77)

    const bad = file('bad.json', '{ "listeners": { "mqtt": { "port": } } }')
    expect(await refused(['--config', bad])).toMatch(new RegExp(`^ferrymq: config file ${bad}: not valid JSON: `))
    // YAML is not JSON: a .json file is not parsed as YAML.
    const yamlInJson = file('yaml-in.json', 'listeners:\n  mqtt:\n    port: 1999\n')
    expect(await refused(['--config', yamlInJson])).toMatch(new RegExp(`^ferrymq: config file ${yamlInJson}: not valid JSON: `))
    const unknown = file('unknown.json', JSON.stringify({ listeners: { mqtt: { prot: 1 } } }))
    expect(await refused(['--config', unknown])).toBe(`ferrymq: listeners.mqtt.prot: unknown key in ${unknown}\n`)
  })

  it.each([
    ['a bridge without topics', 'bridges:\n  - name: cloud\n    url: mqtts://cloud.example:8883\n', 'bridges[0].topics (in F): expected a list of topic mappings, got nothing'],
    ['a mapping of bridges', 'bridges:\n  cloud:\n    url: mqtts://cloud.example:8883\n', 'bridges (in F): expected a list of bridges, got a mapping'],
    ['a bridge with a bad URL', 'bridges:\n  - { name: cloud, url: "tcp://x:1883", topics: [ { pattern: "#" } ] }\n', 'bridges[0].url (in F): unsupported scheme "tcp:" in "tcp://x:1883": use mqtt://, mqtts://, ws:// or wss://'],
  ])('a bad bridges section (%s) exits 2 and names the setting', async (_what, text, message) => {
    const f = file('bridges.yaml', text)
    expect(await refused(['--config', f])).toBe(`ferrymq: ${message.replace('F', f)}\n`)
  })

  it('a bridge mapping that is not a valid filter, or a bridge without a disk store, exits 2 at start-up and names the mapping', async () => {
    const f = file('bridge-pattern.yaml', 'bridges:\n  - { name: cloud, url: "mqtt://127.0.0.1:1", topics: [ { pattern: "a/#" }, { pattern: "a/#/b" } ] }\n')
    expect(await refused(['--config', f, '--durability', 'memory', '--port', '0', '--ws-port', '0', '--http-port', '0'])).toBe(
      'ferrymq: bridges[0]: a bridge needs storage.durability fsync or os (its outbox is kept on disk)\n' +
      'bridges[0].topics[1].pattern: topic filter has # other than as the whole last level ("a/#/b")\n')
  })
})

describe('environment variables and precedence', () => {
  it('FERRYMQ_PORT sets the MQTT port', async () => {
    const config = await printConfig([], { FERRYMQ_PORT: '2883' })
    expect(config.listeners?.mqtt).toEqual({ port: 2883, host: '0.0.0.0' })
  })

  it('a flag wins over the environment, which wins over the file, which wins over the defaults', async () => {
    const f = file('precedence.yaml', 'listeners:\n  mqtt: { port: 1111 }\n  ws: { port: 2222 }\n  http: { port: 3333 }\nlog:\n  level: warn\n')
    const config = await printConfig(['--config', f, '--port', '6666'], { FERRYMQ_PORT: '4444', FERRYMQ_WS_PORT: '5555' })
    const listeners = config.listeners as Record<string, { port: number }>
    expect(listeners.mqtt?.port).toBe(6666) // flag over env and file
    expect(listeners.ws?.port).toBe(5555) // env over file
    expect(listeners.http?.port).toBe(3333) // file over default
    expect(listeners.mqtts?.port).toBe(8883) // default
    expect(config.log?.level).toBe('warn')
  })

  it('FERRYMQ_CONFIG names the config file, and --config wins over it', async () => {
    const a = file('env-config-a.yaml', 'listeners:\n  mqtt: { port: 1234 }\n')
    const b = file('env-config-b.yaml', 'listeners:\n  mqtt: { port: 4321 }\n')
    expect((await printConfig([], { FERRYMQ_CONFIG: a })).listeners?.mqtt).toMatchObject({ port: 1234 })
    expect((await printConfig(['--config', b], { FERRYMQ_CONFIG: a })).listeners?.mqtt).toMatchObject({ port: 4321 })
  })

  it('a bad value in a variable names the variable', async () => {
    expect(await refused([], { FERRYMQ_PORT: 'abc' })).toBe('ferrymq: listeners.mqtt.port (from FERRYMQ_PORT): expected an integer 0–65535, got "abc"\n')
    expect(await refused([], { FERRYMQ_DURABILITY: 'sometimes' })).toContain('storage.durability (from FERRYMQ_DURABILITY): expected one of fsync, os, memory, got "sometimes"')
  })

  it('a flag overrides a bad value in the file for the same setting', async () => {
    const f = file('overridden.yaml', 'listeners:\n  mqtt: { port: "nope" }\n')
    expect((await printConfig(['--config', f, '--port', '1885'])).listeners?.mqtt).toMatchObject({ port: 1885 })
  })

  it('an unknown FERRYMQ_ variable exits 2 and names it', async () => {
    const stderr = await refused([], { FERRYMQ_PROT: '1883' })
    expect(stderr).toMatch(/^ferrymq: FERRYMQ_PROT: unknown environment variable; known ones are FERRYMQ_CONFIG, /)
    for (const o of OVERRIDES) expect(stderr).toContain(o.env)
  })
})

describe('storage.dir', () => {
  it('a data directory that cannot exist (a path under a regular file) exits 2 before listening', async () => {
    const blocker = file('not-a-dir', 'a regular file\n')
    const dataDir = join(blocker, 'data')
    const [mqtt, ws, http] = await distinctFreePorts(3) as [number, number, number]
    const r = await run(['--data-dir', dataDir, '--durability', 'fsync', '--port', String(mqtt), '--ws-port', String(ws), '--http-port', String(http)])
    expect(r.code).toBe(2)
    expect(r.stderr).toBe(`ferrymq: storage.dir: cannot use ${dataDir} as the data directory (ENOTDIR); choose a writable directory or --durability memory\n`)
    expect(r.stdout).not.toContain('FerryMQ is ready')
  })

  it('a missing data directory is created', async () => {
    const dataDir = join(dir, 'fresh', 'nested', 'data')
    const { p } = await startCli(['--data-dir', dataDir, '--durability', 'os'])
    expect(statSync(dataDir).isDirectory()).toBe(true)
    p.proc.kill('SIGTERM')
    expect(await p.exited(6000)).toBe(0)
  })

  it('durability memory needs no data directory, even an impossible one', async () => {
    const blocker = file('still-not-a-dir', 'a regular file\n')
    const { p, mqtt } = await startCli(['--data-dir', join(blocker, 'data')]) // startCli passes --durability memory
    const client = await connect(`mqtt://127.0.0.1:${mqtt}`)
    expect(client.connected).toBe(true)
    expect(statSync(blocker).isFile()).toBe(true)
    p.proc.kill('SIGTERM')
    expect(await p.exited(6000)).toBe(0)
  })
})

describe('a port already in use exits 1, naming the listener and the address', () => {
  let holder: Server
  afterEach(async () => { await new Promise((resolve) => holder.close(resolve)) })

  it.each([
    ['mqtt', '0.0.0.0'],
    ['ws', '0.0.0.0'],
    ['http', '127.0.0.1'],
  ] as const)('listeners.%s', async (listener, host) => {
    holder = createServer()
    await new Promise<void>((resolve) => holder.listen(0, '0.0.0.0', resolve))
    const busy = (holder.address() as { port: number }).port
    const [a, b, c] = await distinctFreePorts(3) as [number, number, number]
    const ports = { mqtt: a, ws: b, http: c, [listener]: busy }
    const r = await run(['--port', String(ports.mqtt), '--ws-port', String(ports.ws), '--http-port', String(ports.http), '--durability', 'memory'])
    expect(r.code).toBe(1)
    expect(r.stderr).toBe(`ferrymq: listeners.${listener}: cannot listen on ${host}:${busy}: the address is in use by another process\n`)
    expect(r.stdout).not.toContain('FerryMQ is ready')
  })
})

describe('a running broker', () => {
  it('serves MQTT over TCP and WebSocket and /healthz, /readyz and /metrics on its ports', async () => {
    const { p, mqtt, ws, http } = await startCli()
    // "FerryMQ is ready" is logged after every listener is up: /readyz agrees at once.
    expect(await httpStatus(`http://127.0.0.1:${http}/readyz`)).toBe(200)
    expect(await httpStatus(`http://127.0.0.1:${http}/healthz`)).toBe(200)

    const tcp = await connect(`mqtt://127.0.0.1:${mqtt}`)
    const wsClient = await connect(`ws://127.0.0.1:${ws}/mqtt`)
    await tcp.subscribeAsync('cli/from-ws', { qos: 1 })
    await wsClient.subscribeAsync('cli/from-tcp', { qos: 2 })
    const atTcp = collect(tcp, 1)
    const atWs = collect(wsClient, 1)
    await wsClient.publishAsync('cli/from-ws', 'hello tcp', { qos: 1 })
    await tcp.publishAsync('cli/from-tcp', 'hello ws', { qos: 2 })
    expect((await atTcp)[0]).toMatchObject({ topic: 'cli/from-ws', payload: 'hello tcp', qos: 1 })
    expect((await atWs)[0]).toMatchObject({ topic: 'cli/from-tcp', payload: 'hello ws', qos: 2 })

    const metrics = await (await fetch(`http://127.0.0.1:${http}/metrics`)).text()
    expect(metrics).toMatch(/^ferrymq_clients_connected 2$/m)
    expect(metrics).toMatch(/^ferrymq_connections_total\{listener="mqtt"\} 1$/m)
    expect(metrics).toMatch(/^ferrymq_connections_total\{listener="ws"\} 1$/m)

    p.proc.kill('SIGTERM')
    expect(await p.exited(6000)).toBe(0)
  })

  it('port 0 turns a listener off, and each listener binds the host its config names', async () => {
    const config = file('hosts.yaml', 'listeners:\n  mqtt: { host: 127.0.0.1 }\n  http: { host: 127.0.0.1 }\n')
    const { p, mqtt } = await startCli(['--config', config, '--ws-port', '0'])
    const ready = JSON.parse(p.stdout().split('\n').find((l) => l.includes('FerryMQ is ready')) as string) as { listeners: Record<string, string> }
    expect(Object.keys(ready.listeners).sort()).toEqual(['http', 'mqtt'])
    expect(ready.listeners.mqtt).toBe(`127.0.0.1:${mqtt}`)
    const tcp = await connect(`mqtt://127.0.0.1:${mqtt}`)
    await tcp.endAsync()
    p.proc.kill('SIGTERM')
    expect(await p.exited(6000)).toBe(0)
  })

  it('/readyz turns 200 when the broker is ready, with ports from FERRYMQ_* variables and logs off', async () => {
    const [mqtt, ws, http] = await distinctFreePorts(3) as [number, number, number]
    const p = spawnCli([], {
      FERRYMQ_PORT: String(mqtt),
      FERRYMQ_WS_PORT: String(ws),
      FERRYMQ_HTTP_PORT: String(http),
      FERRYMQ_DURABILITY: 'memory',
      FERRYMQ_LOG_LEVEL: 'silent',
    })
    running.push(p)
    const ready = async (): Promise<boolean> => {
      if (p.proc.exitCode !== null) throw new Error(`broker exited with ${p.proc.exitCode}: ${p.stderr()}`)
      return httpStatus(`http://127.0.0.1:${http}/readyz`).then((s) => s === 200, () => false)
    }
    await eventually(ready, 10_000, '/readyz to answer 200')
    // Ready means every listener is up.
    const tcp = await connect(`mqtt://127.0.0.1:${mqtt}`)
    const wsClient = await connect(`ws://127.0.0.1:${ws}/mqtt`)
    expect(tcp.connected && wsClient.connected).toBe(true)
    expect(p.stdout()).toBe('') // log level silent
    p.proc.kill('SIGTERM')
    expect(await p.exited(6000)).toBe(0)
  })

  it.each(['SIGTERM', 'SIGINT'] as const)('%s with clients connected closes them and exits 0 within 5 s', async (signal) => {
    const { p, mqtt, ws, http } = await startCli()
    const tcp = await connect(`mqtt://127.0.0.1:${mqtt}`, { clientId: `tcp-${signal}` })
    const wsClient = await connect(`ws://127.0.0.1:${ws}/mqtt`, { clientId: `ws-${signal}` })
    await tcp.subscribeAsync('bye/#', { qos: 1 })
    const got = collect(tcp, 1)
    await wsClient.publishAsync('bye/now', 'still serving', { qos: 1 })
    expect((await got)[0]?.payload).toBe('still serving')
    // A socket that never sent CONNECT must not hold up the shutdown either.
    const silent = await RawClient.open(mqtt)
    const httpSocket = await RawClient.open(http)

    const closedByBroker = (client: MqttClient): Promise<void> =>
      withTimeout(new Promise<void>((resolve) => client.once('close', () => resolve())), 6000, `${client.options.clientId ?? 'client'} to see the connection close`)
    const tcpClosed = closedByBroker(tcp)
    const wsClosed = closedByBroker(wsClient)
    const startedAt = Date.now()
    p.proc.kill(signal)
    expect(await p.exited(6000)).toBe(0)
    expect(Date.now() - startedAt).toBeLessThan(5000)
    await tcpClosed
    await wsClosed
    await silent.waitClosed(1000)
    await httpSocket.waitClosed(1000)
    expect(tcp.connected || wsClient.connected).toBe(false)
    expect(p.stdout()).toContain(`"signal":"${signal}"`)
    expect(p.stdout()).toContain('FerryMQ stopped')
    expect(p.stderr()).toBe('')
  })
})

import { spawn, fork, execFileSync, type ChildProcess } from 'node:child_process'
import { chmodSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { connect as netConnect, createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

/** A broker (or the discard sink) the bench started, on a loopback port of its own. */
export interface Peer {
  readonly name: string
  readonly port: number
  /** The current process (it changes when the peer restarts). */
  readonly pid: number
  /** Keeps queued messages across a restart: ferrymq-os, ferrymq-fsync, mosquitto-persist. */
  readonly persistent: boolean
  /** User + system CPU seconds the peer's processes have used so far (over restarts). */
  cpuSeconds (): number
  /** Resident set size now, in bytes. */
  rssBytes (): number
  /** Bytes under the peer's directory (config, data directory or persistence file). */
  diskBytes (): number
  /** FerryMQ started with `metrics: true`: the port of its HTTP listener (/metrics). */
  readonly httpPort?: number
  /** The sink only: PUBLISH packets it has received. */
  received? (): Promise<number>
  /**
   * Brokers only: stops the process cleanly (SIGTERM, then waits for it to exit; Mosquitto writes
   * its persistence file then), keeps the peer's directory and spawns it again on the same port,
   * FerryMQ with `durability` if given (same on-disk format for `os` and `fsync`). Resolves right
   * after the spawn, with performance.now() at the spawn, before the broker listens: the caller
   * times how long it takes to accept a client.
   */
  restart? (options?: { durability?: FerryDurability }): Promise<number>
  stop (): Promise<void>
}

export type FerryDurability = 'memory' | 'os' | 'fsync'

export type PeerName = 'ferrymq' | 'ferrymq-os' | 'ferrymq-fsync' | 'mosquitto' | 'mosquitto-persist' | 'sink'

export const FERRYMQ_CLI = fileURLToPath(new URL('../dist/cli.js', import.meta.url))
const SINK = fileURLToPath(new URL('./sink.ts', import.meta.url))
const CLOCK_TICKS = 100 // getconf CLK_TCK on Linux

export async function freePort (): Promise<number> {
  const server = createServer()
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as { port: number }
  await new Promise((resolve) => server.close(resolve))
  return port
}

function procCpuSeconds (pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  return (Number(fields[11]) + Number(fields[12])) / CLOCK_TICKS
}

function procRssBytes (pid: number): number {
  const match = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))
  return match === null ? 0 : Number(match[1]) * 1024
}

async function waitForPort (port: number, proc: ChildProcess, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs
  let exited: number | null | undefined
  proc.once('exit', (code) => { exited = code })
  for (;;) {
    if (exited !== undefined) throw new Error(`peer exited with ${exited} before listening on ${port}`)
    const ok = await new Promise<boolean>((resolve) => {
      const s = netConnect({ port, host: '127.0.0.1' })
      s.once('connect', () => { s.destroy(); resolve(true) })
      s.once('error', () => resolve(false))
    })
    if (ok) return
    if (Date.now() > deadline) throw new Error(`peer did not listen on ${port} within ${timeoutMs} ms`)
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
}

/** Sends SIGTERM and waits for the exit; SIGKILL after `graceMs`. Resolves false if it had to kill. */
async function terminate (proc: ChildProcess, graceMs: number): Promise<boolean> {
  if (proc.exitCode !== null || proc.signalCode !== null) return true
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()))
  proc.kill('SIGTERM')
  let killed = false
  const timer = setTimeout(() => { killed = true; proc.kill('SIGKILL') }, graceMs)
  await exited
  clearTimeout(timer)
  return !killed
}

function stopProcess (proc: ChildProcess, dir: string | null): () => Promise<void> {
  return async () => {
    await terminate(proc, 10_000)
    if (dir !== null) rmSync(dir, { recursive: true, force: true })
  }
}

function dirBytes (path: string): number {
  let total = 0
  for (const entry of readdirSync(path, { withFileTypes: true })) {
    const full = join(path, entry.name)
    try {
      total += entry.isDirectory() ? dirBytes(full) : statSync(full).size
    } catch {
      // A LevelDB file compacted away while we looked.
    }
  }
  return total
}

export interface StartOptions {
  /** Write a V8 CPU profile of FerryMQ into this directory when it stops. */
  profileDir?: string
  /** FerryMQ: YAML lines appended to its config file (top-level keys the bench does not set, e.g. `bridges:`). */
  ferrymqConfig?: readonly string[]
  /**
   * Mosquitto: lines appended to its config file. A global option given here replaces the bench's
   * own line for it (`max_queued_messages 0`); a `connection` section goes last, as Mosquitto wants.
   */
  mosquittoConfig?: readonly string[]
  /** FerryMQ: listen for HTTP (/metrics) on a free loopback port (Peer.httpPort). */
  metrics?: boolean
}

/** The bench's own Mosquitto lines, without those whose option `extra` sets again, then `extra`. */
function mosquittoLines (own: string[], extra: readonly string[]): string[] {
  const option = (line: string): string => line.trim().split(/\s+/)[0] ?? ''
  const bridgeAt = extra.findIndex((l) => option(l) === 'connection')
  const globals = new Set((bridgeAt === -1 ? extra : extra.slice(0, bridgeAt)).map(option))
  globals.delete('listener')
  return [...own.filter((l) => !globals.has(option(l))), ...extra]
}

/** Writes the peer's config into `dir` (once) and spawns it; FerryMQ in `durability`. */
function spawnPeer (name: PeerName, port: number, dir: string, options: StartOptions, durability: FerryDurability, httpPort: number): ChildProcess {
  let proc: ChildProcess
  if (name.startsWith('ferrymq')) {
    const config = join(dir, 'ferrymq.yaml')
    writeFileSync(config, [
      'limits:',
      '  maxConnections: 100000',
      // The default (100,000) drops messages for a full session queue: out of the way, as for Mosquitto.
      '  maxQueuedMessages: 10000000',
      'sys:',
      '  intervalSeconds: 0',
      ...(options.ferrymqConfig ?? []),
      '',
    ].join('\n'))
    const profile = options.profileDir === undefined ? [] : ['--cpu-prof', '--cpu-prof-dir', options.profileDir]
    proc = spawn(process.execPath, [...profile, FERRYMQ_CLI, '--config', config, '--port', String(port), '--ws-port', '0', '--http-port', String(httpPort),
      '--durability', durability, '--data-dir', join(dir, 'data'), '--log-level', 'error'], { stdio: ['ignore', 'ignore', 'inherit'] })
  } else if (name.startsWith('mosquitto')) {
    const persist = name === 'mosquitto-persist'
    // Started as root, Mosquitto drops to its own user before it writes the persistence file.
    if (persist) chmodSync(dir, 0o777)
    const config = join(dir, 'mosquitto.conf')
    writeFileSync(config, mosquittoLines([
      `listener ${port} 127.0.0.1`,
      'allow_anonymous true',
      `persistence ${persist ? 'true' : 'false'}`,
      `persistence_location ${dir}/`,
      // The default (1000) drops acknowledged messages once a session queue is full: out of the way here.
      'max_queued_messages 10000000',
      // The load keeps 100 QoS 1/2 messages in flight per publisher. With the default (20),
      // Mosquitto 2.0.11 acknowledges a 3.1.1 client's QoS 2 messages past 20 and then discards
      // them (measured: 70,952 acknowledged, 14,280 delivered), and tells an MQTT 5 client a
      // Receive Maximum of 20: the same window for every broker instead.
      'max_inflight_messages 100',
      'sys_interval 0',
      'log_dest stderr',
      'log_type error',
    ], options.mosquittoConfig ?? []).join('\n') + '\n')
    proc = spawn('mosquitto', ['-c', config], { stdio: ['ignore', 'ignore', 'inherit'] })
  } else {
    proc = fork(SINK, [String(port)], { execArgv: ['--import', 'tsx'], stdio: ['ignore', 'ignore', 'inherit', 'ipc'] })
  }
  proc.on('error', () => {})
  return proc
}

/** Peers that keep queued messages across a restart. */
export function isPersistent (name: string): boolean {
  return name === 'ferrymq-os' || name === 'ferrymq-fsync' || name === 'mosquitto-persist'
}

function ferryDurability (name: PeerName): FerryDurability {
  return name === 'ferrymq' ? 'memory' : name.slice('ferrymq-'.length) as FerryDurability
}

/** Starts one peer with the settings a benchmark needs (connection and queue limits out of the way). */
export async function startPeer (name: PeerName, options: StartOptions = {}): Promise<Peer> {
  const port = await freePort()
  const dir = mkdtempSync(join(tmpdir(), `bench-${name}-`))
  const httpPort = options.metrics === true && name.startsWith('ferrymq') ? await freePort() : 0
  let proc = spawnPeer(name, port, dir, options, ferryDurability(name), httpPort)
  try {
    await waitForPort(port, proc)
  } catch (err) {
    await stopProcess(proc, dir)()
    throw err
  }
  // CPU of processes that have exited (restarts), read just before each was asked to stop.
  let pastCpu = 0
  const p: Peer = {
    name,
    port,
    get pid () { return proc.pid as number },
    persistent: isPersistent(name),
    cpuSeconds: () => pastCpu + (proc.exitCode === null && proc.signalCode === null ? procCpuSeconds(proc.pid as number) : 0),
    rssBytes: () => procRssBytes(proc.pid as number),
    diskBytes: () => dirBytes(dir),
    ...(httpPort === 0 ? {} : { httpPort }),
    stop: () => stopProcess(proc, dir)(),
  }
  if (name === 'sink') {
    return {
      ...p,
      received: () => new Promise<number>((resolve) => {
        proc.once('message', (m) => resolve((m as { received: number }).received))
        proc.send('count')
      }),
    }
  }
  p.restart = async (restartOptions = {}) => {
    pastCpu += procCpuSeconds(proc.pid as number)
    // A million queued messages take a while to write out (Mosquitto) or close (LevelDB).
    if (!await terminate(proc, 120_000)) throw new Error(`${name} did not exit within 120 s of SIGTERM`)
    const spawnedAt = performance.now()
    proc = spawnPeer(name, port, dir, options, restartOptions.durability ?? ferryDurability(name), httpPort)
    return spawnedAt
  }
  return p
}

/** Versions for the report. */
export function mosquittoVersion (): string {
  try {
    const out = execFileSync('mosquitto', ['-h'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] })
    return /mosquitto version (\S+)/.exec(out)?.[1] ?? 'unknown'
  } catch (err) {
    const out = String((err as { stdout?: string }).stdout ?? '')
    return /mosquitto version (\S+)/.exec(out)?.[1] ?? 'not installed'
  }
}

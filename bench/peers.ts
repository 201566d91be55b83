import { spawn, fork, execFileSync, type ChildProcess } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { connect as netConnect, createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

/** A broker (or the discard sink) the bench started, on a loopback port of its own. */
export interface Peer {
  readonly name: string
  readonly port: number
  readonly pid: number
  /** User + system CPU seconds the process has used so far. */
  cpuSeconds (): number
  /** Resident set size now, in bytes. */
  rssBytes (): number
  /** The sink only: PUBLISH packets it has received. */
  received? (): Promise<number>
  stop (): Promise<void>
}

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

function stopProcess (proc: ChildProcess, dir: string | null): () => Promise<void> {
  return async () => {
    if (proc.exitCode === null && proc.signalCode === null) {
      const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()))
      proc.kill('SIGTERM')
      const timer = setTimeout(() => proc.kill('SIGKILL'), 10_000)
      await exited
      clearTimeout(timer)
    }
    if (dir !== null) rmSync(dir, { recursive: true, force: true })
  }
}

function peer (name: string, port: number, proc: ChildProcess, dir: string | null): Peer {
  const pid = proc.pid as number
  return { name, port, pid, cpuSeconds: () => procCpuSeconds(pid), rssBytes: () => procRssBytes(pid), stop: stopProcess(proc, dir) }
}

export interface StartOptions {
  /** Write a V8 CPU profile of FerryMQ into this directory when it stops. */
  profileDir?: string
}

/** Starts one peer with the settings a benchmark needs (connection and queue limits out of the way). */
export async function startPeer (name: PeerName, options: StartOptions = {}): Promise<Peer> {
  const port = await freePort()
  const dir = mkdtempSync(join(tmpdir(), `bench-${name}-`))
  let proc: ChildProcess
  if (name.startsWith('ferrymq')) {
    const durability = name === 'ferrymq' ? 'memory' : name.slice('ferrymq-'.length)
    const config = join(dir, 'ferrymq.yaml')
    writeFileSync(config, [
      'limits:',
      '  maxConnections: 100000',
      'sys:',
      '  intervalSeconds: 0',
      '',
    ].join('\n'))
    const profile = options.profileDir === undefined ? [] : ['--cpu-prof', '--cpu-prof-dir', options.profileDir]
    proc = spawn(process.execPath, [...profile, FERRYMQ_CLI, '--config', config, '--port', String(port), '--ws-port', '0', '--http-port', '0',
      '--durability', durability, '--data-dir', join(dir, 'data'), '--log-level', 'error'], { stdio: ['ignore', 'ignore', 'inherit'] })
  } else if (name.startsWith('mosquitto')) {
    const persist = name === 'mosquitto-persist'
    const config = join(dir, 'mosquitto.conf')
    writeFileSync(config, [
      `listener ${port} 127.0.0.1`,
      'allow_anonymous true',
      `persistence ${persist ? 'true' : 'false'}`,
      `persistence_location ${dir}/`,
      // The default (1000) drops acknowledged messages once a session queue is full: out of the way here.
      'max_queued_messages 10000000',
      'sys_interval 0',
      'log_dest stderr',
      'log_type error',
      '',
    ].join('\n'))
    proc = spawn('mosquitto', ['-c', config], { stdio: ['ignore', 'ignore', 'inherit'] })
  } else {
    proc = fork(SINK, [String(port)], { execArgv: ['--import', 'tsx'], stdio: ['ignore', 'ignore', 'inherit', 'ipc'] })
  }
  proc.on('error', () => {})
  try {
    await waitForPort(port, proc)
  } catch (err) {
    await stopProcess(proc, dir)()
    throw err
  }
  const p = peer(name, port, proc, dir)
  if (name !== 'sink') return p
  return {
    ...p,
    received: () => new Promise<number>((resolve) => {
      proc.once('message', (m) => resolve((m as { received: number }).received))
      proc.send('count')
    }),
  }
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

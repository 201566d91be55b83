import { spawn, type ChildProcess } from 'node:child_process'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { connect as netConnect, createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
// The mosquitto executable: $MOSQUITTO_BIN, else on $PATH, else /usr/sbin or /usr/local/sbin.
import { findMosquitto } from '../../firmware-sim/src/e2e/cloud.js'

/**
 * A real Mosquitto broker as a child process, for integration tests (the upstream of FerryMQ's bridge).
 *
 * Notes on Mosquitto 2.0.11 (Debian) that shaped this fixture:
 * - Run as root it drops privileges to user `mosquitto` unless the config says `user root`; the
 *   fixture's temp dir is root-owned, so `user root` is written to let it save persistence there.
 * - `max_queued_messages 0` and `max_inflight_messages 0` both mean "no maximum" and are accepted.
 * - A websockets listener ignores the bind address (libwebsockets listens on `*`), so `wsPort` is
 *   reachable on 127.0.0.1 but is bound on every interface.
 */

export interface MosquittoOptions {
  /** Keep sessions/queued messages in a persistence file under the fixture's temp dir across restart(). Default false. */
  persistence?: boolean
  /** TLS listener instead of plain TCP: PEM file paths. requireCertificate → `require_certificate true` (mTLS). */
  tls?: { cert: string, key: string, ca: string, requireCertificate?: boolean }
  /** Also open a WebSocket listener (`listener WSPORT 127.0.0.1` + `protocol websockets`, on a second free port). Plain ws even with `tls`. */
  websockets?: boolean
  /** Extra mosquitto.conf lines, appended. */
  extra?: string[]
  /** How long start()/restart() wait for the broker to accept connections. Default 10 000 ms. */
  readyTimeoutMs?: number
}

export interface Mosquitto {
  /** The MQTT (or MQTTS when tls) port, bound on 127.0.0.1. */
  port: number
  wsPort?: number
  /** mqtt://127.0.0.1:PORT or mqtts://127.0.0.1:PORT */
  url: string
  /** ws://127.0.0.1:WSPORT (mosquitto serves any path) */
  wsUrl?: string
  /** Pid of the current (or last) process; changes on restart(). */
  pid: number
  /** The fixture's temp dir (mosquitto.conf, mosquitto.db). */
  dir: string
  /** The last ~64 KiB of Mosquitto's log (stderr) across all of its runs. */
  log (): string
  /** SIGTERM, wait for exit (persistence written). Same port, same config, same dir on restart(). */
  stop (): Promise<void>
  /** SIGKILL and wait for exit. */
  kill (): Promise<void>
  /** Start again on the same port(s) after stop()/kill() (stops it first if still running); resolves when it accepts connections. */
  restart (): Promise<void>
  /** stop() if running and remove the temp dir (afterAll/afterEach). */
  close (): Promise<void>
}

const LOG_LIMIT = 64 * 1024
const START_ATTEMPTS = 5
const EXIT_TIMEOUT_MS = 10_000
const POLL_INTERVAL_MS = 25

/** True when the mosquitto binary is available (tests use describe.skipIf(!hasMosquitto()) with a reason). */
export function hasMosquitto (): boolean {
  return findMosquitto() !== null
}

/** A port that was free on 127.0.0.1 a moment ago. */
async function freePort (): Promise<number> {
  const server = createServer()
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(0, '127.0.0.1', resolve)
  })
  const { port } = server.address() as { port: number }
  await new Promise((resolve) => server.close(resolve))
  return port
}

/** Resolves true once a TCP connection to 127.0.0.1:port succeeds, false when it is refused/fails. */
function tryConnect (port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = netConnect({ host: '127.0.0.1', port })
    const done = (ok: boolean): void => {
      socket.removeAllListeners()
      socket.on('error', () => {})
      socket.destroy()
      resolve(ok)
    }
    socket.setTimeout(1000, () => done(false))
    socket.once('connect', () => done(true))
    socket.once('error', () => done(false))
  })
}

function configText (dir: string, port: number, wsPort: number | undefined, options: MosquittoOptions): string {
  const lines = [
    '# written by test/helpers/mosquitto.ts',
    'user root',
    'allow_anonymous true',
    'log_dest stderr',
    'log_type error',
    'log_type warning',
    'log_type notice',
    'log_type information',
    'log_timestamp_format %Y-%m-%dT%H:%M:%S',
    // 0 = no maximum for the per-client queue (2.0 default is 1000).
    'max_queued_messages 0',
  ]
  if (options.persistence === true) {
    lines.push('persistence true', `persistence_location ${dir}/`, 'autosave_interval 1')
  } else {
    lines.push('persistence false')
  }
  lines.push(`listener ${port} 127.0.0.1`)
  if (options.tls !== undefined) {
    lines.push(`cafile ${options.tls.ca}`, `certfile ${options.tls.cert}`, `keyfile ${options.tls.key}`,
      `require_certificate ${options.tls.requireCertificate === true ? 'true' : 'false'}`)
  }
  if (wsPort !== undefined) lines.push(`listener ${wsPort} 127.0.0.1`, 'protocol websockets')
  lines.push(...(options.extra ?? []))
  return lines.join('\n') + '\n'
}

interface Running {
  proc: ChildProcess
  /** This run's log, up to the point it was ready (bounded). */
  out: string
  exit: Promise<number | string>
  exited: boolean
}

class StartError extends Error {
  constructor (message: string, readonly portInUse: boolean) {
    super(message)
  }
}

/** Starts Mosquitto with a generated config in a fresh temp dir; resolves when it accepts connections. */
export async function startMosquitto (options: MosquittoOptions = {}): Promise<Mosquitto> {
  const bin = findMosquitto()
  if (bin === null) throw new Error('mosquitto binary not found (set MOSQUITTO_BIN or install mosquitto)')
  const readyTimeoutMs = options.readyTimeoutMs ?? 10_000
  const dir = mkdtempSync(join(tmpdir(), 'ferrymq-mosquitto-'))
  const configPath = join(dir, 'mosquitto.conf')

  let log = ''
  const appendLog = (chunk: string): void => {
    log += chunk
    if (log.length > LOG_LIMIT) log = log.slice(log.length - LOG_LIMIT)
  }

  let running: Running | undefined
  let port = 0
  let wsPort: number | undefined

  const spawnOnce = (): Running => {
    const proc = spawn(bin, ['-c', configPath], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] })
    const r: Running = { proc, out: '', exited: false, exit: undefined as unknown as Promise<number | string> }
    r.exit = new Promise((resolve) => {
      proc.once('exit', (code, signal) => {
        r.exited = true
        resolve(code ?? signal ?? -1)
      })
      // spawn failure (ENOENT, EACCES): 'exit' may never come.
      proc.once('error', (err) => {
        appendLog(`spawn error: ${err.message}\n`)
        r.exited = true
        resolve(-1)
      })
    })
    const onData = (chunk: string): void => {
      appendLog(chunk)
      if (r.out.length < LOG_LIMIT) r.out += chunk
    }
    proc.stdout?.setEncoding('utf8').on('data', onData)
    proc.stderr?.setEncoding('utf8').on('data', onData)
    return r
  }

  /** Spawns and waits until it logged "running" and every port accepts a TCP connection. */
  const launch = async (): Promise<void> => {
    const r = spawnOnce()
    running = r
    const ports = wsPort === undefined ? [port] : [port, wsPort]
    const deadline = Date.now() + readyTimeoutMs
    // The "running" line proves *this* process opened its listeners (not some other process
    // that grabbed the port); the TCP connects prove they accept connections.
    const sinceSpawn = (): string => r.out
    for (;;) {
      if (r.exited) {
        const code = await r.exit
        const out = sinceSpawn()
        throw new StartError(`mosquitto exited with ${code} before it was ready (ports ${ports.join(', ')}):\n${out}`,
          /Address already in use|Unable to create websockets listener/i.test(out))
      }
      if (/mosquitto version \S+ running/.test(sinceSpawn())) {
        const ok = await Promise.all(ports.map(tryConnect))
        if (ok.every(Boolean) && !r.exited) return
      }
      if (Date.now() > deadline) {
        await terminate(r, 'SIGKILL')
        throw new StartError(`mosquitto did not accept connections on ${ports.join(', ')} within ${readyTimeoutMs} ms:\n${sinceSpawn()}`, false)
      }
      await new Promise((resolve) => setTimeout(resolve, POLL_INTERVAL_MS))
    }
  }

  const terminate = async (r: Running, signal: NodeJS.Signals): Promise<void> => {
    if (r.exited) return
    r.proc.kill(signal)
    let timer: NodeJS.Timeout | undefined
    const timedOut = await Promise.race([
      r.exit.then(() => false),
      new Promise<boolean>((resolve) => { timer = setTimeout(() => resolve(true), EXIT_TIMEOUT_MS) }),
    ])
    clearTimeout(timer)
    if (timedOut) {
      r.proc.kill('SIGKILL')
      await r.exit
      throw new Error(`mosquitto (pid ${r.proc.pid}) did not exit within ${EXIT_TIMEOUT_MS} ms of ${signal}; killed it`)
    }
  }

  // First start: fresh free ports each attempt, retrying when another process took one meanwhile.
  try {
    for (let attempt = 1; ; attempt++) {
      port = await freePort()
      wsPort = options.websockets === true ? await freePort() : undefined
      while (wsPort === port) wsPort = await freePort()
      writeFileSync(configPath, configText(dir, port, wsPort, options))
      try {
        await launch()
        break
      } catch (err) {
        if (!(err instanceof StartError && err.portInUse) || attempt >= START_ATTEMPTS) throw err
      }
    }
  } catch (err) {
    if (running !== undefined) await terminate(running, 'SIGKILL').catch(() => {})
    rmSync(dir, { recursive: true, force: true })
    throw err
  }

  const scheme = options.tls !== undefined ? 'mqtts' : 'mqtt'
  let closed = false
  const fixture: Mosquitto = {
    port,
    url: `${scheme}://127.0.0.1:${port}`,
    ...(wsPort !== undefined ? { wsPort, wsUrl: `ws://127.0.0.1:${wsPort}` } : {}),
    get pid (): number { return running?.proc.pid ?? -1 },
    dir,
    log: () => log,
    stop: async () => { if (running !== undefined) await terminate(running, 'SIGTERM') },
    kill: async () => { if (running !== undefined) await terminate(running, 'SIGKILL') },
    restart: async () => {
      if (closed) throw new Error('mosquitto fixture was closed')
      // Still running: stop it gracefully first; either way the old process has exited before the new one binds.
      if (running !== undefined) await terminate(running, 'SIGTERM')
      try {
        await launch()
      } catch (err) {
        if (running !== undefined) await terminate(running, 'SIGKILL').catch(() => {})
        throw err
      }
    },
    close: async () => {
      if (closed) return
      closed = true
      try {
        if (running !== undefined) await terminate(running, 'SIGTERM')
      } finally {
        rmSync(dir, { recursive: true, force: true })
      }
    },
  }
  return fixture
}

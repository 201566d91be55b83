import { spawn, type ChildProcess } from 'node:child_process'
import { accessSync, constants, writeFileSync } from 'node:fs'
import { delimiter, join } from 'node:path'
import { freePort, LogTail, tryConnect } from './util.js'

/*
 * The "cloud": a real Mosquitto (Debian's `mosquitto` binary) as a child process, with its config
 * written into the topology's temp dir. Mosquitto 2.0.11 run as root drops privileges to the
 * `mosquitto` user unless told `user root`, and then could not write persistence into a root-owned
 * temp dir; `max_queued_messages 0` means "no maximum".
 */

export interface CloudOptions {
  /** Keep sessions and queued messages in mosquitto.db (saved every second and at a clean stop). Default false. */
  persistence?: boolean
  /** Mosquitto's max_inflight_messages (QoS 1/2 in flight per client). Default 100. */
  maxInflightMessages?: number
  /** Mosquitto's max_queued_messages per client; 0 = no maximum. Default 0. */
  maxQueuedMessages?: number
  /** Extra mosquitto.conf lines, appended. */
  extraConfig?: string[]
  /** How long start waits for Mosquitto to accept connections. Default 10 000 ms. */
  readyTimeoutMs?: number
}

let cachedBinary: string | null | undefined

/** The mosquitto executable: $MOSQUITTO_BIN, else on $PATH, else /usr/sbin or /usr/local/sbin; null when absent. */
export function findMosquitto (): string | null {
  if (cachedBinary !== undefined) return cachedBinary
  const candidates = [
    ...(process.env.MOSQUITTO_BIN !== undefined && process.env.MOSQUITTO_BIN !== '' ? [process.env.MOSQUITTO_BIN] : []),
    ...(process.env.PATH ?? '').split(delimiter).filter((d) => d !== '').map((d) => join(d, 'mosquitto')),
    '/usr/sbin/mosquitto',
    '/usr/local/sbin/mosquitto',
  ]
  cachedBinary = candidates.find((path) => {
    try {
      accessSync(path, constants.X_OK)
      return true
    } catch {
      return false
    }
  }) ?? null
  return cachedBinary
}

/** True when the mosquitto binary is available. */
export function hasMosquitto (): boolean {
  return findMosquitto() !== null
}

export class Cloud {
  readonly log = new LogTail()
  #proc: ChildProcess | null = null
  #exit: Promise<number | string> = Promise.resolve(0)
  #exited = true

  private constructor (readonly bin: string, readonly dir: string, readonly port: number) {}

  get url (): string {
    return `mqtt://127.0.0.1:${this.port}`
  }

  get pid (): number | undefined {
    return this.#exited ? undefined : this.#proc?.pid
  }

  /** Starts Mosquitto on a free port with a config in `dir`; tries other ports when one was taken meanwhile. */
  static async start (dir: string, options: CloudOptions = {}): Promise<Cloud> {
    const bin = findMosquitto()
    if (bin === null) throw new Error('mosquitto binary not found (install the Debian package `mosquitto`, or set MOSQUITTO_BIN)')
    for (let attempt = 1; ; attempt++) {
      const cloud = new Cloud(bin, dir, await freePort())
      cloud.#writeConfig(options)
      try {
        await cloud.#launch(options.readyTimeoutMs ?? 10_000)
        return cloud
      } catch (err) {
        await cloud.kill()
        if (attempt >= 5 || !/Address already in use/i.test(cloud.log.text)) throw err
      }
    }
  }

  #writeConfig (options: CloudOptions): void {
    const lines = [
      '# written by firmware-sim/src/e2e/cloud.ts',
      ...(process.getuid?.() === 0 ? ['user root'] : []),
      'allow_anonymous true',
      'log_dest stderr',
      'log_type error',
      'log_type warning',
      'log_type notice',
      'log_type information',
      'log_timestamp_format %Y-%m-%dT%H:%M:%S',
      `max_inflight_messages ${options.maxInflightMessages ?? 100}`,
      `max_queued_messages ${options.maxQueuedMessages ?? 0}`,
    ]
    if (options.persistence === true) {
      lines.push('persistence true', `persistence_location ${this.dir}/`, 'autosave_interval 1')
    } else {
      lines.push('persistence false')
    }
    lines.push(`listener ${this.port} 127.0.0.1`, ...(options.extraConfig ?? []))
    writeFileSync(join(this.dir, 'mosquitto.conf'), lines.join('\n') + '\n')
  }

  /** Spawns and resolves once this process logged "running" and its port accepts a TCP connection. */
  async #launch (timeoutMs: number): Promise<void> {
    const proc = spawn(this.bin, ['-c', join(this.dir, 'mosquitto.conf')], { cwd: this.dir, stdio: ['ignore', 'pipe', 'pipe'] })
    this.#proc = proc
    this.#exited = false
    let out = ''
    this.#exit = new Promise((resolve) => {
      proc.once('exit', (code, signal) => {
        this.#exited = true
        resolve(code ?? signal ?? -1)
      })
      proc.once('error', (err) => {
        this.log.append(`spawn error: ${err.message}\n`)
        this.#exited = true
        resolve(-1)
      })
    })
    const onData = (chunk: string): void => {
      this.log.append(chunk)
      if (out.length < 65536) out += chunk
    }
    proc.stdout?.setEncoding('utf8').on('data', onData)
    proc.stderr?.setEncoding('utf8').on('data', onData)
    const deadline = Date.now() + timeoutMs
    for (;;) {
      if (this.#exited) throw new Error(`mosquitto exited with ${String(await this.#exit)} before it was ready (port ${this.port}):\n${out}`)
      // The "running" line proves that this process opened the listener, not another one that took the port.
      if (/mosquitto version \S+ running/.test(out) && await tryConnect(this.port) && !this.#exited) return
      if (Date.now() > deadline) throw new Error(`mosquitto did not accept connections on port ${this.port} within ${timeoutMs} ms:\n${out}`)
      await new Promise((resolve) => setTimeout(resolve, 25))
    }
  }

  /** SIGTERM (Mosquitto saves persistence), SIGKILL if it has not exited within `timeoutMs`. */
  async stop (timeoutMs = 5000): Promise<void> {
    await this.#signal('SIGTERM', timeoutMs)
  }

  async kill (): Promise<void> {
    await this.#signal('SIGKILL', 5000)
  }

  /** Starts again on the same port with the same config and dir (stopping it first if it runs). */
  async restart (timeoutMs = 10_000): Promise<void> {
    await this.stop()
    await this.#launch(timeoutMs)
  }

  /** SIGKILL by pid, synchronously (process 'exit' handler). */
  killSync (): void {
    if (!this.#exited) this.#proc?.kill('SIGKILL')
  }

  async #signal (signal: NodeJS.Signals, timeoutMs: number): Promise<void> {
    const proc = this.#proc
    if (proc === null || this.#exited) return
    proc.kill(signal)
    let timer: NodeJS.Timeout | undefined
    const timedOut = await Promise.race([
      this.#exit.then(() => false),
      new Promise<boolean>((resolve) => { timer = setTimeout(() => resolve(true), timeoutMs) }),
    ])
    clearTimeout(timer)
    if (timedOut) {
      proc.kill('SIGKILL')
      await this.#exit
    }
  }
}

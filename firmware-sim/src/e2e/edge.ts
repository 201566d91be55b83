import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { createWriteStream, existsSync, readdirSync, statSync, type WriteStream } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { LogTail, withTimeout } from './util.js'

/*
 * FerryMQ as a child process: `node dist/cli.js --config <file>`, killed with SIGKILL and started
 * again on the same config, ports and data dir. Its JSON log lines go to a file per run in the
 * topology's temp dir, and the last 64 KiB are kept for error messages.
 */

/** The repository root (firmware-sim/src/e2e/ → ../../..). */
export const REPO_ROOT = fileURLToPath(new URL('../../../', import.meta.url))

/** Newest modification time (ms) of a file under `dir`. */
function newestMtime (dir: string): number {
  let newest = 0
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name)
    newest = Math.max(newest, entry.isDirectory() ? newestMtime(path) : statSync(path).mtimeMs)
  }
  return newest
}

/** True when dist/cli.js is missing or older than a file under src/. */
export function distIsStale (repoRoot = REPO_ROOT): boolean {
  const cli = join(repoRoot, 'dist', 'cli.js')
  if (!existsSync(cli)) return true
  return newestMtime(join(repoRoot, 'src')) > statSync(cli).mtimeMs
}

/**
 * Builds FerryMQ (`npm run build`) when `build` is 'always', or 'auto' and dist is stale; throws
 * with the compiler's output when the build fails. Synchronous: it runs before anything starts.
 */
export function ensureBuilt (build: 'auto' | 'always' | 'never', repoRoot = REPO_ROOT, log: (line: string) => void = () => {}): void {
  if (build === 'never' || (build === 'auto' && !distIsStale(repoRoot))) return
  log('building FerryMQ (npm run build)')
  const result = spawnSync('npm', ['run', 'build', '--silent'], { cwd: repoRoot, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] })
  if (result.status !== 0) throw new Error(`npm run build failed (${String(result.status ?? result.signal)}):\n${result.stdout}${result.stderr}`)
}

export class EdgeProcess {
  readonly log = new LogTail()
  /** Number of runs started so far (the current run's log file is edge-<runs>.log). */
  runs = 0
  #proc: ChildProcess | null = null
  #exit: Promise<number | string> = Promise.resolve(0)
  #exited = true
  #file: WriteStream | null = null

  constructor (readonly cliPath: string, readonly configPath: string, readonly logDir: string) {}

  get pid (): number | undefined {
    return this.#exited ? undefined : this.#proc?.pid
  }

  get running (): boolean {
    return !this.#exited
  }

  /**
   * Spawns FerryMQ and resolves once it logged "FerryMQ is ready" (every listener open); rejects
   * when it exits first (with its output) or after `timeoutMs` (after killing it).
   */
  async start (timeoutMs: number): Promise<void> {
    if (!this.#exited) throw new Error('FerryMQ is already running')
    this.runs++
    // The config file decides everything: no FERRYMQ_* variable from the caller's environment overrides it.
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('FERRYMQ_')))
    const proc = spawn(process.execPath, [this.cliPath, '--config', this.configPath], { env, stdio: ['ignore', 'pipe', 'pipe'] })
    this.#proc = proc
    this.#exited = false
    const file = createWriteStream(join(this.logDir, `edge-${this.runs}.log`))
    file.on('error', () => {})
    this.#file = file
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
    let out = ''
    let ready: () => void = () => {}
    const readyPromise = new Promise<void>((resolve) => { ready = resolve })
    const onData = (chunk: string): void => {
      this.log.append(chunk)
      file.write(chunk)
      if (out.length < 1 << 20) {
        out += chunk
        if (out.includes('FerryMQ is ready')) ready()
      }
    }
    proc.stdout?.setEncoding('utf8').on('data', onData)
    proc.stderr?.setEncoding('utf8').on('data', onData)
    // Closing the log file once both pipes are done keeps the last lines of a killed run.
    proc.once('close', () => file.end())
    try {
      await withTimeout(Promise.race([
        readyPromise,
        this.#exit.then((code) => { throw new Error(`FerryMQ exited with ${String(code)} before it was ready:\n${out.slice(-4000)}`) }),
      ]), timeoutMs, () => `FerryMQ readiness ("FerryMQ is ready"); output so far:\n${out.slice(-4000)}`)
    } catch (err) {
      await this.kill()
      throw err
    }
  }

  /** SIGKILL and wait for the exit; resolves with the exit code or signal name (undefined if not running). */
  async kill (timeoutMs = 10_000): Promise<number | string | undefined> {
    if (this.#proc === null || this.#exited) return undefined
    this.#proc.kill('SIGKILL')
    return await withTimeout(this.#exit, timeoutMs, `FerryMQ (pid ${String(this.#proc.pid)}) exit after SIGKILL`)
  }

  /** SIGTERM (FerryMQ closes clients and flushes), SIGKILL after `timeoutMs`. */
  async stop (timeoutMs = 7000): Promise<number | string | undefined> {
    const proc = this.#proc
    if (proc === null || this.#exited) return undefined
    proc.kill('SIGTERM')
    let timer: NodeJS.Timeout | undefined
    const result = await Promise.race([
      this.#exit,
      new Promise<undefined>((resolve) => { timer = setTimeout(() => resolve(undefined), timeoutMs) }),
    ])
    clearTimeout(timer)
    if (result !== undefined) return result
    proc.kill('SIGKILL')
    return await this.#exit
  }

  /** SIGKILL by pid, synchronously (process 'exit' handler). */
  killSync (): void {
    if (!this.#exited) this.#proc?.kill('SIGKILL')
  }

  /** Resolves once the log file of the last run is flushed. */
  async flushLog (): Promise<void> {
    const file = this.#file
    if (file === null || file.closed) return
    await new Promise<void>((resolve) => {
      file.once('close', () => resolve())
      file.once('error', () => resolve())
      file.end()
    })
  }
}

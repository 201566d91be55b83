import { spawn, type ChildProcess } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { withTimeout } from './clients.js'

/** The built CLI (npm test builds before vitest runs). */
export const CLI = fileURLToPath(new URL('../../dist/cli.js', import.meta.url))

/** A port that was free a moment ago on 127.0.0.1 (for child processes, which take explicit ports). */
export { freePort } from '../../bench/peers.js'

export interface BrokerProcess {
  proc: ChildProcess
  stdout (): string
  stderr (): string
  /** Resolves once the broker logged "FerryMQ is ready". */
  ready (timeoutMs?: number): Promise<void>
  /** Resolves with the exit code (or signal name) once the process ends. */
  exited (timeoutMs?: number): Promise<number | string>
}

/** Runs `node dist/cli.js ARGS` with `env` added to a FERRYMQ_-free environment. */
export function spawnCli (args: string[], env: Record<string, string> = {}): BrokerProcess {
  const base = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('FERRYMQ_')))
  const proc = spawn(process.execPath, [CLI, ...args], { env: { ...base, ...env }, stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  let err = ''
  proc.stdout?.setEncoding('utf8').on('data', (d: string) => { out += d })
  proc.stderr?.setEncoding('utf8').on('data', (d: string) => { err += d })
  const exit = new Promise<number | string>((resolve) => proc.once('exit', (code, signal) => resolve(code ?? signal ?? -1)))
  return {
    proc,
    stdout: () => out,
    stderr: () => err,
    ready: (timeoutMs = 10_000) => withTimeout(new Promise<void>((resolve, reject) => {
      const check = (): void => {
        if (out.includes('FerryMQ is ready')) resolve()
      }
      proc.stdout?.on('data', check)
      check()
      void exit.then((code) => reject(new Error(`broker exited with ${code} before it was ready: ${err}${out}`)))
    }), timeoutMs, () => `broker readiness; stdout so far: ${out}; stderr: ${err}`),
    exited: (timeoutMs = 10_000) => withTimeout(exit, timeoutMs, 'broker process exit'),
  }
}

import { connect as netConnect, createServer } from 'node:net'

/*
 * Small pieces the end-to-end topology shares: free ports, TCP probes, condition waits with a
 * deadline, a bounded log buffer and the step log on stderr.
 */

/** A port that was free on 127.0.0.1 a moment ago (callers retry when another process takes it first). */
export async function freePort (): Promise<number> {
  const server = createServer()
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => resolve())
  })
  const { port } = server.address() as { port: number }
  await new Promise<void>((resolve) => server.close(() => resolve()))
  return port
}

/** Resolves true once a TCP connection to 127.0.0.1:port succeeds, false when it is refused or times out. */
export function tryConnect (port: number, timeoutMs = 1000): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = netConnect({ host: '127.0.0.1', port })
    const done = (ok: boolean): void => {
      socket.removeAllListeners()
      socket.on('error', () => {})
      socket.destroy()
      resolve(ok)
    }
    socket.setTimeout(timeoutMs, () => done(false))
    socket.once('connect', () => done(true))
    socket.once('error', () => done(false))
  })
}

/** Rejects with `what` (a string or a function giving one, evaluated at the timeout) when `promise` takes longer than `ms`. */
export async function withTimeout<T> (promise: Promise<T>, ms: number, what: string | (() => string)): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_resolve, reject) => {
        timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${typeof what === 'function' ? what() : what}`)), ms)
      }),
    ])
  } finally {
    clearTimeout(timer)
  }
}

/** Thrown by a pollUntil check to stop polling at once (the condition can no longer come true). */
export class PollAbort extends Error {}

/**
 * Polls `check` every `intervalMs` until it returns a value other than undefined/false, and
 * resolves with it; rejects after `timeoutMs` with `what` (and the last error `check` threw).
 * For conditions that have no event (an HTTP endpoint, a port that opens). A PollAbort thrown by
 * `check` ends the wait at once.
 */
export async function pollUntil<T> (check: () => Promise<T | undefined | false> | T | undefined | false, timeoutMs: number, what: string | (() => string), intervalMs = 50): Promise<T> {
  const deadline = Date.now() + timeoutMs
  let lastError: unknown
  for (;;) {
    try {
      const value = await check()
      if (value !== undefined && value !== false) return value
    } catch (err) {
      if (err instanceof PollAbort) throw err
      lastError = err
    }
    if (Date.now() >= deadline) {
      const detail = lastError instanceof Error ? ` (last error: ${lastError.message})` : ''
      throw new Error(`timed out after ${timeoutMs} ms: ${typeof what === 'function' ? what() : what}${detail}`)
    }
    await new Promise((resolve) => setTimeout(resolve, intervalMs))
  }
}

/** The tail of a child process's output (bounded), for error messages. */
export class LogTail {
  #text = ''
  constructor (readonly limit = 64 * 1024) {}
  append (chunk: string): void {
    this.#text += chunk
    if (this.#text.length > this.limit) this.#text = this.#text.slice(this.#text.length - this.limit)
  }

  get text (): string {
    return this.#text
  }
}

/** Writes `[e2e HH:MM:SS.mmm] message` to stderr unless `quiet`. */
export function logLine (message: string, quiet = false): void {
  if (quiet) return
  process.stderr.write(`[e2e ${new Date().toISOString().slice(11, 23)}] ${message}\n`)
}

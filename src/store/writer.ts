import type { ClassicLevel } from 'classic-level'

/** The store's database: Buffer keys and values. */
export type Db = ClassicLevel<Buffer, Buffer>

function createSublevel (db: Db, name: string) {
  return db.sublevel<Buffer, Buffer>(name, { keyEncoding: 'buffer', valueEncoding: 'buffer' })
}

/** A sublevel of the store's database. */
export type Sublevel = ReturnType<typeof createSublevel>

const sublevels = new WeakMap<Db, Map<string, Sublevel>>()

/**
 * The named sublevel of `db` with Buffer keys and values. One instance per name and database, so
 * the store can re-open every sublevel in use after it has re-opened the database (see open.ts).
 */
export function sublevelOf (db: Db, name: string): Sublevel {
  let byName = sublevels.get(db)
  if (byName === undefined) {
    byName = new Map()
    sublevels.set(db, byName)
  }
  let sub = byName.get(name)
  if (sub === undefined) {
    sub = createSublevel(db, name)
    byName.set(name, sub)
  }
  return sub
}

/** Every sublevel handed out for `db` so far. */
export function sublevelsOf (db: Db): Sublevel[] {
  return [...(sublevels.get(db)?.values() ?? [])]
}

/** One write, addressed to a sublevel; a batch of these is atomic across sublevels. */
export type StoreOp =
  | { type: 'put', sublevel: Sublevel, key: Buffer, value: Buffer }
  | { type: 'del', sublevel: Sublevel, key: Buffer }

/** What the writer needs from the database (a ClassicLevel, or a stand-in in tests). */
export interface BatchTarget {
  batch (ops: StoreOp[], options: { sync: boolean }): Promise<void>
}

/** `fsync`: each batch is on stable storage before its callers resolve; `os`: handed to the OS. */
export type Durability = 'fsync' | 'os'

/** Counters for metrics. */
export interface WriterStats {
  /** Batches written successfully. */
  batches: number
  /** Operations in those batches. */
  ops: number
  /** `write()` calls resolved. */
  writes: number
  /** Batches that failed (their callers were rejected). */
  failedBatches: number
  /** `write()` calls rejected at once because the store was unavailable. */
  refusedWrites: number
}

/** What the writer reports as it goes (metrics). */
export interface WriterObserver {
  /** A batch was written: its operations, the `write()` calls it served and how long it took. */
  batch? (ops: number, writes: number, seconds: number): void
  /** A batch failed; every caller in it was rejected with `err`. */
  failed? (err: Error, writes: number): void
  /** A write was refused at once: the store is unavailable. */
  refused? (): void
}

/** Thrown to writers while the store is unavailable (after a failed batch, until it has recovered). */
export class StoreUnavailableError extends Error {
  constructor (readonly reason: Error) {
    super(`store unavailable after a write error (${reason.message}); retrying`, { cause: reason })
    this.name = 'StoreUnavailableError'
  }
}

interface Pending {
  ops: StoreOp[]
  resolve: () => void
  reject: (err: unknown) => void
}

/**
 * Group commit: the only writer to the database. Every `write(ops)` queued while a batch is in
 * flight goes into the next single `db.batch(..., { sync })`, so with `fsync` the cost is one
 * fsync per group, not per caller. Each caller resolves when its batch is written and rejects if
 * that batch fails. Batches are written one at a time, in submission order, so an op submitted
 * later never lands before one submitted earlier (sequence allocation relies on this).
 *
 * After a failed batch the writer is unavailable: the failed group and everything queued behind
 * it are rejected, and new writes are refused at once, until `resume()` (the store calls it once
 * it has re-opened the database and a probe write succeeded). Nothing queued behind a failure is
 * written later: a caller is never told "failed" for a write that then lands.
 */
export class GroupCommitWriter {
  readonly #db: BatchTarget
  readonly #sync: boolean
  readonly #observer: WriterObserver
  #queue: Pending[] = []
  #running: Promise<void> | null = null
  #closed = false
  #unavailable: StoreUnavailableError | null = null
  readonly #onFailure: (err: Error) => void
  readonly #stats: WriterStats = { batches: 0, ops: 0, writes: 0, failedBatches: 0, refusedWrites: 0 }

  /** `onFailure` is called once per failed batch that makes the writer unavailable. */
  constructor (db: BatchTarget, durability: Durability, observer: WriterObserver = {}, onFailure: (err: Error) => void = () => {}) {
    this.#db = db
    this.#sync = durability === 'fsync'
    this.#observer = observer
    this.#onFailure = onFailure
  }

  /** Queues `ops` for the next batch; resolves once that batch is written. */
  write (ops: StoreOp[]): Promise<void> {
    if (this.#closed) return Promise.reject(new Error('store writer is closed'))
    if (this.#unavailable !== null) {
      this.#stats.refusedWrites++
      this.#observer.refused?.()
      return Promise.reject(this.#unavailable)
    }
    return new Promise<void>((resolve, reject) => {
      this.#queue.push({ ops, resolve, reject })
      this.#running ??= this.#drain()
    })
  }

  /** False from a failed batch until resume(). */
  get available (): boolean {
    return this.#unavailable === null
  }

  /** Accepts writes again (after the store has recovered). */
  resume (): void {
    this.#unavailable = null
  }

  /** Resolves once nothing is being written. */
  async idle (): Promise<void> {
    while (this.#running !== null) await this.#running
  }

  /** A copy of the counters. */
  stats (): WriterStats {
    return { ...this.#stats }
  }

  /** Refuses new writes and resolves once everything already queued has been written (or failed). */
  async close (): Promise<void> {
    this.#closed = true
    await this.idle()
  }

  /** Writes queued groups one batch at a time until the queue is empty. */
  async #drain (): Promise<void> {
    // Let writes submitted in the same tick join the first batch.
    await Promise.resolve()
    while (this.#queue.length > 0) {
      const group = this.#queue
      this.#queue = []
      const ops = group.length === 1 ? (group[0] as Pending).ops : group.flatMap(p => p.ops)
      const start = performance.now()
      try {
        if (ops.length > 0) {
          await this.#db.batch(ops, { sync: this.#sync })
          this.#stats.batches++
          this.#stats.ops += ops.length
          this.#observer.batch?.(ops.length, group.length, (performance.now() - start) / 1000)
        }
        this.#stats.writes += group.length
        for (const p of group) p.resolve()
      } catch (caught) {
        const err = caught instanceof Error ? caught : new Error(String(caught))
        this.#stats.failedBatches++
        this.#unavailable = new StoreUnavailableError(err)
        // What queued up behind the failure is refused too: the store must recover first.
        const refused = this.#queue
        this.#queue = []
        this.#stats.refusedWrites += refused.length
        this.#observer.failed?.(err, group.length + refused.length)
        for (const p of group) p.reject(err)
        for (const p of refused) p.reject(this.#unavailable)
        this.#onFailure(err)
      }
    }
    this.#running = null
  }
}

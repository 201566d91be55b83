import type { ClassicLevel } from 'classic-level'

/** The store's database: Buffer keys and values. */
export type Db = ClassicLevel<Buffer, Buffer>

/** Opens (or re-opens) the named sublevel of `db` with Buffer keys and values. */
export function sublevelOf (db: Db, name: string) {
  return db.sublevel<Buffer, Buffer>(name, { keyEncoding: 'buffer', valueEncoding: 'buffer' })
}

/** A sublevel of the store's database. */
export type Sublevel = ReturnType<typeof sublevelOf>

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
 */
export class GroupCommitWriter {
  readonly #db: BatchTarget
  readonly #sync: boolean
  #queue: Pending[] = []
  #running: Promise<void> | null = null
  #closed = false
  readonly #stats: WriterStats = { batches: 0, ops: 0, writes: 0, failedBatches: 0 }

  constructor (db: BatchTarget, durability: Durability) {
    this.#db = db
    this.#sync = durability === 'fsync'
  }

  /** Queues `ops` for the next batch; resolves once that batch is written. */
  write (ops: StoreOp[]): Promise<void> {
    if (this.#closed) return Promise.reject(new Error('store writer is closed'))
    return new Promise<void>((resolve, reject) => {
      this.#queue.push({ ops, resolve, reject })
      this.#running ??= this.#drain()
    })
  }

  /** A copy of the counters. */
  stats (): WriterStats {
    return { ...this.#stats }
  }

  /** Refuses new writes and resolves once everything already queued has been written (or failed). */
  async close (): Promise<void> {
    this.#closed = true
    await this.#running
  }

  /** Writes queued groups one batch at a time until the queue is empty. */
  async #drain (): Promise<void> {
    // Let writes submitted in the same tick join the first batch.
    await Promise.resolve()
    while (this.#queue.length > 0) {
      const group = this.#queue
      this.#queue = []
      const ops = group.length === 1 ? (group[0] as Pending).ops : group.flatMap(p => p.ops)
      try {
        if (ops.length > 0) {
          await this.#db.batch(ops, { sync: this.#sync })
          this.#stats.batches++
          this.#stats.ops += ops.length
        }
        this.#stats.writes += group.length
        for (const p of group) p.resolve()
      } catch (err) {
        this.#stats.failedBatches++
        for (const p of group) p.reject(err)
      }
    }
    this.#running = null
  }
}

import { ClassicLevel } from 'classic-level'
import { mkdirSync, readdirSync, renameSync, statfsSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { GroupCommitWriter, sublevelOf, sublevelsOf, type BatchTarget, type Db, type Durability, type StoreOp, type WriterObserver } from './writer.js'

/**
 * Version of the on-disk layout (sublevels, keys, value codec). Stored in the meta sublevel;
 * bump it when a change needs a migration. A store written by a newer version is refused.
 */
export const SCHEMA_VERSION = 2
/*
 * 1: the first layout. 2: per-queue counters in meta (`qc`…), kept in the same batch as the queue;
 * a version 1 store is migrated by LevelPersistence.setup() (one scan), and marked 2 here so a
 * FerryMQ that does not keep the counters refuses it rather than letting them go stale.
 */

/** Name of the meta sublevel (schema version, sequence reservation, counters). */
export const META = 'm'
/** Meta key of the schema version (uint32 big-endian). */
export const SCHEMA_KEY = Buffer.from('schema')
/** Meta key the store writes to test that the database takes writes again after a failure. */
const PROBE_KEY = Buffer.from('probe')
/**
 * Sublevels read in full when the store opens, so damage in them is found (and repaired) before
 * the broker serves: meta, subscriptions, retained, wills, sessions, journal, incoming QoS 2 (see
 * persistence.ts). The session queues (`o`, `q`, `O`) can hold millions of entries; reading them
 * all would cost ~2 s per million messages at every start, so they are read as they are used.
 */
const VERIFIED_AT_OPEN = [META, 's', 'r', 'w', 'e', 'J', 'i', 'I']
/**
 * Re-opening LevelDB writes a new log and flushes the old one to a table (its write buffer is
 * 4 MiB): with less free space than that, a failed store stays open for reads and waits.
 */
const MIN_FREE_TO_REOPEN = 4 * 1024 * 1024

/** Thrown when the store cannot be used: locked by another process, or written by a newer FerryMQ. */
export class StoreOpenError extends Error {
  constructor (message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'StoreOpenError'
  }
}

/** What happened to a damaged store at open. */
export interface StoreDamage {
  /** `repaired`: LevelDB's repair made it usable; `quarantined`: it was moved aside and the store starts empty. */
  action: 'repaired' | 'quarantined'
  /** Why the store could not be opened as it was. */
  error: Error
  /** Why repair did not help (quarantined only). */
  repairError?: Error
  /** Where the damaged files went (quarantined only). */
  quarantineDir?: string
}

/** What the store reports: the writer's batches and failures, unavailability, recovery, damage. */
export interface StoreObserver extends WriterObserver {
  /** A write failed: the store refuses writes until it has re-opened the database. */
  unavailable? (err: Error): void
  /** An attempt to re-open the database after a failure did not succeed; another follows. */
  recoveryFailed? (err: Error, attempt: number): void
  /** The store takes writes again. */
  recovered? (downSeconds: number, attempts: number): void
  /** The store was damaged when opened, and what was done about it. */
  damaged? (damage: StoreDamage): void
}

export interface OpenOptions {
  observer?: StoreObserver
  /** Delay before the first attempt to recover from a write failure, doubled up to `retryMaxMs`. Default 250. */
  retryMinMs?: number
  /** Default 10000. */
  retryMaxMs?: number
}

/** An open store: the database, its only writer, and how to close both. */
export interface Store {
  /** Absolute path of the LevelDB directory. */
  readonly dir: string
  readonly durability: Durability
  /** Read through it (sublevels, iterators, get); write only through `writer`. */
  readonly db: Db
  readonly writer: GroupCommitWriter
  /** False from a failed write until the store has recovered. */
  readonly available: boolean
  /** Waits for queued writes, then closes the database. Idempotent. */
  close (): Promise<void>
}

/**
 * Opens the LevelDB store under `dir` (created if missing), checks or writes the schema version,
 * and returns it with its group-commit writer.
 *
 * A damaged database (LevelDB reports corruption or cannot read its own files) does not stop
 * the broker: LevelDB's repair is tried, and if the store still cannot be opened its files are
 * moved to `<dir>/quarantine-<time>/` and it starts empty. Either is reported to `observer.damaged`.
 *
 * Throws StoreOpenError if another process (or another open in this one) holds the directory, if
 * the data was written by a newer schema than this code knows, or if the directory cannot be
 * used at all (permissions, read-only, full).
 *
 * After a failed write (disk full, I/O error; LevelDB then refuses every later write) the store
 * re-opens the database with back-off until a probe write succeeds, then takes writes again.
 */
export async function openStore (dir: string, durability: Durability, options: OpenOptions = {}): Promise<Store> {
  const path = resolve(dir)
  const observer = options.observer ?? {}
  let db: Db
  try {
    db = await openChecked(path)
  } catch (err) {
    if (!isDamage(err)) throw openError(err, path)
    db = await repairOrQuarantine(path, err as Error, observer)
  }

  let closed = false
  let recovering: Promise<void> | null = null
  let wake: (() => void) | null = null
  const minDelay = options.retryMinMs ?? 250
  const maxDelay = options.retryMaxMs ?? 10_000

  /**
   * Until a probe write succeeds: the database stays open for reads while the disk is still full;
   * otherwise (LevelDB refuses all writes after some failures, until re-opened) it is re-opened.
   * Then the writer takes writes again.
   */
  const recover = async (): Promise<void> => {
    const since = performance.now()
    let delay = minDelay
    for (let attempt = 1; !closed; attempt++) {
      await new Promise<void>((resolve) => {
        wake = resolve
        setTimeout(resolve, delay).unref()
      })
      wake = null
      if (closed) return
      try {
        await writer.idle()
        if (db.status === 'open') {
          try {
            await probe()
          } catch (err) {
            if (freeBytes(path) < MIN_FREE_TO_REOPEN) throw err
            await db.close()
          }
        }
        if (db.status !== 'open') {
          await db.open()
          for (const sub of sublevelsOf(db)) if (sub.status !== 'open') await sub.open()
          await probe()
        }
        writer.resume()
        observer.recovered?.((performance.now() - since) / 1000, attempt)
        return
      } catch (err) {
        observer.recoveryFailed?.(err as Error, attempt)
        delay = Math.min(delay * 2, maxDelay)
      }
    }
  }
  const probe = async (): Promise<void> => {
    const value = Buffer.alloc(8)
    value.writeBigUInt64BE(BigInt(Date.now()))
    await db.batch([{ type: 'put', sublevel: sublevelOf(db, META), key: PROBE_KEY, value }], { sync: durability === 'fsync' })
  }

  const target: BatchTarget = { batch: (ops, opts) => db.batch(ops, opts) }
  const writer = new GroupCommitWriter(target, durability, observer, (err) => {
    observer.unavailable?.(err)
    recovering ??= recover().finally(() => { recovering = null })
  })
  try {
    await checkSchema(db, writer, path)
  } catch (err) {
    await db.close()
    throw err
  }

  let closing: Promise<void> | undefined
  return {
    dir: path,
    durability,
    db,
    writer,
    get available () { return writer.available },
    close () {
      closing ??= (async () => {
        closed = true
        wake?.()
        await recovering
        await writer.close()
        if (db.status === 'open' || db.status === 'opening') await db.close()
      })()
      return closing
    }
  }
}

/** Opens the database and reads the small sublevels in full, so damage shows now. */
async function openChecked (path: string): Promise<Db> {
  const db: Db = new ClassicLevel<Buffer, Buffer>(path, { keyEncoding: 'buffer', valueEncoding: 'buffer' })
  await db.open({ createIfMissing: true })
  try {
    for (const name of VERIFIED_AT_OPEN) {
      const iterator = sublevelOf(db, name).iterator()
      try {
        while ((await iterator.nextv(1000)).length > 0);
      } finally {
        await iterator.close()
      }
    }
  } catch (err) {
    await db.close().catch(() => {})
    throw err
  }
  return db
}

/** LevelDB's repair, then a second open; failing that, the files go to a quarantine directory and the store starts empty. */
async function repairOrQuarantine (path: string, error: Error, observer: StoreObserver): Promise<Db> {
  let repairError: Error
  try {
    await ClassicLevel.repair(path)
    const db = await openChecked(path)
    observer.damaged?.({ action: 'repaired', error })
    return db
  } catch (err) {
    if (!isDamage(err)) throw openError(err, path)
    repairError = err as Error
  }
  const quarantineDir = join(path, `quarantine-${new Date().toISOString().replace(/[:.]/g, '-')}`)
  try {
    mkdirSync(quarantineDir)
    for (const name of readdirSync(path)) {
      if (!name.startsWith('quarantine-')) renameSync(join(path, name), join(quarantineDir, name))
    }
  } catch (err) {
    throw new StoreOpenError(`the store in ${path} is damaged (${error.message}), LevelDB's repair failed (${repairError.message}) ` +
      `and it could not be moved aside to ${quarantineDir}: ${(err as Error).message}`, { cause: err })
  }
  let db: Db
  try {
    db = await openChecked(path)
  } catch (err) {
    throw openError(err, path)
  }
  observer.damaged?.({ action: 'quarantined', error, repairError, quarantineDir })
  return db
}

function openError (err: unknown, path: string): StoreOpenError {
  if (hasCode(err, 'LEVEL_LOCKED')) {
    return new StoreOpenError(`storage.dir ${path} is already in use by another FerryMQ process (LevelDB lock held); ` +
      'stop it or choose another --data-dir', { cause: err })
  }
  return new StoreOpenError(`cannot open the store in ${path}: ${innermost(err).message}`, { cause: err })
}

/** Reads the schema version; writes ours into a new store; refuses a newer one. */
async function checkSchema (db: Db, writer: GroupCommitWriter, path: string): Promise<void> {
  const meta = sublevelOf(db, META)
  const stored = await meta.get(SCHEMA_KEY)
  const version = stored === undefined ? 0 : stored.length === 4 ? stored.readUInt32BE(0) : NaN
  if (version < SCHEMA_VERSION) {
    const value = Buffer.alloc(4)
    value.writeUInt32BE(SCHEMA_VERSION)
    const op: StoreOp = { type: 'put', sublevel: meta, key: SCHEMA_KEY, value }
    await writer.write([op])
    return
  }
  if (!(version <= SCHEMA_VERSION)) {
    throw new StoreOpenError(`the store in ${path} has schema version ${Number.isNaN(version) ? 'unreadable' : version}, ` +
      `newer than this FerryMQ knows (${SCHEMA_VERSION}); upgrade FerryMQ or use another --data-dir`)
  }
}

/**
 * True when LevelDB reports its files damaged: corruption, or an I/O error reading its own files
 * (e.g. a file where a directory should be). Not when the directory is locked, unreadable,
 * read-only or full: moving the store aside would not help, and must not happen to good data.
 */
function isDamage (err: unknown): boolean {
  if (hasCode(err, 'LEVEL_LOCKED')) return false
  if (hasCode(err, 'LEVEL_CORRUPTION')) return true
  if (!hasCode(err, 'LEVEL_IO_ERROR')) return false
  return !/Permission denied|Read-only file system|No space left|Too many open files/i.test(innermost(err).message)
}

function hasCode (err: unknown, code: string): boolean {
  for (let e = err; e instanceof Error; e = (e as Error & { cause?: unknown }).cause) {
    if ((e as NodeJS.ErrnoException).code === code) return true
  }
  return false
}

/** The deepest cause: classic-level wraps LevelDB's own message ("Database failed to open"). */
function innermost (err: unknown): Error {
  let e = err instanceof Error ? err : new Error(String(err))
  while ((e as Error & { cause?: unknown }).cause instanceof Error) e = (e as Error & { cause: Error }).cause
  return e
}

/** Bytes free for this process on the filesystem holding `path` (Infinity when unknown). */
function freeBytes (path: string): number {
  try {
    const fs = statfsSync(path)
    return fs.bavail * fs.bsize
  } catch {
    return Infinity
  }
}

import { ClassicLevel } from 'classic-level'
import { resolve } from 'node:path'
import { GroupCommitWriter, sublevelOf, type BatchTarget, type Db, type Durability, type StoreOp } from './writer.js'

/**
 * Version of the on-disk layout (sublevels, keys, value codec). Stored in the meta sublevel;
 * bump it when a change needs a migration. A store written by a newer version is refused.
 */
export const SCHEMA_VERSION = 1

/** Name of the meta sublevel (schema version, sequence reservation, counters). */
export const META = 'm'
/** Meta key of the schema version (uint32 big-endian). */
export const SCHEMA_KEY = Buffer.from('schema')

/** Thrown when the store cannot be used: locked by another process, or written by a newer FerryMQ. */
export class StoreOpenError extends Error {
  constructor (message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'StoreOpenError'
  }
}

/** An open store: the database, its only writer, and how to close both. */
export interface Store {
  /** Absolute path of the LevelDB directory. */
  readonly dir: string
  readonly durability: Durability
  /** Read through it (sublevels, iterators, get); write only through `writer`. */
  readonly db: Db
  readonly writer: GroupCommitWriter
  /** Waits for queued writes, then closes the database. Idempotent. */
  close (): Promise<void>
}

/**
 * Opens the LevelDB store under `dir` (created if missing), checks or writes the schema version,
 * and returns it with its group-commit writer.
 * Throws StoreOpenError if another process (or another open in this one) holds the directory, or
 * if the data was written by a newer schema than this code knows.
 */
export async function openStore (dir: string, durability: Durability): Promise<Store> {
  const path = resolve(dir)
  const db: Db = new ClassicLevel<Buffer, Buffer>(path, { keyEncoding: 'buffer', valueEncoding: 'buffer' })
  try {
    await db.open({ createIfMissing: true })
  } catch (err) {
    if (isLocked(err)) {
      throw new StoreOpenError(`storage.dir ${path} is already in use by another FerryMQ process (LevelDB lock held); ` +
        'stop it or choose another --data-dir', { cause: err })
    }
    throw new StoreOpenError(`cannot open the store in ${path}: ${(err as Error).message}`, { cause: err })
  }

  const target: BatchTarget = { batch: (ops, options) => db.batch(ops, options) }
  const writer = new GroupCommitWriter(target, durability)
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
    close () {
      closing ??= writer.close().finally(() => db.close())
      return closing
    }
  }
}

/** Reads the schema version; writes ours into a new store; refuses a newer one. */
async function checkSchema (db: Db, writer: GroupCommitWriter, path: string): Promise<void> {
  const meta = sublevelOf(db, META)
  const stored = await meta.get(SCHEMA_KEY)
  if (stored === undefined) {
    const value = Buffer.alloc(4)
    value.writeUInt32BE(SCHEMA_VERSION)
    const op: StoreOp = { type: 'put', sublevel: meta, key: SCHEMA_KEY, value }
    await writer.write([op])
    return
  }
  const version = stored.length === 4 ? stored.readUInt32BE(0) : NaN
  if (!(version <= SCHEMA_VERSION)) {
    throw new StoreOpenError(`the store in ${path} has schema version ${Number.isNaN(version) ? 'unreadable' : version}, ` +
      `newer than this FerryMQ knows (${SCHEMA_VERSION}); upgrade FerryMQ or use another --data-dir`)
  }
}

/** True for classic-level's "database is locked" failure (LEVEL_LOCKED, possibly as the cause). */
function isLocked (err: unknown): boolean {
  for (let e = err; e instanceof Error; e = (e as Error & { cause?: unknown }).cause) {
    const code = (e as NodeJS.ErrnoException).code
    if (code === 'LEVEL_LOCKED') return true
  }
  return false
}

import { afterAll, describe, expect, it } from 'vitest'
import { META, openStore, SCHEMA_KEY, SCHEMA_VERSION, StoreOpenError } from '../../src/store/open.js'
import { sublevelOf } from '../../src/store/writer.js'
import { removeTempDirs, tempDir } from './helpers.js'

afterAll(removeTempDirs)

describe('openStore', () => {
  it('writes the schema version into a new store and reopens it', async () => {
    const dir = tempDir()
    const store = await openStore(dir, 'fsync')
    const stored = await sublevelOf(store.db, META).get(SCHEMA_KEY)
    expect(stored?.readUInt32BE(0)).toBe(SCHEMA_VERSION)
    await store.close()
    await store.close() // idempotent
    const again = await openStore(dir, 'os')
    expect(again.durability).toBe('os')
    await again.close()
  })

  it('refuses a store written by a newer schema, naming both versions', async () => {
    const dir = tempDir()
    const store = await openStore(dir, 'os')
    const newer = Buffer.alloc(4)
    newer.writeUInt32BE(SCHEMA_VERSION + 1)
    await store.writer.write([{ type: 'put', sublevel: sublevelOf(store.db, META), key: SCHEMA_KEY, value: newer }])
    await store.close()
    const attempt = openStore(dir, 'os')
    await expect(attempt).rejects.toThrow(StoreOpenError)
    await expect(openStore(dir, 'os')).rejects.toThrow(`schema version ${SCHEMA_VERSION + 1}, newer than this FerryMQ knows (${SCHEMA_VERSION})`)
  })

  it('gives a clear error naming the directory when it is already open', async () => {
    const dir = tempDir()
    const store = await openStore(dir, 'fsync')
    const second = openStore(dir, 'fsync')
    await expect(second).rejects.toThrow(StoreOpenError)
    await expect(openStore(dir, 'fsync')).rejects.toThrow(`storage.dir ${dir} is already in use by another FerryMQ process`)
    await store.close()
    // Once closed, the directory can be opened again.
    const third = await openStore(dir, 'fsync')
    await third.close()
  })
})

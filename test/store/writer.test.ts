import { afterAll, describe, expect, it } from 'vitest'
import { openStore } from '../../src/store/open.js'
import { GroupCommitWriter, sublevelOf, type BatchTarget, type StoreOp } from '../../src/store/writer.js'
import { removeTempDirs, tempDir } from './helpers.js'

afterAll(removeTempDirs)

function put (sublevel: StoreOp['sublevel'], k: string, v: string): StoreOp {
  return { type: 'put', sublevel, key: Buffer.from(k), value: Buffer.from(v) }
}

describe('GroupCommitWriter', () => {
  it('coalesces concurrent writes into fewer batches, resolves every caller, and the data survives a reopen', async () => {
    const dir = tempDir()
    const store = await openStore(dir, 'fsync')
    const sub = sublevelOf(store.db, 't')
    const before = store.writer.stats()
    const n = 500
    await Promise.all(Array.from({ length: n }, (_, i) => store.writer.write([put(sub, `k${String(i).padStart(4, '0')}`, `v${i}`)])))
    const after = store.writer.stats()
    expect(after.writes - before.writes).toBe(n)
    expect(after.ops - before.ops).toBe(n)
    expect(after.batches - before.batches).toBeLessThan(n / 10)
    await store.close()

    const reopened = await openStore(dir, 'os')
    const keys = await sublevelOf(reopened.db, 't').keys().all()
    expect(keys).toHaveLength(n)
    expect((await sublevelOf(reopened.db, 't').get(Buffer.from('k0499')))?.toString()).toBe('v499')
    await reopened.close()
  })

  it('writes queued groups in submission order', async () => {
    const store = await openStore(tempDir(), 'os')
    const sub = sublevelOf(store.db, 't')
    // The same key written by many callers: the last submitted must win.
    await Promise.all(Array.from({ length: 200 }, (_, i) => store.writer.write([put(sub, 'same', String(i))])))
    expect((await sub.get(Buffer.from('same')))?.toString()).toBe('199')
    await store.close()
  })

  it('rejects every caller of a failing batch, refuses writes until resume(), then writes again', async () => {
    const written: number[] = []
    let calls = 0
    let release: () => void = () => {}
    const gate = new Promise<void>(resolve => { release = resolve })
    const target: BatchTarget = {
      async batch (ops) {
        calls++
        if (calls === 1) await gate // hold the first batch so the next callers coalesce behind it
        if (calls === 2) throw new Error('disk full')
        written.push(ops.length)
      }
    }
    const writer = new GroupCommitWriter(target, 'fsync')
    const fake = {} as StoreOp['sublevel']
    const first = writer.write([put(fake, 'a', '1')])
    while (calls < 1) await new Promise(resolve => setImmediate(resolve))
    const failing = [writer.write([put(fake, 'b', '1')]), writer.write([put(fake, 'c', '1')])]
    const settled = Promise.allSettled(failing)
    release()
    await first
    const results = await settled
    expect(results.map(r => r.status)).toEqual(['rejected', 'rejected'])
    expect((results[0] as PromiseRejectedResult).reason).toBeInstanceOf(Error)
    // The store re-opens the database before it lets the writer go on (open.ts): until then, refused.
    await expect(writer.write([put(fake, 'd', '0')])).rejects.toThrow('store unavailable after a write error (disk full)')
    writer.resume()
    await writer.write([put(fake, 'd', '1')])
    expect(written).toEqual([1, 1])
    expect(writer.stats()).toMatchObject({ batches: 2, failedBatches: 1, writes: 2, ops: 2, refusedWrites: 1 })
  })

  it('asks for sync writes with fsync durability and not with os', async () => {
    const syncs: boolean[] = []
    const target: BatchTarget = { async batch (_ops, options) { syncs.push(options.sync) } }
    const fake = {} as StoreOp['sublevel']
    await new GroupCommitWriter(target, 'fsync').write([put(fake, 'a', '1')])
    await new GroupCommitWriter(target, 'os').write([put(fake, 'a', '1')])
    expect(syncs).toEqual([true, false])
  })

  it('close() waits for queued writes, then refuses new ones', async () => {
    const seen: number[] = []
    const target: BatchTarget = { async batch (ops) { await new Promise(resolve => setTimeout(resolve, 20)); seen.push(ops.length) } }
    const writer = new GroupCommitWriter(target, 'os')
    const fake = {} as StoreOp['sublevel']
    const pending = [writer.write([put(fake, 'a', '1')]), writer.write([put(fake, 'b', '1')])]
    await writer.close()
    expect(seen.reduce((a, b) => a + b, 0)).toBe(2)
    await Promise.all(pending)
    await expect(writer.write([put(fake, 'c', '1')])).rejects.toThrow(/closed/)
  })
})

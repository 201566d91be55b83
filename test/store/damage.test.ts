import { closeSync, existsSync, mkdirSync, openSync, readdirSync, statSync, truncateSync, unlinkSync, writeSync } from 'node:fs'
import { randomBytes } from 'node:crypto'
import { join } from 'node:path'
import { afterAll, afterEach, describe, expect, it } from 'vitest'
import { openStore, StoreOpenError, type Store, type StoreDamage } from '../../src/store/open.js'
import { GroupCommitWriter, sublevelOf, type BatchTarget, type StoreOp } from '../../src/store/writer.js'
import { startBroker, type TestBroker } from '../helpers/broker.js'
import { collect, connect, endAllClients } from '../helpers/clients.js'
import { scrapeMetric } from '../helpers/metrics.js'
import { removeTempDirs, tempDir } from './helpers.js'

afterAll(removeTempDirs)

/** A store under `dir` with `n` subscriptions-sublevel records ('s' is read in full at open) of 200 random bytes. */
async function storeWith (dir: string, n: number): Promise<void> {
  const store = await openStore(dir, 'os')
  const subs = sublevelOf(store.db, 's')
  for (let i = 0; i < n; i += 100) {
    const ops: StoreOp[] = []
    for (let j = i; j < i + 100 && j < n; j++) ops.push({ type: 'put', sublevel: subs, key: Buffer.from(`k${String(j).padStart(6, '0')}`), value: randomBytes(200) })
    await store.writer.write(ops)
  }
  await store.close()
  // Opening again turns the write-ahead log into a table file.
  await (await openStore(dir, 'os')).close()
}

async function count (store: Store, name: string): Promise<number> {
  return (await sublevelOf(store.db, name).keys().all()).length
}

/** Opens `dir`, recording what the store reports about damage. */
async function openReporting (dir: string): Promise<{ store: Store, damage: StoreDamage[] }> {
  const damage: StoreDamage[] = []
  const store = await openStore(dir, 'fsync', { observer: { damaged: (d) => damage.push(d) } })
  return { store, damage }
}

describe('a damaged store at start-up', () => {
  it('garbage in a table file: LevelDB repair runs, the store opens with what it could read, and it takes writes', async () => {
    const dir = tempDir()
    await storeWith(dir, 2000)
    const table = readdirSync(dir).find((f) => f.endsWith('.ldb')) as string
    const fd = openSync(join(dir, table), 'r+')
    writeSync(fd, randomBytes(4096), 0, 4096, Math.floor(statSync(join(dir, table)).size / 3))
    closeSync(fd)

    const { store, damage } = await openReporting(dir)
    expect(damage.map((d) => d.action)).toEqual(['repaired'])
    expect(damage[0]?.error.message).toMatch(/Corruption/)
    const left = await count(store, 's')
    expect(left).toBeGreaterThan(0)
    expect(left).toBeLessThanOrEqual(2000)
    await store.writer.write([{ type: 'put', sublevel: sublevelOf(store.db, 's'), key: Buffer.from('new'), value: Buffer.from('v') }])
    expect(await count(store, 's')).toBe(left + 1)
    await store.close()
  })

  it('a truncated write-ahead log: the store opens with the records before the cut', async () => {
    const dir = tempDir()
    const store = await openStore(dir, 'fsync')
    const subs = sublevelOf(store.db, 's')
    for (let i = 0; i < 200; i++) await store.writer.write([{ type: 'put', sublevel: subs, key: Buffer.from(`k${String(i).padStart(4, '0')}`), value: randomBytes(100) }])
    // Not closed: the records are only in the log, as after a power cut. Copy the files aside.
    const log = readdirSync(dir).filter((f) => f.endsWith('.log')).sort().at(-1) as string
    const size = statSync(join(dir, log)).size
    await store.close()
    // close() flushes the log to a table; write the same records again so they are in a log only.
    const again = await openStore(dir, 'fsync')
    for (let i = 200; i < 400; i++) await again.writer.write([{ type: 'put', sublevel: sublevelOf(again.db, 's'), key: Buffer.from(`k${String(i).padStart(4, '0')}`), value: randomBytes(100) }])
    const liveLog = readdirSync(dir).filter((f) => f.endsWith('.log')).sort().at(-1) as string
    expect(size).toBeGreaterThan(0)
    // Cut the live log in half while the store is open (the process is about to "lose power").
    truncateSync(join(dir, liveLog), Math.floor(statSync(join(dir, liveLog)).size / 2))
    await again.db.close() // closing LevelDB directly: no flush of the memtable through our writer

    const { store: reopened, damage } = await openReporting(dir)
    const n = await count(reopened, 's')
    expect(n).toBeGreaterThanOrEqual(200)
    expect(n).toBeLessThanOrEqual(400)
    expect(damage.every((d) => d.action === 'repaired')).toBe(true)
    await reopened.close()
  })

  it('beyond repair (CURRENT is a directory): the files move to quarantine-<time>/, the store starts empty and works', async () => {
    const dir = tempDir()
    await storeWith(dir, 100)
    unlinkSync(join(dir, 'CURRENT'))
    mkdirSync(join(dir, 'CURRENT'))

    const { store, damage } = await openReporting(dir)
    expect(damage).toHaveLength(1)
    expect(damage[0]?.action).toBe('quarantined')
    expect(damage[0]?.repairError).toBeInstanceOf(Error)
    const quarantine = damage[0]?.quarantineDir as string
    expect(quarantine.startsWith(join(dir, 'quarantine-'))).toBe(true)
    expect(readdirSync(quarantine)).toContain('CURRENT')
    expect(readdirSync(quarantine).some((f) => f.endsWith('.ldb') || f.endsWith('.log'))).toBe(true)
    expect(await count(store, 's')).toBe(0)
    await store.writer.write([{ type: 'put', sublevel: sublevelOf(store.db, 's'), key: Buffer.from('k'), value: Buffer.from('v') }])
    await store.close()

    // The next start finds a healthy store and leaves the quarantine alone.
    const { store: next, damage: none } = await openReporting(dir)
    expect(none).toEqual([])
    expect(await count(next, 's')).toBe(1)
    expect(existsSync(quarantine)).toBe(true)
    await next.close()
  })

  it('a store held by another process is refused, not repaired or moved', async () => {
    const dir = tempDir()
    const first = await openStore(dir, 'fsync')
    const damage: StoreDamage[] = []
    await expect(openStore(dir, 'fsync', { observer: { damaged: (d) => damage.push(d) } })).rejects.toThrow(StoreOpenError)
    expect(damage).toEqual([])
    expect(readdirSync(dir).some((f) => f.startsWith('quarantine-'))).toBe(false)
    await first.close()
  })
})

describe('the broker on a damaged store', () => {
  let broker: TestBroker | null = null
  afterEach(async () => {
    await endAllClients()
    await broker?.close()
    broker = null
  })

  it('starts, serves, logs the damage as an error and counts it in ferrymq_store_damaged_total', async () => {
    const dir = tempDir()
    await storeWith(dir, 10)
    unlinkSync(join(dir, 'CURRENT'))
    mkdirSync(join(dir, 'CURRENT'))
    const logs: Array<Record<string, unknown>> = []
    broker = await startBroker({ storage: { dir, durability: 'fsync' } }, { logs })
    expect(await scrapeMetric(broker.httpUrl, 'ferrymq_store_damaged_total{action="quarantined"}')).toBe(1)
    const line = logs.find((l) => l.level === 50 && String(l.msg).includes('quarantine'))
    expect(line?.quarantineDir).toMatch(/quarantine-/)

    const client = await connect(broker.mqttUrl, { clientId: 'after-quarantine', clean: false })
    await client.subscribeAsync('q/t', { qos: 1 })
    const got = collect(client, 1)
    await client.publishAsync('q/t', 'works', { qos: 1 })
    expect((await got)[0]?.payload).toBe('works')
  })
})

describe('GroupCommitWriter after a failed batch', () => {
  it('rejects that batch and everything queued behind it, refuses new writes until resume(), then writes again', async () => {
    const written: number[] = []
    let failNext = false
    let started: () => void = () => {}
    const target: BatchTarget = {
      async batch (ops) {
        started()
        await new Promise<void>((resolve) => setImmediate(resolve))
        if (failNext) {
          failNext = false
          throw new Error('No space left on device')
        }
        written.push(ops.length)
      },
    }
    const failures: Error[] = []
    const refusedSeen: number[] = []
    const writer = new GroupCommitWriter(target, 'fsync', { refused: () => refusedSeen.push(1) }, (err) => failures.push(err))
    const op = { type: 'del', sublevel: {} as never, key: Buffer.from('k') } as StoreOp
    await writer.write([op])
    failNext = true
    const inFlight = new Promise<void>((resolve) => { started = resolve })
    const first = writer.write([op])
    await inFlight
    // Queued while `first` is in flight: must be refused, never written after the failure.
    const behind = writer.write([op, op])
    await expect(first).rejects.toThrow('No space left on device')
    await expect(behind).rejects.toThrow(/store unavailable/)
    expect(failures).toHaveLength(1)
    expect(writer.available).toBe(false)
    await expect(writer.write([op])).rejects.toThrow(/store unavailable after a write error \(No space left on device\)/)
    expect(refusedSeen.length).toBeGreaterThanOrEqual(1)
    expect(written).toEqual([1])

    writer.resume()
    await writer.write([op, op, op])
    expect(written).toEqual([1, 3])
    expect(writer.stats().failedBatches).toBe(1)
  })
})

import { afterAll, expect, it } from 'vitest'
import { openStore } from '../../src/store/open.js'
import { LevelPersistence, type PacketLike } from '../../src/store/persistence.js'
import { removeTempDirs, tempDir } from './helpers.js'

afterAll(removeTempDirs)

const publish = (n: number): PacketLike => ({ cmd: 'publish', topic: 'q/t', payload: Buffer.from(`m${n}`), qos: 1, retain: false, dup: false, brokerId: 'b', brokerCounter: n })

it('queue lengths are counted again at setup, so the limit holds across a restart', async () => {
  const dir = tempDir()
  const full: string[] = []
  const open = async (): Promise<LevelPersistence> => {
    const p = new LevelPersistence(await openStore(dir, 'os'), { maxQueuedMessages: 4, onQueueFull: (clientId) => full.push(clientId) })
    await p.setup({ id: 'b' })
    return p
  }
  let p = await open()
  for (let i = 1; i <= 3; i++) await p.outgoingEnqueueCombi([{ clientId: 'a' }, { clientId: 'b' }], publish(i))
  expect([p.queuedMessages('a'), p.queuedMessages('b')]).toEqual([3, 3])
  await p.destroy()

  p = await open()
  expect([p.queuedMessages('a'), p.queuedMessages('b'), p.queuedMessages('c')]).toEqual([3, 3, 0])
  await p.outgoingEnqueueCombi([{ clientId: 'a' }], publish(4))
  await p.outgoingEnqueueCombi([{ clientId: 'a' }, { clientId: 'b' }], publish(5))
  expect(full).toEqual(['a'])
  expect([p.queuedMessages('a'), p.queuedMessages('b')]).toEqual([4, 4])
  await p.destroy()
})

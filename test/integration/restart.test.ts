import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, afterEach, describe, expect, it } from 'vitest'
import { collect, connackOf, connect, endAllClients } from '../helpers/clients.js'
import { freePort, spawnCli, type BrokerProcess } from '../helpers/process.js'

const dirs: string[] = []
const running: BrokerProcess[] = []

function dataDir (): string {
  const dir = mkdtempSync(join(tmpdir(), 'ferrymq-restart-'))
  dirs.push(dir)
  return dir
}

async function startBroker (dir: string, port: number, durability: string): Promise<BrokerProcess> {
  const p = spawnCli(['--port', String(port), '--ws-port', '0', '--http-port', '0', '--data-dir', dir, '--durability', durability])
  running.push(p)
  await p.ready()
  return p
}

async function stop (p: BrokerProcess): Promise<void> {
  p.proc.kill('SIGTERM')
  expect(await p.exited(6000)).toBe(0)
}

afterEach(async () => {
  await endAllClients()
  for (const p of running.splice(0)) if (p.proc.exitCode === null) p.proc.kill('SIGKILL')
})
afterAll(() => { for (const d of dirs) rmSync(d, { recursive: true, force: true }) })

describe.each(['fsync', 'os'])('with durability %s, a restarted broker (SIGTERM, then start on the same data dir)', (durability) => {
  it('keeps retained messages, subscriptions and a persistent session\'s queued messages, in order', async () => {
    const dir = dataDir()
    const port = await freePort()
    const url = `mqtt://127.0.0.1:${port}`
    let broker = await startBroker(dir, port, durability)

    const sub = await connect(url, { clientId: 'restart-sub', clean: false })
    await sub.subscribeAsync('restart/q/#', { qos: 1 })
    await sub.endAsync()
    const pub = await connect(url, { clientId: 'restart-pub' })
    for (let i = 1; i <= 20; i++) await pub.publishAsync(`restart/q/${i % 3}`, `m${i}`, { qos: 1 })
    await pub.publishAsync('restart/retained', 'kept', { qos: 1, retain: true })
    await pub.endAsync()
    await stop(broker)

    broker = await startBroker(dir, port, durability)
    const again = await connect(url, { clientId: 'restart-sub', clean: false })
    expect(connackOf(again).sessionPresent).toBe(true)
    const queued = await collect(again, 20)
    expect(queued.map((m) => m.payload)).toEqual(Array.from({ length: 20 }, (_v, i) => `m${i + 1}`))

    // The subscription came back with the session: a new message still reaches it.
    const live = collect(again, 1)
    const pub2 = await connect(url, { clientId: 'restart-pub-2' })
    await pub2.publishAsync('restart/q/x', 'after restart', { qos: 1 })
    expect((await live)[0]?.payload).toBe('after restart')

    const late = await connect(url, { clientId: 'restart-late' })
    const retained = collect(late, 1)
    await late.subscribeAsync('restart/retained', { qos: 1 })
    expect((await retained)[0]).toMatchObject({ topic: 'restart/retained', payload: 'kept', retain: true })
    await endAllClients()
    await stop(broker)
  })
})

it('a SIGTERM right after a burst of QoS 1 PUBACKs queues each message once: shutdown lets acknowledged messages finish storing', async () => {
  const dir = dataDir()
  const port = await freePort()
  const url = `mqtt://127.0.0.1:${port}`
  let broker = await startBroker(dir, port, 'fsync')
  const sub = await connect(url, { clientId: 'burst-sub', clean: false })
  await sub.subscribeAsync('burst/#', { qos: 1 })
  await sub.endAsync()
  // aedes acknowledges QoS 1 once the journal has the message, before it is queued: stopping at
  // the last PUBACK catches pipelines still running. Had they been cut off, the journal would
  // publish them again at the next start: duplicates after a clean stop.
  const n = 3000
  const pubs = await Promise.all([0, 1, 2, 3].map((i) => connect(url, { clientId: `burst-pub-${i}` })))
  let next = 0
  await Promise.all(pubs.flatMap((pub) => Array.from({ length: 25 }, async () => {
    while (next < n) {
      const i = next++
      await pub.publishAsync(`burst/${i % 4}`, String(i), { qos: 1 })
    }
  })))
  broker.proc.kill('SIGTERM')
  expect(await broker.exited(6000)).toBe(0)
  running.splice(running.indexOf(broker), 1)
  await endAllClients()

  broker = await startBroker(dir, port, 'fsync')
  expect(broker.stdout()).not.toContain('published again the messages acknowledged but not stored')
  const again = await connect(url, { clientId: 'burst-sub', clean: false })
  const got = await collect(again, n, 20_000)
  expect(new Set(got.map((m) => m.payload)).size).toBe(n)
  // Nothing beyond the n: a fence published now is the very next message.
  const fence = collect(again, 1, 5000)
  const pub = await connect(url, { clientId: 'burst-fence' })
  await pub.publishAsync('burst/fence', 'fence', { qos: 1 })
  expect((await fence)[0]?.payload).toBe('fence')
  await endAllClients()
  await stop(broker)
})

it('a second broker on the same data dir exits 1 with a message naming the directory', async () => {
  const dir = dataDir()
  await startBroker(dir, await freePort(), 'fsync')
  const second = spawnCli(['--port', String(await freePort()), '--ws-port', '0', '--http-port', '0', '--data-dir', dir])
  running.push(second)
  expect(await second.exited(10_000)).toBe(1)
  expect(second.stderr()).toContain(`storage.dir ${dir} is already in use by another FerryMQ process`)
})

/**
 * MQTT 5 session expiry and will delay survive a restart (aedes keeps their timers in memory only;
 * FerryMQ's sessions sublevel carries them). A graceful restart runs in this process (close, then a
 * new broker on the same data dir); a crash is a child process killed with SIGKILL.
 */
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { MqttClient } from 'mqtt'
import { afterAll, afterEach, describe, expect, it } from 'vitest'
import { startBroker, type TestBroker } from '../helpers/broker.js'
import { collect, connackOf, connect, endAllClients, eventually, withTimeout } from '../helpers/clients.js'
import { freePort, spawnCli, type BrokerProcess } from '../helpers/process.js'

const dirs: string[] = []
function freshDir (): string {
  const d = mkdtempSync(join(tmpdir(), 'ferrymq-v5-sessions-'))
  dirs.push(d)
  return d
}
const brokers: TestBroker[] = []
const procs: BrokerProcess[] = []
afterEach(async () => {
  await endAllClients()
  for (const b of brokers.splice(0)) await b.close()
  for (const p of procs.splice(0)) if (p.proc.exitCode === null && p.proc.signalCode === null) p.proc.kill('SIGKILL')
})
afterAll(() => { for (const d of dirs) rmSync(d, { recursive: true, force: true }) })

async function start (dir: string): Promise<TestBroker> {
  const b = await startBroker({ storage: { durability: 'os', dir } })
  brokers.push(b)
  return b
}

async function restart (b: TestBroker, dir: string): Promise<TestBroker> {
  brokers.splice(brokers.indexOf(b), 1)
  await b.close()
  return await start(dir)
}

async function metric (b: TestBroker, sample: string): Promise<number> {
  const text = await (await fetch(`${b.httpUrl}/metrics`)).text()
  const line = text.split('\n').find((l) => l.startsWith(`${sample} `))
  return line === undefined ? 0 : Number(line.slice(sample.length + 1))
}

const v5 = (clientId: string, extra: Record<string, unknown> = {}): Record<string, unknown> => ({ clientId, protocolVersion: 5, ...extra })

/** Ends the client's connection without DISCONNECT (its will is due). */
function drop (client: MqttClient): void {
  (client as unknown as { stream: { destroy: () => void } }).stream.destroy()
  client.end(true)
}

/** Resolves with the time each message on `topic` arrives at `client`. */
function arrivals (client: MqttClient, topic: string): Array<{ at: number, payload: string }> {
  const seen: Array<{ at: number, payload: string }> = []
  client.on('message', (t, payload) => { if (t === topic) seen.push({ at: Date.now(), payload: payload.toString() }) })
  return seen
}

describe('MQTT 5 session expiry across a restart', () => {
  it('a session with a 2 s expiry that went away before the restart ends 2 s after it left, with its queue; a 60 s one is kept', async () => {
    const dir = freshDir()
    let b = await start(dir)
    for (const [id, expiry] of [['short', 2], ['long', 60]] as const) {
      const c = await connect(b.mqttUrl, v5(`dur-${id}`, { clean: false, properties: { sessionExpiryInterval: expiry } }))
      await c.subscribeAsync(`dur/${id}`, { qos: 1 })
      await c.endAsync()
    }
    const left = Date.now()
    b = await restart(b, dir)
    const pub = await connect(b.mqttUrl, v5('dur-pub'))
    await pub.publishAsync('dur/short', 'queued for short', { qos: 1 })
    await pub.publishAsync('dur/long', 'queued for long', { qos: 1 })
    const broker = b
    await eventually(async () => await metric(broker, 'ferrymq_sessions_expired_total') === 1, 6000, 'the 2 s session to expire after the restart')
    expect(Date.now() - left).toBeGreaterThanOrEqual(1900)

    const short = await connect(b.mqttUrl, v5('dur-short', { clean: false, properties: { sessionExpiryInterval: 2 } }))
    expect(connackOf(short).sessionPresent).toBe(false)
    const long = await connect(b.mqttUrl, v5('dur-long', { clean: false, properties: { sessionExpiryInterval: 60 } }), 5000)
    expect(connackOf(long).sessionPresent).toBe(true)
    expect((await collect(long, 1))[0]?.payload).toBe('queued for long')
    // The short session's message went with it: a marker published after it subscribed again comes first.
    const seen = collect(short, 1)
    await short.subscribeAsync('dur/short', { qos: 1 })
    await pub.publishAsync('dur/short', 'marker', { qos: 1 })
    expect((await seen)[0]?.payload).toBe('marker')
  })

  it('a session connected when the broker stopped keeps its own expiry: it ends that long after the restart', async () => {
    const dir = freshDir()
    let b = await start(dir)
    const c = await connect(b.mqttUrl, v5('dur-online', { clean: false, properties: { sessionExpiryInterval: 2 }, reconnectPeriod: 0 }))
    await c.subscribeAsync('dur/online', { qos: 1 })
    b = await restart(b, dir)
    const restarted = Date.now()
    const broker = b
    await eventually(async () => await metric(broker, 'ferrymq_sessions_expired_total') === 1, 6000, 'the session to expire 2 s after the restart')
    expect(Date.now() - restarted).toBeGreaterThanOrEqual(1900)
  })

  it('a session that ends at disconnect (expiry 0) leaves no queued messages behind', async () => {
    const b = await start(freshDir())
    const c = await connect(b.mqttUrl, v5('dur-zero', { clean: false }))
    await c.subscribeAsync('dur/zero', { qos: 1 })
    await c.endAsync()
    const pub = await connect(b.mqttUrl, v5('dur-zero-pub'))
    await pub.publishAsync('dur/zero', 'nobody waits for this', { qos: 1 })
    expect(await metric(b, 'ferrymq_queued_messages')).toBe(0)
  })

  it('a clean start drops the stored session and its queue, even with a new expiry', async () => {
    const b = await start(freshDir())
    const c = await connect(b.mqttUrl, v5('dur-clean', { clean: false, properties: { sessionExpiryInterval: 60 } }))
    await c.subscribeAsync('dur/clean', { qos: 1 })
    await c.endAsync()
    const pub = await connect(b.mqttUrl, v5('dur-clean-pub'))
    for (let i = 0; i < 3; i++) await pub.publishAsync('dur/clean', `stale ${i}`, { qos: 1 })
    expect(await metric(b, 'ferrymq_queued_messages')).toBe(3)
    const again = await connect(b.mqttUrl, v5('dur-clean', { clean: true, properties: { sessionExpiryInterval: 60 } }))
    expect(connackOf(again).sessionPresent).toBe(false)
    await eventually(async () => await metric(b, 'ferrymq_queued_messages') === 0, 3000, 'the old queue to be removed')
    const seen = collect(again, 1)
    await again.subscribeAsync('dur/clean', { qos: 1 })
    await pub.publishAsync('dur/clean', 'fresh', { qos: 1 })
    expect((await seen)[0]?.payload).toBe('fresh')
  })
})

describe('MQTT 5 will delay across a restart', () => {
  it('a will delayed 2 s, its client gone just before a restart, is published about 2 s after it left, not at once and not never', async () => {
    const dir = freshDir()
    let b = await start(dir)
    const dev = await connect(b.mqttUrl, v5('will-dev', {
      clean: false,
      reconnectPeriod: 0,
      properties: { sessionExpiryInterval: 30 },
      will: { topic: 'wills/dev', payload: Buffer.from('dev is gone'), qos: 1, retain: false, properties: { willDelayInterval: 2 } },
    }))
    drop(dev)
    const left = Date.now()
    await eventually(async () => await metric(b, 'ferrymq_clients_connected') === 0, 3000, 'the device to be gone')
    b = await restart(b, dir)
    const watcher = await connect(b.mqttUrl, v5('will-watcher'))
    const seen = arrivals(watcher, 'wills/dev')
    await watcher.subscribeAsync('wills/dev', { qos: 1 })
    await eventually(() => seen.length === 1, 6000, 'the delayed will')
    expect(seen[0]?.payload).toBe('dev is gone')
    expect((seen[0] as { at: number }).at - left).toBeGreaterThanOrEqual(1800)
  })

  it('a client that comes back within its will delay, after a restart, cancels the will', async () => {
    const dir = freshDir()
    let b = await start(dir)
    const device = async (id: string, delay: number): Promise<MqttClient> => await connect(b.mqttUrl, v5(id, {
      clean: false,
      reconnectPeriod: 0,
      properties: { sessionExpiryInterval: 30 },
      will: { topic: `wills/${id}`, payload: Buffer.from(`${id} is gone`), qos: 1, retain: false, properties: { willDelayInterval: delay } },
    }))
    // "back" returns within its 2 s delay; "control" (3 s) stays away: once its will arrives, the
    // cancelled one was due a second earlier and had every chance to arrive first.
    const back = await device('back', 2)
    const control = await device('control', 3)
    drop(back)
    drop(control)
    await eventually(async () => await metric(b, 'ferrymq_clients_connected') === 0, 3000, 'the devices to be gone')
    b = await restart(b, dir)
    const watcher = await connect(b.mqttUrl, v5('will-back-watcher'))
    const seen = arrivals(watcher, 'wills/back')
    const controlSeen = collect(watcher, 1, 8000, (t) => t === 'wills/control')
    await watcher.subscribeAsync(['wills/back', 'wills/control'], { qos: 1 })
    await connect(b.mqttUrl, v5('back', { clean: false, properties: { sessionExpiryInterval: 30 } }))
    expect((await controlSeen)[0]?.payload).toBe('control is gone')
    expect(seen).toEqual([])
  })

  it('kill -9 with a v5 client connected: its delayed will is published after the delay once the broker is back', async () => {
    const dir = freshDir()
    const port = await freePort()
    const run = (): BrokerProcess => {
      const p = spawnCli(['--port', String(port), '--ws-port', '0', '--http-port', '0', '--data-dir', dir, '--durability', 'fsync'])
      procs.push(p)
      return p
    }
    const first = run()
    await first.ready()
    const url = `mqtt://127.0.0.1:${port}`
    await connect(url, v5('will-crash', {
      clean: false,
      reconnectPeriod: 0,
      properties: { sessionExpiryInterval: 30 },
      will: { topic: 'wills/crash', payload: Buffer.from('crash victim'), qos: 1, retain: false, properties: { willDelayInterval: 1 } },
    }))
    first.proc.kill('SIGKILL')
    await first.exited()
    const second = run()
    await second.ready()
    const restarted = Date.now()
    const watcher = await connect(url, v5('will-crash-watcher'))
    const seen = arrivals(watcher, 'wills/crash')
    await watcher.subscribeAsync('wills/crash', { qos: 1 })
    await withTimeout(new Promise<void>((resolve) => { const t = setInterval(() => { if (seen.length > 0) { clearInterval(t); resolve() } }, 20) }), 6000, 'the will after the crash')
    expect(seen.map((s) => s.payload)).toEqual(['crash victim'])
    expect((seen[0] as { at: number }).at - restarted).toBeGreaterThanOrEqual(800)
  })
})

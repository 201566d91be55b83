import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { MqttClient } from 'mqtt'
import { afterAll, afterEach, describe, expect, it } from 'vitest'
import { connackOf, connect, endAllClients, eventually, withTimeout } from '../helpers/clients.js'
import { FaultProxy } from '../helpers/fault-proxy.js'
import { scrapeMetric } from '../helpers/metrics.js'
import { hasMosquitto, startMosquitto, type Mosquitto } from '../helpers/mosquitto.js'
import { freePort, spawnCli, type BrokerProcess } from '../helpers/process.js'
import type { OutboxEntry } from '../../src/bridge/outbox.js'
import { decode } from '../../src/store/codec.js'
import { prefixRange, readU64, str } from '../../src/store/keys.js'
import { META, openStore } from '../../src/store/open.js'
import { sublevelOf } from '../../src/store/writer.js'

/*
 * Durability of the store-and-forward bridge against kill -9: FerryMQ runs as a child process
 * (`node dist/cli.js`, build first) with --durability fsync and a `bridges:` section in its config
 * file, bridged to a real Mosquitto through a TCP fault proxy (the partition). FerryMQ is killed
 * with SIGKILL and started again on the same data dir and config.
 *
 * What the edge acknowledged (PUBACK for QoS 1, PUBCOMP for QoS 2: the client's own proof) must
 * reach the upstream subscriber: QoS 1 at least once with the order of first arrivals kept, QoS 2
 * exactly once and in order, also when the kills land while the bridge has QoS 2 messages in
 * flight (packet ids and PUBREC states stored in the outbox). Inbound, what Mosquitto acknowledged
 * to its publisher must reach FerryMQ's local persistent subscriber, QoS 2 exactly once, also when
 * FerryMQ is killed while Mosquitto forwards (its inbound QoS 2 state is deleted in the batch that
 * queues the local copies).
 *
 * Kills are triggered by what arrived (a count of messages seen downstream), not by timers.
 */

const BRIDGE = 'cloud'
const OUTBOX_METRIC = `ferrymq_bridge_outbox_messages{bridge="${BRIDGE}"}`
const CONNECTED_METRIC = `ferrymq_bridge_connected{bridge="${BRIDGE}"}`
const FORWARDED_IN_METRIC = `ferrymq_bridge_forwarded_total{bridge="${BRIDGE}",direction="in"}`

const dirs: string[] = []
const running: BrokerProcess[] = []
const cleanups: Array<() => Promise<void>> = []

afterEach(async () => {
  await endAllClients()
  for (const p of running.splice(0)) if (p.proc.exitCode === null && p.proc.signalCode === null) p.proc.kill('SIGKILL')
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {})
})
afterAll(() => { for (const d of dirs) rmSync(d, { recursive: true, force: true }) })

function tempDir (): string {
  const dir = mkdtempSync(join(tmpdir(), 'ferrymq-bridge-kill9-'))
  dirs.push(dir)
  return dir
}

/** Mosquitto (with persistence) and the fault proxy in front of it, closed after the test. */
async function upstream (): Promise<{ mosquitto: Mosquitto, proxy: FaultProxy }> {
  const mosquitto = await startMosquitto({ persistence: true })
  cleanups.push(() => mosquitto.close())
  const proxy = await FaultProxy.start({ port: mosquitto.port })
  cleanups.push(() => proxy.close())
  return { mosquitto, proxy }
}

/** One FerryMQ installation: a data dir, a config file and fixed ports, started again after each kill. */
class Edge {
  readonly dir = tempDir()
  readonly config = join(this.dir, 'ferrymq.json')
  proc: BrokerProcess | null = null
  /** Every run, for failure messages. */
  readonly runs: BrokerProcess[] = []

  private constructor (readonly port: number, readonly httpPort: number) {}

  static async create (bridge: Record<string, unknown>): Promise<Edge> {
    const edge = new Edge(await freePort(), await freePort())
    writeFileSync(edge.config, JSON.stringify({ bridges: [{ name: BRIDGE, ...bridge }] }, null, 2))
    return edge
  }

  get url (): string { return `mqtt://127.0.0.1:${this.port}` }
  get httpUrl (): string { return `http://127.0.0.1:${this.httpPort}` }

  /** Starts the CLI on the data dir; resolves once it logged "FerryMQ is ready" (listeners open). */
  async start (): Promise<void> {
    const p = spawnCli(['--config', this.config, '--port', String(this.port), '--http-port', String(this.httpPort), '--ws-port', '0',
      '--data-dir', join(this.dir, 'data'), '--durability', 'fsync', '--log-level', 'info'])
    running.push(p)
    this.runs.push(p)
    this.proc = p
    await p.ready(15_000)
  }

  async kill9 (): Promise<void> {
    const p = this.proc
    if (p === null) throw new Error('not running')
    p.proc.kill('SIGKILL')
    expect(await p.exited(10_000)).toBe('SIGKILL')
    running.splice(running.indexOf(p), 1)
    this.proc = null
  }

  /** With the edge down: what its bridge outbox holds on disk (QoS 2 entries sent under a packet id, and those at PUBREL). */
  async outboxOnDisk (): Promise<{ messages: number, withPacketId: number, released: number, counted: number }> {
    if (this.proc !== null) throw new Error('the edge is running')
    const store = await openStore(join(this.dir, 'data'), 'fsync')
    try {
      // The outbox's message counter in meta, written in the batch of every change.
      const counter = await sublevelOf(store.db, META).get(Buffer.concat([str('bc'), str(BRIDGE)]))
      const state = { messages: 0, withPacketId: 0, released: 0, counted: counter === undefined ? -1 : readU64(counter, 0) }
      for await (const v of sublevelOf(store.db, 'b').values(prefixRange(str(BRIDGE)))) {
        const e = decode<OutboxEntry>(v)
        state.messages++
        if (e.packetId !== undefined) state.withPacketId++
        if (e.released === true) state.released++
      }
      return state
    } finally {
      await store.close()
    }
  }

  async metric (sample: string): Promise<number | undefined> {
    return await scrapeMetric(this.httpUrl, sample)
  }

  /** The bridge's log lines of every run, for a failing expectation. */
  context (): string {
    return this.runs.map((p, i) => `--- run ${i + 1} ---\n` + p.stdout().split('\n').filter((l) => l.includes('bridge')).join('\n') + p.stderr()).join('\n').slice(-8000)
  }
}

/** The bridge settings the tests share: fixed client id, persistent upstream session, quick reconnects. */
function bridgeConfig (proxy: FaultProxy, clientId: string, topics: unknown[], extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    url: `mqtt://127.0.0.1:${proxy.port}`,
    clientId,
    clean: false,
    keepaliveSeconds: 5,
    reconnect: { minDelayMs: 20, maxDelayMs: 200, connectTimeoutMs: 2000 },
    topics,
    ...extra,
  }
}

/** Message numbers from payloads `<tag>:<n>` in arrival order. */
function recorder (client: MqttClient, topicPrefix: string): number[] {
  const seen: number[] = []
  client.on('message', (topic, payload) => {
    if (topic.startsWith(topicPrefix)) seen.push(Number(payload.toString().split(':')[1]))
  })
  return seen
}

/** The first arrival of each number, in arrival order. */
function firstArrivals (arrivals: number[]): number[] {
  const seen = new Set<number>()
  return arrivals.filter((n) => !seen.has(n) && seen.add(n) !== undefined)
}

function isIncreasing (list: number[]): boolean {
  return list.every((n, i) => i === 0 || n > (list[i - 1] as number))
}

/**
 * Publishes numbered messages `<tag>:<n>` from `next` on with `window` in flight, recording each
 * acknowledged number (PUBACK, or PUBCOMP for QoS 2), until `until` numbers were sent or stop().
 * A broker that is killed leaves the rest unacknowledged (not counted).
 */
class Load {
  readonly acked: number[] = []
  next: number
  private stopped = false
  private inflight = 0
  private wake: (() => void) | null = null
  readonly done: Promise<void>

  constructor (readonly client: MqttClient, readonly topic: string, readonly qos: 1 | 2, from: number, readonly until: number, readonly window: number) {
    this.next = from
    this.done = this.run()
  }

  stop (): void {
    this.stopped = true
    this.wake?.()
  }

  private async run (): Promise<void> {
    while (!this.stopped && this.next <= this.until) {
      if (this.inflight >= this.window) {
        await new Promise<void>((resolve) => { this.wake = resolve })
        this.wake = null
        continue
      }
      if (!this.client.connected) break
      const n = this.next++
      this.inflight++
      this.client.publish(this.topic, `m:${n}`, { qos: this.qos }, (err) => {
        this.inflight--
        if (err === undefined || err === null) this.acked.push(n)
        this.wake?.()
      })
    }
    // Lets what is in flight settle (acknowledged, or failed when the client is ended).
    while (this.inflight > 0 && this.client.connected) await new Promise<void>((resolve) => { this.wake = resolve })
  }
}

describe.skipIf(!hasMosquitto())('bridge durability against kill -9 (FerryMQ as a process, real Mosquitto upstream)', () => {
  it('QoS 1: messages acknowledged at the edge during a partition, with kill -9 mid-load and after, all reach the upstream in order once the link is back', async () => {
    const N = 1000
    const { mosquitto, proxy } = await upstream()
    const upSub = await connect(mosquitto.url, { clientId: 'up-sub-b', clean: false })
    await upSub.subscribeAsync('site/telemetry/#', { qos: 1 })
    const arrivals = recorder(upSub, 'site/telemetry/')

    const edge = await Edge.create(bridgeConfig(proxy, 'edge-b', [{ pattern: 'telemetry/#', direction: 'out', qos: 1, remotePrefix: 'site/' }]))
    await edge.start()
    await eventually(async () => await edge.metric(CONNECTED_METRIC) === 1, 10_000, 'the bridge to connect')
    proxy.cut('reset')
    await eventually(async () => await edge.metric(CONNECTED_METRIC) === 0, 10_000, 'the bridge to see the cut')

    // First half, killed mid-load (with messages in flight from the publisher).
    const acked: number[] = []
    let pub = await connect(edge.url, { clientId: 'edge-pub-b', clean: true })
    let load = new Load(pub, 'telemetry/a', 1, 1, N, 50)
    await eventually(() => load.acked.length >= N / 2, 30_000, 'half of the messages acknowledged')
    await edge.kill9()
    load.stop()
    acked.push(...load.acked)
    pub.end(true)
    await load.done
    const ackedBeforeKill = acked.length

    // Second half on the restarted edge, still partitioned; then kill -9 again with all of it acknowledged.
    await edge.start()
    pub = await connect(edge.url, { clientId: 'edge-pub-b', clean: true })
    load = new Load(pub, 'telemetry/a', 1, load.next, N, 50)
    await withTimeout(load.done, 30_000, 'second half published')
    acked.push(...load.acked)
    expect(await edge.metric(CONNECTED_METRIC)).toBe(0)
    expect(await edge.metric(OUTBOX_METRIC)).toBeGreaterThanOrEqual(load.acked.length)
    await pub.endAsync()
    await edge.kill9()
    expect(arrivals.length, 'nothing crossed the partition').toBe(0)

    await edge.start()
    const backlog = await edge.metric(OUTBOX_METRIC) ?? 0
    expect(backlog, edge.context()).toBeGreaterThanOrEqual(acked.length - ackedBeforeKill)
    proxy.restore()

    const ackedSet = new Set(acked)
    const missing = (): number[] => { const got = new Set(arrivals); return acked.filter((n) => !got.has(n)) }
    try {
      await eventually(() => missing().length === 0, 30_000, 'every acknowledged message upstream')
      await eventually(async () => await edge.metric(OUTBOX_METRIC) === 0, 10_000, 'the outbox to drain to 0 (/metrics)')
    } catch (err) {
      throw new Error(`${(err as Error).message}; acked ${acked.length}, arrived ${arrivals.length}, missing ${missing().length} (first ${missing().slice(0, 10).join(',')})\n${edge.context()}`)
    }
    const first = firstArrivals(arrivals).filter((n) => ackedSet.has(n))
    expect(first.length).toBe(acked.length)
    expect(isIncreasing(first), `first arrivals out of order: ${first.filter((n, i) => i > 0 && n < (first[i - 1] as number)).slice(0, 10).join(',')}`).toBe(true)
    expect(acked.length).toBeGreaterThanOrEqual(N / 2)
    console.log(`QoS 1 partition: ${acked.length} acknowledged (${ackedBeforeKill} before the first kill), outbox after restart ${backlog}, ${arrivals.length} arrivals (${arrivals.length - firstArrivals(arrivals).length} duplicates)`)
  }, 60_000)

  it('QoS 2: kill -9 six times while the bridge forwards (packet ids and PUBREC states stored): every acknowledged message upstream exactly once, in order', async () => {
    const ROUNDS = 6
    const { mosquitto, proxy } = await upstream()
    const upSub = await connect(mosquitto.url, { clientId: 'up-sub-c', clean: false })
    await upSub.subscribeAsync('site/q2/#', { qos: 2 })
    const arrivals = recorder(upSub, 'site/q2/')

    const edge = await Edge.create(bridgeConfig(proxy, 'edge-c', [{ pattern: 'q2/#', direction: 'out', qos: 2, remotePrefix: 'site/' }], { maxInflight: 16 }))
    const acked: number[] = []
    let next = 1
    const rounds: string[] = []
    for (let round = 0; round < ROUNDS; round++) {
      // Latency on the link in even rounds, so the kill finds many QoS 2 handshakes half done; none
      // in odd rounds, where a PUBREL reaches Mosquitto sooner than a disk write takes.
      proxy.delay(round % 2 === 0 ? 10 : 0)
      await edge.start()
      const pub = await connect(edge.url, { clientId: 'edge-pub-c', clean: true })
      const load = new Load(pub, 'q2/a', 2, next, next + 199, 16)
      // Kill once the bridge has forwarded some more (a different amount each round): it is mid-stream.
      const target = arrivals.length + 25 + 20 * round
      await eventually(() => arrivals.length >= target, 20_000, `round ${round}: ${target} arrivals upstream`)
      await edge.kill9()
      load.stop()
      pub.end(true)
      await load.done
      acked.push(...load.acked)
      next = load.next
      const disk = await edge.outboxOnDisk()
      rounds.push(`round ${round}: acked ${load.acked.length}, arrived ${arrivals.length}, outbox on disk ${disk.messages} (${disk.withPacketId} with a packet id, ${disk.released} at PUBREL), counter ${disk.counted}`)
      // The counter on disk matches the entries after a kill at any point (a drifting counter once
      // went below 0 after a few kills and stopped the process).
      expect(disk.counted, rounds.join('\n')).toBe(disk.messages)
    }

    // Last start: a fence message behind everything, then the outbox drains.
    await edge.start()
    const pub = await connect(edge.url, { clientId: 'edge-pub-c', clean: true })
    const fence = next
    await pub.publishAsync('q2/a', `m:${fence}`, { qos: 2 })
    acked.push(fence)
    const missing = (): number[] => { const got = new Set(arrivals); return acked.filter((n) => !got.has(n)) }
    try {
      await eventually(() => arrivals.includes(fence), 30_000, 'the fence message upstream')
      await eventually(async () => await edge.metric(OUTBOX_METRIC) === 0, 10_000, 'the outbox to drain to 0 (/metrics)')
    } catch (err) {
      throw new Error(`${(err as Error).message}; acked ${acked.length}, arrived ${arrivals.length}, missing ${missing().slice(0, 10).join(',')}\n${rounds.join('\n')}\n${edge.context()}`)
    }
    const context = `${rounds.join('\n')}\n${edge.context()}`
    const duplicates = arrivals.filter((n, i) => arrivals.indexOf(n) !== i)
    expect(duplicates, `duplicates upstream\n${context}`).toEqual([])
    expect(missing(), `acknowledged but missing upstream\n${context}`).toEqual([])
    expect(isIncreasing(arrivals), `out of order: ${arrivals.filter((n, i) => i > 0 && n < (arrivals[i - 1] as number)).slice(0, 10).join(',')}\n${context}`).toBe(true)
    console.log(`QoS 2 kills: ${acked.length} acknowledged, ${arrivals.length} arrived\n${rounds.join('\n')}`)
  }, 60_000)

  it('inbound: QoS 2 commands published upstream while FerryMQ is killed reach the local persistent subscriber after the restart, once each, in order', async () => {
    const K = 20
    const { mosquitto, proxy } = await upstream()
    const edge = await Edge.create(bridgeConfig(proxy, 'edge-in', [{ pattern: 'cmd/#', direction: 'in', qos: 2, remotePrefix: 'site/' }]))
    await edge.start()
    let local = await connect(edge.url, { clientId: 'local-sub', clean: false })
    await local.subscribeAsync('cmd/#', { qos: 2 })
    const cloud = await connect(mosquitto.url, { clientId: 'cloud-cmd', clean: true })
    // The bridge's upstream subscription is in place once a probe comes through (bounded retries).
    let probed = false
    local.on('message', (topic) => { if (topic === 'cmd/probe') probed = true })
    for (let i = 0; i < 100 && !probed; i++) {
      await cloud.publishAsync('site/cmd/probe', 'probe', { qos: 1 })
      await eventually(() => probed, 100, 'probe').catch(() => {})
    }
    expect(probed, `the bridge never delivered a probe\n${edge.context()}`).toBe(true)
    await local.endAsync()

    await edge.kill9()
    for (let n = 1; n <= K; n++) await cloud.publishAsync('site/cmd/x', `c:${n}`, { qos: 2 }) // PUBCOMP from Mosquitto

    await edge.start()
    // The subscriber resumes once the bridge has published them all locally: a session resumed while
    // new messages come in gets them interleaved with its backlog (aedes), which is not under test here.
    await eventually(async () => (await edge.metric(FORWARDED_IN_METRIC) ?? 0) >= K, 15_000, `${K} commands forwarded in (/metrics)`)
    local = await connect(edge.url, { clientId: 'local-sub', clean: false })
    expect(connackOf(local).sessionPresent).toBe(true)
    const got = recorder(local, 'cmd/x')
    try {
      await eventually(() => got.length >= K, 15_000, `${K} commands at the local subscriber`)
      // A fence behind them on the same path: nothing more (no duplicate) is on its way.
      let fenced = false
      local.on('message', (topic) => { if (topic === 'cmd/fence') fenced = true })
      await cloud.publishAsync('site/cmd/fence', 'fence', { qos: 2 })
      await eventually(() => fenced, 10_000, 'the fence command')
    } catch (err) {
      throw new Error(`${(err as Error).message}; got ${got.join(',')}\n${edge.context()}`)
    }
    expect(got).toEqual(Array.from({ length: K }, (_, i) => i + 1))
  }, 60_000)

  it('inbound QoS 2: kill -9 four times while Mosquitto forwards a backlog to the bridge: the local persistent subscriber gets every command once, in order', async () => {
    const M = 600
    const ROUNDS = 4
    const { mosquitto, proxy } = await upstream()
    const edge = await Edge.create(bridgeConfig(proxy, 'edge-in2', [{ pattern: 'cmd/#', direction: 'in', qos: 2, remotePrefix: 'site/' }]))
    await edge.start()
    // The subscriber whose session must get everything stays offline until the end (a new MQTT.js
    // client would count a re-sent, not yet acknowledged delivery twice).
    let local = await connect(edge.url, { clientId: 'local-sub2', clean: false })
    await local.subscribeAsync('cmd/x', { qos: 2 })
    await local.endAsync()
    const cloud = await connect(mosquitto.url, { clientId: 'cloud-cmd2', clean: true })
    // A QoS 0 watcher shows how far the bridge got, and that its upstream subscription is in place.
    let watcher = await connect(edge.url, { clientId: 'watch', clean: true })
    await watcher.subscribeAsync('cmd/#', { qos: 0 })
    let seen = 0
    let probed = false
    const watch = (topic: string): void => { if (topic === 'cmd/probe') probed = true; else seen++ }
    watcher.on('message', watch)
    for (let i = 0; i < 100 && !probed; i++) {
      await cloud.publishAsync('site/cmd/probe', 'probe', { qos: 1 })
      await eventually(() => probed, 100, 'probe').catch(() => {})
    }
    expect(probed, `the bridge never delivered a probe\n${edge.context()}`).toBe(true)

    // Mosquitto holds the backlog for the bridge's session and sends it at its own pace.
    await edge.kill9()
    for (let n = 1; n <= M; n++) await cloud.publishAsync('site/cmd/x', `c:${n}`, { qos: 2 })
    const rounds: string[] = []
    for (let round = 0; round < ROUNDS; round++) {
      proxy.delay(round % 2 === 0 ? 5 : 0)
      await edge.start()
      watcher = await connect(edge.url, { clientId: 'watch', clean: true })
      seen = 0
      watcher.on('message', watch)
      await watcher.subscribeAsync('cmd/#', { qos: 0 })
      const target = 20 + 15 * round
      await eventually(() => seen >= target, 20_000, `round ${round}: ${target} commands through the bridge`)
      await edge.kill9()
      watcher.end(true)
      rounds.push(`round ${round}: killed after ${seen} commands came in`)
    }

    // Last start: the bridge takes the rest of the backlog; a fence behind it shows it is all in.
    proxy.delay(0)
    await edge.start()
    watcher = await connect(edge.url, { clientId: 'watch', clean: true })
    let fenced = false
    watcher.on('message', (topic) => { if (topic === 'cmd/fence') fenced = true })
    await watcher.subscribeAsync('cmd/fence', { qos: 0 })
    await cloud.publishAsync('site/cmd/fence', 'fence', { qos: 2 })
    try {
      await eventually(() => fenced, 30_000, 'the fence command through the bridge')
    } catch (err) {
      throw new Error(`${(err as Error).message}\n${rounds.join('\n')}\n${edge.context()}\nmosquitto:\n${mosquitto.log().slice(-3000)}`)
    }
    // Then the local session's queue (resumed only now: a session resumed while new messages come
    // in gets them interleaved with its backlog, an aedes behaviour not under test here).
    local = await connect(edge.url, { clientId: 'local-sub2', clean: false })
    expect(connackOf(local).sessionPresent).toBe(true)
    const got = recorder(local, 'cmd/x')
    try {
      await eventually(() => got.length >= M, 30_000, `${M} commands at the local subscriber`)
    } catch (err) {
      const fwd = await edge.metric(FORWARDED_IN_METRIC)
      throw new Error(`${(err as Error).message}; got ${got.length} (last ${got.slice(-5).join(',')}), forwarded in since the restart ${fwd}\n${rounds.join('\n')}\n${edge.context()}`)
    }
    const context = `${rounds.join('\n')}\n${edge.context()}`
    const duplicates = got.filter((n, i) => got.indexOf(n) !== i)
    expect(duplicates, `duplicates at the local subscriber\n${context}`).toEqual([])
    expect(got, context).toEqual(Array.from({ length: M }, (_, i) => i + 1))
    console.log(`inbound QoS 2 kills:\n${rounds.join('\n')}`)
  }, 60_000)
})

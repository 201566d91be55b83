import hdr from 'hdr-histogram-js'
import { PUBACK, messageIdOffset, openSession, publishPacket, type Protocol, type Session } from './wire.js'
import { BRIDGE_SCENARIOS } from './bridge.js'
import { openSubscriber, publishAcknowledged, startPublishers, until, type Subscriber } from './load.js'
import type { Peer, PeerName, StartOptions } from './peers.js'

/** One number a scenario reports. */
export interface Metric {
  name: string
  value: number
  unit: string
  /** true for throughput, false for latency, memory, time. */
  higherIsBetter: boolean
}

export interface ScenarioOptions {
  /** Quick mode: shorter runs and smaller populations. */
  quick: boolean
  /** Measured window of a throughput run. */
  durationMs: number
  /** MQTT version every client of the bench speaks: 4 (3.1.1) or 5. */
  protocol: Protocol
}

export interface Scenario {
  name: string
  description: string
  /** Runs against the discard sink too (publish-side scenarios), to show the generator's ceiling. */
  againstSink: boolean
  /** Only for brokers that keep queued messages across a restart (ferrymq-os, ferrymq-fsync, mosquitto-persist). */
  persistentOnly?: boolean
  /** Runs only when named (--scenario or a suite), not in the default set. */
  onRequest?: boolean
  /** Brokers it can run on (default: all). */
  applies? (broker: PeerName): boolean
  /**
   * Called before each run's broker is started: whatever the scenario needs around it (an
   * upstream broker, a link to it) and the extra settings the broker starts with. `close()` runs
   * after the broker has stopped.
   */
  prepare? (broker: PeerName, options: ScenarioOptions): Promise<{ start: StartOptions, close (): Promise<void> }>
  run (peer: Peer, options: ScenarioOptions): Promise<Metric[]>
}

const PAYLOAD = 64

function rate (count: number, ms: number): number {
  return count / (ms / 1000)
}

function fanIn (qos: 0 | 1 | 2): Scenario {
  return {
    name: `fanin-q${qos}`,
    description: `10 publishers → 1 subscriber on a wildcard, QoS ${qos}, ${PAYLOAD} B${qos > 0 ? ', 100 in flight per publisher' : ''}`,
    againstSink: true,
    async run (peer, { durationMs, protocol }) {
      const sub = peer.received === undefined ? await openSubscriber(peer.port, 'bench-sub', 'bench/fanin/#', qos, { protocol }) : null
      const pubs = await startPublishers({
        port: peer.port, connections: 10, clientIdPrefix: 'bench-pub-', topicPrefix: 'bench/fanin/', qos,
        payloadSize: PAYLOAD, window: 100, durationMs, rate: 0, timestamp: false, protocol,
      })
      const before = sub?.received ?? await (peer.received as () => Promise<number>)()
      const start = performance.now()
      const result = await pubs.go()
      const elapsed = performance.now() - start
      const after = sub?.received ?? await (peer.received as () => Promise<number>)()
      sub?.close()
      if (result.errors.length > 0) throw new Error(`publishers: ${result.errors[0]}`)
      return [{ name: 'throughput', value: rate(after - before, elapsed), unit: 'msg/s', higherIsBetter: true }]
    },
  }
}

const fanOut: Scenario = {
  name: 'fanout-q0',
  description: '1 publisher → 50 subscribers, QoS 0, 64 B; deliveries per second',
  againstSink: false,
  async run (peer, { durationMs, protocol }) {
    const subs: Subscriber[] = []
    for (let i = 0; i < 50; i++) subs.push(await openSubscriber(peer.port, `bench-fan-${i}`, 'bench/fanout/0', 0, { protocol }))
    const pubs = await startPublishers({
      port: peer.port, connections: 1, clientIdPrefix: 'bench-fanpub-', topicPrefix: 'bench/fanout/', qos: 0,
      payloadSize: PAYLOAD, window: 0, durationMs, rate: 0, timestamp: false, protocol,
    })
    const count = (): number => subs.reduce((n, s) => n + s.received, 0)
    const before = count()
    const start = performance.now()
    await pubs.go()
    const elapsed = performance.now() - start
    const delivered = count() - before
    for (const s of subs) s.close()
    return [{ name: 'deliveries', value: rate(delivered, elapsed), unit: 'msg/s', higherIsBetter: true }]
  },
}

const latency: Scenario = {
  name: 'latency-q1',
  description: 'end-to-end latency at 5,000 msg/s, QoS 1, 64 B, 1 publisher → 1 subscriber',
  againstSink: false,
  async run (peer, { durationMs, protocol }) {
    const histogram = hdr.build({ lowestDiscernibleValue: 1, highestTrackableValue: 60_000_000, numberOfSignificantValueDigits: 3 })
    let recording = false
    const sub = await openSubscriber(peer.port, 'bench-lat-sub', 'bench/lat/0', 1, {
      protocol,
      onMessage: (body, at) => {
        if (recording) histogram.recordValue(Number((process.hrtime.bigint() - body.readBigUInt64BE(at)) / 1000n))
      },
    })
    const pubs = await startPublishers({
      port: peer.port, connections: 1, clientIdPrefix: 'bench-lat-pub-', topicPrefix: 'bench/lat/', qos: 1,
      payloadSize: PAYLOAD, window: 1000, durationMs: durationMs + 500, rate: 5000, timestamp: true, protocol,
    })
    const done = pubs.go()
    // The first half second warms connections and JIT up; it is not recorded.
    setTimeout(() => { recording = true }, 500).unref()
    await done
    sub.close()
    const ms = (us: number): number => us / 1000
    return [
      { name: 'p50', value: ms(histogram.getValueAtPercentile(50)), unit: 'ms', higherIsBetter: false },
      { name: 'p99', value: ms(histogram.getValueAtPercentile(99)), unit: 'ms', higherIsBetter: false },
      { name: 'p99.9', value: ms(histogram.getValueAtPercentile(99.9)), unit: 'ms', higherIsBetter: false },
    ]
  },
}

const connections: Scenario = {
  name: 'connections',
  description: 'idle clients (10,000; quick: 2,000) connected 200 at a time: connect rate and broker RSS per connection',
  againstSink: false,
  async run (peer, { quick, protocol }) {
    const total = quick ? 2000 : 10_000
    const baseline = peer.rssBytes()
    const sessions: Session[] = []
    let next = 0
    const start = performance.now()
    await Promise.all(Array.from({ length: 200 }, async () => {
      while (next < total) {
        const i = next++
        const s = await openSession(peer.port, `bench-idle-${i}`, { protocol })
        s.socket.on('error', () => {})
        sessions.push(s)
      }
    }))
    const elapsed = performance.now() - start
    // RSS settles once the broker has handled every CONNECT; measured after all CONNACKs arrived.
    const rss = peer.rssBytes()
    for (const s of sessions) s.socket.destroy()
    return [
      { name: 'connect rate', value: rate(total, elapsed), unit: 'conn/s', higherIsBetter: true },
      { name: 'RSS per connection', value: (rss - baseline) / total / 1024, unit: 'KiB', higherIsBetter: false },
      { name: 'RSS with all connected', value: rss / 1024 / 1024, unit: 'MiB', higherIsBetter: false },
    ]
  },
}

const backlog: Scenario = {
  name: 'backlog',
  description: 'QoS 1 messages (100,000; quick: 20,000) queued for an offline persistent session, drained on reconnect',
  againstSink: false,
  async run (peer, { quick, protocol }) {
    const total = quick ? 20_000 : 100_000
    const first = await openSubscriber(peer.port, 'bench-backlog', 'bench/backlog', 1, { clean: false, protocol })
    // A clean DISCONNECT, so the broker has the session offline before the first message.
    const closed = new Promise((resolve) => first.session.socket.once('close', resolve))
    first.session.socket.end(Buffer.from([0xe0, 0x00]))
    await closed
    // Publish the backlog: one publisher, 100 in flight, until every message is acknowledged.
    let acked = 0
    const pub = await openSession(peer.port, 'bench-backlog-pub', { protocol })
    const template = publishPacket('bench/backlog', Buffer.alloc(PAYLOAD, 0x62), 1, 1, protocol)
    const idAt = messageIdOffset(template)
    let sent = 0
    const send = (n: number): void => {
      const parts: Buffer[] = []
      for (let i = 0; i < n && sent < total; i++, sent++) {
        const p = Buffer.from(template)
        p.writeUInt16BE((sent % 65535) + 1, idAt)
        parts.push(p)
      }
      if (parts.length > 0) pub.socket.write(Buffer.concat(parts))
    }
    pub.onFrame((type) => {
      if (type === PUBACK) {
        acked++
        send(1)
      }
    })
    // 100 in flight, or an MQTT 5 broker's Receive Maximum if lower (Mosquitto's is 20).
    send(Math.min(100, pub.receiveMaximum))
    await until(() => acked >= total, quick ? 60_000 : 180_000, `backlog of ${total} acknowledged`)
    pub.socket.destroy()

    const start = performance.now()
    const again = await openSubscriber(peer.port, 'bench-backlog', null, 1, { clean: false, protocol })
    await until(() => again.received >= total, quick ? 60_000 : 180_000, `backlog of ${total} drained (got ${again.received})`)
    const elapsed = performance.now() - start
    again.close()
    return [
      { name: 'drain time', value: elapsed / 1000, unit: 's', higherIsBetter: false },
      { name: 'drain rate', value: rate(total, elapsed), unit: 'msg/s', higherIsBetter: true },
    ]
  },
}

const payloadSweep: Scenario = {
  name: 'payload',
  description: '1 publisher → 1 subscriber, QoS 0, payloads 16 B to 64 KiB: delivered MiB/s',
  againstSink: false,
  async run (peer, { quick, durationMs, protocol }) {
    const sizes = quick ? [16, 1024, 65536] : [16, 256, 1024, 4096, 16384, 65536]
    const metrics: Metric[] = []
    for (const size of sizes) {
      const sub = await openSubscriber(peer.port, `bench-pay-sub-${size}`, `bench/pay/${size}/0`, 0, { protocol })
      const pubs = await startPublishers({
        port: peer.port, connections: 1, clientIdPrefix: `bench-pay-pub-${size}-`, topicPrefix: `bench/pay/${size}/`, qos: 0,
        payloadSize: size, window: 0, durationMs: Math.max(500, Math.round(durationMs / 2)), rate: 0, timestamp: false, protocol,
      })
      const before = sub.received
      const start = performance.now()
      await pubs.go()
      const elapsed = performance.now() - start
      const delivered = sub.received - before
      sub.close()
      metrics.push({ name: size >= 1024 ? `${size / 1024} KiB` : `${size} B`, value: rate(delivered * size, elapsed) / 1024 / 1024, unit: 'MiB/s', higherIsBetter: true })
    }
    return metrics
  },
}

/** Resolves with the CONNACK'd session once the broker accepts a client, retrying refused connections every 5 ms. */
async function acceptedSession (peer: Peer, clientId: string, timeoutMs: number, protocol: Protocol): Promise<Session> {
  const deadline = performance.now() + timeoutMs
  for (;;) {
    try {
      return await openSession(peer.port, clientId, { clean: true, timeoutMs, protocol })
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ECONNREFUSED' && (err as NodeJS.ErrnoException).code !== 'ECONNRESET') throw err
    }
    try {
      process.kill(peer.pid, 0)
    } catch {
      throw new Error(`${peer.name} exited during start-up`)
    }
    if (performance.now() > deadline) throw new Error(`${peer.name} accepted no client within ${timeoutMs} ms of its start`)
    await new Promise((resolve) => setTimeout(resolve, 5))
  }
}

const startup: Scenario = {
  name: 'startup',
  description: 'start-up with QoS 1 messages (1,000,000; quick: 100,000; 64 B) queued for one offline persistent session: ' +
    'filled over the network in the mode under test by 10 publishers with 100 in flight each until all are acknowledged, ' +
    'broker stopped with SIGTERM, restarted on the same data; seconds from spawn until a new client\'s CONNACK and until the ' +
    'persistent session, reconnecting then, gets its first queued message; RSS and data on disk after start-up',
  againstSink: false,
  persistentOnly: true,
  async run (peer, { quick, protocol }) {
    if (peer.restart === undefined) throw new Error(`${peer.name} cannot restart`)
    const total = quick ? 100_000 : 1_000_000
    const clientId = 'bench-startup'
    const topic = 'bench/startup'
    const first = await openSubscriber(peer.port, clientId, topic, 1, { clean: false, protocol })
    const closed = new Promise((resolve) => first.session.socket.once('close', resolve))
    first.session.socket.end(Buffer.from([0xe0, 0x00]))
    await closed
    await publishAcknowledged(peer.port, {
      topic, total, payloadSize: PAYLOAD, connections: 10, window: 100, clientIdPrefix: 'bench-startup-pub-', timeoutMs: 900_000, protocol,
    })

    const spawnedAt = await peer.restart()
    const probe = await acceptedSession(peer, 'bench-startup-probe', 120_000, protocol)
    const accepted = performance.now() - spawnedAt
    probe.socket.destroy()
    const rss = peer.rssBytes()
    const disk = peer.diskBytes()
    const resumed = await openSubscriber(peer.port, clientId, null, 1, { clean: false, protocol })
    await until(() => resumed.received > 0, 120_000, 'first queued message after the restart')
    const firstMessage = performance.now() - spawnedAt
    resumed.close()
    return [
      { name: 'clients accepted', value: accepted / 1000, unit: 's', higherIsBetter: false },
      { name: 'first queued message', value: firstMessage / 1000, unit: 's', higherIsBetter: false },
      { name: 'RSS after start-up', value: rss / 1024 / 1024, unit: 'MiB', higherIsBetter: false },
      { name: 'data on disk', value: disk / 1024 / 1024, unit: 'MiB', higherIsBetter: false },
    ]
  },
}

export const SCENARIOS: readonly Scenario[] = [fanIn(0), fanIn(1), fanIn(2), fanOut, latency, connections, backlog, payloadSweep, startup, ...BRIDGE_SCENARIOS]

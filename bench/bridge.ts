import { LinkSwitch } from './link.js'
import { openSubscriber, publishAcknowledged, startPublishers, until } from './load.js'
import { startPeer, type Peer, type PeerName, type StartOptions } from './peers.js'
import type { Metric, Scenario, ScenarioOptions } from './scenarios.js'

/*
 * The store-and-forward bridge (src/bridge/) against Mosquitto's own bridge. Every run gets a
 * fresh upstream Mosquitto (`mosquitto`, persistence false, max_inflight_messages 0 so its
 * delivery to the bench's subscriber never limits the drain) behind a LinkSwitch the bench turns
 * on; the broker under test is the edge, bridged to it with one out-mapping `telemetry/#`, QoS 1:
 *
 *   publishers ─► edge (FerryMQ or Mosquitto) ─► LinkSwitch ─► upstream Mosquitto ─► subscriber
 *
 * Both bridges keep at most BRIDGE_INFLIGHT QoS 1 messages unacknowledged (FerryMQ's maxInflight
 * default; Mosquitto's max_inflight_messages, default 20, raised to match).
 */

const PAYLOAD = 64
/** Messages in flight on the bridge link (FerryMQ's bridges[].maxInflight default). */
const BRIDGE_INFLIGHT = Number(process.env.BENCH_BRIDGE_INFLIGHT ?? 1000)
const BRIDGE_TOPIC = 'telemetry/bench'

function rate (count: number, ms: number): number {
  return count / (ms / 1000)
}

/** The bridge section of the edge's config, for FerryMQ and for Mosquitto. */
function edgeConfig (linkPort: number): StartOptions {
  return {
    metrics: true,
    ferrymqConfig: [
      'bridges:',
      '  - name: uplink',
      `    url: mqtt://127.0.0.1:${linkPort}`,
      '    clientId: bench-edge',
      `    maxInflight: ${BRIDGE_INFLIGHT}`,
      // Back at once when the link is: the drain is timed from the first forwarded connection anyway.
      '    reconnect: { minDelayMs: 50, maxDelayMs: 100, connectTimeoutMs: 2000 }',
      '    topics:',
      '      - { pattern: "telemetry/#", direction: out, qos: 1 }',
      // Out of the way: nothing is dropped or expired however large the backlog.
      '    outbox: { maxMessages: 100000000, maxBytes: 1099511627776, maxAgeSeconds: 0 }',
    ],
    mosquittoConfig: [
      'max_queued_messages 0', // unlimited: the bridge's queue holds the whole backlog
      `max_inflight_messages ${BRIDGE_INFLIGHT}`,
      'connection uplink',
      `address 127.0.0.1:${linkPort}`,
      'clientid bench-edge',
      'cleansession false',
      'restart_timeout 1',
      'topic telemetry/# out 1',
    ],
  }
}

/** What a run has around the edge broker: the upstream and the link to it. */
interface Uplink { upstream: Peer, link: LinkSwitch }

/** The upstream and link of the run in progress (runs are sequential). */
let current: Uplink | null = null

async function prepareUplink (linkUp: boolean): Promise<{ start: StartOptions, close (): Promise<void> }> {
  const upstream = await startPeer('mosquitto', { mosquittoConfig: ['max_inflight_messages 0'] })
  const link = await LinkSwitch.start(upstream.port)
  if (linkUp) link.up()
  const uplink = { upstream, link }
  current = uplink
  return {
    start: edgeConfig(link.port),
    close: async () => {
      if (current === uplink) current = null
      await link.close()
      await upstream.stop()
    },
  }
}

function uplinkOf (peer: Peer): Uplink {
  if (current === null) throw new Error(`${peer.name}: no upstream prepared`)
  return current
}

/** FerryMQ's ferrymq_bridge_outbox_messages for the bench's bridge, from /metrics. */
async function outboxMessages (peer: Peer): Promise<number> {
  const res = await fetch(`http://127.0.0.1:${peer.httpPort as number}/metrics`)
  const text = await res.text()
  const m = /^ferrymq_bridge_outbox_messages\{bridge="uplink"\} (\d+)/m.exec(text)
  if (m === null) throw new Error('ferrymq_bridge_outbox_messages{bridge="uplink"} not in /metrics')
  return Number(m[1])
}

/** Resolves once `check()` resolves true, asking every 20 ms, or rejects after `timeoutMs`. */
async function polled (check: () => Promise<boolean>, timeoutMs: number, what: () => string): Promise<void> {
  const deadline = performance.now() + timeoutMs
  while (!await check()) {
    if (performance.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms: ${what()}`)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}

/** A bridge needs an outbox on disk: FerryMQ in os or fsync mode, or Mosquitto. */
function bridgeCapable (broker: PeerName): boolean {
  return broker === 'ferrymq-os' || broker === 'ferrymq-fsync' || broker.startsWith('mosquitto')
}

/** Messages queued in the drain scenario: BENCH_BRIDGE_MESSAGES overrides (for quick experiments). */
function drainTotal ({ quick }: ScenarioOptions): number {
  const given = process.env.BENCH_BRIDGE_MESSAGES
  return given !== undefined && given !== '' ? Number(given) : quick ? 100_000 : 1_000_000
}

const drain: Scenario = {
  name: 'bridge-drain',
  description: `store-and-forward after an outage: with the uplink down, QoS 1 messages (1,000,000; quick: 100,000; ${PAYLOAD} B) ` +
    'are published at the edge by 10 publishers with 100 in flight each, into the bridge\'s queue (fill rate: until all are ' +
    'acknowledged and, for FerryMQ, ferrymq_bridge_outbox_messages holds them all); then the uplink comes up and the drain is timed ' +
    `from the bridge's first forwarded connection until a subscriber on the upstream Mosquitto has them all; ${BRIDGE_INFLIGHT} in flight ` +
    'on the bridge link (FerryMQ maxInflight, Mosquitto max_inflight_messages); the edge\'s CPU time from link-up to the end, per message',
  againstSink: false,
  onRequest: true,
  applies: bridgeCapable,
  prepare: async () => await prepareUplink(false),
  async run (peer, options) {
    const { upstream, link } = uplinkOf(peer)
    const total = drainTotal(options)
    const { protocol } = options
    // At least 2,000 msg/s, or something is broken (1M: 500 s each for the fill and the drain).
    const timeoutMs = Math.max(120_000, total / 2)
    const sub = await openSubscriber(upstream.port, 'bench-upstream-sub', 'telemetry/#', 1, { protocol })
    try {
      const fillStart = performance.now()
      await publishAcknowledged(peer.port, {
        topic: BRIDGE_TOPIC, total, payloadSize: PAYLOAD, connections: 10, window: 100, clientIdPrefix: 'bench-bridge-pub-', timeoutMs, protocol,
      })
      // FerryMQ acknowledges a QoS 1 PUBLISH once it is journaled; the outbox append follows.
      if (peer.httpPort !== undefined) {
        let inOutbox = 0
        await polled(async () => (inOutbox = await outboxMessages(peer)) >= total, 120_000, () => `${total} messages in the bridge outbox (got ${inOutbox})`)
      }
      const filled = performance.now() - fillStart
      if (sub.received > 0) throw new Error(`the upstream got ${sub.received} messages while the link was down`)

      const cpuBefore = peer.cpuSeconds()
      link.up()
      const upAt = performance.now()
      await until(() => sub.received >= total, timeoutMs, `${total} messages at the upstream (got ${sub.received})`)
      const end = performance.now()
      const cpu = peer.cpuSeconds() - cpuBefore
      const forwardedAt = link.forwardedAt ?? upAt
      const metrics: Metric[] = [
        { name: 'fill rate', value: rate(total, filled), unit: 'msg/s', higherIsBetter: true },
        { name: 'drain rate', value: rate(total, end - forwardedAt), unit: 'msg/s', higherIsBetter: true },
        { name: 'drain time', value: (end - forwardedAt) / 1000, unit: 's', higherIsBetter: false },
        // Less sensitive to other work on the machine than the rate.
        { name: 'edge CPU per message drained', value: cpu / total * 1e6, unit: 'µs', higherIsBetter: false },
      ]
      if (peer.httpPort !== undefined) {
        // Acknowledged upstream and deleted: the outbox is empty again.
        let left = -1
        await polled(async () => (left = await outboxMessages(peer)) === 0, 30_000, () => `an empty outbox after the drain (${left} left)`)
      }
      return metrics
    } finally {
      sub.close()
    }
  },
}

/** Alternates which half of bridge-publish-cost runs first, run to run. */
let costRuns = 0

const publishCost: Scenario = {
  name: 'bridge-publish-cost',
  description: `fan-in QoS 1 (10 publishers, 100 in flight each, ${PAYLOAD} B, one wildcard subscriber at the edge) on an edge bridged to ` +
    'an upstream that is up: on topics no out-mapping takes, then on topics the mapping telemetry/# takes (each message also goes ' +
    'into the bridge\'s queue and upstream), the order alternating run to run; with / without is the cost of bridging every message; ' +
    'forwarded is the rate at which the upstream subscriber got them during the bridged half',
  againstSink: false,
  onRequest: true,
  applies: bridgeCapable,
  prepare: async () => await prepareUplink(true),
  async run (peer, { durationMs, protocol }) {
    const { upstream } = uplinkOf(peer)
    const edgeSub = await openSubscriber(peer.port, 'bench-edge-sub', '#', 1, { protocol })
    const upSub = await openSubscriber(upstream.port, 'bench-upstream-sub', 'telemetry/#', 1, { protocol })
    const results = new Map<'without' | 'with', { throughput: number, forwarded: number }>()
    try {
      const order: Array<'without' | 'with'> = costRuns++ % 2 === 0 ? ['without', 'with'] : ['with', 'without']
      for (const half of order) {
        const pubs = await startPublishers({
          port: peer.port, connections: 10, clientIdPrefix: `bench-cost-${half}-`, topicPrefix: half === 'with' ? 'telemetry/fanin/' : 'bench/fanin/', qos: 1,
          payloadSize: PAYLOAD, window: 100, durationMs, rate: 0, timestamp: false, protocol,
        })
        const before = edgeSub.received
        const upBefore = upSub.received
        const start = performance.now()
        const result = await pubs.go()
        const elapsed = performance.now() - start
        if (result.errors.length > 0) throw new Error(`publishers: ${result.errors[0]}`)
        results.set(half, { throughput: rate(edgeSub.received - before, elapsed), forwarded: rate(upSub.received - upBefore, elapsed) })
        // What the bridge still owes goes upstream before the other half starts, so it does not run beside it.
        if (half === 'with') await until(() => upSub.received - upBefore >= result.acked, 120_000, `bridged messages at the upstream (${upSub.received - upBefore} of ${result.acked})`)
      }
    } finally {
      edgeSub.close()
      upSub.close()
    }
    const without = results.get('without') as { throughput: number }
    const bridged = results.get('with') as { throughput: number, forwarded: number }
    return [
      { name: 'throughput without mapping', value: without.throughput, unit: 'msg/s', higherIsBetter: true },
      { name: 'throughput bridged', value: bridged.throughput, unit: 'msg/s', higherIsBetter: true },
      { name: 'bridged / without', value: bridged.throughput / without.throughput, unit: '×', higherIsBetter: true },
      { name: 'forwarded upstream', value: bridged.forwarded, unit: 'msg/s', higherIsBetter: true },
    ]
  },
}

export const BRIDGE_SCENARIOS: readonly Scenario[] = [drain, publishCost]

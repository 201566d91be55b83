import type { FleetStats } from './fleet.js'
import type { Ledger } from './ledger.js'
import type { LatencySummary } from './verifier.js'

export interface DeviceSummary {
  device: string
  produced: number
  sent: number
  acked: number
  rejected: number
  droppedFromBuffer: number
  received: number
  lost: number
  duplicated: number
  outOfOrder: number
  qos0NotReceived: number
  unacked: number
  /** Up to 20 lost sequence numbers. */
  lostSeqs?: number[]
}

export interface Totals {
  produced: number
  sent: number
  acked: number
  rejected: number
  droppedFromBuffer: number
  received: number
  lost: number
  /** Lost messages by the QoS the device published them with: [QoS 1, QoS 2]. */
  lostByQos: [number, number]
  duplicated: number
  duplicatedQos2: number
  outOfOrder: number
  qos0NotReceived: number
  unacked: number
  unknown: number
  foreign: number
  malformed: number
}

export interface Summary {
  runId: string
  ok: boolean
  devices: number
  durationS: number
  /** Sent messages per second over the production phase. */
  sentPerSecond: number
  receivedPerSecond: number
  connects: number
  disconnects: number
  /** Device start → first CONNACK, ms. */
  firstConnectMs: { count: number, p50: number, p90: number, p99: number, max: number }
  faultDrops: number
  /** The verifier's own connection: CONNACKs, lost connections, last error. */
  verifier: { connects: number, disconnects: number, lastError?: string }
  commands: { sent: number, answered: number, timedOut: number }
  drained: boolean
  settled: boolean
  /** Messages that went through the devices' offline buffers. */
  bufferedTotal: number
  totals: Totals
  /** End-to-end latency of every received message (production → receipt, buffering included). */
  latencyMs: LatencySummary
  /** The same for messages that did not wait in an offline buffer. */
  latencyDirectMs: LatencySummary
  /** Devices with lost, duplicated, out-of-order, dropped or unacknowledged messages (all with perDevice). */
  perDevice: DeviceSummary[]
}

export function deviceSummary (ledger: Ledger, id: string): DeviceSummary {
  const d = ledger.device(id)
  const lost = d.lost()
  const s: DeviceSummary = {
    device: id,
    produced: d.produced,
    sent: d.sent,
    acked: d.acked,
    rejected: d.rejected,
    droppedFromBuffer: d.dropped,
    received: d.received,
    lost: lost.length,
    duplicated: d.duplicates,
    outOfOrder: d.outOfOrder,
    qos0NotReceived: d.qos0NotReceived(),
    unacked: d.unacked(),
  }
  if (lost.length > 0) s.lostSeqs = lost.slice(0, 20)
  return s
}

export function totals (ledger: Ledger): Totals {
  const t: Totals = { produced: 0, sent: 0, acked: 0, rejected: 0, droppedFromBuffer: 0, received: 0, lost: 0, lostByQos: [0, 0], duplicated: 0, duplicatedQos2: 0, outOfOrder: 0, qos0NotReceived: 0, unacked: 0, unknown: ledger.unknown, foreign: ledger.foreign, malformed: ledger.malformed }
  for (const d of ledger.devices.values()) {
    t.produced += d.produced; t.sent += d.sent; t.acked += d.acked; t.rejected += d.rejected; t.droppedFromBuffer += d.dropped
    t.received += d.received; t.lost += d.awaiting; t.duplicated += d.duplicates; t.duplicatedQos2 += d.duplicatesQos2
    if (d.awaiting > 0) for (const seq of d.lost()) t.lostByQos[d.qosOf(seq) === 2 ? 1 : 0]++
    t.outOfOrder += d.outOfOrder; t.qos0NotReceived += d.qos0NotReceived(); t.unacked += d.unacked()
  }
  return t
}

export function perDevice (ledger: Ledger, all: boolean): DeviceSummary[] {
  const out: DeviceSummary[] = []
  for (const id of ledger.devices.keys()) {
    const s = deviceSummary(ledger, id)
    if (all || s.lost > 0 || s.duplicated > 0 || s.outOfOrder > 0 || s.droppedFromBuffer > 0 || s.unacked > 0 || s.rejected > 0) out.push(s)
  }
  return out
}

const fmt = (n: number): string => n.toLocaleString('en-US')
const lat = (l: LatencySummary): string => l.count === 0 ? '-' : `${l.p50} / ${l.p90} / ${l.p99} / ${l.p999} / ${l.max}  (${fmt(l.count)} msgs)`

export function formatSummary (s: Summary): string {
  const t = s.totals
  const rows: Array<[string, string]> = [
    ['run', s.runId],
    ['devices', fmt(s.devices)],
    ['duration', `${s.durationS.toFixed(1)} s`],
    ['produced', fmt(t.produced)],
    ['sent', `${fmt(t.sent)}  (${fmt(Math.round(s.sentPerSecond))} msg/s)`],
    ['acknowledged', fmt(t.acked)],
    ['rejected (reason >= 0x80)', fmt(t.rejected)],
    ['through offline buffers / dropped there', `${fmt(s.bufferedTotal)} / ${fmt(t.droppedFromBuffer)}`],
    ['unacknowledged at the end', fmt(t.unacked)],
    ['received', `${fmt(t.received)}  (${fmt(Math.round(s.receivedPerSecond))} msg/s)`],
    ['LOST (acknowledged, never received)', `${fmt(t.lost)}${t.lost === 0 ? '' : `  (QoS 1: ${fmt(t.lostByQos[0])}, QoS 2: ${fmt(t.lostByQos[1])})`}`],
    ['duplicated (QoS 2 among them)', `${fmt(t.duplicated)} (${fmt(t.duplicatedQos2)})`],
    ['out of order', fmt(t.outOfOrder)],
    ['QoS 0 not received', fmt(t.qos0NotReceived)],
    ['unknown / foreign / malformed', `${fmt(t.unknown)} / ${fmt(t.foreign)} / ${fmt(t.malformed)}`],
    ['connects / disconnects', `${fmt(s.connects)} / ${fmt(s.disconnects)}`],
    ['first connect ms p50/p90/p99/max', `${s.firstConnectMs.p50} / ${s.firstConnectMs.p90} / ${s.firstConnectMs.p99} / ${s.firstConnectMs.max}  (${fmt(s.firstConnectMs.count)} devices)`],
    ['injected drops', fmt(s.faultDrops)],
    ['verifier connects / disconnects', `${fmt(s.verifier.connects)} / ${fmt(s.verifier.disconnects)}${s.verifier.lastError === undefined ? '' : `  (last error: ${s.verifier.lastError})`}`],
    ['commands sent / answered / timed out', `${fmt(s.commands.sent)} / ${fmt(s.commands.answered)} / ${fmt(s.commands.timedOut)}`],
    ['latency ms p50/p90/p99/p99.9/max, all', lat(s.latencyMs)],
    ['  not offline-buffered', lat(s.latencyDirectMs)],
    ['drained / settled', `${s.drained ? 'yes' : 'no'} / ${s.settled ? 'yes' : 'no'}`],
    ['result', s.ok ? 'OK: no acknowledged message lost' : `FAIL: ${fmt(t.lost)} acknowledged message(s) lost`],
  ]
  const w = Math.max(...rows.map(([k]) => k.length))
  const lines = rows.map(([k, v]) => `${k.padEnd(w)}  ${v}`)
  const bad = s.perDevice.filter((d) => d.lost > 0 || d.outOfOrder > 0 || d.duplicated > 0).sort((a, b) => b.lost - a.lost || b.outOfOrder - a.outOfOrder || b.duplicated - a.duplicated).slice(0, 20)
  if (bad.length > 0) {
    lines.push('', 'devices with anomalies (up to 20):', 'device'.padEnd(16) + 'sent'.padStart(8) + 'acked'.padStart(8) + 'recv'.padStart(8) + 'lost'.padStart(8) + 'dup'.padStart(8) + 'ooo'.padStart(8) + '  lost seqs')
    for (const d of bad) {
      lines.push(d.device.padEnd(16) + String(d.sent).padStart(8) + String(d.acked).padStart(8) + String(d.received).padStart(8) + String(d.lost).padStart(8) + String(d.duplicated).padStart(8) + String(d.outOfOrder).padStart(8) + '  ' + (d.lostSeqs ?? []).join(','))
    }
  }
  return lines.join('\n') + '\n'
}

export function progressLine (elapsedS: number, f: FleetStats, msgsPerSecond: number, received: number, awaiting: number): string {
  return `[${elapsedS.toFixed(0).padStart(4)}s] connected ${f.connected}/${f.devices} (waiting ${f.waiting}, asleep ${f.sleeping})  ` +
    `sent ${fmt(f.sent)} (${fmt(Math.round(msgsPerSecond))} msg/s)  in flight ${fmt(f.inFlight)}  buffered ${fmt(f.buffered)}  ` +
    `dropped ${fmt(f.dropped)}  received ${fmt(received)}  awaiting ${fmt(awaiting)}`
}

import { randomBytes } from 'node:crypto'
import { Commander } from './command.js'
import { Fleet, type FleetOptions } from './fleet.js'
import { Ledger } from './ledger.js'
import { formatSummary, perDevice, progressLine, totals, type Summary } from './report.js'
import { Verifier } from './verifier.js'

export interface SimulationOptions extends FleetOptions {
  verify?: { url: string, topic: string, qos: 1 | 2, protocol?: 4 | 5, username?: string, password?: string } | false
  /** After production ends: how long to wait for buffers to drain and, then, for the verifier, ms. */
  graceMs: number
  /** Commands per second sent to actuators (0: none). */
  commandsPerSecond?: number
  /** List every device in the summary, not only those with anomalies. */
  perDeviceAll?: boolean
  /** Progress lines go here (nothing when undefined). */
  progress?: NodeJS.WriteStream | NodeJS.WritableStream
  /** Seconds between progress lines when the stream is not a TTY (default 5). */
  progressEverySeconds?: number
  /** Aborting ends production early (the run still drains, settles and reports). */
  signal?: AbortSignal
}

export { formatSummary }

const NO_LATENCY = { count: 0, min: 0, p50: 0, p90: 0, p99: 0, p999: 0, max: 0, mean: 0 }

/** Runs a whole simulation: verifier, fleet, faults, drain, settle, summary. */
export async function runSimulation (o: SimulationOptions): Promise<Summary> {
  const runId = o.runId ?? randomBytes(4).toString('hex')
  const ledger = o.ledger ?? new Ledger(runId)
  let verifier: Verifier | undefined
  if (o.verify !== false && o.verify !== undefined) {
    verifier = new Verifier({ ...o.verify, ...(o.tls === undefined ? {} : { tls: o.tls }), ledger })
    await verifier.start()
  }
  const fleet = new Fleet({ ...o, runId, ledger })
  let commander: Commander | undefined
  let commandTimer: NodeJS.Timeout | undefined
  let progressTimer: NodeJS.Timeout | undefined
  const out = o.progress
  const tty = out !== undefined && 'isTTY' in out && out.isTTY
  let lastSent = 0
  let lastAt = Date.now()
  let lastPrinted = 0
  const printProgress = (final = false): void => {
    if (out === undefined) return
    const now = Date.now()
    const s = fleet.stats()
    const rate = (s.sent - lastSent) * 1000 / Math.max(1, now - lastAt)
    lastSent = s.sent; lastAt = now
    const line = progressLine((now - fleet.startedAt) / 1000, s, rate, verifier?.received ?? 0, verifier === undefined ? 0 : ledger.awaiting())
    if (tty) out.write(`\r\x1b[K${line}${final ? '\n' : ''}`)
    else if (final || now - lastPrinted >= (o.progressEverySeconds ?? 5) * 1000 - 100) { out.write(line + '\n'); lastPrinted = now }
  }
  try {
    fleet.start()
    o.signal?.addEventListener('abort', () => { fleet.stopProducing() }, { once: true })
    if (out !== undefined) progressTimer = setInterval(() => { printProgress() }, 1000)
    const actuators = fleet.devices.filter((d) => d.profile === 'actuator')
    if ((o.commandsPerSecond ?? 0) > 0 && actuators.length > 0) {
      commander = new Commander({ url: o.url, protocol: o.protocol, ...(o.username === undefined ? {} : { username: o.username.replaceAll('{id}', 'verifier') }), ...(o.password === undefined ? {} : { password: o.password.replaceAll('{id}', 'verifier') }), ...(o.tls === undefined ? {} : { tls: o.tls }) })
      await commander.start()
      const c = commander
      commandTimer = setInterval(() => {
        const d = actuators[Math.floor(Math.random() * actuators.length)]
        if (d.state === 'idle') return
        c.request(d.id, 'toggle', 30_000).catch(() => { /* counted as timed out */ })
      }, 1000 / (o.commandsPerSecond ?? 1))
    }
    await fleet.stopped
    const producedEnd = Date.now()
    if (commandTimer !== undefined) clearInterval(commandTimer)
    const drained = await fleet.drain(o.graceMs)
    const settled = verifier === undefined ? true : await verifier.settle(o.graceMs)
    // Commands sent just before production ended still get their answers (or time out).
    await commander?.settle(o.graceMs)
    if (progressTimer !== undefined) clearInterval(progressTimer)
    printProgress(true)
    const durationS = (producedEnd - fleet.startedAt) / 1000
    const s = fleet.stats()
    const t = totals(ledger)
    if (verifier === undefined) { t.lost = 0; t.qos0NotReceived = 0 }
    const summary: Summary = {
      runId,
      ok: t.lost === 0,
      devices: fleet.devices.length,
      durationS,
      sentPerSecond: t.sent / Math.max(0.001, durationS),
      receivedPerSecond: t.received / Math.max(0.001, durationS),
      connects: s.connects,
      disconnects: s.disconnects,
      firstConnectMs: fleet.connectTimes(),
      faultDrops: s.faultDrops,
      verifier: { connects: verifier?.connects ?? 0, disconnects: verifier?.disconnects ?? 0, ...(verifier?.lastError === undefined ? {} : { lastError: verifier.lastError }) },
      commands: { sent: commander?.sent ?? 0, answered: commander?.answered ?? 0, timedOut: commander?.timedOut ?? 0 },
      drained,
      settled,
      bufferedTotal: s.bufferedTotal,
      totals: t,
      latencyMs: verifier?.latencySummary('all') ?? NO_LATENCY,
      latencyDirectMs: verifier?.latencySummary('direct') ?? NO_LATENCY,
      perDevice: verifier === undefined && o.perDeviceAll !== true ? [] : perDevice(ledger, o.perDeviceAll === true),
    }
    return summary
  } finally {
    if (commandTimer !== undefined) clearInterval(commandTimer)
    if (progressTimer !== undefined) clearInterval(progressTimer)
    await commander?.stop()
    await fleet.close()
    await verifier?.stop()
  }
}

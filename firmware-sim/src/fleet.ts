import { randomBytes } from 'node:crypto'
import type { BackoffOptions } from './backoff.js'
import { Device, PROFILES, type Profile, type TlsOptions } from './device.js'
import { Ledger } from './ledger.js'

export interface FaultOptions {
  /** Percentage of connected devices dropped (socket destroyed, no DISCONNECT) at each drop. */
  dropPercent: number
  /** First drop, ms after the start (default: dropEveryMs, or half the duration). */
  dropAtMs?: number
  /** Drop again every this many ms. */
  dropEveryMs?: number
  /** Reconnect storm: every connected device is dropped at once, ms after the start. */
  stormAtMs?: number
}

export interface FleetOptions {
  devices: number
  url: string
  protocol: 4 | 5
  idPrefix: string
  username?: string
  password?: string
  /** Weights per profile. */
  profileMix: Partial<Record<Profile, number>>
  qosMix: readonly [number, number, number]
  /** Telemetry per device per second (sensor, actuator); chatty devices send `chattyFactor` times more. */
  rate: number
  chattyFactor: number
  jitter: number
  sleepyBurst: number
  sleepSeconds: number
  payloadSize: number
  bufferSize: number
  backoff: BackoffOptions
  keepaliveSeconds: number
  sessionExpirySeconds: number
  connectTimeoutMs: number
  /** Devices started per second. */
  rampPerSecond: number
  /** Stop producing after this long (ms, from the start)... */
  durationMs?: number
  /** ...or after this many messages in all. */
  messages?: number
  faults?: FaultOptions
  tls?: TlsOptions
  /** Scheduler period, ms (default 50). */
  tickMs?: number
  runId?: string
  ledger?: Ledger
}

export interface FleetStats {
  devices: number
  started: number
  connected: number
  waiting: number
  sleeping: number
  produced: number
  sent: number
  acked: number
  rejected: number
  dropped: number
  inFlight: number
  buffered: number
  /** Messages that went through offline buffers so far. */
  bufferedTotal: number
  connects: number
  disconnects: number
  faultDrops: number
  commandsAnswered: number
}

/** Splits `n` devices over the profile weights, in a stable interleaved order. */
export function assignProfiles (n: number, mix: Partial<Record<Profile, number>>): Profile[] {
  const entries = PROFILES.map((p) => [p, mix[p] ?? 0] as const).filter(([, w]) => w > 0)
  const total = entries.reduce((a, [, w]) => a + w, 0)
  if (total <= 0) return new Array<Profile>(n).fill('sensor')
  const out: Profile[] = []
  const acc = entries.map(() => 0)
  for (let i = 0; i < n; i++) {
    // Smooth weighted round robin: every profile gets its share within any window.
    let best = 0
    for (let k = 0; k < entries.length; k++) {
      acc[k] += entries[k][1]
      if (acc[k] > acc[best]) best = k
    }
    acc[best] -= total
    out.push(entries[best][0])
  }
  return out
}

/**
 * Thousands of devices in one process: one scheduler tick drives them all (no per-device
 * intervals), a ramp-up, a stop condition (duration or message count) and fault injection.
 */
export class Fleet {
  readonly ledger: Ledger
  readonly runId: string
  readonly devices: Device[] = []
  startedAt = 0
  faultDrops = 0
  private timer: NodeJS.Timeout | undefined
  private started = 0
  private producing = false
  private remaining = Infinity
  private nextDropAt = Infinity
  private stormAt = Infinity
  private stopResolve: (() => void) | undefined
  readonly stopped: Promise<void>
  private readonly o: FleetOptions

  constructor (options: FleetOptions) {
    this.o = options
    this.runId = options.runId ?? options.ledger?.runId ?? randomBytes(4).toString('hex')
    this.ledger = options.ledger ?? new Ledger(this.runId)
    this.stopped = new Promise((resolve) => { this.stopResolve = resolve })
    const profiles = assignProfiles(options.devices, options.profileMix)
    const width = String(options.devices - 1).length
    const baseInterval = 1000 / options.rate
    for (let i = 0; i < options.devices; i++) {
      const id = `${options.idPrefix}${String(i).padStart(width, '0')}`
      const profile = profiles[i]
      const d = new Device({
        id,
        url: options.url,
        protocol: options.protocol,
        // Per-device credentials: "{id}" in either stands for the device id.
        ...(options.username === undefined ? {} : { username: options.username.replaceAll('{id}', id) }),
        ...(options.password === undefined ? {} : { password: options.password.replaceAll('{id}', id) }),
        profile,
        runId: this.runId,
        intervalMs: profile === 'chatty' ? baseInterval / options.chattyFactor : baseInterval,
        jitter: options.jitter,
        qosMix: options.qosMix,
        payloadSize: options.payloadSize,
        bufferSize: options.bufferSize,
        backoff: options.backoff,
        keepaliveSeconds: options.keepaliveSeconds,
        sessionExpirySeconds: options.sessionExpirySeconds,
        connectTimeoutMs: options.connectTimeoutMs,
        sleepyBurst: options.sleepyBurst,
        sleepMs: options.sleepSeconds * 1000,
        ...(options.tls === undefined ? {} : { tls: options.tls }),
        ledger: this.ledger.device(id),
      })
      d.allowProduce = () => this.take()
      this.devices.push(d)
    }
  }

  private take (): boolean {
    if (!this.producing) return false
    if (this.remaining === Infinity) return true
    if (this.remaining <= 0) { this.stopProducing(); return false }
    this.remaining--
    if (this.remaining === 0) setImmediate(() => { this.stopProducing() })
    return true
  }

  /** Starts the ramp and the scheduler; `stopped` resolves when production ends. */
  start (): void {
    if (this.timer !== undefined) return
    this.startedAt = Date.now()
    this.producing = true
    this.remaining = this.o.messages ?? Infinity
    const f = this.o.faults
    if (f !== undefined && f.dropPercent > 0) {
      this.nextDropAt = this.startedAt + (f.dropAtMs ?? f.dropEveryMs ?? (this.o.durationMs ?? 10_000) / 2)
    }
    if (f?.stormAtMs !== undefined) this.stormAt = this.startedAt + f.stormAtMs
    const tickMs = this.o.tickMs ?? 50
    this.timer = setInterval(() => { this.tick(Date.now()) }, tickMs)
    this.tick(this.startedAt)
  }

  private tick (now: number): void {
    const elapsed = now - this.startedAt
    const shouldHave = Math.min(this.devices.length, Math.max(1, Math.floor(elapsed * this.o.rampPerSecond / 1000) + 1))
    while (this.started < shouldHave) {
      const d = this.devices[this.started++]
      if (this.producing) d.start(now)
    }
    for (let i = 0; i < this.started; i++) this.devices[i].tick(now)
    if (this.producing && this.o.durationMs !== undefined && elapsed >= this.o.durationMs) this.stopProducing()
    if (this.producing && now >= this.nextDropAt) {
      const f = this.o.faults
      this.dropConnections(f?.dropPercent ?? 0)
      this.nextDropAt = f?.dropEveryMs === undefined ? Infinity : now + f.dropEveryMs
    }
    if (this.producing && now >= this.stormAt) {
      this.stormAt = Infinity
      this.storm()
    }
  }

  /** Drops `percent` % of the connected devices abruptly; returns how many. */
  dropConnections (percent: number): number {
    const connected = this.devices.filter((d) => d.connected)
    const n = Math.round(connected.length * percent / 100)
    // Partial Fisher–Yates: a random sample of n.
    for (let i = 0; i < n; i++) {
      const j = i + Math.floor(Math.random() * (connected.length - i))
      const t = connected[i]; connected[i] = connected[j]; connected[j] = t
      if (connected[i].drop()) this.faultDrops++
    }
    return n
  }

  /** A reconnect storm: every connected device loses its connection at once. */
  storm (): number { return this.dropConnections(100) }

  /** Ends production (idempotent); buffers and in-flight messages are still delivered. */
  stopProducing (): void {
    if (!this.producing) return
    this.producing = false
    for (const d of this.devices) d.stopProducing()
    this.stopResolve?.()
  }

  /** Buffered + in flight over the fleet. */
  pending (): number {
    let n = 0
    for (const d of this.devices) n += d.pending
    return n
  }

  /** Waits until nothing is buffered or in flight, or the timeout; true when drained. */
  async drain (timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs
    while (this.pending() > 0) {
      if (Date.now() >= deadline) return false
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
    return true
  }

  stats (): FleetStats {
    const s: FleetStats = { devices: this.devices.length, started: this.started, connected: 0, waiting: 0, sleeping: 0, produced: 0, sent: 0, acked: 0, rejected: 0, dropped: 0, inFlight: 0, buffered: 0, bufferedTotal: 0, connects: 0, disconnects: 0, faultDrops: this.faultDrops, commandsAnswered: 0 }
    for (const d of this.devices) {
      if (d.state === 'connected') s.connected++
      else if (d.state === 'waiting' || d.state === 'connecting') s.waiting++
      else if (d.state === 'sleeping') s.sleeping++
      const l = d.ledger
      s.produced += l.produced; s.sent += l.sent; s.acked += l.acked; s.rejected += l.rejected; s.dropped += l.dropped
      s.inFlight += d.inFlight; s.buffered += d.buffer.length; s.bufferedTotal += d.bufferedTotal
      s.connects += d.connects; s.disconnects += d.disconnects; s.commandsAnswered += d.commandsAnswered
    }
    return s
  }

  /** Time from a device's start to its first CONNACK, ms, over the devices that connected. */
  connectTimes (): { count: number, p50: number, p90: number, p99: number, max: number } {
    const t = this.devices.map((d) => d.firstConnectMs).filter((x) => x >= 0).sort((a, b) => a - b)
    const at = (p: number): number => t.length === 0 ? 0 : t[Math.min(t.length - 1, Math.floor(p / 100 * t.length))]
    return { count: t.length, p50: at(50), p90: at(90), p99: at(99), max: t.length === 0 ? 0 : t[t.length - 1] }
  }

  /** Stops the scheduler and disconnects every device gracefully (in batches). */
  async close (): Promise<void> {
    this.stopProducing()
    if (this.timer !== undefined) clearInterval(this.timer)
    this.timer = undefined
    const batch = 500
    for (let i = 0; i < this.devices.length; i += batch) {
      await Promise.all(this.devices.slice(i, i + batch).map((d) => d.stop()))
    }
  }
}

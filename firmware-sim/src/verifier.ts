import mqtt, { type IClientOptions, type MqttClient } from 'mqtt'
import hdr from 'hdr-histogram-js'
import type { TlsOptions } from './device.js'
import type { Ledger } from './ledger.js'
import { decodeTelemetryFast } from './payload.js'

export interface VerifierOptions {
  /** Where the messages should arrive (the same broker, or an upstream behind a bridge). */
  url: string
  /** Topic filter, e.g. devices/+/telemetry or site1/devices/+/telemetry. */
  topic: string
  qos: 1 | 2
  protocol?: 4 | 5
  clientId?: string
  username?: string
  password?: string
  tls?: TlsOptions
  /** MQTT 5 session expiry, seconds (default 600). */
  sessionExpirySeconds?: number
  ledger: Ledger
}

export interface LatencySummary { count: number, min: number, p50: number, p90: number, p99: number, p999: number, max: number, mean: number }

/**
 * Subscribes (persistent session, QoS 1/2) where the devices' messages should arrive and writes
 * every receipt into the shared ledger; keeps an end-to-end latency histogram (production time in
 * the payload → receipt).
 */
export class Verifier {
  client: MqttClient | undefined
  received = 0
  /** CONNACKs and lost connections of the verifier's own client (it reconnects every second). */
  connects = 0
  disconnects = 0
  lastError: string | undefined
  /** Every message: production → receipt, offline buffering included. */
  readonly latency = hdr.build({ lowestDiscernibleValue: 1, highestTrackableValue: 3_600_000, numberOfSignificantValueDigits: 3 })
  /** Messages sent as soon as produced (not through the offline buffer): the broker path alone. */
  readonly latencyDirect = hdr.build({ lowestDiscernibleValue: 1, highestTrackableValue: 3_600_000, numberOfSignificantValueDigits: 3 })
  private readonly o: VerifierOptions

  constructor (options: VerifierOptions) { this.o = options }

  /** Connects and subscribes; resolves once the SUBACK came back. */
  async start (): Promise<void> {
    const o = this.o
    const protocol = o.protocol ?? 5
    const opts: IClientOptions = {
      clientId: o.clientId ?? `ferrymq-sim-verifier-${o.ledger.runId}`,
      protocolVersion: protocol,
      clean: false,
      reconnectPeriod: 1000,
      connectTimeout: 10_000,
      keepalive: 30,
    }
    if (protocol === 5) opts.properties = { sessionExpiryInterval: o.sessionExpirySeconds ?? 600, receiveMaximum: 65_535 }
    if (o.username !== undefined) opts.username = o.username
    if (o.password !== undefined) opts.password = o.password
    if (o.tls !== undefined) {
      opts.rejectUnauthorized = o.tls.rejectUnauthorized ?? true
      if (o.tls.ca !== undefined) opts.ca = o.tls.ca
    }
    const client = mqtt.connect(o.url, opts)
    this.client = client
    client.on('message', (_topic, payload) => { this.onMessage(payload) })
    client.on('connect', () => { this.connects++ })
    client.on('close', () => { if (this.connects > this.disconnects) this.disconnects++ })
    client.on('error', (err) => { this.lastError = err.message })
    await new Promise<void>((resolve, reject) => {
      const onError = (err: Error): void => { client.end(true); reject(new Error(`verifier: cannot connect to ${o.url}: ${err.message}`)) }
      client.once('error', onError)
      client.once('connect', () => {
        client.removeListener('error', onError)
        client.on('error', () => { /* reconnects on its own */ })
        client.subscribe(o.topic, { qos: o.qos }, (err, granted) => {
          if (err !== null && err !== undefined) { reject(new Error(`verifier: subscribe ${o.topic}: ${err.message}`)); return }
          const g = granted?.[0]
          if (g !== undefined && g.qos >= 0x80) { reject(new Error(`verifier: subscription to ${o.topic} refused (reason ${g.qos})`)); return }
          resolve()
        })
      })
    })
  }

  private onMessage (payload: Buffer): void {
    const ledger = this.o.ledger
    const m = decodeTelemetryFast(payload)
    if (m === undefined) { ledger.malformed++; return }
    if (m.run !== ledger.runId) { ledger.foreign++; return }
    const d = ledger.devices.get(m.d)
    if (d === undefined || !d.receive(m.s)) { ledger.unknown++; return }
    this.received++
    const ms = Math.max(1, Math.min(3_600_000, Date.now() - m.t))
    this.latency.recordValue(ms)
    if (m.b !== 1) this.latencyDirect.recordValue(ms)
  }

  /** Acknowledged QoS 1/2 messages not received yet, over every device. */
  missing (): number {
    return this.o.ledger.awaiting()
  }

  /** Waits until every acknowledged message has arrived, or the timeout; true when complete. */
  async settle (timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs
    while (this.missing() > 0) {
      if (Date.now() >= deadline) return false
      await new Promise((resolve) => setTimeout(resolve, 200))
    }
    return true
  }

  latencySummary (which: 'all' | 'direct' = 'all'): LatencySummary {
    const h = which === 'all' ? this.latency : this.latencyDirect
    if (h.totalCount === 0) return { count: 0, min: 0, p50: 0, p90: 0, p99: 0, p999: 0, max: 0, mean: 0 }
    return {
      count: h.totalCount,
      min: h.minNonZeroValue,
      p50: h.getValueAtPercentile(50),
      p90: h.getValueAtPercentile(90),
      p99: h.getValueAtPercentile(99),
      p999: h.getValueAtPercentile(99.9),
      max: h.maxValue,
      mean: Math.round(h.mean * 10) / 10,
    }
  }

  /** Disconnects; on MQTT 5 the session is ended with it (session expiry 0). */
  async stop (): Promise<void> {
    const client = this.client
    this.client = undefined
    if (client === undefined) return
    const opts = (this.o.protocol ?? 5) === 5 ? { properties: { sessionExpiryInterval: 0 } } : {}
    await new Promise<void>((resolve) => { client.end(false, opts, () => { resolve() }) })
  }
}

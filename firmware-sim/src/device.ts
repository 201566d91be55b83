import mqtt, { type IClientOptions, type IPublishPacket, type MqttClient } from 'mqtt'
import { backoffDelay, type BackoffOptions } from './backoff.js'
import type { DeviceLedger } from './ledger.js'
import { encodeTelemetry, readings } from './payload.js'

export type Profile = 'sensor' | 'actuator' | 'chatty' | 'sleepy'
export const PROFILES: readonly Profile[] = ['sensor', 'actuator', 'chatty', 'sleepy']
export type Qos = 0 | 1 | 2

export type DeviceState = 'idle' | 'connecting' | 'connected' | 'waiting' | 'sleeping' | 'stopped'

export interface TlsOptions {
  /** Verify the broker's certificate (default true). */
  rejectUnauthorized?: boolean
  /** PEM CA bundle to trust. */
  ca?: string | Buffer
}

export interface DeviceOptions {
  id: string
  /** mqtt://, mqtts://, ws://, wss:// */
  url: string
  protocol: 4 | 5
  username?: string
  password?: string
  profile: Profile
  /** Run id written into every payload. */
  runId: string
  /** Mean time between telemetry messages, ms (sensor, actuator; chatty uses it too: give it a smaller one). */
  intervalMs: number
  /** ± fraction of the interval, 0–1. */
  jitter: number
  /** Weights of QoS 0, 1, 2. */
  qosMix: readonly [number, number, number]
  /** Pad payloads to this many bytes (0: natural size). */
  payloadSize: number
  /** Offline buffer capacity, messages (0: nothing is buffered, messages produced offline are dropped). */
  bufferSize: number
  backoff: BackoffOptions
  keepaliveSeconds: number
  /** MQTT 5 session expiry, seconds. */
  sessionExpirySeconds: number
  connectTimeoutMs: number
  /** Sleepy: messages per wake-up. */
  sleepyBurst: number
  /** Sleepy: mean sleep, ms. */
  sleepMs: number
  tls?: TlsOptions
  ledger: DeviceLedger
}

interface Pending { seq: number, qos: Qos, t: number, buffered?: boolean }

/** A bounded FIFO; the oldest entry goes when it is full. */
export class OfflineBuffer<T> {
  private items: Array<T | undefined>
  private head = 0
  length = 0
  constructor (readonly capacity: number) { this.items = new Array<T | undefined>(Math.max(1, capacity)) }
  /** Returns the dropped entry when the buffer was full. */
  push (item: T): T | undefined {
    if (this.capacity === 0) return item
    let dropped: T | undefined
    if (this.length === this.capacity) dropped = this.shift()
    this.items[(this.head + this.length) % this.capacity] = item
    this.length++
    return dropped
  }

  shift (): T | undefined {
    if (this.length === 0) return undefined
    const item = this.items[this.head]
    this.items[this.head] = undefined
    this.head = (this.head + 1) % this.capacity
    this.length--
    return item
  }
}

export function topics (id: string): { telemetry: string, status: string, cmd: string, cmdResp: string } {
  return { telemetry: `devices/${id}/telemetry`, status: `devices/${id}/status`, cmd: `devices/${id}/cmd`, cmdResp: `devices/${id}/cmd/resp` }
}

export function pickQos (mix: readonly [number, number, number], r = Math.random()): Qos {
  const total = mix[0] + mix[1] + mix[2]
  let x = r * total
  if (x < mix[0]) return 0
  x -= mix[0]
  return x < mix[1] ? 1 : 2
}

/**
 * One simulated device: one MQTT.js client, its own reconnect loop (exponential backoff with full
 * jitter; MQTT.js's reconnectPeriod is 0) and a bounded offline buffer flushed in order on
 * reconnect. It has no timers of its own: a fleet (or a test) calls `tick(now)` regularly.
 */
export class Device {
  readonly id: string
  readonly topics: ReturnType<typeof topics>
  state: DeviceState = 'idle'
  client: MqttClient | undefined
  /** QoS 1/2 messages handed to MQTT.js and not acknowledged yet. */
  inFlight = 0
  connects = 0
  disconnects = 0
  commandsAnswered = 0
  /** ms from start() to the first CONNACK (-1 until then). */
  firstConnectMs = -1
  private startedAt = 0
  /** Actuator: the command subscription is in place (SUBACK received, or resumed with the session). */
  commandsReady = false
  /** Messages that went through the offline buffer (produced while not connected). */
  bufferedTotal = 0
  readonly buffer: OfflineBuffer<Pending>
  private producing = false
  private nextAt = 0
  private reconnectAt = 0
  private wakeAt = 0
  private attempt = 0
  private seq = 0
  private readonly o: DeviceOptions
  /** Set by a fleet: asks for permission to produce one message (message budgets). */
  allowProduce: () => boolean = () => true

  constructor (options: DeviceOptions) {
    this.o = options
    this.id = options.id
    this.topics = topics(options.id)
    this.buffer = new OfflineBuffer<Pending>(options.bufferSize)
  }

  get profile (): Profile { return this.o.profile }
  get ledger (): DeviceLedger { return this.o.ledger }
  get connected (): boolean { return this.state === 'connected' }

  /** Connects and starts producing (sleepy devices produce their first burst at once). */
  start (now = Date.now()): void {
    if (this.state !== 'idle') return
    this.producing = true
    this.startedAt = now
    this.nextAt = now + Math.random() * this.o.intervalMs
    if (this.o.profile === 'sleepy') this.produceBurst(now)
    this.connect()
  }

  /** Stops producing new messages; what is buffered or in flight is still delivered. */
  stopProducing (): void { this.producing = false }

  /** Buffered + in flight. */
  get pending (): number { return this.buffer.length + this.inFlight }

  private clientOptions (): IClientOptions {
    const o = this.o
    const opts: IClientOptions = {
      clientId: o.id,
      protocolVersion: o.protocol,
      clean: false,
      reconnectPeriod: 0,
      connectTimeout: o.connectTimeoutMs,
      keepalive: o.keepaliveSeconds,
      will: { topic: this.topics.status, payload: Buffer.from('offline'), qos: 1, retain: true },
      resubscribe: false,
    }
    if (o.protocol === 5) opts.properties = { sessionExpiryInterval: o.sessionExpirySeconds }
    if (o.username !== undefined) opts.username = o.username
    if (o.password !== undefined) opts.password = o.password
    if (o.tls !== undefined) {
      opts.rejectUnauthorized = o.tls.rejectUnauthorized ?? true
      if (o.tls.ca !== undefined) opts.ca = o.tls.ca
    }
    return opts
  }

  private connect (): void {
    this.state = 'connecting'
    if (this.client === undefined) {
      const client = mqtt.connect(this.o.url, this.clientOptions())
      this.client = client
      // A sleepy device's previous client may still close after the next one was opened.
      client.on('connect', (connack) => { if (client === this.client) this.onConnect(connack.sessionPresent) })
      client.on('close', () => { if (client === this.client) this.onClose() })
      client.on('error', () => { /* a refused CONNACK or a socket error: 'close' follows */ })
      client.on('message', (topic, payload, packet) => { if (client === this.client) this.onMessage(topic, payload, packet) })
    } else {
      // Keep MQTT.js's stores: what was in flight when the link dropped is sent again.
      this.client.reconnect({ incomingStore: this.client.incomingStore, outgoingStore: this.client.outgoingStore })
    }
  }

  private onConnect (sessionPresent: boolean): void {
    const client = this.client
    if (client === undefined) return
    this.state = 'connected'
    this.attempt = 0
    this.connects++
    if (this.firstConnectMs < 0) this.firstConnectMs = Date.now() - this.startedAt
    client.publish(this.topics.status, 'online', { qos: 1, retain: true })
    if (this.o.profile === 'actuator') {
      if (sessionPresent && this.commandsReady) return this.flush()
      client.subscribe(this.topics.cmd, { qos: 1 }, (err) => { if (err === null || err === undefined) this.commandsReady = true })
    }
    this.flush()
  }

  private onClose (): void {
    if (this.state === 'connected') this.disconnects++
    if (this.state === 'connected' || this.state === 'connecting') {
      this.state = 'waiting'
      this.reconnectAt = Date.now() + backoffDelay(this.attempt++, this.o.backoff)
    }
  }

  private onMessage (topic: string, payload: Buffer, packet: IPublishPacket): void {
    if (topic !== this.topics.cmd || this.client === undefined) return
    let cmd: { id?: unknown, action?: unknown } = {}
    try { cmd = JSON.parse(payload.toString('utf8')) as typeof cmd } catch { /* answered as malformed */ }
    const body = JSON.stringify({ device: this.id, id: cmd.id ?? null, action: cmd.action ?? null, ok: typeof cmd.action === 'string', t: Date.now() })
    const props = packet.properties
    if (props?.responseTopic !== undefined) {
      this.client.publish(props.responseTopic, body, { qos: 1, properties: props.correlationData === undefined ? {} : { correlationData: props.correlationData } })
    } else {
      this.client.publish(this.topics.cmdResp, body, { qos: 1 })
    }
    this.commandsAnswered++
  }

  private produce (now: number): void {
    if (!this.allowProduce()) { this.producing = false; return }
    const seq = ++this.seq
    const qos = pickQos(this.o.qosMix)
    this.o.ledger.produce(seq, qos)
    const m: Pending = { seq, qos, t: now }
    if (this.state === 'connected' && this.buffer.length === 0) this.send(m)
    else this.enqueue(m)
  }

  private enqueue (m: Pending): void {
    this.bufferedTotal++
    m.buffered = true
    const dropped = this.buffer.push(m)
    if (dropped !== undefined) this.o.ledger.markDropped(dropped.seq)
  }

  private produceBurst (now: number): void {
    for (let i = 0; i < this.o.sleepyBurst && this.producing; i++) this.produce(now)
  }

  private send (m: Pending): void {
    const client = this.client
    if (client === undefined) return
    const ledger = this.o.ledger
    ledger.markSent(m.seq)
    if (m.qos > 0) this.inFlight++
    const payload = encodeTelemetry({ run: this.o.runId, d: this.id, s: m.seq, t: m.t, q: m.qos, r: readings(m.seq), ...(m.buffered === true ? { b: 1 as const } : {}) }, this.o.payloadSize)
    client.publish(this.topics.telemetry, payload, { qos: m.qos }, (err) => {
      if (m.qos === 0) return
      this.inFlight--
      if (err === undefined || err === null) ledger.markAcked(m.seq)
      else ledger.markRejected(m.seq)
    })
  }

  /** Sends what the offline buffer holds, oldest first. */
  flush (): void {
    while (this.state === 'connected' && this.buffer.length > 0) {
      const m = this.buffer.shift()
      if (m !== undefined) this.send(m)
    }
  }

  /** Drives production, reconnects and sleep; cheap when there is nothing to do. */
  tick (now: number): void {
    switch (this.state) {
      case 'waiting':
        if (now >= this.reconnectAt) this.connect()
        break
      case 'sleeping':
        if (now >= this.wakeAt && (this.producing || this.buffer.length > 0)) {
          this.produceBurst(now)
          this.connect()
        }
        return
      case 'connected':
        if (this.o.profile === 'sleepy' && this.buffer.length === 0 && this.inFlight === 0) { this.sleep(now); return }
        break
      default:
        break
    }
    if (this.producing && this.o.profile !== 'sleepy' && this.state !== 'idle' && this.state !== 'stopped') {
      let n = 0
      while (now >= this.nextAt && n++ < 100 && this.producing) {
        this.produce(now)
        const j = this.o.jitter
        this.nextAt += this.o.intervalMs * (1 + (Math.random() * 2 - 1) * j)
      }
      if (now - this.nextAt > this.o.intervalMs * 100) this.nextAt = now
    }
  }

  private sleep (now: number): void {
    const client = this.client
    this.state = 'sleeping'
    this.wakeAt = now + this.o.sleepMs * (1 + (Math.random() * 2 - 1) * this.o.jitter)
    this.client = undefined
    // A graceful DISCONNECT: no will. The next wake-up opens a new client (end() closes the stores).
    client?.end(false)
  }

  /** Fault injection: destroys the socket without DISCONNECT (the broker publishes the will). */
  drop (): boolean {
    if (this.state !== 'connected' || this.client === undefined) return false
    this.client.stream.destroy()
    return true
  }

  /** Disconnects gracefully and for good. */
  async stop (): Promise<void> {
    this.producing = false
    const client = this.client
    this.state = 'stopped'
    this.client = undefined
    if (client === undefined) return
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => { client.end(true, {}, () => { resolve() }) }, 2000)
      client.end(false, {}, () => { clearTimeout(timer); resolve() })
    })
  }
}

import { randomBytes } from 'node:crypto'
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt'
import type { TlsOptions } from './device.js'

export interface CommandResponse { device: string, id: string | null, action: string | null, ok: boolean, t: number, latencyMs: number }

export interface CommanderOptions {
  url: string
  protocol?: 4 | 5
  username?: string
  password?: string
  tls?: TlsOptions
}

/**
 * Sends commands to actuators and matches their answers: on MQTT 5 with a response topic and
 * correlation data; a 3.1.1 device, which never sees those properties, answers on
 * `devices/<id>/cmd/resp` with the command's id in the body, so both are listened to.
 */
export class Commander {
  client: MqttClient | undefined
  sent = 0
  answered = 0
  timedOut = 0
  private readonly waiting = new Map<string, { resolve: (r: CommandResponse) => void, reject: (e: Error) => void, at: number, timer: NodeJS.Timeout }>()
  private readonly responseTopic: string
  private readonly o: CommanderOptions

  constructor (options: CommanderOptions) {
    this.o = options
    this.responseTopic = `sim/commander/${randomBytes(4).toString('hex')}/resp`
  }

  async start (): Promise<void> {
    const protocol = this.o.protocol ?? 5
    const opts: IClientOptions = { protocolVersion: protocol, clean: true, reconnectPeriod: 1000, connectTimeout: 10_000 }
    if (this.o.username !== undefined) opts.username = this.o.username
    if (this.o.password !== undefined) opts.password = this.o.password
    if (this.o.tls !== undefined) {
      opts.rejectUnauthorized = this.o.tls.rejectUnauthorized ?? true
      if (this.o.tls.ca !== undefined) opts.ca = this.o.tls.ca
    }
    const client = mqtt.connect(this.o.url, opts)
    this.client = client
    client.on('error', () => { /* reconnects */ })
    client.on('message', (_topic, payload, packet) => {
      let body: Partial<CommandResponse> = {}
      try { body = JSON.parse(payload.toString('utf8')) as Partial<CommandResponse> } catch { return }
      const corr = packet.properties?.correlationData?.toString('utf8') ?? (typeof body.id === 'string' ? body.id : undefined)
      if (corr === undefined) return
      const w = this.waiting.get(corr)
      if (w === undefined) return
      this.waiting.delete(corr)
      clearTimeout(w.timer)
      this.answered++
      w.resolve({ device: String(body.device), id: body.id ?? null, action: body.action ?? null, ok: body.ok === true, t: Number(body.t), latencyMs: Date.now() - w.at })
    })
    await new Promise<void>((resolve, reject) => {
      client.once('error', reject)
      client.once('connect', () => {
        client.removeListener('error', reject)
        client.subscribe([this.responseTopic, 'devices/+/cmd/resp'], { qos: 1 }, (err) => { if (err === null || err === undefined) resolve(); else reject(err) })
      })
    })
  }

  /** Sends `action` to a device and resolves with its answer (rejects after `timeoutMs`). */
  async request (deviceId: string, action: string, timeoutMs = 10_000): Promise<CommandResponse> {
    const client = this.client
    if (client === undefined) throw new Error('commander not started')
    const id = randomBytes(6).toString('hex')
    this.sent++
    return await new Promise<CommandResponse>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(id)
        this.timedOut++
        reject(new Error(`command ${id} to ${deviceId}: no answer within ${timeoutMs} ms`))
      }, timeoutMs)
      this.waiting.set(id, { resolve, reject, at: Date.now(), timer })
      const props = (this.o.protocol ?? 5) === 5 ? { properties: { responseTopic: this.responseTopic, correlationData: Buffer.from(id) } } : {}
      client.publish(`devices/${deviceId}/cmd`, JSON.stringify({ id, action }), { qos: 1, ...props })
    })
  }

  /** Commands sent and neither answered nor timed out yet. */
  get pending (): number {
    return this.waiting.size
  }

  /** Resolves once every command sent has been answered or has timed out, or after `ms`. */
  async settle (ms: number): Promise<void> {
    const deadline = Date.now() + ms
    while (this.waiting.size > 0 && Date.now() < deadline) await new Promise<void>((resolve) => setTimeout(resolve, 50))
  }

  async stop (): Promise<void> {
    for (const w of this.waiting.values()) { clearTimeout(w.timer); w.reject(new Error('commander stopped')) }
    this.waiting.clear()
    const client = this.client
    this.client = undefined
    if (client !== undefined) await new Promise<void>((resolve) => { client.end(false, {}, () => { resolve() }) })
  }
}

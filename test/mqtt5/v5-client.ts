import mqtt, { type IClientOptions, type IConnackPacket, type IPublishPacket, type MqttClient, type Packet } from 'mqtt'
import mqttPacket from 'mqtt-packet'
import { connackOf, connect, withTimeout } from '../helpers/clients.js'

/** Connects a real MQTT.js client speaking MQTT 5 (see helpers/clients.ts `connect`). */
export function connect5 (url: string, options: IClientOptions = {}): Promise<MqttClient> {
  return connect(url, { protocolVersion: 5, ...options })
}

/** The whole CONNACK (reason code and properties) a client got from `connect`/`connect5`. */
export function connack5 (client: MqttClient): IConnackPacket {
  return connackOf(client) as unknown as IConnackPacket
}

export interface Message5 {
  topic: string
  payload: string
  qos: number
  retain: boolean
  properties: NonNullable<IPublishPacket['properties']> | undefined
}

/**
 * Every message a client receives from its creation on, in order; `waitFor` resolves with the
 * first one (seen already or later) that matches. Messages a persistent session gets along with
 * CONNACK are kept by `connect` until this listener is added, so they are here too.
 */
export class Inbox {
  readonly messages: Message5[] = []
  private waiters: (() => void)[] = []

  constructor (client: MqttClient) {
    client.on('message', (topic, payload, packet) => {
      this.messages.push({ topic, payload: payload.toString(), qos: packet.qos, retain: packet.retain, properties: packet.properties })
      for (const wake of this.waiters.splice(0)) wake()
    })
  }

  /** Topics and payloads as `topic=payload`, for compact assertions. */
  get seen (): string[] {
    return this.messages.map((m) => `${m.topic}=${m.payload}`)
  }

  waitFor (match: (m: Message5) => boolean, timeoutMs = 4000, what = 'a matching message'): Promise<Message5> {
    return withTimeout((async () => {
      for (;;) {
        const found = this.messages.find(match)
        if (found !== undefined) return found
        await new Promise<void>((resolve) => this.waiters.push(resolve))
      }
    })(), timeoutMs, () => `waiting for ${what}; seen: ${JSON.stringify(this.seen)}`)
  }

  /** The message with this payload on this topic. */
  waitForPayload (topic: string, payload: string, timeoutMs = 4000): Promise<Message5> {
    return this.waitFor((m) => m.topic === topic && m.payload === payload, timeoutMs, `${topic}=${payload}`)
  }
}

/** Every control packet a client receives from its creation on (MQTT.js 'packetreceive'). */
export class Wire {
  /** All packets received, for evidence in failure messages. */
  readonly log: Packet[] = []
  private readonly unread: Packet[] = []
  private waiters: (() => void)[] = []

  constructor (client: MqttClient) {
    client.on('packetreceive', (packet) => {
      this.log.push(packet)
      this.unread.push(packet)
      for (const wake of this.waiters.splice(0)) wake()
    })
  }

  /** Takes the oldest packet of type `cmd` not taken yet (received already or later). */
  next<C extends Packet['cmd']> (cmd: C, timeoutMs = 4000): Promise<Extract<Packet, { cmd: C }>> {
    return withTimeout((async () => {
      for (;;) {
        const i = this.unread.findIndex((p) => p.cmd === cmd)
        if (i !== -1) return this.unread.splice(i, 1)[0] as Extract<Packet, { cmd: C }>
        await new Promise<void>((resolve) => this.waiters.push(resolve))
      }
    })(), timeoutMs, () => `a ${cmd} packet; received: ${JSON.stringify(this.log.map((p) => p.cmd))}`)
  }
}

/**
 * Lets wall-clock time pass. Used only where the feature under test is itself a clock (message
 * expiry, session expiry, will delay) or, after a positive control event, to give something
 * that must NOT happen a bounded chance to happen. Never as a stand-in for an event.
 */
export function passTime (ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms))
}

const opened = new Set<MqttClient>()

export interface Attempt {
  client: MqttClient
  /** The CONNACK the broker answered with, whether it accepted or refused. */
  connack: IConnackPacket | undefined
  /** What MQTT.js reported when the connection did not come up. */
  error: (Error & { code?: number }) | undefined
}

/**
 * Opens a connection and returns the CONNACK whatever it says, for refusals that `connect` only
 * reports as an error. `prepare` runs before CONNECT is sent: it may change `client.options`,
 * e.g. to send what MQTT.js' own checks would not. End these clients with `endAttempts`.
 */
export async function attemptConnect (url: string, options: IClientOptions, prepare: (client: MqttClient) => void = () => {}, timeoutMs = 4000): Promise<Attempt> {
  const client = mqtt.connect(url, { reconnectPeriod: 0, connectTimeout: timeoutMs, ...options, manualConnect: true })
  opened.add(client)
  let connack: IConnackPacket | undefined
  client.on('packetreceive', (packet) => { if (packet.cmd === 'connack') connack = packet })
  prepare(client)
  const error = await withTimeout(new Promise<Attempt['error']>((resolve) => {
    client.once('connect', () => resolve(undefined))
    client.once('error', (err) => resolve(err))
    client.once('close', () => resolve(new Error('connection closed before CONNACK')))
    client.connect()
  }), timeoutMs, `CONNACK from ${url}`)
  client.on('error', () => {})
  return { client, connack, error }
}

/** Ends every client `attemptConnect` opened (afterEach). */
export async function endAttempts (): Promise<void> {
  await Promise.all([...opened].map((c) => c.endAsync(true).catch(() => {})))
  opened.clear()
}

/** Resolves with the arguments of the client's next `event`; register it before the cause. */
export function nextEvent<T extends unknown[]> (client: MqttClient, event: 'close' | 'disconnect' | 'end', timeoutMs = 4000): Promise<T> {
  return withTimeout(new Promise<T>((resolve) => {
    (client as unknown as { once (event: string, listener: (...args: unknown[]) => void): void }).once(event, (...args) => resolve(args as T))
  }), timeoutMs, `event "${event}"`)
}

/**
 * Makes the client's CONNECT go out with Clean Start 0 and an empty client identifier, which
 * MQTT 5 allows [MQTT-3.1.3-7] and MQTT.js and mqtt-packet refuse to send (the 3.1.1 rule): the
 * CONNECT is generated with Clean Start 1 and the flag cleared in the bytes. Use as `prepare`.
 */
export function sendEmptyIdWithoutCleanStart (client: MqttClient): void {
  const internals = client as unknown as { _writePacket (packet: Packet, cb?: () => void): void, stream: { write (b: Buffer): boolean } }
  const writePacket = internals._writePacket.bind(client)
  internals._writePacket = (packet, cb) => {
    if (packet.cmd !== 'connect') return writePacket(packet, cb)
    client.emit('packetsend', packet)
    const bytes = mqttPacket.generate({ ...packet, clientId: '', clean: true }, { protocolVersion: 5 })
    let i = 1
    while ((bytes[i] as number) & 0x80) i++ // the Remaining Length's bytes
    const flags = i + 1 + 2 + 4 + 1 // then the protocol name ("MQTT", 2 + 4 bytes) and the level
    bytes[flags] = (bytes[flags] as number) & ~0x02
    internals.stream.write(bytes)
    cb?.()
  }
}

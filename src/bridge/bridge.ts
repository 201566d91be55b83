import { readFileSync } from 'node:fs'
import { hostname } from 'node:os'
import { Readable } from 'node:stream'
import mqtt, { type IClientOptions, type IClientPublishOptions, type IStore, type MqttClient, type Packet } from 'mqtt'
import { ConfigError } from '../config/load.js'
import type { BridgeConfig } from '../config/schema.js'
import type { Logger } from '../observability/logger.js'
import type { BridgeSources, Metrics } from '../observability/metrics.js'
import type { Store } from '../store/open.js'
import type { StoreOp } from '../store/writer.js'
import { IncomingStore } from './incoming.js'
import { mappingProblem, toLocal, toRemote, remoteFilter, type TopicMapping } from './mapping.js'
import { isExpired, Outbox, OutboxFullError, type OutboxMessage, type Queued } from './outbox.js'
import { messageExpiryInterval, messageProperties, type MessageProperties } from './properties.js'

/*
 * One store-and-forward bridge: a durable outbox on the local side, one MQTT.js connection to the
 * upstream at a time, and the forwarder between them.
 *
 *   published hook ─► route() ─► enqueue() ─► Outbox (LevelDB) ─► pump() ─► window ─► upstream
 *                                                  ▲                              │ PUBACK/PUBCOMP
 *                                                  └──────── remove() ◄───────────┘
 *
 * MQTT.js is the protocol engine only. Its offline behaviour is not used: every connection is a
 * new MqttClient with reconnectPeriod 0, which is discarded when it closes; the outbox, the
 * in-flight window, the packet ids and the back-off are the bridge's. A QoS 2 entry's packet id is
 * stored before its PUBLISH is sent and its PUBREC before its PUBREL, so after a crash it is
 * finished in the same upstream session with the right packet (PUBLISH with DUP, or PUBREL).
 */

/** MQTT 5 properties of a message that came in through a bridge: those of the application message, and its remaining expiry. */
export type InboundProperties = MessageProperties & { messageExpiryInterval?: number }

/** The local side of a bridge, given by the broker. */
export interface BridgeHost {
  logger: Logger
  metrics: Metrics
  /**
   * Publishes an inbound message locally, with its MQTT 5 properties when it has any (absent from
   * a 3.1.1 upstream); resolves once every copy is stored (then it is acknowledged upstream).
   */
  publishLocal (bridge: Bridge, message: { topic: string, payload: Buffer, qos: 0 | 1 | 2, retain: boolean, properties?: InboundProperties, onQueued?: StoreOp[] }): Promise<void>
  /** Publishes a $SYS message (QoS 0). */
  sys (topic: string, payload: string): void
}

/** What GET /api/v1/bridges reports per bridge. */
export interface BridgeStatus {
  name: string
  connected: boolean
  /** The upstream URL of the current link, or null while down. */
  url: string | null
  protocolVersion: 4 | 5
  outbox: { messages: number, bytes: number, oldestAgeSeconds: number }
  /** Messages sent on the current link and not yet acknowledged. */
  inflight: number
  forwarded: { out: number, in: number }
  /** Drops by reason (outbox_full, upstream_refused). */
  dropped: Record<string, number>
  expired: number
  reconnects: number
}

/** A message the local broker handles, as the bridge sees it. */
export interface LocalMessage {
  topic: string
  payload: Buffer
  qos: 0 | 1 | 2
  retain: boolean
  /** MQTT 5 properties (aedes' packet): route() keeps the application message's and the expiry. */
  properties?: InboundProperties & { topicAlias?: number, subscriptionIdentifier?: number | number[] }
}

/** How long stop() waits for messages in flight to be acknowledged. */
const STOP_WAIT_MS = 1000
const ERROR_RETRY_CODES = new Set([0x91, 0x97]) // packet id in use, quota exceeded: try again later

/** Checks every bridge's mappings and TLS files; throws ConfigError naming the setting. */
export function checkBridges (bridges: readonly BridgeConfig[], durability: string): void {
  const problems: string[] = []
  bridges.forEach((b, i) => {
    if (durability === 'memory') problems.push(`bridges[${i}]: a bridge needs storage.durability fsync or os (its outbox is kept on disk)`)
    b.topics.forEach((m, j) => {
      const problem = mappingProblem(m, `bridges[${i}].topics[${j}]`)
      if (problem !== null) problems.push(problem)
    })
    for (const k of ['ca', 'cert', 'key'] as const) {
      const file = b.tls?.[k]
      if (file === undefined) continue
      try {
        readFileSync(file)
      } catch (err) {
        problems.push(`bridges[${i}].tls.${k}: cannot read ${file} (${(err as NodeJS.ErrnoException).code ?? String(err)})`)
      }
    }
    const urls = b.urls ?? (b.url === undefined ? [] : [b.url])
    urls.forEach((u, j) => {
      if (/^(mqtts|wss):/.test(u) && b.tls === undefined) return // public CAs
      if (/^(mqtt|ws):/.test(u) && b.tls !== undefined) problems.push(`bridges[${i}].${b.urls === undefined ? 'url' : `urls[${j}]`}: tls is set but "${u}" is not mqtts:// or wss://`)
    })
  })
  if (problems.length > 0) throw new ConfigError(problems.join('\n'))
}

/**
 * The wait before reconnect attempt round `attempt` (0 after a stable link): exponential back-off
 * with full jitter, uniform between minMs and min(maxMs, minMs · 2^(attempt + 1)), so edges that
 * lost the same upstream do not all come back at once.
 */
export function backoffDelay (attempt: number, minMs: number, maxMs: number, random: () => number = Math.random): number {
  const cap = Math.max(minMs, Math.min(maxMs, minMs * 2 ** Math.min(attempt + 1, 30)))
  return minMs + random() * (cap - minMs)
}

/** Packet ids for one bridge: in flight on the current connection, plus those stored with QoS 2 entries. */
class PacketIds {
  /** Ids stored with outbox entries not yet finished (QoS 2): never handed to another message. */
  readonly reserved = new Set<number>()
  /** Ids MQTT.js holds on the current connection. */
  readonly used = new Set<number>()
  #forced: number | null = null
  #next = 1
  #last = 1

  /** The id the next allocate() returns (MQTT.js allocates inside publish()). */
  force (id: number): void {
    this.#forced = id
  }

  /** A free id, reserved for a QoS 2 entry (stored with it before sending), or null when all 65,535 are taken. */
  pick (): number | null {
    for (let i = 0; i < 65_535; i++) {
      const id = this.#next
      this.#next = id === 65_535 ? 1 : id + 1
      if (!this.used.has(id) && !this.reserved.has(id)) return id
    }
    return null
  }

  // IMessageIdProvider (MQTT.js)
  allocate (): number | null {
    let id = this.#forced
    this.#forced = null
    id ??= this.pick()
    if (id === null) return null
    this.used.add(id)
    this.#last = id
    return id
  }

  getLastAllocated (): number | null {
    return this.#last
  }

  register (id: number): boolean {
    if (this.used.has(id)) return false
    this.used.add(id)
    return true
  }

  deallocate (id: number): void {
    this.used.delete(id)
  }

  clear (): void {
    this.used.clear()
  }
}

/** One connection to the upstream: its MQTT.js client and what is in flight on it. */
interface Link {
  client: MqttClient
  url: string
  /** True from CONNACK until close. */
  up: boolean
  /** Sent, not yet acknowledged, by packet id (QoS 1/2). */
  readonly window: Map<number, Queued>
  /** QoS 0 entries written to the socket but not yet confirmed written. */
  readonly qos0: Set<Queued>
  connectedAt: number
  /** Messages in flight at most: maxInflight, lowered to the upstream's Receive Maximum (MQTT 5 CONNACK). */
  limit: number
  /** QoS 2 messages in flight at most (maxInflightQos2, and limit). */
  limit2: number
  /** QoS 2 entries in `window`. */
  qos2: number
}

export class Bridge implements BridgeSources {
  readonly name: string
  readonly #config: BridgeConfig
  readonly #host: BridgeHost
  readonly #outbox: Outbox
  readonly #store: Store
  readonly #urls: string[]
  readonly #out: TopicMapping[]
  readonly #in: TopicMapping[]
  readonly #ids = new PacketIds()
  readonly #clientId: string
  readonly #tls: { ca?: Buffer, cert?: Buffer, key?: Buffer }
  #link: Link | null = null
  #urlIndex = 0
  /** Failed rounds through the URL list since the last stable connection (the back-off exponent). */
  #attempt = 0
  #timer: NodeJS.Timeout | null = null
  #stableTimer: NodeJS.Timeout | null = null
  #expiryTimer: NodeJS.Timeout | null = null
  #pumping = false
  /** Taken from the outbox, not yet sent: held back by the QoS 2 limit (oldest first). */
  #held: Queued[] = []
  #pumpAgain = false
  #stopped = false
  #connects = 0
  /** Failed connection attempts since the last successful one (for the log). */
  #failures = 0
  /** Outbox entries sent at least once on an earlier connection (re-sent with DUP). */
  readonly #sentBefore = new Set<number>()
  /** Payloads this bridge published locally: never sent back out through it. */
  readonly #injected = new WeakSet<Buffer>()
  #lastFullLog = 0
  /** Outbox removals being written. */
  readonly #removing = new Set<Promise<void>>()
  /** Wakes stop() when an acknowledgement comes in. */
  #onAck: (() => void) | null = null
  #lastStateLogged: 'up' | 'down' | null = null

  private constructor (config: BridgeConfig, store: Store, outbox: Outbox, host: BridgeHost) {
    this.name = config.name
    this.#config = config
    this.#store = store
    this.#outbox = outbox
    this.#host = host
    this.#urls = config.urls ?? [config.url as string]
    this.#out = config.topics.filter((m) => m.direction !== 'in')
    this.#in = config.topics.filter((m) => m.direction !== 'out')
    this.#clientId = config.clientId ?? `${hostname()}.${config.name}`
    this.#tls = {
      ...(config.tls?.ca === undefined ? {} : { ca: readFileSync(config.tls.ca) }),
      ...(config.tls?.cert === undefined ? {} : { cert: readFileSync(config.tls.cert) }),
      ...(config.tls?.key === undefined ? {} : { key: readFileSync(config.tls.key) }),
    }
  }

  /** Opens the bridge's outbox; start() connects. */
  static async open (config: BridgeConfig, store: Store, host: BridgeHost): Promise<Bridge> {
    const outbox = await Outbox.open(store, config.name, config.outbox)
    const bridge = new Bridge(config, store, outbox, host)
    for (const id of await outbox.storedPacketIds()) bridge.#ids.reserved.add(id)
    const size = outbox.size
    if (size.messages > 0) host.logger.info({ bridge: config.name, messages: size.messages, bytes: size.bytes }, 'bridge outbox holds messages from before the restart: they are sent once the upstream is reached')
    return bridge
  }

  start (): void {
    this.#connect()
    const sweep = (): void => {
      this.#outbox.expire().then((n) => { if (n > 0) this.#expired(n) }, (err: Error) => {
        this.#host.logger.warn({ bridge: this.name, err: err.message }, 'bridge outbox expiry sweep failed')
      })
    }
    if (this.#config.outbox.maxAgeSeconds > 0) {
      this.#expiryTimer = setInterval(sweep, Math.min(60_000, Math.max(1000, this.#config.outbox.maxAgeSeconds * 100)))
      this.#expiryTimer.unref()
    }
  }

  /** Closes the upstream connection (entries in flight stay in the outbox for the next start). */
  async stop (): Promise<void> {
    this.#stopped = true
    for (const t of [this.#timer, this.#stableTimer]) if (t !== null) clearTimeout(t)
    if (this.#expiryTimer !== null) clearInterval(this.#expiryTimer)
    const link = this.#link
    if (link !== null) {
      // Nothing new is sent; what is in flight gets a moment to be acknowledged, so a clean
      // restart does not send it again.
      await this.#windowEmpty(link, STOP_WAIT_MS)
      this.#drop(link)
      this.#link = null
    }
    // Removals of acknowledged entries finish before the store closes.
    await Promise.allSettled([...this.#removing])
  }

  async #windowEmpty (link: Link, ms: number): Promise<void> {
    const deadline = Date.now() + ms
    while (link.up && (link.window.size > 0 || link.qos0.size > 0) && Date.now() < deadline) {
      await new Promise<void>((resolve) => { this.#onAck = resolve; setTimeout(resolve, 20).unref() })
    }
    this.#onAck = null
  }

  // ---- BridgeSources (metrics, $SYS) ----

  connected (): boolean {
    return this.#link?.up ?? false
  }

  outbox (): { messages: number, bytes: number } {
    return this.#outbox.size
  }

  async oldestAgeMs (): Promise<number> {
    return await this.#outbox.oldestAgeMs().catch(() => 0)
  }

  /** Publishes this bridge's figures under $SYS/ferrymq/bridges/<name>/. */
  async publishSys (): Promise<void> {
    const st = await this.status()
    const base = `$SYS/ferrymq/bridges/${this.name}`
    const stats: Array<[string, number]> = [
      ['connected', st.connected ? 1 : 0],
      ['outbox/messages', st.outbox.messages],
      ['outbox/bytes', st.outbox.bytes],
      ['outbox/oldestAgeSeconds', st.outbox.oldestAgeSeconds],
      ['forwarded/out', st.forwarded.out],
      ['forwarded/in', st.forwarded.in],
      ['dropped', Object.values(st.dropped).reduce((sum, n) => sum + n, 0)],
      ['expired', st.expired],
      ['reconnects', st.reconnects],
    ]
    for (const [topic, n] of stats) this.#host.sys(`${base}/${topic}`, String(n))
  }

  /** The bridge's state and counters (the admin API's GET /api/v1/bridges, and $SYS). */
  async status (): Promise<BridgeStatus> {
    const m = this.#host.metrics
    const values = async (metric: { get (): Promise<{ values: Array<{ value: number, labels: Record<string, string | number | undefined> }> }> }): Promise<Array<{ value: number, labels: Record<string, string | number | undefined> }>> =>
      (await metric.get()).values.filter((v) => v.labels.bridge === this.name)
    const sum = (list: Array<{ value: number }>): number => list.reduce((s, v) => s + v.value, 0)
    const forwarded = await values(m.bridgeForwarded)
    const dropped: Record<string, number> = {}
    for (const v of await values(m.bridgeDropped)) dropped[String(v.labels.reason)] = v.value
    const link = this.#link
    return {
      name: this.name,
      connected: this.connected(),
      url: link?.up === true ? link.url : null,
      protocolVersion: this.#config.protocolVersion,
      outbox: { ...this.#outbox.size, oldestAgeSeconds: Math.floor(await this.oldestAgeMs() / 1000) },
      inflight: link?.up === true ? link.window.size + link.qos0.size : 0,
      forwarded: {
        out: sum(forwarded.filter((v) => v.labels.direction === 'out')),
        in: sum(forwarded.filter((v) => v.labels.direction === 'in')),
      },
      dropped,
      expired: sum(await values(m.bridgeExpired)),
      reconnects: sum(await values(m.bridgeReconnects)),
    }
  }

  // ---- outbound: local messages into the outbox ----

  /** The outbox message for a local message, or null when no out-mapping takes it (or it came in through this bridge). */
  route (message: LocalMessage): OutboxMessage | null {
    if (this.#injected.has(message.payload)) return null
    for (const m of this.#out) {
      const remote = toRemote(m, message.topic)
      if (remote === null) continue
      const expiry = messageExpiryInterval(message.properties)
      // The application message's properties, whatever the upstream's version (the link decides
      // when it sends: an entry outlives the connection, and the configured version may change).
      // The Response Topic goes as it is: mappings rename the message's topic only, as Mosquitto's.
      const properties = messageProperties(message.properties)
      return {
        topic: remote,
        payload: message.payload,
        qos: Math.min(message.qos, m.qos) as 0 | 1 | 2,
        retain: message.retain,
        ...(expiry === undefined ? {} : { messageExpiry: expiry }),
        ...(properties === undefined ? {} : { properties }),
      }
    }
    return null
  }

  /** True when a message for this bridge would be refused now (`whenFull: reject` and the outbox is full). */
  refuses (message: LocalMessage): boolean {
    if (this.#config.outbox.whenFull !== 'reject') return false
    const { messages, bytes } = this.#outbox.size
    const full = messages >= this.#config.outbox.maxMessages || bytes + message.payload.length > this.#config.outbox.maxBytes
    if (!full || this.route(message) === null) return false
    // Counted and logged like a refusal in enqueue(): the publisher is refused, the message is lost to the bridge.
    this.#dropped('outbox_full', 1, 'bridge outbox full (outbox.whenFull: reject): a message was refused and its publisher disconnected')
    return true
  }

  /** Appends a routed message durably; resolves once written. Drops are counted and logged here. */
  /** Appends a local message to the outbox; `extra` ops are written in the same batch. */
  async enqueue (message: OutboxMessage, extra: StoreOp[] = []): Promise<void> {
    try {
      const { dropped } = await this.#outbox.append(message, Date.now(), extra)
      if (dropped > 0) this.#dropped('outbox_full', dropped, 'bridge outbox full (outbox.maxMessages / maxBytes): its oldest unsent messages were dropped to make room')
    } catch (err) {
      if (err instanceof OutboxFullError) {
        this.#dropped('outbox_full', 1, `bridge outbox full: a message was refused (${err.message})`)
      }
      throw err
    }
    void this.#pump()
  }

  /** Marks a payload as having come in through this bridge, so route() never sends it back out. */
  markInjected (payload: Buffer): void {
    this.#injected.add(payload)
  }

  #dropped (reason: 'outbox_full' | 'upstream_refused', n: number, message: string, extra: object = {}): void {
    this.#host.metrics.bridgeDropped.inc({ bridge: this.name, reason }, n)
    const now = Date.now()
    if (reason === 'outbox_full' && now - this.#lastFullLog < 10_000) return
    if (reason === 'outbox_full') this.#lastFullLog = now
    this.#host.logger.warn({ bridge: this.name, reason, dropped: n, outbox: this.#outbox.size, ...extra }, message)
    void this.publishSys()
  }

  #expired (n: number): void {
    this.#host.metrics.bridgeExpired.inc({ bridge: this.name }, n)
    this.#host.logger.warn({ bridge: this.name, expired: n, maxAgeSeconds: this.#config.outbox.maxAgeSeconds },
      'bridge outbox: messages expired before they could be sent (outbox.maxAgeSeconds or their message expiry) and were dropped')
    void this.publishSys()
  }

  // ---- the link ----

  #connect (): void {
    if (this.#stopped) return
    const url = this.#urls[this.#urlIndex] as string
    const c = this.#config
    if (this.#connects++ > 0) this.#host.metrics.bridgeReconnects.inc({ bridge: this.name })
    let link: Link | null = null
    const incoming = new IncomingStore(this.#store, this.name, (err) => {
      this.#host.logger.warn({ bridge: this.name, err: err.message }, 'bridge: inbound QoS 2 message not stored; closing the link so the upstream sends it again')
      link?.client.stream.destroy()
    })
    const options: IClientOptions = {
      clientId: this.#clientId,
      protocolVersion: c.protocolVersion,
      manualConnect: true,
      clean: c.clean,
      keepalive: c.keepaliveSeconds,
      reconnectPeriod: 0,
      connectTimeout: c.reconnect.connectTimeoutMs,
      queueQoSZero: false,
      resubscribe: false,
      outgoingStore: this.#outgoingStore(() => link),
      incomingStore: incoming,
      messageIdProvider: this.#ids,
      ...(c.username === undefined ? {} : { username: c.username }),
      ...(c.password === undefined ? {} : { password: c.password }),
      ...(c.protocolVersion === 5 ? { properties: { sessionExpiryInterval: c.clean ? 0 : c.sessionExpirySeconds } } : {}),
      ...this.#tls,
      rejectUnauthorized: c.tls?.verify ?? true,
      ...(c.tls?.servername === undefined ? {} : { servername: c.tls.servername }),
    }
    const client = mqtt.connect(url, options)
    if (c.protocolVersion === 4) {
      // 3.1.1: the bridge flag (protocol level | 0x80), which tells Mosquitto (and FerryMQ) not to
      // send this connection's own messages back to it. MQTT.js has no option for it; mqtt-packet
      // writes it for a CONNECT packet with bridgeMode.
      const raw = client as unknown as { _writePacket: (packet: Packet & { bridgeMode?: boolean }, cb?: unknown) => void }
      const write = raw._writePacket.bind(client)
      raw._writePacket = (packet, cb) => {
        if (packet.cmd === 'connect') packet.bridgeMode = true
        write(packet, cb)
      }
    }
    link = { client, url, up: false, window: new Map(), qos0: new Set(), connectedAt: 0, limit: c.maxInflight, limit2: Math.min(c.maxInflight, c.maxInflightQos2), qos2: 0 }
    this.#link = link
    const current = link
    client.handleMessage = (packet, cb) => this.#inbound(current, packet, cb, incoming)
    client.on('connect', (connack) => {
      // MQTT 5: the upstream says how many QoS 1/2 messages it takes at once (Mosquitto: its max_inflight_messages).
      const receiveMaximum = connack.properties?.receiveMaximum
      if (receiveMaximum !== undefined && receiveMaximum > 0) {
        current.limit = Math.min(current.limit, receiveMaximum)
        current.limit2 = Math.min(current.limit2, receiveMaximum)
      }
      void this.#onConnect(current, connack.sessionPresent, incoming)
    })
    client.on('error', (err: Error & { code?: number | string }) => {
      if (current !== this.#link) return
      if (current.up) {
        this.#host.logger.warn({ bridge: this.name, url, err: err.message, code: err.code }, 'bridge link error')
      } else {
        // Attempts 1, 2, 4, 8, … are logged: a long outage stays a few lines an hour.
        this.#failures++
        if ((this.#failures & (this.#failures - 1)) === 0) {
          this.#host.logger.warn({ bridge: this.name, url, err: err.message, code: err.code, attempts: this.#failures, outbox: this.#outbox.size }, 'bridge could not connect; retrying with back-off')
        }
      }
      client.stream?.destroy()
    })
    client.on('close', () => this.#onClose(current))
    client.connect()
  }

  async #onConnect (link: Link, sessionPresent: boolean, incoming: IncomingStore): Promise<void> {
    if (link !== this.#link || this.#stopped) return
    link.up = true
    link.connectedAt = Date.now()
    this.#failures = 0
    if (this.#lastStateLogged !== 'up') {
      this.#host.logger.info({ bridge: this.name, url: link.url, sessionPresent, outbox: this.#outbox.size }, 'bridge connected')
    }
    this.#lastStateLogged = 'up'
    this.#stableTimer = setTimeout(() => { if (link.up) this.#attempt = 0 }, this.#config.reconnect.stableMs)
    this.#stableTimer.unref()
    if (!sessionPresent) await incoming.clear().catch(() => {})
    const subs = this.#in.map((m) => remoteFilter(m))
    if (subs.length > 0) {
      const opts = Object.fromEntries(this.#in.map((m) => [remoteFilter(m), this.#config.protocolVersion === 5 ? { qos: m.qos, nl: true, rap: true } : { qos: m.qos }]))
      link.client.subscribe(opts, (err, granted) => {
        if (err !== null && err !== undefined) {
          if (link.up) this.#host.logger.warn({ bridge: this.name, err: err.message }, 'bridge: upstream subscription failed')
          return
        }
        const refused = (granted ?? []).filter((g) => (g.qos & 0x80) !== 0)
        if (refused.length > 0) this.#host.logger.error({ bridge: this.name, filters: refused.map((g) => g.topic) }, 'bridge: the upstream refused subscriptions of in-mappings; nothing comes in on them')
      })
    }
    void this.#pump()
  }

  #onClose (link: Link): void {
    if (link !== this.#link) return
    const wasUp = link.up
    this.#drop(link)
    this.#link = null
    if (this.#stopped) return
    if (wasUp) {
      // A link that did not stay up for reconnect.stableMs counts as a failure: flapping backs off too.
      if (Date.now() - link.connectedAt < this.#config.reconnect.stableMs) this.#attempt++
      this.#host.logger.warn({ bridge: this.name, url: link.url, outbox: this.#outbox.size }, 'bridge disconnected: outbound messages wait in the outbox')
      this.#lastStateLogged = 'down'
      this.#urlIndex = 0 // the preferred URL first again
      this.#schedule(this.#delay())
      return
    }
    // Failover: the next URL at once; after the last one, back off.
    this.#urlIndex = (this.#urlIndex + 1) % this.#urls.length
    if (this.#urlIndex !== 0) {
      this.#schedule(0)
      return
    }
    this.#attempt++
    this.#schedule(this.#delay())
  }

  /** Ends a link's bookkeeping: entries in flight go back to the outbox, to be sent again on the next link. */
  #drop (link: Link): void {
    link.up = false
    if (this.#stableTimer !== null) clearTimeout(this.#stableTimer)
    for (const q of link.window.values()) {
      this.#sentBefore.add(q.seq)
      this.#outbox.release(q)
    }
    link.window.clear()
    link.qos2 = 0
    for (const q of this.#held) this.#outbox.release(q)
    this.#held = []
    for (const q of link.qos0) this.#outbox.release(q)
    link.qos0.clear()
    this.#ids.clear()
    link.client.removeAllListeners('connect')
    link.client.on('error', () => {})
    link.client.end(true)
  }

  /** Exponential back-off with full jitter between minDelayMs and the capped exponential. */
  #delay (): number {
    const { minDelayMs, maxDelayMs } = this.#config.reconnect
    return backoffDelay(this.#attempt, minDelayMs, maxDelayMs)
  }

  #schedule (ms: number): void {
    if (this.#stopped) return
    this.#timer = setTimeout(() => { this.#timer = null; this.#connect() }, ms)
  }

  /** MQTT.js's outgoing store: only the PUBREL matters, its PUBREC is stored before the PUBREL goes out. */
  #outgoingStore (link: () => Link | null): IStore {
    const store: IStore = {
      put: (packet: Packet, cb: (err?: Error) => void) => {
        const l = link()
        const id = (packet as { messageId?: number }).messageId
        const q = id === undefined ? undefined : l?.window.get(id)
        if (packet.cmd !== 'pubrel' || l === null || q === undefined || q.entry.released === true) {
          cb()
          return store
        }
        this.#outbox.markReleased(q).then(() => cb(), (err: Error) => {
          this.#host.logger.warn({ bridge: this.name, err: err.message }, 'bridge: PUBREC not stored; closing the link to finish the message later')
          l.client.stream.destroy()
        })
        return store
      },
      del: (packet: Pick<Packet, 'messageId'>, cb: (err?: Error, packet?: Packet) => void) => { cb(undefined, packet as Packet); return store },
      get: (_packet: Pick<Packet, 'messageId'>, cb: (err?: Error, packet?: Packet) => void) => { cb(new Error('missing packet')); return store },
      createStream: () => Readable.from([]) as unknown as ReturnType<IStore['createStream']>,
      close: (cb: () => void) => cb(),
    }
    return store
  }

  // ---- the forwarder ----

  async #pump (): Promise<void> {
    if (this.#pumping) {
      this.#pumpAgain = true
      return
    }
    this.#pumping = true
    try {
      for (;;) {
        this.#pumpAgain = false
        const link = this.#link
        if (link === null || !link.up || this.#stopped) return
        const max = link.limit
        const room = max - link.window.size - link.qos0.size
        // Refill in chunks, not one entry per acknowledgement: each take() is a LevelDB scan.
        const held = this.#held[0]
        const blocked = held !== undefined && held.entry.qos === 2 && link.qos2 >= link.limit2
        if (room <= 0 || blocked || (held === undefined && room < Math.ceil(max / 4) && link.window.size > 0)) {
          if (!this.#pumpAgain) return
          continue
        }
        // Entries held back by the QoS 2 limit go first (they are older than anything in the outbox).
        const batch = held !== undefined ? this.#held.splice(0, room) : await this.#outbox.take(room)
        if (batch.length === 0) {
          if (!this.#pumpAgain) return
          continue
        }
        await this.#send(link, batch)
      }
    } catch (err) {
      this.#host.logger.warn({ bridge: this.name, err: (err as Error).message }, 'bridge: reading or updating the outbox failed; closing the link to try again')
      this.#link?.client.stream?.destroy()
    } finally {
      this.#pumping = false
    }
  }

  async #send (link: Link, batch: Queued[]): Promise<void> {
    const now = Date.now()
    const send: Queued[] = []
    const expired: Queued[] = []
    for (const q of batch) {
      if (q.entry.packetId === undefined && isExpired(q.entry, this.#config.outbox, now)) expired.push(q)
      else send.push(q)
    }
    if (expired.length > 0) {
      await Promise.all(expired.map((q) => this.#remove(q)))
      this.#expired(expired.length)
    }
    // QoS 2: the packet ids go to disk (one write for the batch) before any of them is sent.
    const assign: Array<{ queued: Queued, packetId: number }> = []
    for (const q of send) {
      if (q.entry.qos !== 2 || q.entry.packetId !== undefined) continue
      const id = this.#ids.pick()
      if (id === null) break
      this.#ids.reserved.add(id)
      assign.push({ queued: q, packetId: id })
    }
    if (assign.length > 0) {
      try {
        await this.#outbox.assignPacketIds(assign)
      } catch (err) {
        for (const a of assign) this.#ids.reserved.delete(a.packetId)
        for (const q of send) this.#outbox.release(q)
        throw err
      }
    }
    for (let i = 0; i < send.length; i++) {
      const q = send[i] as Queued
      if (!link.up || link !== this.#link || (q.entry.qos === 2 && q.entry.packetId === undefined)) {
        for (const rest of send.slice(i)) this.#outbox.release(rest)
        return
      }
      if (q.entry.qos === 2 && link.qos2 >= link.limit2) {
        // The QoS 2 limit: this one and the rest wait, in order, for a PUBCOMP.
        this.#held.unshift(...send.slice(i))
        return
      }
      this.#publish(link, q)
    }
  }

  #publish (link: Link, q: Queued): void {
    const e = q.entry
    const opts: IClientPublishOptions = { qos: e.qos, retain: e.retain }
    // MQTT 5 upstream: the message's properties and its remaining expiry. 3.1.1 has no properties.
    if (this.#config.protocolVersion === 5 && (e.messageExpiry !== undefined || e.properties !== undefined)) {
      opts.properties = {
        ...e.properties,
        ...(e.messageExpiry === undefined ? {} : { messageExpiryInterval: Math.max(1, Math.ceil(e.messageExpiry - (Date.now() - e.enqueuedAt) / 1000)) }),
      }
    }
    const sentAt = performance.now()
    if (e.qos === 0) {
      link.qos0.add(q)
      link.client.publish(e.topic, e.payload, opts, (err) => {
        if (!link.qos0.delete(q)) return // released by #drop already
        if (err !== undefined && err !== null) {
          this.#outbox.release(q) // not written: sent on the next link
          return
        }
        this.#done(q, sentAt)
      })
      return
    }
    if (e.released === true && e.packetId !== undefined) {
      this.#pubrel(link, q, e.packetId, sentAt)
      return
    }
    const id = e.packetId ?? this.#ids.pick()
    if (id === null) {
      this.#outbox.release(q)
      return
    }
    if (e.packetId !== undefined || this.#sentBefore.has(q.seq)) opts.dup = true
    link.window.set(id, q)
    if (e.qos === 2) link.qos2++
    this.#ids.force(id)
    link.client.publish(e.topic, e.payload, opts, (err) => this.#acked(link, id, q, err, sentAt))
  }

  /** A QoS 2 message whose PUBREC was stored before the last link went down: only the PUBREL is owed. */
  #pubrel (link: Link, q: Queued, id: number, sentAt: number): void {
    // MQTT.js has no public call for this; it is how its own store replay sends a stored PUBREL.
    const client = link.client as unknown as {
      outgoing: Record<number, { volatile: boolean, cmd: string, cb: (err?: Error, packet?: Packet) => void }>
      _sendPacket: (packet: object, cb?: () => void, cbStorePut?: () => void, noStore?: boolean) => void
    }
    if (!this.#ids.register(id)) {
      this.#outbox.release(q)
      return
    }
    link.window.set(id, q)
    link.qos2++
    client.outgoing[id] = { volatile: false, cmd: 'pubrel', cb: (err) => this.#acked(link, id, q, err, sentAt) }
    client._sendPacket({ cmd: 'pubrel', qos: 2, messageId: id }, undefined, undefined, true)
  }

  #acked (link: Link, id: number, q: Queued, err: (Error & { code?: number }) | undefined | null, sentAt: number): void {
    if (link.window.get(id) !== q) return // the link went down first: the entry was released
    link.window.delete(id)
    if (q.entry.qos === 2) link.qos2--
    if (err !== undefined && err !== null) {
      const code = err.code
      if (typeof code !== 'number') {
        // The connection closed under it: back to the outbox, re-sent (with DUP) on the next link.
        this.#sentBefore.add(q.seq)
        this.#outbox.release(q)
        return
      }
      if (ERROR_RETRY_CODES.has(code)) {
        this.#outbox.release(q)
        this.#host.logger.warn({ bridge: this.name, code, err: err.message }, 'bridge: the upstream asks to try later; reconnecting with back-off')
        link.client.stream.destroy()
        return
      }
      this.#ids.reserved.delete(id)
      this.#dropped('upstream_refused', 1, 'bridge: the upstream refused a message (error reason code); it is dropped', { code, topic: q.entry.topic, reason: err.message })
      this.#remove(q).catch(() => this.#outbox.release(q))
      void this.#pump()
      return
    }
    this.#ids.reserved.delete(id)
    this.#host.metrics.bridgeRtt.observe({ bridge: this.name }, (performance.now() - sentAt) / 1000)
    this.#done(q, sentAt)
  }

  #done (q: Queued, _sentAt: number): void {
    this.#sentBefore.delete(q.seq)
    this.#host.metrics.bridgeForwarded.inc({ bridge: this.name, direction: 'out' })
    this.#onAck?.()
    this.#remove(q).then(() => this.#pump(), (err: Error) => {
      // Still in the outbox: sent again later (a duplicate, never a loss).
      this.#outbox.release(q)
      this.#host.logger.warn({ bridge: this.name, err: err.message }, 'bridge: acknowledged message not removed from the outbox; it will be sent again')
    })
    void this.#pump()
  }

  /** Outbox.remove, tracked so stop() can wait for it. */
  #remove (q: Queued): Promise<void> {
    const p = this.#outbox.remove(q)
    this.#removing.add(p)
    const forget = (): void => { this.#removing.delete(p) }
    p.then(forget, forget)
    return p
  }

  // ---- inbound ----

  #inbound (link: Link, packet: Packet, cb: (err?: Error) => void, incoming: IncomingStore): void {
    const p = packet as unknown as { topic: string, payload: Buffer | string, qos: 0 | 1 | 2, retain: boolean, messageId?: number, properties?: unknown, messageExpiry?: number }
    let local: string | null = null
    for (const m of this.#in) {
      local = toLocal(m, p.topic)
      if (local !== null) break
    }
    if (local === null) {
      cb()
      return
    }
    // MQTT 5 upstream: the application message's properties go with it, and its expiry, counted
    // from when it arrived (a QoS 2 message waited for its PUBREL in IncomingStore, which keeps
    // the deadline as `messageExpiry`), so local subscribers and queues honour what is left.
    const now = Date.now()
    const interval = messageExpiryInterval(p.properties)
    const deadline = p.messageExpiry ?? (interval === undefined ? undefined : now + interval * 1000)
    if (deadline !== undefined && deadline <= now) {
      // Expired while it waited (a restart between PUBREC and PUBREL): acknowledged, not delivered.
      this.#host.metrics.bridgeExpired.inc({ bridge: this.name })
      this.#host.logger.info({ bridge: this.name, topic: local }, 'bridge: inbound message expired before its PUBREL; acknowledged upstream, not published')
      cb()
      return
    }
    const app = messageProperties(p.properties)
    const properties: InboundProperties | undefined = deadline === undefined
      ? app
      : { ...app, messageExpiryInterval: Math.max(1, Math.ceil((deadline - now) / 1000)) }
    // A copy of our own, so the mark below names this message only.
    const payload = Buffer.from(p.payload)
    this.#injected.add(payload)
    // QoS 2: the stored state goes in the batch that queues the local copies, so a crash never
    // leaves both (a PUBREL after the restart would deliver it again).
    const onQueued = p.qos === 2 && p.messageId !== undefined ? [incoming.deleteOp(p.messageId)] : undefined
    this.#host.publishLocal(this, {
      topic: local,
      payload,
      qos: p.qos,
      retain: p.retain,
      ...(properties === undefined ? {} : { properties }),
      ...(onQueued === undefined ? {} : { onQueued }),
    }).then(() => {
      this.#host.metrics.bridgeForwarded.inc({ bridge: this.name, direction: 'in' })
      cb()
    }, (err: Error) => {
      this.#host.logger.warn({ bridge: this.name, topic: local, err: err.message }, 'bridge: inbound message not stored locally; not acknowledged, the upstream sends it again')
      link.client.stream?.destroy()
    })
  }
}

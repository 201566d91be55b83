import type { AddressInfo } from 'node:net'
import type { IncomingMessage } from 'node:http'
import type { Duplex } from 'node:stream'
import { Aedes, type AedesPublishPacket, type Client, type ConnectPacket, type PublishPacket } from 'aedes'
import { WebSocket } from 'ws'
import { createRequire } from 'node:module'
import type { Config, ListenerName } from '../config/schema.js'
import { createLogger, type Logger } from '../observability/logger.js'
import { Metrics } from '../observability/metrics.js'
import { SysPublisher } from '../observability/sys.js'
import { prepareDataDir } from '../store/data-dir.js'
import { readdir, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { openStore, type OpenOptions, type Store, type StoreObserver } from '../store/open.js'
import { LevelPersistence, type JournalPacket, type QueueFullEvent } from '../store/persistence.js'
import type { StoreOp } from '../store/writer.js'
import { listenHttp } from '../transport/http.js'
import type { Listener } from '../transport/listener.js'
import { meterConnection, PacketTooLargeError, MalformedFramingError, type MeteredConnection } from '../transport/packet-meter.js'
import { listenTcp } from '../transport/tcp.js'
import { loadTlsMaterial } from '../transport/tls-material.js'
import { listenWs } from '../transport/ws.js'
import { VERSION } from '../version.js'
import { Bridge, checkBridges, type LocalMessage } from '../bridge/bridge.js'
import { clientIdProblem, topicFilterProblem, topicMatches, topicNameProblem } from './validate.js'
import { installReceiveMaximum } from './flow-control.js'
import { SessionKeeper } from './sessions.js'
import { installExactDedupe } from './dedupe.js'
import { guardPersistence, RECEIVE_MAXIMUM_EXCEEDED, type GuardedPersistence, type InboundQos2Counts } from './guards.js'

/** A running FerryMQ: listeners, the aedes core and its observability, with one owner for all. */
export interface Broker {
  readonly config: Config
  readonly metrics: Metrics
  readonly logger: Logger
  /** True once every listener is up, until close() starts. */
  readonly ready: boolean
  /** Where a listener is bound (its real port when configured with 0 → see `ephemeral`), or undefined when off. */
  address (name: ListenerName): AddressInfo | undefined
  start (): Promise<void>
  /** Stops accepting, closes every client, listener and timer. Safe to call more than once. */
  close (): Promise<void>
}

export interface BrokerOptions {
  logger?: Logger
  /**
   * Bind listeners whose configured port is 0 to an ephemeral port instead of leaving them off
   * (tests). Without it, port 0 disables a listener, as the CLI documents.
   */
  ephemeral?: readonly ListenerName[]
  /** Back-off of the store's recovery after a write failure (tests shorten it). */
  storeRetry?: Pick<OpenOptions, 'retryMinMs' | 'retryMaxMs'>
}

/** What CONNECT carried, kept from preConnect for the checks in authenticate (which can send a CONNACK code). */
interface ConnectInfo { clientId: string, clean: boolean, version: number, bridge: boolean, willDelay: number, keepaliveProblem?: string }

const require = createRequire(import.meta.url)
/** aedes' own in-memory persistence (durability: memory), the one aedes would create itself. */
const memoryPersistence = require('aedes-persistence') as () => object
const mqttPacket = require('mqtt-packet') as typeof import('mqtt-packet')
const IDENTIFIER_REJECTED = 2
const SERVER_UNAVAILABLE = 3
/** MQTT 5 DISCONNECT reason codes. */
const UNSPECIFIED_ERROR = 0x80
const SERVER_SHUTTING_DOWN = 0x8B
const QUOTA_EXCEEDED = 0x97
/** An MQTT 5 DISCONNECT with reason 0x95 "Packet too large" and no properties. */
const DISCONNECT_PACKET_TOO_LARGE = Buffer.from([0xe0, 0x02, 0x95, 0x00])
/** What a "__proto__" filter in a multi-filter SUBSCRIBE becomes before aedes sees it (see guardClient); never a valid filter (U+0000). */
const PROTO_FILTER = '\u0000__proto__'
/** The journal key of an inbound QoS 1 PUBLISH, set in authorizePublish, read in published (same packet object). */
const JOURNAL_KEY = Symbol('ferrymq.journalKey')
/** How long shutdown waits for acknowledged QoS 1 messages to finish storing (the CLI allows 5 s in all). */
const JOURNAL_DRAIN_MS = 2000

export function createBroker (config: Config, options: BrokerOptions = {}): Broker {
  return new FerryBroker(config, options)
}

class FerryBroker implements Broker {
  readonly metrics: Metrics
  readonly logger: Logger
  /** Created by start(), once the store (if any) is open. */
  private aedes: Aedes | null = null
  private persistence: LevelPersistence | null = null
  private store: Store | null = null
  /** Store-and-forward bridges (config.bridges), opened with the store. */
  private bridges: Bridge[] = []
  /** Payloads published by clients that connected with the bridge flag, so they are not sent back to them (no local). */
  private readonly publishedByBridge = new WeakMap<Buffer, Client>()
  /** Journal entries appended and not yet deleted, by hex key (their messages' pipelines are running or failed). */
  private readonly journaled = new Set<string>()
  /** The newest journal key appended, for the replay after a store failure. */
  private lastJournalKey: Buffer | null = null
  /** Set while journal entries are published again after a store failure: new PUBLISHes wait, so order holds. */
  private publishGate: Promise<void> | null = null
  /** Per client, the theoretical arrival time (ms, performance.now()) of its next PUBLISH under limits.maxPublishRate. */
  private readonly arrival = new WeakMap<Client, number>()
  private readonly throttleLogged = new WeakSet<Client>()
  /** Per client, PUBLISHes held back by limits.maxPublishRate, in arrival order. */
  private readonly throttled = new WeakMap<Client, Array<{ packet: PublishPacket, done: (err?: Error | null) => void, due: number }>>()
  /** Called when the last journaled message has been published (set while shutting down). */
  private onJournalDrained: (() => void) | null = null
  /** The last count of retained messages (served while the store cannot be read). */
  private retainedCounted = 0
  private readonly listeners = new Map<ListenerName, Listener>()
  private readonly connections = new Set<Duplex>()
  private readonly connectInfo = new WeakMap<Client, ConnectInfo>()
  /**
   * Subscriptions authorizeSubscribe refused. aedes stores a SUBSCRIBE's whole filter list once one
   * of them is granted, refused ones included; the persistence is told to leave these out.
   */
  private readonly refusedSubs = new WeakSet<object>()
  /** Inbound QoS 2 packet ids awaiting PUBREL, per client (limits.maxInflightInbound). */
  private inboundQos2: InboundQos2Counts | null = null
  private readonly meters = new WeakMap<object, MeteredConnection>()
  /** Clients already logged as slow since they connected, so a flood of drops logs once. */
  private readonly slowLogged = new WeakSet<object>()
  /** When each full session queue was last logged (at most one line per client per 10 s). */
  private readonly queueFullLogged = new Map<string, number>()
  private readonly sys: SysPublisher
  private started = false
  private closing: Promise<void> | null = null
  private atConnectionLimit = false
  private sessions: SessionKeeper | null = null
  ready = false

  constructor (readonly config: Config, private readonly options: BrokerOptions) {
    this.logger = options.logger ?? createLogger(config.log.level)
    this.metrics = new Metrics({
      clientsConnected: () => this.aedes?.connectedClients ?? 0,
      subscriptions: () => this.countSubscriptions(),
      retainedMessages: () => this.countRetained(),
      store: () => this.store === null ? null : {
        sizeBytes: () => directorySize((this.store as Store).dir),
        available: () => (this.store as Store).available ? 1 : 0,
        journalDepth: () => this.journaled.size,
        queued: () => this.persistence?.totalQueued() ?? { messages: 0, bytes: 0 },
      },
      bridges: () => this.bridges,
    })
    this.sys = new SysPublisher(this.metrics, (topic, payload) => {
      if (this.aedes !== null && !this.aedes.closed) this.aedes.publish({ cmd: 'publish', topic, payload: Buffer.from(payload), qos: 0, retain: false, dup: false }, () => {})
    }, VERSION, async () => { for (const b of this.bridges) await b.publishSys() })
  }

  /** aedes with FerryMQ's hooks and limits, on the given persistence (aedes' in-memory one when null). */
  private createAedes (persistence: LevelPersistence | null): Aedes {
    const { config } = this
    const limits = config.limits
    // aedes' in-memory persistence when the store is off; created here so guardPersistence can wrap it.
    const store = persistence ?? memoryPersistence()
    this.inboundQos2 = guardPersistence(store as unknown as GuardedPersistence, {
      maxInflightInbound: limits.maxInflightInbound,
      // Decided from the filter itself, not only from authorizeSubscribe's verdict: aedes stores the
      // whole list when the first filter is granted, before the later ones have been checked.
      refused: (sub) => {
        const topic = (sub as { topic?: unknown }).topic
        return this.refusedSubs.has(sub) || typeof topic !== 'string' || topic === '__proto__' || topic === PROTO_FILTER || topicFilterProblem(topic, limits) !== null
      },
      overLimit: async (client, err) => {
        this.metrics.protocolErrors.inc({ reason: 'inflight_inbound' })
        this.logger.info({ clientId: client.id, err: err.message }, 'client closed: too many QoS 2 messages awaiting PUBREL')
        // MQTT 5: DISCONNECT "Receive Maximum exceeded"; 3.1.1 has no way to say why.
        const c = client as unknown as Client
        if (c.version === 5) await new Promise<void>((resolve) => c.disconnect({ reasonCode: RECEIVE_MAXIMUM_EXCEEDED }, () => resolve()))
      },
    })
    const aedes = new Aedes({
      persistence: store as unknown as NonNullable<ConstructorParameters<typeof Aedes>[0]>['persistence'],
      heartbeatInterval: config.sys.heartbeatSeconds * 1000,
      connectTimeout: limits.connectTimeoutMs,
      drainTimeout: limits.drainTimeoutMs,
      // No cap on messages in flight in aedes' mqemitter. With a cap (aedes' default 100), messages
      // past it wait in one broker-wide queue: a subscriber that stops reading stalls delivery to
      // every client until drainTimeout, and once nothing matches, the queue drains by recursion
      // and overflows the stack ("Maximum call stack size exceeded"). See bad-input.test.ts.
      concurrency: 0,
      maxTopicLevels: limits.maxTopicLevels,
      maxClientsIdLength: 23, // MQTT 3.1's own limit; 3.1.1 is checked in authenticate
      // MQTT 5: what CONNACK advertises. aedes enforces the alias range, the keepalive limit and the
      // session expiry clamp; FerryMQ enforces the packet size (packet meter) and Receive Maximum.
      topicAliasMaximum: limits.maxTopicAlias,
      maximumPacketSize: limits.maxPacketSize,
      receiveMaximum: limits.maxInflightInbound,
      keepaliveLimit: limits.maxKeepaliveSeconds,
      sessionExpiryIntervalLimit: limits.sessionExpirySeconds,
      preConnect: (client, packet, done) => this.preConnect(client, packet, done),
      authenticate: (client, _username, _password, done) => this.authenticate(client, done),
      authorizePublish: (client, packet, done) => this.authorizePublish(client, packet, done),
      published: (packet, _client, done) => this.published(packet, done),
      authorizeSubscribe: (client, sub, done) => this.authorizeSubscribe(client, sub, done),
      authorizeForward: (client, packet) => this.authorizeForward(client, packet),
    })
    // GHSA-52qw-whmv-87c5 (fixed in aedes 1.2.0, open in 2.0.0-beta.1): maps keyed by client ids
    // are plain objects, so a client id such as "constructor" looked taken and the CONNECT threw.
    const maps = aedes as unknown as { clients: object, brokers: object }
    maps.clients = Object.create(null) as object
    maps.brokers = Object.create(null) as object
    this.watchClients(aedes)
    return aedes
  }

  address (name: ListenerName): AddressInfo | undefined {
    return this.listeners.get(name)?.address()
  }

  async start (): Promise<void> {
    if (this.started) throw new Error('broker already started')
    this.started = true
    const { config, logger } = this
    const dataDir = prepareDataDir(config.storage)
    const tls = config.tls === undefined ? undefined : loadTlsMaterial(config.tls)
    checkBridges(config.bridges, config.storage.durability)
    if (dataDir !== null && config.storage.durability !== 'memory') {
      this.store = await openStore(dataDir, config.storage.durability, { ...this.options.storeRetry, observer: this.storeObserver() })
      this.persistence = new LevelPersistence(this.store, {
        maxQueuedMessages: config.limits.maxQueuedMessages,
        maxQueuedBytes: config.limits.maxQueuedBytes,
        queueFullPolicy: config.limits.queueFullPolicy,
        onQueueFull: (_clientId, _limit, event) => this.queueFull(event),
      })
      logger.info({ dataDir, durability: config.storage.durability }, 'store opened')
      // Inbound QoS 2 and the bridges: a re-send found queued locally but missing from an outbox (a
      // crash between the two writes) is appended to it before the PUBREC.
      this.persistence.setBridging({
        names: config.bridges.map((b) => b.name),
        owed: (packet) => this.bridges.filter((b) => b.route(packet as unknown as LocalMessage) !== null).map((b) => b.name),
        complete: async (packet, names) => {
          await Promise.all(this.bridges.filter((b) => names.includes(b.name)).map(async (b) => {
            const routed = b.route(packet as unknown as LocalMessage)
            if (routed !== null) await b.enqueue(routed, this.bridgedMark(packet.payload, b))
          }))
        },
      })
      // Before the journal replay: a replayed message owes its bridges an outbox entry too.
      for (const b of config.bridges) {
        this.bridges.push(await Bridge.open(b, this.store, {
          logger,
          metrics: this.metrics,
          publishLocal: (bridge, message) => this.publishLocal(bridge, message),
          sys: (topic, payload) => this.sys.publishRaw(topic, payload),
        }))
      }
    }
    this.aedes = this.createAedes(this.persistence)
    try {
      await this.aedes.listen()
      if (this.persistence !== null) {
        for await (const { clientId, messageId } of this.persistence.incomingIds()) this.inboundQos2?.reserve(clientId, messageId, Number.MAX_SAFE_INTEGER)
        await this.replayJournal(this.aedes, this.persistence)
        this.sessions = new SessionKeeper(this.aedes, this.persistence, {
          limitSeconds: config.limits.sessionExpirySeconds,
          logger,
          metrics: this.metrics,
          closing: () => this.closing !== null,
          willDelay: (client) => this.connectInfo.get(client)?.willDelay ?? 0,
          cleanStart: (client) => this.connectInfo.get(client)?.clean ?? true,
          cleanIncoming: (client) => this.cleanIncoming(client),
          ended: (clientIds) => { for (const id of clientIds) this.inboundQos2?.clear(id) },
        })
        await this.sessions.start()
      } else {
        // GHSA-p8r9-qf8w-p73r: a session that ends, at disconnect or when it expires (aedes' timer),
        // leaves no inbound QoS 2 state.
        this.aedes.on('clientDisconnect', (client) => {
          if (client.clean) this.cleanIncoming(client).catch(() => {})
        })
        this.aedes.on('sessionExpired', (client) => { this.cleanIncoming(client).catch(() => {}) })
      }
      await this.openListeners(tls)
      for (const b of this.bridges) b.start()
    } catch (err) {
      await this.close()
      throw err
    }
    this.sys.start(config.sys.intervalSeconds)
    this.ready = true
    logger.info({
      version: VERSION,
      listeners: Object.fromEntries([...this.listeners].map(([name, l]) => [name, `${l.address().address}:${l.address().port}`])),
    }, 'FerryMQ is ready')
  }

  close (): Promise<void> {
    this.closing ??= this.shutdown()
    return this.closing
  }

  private async shutdown (): Promise<void> {
    this.ready = false
    this.sys.stop()
    this.sessions?.stop()
    // Stop accepting first, then close the clients aedes knows, then any socket that never sent
    // CONNECT; the store closes last, once its writer has finished what is queued.
    const listenersClosed = Promise.all([...this.listeners.values()].map((l) => l.close()))
    // QoS 1 messages already acknowledged finish their pipeline first: closed under them, aedes
    // would not reach `published`, and the journal would publish them again at the next start.
    await this.journalDrained(JOURNAL_DRAIN_MS)
    const aedes = this.aedes
    if (aedes !== null) await new Promise<void>((resolve) => aedes.close(() => resolve()))
    for (const conn of this.connections) conn.destroy()
    await listenersClosed
    // What is in flight upstream stays in the outboxes and is finished after the next start.
    await Promise.all(this.bridges.map((b) => b.stop()))
    await this.persistence?.destroy()
    const served = this.listeners.size > 0
    this.listeners.clear()
    if (served) this.logger.info('FerryMQ stopped')
  }

  private async openListeners (tls: ReturnType<typeof loadTlsMaterial> | undefined): Promise<void> {
    const { listeners: l, limits } = this.config
    const accept = (conn: Duplex, name: string, req?: IncomingMessage): void => this.accept(conn, name, req)
    const on = (name: ListenerName, port: number): boolean => port !== 0 || (this.options.ephemeral?.includes(name) ?? false)
    const add = (listener: Listener): void => { this.listeners.set(listener.name as ListenerName, listener) }

    if (on('mqtt', l.mqtt.port)) add(await listenTcp('mqtt', l.mqtt.host, l.mqtt.port, accept, this.logger))
    if (on('ws', l.ws.port)) add(await listenWs('ws', { ...l.ws, maxPayload: limits.maxPacketSize, upgradeTimeoutMs: limits.connectTimeoutMs }, accept, this.logger))
    if (tls !== undefined && on('mqtts', l.mqtts.port)) add(await listenTcp('mqtts', l.mqtts.host, l.mqtts.port, accept, this.logger, tls))
    if (tls !== undefined && on('wss', l.wss.port)) add(await listenWs('wss', { ...l.wss, maxPayload: limits.maxPacketSize, upgradeTimeoutMs: limits.connectTimeoutMs, tls }, accept, this.logger))
    if (on('http', l.http.port)) {
      add(await listenHttp('http', l.http.host, l.http.port, {
        live: () => this.closing === null,
        ready: () => this.ready && (this.store?.available ?? true),
        registry: this.metrics.registry,
        bridges: async () => await Promise.all(this.bridges.map((b) => b.status())),
      }, this.logger))
    }
  }

  /** Every transport hands its connections here: the connection limit, metering, then aedes. */
  private accept (conn: Duplex, listener: string, req?: IncomingMessage): void {
    const { metrics, logger } = this
    if (this.closing !== null) {
      conn.destroy()
      return
    }
    const max = this.config.limits.maxConnections
    if (this.connections.size >= max) {
      metrics.connectionsRefused.inc()
      if (!this.atConnectionLimit) logger.warn({ maxConnections: max }, 'connection limit reached (limits.maxConnections): refusing new connections')
      this.atConnectionLimit = true
      conn.on('error', () => {})
      conn.destroy()
      return
    }
    if (this.atConnectionLimit) logger.info({ maxConnections: max }, 'below the connection limit again: accepting connections')
    this.atConnectionLimit = false
    this.connections.add(conn)
    conn.once('close', () => this.connections.delete(conn))
    metrics.connectionsTotal.inc({ listener })
    let refused = false
    let client: Client | null = null
    const refuse = (reason: string, message: string): void => {
      if (refused) return
      refused = true
      metrics.protocolErrors.inc({ reason })
      logger.info({ listener, clientId: (conn as { client?: Client }).client?.id ?? null, err: message }, 'client connection closed on error')
    }
    const meter = meterConnection(conn, this.config.limits.maxPacketSize, {
      publishIn: (qos, size) => { metrics.messagesReceived.inc({ qos }); metrics.bytesReceived.inc({ qos }, size) },
      publishOut: (qos, size) => { metrics.messagesSent.inc({ qos }); metrics.bytesSent.inc({ qos }, size) },
      bytesIn: (n) => metrics.networkBytesReceived.inc(n),
      bytesOut: (n) => metrics.networkBytesSent.inc(n),
      refused: (err) => {
        // MQTT 5 has a reason code for it (the connection is destroyed right after; the 4 bytes
        // are handed to the socket first). 3.1.1 has none.
        if (err instanceof PacketTooLargeError && client?.version === 5 && client.connected) conn.write(DISCONNECT_PACKET_TOO_LARGE)
        refuse(err instanceof PacketTooLargeError ? 'packet_too_large' : 'malformed_packet', err.message)
      },
    })
    // ws refuses a message over maxPayload (= maxPacketSize) itself, before the meter sees a byte.
    const ws = (conn as { socket?: unknown }).socket
    if (ws instanceof WebSocket) {
      ws.on('error', (err: Error & { code?: string }) => {
        if (err.code === 'WS_ERR_UNSUPPORTED_MESSAGE_LENGTH') refuse('packet_too_large', `WebSocket message exceeds limits.maxPacketSize (${this.config.limits.maxPacketSize})`)
      })
    }
    this.meters.set(conn, meter)
    client = (this.aedes as Aedes).handle(conn, req)
    this.guardClient(client)
    installReceiveMaximum(client, {
      meter,
      maxBufferBytes: this.config.limits.maxClientBufferBytes,
      onOverflow: (c, bytes) => {
        if (this.noteSlow(c, bytes, 'closing its connection (messages held for its MQTT 5 Receive Maximum)')) this.metrics.protocolErrors.inc({ reason: 'slow_subscriber' })
      },
    })
  }

  /**
   * Closes, for one connection, what aedes 2.0.0-beta.1 left open of GHSA-52qw-whmv-87c5 (fixed in
   * 1.2.0): maps keyed by topic filters become null-prototype objects, and a SUBSCRIBE that lists
   * the filter "__proto__" among others has it replaced before aedes' own dedupe, which keys a
   * plain object by filter and would build garbage subscriptions and throw (a process crash).
   * The replaced filter is then refused in authorizeSubscribe.
   */
  private guardClient (client: Client): void {
    const raw = client as unknown as { subscriptions: object, _parser: NodeJS.EventEmitter }
    raw.subscriptions = Object.create(null) as object
    installExactDedupe(client)
    raw._parser.prependListener('packet', (packet: { cmd: string, subscriptions?: Array<{ topic: string }> }) => {
      if (packet.cmd !== 'subscribe' || packet.subscriptions === undefined || packet.subscriptions.length < 2) return
      for (const sub of packet.subscriptions) if (sub.topic === '__proto__') sub.topic = PROTO_FILTER
    })
  }

  private preConnect (client: Client, packet: ConnectPacket, done: (err: Error | null, ok: boolean) => void): void {
    if (packet.will !== undefined && packet.will !== null) {
      const problem = topicNameProblem(packet.will.topic, this.config.limits)
      if (problem !== null) {
        this.metrics.protocolErrors.inc({ reason: 'invalid_will_topic' })
        done(new Error(`will ${problem}`), false)
        return
      }
    }
    const willDelay = (packet.will as { properties?: { willDelayInterval?: number } } | undefined | null)?.properties?.willDelayInterval ?? 0
    const version = packet.protocolVersion ?? 4
    // limits.maxKeepaliveSeconds for MQTT 3.1/3.1.1, which cannot be told another keepalive: refused
    // with "identifier rejected", as Mosquitto's max_keepalive does. (aedes would answer return code
    // 6, which 3.1.1 reserves; the packet is given an accepted value so it does not, and
    // authenticate refuses it.)
    const maxKeepalive = this.config.limits.maxKeepaliveSeconds
    let keepaliveProblem: string | undefined
    const keepalive = packet.keepalive ?? 0
    if (version < 5 && maxKeepalive > 0 && (keepalive === 0 || keepalive > maxKeepalive)) {
      keepaliveProblem = `keepalive ${keepalive} s is not allowed: limits.maxKeepaliveSeconds is ${maxKeepalive} (and 0, no keepalive, is refused with it)`
      packet.keepalive = maxKeepalive
    }
    this.connectInfo.set(client, { clientId: packet.clientId, clean: packet.clean ?? true, version, bridge: (packet as { bridgeMode?: boolean }).bridgeMode === true, willDelay, keepaliveProblem })
    done(null, true)
  }

  private authenticate (client: Client, done: (err: (Error & { returnCode: number }) | null, ok: boolean | null) => void): void {
    const info = this.connectInfo.get(client)
    if (info !== undefined) {
      const problem = info.keepaliveProblem ?? (info.version === 3
        ? (info.clientId.length === 0 ? 'MQTT 3.1 needs a client identifier of 1 to 23 characters' : null)
        // MQTT 5 lets an empty identifier come with Clean Start 0 too: the broker assigns one.
        : clientIdProblem(info.clientId, info.clean || info.version === 5, this.config.limits.maxClientIdLength))
      if (problem !== null) {
        this.metrics.protocolErrors.inc({ reason: 'identifier_rejected' })
        this.logger.info({ clientId: info.clientId.slice(0, 64), reason: problem }, 'CONNECT refused: identifier rejected')
        done(Object.assign(new Error(problem), { returnCode: IDENTIFIER_REJECTED }), false)
        return
      }
      if (info.clean) {
        // GHSA-p8r9-qf8w-p73r (aedes 1.2.0 does this itself, 2.0.0-beta.1 does not): a clean start
        // forgets the old session's inbound QoS 2 state, or a new message reusing one of its packet
        // ids would be taken for a re-send and lost.
        this.cleanIncoming(client).then(() => done(null, true), (err: Error) => {
          this.logger.warn({ clientId: client.id, err: err.message }, 'CONNECT refused: the old session\'s QoS 2 state could not be cleared')
          done(Object.assign(new Error(`store write failed: ${err.message}`), { returnCode: SERVER_UNAVAILABLE }), false)
        })
        return
      }
    }
    done(null, true)
  }

  private async cleanIncoming (client: Client): Promise<void> {
    const persistence = (this.aedes as unknown as { persistence: Required<GuardedPersistence> } | null)?.persistence
    await persistence?.cleanIncoming(client as unknown as { id: string })
  }

  private authorizePublish (client: Client | null, packet: PublishPacket, done: (err?: Error | null) => void): void {
    if (client === null) return done(null) // the broker's own messages ($SYS, wills)
    // Stopping: nothing more is acknowledged (the client sends it again to the next process).
    if (this.closing !== null && packet.qos > 0) return this.notTaken(client, done, new Error('PUBLISH refused: the broker is stopping'), SERVER_SHUTTING_DOWN)
    const topic = packet.topic
    const problem = topicNameProblem(topic, this.config.limits) ??
      (topic.startsWith('$SYS/') || topic === '$SYS' ? 'topic $SYS is reserved for the broker' : null)
    if (problem !== null) {
      this.metrics.messagesDropped.inc({ reason: 'invalid_topic' })
      return done(new Error(`PUBLISH refused: ${problem}`))
    }
    // A bridge with outbox.whenFull: reject and a full outbox: the message is not taken (not acknowledged).
    const refusing = this.bridges.find((b) => b.refuses(packet as LocalMessage))
    if (refusing !== undefined) return this.notTaken(client, done, new Error(`PUBLISH refused: bridge ${refusing.name}'s outbox is full (outbox.whenFull: reject)`), QUOTA_EXCEEDED)
    if (this.connectInfo.get(client)?.bridge === true) this.publishedByBridge.set(packet.payload as Buffer, client)
    const wait = this.publishDelay(client)
    const held = this.throttled.get(client)
    if (wait <= 0 && held === undefined) {
      this.afterThrottle(client, packet, done)
      return
    }
    // Over limits.maxPublishRate: answered later, so the client is slowed down without anything
    // being dropped. Held messages are let go in arrival order: one computed to wait less (the
    // event loop was busy, time moved on) still waits behind the ones held before it.
    const item = { packet, done, due: performance.now() + Math.max(0, wait) }
    if (held !== undefined) {
      held.push(item)
      return
    }
    const queue = [item]
    this.throttled.set(client, queue)
    const release = (): void => {
      const now = performance.now()
      while (queue.length > 0 && (queue[0] as typeof item).due <= now + 0.5) {
        const next = queue.shift() as typeof item
        this.afterThrottle(client, next.packet, next.done)
      }
      if (queue.length === 0) {
        this.throttled.delete(client)
        return
      }
      setTimeout(release, Math.max(1, Math.ceil((queue[0] as typeof item).due - now)))
    }
    setTimeout(release, Math.ceil(wait))
  }

  /**
   * A PUBLISH refused for a reason that passes (the store, a full outbox, a stop): it must be sent
   * again, not dropped. An MQTT 3.1.1 client is disconnected by done(err) and re-sends on
   * reconnect. For MQTT 5, aedes would answer done(err) with PUBACK/PUBREC 0x87 "Not authorized",
   * a final refusal the client does not retry: so the connection is closed first with a
   * DISCONNECT naming the reason, and the client re-sends the message when it reconnects.
   */
  private notTaken (client: Client, done: (err?: Error | null) => void, err: Error, reasonCode: number): void {
    if (client.version !== 5) return done(err)
    this.logger.debug({ clientId: client.id, reasonCode, err: err.message }, 'MQTT 5 client disconnected: its PUBLISH was not taken and must be sent again')
    client.disconnect({ reasonCode, properties: { reasonString: err.message.slice(0, 200) } }, () => done(err))
  }

  /**
   * Milliseconds to hold this client's PUBLISH back under limits.maxPublishRate (0: none), by the
   * generic cell rate algorithm: each message moves the client's theoretical arrival time on by
   * 1/rate; up to one second ahead of now passes at once (the burst). Successive messages of one
   * client get non-decreasing delays, so their order holds.
   */
  private publishDelay (client: Client): number {
    const rate = this.config.limits.maxPublishRate
    if (rate === 0) return 0
    const now = performance.now()
    const tat = Math.max(this.arrival.get(client) ?? now, now)
    this.arrival.set(client, tat + 1000 / rate)
    const wait = tat - now - 1000
    if (wait <= 0) return 0
    this.metrics.publishThrottled.inc()
    if (!this.throttleLogged.has(client)) {
      this.throttleLogged.add(client)
      this.logger.info({ clientId: client.id, maxPublishRate: rate }, 'client publishes faster than limits.maxPublishRate: its messages are taken more slowly')
    }
    return Math.ceil(wait)
  }

  private afterThrottle (client: Client, packet: PublishPacket, done: (err?: Error | null) => void): void {
    // aedes sends the QoS 1 PUBACK as soon as this returns, before its pipeline stores anything:
    // journal the message first, so an acknowledged message survives a crash in between.
    // (QoS 2 is acknowledged only after the pipeline; LevelPersistence marks it queued atomically.)
    const gate = this.publishGate
    if (gate !== null) {
      // Messages acknowledged before a store failure are being published again: newer ones wait.
      gate.then(() => this.journalThenAck(client, packet, done), () => this.journalThenAck(client, packet, done))
      return
    }
    this.journalThenAck(client, packet, done)
  }

  /** Journals a QoS 1 PUBLISH before aedes acknowledges it (done(null)); a failed write is never acknowledged. */
  private journalThenAck (client: Client, packet: PublishPacket, done: (err?: Error | null) => void): void {
    const persistence = this.persistence
    if (packet.qos !== 1 || persistence === null) return done(null)
    persistence.journalAppend(packet as JournalPacket).then((entryKey) => {
      (packet as unknown as Record<symbol, Buffer>)[JOURNAL_KEY] = entryKey
      this.journaled.add(entryKey.toString('hex'))
      this.lastJournalKey = entryKey
      done(null)
    }, (err: Error) => {
      // Counted by the store observer (ferrymq_store_write_errors_total); the store logs its failure once.
      this.logger.debug({ clientId: client.id, topic: packet.topic, err: err.message }, 'QoS 1 message not acknowledged: store write failed, client disconnected')
      this.notTaken(client, done, new Error(`store write failed: ${err.message}`), UNSPECIFIED_ERROR)
    })
  }

  /** aedes' last pipeline step: the message's retained and queue copies are stored, so its journal entry can go. */
  private published (packet: AedesPublishPacket, done: (err?: Error | null) => void): void {
    if (this.bridges.length === 0) {
      this.afterBridges(packet, done)
      return
    }
    // Each bridge whose out-mappings take the message appends it to its outbox; a QoS 1/2 message
    // is acknowledged (QoS 2) or leaves the journal (QoS 1) only once those appends are written.
    const appends: Promise<void>[] = []
    for (const b of this.bridges) {
      const routed = b.route(packet as LocalMessage)
      if (routed !== null) appends.push(b.enqueue(routed, this.bridgedMark(packet.payload, b)))
    }
    if (appends.length === 0) {
      this.afterBridges(packet, done)
      return
    }
    const all = Promise.all(appends)
    // An inbound QoS 2 message: a re-send of it arriving meanwhile waits for these appends.
    if (packet.qos === 2) this.persistence?.noteBridging(packet.payload, all)
    if (packet.qos === 0) {
      all.catch(() => {}) // counted and logged by the bridge
      this.afterBridges(packet, done)
      return
    }
    all.then(() => this.afterBridges(packet, done), (err: Error) => {
      // Not in every outbox: the message stays journaled (QoS 1, published again at the next
      // start) or is not acknowledged (QoS 2).
      this.logger.debug({ topic: packet.topic, err: err.message }, 'message not appended to a bridge outbox')
      done(err)
    })
  }

  /** The op marking, in the batch that appends it to `bridge`'s outbox, that an inbound QoS 2 message is there. */
  private bridgedMark (payload: unknown, bridge: Bridge): StoreOp[] {
    const op = this.persistence?.bridgedMarkOp(payload, bridge.name)
    return op === undefined ? [] : [op]
  }

  private afterBridges (packet: AedesPublishPacket, done: (err?: Error | null) => void): void {
    const entryKey = (packet as unknown as Record<symbol, Buffer | undefined>)[JOURNAL_KEY]
    if (entryKey !== undefined && this.persistence !== null) {
      this.journaled.delete(entryKey.toString('hex'))
      if (this.journaled.size === 0) this.onJournalDrained?.()
      this.persistence.journalDelete(entryKey).catch((err: Error) => {
        // Left in the journal, the message is published again at the next start: a duplicate, not a loss.
        this.logger.warn({ err: err.message }, 'journal entry not deleted; it will be replayed at the next start')
      })
    }
    done(null)
  }

  /** Publishes again what was acknowledged but not stored before the last stop (at-least-once), then forgets it. */
  private async replayJournal (aedes: Aedes, persistence: LevelPersistence, upTo?: Buffer): Promise<number> {
    let replayed = 0
    for await (const { key, packet } of persistence.journalEntries()) {
      if (upTo !== undefined && Buffer.compare(key, upTo) > 0) break
      this.journaled.delete(key.toString('hex'))
      await new Promise<void>((resolve, reject) => aedes.publish(packet as unknown as PublishPacket, (err?: Error | null) => (err ? reject(err) : resolve())))
      await persistence.journalDelete(key)
      replayed++
    }
    if (replayed > 0 && upTo === undefined) {
      this.metrics.journalReplayed.inc(replayed)
      this.logger.info({ replayed }, 'published again the messages acknowledged but not stored before the last stop')
    }
    return replayed
  }

  /** Resolves once no journaled message is still in its pipeline, or after `ms`. */
  private async journalDrained (ms: number): Promise<void> {
    if (this.journaled.size === 0) return
    const pending = this.journaled.size
    let timer: NodeJS.Timeout | undefined
    await new Promise<void>((resolve) => {
      this.onJournalDrained = resolve
      timer = setTimeout(resolve, ms)
    })
    clearTimeout(timer)
    this.onJournalDrained = null
    if (this.journaled.size > 0) {
      this.logger.warn({ pending, left: this.journaled.size }, 'stopping with acknowledged messages not yet stored everywhere: they are published again at the next start')
    }
  }

  /** Logs, counts and acts on what the store reports. */
  private storeObserver (): StoreObserver {
    const { metrics, logger } = this
    return {
      batch: (ops, writes, seconds) => {
        metrics.storeBatches.inc()
        metrics.storeWrites.inc(writes)
        metrics.storeBatchOps.observe(ops)
        metrics.storeBatchSeconds.observe(seconds)
      },
      failed: (_err, writes) => metrics.storeWriteErrors.inc(writes),
      refused: () => metrics.storeWriteErrors.inc(),
      unavailable: (err) => {
        logger.error({ err: err.message }, 'store write failed: nothing is acknowledged (clients that publish QoS 1/2 are disconnected) until the store takes writes again; retrying')
      },
      recoveryFailed: (err, attempt) => {
        // Attempts 1, 2, 4, 8, …: the back-off tops out at 10 s, so this stays a few lines an hour.
        if ((attempt & (attempt - 1)) === 0) logger.warn({ err: err.message, attempt }, 'store still refuses writes; retrying')
      },
      recovered: (downSeconds, attempts) => {
        metrics.storeRecoveries.inc()
        logger.info({ downSeconds: Math.round(downSeconds * 1000) / 1000, attempts }, 'store takes writes again')
        this.replayAfterFailure()
      },
      damaged: (damage) => {
        metrics.storeDamaged.inc({ action: damage.action })
        if (damage.action === 'repaired') {
          logger.error({ err: damage.error.message }, 'the store was damaged; LevelDB repaired it (what it could not read is lost)')
        } else {
          logger.error({ err: damage.error.message, repairError: damage.repairError?.message, quarantineDir: damage.quarantineDir },
            'the store was damaged beyond repair: moved aside to the quarantine directory, starting with an empty store')
        }
      },
    }
  }

  /**
   * After a store failure: messages acknowledged (journaled) before it whose copies may not have
   * been stored are published again (at-least-once), before any newer PUBLISH is taken.
   */
  private replayAfterFailure (): void {
    const { aedes, persistence } = this
    const upTo = this.lastJournalKey
    if (aedes === null || persistence === null || upTo === null || this.closing !== null) return
    const gate = this.replayJournal(aedes, persistence, upTo).then((replayed) => {
      if (replayed === 0) return
      this.metrics.journalReplayed.inc(replayed)
      this.logger.info({ replayed }, 'published again the messages acknowledged before the store failure')
    }, (err: Error) => {
      this.logger.error({ err: err.message }, 'journal replay after the store failure did not finish; the rest is replayed at the next start')
    }).finally(() => {
      if (this.publishGate === gate) this.publishGate = null
    })
    this.publishGate = gate
  }

  /**
   * A filter FerryMQ refuses: MQTT 5 clients get SUBACK 0x87 for it and stay connected; MQTT 3.1.1
   * clients are disconnected, as before, except for "__proto__", which gets SUBACK 0x80 (it worked
   * on aedes 1.2.0; aedes 2.0.0-beta.1 would crash on it, see guardClient).
   */
  private authorizeSubscribe<S extends { topic: string }> (client: Client, sub: S, done: (err: Error | null, sub?: S | null) => void): void {
    const proto = sub.topic === '__proto__' || sub.topic === PROTO_FILTER
    const problem = proto ? 'the topic filter "__proto__" is not supported' : topicFilterProblem(sub.topic, this.config.limits)
    if (problem === null) return done(null, sub)
    this.refusedSubs.add(sub)
    if (proto || client.version === 5) {
      this.logger.info({ clientId: client.id, err: problem }, 'SUBSCRIBE refused for one filter (SUBACK failure code)')
      return done(null, null)
    }
    done(new Error(`SUBSCRIBE refused: ${problem}`))
  }

  /** Called by aedes for every delivery to a connected client: the slow-subscriber bound, then the QoS cap. */
  private authorizeForward (client: Client, packet: AedesPublishPacket): AedesPublishPacket | null {
    // A bridge (CONNECT with the bridge flag) does not get its own messages back, as in Mosquitto.
    if (this.publishedByBridge.get(packet.payload as Buffer) === client) return null
    // MQTT 5: a message larger than the client's Maximum Packet Size is discarded, as if it had been
    // sent [MQTT-3.1.2-24/25] (aedes sends it, and the client would have to disconnect).
    const maxSize = client.version === 5 ? client.maximumPacketSize : undefined
    if (maxSize !== undefined && maxSize > 0 && publishSize(packet) > maxSize) {
      this.metrics.messagesDropped.inc({ reason: 'too_large_for_client' })
      if (!this.slowLogged.has(client.conn)) {
        this.slowLogged.add(client.conn)
        this.logger.info({ clientId: client.id, maximumPacketSize: maxSize, topic: packet.topic }, 'message larger than the client\'s Maximum Packet Size: not sent to it (counted; logged once per connection)')
      }
      return null
    }
    // aedes keeps handing deliveries to a connection that has just gone; each write would build an
    // ERR_STREAM_DESTROYED error (7 % of CPU in a profiled fan-in run when its subscriber left).
    // QoS 0 is simply skipped; QoS 1/2 go on so aedes keeps its queue bookkeeping for the session.
    if (packet.qos === 0 && client.conn.destroyed) return null
    const pending = this.meters.get(client.conn)?.pendingBytes() ?? 0
    if (pending > this.config.limits.maxClientBufferBytes) {
      if (packet.qos === 0) {
        this.metrics.messagesDropped.inc({ reason: 'slow_subscriber' })
        this.noteSlow(client, pending, 'dropping QoS 0 messages to it')
        return null
      }
      // QoS 1/2 must not be dropped, nor buffered without end: close the connection. A persistent
      // session still holds the message in its queue and gets it on reconnect.
      if (this.noteSlow(client, pending, 'closing its connection')) this.metrics.protocolErrors.inc({ reason: 'slow_subscriber' })
      client.conn.destroy(new Error(`slow subscriber: ${pending} bytes unsent, over limits.maxClientBufferBytes`))
      return packet
    }
    return this.capQoS(client, packet)
  }

  /** A persistent session's queue is full: per limits.queueFullPolicy a message is dropped; counted and logged. */
  private queueFull (event: QueueFullEvent): void {
    this.metrics.messagesDropped.inc({ reason: 'queue_full' }, event.dropped)
    const now = Date.now()
    const last = this.queueFullLogged.get(event.clientId)
    if (last !== undefined && now - last < 10_000) return
    if (this.queueFullLogged.size >= 10_000) {
      // Many sessions full at once: forget the old entries so this map stays bounded too.
      for (const [clientId, at] of this.queueFullLogged) if (now - at >= 10_000) this.queueFullLogged.delete(clientId)
    }
    this.queueFullLogged.set(event.clientId, now)
    const setting = event.limit === 'messages' ? 'limits.maxQueuedMessages' : 'limits.maxQueuedBytes'
    this.logger.warn({ clientId: event.clientId, limit: setting, max: event.max, policy: event.policy, dropped: event.dropped },
      event.which === 'new'
        ? `session queue full (${setting}): new messages for it are dropped and counted`
        : `session queue full (${setting}): its oldest unsent messages are dropped and counted`)
  }

  /** Publishes a message that came in through a bridge; resolves once every local copy is stored. */
  private async publishLocal (bridge: Bridge, message: { topic: string, payload: Buffer, qos: 0 | 1 | 2, retain: boolean, properties?: LocalMessage['properties'], onQueued?: StoreOp[] }): Promise<void> {
    const aedes = this.aedes
    if (aedes === null || aedes.closed) throw new Error('the broker is stopping')
    bridge.markInjected(message.payload)
    if (message.onQueued !== undefined) this.persistence?.writeWithQueued(message.payload, message.onQueued)
    // MQTT 5 properties from the upstream go with it (aedes turns the expiry interval into a deadline).
    const packet = { cmd: 'publish' as const, topic: message.topic, payload: message.payload, qos: message.qos, retain: message.retain, dup: false, ...(message.properties === undefined ? {} : { properties: message.properties }) }
    await new Promise<void>((resolve, reject) => aedes.publish(packet as PublishPacket, (err?: Error | null) => (err ? reject(err) : resolve())))
  }

  /** Logs a slow subscriber once per connection; true the first time. */
  private noteSlow (client: Client, pending: number, action: string): boolean {
    if (this.slowLogged.has(client)) return false
    this.slowLogged.add(client)
    this.logger.warn({ clientId: client.id, pendingBytes: pending, maxClientBufferBytes: this.config.limits.maxClientBufferBytes },
      `slow subscriber: unsent data over limits.maxClientBufferBytes, ${action}`)
    return true
  }

  /**
   * Delivers at most at the QoS the matching subscription granted [MQTT-3.8.4-6]. aedes downgrades
   * only when the filter equals the topic, so a QoS 2 message reached a QoS 1 `a/#` subscriber as
   * QoS 2. With overlapping subscriptions the highest granted QoS wins [MQTT-3.3.5-1].
   */
  private capQoS (client: Client, packet: AedesPublishPacket): AedesPublishPacket {
    if (packet.qos === 0) return packet
    const subs = (client as unknown as { subscriptions: Record<string, { qos: number }> }).subscriptions
    let granted = -1
    for (const filter in subs) {
      if (topicMatches(filter, packet.topic)) granted = Math.max(granted, (subs[filter] as { qos: number }).qos)
    }
    return granted < 0 || granted >= packet.qos ? packet : { ...packet, qos: granted as 0 | 1 }
  }

  private watchClients (aedes: Aedes): void {
    const { logger, metrics } = this
    aedes.on('clientReady', (client) => logger.debug({ clientId: client.id }, 'client connected'))
    aedes.on('clientDisconnect', (client) => logger.debug({ clientId: client.id }, 'client disconnected'))
    aedes.on('keepaliveTimeout', (client) => logger.info({ clientId: client.id }, 'keepalive timeout: client closed'))
    // aedes reports a closing connection's error once per write still pending (a drain timeout can
    // come hundreds of times): count and log only the first.
    const reported = new WeakSet<Client>()
    const onError = (client: Client | null, err: Error): void => {
      // Counted and logged by accept() (over WebSocket, these errors do not reach aedes).
      if (err instanceof PacketTooLargeError || err instanceof MalformedFramingError) return
      if (client !== null) {
        if (reported.has(client)) return
        reported.add(client)
      }
      if (err.message === 'drain timeout') metrics.protocolErrors.inc({ reason: 'drain_timeout' })
      // A peer that goes away without DISCONNECT is routine on a network of devices: debug, not info.
      const routine = /^(connection closed|read ECONNRESET|write EPIPE|This socket has been ended|stream.push\(\) after EOF)/.test(err.message)
      logger[routine ? 'debug' : 'info']({ clientId: client?.id ?? null, err: err.message }, 'client connection closed on error')
    }
    aedes.on('clientError', onError)
    aedes.on('connectionError', onError)
    // aedes emits 'error' from its will sweep; an EventEmitter without a listener would throw it.
    ;(aedes as unknown as NodeJS.EventEmitter).on('error', (err: Error) => logger.error({ err: err.message }, 'broker error'))
  }

  private countSubscriptions (): number {
    let n = 0
    // aedes keeps each connected client's subscriptions on the client (not in its typings).
    if (this.aedes === null) return 0
    const clients = (this.aedes as unknown as { clients: Record<string, { subscriptions: object }> }).clients
    for (const id in clients) n += Object.keys((clients[id] as { subscriptions: object }).subscriptions).length
    return n
  }

  private async countRetained (): Promise<number> {
    const persistence = (this.aedes as unknown as { persistence?: { createRetainedStreamCombi (patterns: string[]): AsyncIterable<{ topic: string }> } }).persistence
    if (persistence === undefined) return 0
    let n = 0
    try {
      for await (const packet of persistence.createRetainedStreamCombi(['#'])) if (!packet.topic.startsWith('$')) n++
    } catch {
      // The store is re-opening after a write failure: report what was last counted.
      return this.retainedCounted
    }
    this.retainedCounted = n
    return n
  }
}

/** The size on the wire of `packet` as an MQTT 5 PUBLISH (Infinity if it cannot be encoded). */
function publishSize (packet: AedesPublishPacket): number {
  const { topic, payload, qos, retain, properties } = packet
  try {
    return mqttPacket.generate({ cmd: 'publish', topic, payload, qos, retain, dup: false, messageId: qos > 0 ? 1 : undefined, properties } as Parameters<typeof mqttPacket.generate>[0], { protocolVersion: 5 }).length
  } catch {
    return Infinity
  }
}

/** Bytes of the files under `dir`, quarantine directories left out. */
async function directorySize (dir: string): Promise<number> {
  let total = 0
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    if (entry.isFile()) total += (await stat(join(dir, entry.name)).catch(() => ({ size: 0 }))).size
  }
  return total
}

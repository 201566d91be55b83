import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client'

/** Where the store gauges read from (absent for `durability: memory`). */
export interface StoreSources {
  /** Bytes of the store's files on disk (quarantined copies not included). */
  sizeBytes (): Promise<number>
  /** 1 while the store takes writes, 0 from a failed write until it has recovered. */
  available (): number
  /** Inbound messages acknowledged and journaled whose copies are not all stored yet. */
  journalDepth (): number
  /** Messages and bytes waiting in every persistent session's queue. */
  queued (): { messages: number, bytes: number }
}

/** What the per-bridge gauges read, one entry per configured bridge. */
export interface BridgeSources {
  name: string
  connected (): boolean
  outbox (): { messages: number, bytes: number }
  oldestAgeMs (): Promise<number>
}

/** Every Prometheus metric FerryMQ exports, on its own registry so brokers in one process stay apart. */
export class Metrics {
  readonly registry = new Registry()

  readonly connectionsTotal = new Counter({ name: 'ferrymq_connections_total', help: 'Network connections accepted, by listener', labelNames: ['listener'] as const, registers: [this.registry] })
  readonly connectionsRefused = new Counter({ name: 'ferrymq_connections_refused_total', help: 'Connections closed at once because limits.maxConnections was reached', registers: [this.registry] })
  readonly messagesReceived = new Counter({ name: 'ferrymq_messages_received_total', help: 'PUBLISH packets received from clients, by QoS', labelNames: ['qos'] as const, registers: [this.registry] })
  readonly messagesSent = new Counter({ name: 'ferrymq_messages_sent_total', help: 'PUBLISH packets sent to clients, by QoS', labelNames: ['qos'] as const, registers: [this.registry] })
  readonly bytesReceived = new Counter({ name: 'ferrymq_publish_bytes_received_total', help: 'Bytes of PUBLISH packets received, by QoS', labelNames: ['qos'] as const, registers: [this.registry] })
  readonly bytesSent = new Counter({ name: 'ferrymq_publish_bytes_sent_total', help: 'Bytes of PUBLISH packets sent, by QoS', labelNames: ['qos'] as const, registers: [this.registry] })
  readonly networkBytesReceived = new Counter({ name: 'ferrymq_network_bytes_received_total', help: 'MQTT bytes read from all connections', registers: [this.registry] })
  readonly networkBytesSent = new Counter({ name: 'ferrymq_network_bytes_sent_total', help: 'MQTT bytes written to all connections', registers: [this.registry] })
  readonly messagesDropped = new Counter({ name: 'ferrymq_messages_dropped_total', help: 'Messages the broker refused or could not deliver, by reason', labelNames: ['reason'] as const, registers: [this.registry] })
  readonly storeWriteErrors = new Counter({ name: 'ferrymq_store_write_errors_total', help: 'Store writes that failed; the message they carried was not acknowledged', registers: [this.registry] })
  readonly journalReplayed = new Counter({ name: 'ferrymq_journal_replayed_total', help: 'Inbound messages acknowledged before a crash and published again at start-up from the journal', registers: [this.registry] })
  readonly sessionsExpired = new Counter({ name: 'ferrymq_sessions_expired_total', help: 'Persistent sessions ended by limits.sessionExpirySeconds', registers: [this.registry] })
  readonly protocolErrors = new Counter({ name: 'ferrymq_protocol_errors_total', help: 'Connections closed for a protocol violation or limit, by reason', labelNames: ['reason'] as const, registers: [this.registry] })
  readonly publishThrottled = new Counter({ name: 'ferrymq_publish_throttled_total', help: 'PUBLISH packets held back because their client was over limits.maxPublishRate', registers: [this.registry] })
  readonly storeBatches = new Counter({ name: 'ferrymq_store_batches_total', help: 'Batches the group-commit writer wrote to LevelDB', registers: [this.registry] })
  readonly storeWrites = new Counter({ name: 'ferrymq_store_writes_total', help: 'Store writes (persistence calls) written; several share a batch', registers: [this.registry] })
  readonly storeBatchOps = new Histogram({ name: 'ferrymq_store_batch_operations', help: 'LevelDB operations per batch', buckets: [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096], registers: [this.registry] })
  readonly storeBatchSeconds = new Histogram({ name: 'ferrymq_store_batch_seconds', help: 'Time to write one batch (with durability fsync: the fsync latency)', buckets: [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1], registers: [this.registry] })
  readonly storeRecoveries = new Counter({ name: 'ferrymq_store_recoveries_total', help: 'Times the store took writes again after a write failure', registers: [this.registry] })
  readonly storeDamaged = new Counter({ name: 'ferrymq_store_damaged_total', help: 'Damaged stores found at start-up, by what was done: repaired, or quarantined (moved aside, started empty)', labelNames: ['action'] as const, registers: [this.registry] })
  readonly bridgeForwarded = new Counter({ name: 'ferrymq_bridge_forwarded_total', help: 'Messages a bridge carried: out = acknowledged by the upstream, in = published locally', labelNames: ['bridge', 'direction'] as const, registers: [this.registry] })
  readonly bridgeDropped = new Counter({ name: 'ferrymq_bridge_dropped_total', help: 'Outbound bridge messages dropped, by reason: outbox_full (drop-oldest made room, or reject refused it), upstream_refused (PUBACK/PUBREC with an error reason code)', labelNames: ['bridge', 'reason'] as const, registers: [this.registry] })
  readonly bridgeExpired = new Counter({ name: 'ferrymq_bridge_expired_total', help: 'Outbound bridge messages dropped unsent past outbox.maxAgeSeconds or their MQTT 5 message expiry', labelNames: ['bridge'] as const, registers: [this.registry] })
  readonly bridgeReconnects = new Counter({ name: 'ferrymq_bridge_reconnects_total', help: 'Connection attempts a bridge made after the first', labelNames: ['bridge'] as const, registers: [this.registry] })
  readonly bridgeRtt = new Histogram({ name: 'ferrymq_bridge_rtt_seconds', help: 'Time from sending a message upstream to its PUBACK / PUBCOMP', labelNames: ['bridge'] as const, buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10], registers: [this.registry] })
  readonly clientsConnected: Gauge
  readonly subscriptions: Gauge
  readonly retainedMessages: Gauge

  constructor (sources: { clientsConnected: () => number, subscriptions: () => number, retainedMessages: () => Promise<number>, store: () => StoreSources | null, bridges?: () => readonly BridgeSources[] }) {
    collectDefaultMetrics({ register: this.registry, prefix: 'ferrymq_' })
    this.clientsConnected = new Gauge({
      name: 'ferrymq_clients_connected',
      help: 'MQTT clients connected now',
      registers: [this.registry],
      collect () { this.set(sources.clientsConnected()) },
    })
    this.subscriptions = new Gauge({
      name: 'ferrymq_subscriptions',
      help: 'Subscriptions held by connected clients',
      registers: [this.registry],
      collect () { this.set(sources.subscriptions()) },
    })
    this.retainedMessages = new Gauge({
      name: 'ferrymq_retained_messages',
      help: 'Retained messages stored',
      registers: [this.registry],
      async collect () { this.set(await sources.retainedMessages()) },
    })
    new Gauge({
      name: 'ferrymq_store_size_bytes',
      help: 'Bytes of the LevelDB store on disk',
      registers: [this.registry],
      async collect () { this.set(await sources.store()?.sizeBytes() ?? 0) },
    })
    new Gauge({
      name: 'ferrymq_store_available',
      help: '1 while the store takes writes; 0 after a write failure until it has recovered (nothing is acknowledged meanwhile)',
      registers: [this.registry],
      collect () { this.set(sources.store()?.available() ?? 1) },
    })
    new Gauge({
      name: 'ferrymq_journal_depth',
      help: 'Inbound QoS 1 messages acknowledged and journaled whose copies are not all stored yet',
      registers: [this.registry],
      collect () { this.set(sources.store()?.journalDepth() ?? 0) },
    })
    new Gauge({
      name: 'ferrymq_queued_messages',
      help: 'Messages waiting in persistent sessions\' queues',
      registers: [this.registry],
      collect () { this.set(sources.store()?.queued().messages ?? 0) },
    })
    new Gauge({
      name: 'ferrymq_queued_bytes',
      help: 'Bytes of the messages waiting in persistent sessions\' queues',
      registers: [this.registry],
      collect () { this.set(sources.store()?.queued().bytes ?? 0) },
    })
    const bridges = sources.bridges ?? (() => [])
    new Gauge({
      name: 'ferrymq_bridge_connected',
      help: '1 while the bridge is connected to its upstream, else 0',
      labelNames: ['bridge'] as const,
      registers: [this.registry],
      collect () { for (const b of bridges()) this.set({ bridge: b.name }, b.connected() ? 1 : 0) },
    })
    new Gauge({
      name: 'ferrymq_bridge_outbox_messages',
      help: 'Messages in the bridge\'s outbox (waiting or in flight to the upstream)',
      labelNames: ['bridge'] as const,
      registers: [this.registry],
      collect () { for (const b of bridges()) this.set({ bridge: b.name }, b.outbox().messages) },
    })
    new Gauge({
      name: 'ferrymq_bridge_outbox_bytes',
      help: 'Bytes of the messages in the bridge\'s outbox',
      labelNames: ['bridge'] as const,
      registers: [this.registry],
      collect () { for (const b of bridges()) this.set({ bridge: b.name }, b.outbox().bytes) },
    })
    new Gauge({
      name: 'ferrymq_bridge_outbox_oldest_age_seconds',
      help: 'Age of the oldest message in the bridge\'s outbox (0 when empty)',
      labelNames: ['bridge'] as const,
      registers: [this.registry],
      async collect () { for (const b of bridges()) this.set({ bridge: b.name }, (await b.oldestAgeMs()) / 1000) },
    })
  }
}

import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client'

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
  readonly clientsConnected: Gauge
  readonly subscriptions: Gauge
  readonly retainedMessages: Gauge

  constructor (sources: { clientsConnected: () => number, subscriptions: () => number, retainedMessages: () => Promise<number> }) {
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
  }
}

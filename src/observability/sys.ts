import type { Counter, Gauge } from 'prom-client'
import type { Metrics } from './metrics.js'

/** Publishes one $SYS message (QoS 0). */
export type SysPublish = (topic: string, payload: string) => void

async function total (metric: Counter | Gauge): Promise<number> {
  const { values } = await metric.get()
  return values.reduce((sum, v) => sum + v.value, 0)
}

/**
 * Mosquitto-style broker statistics under `$SYS/broker/`, published every `intervalSeconds`. Values
 * come from the same counters as /metrics. They are not retained: aedes' retained lookup would hand
 * retained `$SYS` messages to `#` subscribers, against [MQTT-4.7.2-1].
 */
export class SysPublisher {
  private timer: NodeJS.Timeout | null = null
  private stopped = false
  private readonly startedAt = Date.now()

  constructor (
    private readonly metrics: Metrics,
    private readonly publish: SysPublish,
    private readonly version: string,
    /** More statistics to publish on each tick (the bridges'). */
    private readonly more: () => Promise<void> = async () => {},
  ) {}

  /** Publishes one message under $SYS now (for figures published when they change). */
  publishRaw (topic: string, payload: string): void {
    if (!this.stopped) this.publish(topic, payload)
  }

  start (intervalSeconds: number): void {
    if (intervalSeconds === 0) return
    void this.tick()
    this.timer = setInterval(() => void this.tick(), intervalSeconds * 1000)
    this.timer.unref()
  }

  stop (): void {
    this.stopped = true
    if (this.timer !== null) clearInterval(this.timer)
    this.timer = null
  }

  private async tick (): Promise<void> {
    const m = this.metrics
    const stats: [string, number][] = [
      ['uptime', Math.floor((Date.now() - this.startedAt) / 1000)],
      ['clients/connected', await total(m.clientsConnected)],
      ['messages/received', await total(m.messagesReceived)],
      ['messages/sent', await total(m.messagesSent)],
      ['messages/dropped', await total(m.messagesDropped)],
      ['bytes/received', await total(m.networkBytesReceived)],
      ['bytes/sent', await total(m.networkBytesSent)],
    ]
    if (this.stopped) return
    this.publish('$SYS/broker/version', `FerryMQ ${this.version}`)
    for (const [topic, value] of stats) this.publish(`$SYS/broker/${topic}`, String(value))
    await this.more()
  }
}

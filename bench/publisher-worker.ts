import { parentPort, workerData } from 'node:worker_threads'
import { PUBACK, PUBCOMP, PUBREC, PUBREL, ackPacket, messageIdOffset, openSession, publishPacket, type Protocol, type Session } from './wire.js'

/** What a publisher worker is asked to do. */
export interface PublisherJob {
  port: number
  connections: number
  clientIdPrefix: string
  /** Topic for connection i: `${topicPrefix}${i}`. */
  topicPrefix: string
  qos: 0 | 1 | 2
  payloadSize: number
  /** QoS 1/2: messages in flight per connection. */
  window: number
  durationMs: number
  /** Messages per second over all connections; 0 means as fast as the broker takes them. */
  rate: number
  /** Put process.hrtime.bigint() in the first 8 payload bytes (latency runs). */
  timestamp: boolean
  /** MQTT version of the connections (default 4, 3.1.1). */
  protocol?: Protocol
}

export interface PublisherResult { sent: number, acked: number, errors: string[] }

const QOS0_BATCH = 64

class Publisher {
  sent = 0
  acked = 0
  private inflight = 0
  private nextId = 1
  private readonly template: Buffer
  private readonly idAt: number
  private readonly payloadAt: number
  private readonly batch0: Buffer
  /** QoS 1/2: the job's window, or an MQTT 5 broker's Receive Maximum if that is lower. */
  private readonly window: number
  stopped = false

  constructor (private readonly session: Session, private readonly job: PublisherJob, topic: string, errors: string[]) {
    this.template = publishPacket(topic, Buffer.alloc(job.payloadSize, 0x61), job.qos, 1, session.protocol)
    this.idAt = job.qos > 0 ? messageIdOffset(this.template) : -1
    this.payloadAt = this.template.length - job.payloadSize
    this.batch0 = Buffer.concat(Array.from({ length: QOS0_BATCH }, () => this.template))
    this.window = Math.min(job.window, session.receiveMaximum)
    if (session.protocol === 5) {
      this.onFrames5(errors)
      return
    }
    session.onFrame((type, _flags, body) => {
      const id = body.readUInt16BE(0)
      if (type === PUBACK || type === PUBCOMP) {
        this.inflight--
        this.acked++
        if (this.job.rate === 0 && !this.stopped) this.fillWindow()
      } else if (type === PUBREC) {
        this.session.socket.write(ackPacket(PUBREL, id))
      }
    })
  }

  /**
   * MQTT 5: as for 3.1.1, but a PUBACK or PUBREC may carry a reason code after the identifier. A
   * refusal (0x80 and up) ends that message's exchange (no PUBREL after a refused PUBREC) and is
   * reported as an error.
   */
  private onFrames5 (errors: string[]): void {
    this.session.onFrame((type, _flags, body) => {
      const id = body.readUInt16BE(0)
      const refused = body.length > 2 && (body[2] as number) >= 0x80
      if (refused && errors.length < 10) errors.push(`${type === PUBACK ? 'PUBACK' : type === PUBREC ? 'PUBREC' : 'PUBCOMP'} reason code 0x${(body[2] as number).toString(16)}`)
      if (type === PUBACK || type === PUBCOMP || (type === PUBREC && refused)) {
        this.inflight--
        this.acked++
        if (this.job.rate === 0 && !this.stopped) this.fillWindow()
      } else if (type === PUBREC) {
        this.session.socket.write(ackPacket(PUBREL, id))
      }
    })
  }

  /** One packet with a fresh identifier (and timestamp); the template is copied, never shared. */
  private packet (): Buffer {
    const p = Buffer.from(this.template)
    if (this.idAt >= 0) {
      p.writeUInt16BE(this.nextId, this.idAt)
      this.nextId = this.nextId === 65535 ? 1 : this.nextId + 1
    }
    if (this.job.timestamp) p.writeBigUInt64BE(process.hrtime.bigint(), this.payloadAt)
    return p
  }

  /** QoS 1/2 at full speed: keep `window` messages in flight, sent in one write. */
  fillWindow (): void {
    const n = this.window - this.inflight
    if (n <= 0) return
    const parts: Buffer[] = []
    for (let i = 0; i < n; i++) parts.push(this.packet())
    this.inflight += n
    this.sent += n
    this.session.socket.write(n === 1 ? parts[0] as Buffer : Buffer.concat(parts))
  }

  /** QoS 0 at full speed: write batches while the socket takes them, then wait for drain. */
  pump0 (): void {
    const socket = this.session.socket
    const loop = (): void => {
      for (let i = 0; i < 16 && !this.stopped; i++) {
        this.sent += QOS0_BATCH
        if (!socket.write(this.batch0)) {
          socket.once('drain', loop)
          return
        }
      }
      if (!this.stopped) setImmediate(loop)
    }
    loop()
  }

  /** Fixed-rate sending: `count` more messages now (window permitting for QoS > 0). */
  sendSome (count: number): void {
    const parts: Buffer[] = []
    for (let i = 0; i < count; i++) {
      if (this.job.qos > 0 && this.inflight >= this.window) break
      parts.push(this.packet())
      if (this.job.qos > 0) this.inflight++
    }
    this.sent += parts.length
    if (parts.length > 0) this.session.socket.write(Buffer.concat(parts))
  }
}

async function run (job: PublisherJob): Promise<PublisherResult> {
  const errors: string[] = []
  const sessions = await Promise.all(Array.from({ length: job.connections }, (_v, i) => openSession(job.port, `${job.clientIdPrefix}${i}`, { protocol: job.protocol ?? 4 })))
  for (const s of sessions) s.socket.on('error', (err) => errors.push(err.message))
  const publishers = sessions.map((s, i) => new Publisher(s, job, `${job.topicPrefix}${i}`, errors))
  parentPort?.postMessage({ type: 'ready' })
  await new Promise<void>((resolve) => parentPort?.once('message', () => resolve()))

  const start = performance.now()
  let timer: NodeJS.Timeout | undefined
  if (job.rate === 0) {
    for (const p of publishers) {
      if (job.qos === 0) p.pump0()
      else p.fillWindow()
    }
  } else {
    let due = 0
    timer = setInterval(() => {
      const target = Math.floor(((performance.now() - start) / 1000) * job.rate)
      const n = target - due
      due = target
      for (let i = 0; i < n; i++) (publishers[i % publishers.length] as Publisher).sendSome(1)
    }, 1)
  }
  await new Promise((resolve) => setTimeout(resolve, job.durationMs))
  clearInterval(timer)
  for (const p of publishers) p.stopped = true
  const result: PublisherResult = {
    sent: publishers.reduce((n, p) => n + p.sent, 0),
    acked: publishers.reduce((n, p) => n + p.acked, 0),
    errors,
  }
  for (const s of sessions) s.socket.destroy()
  return result
}

if (parentPort !== null) {
  run(workerData as PublisherJob).then(
    (result) => parentPort?.postMessage({ type: 'done', result }),
    (err: Error) => parentPort?.postMessage({ type: 'failed', error: err.message }),
  )
}

import { Worker } from 'node:worker_threads'
import type { PublisherJob, PublisherResult } from './publisher-worker.js'
import { PUBLISH, PUBREL, PUBACK, PUBREC, PUBCOMP, ackPacket, messageIdOffset, openSession, publishBodyParts, publishBodyParts5, publishPacket, subscribe, type Protocol, type Session } from './wire.js'

const WORKER = new URL('./worker-entry.mjs', import.meta.url)

/** Publishers on a worker thread: connected when this resolves; `go()` starts them and resolves with their totals. */
export async function startPublishers (job: PublisherJob): Promise<{ go (): Promise<PublisherResult> }> {
  const worker = new Worker(WORKER, { workerData: job })
  const next = (): Promise<{ type: string, result?: PublisherResult, error?: string }> => new Promise((resolve, reject) => {
    const onMessage = (m: { type: string }): void => { worker.off('error', reject); resolve(m) }
    worker.once('message', onMessage)
    worker.once('error', reject)
  })
  const ready = await next()
  if (ready.type !== 'ready') {
    await worker.terminate()
    throw new Error(`publishers failed to start: ${ready.error ?? ready.type}`)
  }
  return {
    go: async () => {
      const done = next()
      worker.postMessage('go')
      const m = await done
      await worker.terminate()
      if (m.type !== 'done' || m.result === undefined) throw new Error(`publishers failed: ${m.error ?? m.type}`)
      return m.result
    },
  }
}

/**
 * A subscriber on the bench's own thread: counts PUBLISH packets and answers each QoS handshake,
 * batching its acknowledgements per read. `onMessage` sees each PUBLISH body (for timestamps).
 * An MQTT 5 session's PUBLISH bodies carry properties before the payload; its acknowledgements
 * are the same bare four bytes (reason code 0, no properties).
 */
export class Subscriber {
  received = 0
  private acks: Buffer[] = []

  constructor (readonly session: Session, onMessage?: (body: Buffer, payloadAt: number) => void) {
    const parts = session.protocol === 5 ? publishBodyParts5 : publishBodyParts
    session.onFrame((type, flags, body) => {
      if (type === PUBLISH) {
        this.received++
        const qos = (flags >> 1) & 3
        if (qos > 0 || onMessage !== undefined) {
          const { id, payloadAt } = parts(body, qos)
          if (qos > 0) this.acks.push(ackPacket(qos === 1 ? PUBACK : PUBREC, id))
          onMessage?.(body, payloadAt)
        }
      } else if (type === PUBREL) {
        this.acks.push(ackPacket(PUBCOMP, body.readUInt16BE(0)))
      }
    })
    session.socket.on('data', () => {
      if (this.acks.length === 0) return
      session.socket.write(this.acks.length === 1 ? this.acks[0] as Buffer : Buffer.concat(this.acks))
      this.acks = []
    })
  }

  close (): void {
    this.session.socket.destroy()
  }
}

/** Connects and subscribes; with `topic` null, only resumes a persistent session (its queue flows at once). */
export async function openSubscriber (port: number, clientId: string, topic: string | null, qos: 0 | 1 | 2,
  options: { clean?: boolean, protocol?: Protocol, onMessage?: (body: Buffer, payloadAt: number) => void } = {}): Promise<Subscriber> {
  const session = await openSession(port, clientId, { clean: options.clean ?? true, protocol: options.protocol ?? 4 })
  session.socket.on('error', () => {})
  if (topic !== null) await subscribe(session, topic, qos)
  return new Subscriber(session, options.onMessage)
}

/** Resolves once `check()` holds, polling every 10 ms, or rejects after `timeoutMs`. */
export async function until (check: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = performance.now() + timeoutMs
  while (!check()) {
    if (performance.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms: ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 10))
  }
}

/**
 * Publishes `total` QoS 1 messages of `payloadSize` bytes to `topic` over `connections`
 * connections, each keeping `window` in flight (MQTT 5: at most the broker's Receive Maximum); resolves once the broker has acknowledged them
 * all (so they are queued for every subscriber). Returns the milliseconds it took.
 */
export async function publishAcknowledged (port: number, options: {
  topic: string, total: number, payloadSize: number, connections: number, window: number, clientIdPrefix: string, timeoutMs: number,
  /** Default 4 (MQTT 3.1.1). */
  protocol?: Protocol,
}): Promise<number> {
  const protocol = options.protocol ?? 4
  const template = publishPacket(options.topic, Buffer.alloc(options.payloadSize, 0x62), 1, 1, protocol)
  const idAt = messageIdOffset(template)
  const sessions = await Promise.all(Array.from({ length: options.connections }, (_v, i) => openSession(port, `${options.clientIdPrefix}${i}`, { protocol })))
  let sent = 0
  let acked = 0
  let failure: Error | null = null
  const start = performance.now()
  for (const session of sessions) {
    let nextId = 1
    const send = (n: number): void => {
      const parts: Buffer[] = []
      for (let i = 0; i < n && sent < options.total; i++, sent++) {
        const p = Buffer.from(template)
        p.writeUInt16BE(nextId, idAt)
        nextId = nextId === 65535 ? 1 : nextId + 1
        parts.push(p)
      }
      if (parts.length > 0) session.socket.write(parts.length === 1 ? parts[0] as Buffer : Buffer.concat(parts))
    }
    session.socket.on('error', (err) => { failure ??= err })
    session.socket.on('close', () => { if (acked < options.total) failure ??= new Error('publisher connection closed by the broker') })
    // Acknowledgements are counted per frame and answered with one write per read.
    let owed = 0
    session.onFrame((type) => {
      if (type === PUBACK) {
        acked++
        owed++
      }
    })
    session.socket.on('data', () => {
      if (owed > 0) send(owed)
      owed = 0
    })
    // An MQTT 5 broker's Receive Maximum caps the window (Mosquitto's is 20).
    send(Math.min(options.window, session.receiveMaximum))
  }
  try {
    await until(() => acked >= options.total || failure !== null, options.timeoutMs, `${options.total} messages acknowledged (got ${acked})`)
  } finally {
    for (const s of sessions) s.socket.destroy()
  }
  if (failure !== null) throw failure
  return performance.now() - start
}

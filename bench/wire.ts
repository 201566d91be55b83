import { connect as netConnect, type Socket } from 'node:net'
import mqttPacket from 'mqtt-packet'

/**
 * The load generator's side of the wire: packets are encoded once with mqtt-packet and written
 * as bytes; incoming bytes are split into frames without decoding what is not needed, so the
 * generator stays cheaper than the brokers it measures.
 */

export const PUBLISH = 3
export const PUBACK = 4
export const PUBREC = 5
export const PUBREL = 6
export const PUBCOMP = 7
export const CONNACK = 2
export const SUBACK = 9

/** Splits a byte stream into MQTT frames; `body` is a view into the chunk when it lies inside one. */
export class FrameReader {
  private pending: Buffer | null = null

  constructor (private readonly onFrame: (type: number, flags: number, body: Buffer) => void) {}

  push (chunk: Buffer): void {
    let buf = this.pending === null ? chunk : Buffer.concat([this.pending, chunk])
    this.pending = null
    let i = 0
    for (;;) {
      if (buf.length - i < 2) break
      let length = 0
      let multiplier = 1
      let j = i + 1
      let complete = false
      while (j < buf.length && j < i + 5) {
        const byte = buf[j++] as number
        length += (byte & 0x7f) * multiplier
        multiplier *= 128
        if ((byte & 0x80) === 0) { complete = true; break }
      }
      if (!complete || buf.length - j < length) break
      const first = buf[i] as number
      this.onFrame(first >> 4, first & 0x0f, buf.subarray(j, j + length))
      i = j + length
    }
    if (i < buf.length) {
      buf = buf.subarray(i)
      this.pending = Buffer.from(buf)
    }
  }
}

export function encode (packet: mqttPacket.Packet): Buffer {
  return mqttPacket.generate(packet)
}

export function connectPacket (clientId: string, clean = true, keepalive = 0): Buffer {
  return encode({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clean, clientId, keepalive } as mqttPacket.IConnectPacket)
}

export function subscribePacket (topic: string, qos: 0 | 1 | 2, messageId = 1): Buffer {
  return encode({ cmd: 'subscribe', messageId, subscriptions: [{ topic, qos }] } as mqttPacket.ISubscribePacket)
}

export function publishPacket (topic: string, payload: Buffer, qos: 0 | 1 | 2, messageId = 1): Buffer {
  return encode({ cmd: 'publish', topic, payload, qos, retain: false, dup: false, ...(qos > 0 ? { messageId } : {}) } as mqttPacket.IPublishPacket)
}

/** PUBACK, PUBREC, PUBREL or PUBCOMP for `id`: four bytes. */
export function ackPacket (type: number, id: number): Buffer {
  const b = Buffer.allocUnsafe(4)
  b[0] = (type << 4) | (type === PUBREL ? 0x02 : 0)
  b[1] = 2
  b.writeUInt16BE(id, 2)
  return b
}

/** Where the packet identifier sits in an encoded PUBLISH built by publishPacket (QoS > 0). */
export function messageIdOffset (encoded: Buffer): number {
  let j = 1
  while (((encoded[j++] as number) & 0x80) !== 0);
  return j + 2 + encoded.readUInt16BE(j)
}

/** For a PUBLISH body with QoS > 0: its packet identifier and where the payload starts. */
export function publishBodyParts (body: Buffer, qos: number): { id: number, payloadAt: number } {
  const topicLength = body.readUInt16BE(0)
  const at = 2 + topicLength
  return qos === 0 ? { id: 0, payloadAt: at } : { id: body.readUInt16BE(at), payloadAt: at + 2 }
}

/** A connected raw MQTT session: CONNECT sent and CONNACK 0 received. */
export interface Session {
  socket: Socket
  /** Replaces the frame handler (after the handshake). */
  onFrame (handler: (type: number, flags: number, body: Buffer) => void): void
}

export function openSession (port: number, clientId: string, clean = true, timeoutMs = 10_000): Promise<Session> {
  return new Promise((resolve, reject) => {
    const socket = netConnect({ port, host: '127.0.0.1', noDelay: true })
    // Frames that arrive after CONNACK but before the caller installs its handler (a persistent
    // session's queue can follow CONNACK in the same read) are kept and replayed, not lost.
    let early: [number, number, Buffer][] = []
    let handler: (type: number, flags: number, body: Buffer) => void = (type, _flags, body) => {
      clearTimeout(timer)
      if (type !== CONNACK || body[1] !== 0) {
        socket.destroy()
        reject(new Error(`${clientId}: CONNACK refused (type ${type}, code ${body[1]})`))
        return
      }
      handler = (t, f, b) => { early.push([t, f, Buffer.from(b)]) }
      resolve({
        socket,
        onFrame: (h) => {
          handler = h
          const replay = early
          early = []
          for (const [t, f, b] of replay) h(t, f, b)
        },
      })
    }
    const reader = new FrameReader((type, flags, body) => handler(type, flags, body))
    const timer = setTimeout(() => { socket.destroy(); reject(new Error(`${clientId}: no CONNACK within ${timeoutMs} ms`)) }, timeoutMs)
    socket.on('data', (chunk) => reader.push(chunk))
    socket.once('error', (err) => { clearTimeout(timer); reject(err) })
    socket.once('connect', () => socket.write(connectPacket(clientId, clean)))
  })
}

/** Subscribes and resolves on SUBACK; the session's frame handler is taken over afterwards by the caller. */
export function subscribe (session: Session, topic: string, qos: 0 | 1 | 2): Promise<void> {
  return new Promise((resolve, reject) => {
    session.onFrame((type, _flags, body) => {
      if (type !== SUBACK) return
      if ((body[2] as number) >= 0x80) reject(new Error(`SUBACK refused ${topic}`))
      else resolve()
    })
    session.socket.write(subscribePacket(topic, qos))
  })
}

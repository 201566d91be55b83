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

/** The MQTT version the load generator's clients speak: 4 is 3.1.1 (the default), 5 is MQTT 5. */
export type Protocol = 4 | 5

/**
 * Session expiry an MQTT 5 client asks for when `clean` is false: without it a v5 session ends
 * at disconnect, so a persistent session (3.1.1's clean session false) needs it. 0xFFFFFFFF: never.
 */
export const SESSION_EXPIRY_NEVER = 0xFFFFFFFF

export function connectPacket (clientId: string, clean = true, keepalive = 0, protocol: Protocol = 4): Buffer {
  if (protocol === 5) {
    return mqttPacket.generate({
      cmd: 'connect', protocolId: 'MQTT', protocolVersion: 5, clean, clientId, keepalive,
      ...(clean ? {} : { properties: { sessionExpiryInterval: SESSION_EXPIRY_NEVER } }),
    } as mqttPacket.IConnectPacket, { protocolVersion: 5 })
  }
  return encode({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clean, clientId, keepalive } as mqttPacket.IConnectPacket)
}

export function subscribePacket (topic: string, qos: 0 | 1 | 2, messageId = 1, protocol: Protocol = 4): Buffer {
  if (protocol === 5) return mqttPacket.generate({ cmd: 'subscribe', messageId, subscriptions: [{ topic, qos }] } as mqttPacket.ISubscribePacket, { protocolVersion: 5 })
  return encode({ cmd: 'subscribe', messageId, subscriptions: [{ topic, qos }] } as mqttPacket.ISubscribePacket)
}

/** A PUBLISH; for MQTT 5 with no properties (a zero property length after the packet identifier). */
export function publishPacket (topic: string, payload: Buffer, qos: 0 | 1 | 2, messageId = 1, protocol: Protocol = 4): Buffer {
  if (protocol === 5) {
    return mqttPacket.generate({ cmd: 'publish', topic, payload, qos, retain: false, dup: false, ...(qos > 0 ? { messageId } : {}) } as mqttPacket.IPublishPacket,
      { protocolVersion: 5 })
  }
  return encode({ cmd: 'publish', topic, payload, qos, retain: false, dup: false, ...(qos > 0 ? { messageId } : {}) } as mqttPacket.IPublishPacket)
}

/**
 * PUBACK, PUBREC, PUBREL or PUBCOMP for `id`: four bytes. The same bytes in MQTT 5: an
 * acknowledgement with only a packet identifier means reason code 0 (success) and no properties,
 * which is what mqtt-packet generates for version 5 with `reasonCode: 0`.
 */
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

/** Where the byte after an MQTT 5 property block starting at `at` (its variable-byte length first) is. */
export function skipProperties (body: Buffer, at: number): number {
  let length = 0
  let multiplier = 1
  for (;;) {
    const byte = body[at++] as number
    length += (byte & 0x7f) * multiplier
    if ((byte & 0x80) === 0) return at + length
    multiplier *= 128
  }
}

/** publishBodyParts for an MQTT 5 PUBLISH body: the properties (topic alias, subscription identifier, …) sit before the payload. */
export function publishBodyParts5 (body: Buffer, qos: number): { id: number, payloadAt: number } {
  const at = 2 + body.readUInt16BE(0)
  return qos === 0 ? { id: 0, payloadAt: skipProperties(body, at) } : { id: body.readUInt16BE(at), payloadAt: skipProperties(body, at + 2) }
}

/** CONNACK property identifier → its value's size in bytes (-1: UTF-8 string or binary data, -2: string pair). */
const CONNACK_PROPERTY_SIZES: Record<number, number> = {
  0x11: 4, 0x12: -1, 0x13: 2, 0x15: -1, 0x16: -1, 0x1a: -1, 0x1c: -1, 0x1f: -1,
  0x21: 2, 0x22: 2, 0x24: 1, 0x25: 1, 0x26: -2, 0x27: 4, 0x28: 1, 0x29: 1, 0x2a: 1,
}
const RECEIVE_MAXIMUM = 0x21

/** The Receive Maximum (property 0x21) in an MQTT 5 CONNACK body; 65,535 when absent, as the spec says. */
export function connackReceiveMaximum (body: Buffer): number {
  // The body: acknowledge flags, reason code, the property length (a variable byte integer), the properties.
  const end = skipProperties(body, 2)
  let at = 2
  while (((body[at] as number) & 0x80) !== 0) at++
  at++
  while (at < end) {
    const id = body[at++] as number
    if (id === RECEIVE_MAXIMUM) return body.readUInt16BE(at)
    const size = CONNACK_PROPERTY_SIZES[id]
    if (size === undefined) break
    if (size === -1) at += 2 + body.readUInt16BE(at)
    else if (size === -2) { at += 2 + body.readUInt16BE(at); at += 2 + body.readUInt16BE(at) } else at += size
  }
  return 65_535
}

/** A connected raw MQTT session: CONNECT sent and CONNACK 0 received. */
export interface Session {
  socket: Socket
  /** The MQTT version it connected with. */
  protocol: Protocol
  /**
   * MQTT 5: the Receive Maximum in the broker's CONNACK (65,535 when absent): a v5 client keeps
   * no more QoS 1/2 PUBLISHes than this unacknowledged. 65,535 for 3.1.1, which has no such limit.
   */
  receiveMaximum: number
  /** Replaces the frame handler (after the handshake). */
  onFrame (handler: (type: number, flags: number, body: Buffer) => void): void
}

export interface SessionOptions {
  /** false: a persistent session (MQTT 5: clean start false and a session expiry that never ends). Default true. */
  clean?: boolean
  timeoutMs?: number
  /** Default 4 (MQTT 3.1.1). */
  protocol?: Protocol
}

export function openSession (port: number, clientId: string, options: SessionOptions = {}): Promise<Session> {
  const { clean = true, timeoutMs = 10_000, protocol = 4 } = options
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
        protocol,
        receiveMaximum: protocol === 5 ? connackReceiveMaximum(body) : 65_535,
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
    socket.once('connect', () => socket.write(connectPacket(clientId, clean, 0, protocol)))
  })
}

/** Subscribes and resolves on SUBACK; the session's frame handler is taken over afterwards by the caller. */
export function subscribe (session: Session, topic: string, qos: 0 | 1 | 2): Promise<void> {
  return new Promise((resolve, reject) => {
    session.onFrame((type, _flags, body) => {
      if (type !== SUBACK) return
      // The granted QoS (3.1.1) or reason code (5, after the properties) follows the packet identifier.
      const code = body[session.protocol === 5 ? skipProperties(body, 2) : 2] as number
      if (code >= 0x80) reject(new Error(`SUBACK refused ${topic} (code ${code})`))
      else resolve()
    })
    session.socket.write(subscribePacket(topic, qos, 1, session.protocol))
  })
}

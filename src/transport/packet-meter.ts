import type { Duplex } from 'node:stream'

/** MQTT control packet type 3 (fixed header high nibble). */
const PUBLISH = 3

/** Called once per packet, when its fixed header is complete; `size` counts the whole packet. */
export type PacketHeaderListener = (type: number, flags: number, size: number) => void

const enum State { Type, Length, Body }

/**
 * Follows MQTT fixed headers through a byte stream cut into arbitrary chunks. It reads only the
 * first byte and the Remaining Length of each packet and skips the rest, so it costs a few
 * operations per packet, not per byte.
 */
export class FixedHeaderScanner {
  private state = State.Type
  private type = 0
  private flags = 0
  private length = 0
  private multiplier = 1
  private lengthBytes = 0
  private remaining = 0

  constructor (private readonly onHeader: PacketHeaderListener) {}

  /** Returns an error message when the stream is not MQTT framing; the scanner is then stuck. */
  scan (chunk: Buffer): string | null {
    let i = 0
    const n = chunk.length
    while (i < n) {
      if (this.state === State.Body) {
        const take = Math.min(this.remaining, n - i)
        this.remaining -= take
        i += take
        if (this.remaining === 0) this.state = State.Type
        continue
      }
      const byte = chunk[i++] as number
      if (this.state === State.Type) {
        this.type = byte >> 4
        this.flags = byte & 0x0f
        this.length = 0
        this.multiplier = 1
        this.lengthBytes = 0
        this.state = State.Length
        continue
      }
      // Remaining Length: up to four bytes, seven bits each, least significant first.
      this.length += (byte & 0x7f) * this.multiplier
      this.multiplier *= 128
      this.lengthBytes++
      if ((byte & 0x80) !== 0) {
        if (this.lengthBytes === 4) return 'malformed Remaining Length (more than four bytes)'
        continue
      }
      this.onHeader(this.type, this.flags, 1 + this.lengthBytes + this.length)
      this.remaining = this.length
      this.state = this.remaining === 0 ? State.Type : State.Body
    }
    return null
  }

  /** Bytes of the current packet's body still to come (for a string chunk that lies wholly inside one). */
  get bodyBytesLeft (): number {
    return this.state === State.Body ? this.remaining : 0
  }

  skipBody (bytes: number): void {
    this.remaining -= bytes
    if (this.remaining === 0) this.state = State.Type
  }
}

export class PacketTooLargeError extends Error {
  readonly code = 'FERRYMQ_PACKET_TOO_LARGE'
  constructor (readonly size: number, readonly limit: number) {
    super(`packet of ${size} bytes exceeds limits.maxPacketSize (${limit})`)
    this.name = 'PacketTooLargeError'
  }
}

export class MalformedFramingError extends Error {
  readonly code = 'FERRYMQ_MALFORMED_PACKET'
  constructor (detail: string) {
    super(detail)
    this.name = 'MalformedFramingError'
  }
}

export interface MeterEvents {
  /** A PUBLISH arrived (qos from its fixed header) and its size in bytes. */
  publishIn (qos: number, size: number): void
  publishOut (qos: number, size: number): void
  bytesIn (n: number): void
  bytesOut (n: number): void
  /**
   * The connection is being destroyed with `err`. Reported here because the error itself may never
   * reach aedes: websocket-stream's stream emits 'close' before 'error', and aedes drops its error
   * listeners on 'close'.
   */
  refused (err: PacketTooLargeError | MalformedFramingError): void
}

/**
 * Puts a size guard and counters on one client connection, before aedes sees it. aedes pulls
 * bytes with `conn.read()` and pushes packets with `conn.write()`, so wrapping those two methods
 * observes every byte without another stream in the path. A packet whose fixed header announces
 * more than `maxPacketSize` bytes is refused before its body is buffered: the connection is
 * destroyed with PacketTooLargeError, as MQTT 3.1.1 has no reason code to send.
 */
export function meterConnection (conn: Duplex, maxPacketSize: number, events: MeterEvents): MeteredConnection {
  let tooLarge: PacketTooLargeError | null = null
  const inbound = new FixedHeaderScanner((type, flags, size) => {
    if (size > maxPacketSize && tooLarge === null) tooLarge = new PacketTooLargeError(size, maxPacketSize)
    else if (type === PUBLISH) events.publishIn((flags >> 1) & 3, size)
  })
  let publishOutListener: ((qos: number, size: number) => void) | null = null
  const outbound = new FixedHeaderScanner((type, flags, size) => {
    if (type !== PUBLISH) return
    events.publishOut((flags >> 1) & 3, size)
    publishOutListener?.((flags >> 1) & 3, size)
  })

  const read = conn.read
  conn.read = function meteredRead (this: Duplex, size?: number) {
    const chunk: unknown = read.call(this, size)
    if (!Buffer.isBuffer(chunk)) return chunk
    events.bytesIn(chunk.length)
    const malformed = inbound.scan(chunk)
    if (malformed !== null || tooLarge !== null) {
      const err = tooLarge ?? new MalformedFramingError(malformed as string)
      if (!this.destroyed) events.refused(err)
      this.destroy(err)
      return null
    }
    return chunk
  }

  // Bytes handed to conn.write() whose write callback has not fired yet: what the broker holds in
  // memory for this client. Counted through callbacks because the streams differ (net.Socket
  // counts bytes in writableLength, websocket-stream's object-mode stream counts chunks).
  let pending = 0
  const write = conn.write
  conn.write = function meteredWrite (this: Duplex, chunk: unknown, ...rest: unknown[]) {
    let n = 0
    if (typeof chunk === 'string') {
      const encoding = typeof rest[0] === 'string' ? rest[0] as BufferEncoding : 'utf8'
      n = Buffer.byteLength(chunk, encoding)
      // mqtt-packet writes topics and payload strings as strings, always inside a packet body.
      if (n <= outbound.bodyBytesLeft) outbound.skipBody(n)
      else outbound.scan(Buffer.from(chunk, encoding))
    } else if (chunk instanceof Uint8Array) {
      n = chunk.length
      outbound.scan(Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length))
    }
    events.bytesOut(n)
    pending += n
    const last = rest[rest.length - 1]
    const callback = typeof last === 'function' ? rest.pop() as (err?: Error | null) => void : undefined
    rest.push((err?: Error | null) => {
      pending -= n
      callback?.(err)
    })
    return (write as (...args: unknown[]) => boolean).call(this, chunk, ...rest)
  } as Duplex['write']

  return { pendingBytes: () => pending, onPublishOut: (listener) => { publishOutListener = listener } }
}

/** What meterConnection leaves to ask of a connection. */
export interface MeteredConnection {
  /** Bytes written to the connection and not yet flushed to the network. */
  pendingBytes (): number
  /**
   * Also tells `listener` of each outgoing PUBLISH (as MeterEvents.publishOut, when its fixed
   * header is written); one listener per connection, a later call replaces it. For flow control.
   */
  onPublishOut (listener: (qos: number, size: number) => void): void
}

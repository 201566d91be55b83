import mqttPacket, { type Packet } from 'mqtt-packet'
import { describe, expect, it } from 'vitest'
import { FixedHeaderScanner } from '../../src/transport/packet-meter.js'

interface Header { type: number, flags: number, size: number }

/** A packet as mqtt-packet encodes it, and the fixed header the scanner must report for it. */
interface Case { name: string, bytes: Buffer, expected: Header }

function encode (name: string, packet: Packet, type: number, flags: number): Case {
  const bytes = mqttPacket.generate(packet)
  return { name, bytes, expected: { type, flags, size: bytes.length } }
}

const publish = (topic: string, payload: Buffer | string, qos: 0 | 1 | 2, extra: { retain?: boolean, dup?: boolean } = {}): Packet =>
  ({ cmd: 'publish', topic, payload, qos, retain: extra.retain ?? false, dup: extra.dup ?? false, ...(qos > 0 ? { messageId: 7 } : {}) })

/** One of each control packet type, with the type number and flags MQTT 3.1.1 gives it. */
const EVERY_TYPE: Case[] = [
  encode('CONNECT', { cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clean: true, clientId: 'meter', keepalive: 30 }, 1, 0),
  encode('CONNECT with will and credentials', {
    cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clean: false, clientId: 'meter-2', keepalive: 60, username: 'u', password: Buffer.from('p'),
    will: { topic: 'wills/x', payload: Buffer.from('bye'), qos: 1, retain: true },
  }, 1, 0),
  encode('CONNACK', { cmd: 'connack', returnCode: 0, sessionPresent: true }, 2, 0),
  encode('PUBLISH QoS 0', publish('t', 'hello', 0), 3, 0b0000),
  encode('PUBLISH QoS 1 retain', publish('a/b', 'x', 1, { retain: true }), 3, 0b0011),
  encode('PUBLISH QoS 2 dup', publish('a/b/c', Buffer.alloc(10, 1), 2, { dup: true }), 3, 0b1100),
  encode('PUBLISH QoS 2 dup retain', publish('d', '', 2, { dup: true, retain: true }), 3, 0b1101),
  encode('PUBLISH empty payload', publish('e', Buffer.alloc(0), 0), 3, 0),
  encode('PUBACK', { cmd: 'puback', messageId: 1 }, 4, 0),
  encode('PUBREC', { cmd: 'pubrec', messageId: 2 }, 5, 0),
  encode('PUBREL', { cmd: 'pubrel', messageId: 3 }, 6, 0b0010),
  encode('PUBCOMP', { cmd: 'pubcomp', messageId: 4 }, 7, 0),
  encode('SUBSCRIBE', { cmd: 'subscribe', messageId: 5, subscriptions: [{ topic: 'a/#', qos: 1 }, { topic: '+/b', qos: 2 }] }, 8, 0b0010),
  encode('SUBACK', { cmd: 'suback', messageId: 5, granted: [1, 2, 128] }, 9, 0),
  encode('UNSUBSCRIBE', { cmd: 'unsubscribe', messageId: 6, unsubscriptions: ['a/#'] }, 10, 0b0010),
  encode('UNSUBACK', { cmd: 'unsuback', messageId: 6, granted: [] }, 11, 0),
  encode('PINGREQ', { cmd: 'pingreq' }, 12, 0),
  encode('PINGRESP', { cmd: 'pingresp' }, 13, 0),
  encode('DISCONNECT', { cmd: 'disconnect' }, 14, 0),
]

/** PUBLISH QoS 0 to topic "t" whose Remaining Length is exactly `remaining` (2 + 1 topic bytes + payload). */
function publishWithRemaining (remaining: number): Case {
  const c = encode(`PUBLISH, Remaining Length ${remaining}`, publish('t', Buffer.alloc(remaining - 3, 0x61), 0), 3, 0)
  expect(c.bytes.length - remaining).toBe(1 + lengthBytes(remaining))
  return c
}

function lengthBytes (remaining: number): number {
  return remaining < 128 ? 1 : remaining < 16_384 ? 2 : remaining < 2_097_152 ? 3 : 4
}

/** Feeds `chunks` to a fresh scanner; returns the headers reported and the first error. */
function scanAll (chunks: Iterable<Buffer>): { headers: Header[], error: string | null } {
  const headers: Header[] = []
  const scanner = new FixedHeaderScanner((type, flags, size) => headers.push({ type, flags, size }))
  for (const chunk of chunks) {
    const error = scanner.scan(chunk)
    if (error !== null) return { headers, error }
  }
  return { headers, error: null }
}

function * whole (bytes: Buffer): Generator<Buffer> {
  yield bytes
}

function * byteByByte (bytes: Buffer): Generator<Buffer> {
  for (let i = 0; i < bytes.length; i++) yield bytes.subarray(i, i + 1)
}

/** Deterministic PRNG (mulberry32), so a failing split can be reproduced from its seed. */
function random (seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4_294_967_296
  }
}

/** Cuts `bytes` at random places into chunks of 1 to `maxChunk` bytes; empty chunks are mixed in too. */
function * randomSplits (bytes: Buffer, seed: number, maxChunk = 17): Generator<Buffer> {
  const next = random(seed)
  let i = 0
  while (i < bytes.length) {
    if (next() < 0.05) yield Buffer.alloc(0)
    const n = 1 + Math.floor(next() * maxChunk)
    yield bytes.subarray(i, i + n)
    i += n
  }
}

const FEEDS: [string, (bytes: Buffer) => Iterable<Buffer>][] = [
  ['whole', whole],
  ['byte by byte', byteByByte],
  ...[1, 2, 3, 42, 1234].map((seed): [string, (bytes: Buffer) => Iterable<Buffer>] => [`random splits (seed ${seed})`, (bytes) => randomSplits(bytes, seed)]),
  ['random splits up to 300 bytes (seed 7)', (bytes: Buffer) => randomSplits(bytes, 7, 300)],
]

describe('FixedHeaderScanner', () => {
  it.each(EVERY_TYPE.map((c) => [c.name, c] as const))('reports the type, flags and size of %s', (_name, c) => {
    expect(c.bytes[0]).toBe((c.expected.type << 4) | c.expected.flags) // the case itself agrees with mqtt-packet
    for (const [, feed] of FEEDS) {
      expect(scanAll(feed(c.bytes))).toEqual({ headers: [c.expected], error: null })
    }
  })

  describe.each(FEEDS)('a stream of every packet type, fed %s', (_name, feed) => {
    it('reports each packet in order, with its type, flags and size', () => {
      const stream = Buffer.concat([...EVERY_TYPE, ...EVERY_TYPE.slice().reverse()].map((c) => c.bytes))
      const expected = [...EVERY_TYPE, ...EVERY_TYPE.slice().reverse()].map((c) => c.expected)
      expect(scanAll(feed(stream))).toEqual({ headers: expected, error: null })
    })
  })

  describe('Remaining Length on 1 to 4 bytes', () => {
    // The edges of each encoding length: 0..127 on one byte, ..16383 on two, ..2097151 on three, then four.
    const small = [3, 127, 128, 129, 16_383, 16_384].map(publishWithRemaining)
    const large = [2_097_151, 2_097_152].map(publishWithRemaining)

    it.each(FEEDS)('fed %s, sizes across the one-, two- and three-byte encodings are exact', (_name, feed) => {
      const stream = Buffer.concat(small.map((c) => c.bytes))
      expect(scanAll(feed(stream))).toEqual({ headers: small.map((c) => c.expected), error: null })
    })

    it('three- and four-byte lengths (2 MiB packets) are exact, whole, split at every header byte, and in random splits', () => {
      const stream = Buffer.concat(large.map((c) => c.bytes))
      const expected = large.map((c) => c.expected)
      expect(expected.map((h) => h.size)).toEqual([1 + 3 + 2_097_151, 1 + 4 + 2_097_152])
      expect(scanAll(whole(stream))).toEqual({ headers: expected, error: null })
      // Header bytes one at a time, each body in one piece.
      const first = large[0]?.bytes as Buffer
      const second = large[1]?.bytes as Buffer
      const pieces = [...byteByByte(first.subarray(0, 4)), first.subarray(4), ...byteByByte(second.subarray(0, 5)), second.subarray(5)]
      expect(scanAll(pieces)).toEqual({ headers: expected, error: null })
      expect(scanAll(randomSplits(stream, 99, 65_536))).toEqual({ headers: expected, error: null })
    })

    it('the largest Remaining Length (0xff 0xff 0xff 0x7f) is reported from the header alone', () => {
      const headers: Header[] = []
      const scanner = new FixedHeaderScanner((type, flags, size) => headers.push({ type, flags, size }))
      expect(scanner.scan(Buffer.from([0x32, 0xff, 0xff, 0xff, 0x7f, 0x00]))).toBeNull()
      expect(headers).toEqual([{ type: 3, flags: 2, size: 1 + 4 + 268_435_455 }])
      expect(scanner.bodyBytesLeft).toBe(268_435_455 - 1)
    })

    it('a non-minimal encoding (0x80 0x00 for zero) still decodes to its value', () => {
      expect(scanAll(whole(Buffer.from([0xc0, 0x80, 0x00, 0xd0, 0x00])))).toEqual({
        headers: [{ type: 12, flags: 0, size: 3 }, { type: 13, flags: 0, size: 2 }],
        error: null,
      })
    })
  })

  describe('a Remaining Length on five bytes is malformed', () => {
    const malformed = Buffer.from([0x30, 0xff, 0xff, 0xff, 0xff, 0x01])
    const MESSAGE = 'malformed Remaining Length (more than four bytes)'

    it.each(FEEDS)('fed %s, after the packets before it were reported', (_name, feed) => {
      const before = [EVERY_TYPE[0], EVERY_TYPE[4], EVERY_TYPE[16]] as Case[]
      const stream = Buffer.concat([...before.map((c) => c.bytes), malformed])
      expect(scanAll(feed(stream))).toEqual({ headers: before.map((c) => c.expected), error: MESSAGE })
    })

    it('the error comes with the fourth continuation byte, before a fifth length byte arrives', () => {
      const scanner = new FixedHeaderScanner(() => { throw new Error('no header expected') })
      expect(scanner.scan(Buffer.from([0x30, 0x80, 0x80, 0x80]))).toBeNull()
      expect(scanner.scan(Buffer.from([0x80]))).toBe(MESSAGE)
    })

    it('four continuation bytes are malformed whatever their value bits', () => {
      expect(scanAll(whole(Buffer.from([0x10, 0x80, 0x80, 0x80, 0x80, 0x00]))).error).toBe(MESSAGE)
    })
  })

  it('bodyBytesLeft and skipBody follow a body handed over outside scan()', () => {
    const c = EVERY_TYPE[5] as Case // PUBLISH QoS 2 dup: 2 + 5 topic + 2 id + 10 payload = 19 bytes of body
    const headers: Header[] = []
    const scanner = new FixedHeaderScanner((type, flags, size) => headers.push({ type, flags, size }))
    expect(scanner.bodyBytesLeft).toBe(0)
    expect(scanner.scan(c.bytes.subarray(0, 2))).toBeNull()
    expect(headers).toEqual([c.expected])
    expect(scanner.bodyBytesLeft).toBe(c.bytes.length - 2)
    scanner.skipBody(5)
    expect(scanner.bodyBytesLeft).toBe(c.bytes.length - 7)
    expect(scanner.scan(c.bytes.subarray(7, c.bytes.length - 1))).toBeNull()
    expect(scanner.bodyBytesLeft).toBe(1)
    scanner.skipBody(1)
    expect(scanner.bodyBytesLeft).toBe(0)
    // Back at a packet boundary: the next packet is reported.
    expect(scanner.scan(EVERY_TYPE[8]?.bytes as Buffer)).toBeNull()
    expect(headers).toEqual([c.expected, EVERY_TYPE[8]?.expected])
  })

  it('zero-length packets back to back in one chunk are each reported', () => {
    const ping = mqttPacket.generate({ cmd: 'pingreq' })
    const stream = Buffer.concat(Array(50).fill(ping) as Buffer[])
    expect(scanAll(whole(stream)).headers).toHaveLength(50)
  })
})

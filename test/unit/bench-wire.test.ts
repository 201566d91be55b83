import { describe, expect, it } from 'vitest'
import { FrameReader, PUBLISH, ackPacket, messageIdOffset, publishBodyParts, publishPacket, PUBREL } from '../../bench/wire.js'

// The load generator's frame splitter must count exactly, whatever the read boundaries.
describe('bench FrameReader', () => {
  const packets = [
    publishPacket('a/b', Buffer.alloc(10, 1), 0),
    publishPacket('bench/fanin/3', Buffer.alloc(200, 2), 1, 4242),
    publishPacket('x', Buffer.alloc(70_000, 3), 2, 7),
    ackPacket(PUBREL, 9),
  ]
  const stream = Buffer.concat(packets)

  function feed (chunks: Buffer[]): { type: number, flags: number, length: number }[] {
    const seen: { type: number, flags: number, length: number }[] = []
    const reader = new FrameReader((type, flags, body) => seen.push({ type, flags, length: body.length }))
    for (const c of chunks) reader.push(c)
    return seen
  }

  const expected = [
    { type: PUBLISH, flags: 0, length: 2 + 3 + 10 },
    { type: PUBLISH, flags: 2, length: 2 + 13 + 2 + 200 },
    { type: PUBLISH, flags: 4, length: 2 + 1 + 2 + 70_000 },
    { type: PUBREL, flags: 2, length: 2 },
  ]

  it('splits a whole buffer into its frames', () => {
    expect(feed([stream])).toEqual(expected)
  })

  it('splits the same bytes fed one at a time', () => {
    expect(feed([...stream].map((b) => Buffer.from([b])))).toEqual(expected)
  })

  it('splits the same bytes cut at every 7th and 1000th byte', () => {
    for (const step of [7, 1000]) {
      const chunks: Buffer[] = []
      for (let i = 0; i < stream.length; i += step) chunks.push(stream.subarray(i, i + step))
      expect(feed(chunks)).toEqual(expected)
    }
  })

  it('finds the packet identifier and payload of an encoded PUBLISH', () => {
    const p = publishPacket('bench/lat/0', Buffer.from('12345678'), 1, 513)
    expect(p.readUInt16BE(messageIdOffset(p))).toBe(513)
    const reader = new FrameReader((_type, flags, body) => {
      const { id, payloadAt } = publishBodyParts(body, (flags >> 1) & 3)
      expect(id).toBe(513)
      expect(body.subarray(payloadAt).toString()).toBe('12345678')
    })
    reader.push(p)
  })
})

import { describe, expect, it } from 'vitest'
import { CODEC_VERSION, decode, encode, UnknownCodecVersionError } from '../../src/store/codec.js'

describe('codec', () => {
  it('round-trips an MQTT 5 packet with Buffers and properties', () => {
    const packet = {
      cmd: 'publish',
      brokerId: 'b-1',
      brokerCounter: 123456789,
      topic: 'sensors/t1',
      payload: Buffer.from([0, 1, 2, 255]),
      qos: 2,
      retain: false,
      dup: false,
      messageId: 65535,
      clientId: 'dev-1',
      messageExpiry: 1_790_000_000_000,
      properties: {
        payloadFormatIndicator: true,
        messageExpiryInterval: 60,
        contentType: 'application/json',
        responseTopic: 'reply/here',
        correlationData: Buffer.from('corr-🚀'),
        userProperties: { a: 'b', multi: ['x', 'y'] },
        subscriptionIdentifier: [7, 268435455]
      },
      subscriptionIdentifier: 7
    }
    const out = decode(encode(packet))
    expect(out).toEqual(packet)
    expect(Buffer.isBuffer(out.payload)).toBe(true)
    expect(Buffer.isBuffer((out.properties as { correlationData: unknown }).correlationData)).toBe(true)
  })

  it('keeps string payloads, undefined fields, and drops functions and the wire length', () => {
    const out = decode(encode({ topic: 't', payload: 'text', messageId: undefined, length: 14, writeCallback: () => {} }))
    expect(out).toStrictEqual({ topic: 't', payload: 'text', messageId: undefined })
    expect(Object.hasOwn(out, 'messageId')).toBe(true)
  })

  it('never pollutes prototypes from stored keys', () => {
    const userProperties = JSON.parse('{"__proto__": {"polluted": true}, "constructor": "c"}') as object
    const out = decode<{ properties: { userProperties: Record<string, unknown> } }>(encode({ properties: { userProperties } }))
    expect(Object.getPrototypeOf(out.properties.userProperties)).toBe(Object.prototype)
    expect(({} as Record<string, unknown>).polluted).toBeUndefined()
    expect(out.properties.userProperties.constructor).toBe('c')
  })

  it('writes the format version first and refuses an unknown one', () => {
    const buf = encode({ a: 1 })
    expect(buf[0]).toBe(CODEC_VERSION)
    const newer = Buffer.from(buf)
    newer[0] = CODEC_VERSION + 1
    expect(() => decode(newer)).toThrow(UnknownCodecVersionError)
    expect(() => decode(newer)).toThrow(`format version ${CODEC_VERSION + 1}`)
    expect(() => decode(Buffer.alloc(0))).toThrow(/empty/)
  })
})

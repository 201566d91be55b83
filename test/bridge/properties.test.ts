import { describe, expect, it } from 'vitest'
import { messageExpiryInterval, messageProperties } from '../../src/bridge/properties.js'

describe('bridge message properties', () => {
  it('keeps the application message\'s properties only: not topic alias, subscription identifier, expiry or unknown fields', () => {
    const user = Object.create(null) as Record<string, string | string[]> // as mqtt-packet parses them
    user.site = 'edge-7'
    user.tag = ['a', 'b']
    const got = messageProperties({
      topicAlias: 3,
      subscriptionIdentifier: [1, 2],
      messageExpiryInterval: 60,
      reasonString: 'x',
      payloadFormatIndicator: true,
      contentType: 'application/json',
      responseTopic: 'reply/edge-7',
      correlationData: Buffer.from([1, 2]),
      userProperties: user,
    })
    expect(got).toEqual({
      payloadFormatIndicator: true,
      contentType: 'application/json',
      responseTopic: 'reply/edge-7',
      correlationData: Buffer.from([1, 2]),
      userProperties: { site: 'edge-7', tag: ['a', 'b'] },
    })
    expect(Object.keys(got ?? {})).not.toContain('topicAlias')
  })

  it('none of them: undefined (nothing stored); a payload format indicator of 0 is kept as false', () => {
    expect(messageProperties(undefined)).toBeUndefined()
    expect(messageProperties({})).toBeUndefined()
    expect(messageProperties({ topicAlias: 1, messageExpiryInterval: 5, userProperties: {} })).toBeUndefined()
    expect(messageProperties({ payloadFormatIndicator: 0 })).toEqual({ payloadFormatIndicator: false })
    expect(messageProperties({ correlationData: new Uint8Array([7]) })?.correlationData).toEqual(Buffer.from([7]))
  })

  it('a user property named __proto__ stays an own property of the copy', () => {
    const user = Object.create(null) as Record<string, string>
    user.__proto__ = 'p'
    const copy = messageProperties({ userProperties: user })?.userProperties as Record<string, string>
    expect(Object.keys(copy)).toEqual(['__proto__'])
    expect(Object.getPrototypeOf(copy)).toBe(Object.prototype)
  })

  it('message expiry: a positive interval only', () => {
    expect(messageExpiryInterval({ messageExpiryInterval: 30 })).toBe(30)
    expect(messageExpiryInterval({ messageExpiryInterval: 0 })).toBeUndefined()
    expect(messageExpiryInterval({})).toBeUndefined()
    expect(messageExpiryInterval(undefined)).toBeUndefined()
  })
})

import mqttPacket from 'mqtt-packet'
import { describe, expect, it } from 'vitest'
import {
  FrameReader, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL, SESSION_EXPIRY_NEVER, ackPacket, connackReceiveMaximum, connectPacket, messageIdOffset,
  publishBodyParts, publishBodyParts5, publishPacket, subscribePacket,
} from '../../bench/wire.js'

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

/** Every packet mqtt-packet's parser finds in `bytes`, read as `protocolVersion`. */
function parse (bytes: Buffer, protocolVersion: 4 | 5): mqttPacket.Packet[] {
  const parser = mqttPacket.parser({ protocolVersion })
  const packets: mqttPacket.Packet[] = []
  parser.on('packet', (p) => packets.push(p))
  parser.on('error', (err) => { throw err })
  parser.parse(bytes)
  return packets
}

/** The body of the one frame in `bytes`, as FrameReader hands it over. */
function body (bytes: Buffer): Buffer {
  let found: Buffer | null = null
  new FrameReader((_type, _flags, b) => { found = Buffer.from(b) }).push(bytes)
  if (found === null) throw new Error('no frame')
  return found
}

// --protocol 4 must keep the bytes the bench always sent; --protocol 5 sends what mqtt-packet encodes for version 5.
describe('bench wire, MQTT 3.1.1 and 5', () => {
  it('encodes 3.1.1 exactly as before when no protocol is given', () => {
    const payload = Buffer.alloc(64, 0x61)
    expect(publishPacket('t', payload, 1, 9)).toEqual(publishPacket('t', payload, 1, 9, 4))
    expect(publishPacket('t', payload, 1, 9)).toEqual(mqttPacket.generate({ cmd: 'publish', topic: 't', payload, qos: 1, messageId: 9, retain: false, dup: false }))
    expect(connectPacket('c', false)).toEqual(mqttPacket.generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clean: false, clientId: 'c', keepalive: 0 }))
    expect(subscribePacket('a/#', 2)).toEqual(subscribePacket('a/#', 2, 1, 4))
  })

  it('connects as MQTT 5, with a session that never expires when clean is false', () => {
    const [persistent] = parse(connectPacket('bench-backlog', false, 0, 5), 5) as mqttPacket.IConnectPacket[]
    expect(persistent).toMatchObject({ cmd: 'connect', protocolVersion: 5, clean: false, clientId: 'bench-backlog', properties: { sessionExpiryInterval: SESSION_EXPIRY_NEVER } })
    const [clean] = parse(connectPacket('bench-pub-0', true, 0, 5), 5) as mqttPacket.IConnectPacket[]
    expect(clean).toMatchObject({ cmd: 'connect', protocolVersion: 5, clean: true })
    expect(clean?.properties?.sessionExpiryInterval).toBeUndefined()
  })

  it('subscribes as MQTT 5', () => {
    const [sub] = parse(subscribePacket('bench/fanin/#', 1, 1, 5), 5) as mqttPacket.ISubscribePacket[]
    expect(sub).toMatchObject({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: 'bench/fanin/#', qos: 1 }] })
  })

  it('publishes as MQTT 5: the identifier where 3.1.1 has it, an empty property block, then the payload', () => {
    for (const qos of [0, 1, 2] as const) {
      const p = publishPacket('bench/lat/0', Buffer.from('12345678'), qos, 513, 5)
      const [parsed] = parse(p, 5) as mqttPacket.IPublishPacket[]
      expect(parsed).toMatchObject({ cmd: 'publish', topic: 'bench/lat/0', qos, ...(qos > 0 ? { messageId: 513 } : {}) })
      expect(Buffer.from(parsed?.payload as Buffer).toString()).toBe('12345678')
      if (qos > 0) expect(p.readUInt16BE(messageIdOffset(p))).toBe(513)
      // The publisher writes timestamps at template.length - payloadSize.
      expect(p.subarray(p.length - 8).toString()).toBe('12345678')
      const { id, payloadAt } = publishBodyParts5(body(p), qos)
      expect(id).toBe(qos > 0 ? 513 : 0)
      expect(body(p).subarray(payloadAt).toString()).toBe('12345678')
    }
  })

  it('finds the payload of an MQTT 5 PUBLISH a broker sends with properties', () => {
    const p = mqttPacket.generate({
      cmd: 'publish', topic: 'a', payload: Buffer.from('xyz'), qos: 1, messageId: 77, retain: false, dup: false,
      properties: { subscriptionIdentifier: 300, userProperties: { k: 'v'.repeat(200) } },
    }, { protocolVersion: 5 })
    const { id, payloadAt } = publishBodyParts5(body(p), 1)
    expect(id).toBe(77)
    expect(body(p).subarray(payloadAt).toString()).toBe('xyz')
  })

  it('acknowledges with the four bytes mqtt-packet encodes for an MQTT 5 success', () => {
    for (const [type, cmd] of [[PUBACK, 'puback'], [PUBREC, 'pubrec'], [PUBREL, 'pubrel'], [PUBCOMP, 'pubcomp']] as const) {
      expect(ackPacket(type, 4242)).toEqual(mqttPacket.generate({ cmd, messageId: 4242, reasonCode: 0 }, { protocolVersion: 5 }))
      expect(parse(ackPacket(type, 4242), 5)[0]).toMatchObject({ cmd, messageId: 4242 })
    }
  })

  it('splits MQTT 5 frames whatever the read boundaries, and counts them as for 3.1.1', () => {
    const packets = [
      publishPacket('a/b', Buffer.alloc(10, 1), 0, 1, 5),
      publishPacket('bench/fanin/3', Buffer.alloc(200, 2), 1, 4242, 5),
      publishPacket('x', Buffer.alloc(70_000, 3), 2, 7, 5),
      ackPacket(PUBREL, 9),
    ]
    const stream = Buffer.concat(packets)
    const expected = [
      { type: PUBLISH, flags: 0, length: 2 + 3 + 1 + 10 },
      { type: PUBLISH, flags: 2, length: 2 + 13 + 2 + 1 + 200 },
      { type: PUBLISH, flags: 4, length: 2 + 1 + 2 + 1 + 70_000 },
      { type: PUBREL, flags: 2, length: 2 },
    ]
    for (const step of [1, 7, 1000, stream.length]) {
      const seen: { type: number, flags: number, length: number }[] = []
      const reader = new FrameReader((type, flags, b) => seen.push({ type, flags, length: b.length }))
      for (let i = 0; i < stream.length; i += step) reader.push(stream.subarray(i, i + step))
      expect(seen).toEqual(expected)
    }
  })

  it('reads the Receive Maximum from an MQTT 5 CONNACK, among other properties, or 65,535 without it', () => {
    const connack = (properties?: mqttPacket.IConnackPacket['properties']): Buffer =>
      body(mqttPacket.generate({ cmd: 'connack', sessionPresent: false, reasonCode: 0, ...(properties === undefined ? {} : { properties }) }, { protocolVersion: 5 }))
    // What Mosquitto 2.0.11 and FerryMQ send.
    expect(connackReceiveMaximum(connack({ topicAliasMaximum: 10, serverKeepAlive: 65535, receiveMaximum: 20 }))).toBe(20)
    expect(connackReceiveMaximum(connack({
      sharedSubscriptionAvailable: false, topicAliasMaximum: 10, maximumPacketSize: 1048576, sessionExpiryInterval: 604800,
      assignedClientIdentifier: 'x'.repeat(40), reasonString: 'ok', userProperties: { a: 'b' }, receiveMaximum: 1000,
    }))).toBe(1000)
    expect(connackReceiveMaximum(connack({ topicAliasMaximum: 10 }))).toBe(65_535)
    expect(connackReceiveMaximum(connack())).toBe(65_535)
  })
})

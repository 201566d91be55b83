import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import mqttPacket, { type IPublishPacket, type Packet } from 'mqtt-packet'
import type { MqttClient } from 'mqtt'
import { afterAll, afterEach, describe, expect, it } from 'vitest'
import { startBroker, type TestBroker } from '../helpers/broker.js'
import { collect, connect, endAllClients, withTimeout } from '../helpers/clients.js'
import { RawClient } from '../helpers/raw.js'
import { connect5, passTime } from './v5-client.js'

/**
 * MQTT 5 Receive Maximum toward the client (src/broker/flow-control.ts): the broker keeps at most
 * that many QoS 1/2 PUBLISH packets unacknowledged toward a client.
 *
 * "Nothing more is sent" is checked after a positive control: a QoS 0 message published after the
 * held ones, on a topic the client also subscribes to at QoS 0 (never held), arrives; a PUBLISH
 * the broker had sent before it would have arrived before it on the same TCP stream. A short
 * bounded wait follows, to give a stray PUBLISH one more chance to show.
 */

/** Bounded wait after a positive control, for something that must not happen. */
const NEGATIVE_WAIT_MS = 200

let broker: TestBroker | undefined
const raws: RawClient[] = []
const dirs: string[] = []

afterEach(async () => {
  for (const r of raws.splice(0)) r.destroy()
  await endAllClients()
  await broker?.close()
  broker = undefined
})
afterAll(() => { for (const d of dirs) rmSync(d, { recursive: true, force: true }) })

function freshDir (): string {
  const d = mkdtempSync(join(tmpdir(), 'ferrymq-rm-'))
  dirs.push(d)
  return d
}

/** Every packet a RawClient's socket brings, decoded on the side, with waits that do not consume. */
class RawLog {
  readonly packets: Packet[] = []
  private waiters: (() => void)[] = []

  constructor (raw: RawClient, protocolVersion: 4 | 5) {
    const parser = mqttPacket.parser({ protocolVersion })
    parser.on('packet', (p: Packet) => {
      this.packets.push(p)
      for (const wake of this.waiters.splice(0)) wake()
    })
    raw.socket.on('data', (chunk: Buffer) => parser.parse(chunk))
  }

  publishes (topic: string): IPublishPacket[] {
    return this.packets.filter((p): p is IPublishPacket => p.cmd === 'publish' && p.topic === topic)
  }

  payloads (topic: string): string[] {
    return this.publishes(topic).map((p) => p.payload.toString())
  }

  /** Resolves once `check` holds for the packets received so far (or later). */
  until (check: () => boolean, what: string, timeoutMs = 5000): Promise<void> {
    return withTimeout((async () => {
      while (!check()) await new Promise<void>((resolve) => this.waiters.push(resolve))
    })(), timeoutMs, () => `${what}; received: ${JSON.stringify(this.packets.map((p) => p.cmd === 'publish' ? `${p.topic}=${p.payload.toString()}` : p.cmd))}`)
  }

  /** Resolves once `n` PUBLISH packets on `topic` arrived in all. */
  count (topic: string, n: number, timeoutMs = 5000): Promise<void> {
    return this.until(() => this.publishes(topic).length >= n, `${n} PUBLISH on ${topic}`, timeoutMs)
  }
}

interface Raw5 { raw: RawClient, log: RawLog, connack: Extract<Packet, { cmd: 'connack' }> }

/** A raw MQTT 5 connection (or 3.1.1 with `version` 4), CONNECTed with `fields`. */
async function openRaw (b: TestBroker, fields: Partial<mqttPacket.IConnectPacket>, version: 4 | 5 = 5): Promise<Raw5> {
  const raw = await RawClient.open(b.port('mqtt'), '127.0.0.1', version)
  raws.push(raw)
  const log = new RawLog(raw, version)
  raw.sendConnect({ keepalive: 0, ...fields })
  const connack = await raw.next('connack')
  expect(connack.reasonCode ?? connack.returnCode ?? 0).toBe(0)
  return { raw, log, connack }
}

async function subscribe (raw: RawClient, subscriptions: Array<{ topic: string, qos: 0 | 1 | 2 }>, messageId = 1): Promise<void> {
  raw.send({ cmd: 'subscribe', messageId, subscriptions })
  const suback = await raw.next('suback')
  expect(suback.granted).toEqual(subscriptions.map((s) => s.qos))
}

/** Publishes in order, each once the broker has acknowledged the one before. */
async function publishAll (pub: MqttClient, topic: string, payloads: string[], qos: 0 | 1 | 2): Promise<void> {
  for (const p of payloads) await pub.publishAsync(topic, p, { qos })
}

/** Sends a QoS 0 control message on `topic` and waits until `log` has it. */
async function control (pub: MqttClient, log: RawLog, topic: string, payload: string): Promise<void> {
  await pub.publishAsync(topic, payload, { qos: 0 })
  await log.until(() => log.payloads(topic).includes(payload), `control message ${payload}`)
}

function puback (raw: RawClient, p: IPublishPacket): void {
  raw.send({ cmd: 'puback', messageId: p.messageId as number, reasonCode: 0 })
}

describe('MQTT 5 Receive Maximum toward the client', () => {
  it('sends at most Receive Maximum QoS 1 messages unacknowledged; each PUBACK lets exactly one more through, in order', async () => {
    broker = await startBroker()
    const { raw, log } = await openRaw(broker, { clientId: 'rm-raw', properties: { receiveMaximum: 2 } })
    await subscribe(raw, [{ topic: 'rm/data', qos: 1 }, { topic: 'rm/ctl', qos: 0 }])
    // A second subscriber: once it has all five, the broker has handed all five to rm-raw too.
    const watcher = await connect(broker.mqttUrl, { clientId: 'rm-watcher' })
    await watcher.subscribeAsync('rm/data', { qos: 1 })
    const watched = collect(watcher, 5)
    const pub = await connect(broker.mqttUrl, { clientId: 'rm-pub' })
    await publishAll(pub, 'rm/data', ['m0', 'm1', 'm2', 'm3', 'm4'], 1)
    await watched

    await log.count('rm/data', 2)
    await control(pub, log, 'rm/ctl', 'c1')
    await passTime(NEGATIVE_WAIT_MS)
    expect(log.payloads('rm/data')).toEqual(['m0', 'm1'])

    puback(raw, log.publishes('rm/data')[0] as IPublishPacket)
    await log.count('rm/data', 3)
    await control(pub, log, 'rm/ctl', 'c2')
    await passTime(NEGATIVE_WAIT_MS)
    expect(log.payloads('rm/data')).toEqual(['m0', 'm1', 'm2'])

    puback(raw, log.publishes('rm/data')[1] as IPublishPacket)
    puback(raw, log.publishes('rm/data')[2] as IPublishPacket)
    await log.count('rm/data', 5)
    expect(log.payloads('rm/data')).toEqual(['m0', 'm1', 'm2', 'm3', 'm4'])
    expect(log.publishes('rm/data').every((p) => p.qos === 1 && p.dup === false)).toBe(true)
  })

  it('counts a QoS 2 message until PUBCOMP (not PUBREC); a PUBREC with a failure reason code frees its slot', async () => {
    broker = await startBroker()
    const { raw, log } = await openRaw(broker, { clientId: 'rm-q2', properties: { receiveMaximum: 1 } })
    await subscribe(raw, [{ topic: 'q2/data', qos: 2 }, { topic: 'q2/ctl', qos: 0 }])
    const watcher = await connect(broker.mqttUrl, { clientId: 'q2-watcher' })
    await watcher.subscribeAsync('q2/data', { qos: 2 })
    const watched = collect(watcher, 3)
    const pub = await connect(broker.mqttUrl, { clientId: 'q2-pub' })
    await publishAll(pub, 'q2/data', ['x0', 'x1', 'x2'], 2)
    await watched

    await log.count('q2/data', 1)
    const x0 = log.publishes('q2/data')[0] as IPublishPacket
    expect(x0.qos).toBe(2)
    raw.send({ cmd: 'pubrec', messageId: x0.messageId as number, reasonCode: 0 })
    const pubrel = await raw.next('pubrel')
    expect(pubrel.messageId).toBe(x0.messageId)
    await control(pub, log, 'q2/ctl', 'c1')
    await passTime(NEGATIVE_WAIT_MS)
    expect(log.payloads('q2/data')).toEqual(['x0'])

    raw.send({ cmd: 'pubcomp', messageId: x0.messageId as number, reasonCode: 0 })
    await log.count('q2/data', 2)
    const x1 = log.publishes('q2/data')[1] as IPublishPacket
    expect(x1.payload.toString()).toBe('x1')
    // MQTT 5 §4.3.3: a PUBREC >= 0x80 ends the exchange; the slot is free again.
    raw.send({ cmd: 'pubrec', messageId: x1.messageId as number, reasonCode: 0x80 })
    await log.count('q2/data', 3)
    expect(log.payloads('q2/data')).toEqual(['x0', 'x1', 'x2'])
  })

  it('leaves MQTT 3.1.1 clients alone: a client that acknowledges nothing still gets every message', async () => {
    broker = await startBroker()
    const { raw, log } = await openRaw(broker, { clientId: 'rm-v4' }, 4)
    await subscribe(raw, [{ topic: 'v4/data', qos: 1 }])
    const pub = await connect(broker.mqttUrl, { clientId: 'v4-pub' })
    const payloads = Array.from({ length: 20 }, (_, i) => `m${i}`)
    await publishAll(pub, 'v4/data', payloads, 1)
    await log.count('v4/data', 20)
    expect(log.payloads('v4/data')).toEqual(payloads)
  })

  // MQTT.js acknowledges each message before it reads the next, so it cannot show the window
  // itself (the raw-socket tests do); this is the many-messages run: order kept, nothing lost.
  it('an MQTT.js client with Receive Maximum 5 gets 200 QoS 1 messages published at once, in order, none lost', async () => {
    broker = await startBroker()
    const sub = await connect5(broker.mqttUrl, { clientId: 'rm-js', properties: { receiveMaximum: 5 } })
    await sub.subscribeAsync('js/data', { qos: 1 })
    const received = collect(sub, 200, 15_000)
    const pub = await connect5(broker.mqttUrl, { clientId: 'rm-js-pub' })
    const payloads = Array.from({ length: 200 }, (_, i) => `m${i}`)
    await Promise.all(payloads.map((p) => pub.publishAsync('js/data', p, { qos: 1 })))
    const got = await received
    expect(got.map((m) => m.payload)).toEqual(payloads)
    expect(got.every((m) => m.qos === 1 && !m.dup)).toBe(true)
  })

  it('works the same over WebSocket (Receive Maximum 1, QoS 1 and 2 mixed)', async () => {
    broker = await startBroker()
    const sub = await connect5(broker.wsUrl, { clientId: 'rm-ws', properties: { receiveMaximum: 1 } })
    await sub.subscribeAsync('ws/data', { qos: 2 })
    const received = collect(sub, 50)
    const pub = await connect5(broker.mqttUrl, { clientId: 'rm-ws-pub' })
    const payloads = Array.from({ length: 50 }, (_, i) => `m${i}`)
    await Promise.all(payloads.map((p, i) => pub.publishAsync('ws/data', p, { qos: i % 2 === 0 ? 1 : 2 })))
    const got = (await received).map((m) => `${m.payload}@${m.qos}`)
    const sent = payloads.map((p, i) => `${p}@${i % 2 === 0 ? 1 : 2}`)
    // Ordered per QoS [MQTT-4.6.0-6]: aedes itself may publish a burst's QoS 1 and QoS 2 messages
    // in another order than they came (QoS 2 waits for a store write first).
    for (const qos of ['@1', '@2']) expect(got.filter((m) => m.endsWith(qos))).toEqual(sent.filter((m) => m.endsWith(qos)))
    expect(got).toHaveLength(50)
  })

  it('does not lose held messages to aedes\' per-client dedupe when a QoS 0 message or an overlapping subscription overtakes them', async () => {
    broker = await startBroker()
    const { raw, log } = await openRaw(broker, { clientId: 'rm-dd', properties: { receiveMaximum: 1 } })
    // dd/# and dd/+ overlap: each message is delivered once. z/+ at QoS 0 is never held.
    await subscribe(raw, [{ topic: 'dd/#', qos: 1 }, { topic: 'dd/+', qos: 1 }, { topic: 'z/+', qos: 0 }])
    const watcher = await connect(broker.mqttUrl, { clientId: 'dd-watcher' })
    await watcher.subscribeAsync('dd/x', { qos: 1 })
    const watched = collect(watcher, 3)
    const pub = await connect(broker.mqttUrl, { clientId: 'dd-pub' })
    await publishAll(pub, 'dd/x', ['d0', 'd1', 'd2'], 1)
    await watched
    // Published after d1 and d2 (a higher broker counter), sent before them.
    await control(pub, log, 'z/a', 'late-qos0')

    for (let i = 0; i < 3; i++) {
      await log.count('dd/x', i + 1)
      puback(raw, log.publishes('dd/x')[i] as IPublishPacket)
    }
    await control(pub, log, 'z/a', 'end')
    await passTime(NEGATIVE_WAIT_MS)
    expect(log.payloads('dd/x')).toEqual(['d0', 'd1', 'd2'])
  })

  it('does not send a held message whose Message Expiry Interval ran out while it waited; others get what is left of theirs', async () => {
    broker = await startBroker()
    const { raw, log } = await openRaw(broker, { clientId: 'rm-exp', properties: { receiveMaximum: 1 } })
    await subscribe(raw, [{ topic: 'exp/data', qos: 1 }])
    const watcher = await connect(broker.mqttUrl, { clientId: 'exp-watcher' })
    await watcher.subscribeAsync('exp/data', { qos: 1 })
    const watched = collect(watcher, 3)
    const pub = await connect5(broker.mqttUrl, { clientId: 'exp-pub' })
    await pub.publishAsync('exp/data', 'first', { qos: 1 })
    await pub.publishAsync('exp/data', 'short-lived', { qos: 1, properties: { messageExpiryInterval: 1 } })
    await pub.publishAsync('exp/data', 'long-lived', { qos: 1, properties: { messageExpiryInterval: 600 } })
    await watched
    await log.count('exp/data', 1)
    // The feature under test is a clock: let the 1 s interval run out while the message is held.
    await passTime(1200)
    puback(raw, log.publishes('exp/data')[0] as IPublishPacket)
    await log.count('exp/data', 2)
    const [first, next] = log.publishes('exp/data') as [IPublishPacket, IPublishPacket]
    expect(first.payload.toString()).toBe('first')
    expect(next.payload.toString()).toBe('long-lived')
    expect(next.properties?.messageExpiryInterval).toBeLessThan(600)
    expect(next.properties?.messageExpiryInterval).toBeGreaterThan(590)
  })

  describe.each(['memory', 'os'] as const)('a resumed persistent session (durability %s)', (durability) => {
    it('sends the queue it resumes with at most Receive Maximum at a time, then the messages that came meanwhile, in order', async () => {
      broker = await startBroker({ storage: durability === 'memory' ? { durability } : { durability, dir: freshDir() } })
      const session = { clientId: 'rm-back', clean: false, properties: { sessionExpiryInterval: 300 } }
      const first = await openRaw(broker, session)
      await subscribe(first.raw, [{ topic: 'bk/data', qos: 1 }, { topic: 'bk/ctl', qos: 0 }])
      first.raw.send({ cmd: 'disconnect', reasonCode: 0 })
      await first.raw.waitClosed()

      // Once the watcher has them all, they are in rm-back's queue (aedes queues before it delivers).
      const watcher = await connect(broker.mqttUrl, { clientId: 'bk-watcher' })
      await watcher.subscribeAsync('bk/data', { qos: 1 })
      const watched = collect(watcher, 6)
      const pub = await connect(broker.mqttUrl, { clientId: 'bk-pub' })
      const queued = ['b0', 'b1', 'b2', 'b3', 'b4', 'b5']
      await publishAll(pub, 'bk/data', queued, 1)
      await watched

      const { raw, log, connack } = await openRaw(broker, { ...session, properties: { ...session.properties, receiveMaximum: 2 } })
      expect(connack.sessionPresent).toBe(true)
      await log.count('bk/data', 2)
      // The broker reads and answers this connection (positive control), and still sends no third.
      raw.send({ cmd: 'pingreq' })
      await raw.next('pingresp')
      await passTime(NEGATIVE_WAIT_MS)
      expect(log.payloads('bk/data')).toEqual(['b0', 'b1'])

      // A live message while the queue is still going out: it comes after the queue.
      const watchedLive = collect(watcher, 1)
      await pub.publishAsync('bk/data', 'live', { qos: 1 })
      await watchedLive
      await passTime(NEGATIVE_WAIT_MS)
      expect(log.payloads('bk/data')).toEqual(['b0', 'b1'])

      for (let i = 0; i < 7; i++) {
        await log.count('bk/data', Math.min(i + 2, 7))
        puback(raw, log.publishes('bk/data')[i] as IPublishPacket)
        expect(log.publishes('bk/data').length).toBeLessThanOrEqual(i + 2)
      }
      await control(pub, log, 'bk/ctl', 'end')
      expect(log.payloads('bk/data')).toEqual([...queued, 'live'])
    })
  })

  it('closes the connection when held messages pass limits.maxClientBufferBytes; a persistent session keeps them', async () => {
    broker = await startBroker({ limits: { maxClientBufferBytes: 65_536 } })
    const session = { clientId: 'rm-full', clean: false, properties: { sessionExpiryInterval: 300 } }
    const { raw } = await openRaw(broker, { ...session, properties: { ...session.properties, receiveMaximum: 1 } })
    await subscribe(raw, [{ topic: 'full/data', qos: 1 }])
    const pub = await connect(broker.mqttUrl, { clientId: 'full-pub' })
    const payloads = Array.from({ length: 12 }, (_, i) => `${i}`.padEnd(8192, '.'))
    await publishAll(pub, 'full/data', payloads, 1)
    await raw.waitClosed()

    const back = await connect5(broker.mqttUrl, { ...session })
    const got = await collect(back, 12)
    expect(got.map((m) => m.payload)).toEqual(payloads)
  })
})

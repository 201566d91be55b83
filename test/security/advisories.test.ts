import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { ErrorWithSubackPacket, MqttClient } from 'mqtt'
import type { Packet } from 'mqtt-packet'
import { afterAll, afterEach, describe, expect, it } from 'vitest'
import { startBroker, type TestBroker } from '../helpers/broker.js'
import { collect, connect, endAllClients, eventually, withTimeout, type Received } from '../helpers/clients.js'
import { scrapeMetric } from '../helpers/metrics.js'
import { RawClient } from '../helpers/raw.js'
import { passTime } from '../mqtt5/v5-client.js'
import { openStore } from '../../src/store/open.js'
import { LevelPersistence } from '../../src/store/persistence.js'

/*
 * The three security advisories that aedes 1.2.0 fixed and aedes 2.0.0-beta.1 does not carry
 * (docs/notes/issue-6-aedes-2-beta-spike.md §4). FerryMQ closes them in its own code; each test
 * here drives the attack over real sockets and fails without the mitigation it names:
 *
 * - GHSA-52qw-whmv-87c5: null-prototype aedes.clients/brokers (createAedes) and
 *   client.subscriptions/duplicates (guardClient), the "__proto__" filter replaced in a
 *   multi-filter SUBSCRIBE (guardClient) and refused (authorizeSubscribe), refused filters not
 *   stored (guards.ts addSubscriptions).
 * - GHSA-p8r9-qf8w-p73r: cleanIncoming on a clean start (authenticate) and when a session ends at
 *   disconnect (clientDisconnect in memory mode, SessionKeeper with a store).
 * - GHSA-5jvp-3p2v-5qgf: the inbound QoS 2 cap (guards.ts incomingStorePacket, released by
 *   incomingDelPacket, cleared by cleanIncoming, seeded from the store at start).
 * - Both, after a session expired: the next session with the same id starts without the old
 *   one's inbound QoS 2 messages and their slots.
 *
 * Where the persistence is involved, every scenario runs on aedes' in-memory persistence
 * ('memory') and on FerryMQ's LevelPersistence ('os', a temporary data directory).
 */

type Durability = 'memory' | 'os'
const DURABILITIES: Durability[] = ['memory', 'os']
const VERSIONS = [4, 5] as const

/** SUBACK failure codes: 3.1.1 has only 0x80; MQTT 5 says "Not authorized" (0x87). */
const SUBACK_FAILURE = { 4: 0x80, 5: 0x87 } as const
const RECEIVE_MAXIMUM_EXCEEDED = 0x93

const dirs: string[] = []
const brokers: TestBroker[] = []
const raws: RawClient[] = []

afterEach(async () => {
  for (const r of raws.splice(0)) r.destroy()
  await endAllClients()
  for (const b of brokers.splice(0)) await b.close()
})
afterAll(() => { for (const d of dirs) rmSync(d, { recursive: true, force: true }) })

let unique = 0
function fresh (prefix: string): string {
  return `${prefix}-${++unique}`
}

interface Started { b: TestBroker, dir: string | undefined }

/** A broker of the test's own on the given durability ('os': a fresh temporary data directory unless `dir` is given). */
async function start (durability: Durability, limits: Record<string, unknown> = {}, dir?: string): Promise<Started> {
  let dataDir = dir
  if (durability === 'os' && dataDir === undefined) {
    dataDir = mkdtempSync(join(tmpdir(), 'ferrymq-advisories-'))
    dirs.push(dataDir)
  }
  const b = await startBroker({ storage: durability === 'os' ? { durability: 'os', dir: dataDir } : { durability: 'memory' }, limits })
  brokers.push(b)
  return { b, dir: dataDir }
}

/**
 * A client that is no part of the attack: `check()` publishes a fresh message to itself and waits
 * for it, showing the broker is still up and routing. A crash of the broker (an uncaught exception
 * or unhandled rejection in this process) also fails the run on its own.
 */
async function bystander (b: TestBroker): Promise<{ client: MqttClient, check: () => Promise<void> }> {
  const client = await connect(b.mqttUrl, { clientId: fresh('bystander') })
  await client.subscribeAsync('bystander/ping', { qos: 1 })
  let n = 0
  return {
    client,
    check: async () => {
      const payload = `ping ${++n}`
      const got = collect(client, 1, 5000, (t) => t === 'bystander/ping')
      await client.publishAsync('bystander/ping', payload, { qos: 1 })
      expect((await got)[0]?.payload).toBe(payload)
    },
  }
}

/** A raw client connected (CONNACK 0 awaited) with the given CONNECT fields. */
async function rawConnect (b: TestBroker, version: 4 | 5, fields: Record<string, unknown> = {}): Promise<{ raw: RawClient, sessionPresent: boolean }> {
  const raw = await RawClient.open(b.port('mqtt'), '127.0.0.1', version)
  raws.push(raw)
  raw.sendConnect(fields)
  const connack = await raw.next('connack')
  expect(connack.reasonCode ?? connack.returnCode).toBe(0)
  return { raw, sessionPresent: connack.sessionPresent }
}

/** Fields of a CONNECT whose session outlives the connection (3.1.1 clean 0; MQTT 5 also needs a Session Expiry Interval). */
function persistent (version: 4 | 5, clientId: string): Record<string, unknown> {
  return version === 4 ? { clientId, clean: false } : { clientId, clean: false, properties: { sessionExpiryInterval: 3600 } }
}

/** Ends the connection the polite way (DISCONNECT) and waits until the broker closed it. */
async function disconnect (raw: RawClient): Promise<void> {
  raw.send({ cmd: 'disconnect' })
  await raw.waitClosed()
}

function qos2 (messageId: number, topic = 't', payload = 'p', dup = false): Packet {
  return { cmd: 'publish', qos: 2, dup, retain: false, messageId, topic, payload: Buffer.from(payload) }
}

/** Sends QoS 2 PUBLISHes with these ids (no PUBREL) and waits for a PUBREC for each; returns the PUBREC ids, sorted (the store may answer out of order). */
async function sendQos2 (raw: RawClient, ids: number[], dup = false): Promise<number[]> {
  for (const id of ids) raw.send(qos2(id, 'cap/t', `m${id}`, dup))
  const got: number[] = []
  for (let i = 0; i < ids.length; i++) got.push((await raw.next('pubrec')).messageId as number)
  return got.sort((x, y) => x - y)
}

/** Sends PUBREL for these ids and waits for a PUBCOMP for each; returns the PUBCOMP ids, sorted. */
async function release (raw: RawClient, ids: number[]): Promise<number[]> {
  for (const id of ids) raw.send({ cmd: 'pubrel', messageId: id })
  const got: number[] = []
  for (let i = 0; i < ids.length; i++) got.push((await raw.next('pubcomp')).messageId as number)
  return got.sort((x, y) => x - y)
}

/** Proves the connection is open and served: PINGREQ gets PINGRESP. */
async function expectOpen (raw: RawClient): Promise<void> {
  raw.send({ cmd: 'pingreq' })
  await raw.next('pingresp')
}

/** The subscriptions the broker's persistence holds for a client (what a reconnect would restore); reaches into the broker. */
async function storedSubscriptions (b: TestBroker, clientId: string): Promise<string[]> {
  const aedes = (b.broker as unknown as { aedes: { persistence: { subscriptionsByClient (client: { id: string }): Promise<Array<{ topic: string }>> } } }).aedes
  return (await aedes.persistence.subscriptionsByClient({ id: clientId })).map((s) => s.topic)
}

/** Whether the broker's persistence holds an inbound QoS 2 message of the client under this packet id; reaches into the broker. */
async function holdsInbound (b: TestBroker, clientId: string, messageId: number): Promise<boolean> {
  const aedes = (b.broker as unknown as { aedes: { persistence: { incomingGetPacket (client: { id: string }, packet: { messageId: number }): Promise<unknown> } } }).aedes
  return await aedes.persistence.incomingGetPacket({ id: clientId }, { messageId }).then(() => true, () => false)
}

const range = (from: number, to: number): number[] => Array.from({ length: to - from + 1 }, (_, i) => from + i)

/** Connections closed for the inbound QoS 2 cap (0 while the labelled sample does not exist yet). */
async function inflightClosed (b: TestBroker): Promise<number> {
  return await scrapeMetric(b.httpUrl, 'ferrymq_protocol_errors_total{reason="inflight_inbound"}') ?? 0
}

// -------------------------------------------------------------------------------------------------

describe('GHSA-52qw-whmv-87c5: names of Object.prototype members as client ids and topic filters', () => {
  const names = ['constructor', '__proto__', 'toString', 'hasOwnProperty', 'valueOf']

  describe.each(DURABILITIES)('on durability %s', (durability) => {
    it.each(VERSIONS)('clients with such ids connect and take over their own sessions (MQTT version %i)', async (version) => {
      const { b } = await start(durability)
      const other = await bystander(b)
      for (const name of names) {
        const first = await connect(b.mqttUrl, { clientId: name, protocolVersion: version })
        const firstClosed = withTimeout(new Promise<void>((resolve) => first.once('close', () => resolve())), 5000, `the first "${name}" to be closed`)
        const second = await connect(b.mqttUrl, { clientId: name, protocolVersion: version })
        // The same id again: the first connection is closed, the second one works.
        await firstClosed
        await second.subscribeAsync(`${name}/taken-over`, { qos: 1 })
        const got = collect(second, 1)
        await other.client.publishAsync(`${name}/taken-over`, `to ${name}`, { qos: 1 })
        expect((await got)[0]).toMatchObject({ topic: `${name}/taken-over`, payload: `to ${name}` })
        await second.endAsync()
        await other.check()
      }
    })

    it.each(VERSIONS)('persistent sessions with such ids keep their subscriptions and queued messages (MQTT version %i)', async (version) => {
      const { b } = await start(durability)
      const other = await bystander(b)
      for (const name of names) {
        const first = await rawConnect(b, version, persistent(version, name))
        first.raw.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: `${name}/queued`, qos: 1 }] })
        expect(await first.raw.next('suback')).toMatchObject({ granted: [1] })
        await disconnect(first.raw)
        await other.client.publishAsync(`${name}/queued`, `while away ${name}`, { qos: 1 })
        const again = await rawConnect(b, version, persistent(version, name))
        expect(again.sessionPresent).toBe(true)
        const queued = await again.raw.next('publish')
        expect([queued.topic, queued.payload.toString()]).toEqual([`${name}/queued`, `while away ${name}`])
        again.raw.send({ cmd: 'puback', messageId: queued.messageId as number })
        await disconnect(again.raw)
        // A clean start ends the session.
        const clean = await rawConnect(b, version, { clientId: name, clean: true })
        expect(clean.sessionPresent).toBe(false)
        await disconnect(clean.raw)
        await other.check()
      }
    })

    it.each(VERSIONS)('subscribing to "constructor" and "toString/+" works, in one SUBSCRIBE each and together; unsubscribing "constructor" works (MQTT version %i)', async (version) => {
      const { b } = await start(durability)
      const other = await bystander(b)
      const c = await connect(b.mqttUrl, { clientId: fresh('proto-subs'), protocolVersion: version })
      // One filter per SUBSCRIBE: aedes looks the filter up in client.subscriptions.
      expect((await c.subscribeAsync('constructor', { qos: 1 })).map((g) => g.qos)).toEqual([1])
      expect((await c.subscribeAsync('toString/+', { qos: 1 })).map((g) => g.qos)).toEqual([1])
      // Several filters in one SUBSCRIBE: aedes' dedupe keys a plain object by filter.
      expect((await c.subscribeAsync(['hasOwnProperty', 'valueOf/+'], { qos: 1 })).map((g) => g.qos)).toEqual([1, 1])
      // Subscribing to the same filter again (aedes replaces the existing subscription).
      expect((await c.subscribeAsync('constructor', { qos: 0 })).map((g) => g.qos)).toEqual([0])
      await other.check()

      const got = collect(c, 4)
      await other.client.publishAsync('constructor', 'to constructor', { qos: 1 })
      await other.client.publishAsync('toString/x', 'below toString', { qos: 1 })
      await other.client.publishAsync('hasOwnProperty', 'to hasOwnProperty', { qos: 1 })
      await other.client.publishAsync('valueOf/y', 'below valueOf', { qos: 1 })
      expect((await got).map((m) => `${m.topic}=${m.payload}`)).toEqual([
        'constructor=to constructor', 'toString/x=below toString', 'hasOwnProperty=to hasOwnProperty', 'valueOf/y=below valueOf',
      ])

      await c.unsubscribeAsync('constructor')
      await c.unsubscribeAsync('__proto__') // never subscribed: still a plain UNSUBACK
      const after = collect(c, 1)
      await other.client.publishAsync('constructor', 'after unsubscribe', { qos: 1 })
      await other.client.publishAsync('toString/x', 'control', { qos: 1 })
      // The same publisher's messages arrive in order: the control message coming first shows the
      // one to "constructor" was not delivered.
      expect((await after)[0]).toMatchObject({ topic: 'toString/x', payload: 'control' })
      await other.check()
    })

    it.each(VERSIONS)('a SUBSCRIBE listing "__proto__" gets a failure code for it only, stays connected, and its other filters deliver (MQTT version %i)', async (version) => {
      const { b } = await start(durability)
      const other = await bystander(b)
      const { raw } = await rawConnect(b, version, { clientId: fresh('proto-filter') })
      const fail = SUBACK_FAILURE[version]

      raw.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: '__proto__', qos: 1 }, { topic: '__proto__/+', qos: 1 }] })
      expect(await raw.next('suback')).toMatchObject({ messageId: 1, granted: [fail, 1] })
      await expectOpen(raw)
      raw.send({ cmd: 'subscribe', messageId: 2, subscriptions: [{ topic: 'other/+', qos: 1 }, { topic: '__proto__', qos: 0 }] })
      expect(await raw.next('suback')).toMatchObject({ messageId: 2, granted: [1, fail] })
      raw.send({ cmd: 'subscribe', messageId: 3, subscriptions: [{ topic: '__proto__', qos: 1 }] })
      expect(await raw.next('suback')).toMatchObject({ messageId: 3, granted: [fail] })
      raw.send({ cmd: 'unsubscribe', messageId: 4, unsubscriptions: ['__proto__'] })
      expect(await raw.next('unsuback')).toMatchObject({ messageId: 4 })
      await expectOpen(raw)
      await other.check()

      await other.client.publishAsync('__proto__', 'refused filter', { qos: 1 })
      await other.client.publishAsync('__proto__/x', 'below __proto__', { qos: 1 })
      await other.client.publishAsync('other/y', 'other', { qos: 1 })
      // In the publisher's order: nothing on "__proto__" comes before the two granted filters' messages.
      const first = await raw.next('publish')
      const second = await raw.next('publish')
      expect([first, second].map((p) => `${p.topic}=${p.payload.toString()}`)).toEqual(['__proto__/x=below __proto__', 'other/y=other'])
      await expectOpen(raw)
      await other.check()
    })

    describe.each(VERSIONS)('MQTT version %i: a persistent session that subscribed to a list with "__proto__"', (version) => {
      it.each([[['__proto__', 'a']], [['a', '__proto__']], [['__proto__']]])('subscribed %j: the refused filter is not stored, only "a"', async (filters) => {
        const { b } = await start(durability)
        const clientId = fresh('proto-stored')
        const { raw } = await rawConnect(b, version, persistent(version, clientId))
        raw.send({ cmd: 'subscribe', messageId: 1, subscriptions: filters.map((topic) => ({ topic, qos: 1 as const })) })
        expect(await raw.next('suback')).toMatchObject({ granted: filters.map((f) => f === '__proto__' ? SUBACK_FAILURE[version] : 1) })
        await disconnect(raw)
        expect(await storedSubscriptions(b, clientId)).toEqual(filters.filter((f) => f !== '__proto__'))
      })

      if (version === 5) {
        it.each([[['a', 'b'.repeat(40)]], [['b'.repeat(40), 'a']]])('subscribed %j with limits.maxTopicLength 20: the refused filter (0x87) is not stored either', async (filters) => {
          const { b } = await start(durability, { maxTopicLength: 20 })
          const clientId = fresh('long-stored')
          const { raw } = await rawConnect(b, version, persistent(version, clientId))
          raw.send({ cmd: 'subscribe', messageId: 1, subscriptions: filters.map((topic) => ({ topic, qos: 1 as const })) })
          expect(await raw.next('suback')).toMatchObject({ granted: filters.map((f) => f === 'a' ? 1 : 0x87) })
          await disconnect(raw)
          expect(await storedSubscriptions(b, clientId)).toEqual(['a'])
        })
      }

      it.each([[['__proto__', 'a']], [['a', '__proto__']]])('subscribed %j: reconnects with its session, "a" is restored and "__proto__" is not', async (filters) => {
        const started = await start(durability)
        let b = started.b
        const clientId = fresh('proto-session')
        const first = await rawConnect(b, version, persistent(version, clientId))
        first.raw.send({ cmd: 'subscribe', messageId: 1, subscriptions: filters.map((topic) => ({ topic, qos: 1 as const })) })
        expect(await first.raw.next('suback')).toMatchObject({ granted: filters.map((f) => f === '__proto__' ? SUBACK_FAILURE[version] : 1) })
        await disconnect(first.raw)

        const restarts = durability === 'os' ? [false, true] : [false]
        for (const restart of restarts) {
          if (restart) {
            // The session comes back from the data directory too.
            await b.close()
            b = (await start(durability, {}, started.dir)).b
          }
          const other = await bystander(b)
          const before = await scrapeMetric(b.httpUrl, 'ferrymq_subscriptions')
          const again = await rawConnect(b, version, persistent(version, clientId))
          expect(again.sessionPresent).toBe(true)
          await other.check()
          // Only "a" was restored (a refused filter is not stored).
          expect(await scrapeMetric(b.httpUrl, 'ferrymq_subscriptions')).toBe((before ?? 0) + 1)
          await other.client.publishAsync('__proto__', 'refused filter', { qos: 1 })
          await other.client.publishAsync('a', 'restored', { qos: 1 })
          // In the publisher's order: the message on "a" comes first, so none came on "__proto__".
          const got = await again.raw.next('publish')
          expect([got.topic, got.payload.toString()]).toEqual(['a', 'restored'])
          again.raw.send({ cmd: 'puback', messageId: got.messageId as number })
          await disconnect(again.raw)
          await other.check()
          await other.client.endAsync()
        }
      })
    })
  })

  it.each(VERSIONS)('over WebSocket, MQTT version %i: the client id "constructor" subscribes to "toString" and to ["__proto__", "__proto__/+"] (refused for "__proto__" only)', async (version) => {
    const { b } = await start('memory')
    const other = await bystander(b)
    const ws = await connect(b.wsUrl, { clientId: 'constructor', protocolVersion: version })
    expect((await ws.subscribeAsync('toString', { qos: 1 })).map((g) => g.qos)).toEqual([1])
    const granted = await ws.subscribeAsync(['__proto__', '__proto__/+'], { qos: 1 }).then(() => null, (err: ErrorWithSubackPacket) => err.packet.granted)
    expect(granted).toEqual([SUBACK_FAILURE[version], 1])
    const got = collect(ws, 2)
    await other.client.publishAsync('toString', 'to toString', { qos: 1 })
    await other.client.publishAsync('__proto__', 'refused filter', { qos: 1 })
    await other.client.publishAsync('__proto__/x', 'below __proto__', { qos: 1 })
    expect((await got).map((m) => `${m.topic}=${m.payload}`)).toEqual(['toString=to toString', '__proto__/x=below __proto__'])
    await other.check()
  })

  it.each(VERSIONS)('durability os, MQTT version %i: a session stored by FerryMQ on aedes 1.2.0 with the filters "__proto__" and "a" is restored with "a" only', async (version) => {
    // On aedes 1.2.0, "__proto__" was an ordinary filter: write such a session the way it stored one.
    const dir = mkdtempSync(join(tmpdir(), 'ferrymq-advisories-'))
    dirs.push(dir)
    const clientId = fresh('proto-legacy')
    const seed = new LevelPersistence(await openStore(dir, 'os'))
    await seed.setup({ id: 'aedes-1.2.0' })
    await seed.addSubscriptions({ id: clientId }, [{ topic: '__proto__', qos: 1 }, { topic: 'a', qos: 1 }])
    await seed.destroy()

    const { b } = await start('os', {}, dir)
    const other = await bystander(b)
    const before = await scrapeMetric(b.httpUrl, 'ferrymq_subscriptions')
    const { raw, sessionPresent } = await rawConnect(b, version, persistent(version, clientId))
    expect(sessionPresent).toBe(true)
    await other.check()
    expect(await scrapeMetric(b.httpUrl, 'ferrymq_subscriptions')).toBe((before ?? 0) + 1)
    await other.client.publishAsync('__proto__', 'refused filter', { qos: 1 })
    await other.client.publishAsync('a', 'restored', { qos: 1 })
    const got = await raw.next('publish')
    expect([got.topic, got.payload.toString()]).toEqual(['a', 'restored'])
    await expectOpen(raw)
    await other.check()
  })
})

// -------------------------------------------------------------------------------------------------

describe('GHSA-p8r9-qf8w-p73r: a session\'s inbound QoS 2 messages end with it (clean start, or the end of a session at disconnect)', () => {
  describe.each(DURABILITIES)('on durability %s', (durability) => {
    it.each([
      [4, true], [4, false], [5, true], [5, false],
    ] as const)('MQTT version %i, first session clean %s: QoS 2 id 42 without PUBREL, then a clean start re-using id 42 with the same topic and payload is delivered too', async (version, firstClean) => {
      const { b } = await start(durability)
      const sub = await connect(b.mqttUrl, { clientId: fresh('p8r9-sub') })
      await sub.subscribeAsync('t', { qos: 2 })
      const messages: Received[] = []
      sub.on('message', (topic, payload, packet) => { messages.push({ topic, payload: payload.toString(), qos: packet.qos, retain: packet.retain, dup: packet.dup }) })
      const clientId = fresh('p8r9')

      const first = await rawConnect(b, version, firstClean ? { clientId, clean: true } : persistent(version, clientId))
      const once = collect(sub, 1)
      first.raw.send(qos2(42))
      expect(await first.raw.next('pubrec')).toMatchObject({ messageId: 42 })
      // aedes 2.0.0-beta.1 publishes a QoS 2 message when the PUBLISH arrives (not on PUBREL).
      expect((await once).map((m) => m.payload)).toEqual(['p'])
      await disconnect(first.raw) // no PUBREL

      const clean = await rawConnect(b, version, { clientId, clean: true })
      expect(clean.sessionPresent).toBe(false)
      const twice = collect(sub, 1)
      clean.raw.send(qos2(42))
      expect(await clean.raw.next('pubrec')).toMatchObject({ messageId: 42 })
      clean.raw.send({ cmd: 'pubrel', messageId: 42 })
      expect(await clean.raw.next('pubcomp')).toMatchObject({ messageId: 42 })
      // The new session's message is a new message, not a re-send of the old one.
      expect((await twice).map((m) => m.payload)).toEqual(['p'])

      // Exactly twice: a control message from the same client comes next.
      const control = collect(sub, 1)
      clean.raw.send(qos2(43, 't', 'control'))
      expect(await clean.raw.next('pubrec')).toMatchObject({ messageId: 43 })
      expect((await control).map((m) => m.payload)).toEqual(['control'])
      expect(messages.map((m) => m.payload)).toEqual(['p', 'p', 'control'])
    })

    it.each(VERSIONS)('MQTT version %i: a session that ends at disconnect leaves no inbound QoS 2 message behind', async (version) => {
      const { b } = await start(durability)
      const clientId = fresh('p8r9-ends')
      const { raw } = await rawConnect(b, version, { clientId, clean: true })
      raw.send(qos2(42))
      expect(await raw.next('pubrec')).toMatchObject({ messageId: 42 })
      expect(await holdsInbound(b, clientId, 42)).toBe(true)
      await disconnect(raw) // no PUBREL
      // Deleted after the disconnect, asynchronously: only observable by asking.
      await eventually(async () => !(await holdsInbound(b, clientId, 42)), 5000, `the inbound QoS 2 message of ${clientId} to be deleted`)
    })
  })
})

// -------------------------------------------------------------------------------------------------

describe('GHSA-p8r9 and GHSA-5jvp after session expiry: a session that expired leaves no inbound QoS 2 state to the next one', () => {
  const MAX = 5
  // aedes' in-memory mode expires only MQTT 5 sessions (their own Session Expiry Interval).
  const cases = [['memory', 5], ['os', 4], ['os', 5]] as const
  it.each(cases)('durability %s, MQTT version %i: id 42 of the expired session is no duplicate, and the new session has all limits.maxInflightInbound slots', async (durability, version) => {
    const { b } = await start(durability, { maxInflightInbound: MAX, sessionExpirySeconds: 1 })
    const sub = await connect(b.mqttUrl, { clientId: fresh('expiry-sub') })
    await sub.subscribeAsync('t', { qos: 2 })
    const payloads: string[] = []
    sub.on('message', (_topic, payload) => { payloads.push(payload.toString()) })
    const clientId = fresh('expiry')
    const fields = version === 4 ? { clientId, clean: false } : { clientId, clean: false, properties: { sessionExpiryInterval: 1 } }

    const first = await rawConnect(b, version, fields)
    // A subscription, so that CONNACK tells whether the session is still there.
    first.raw.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: 'expiry/x', qos: 1 }] })
    expect(await first.raw.next('suback')).toMatchObject({ granted: [1] })
    first.raw.send(qos2(42))
    for (const id of range(1, MAX - 1)) first.raw.send(qos2(id, 't', `m${id}`))
    for (let i = 0; i < MAX; i++) await first.raw.next('pubrec')
    await disconnect(first.raw) // no PUBREL: MAX messages in flight
    if (durability === 'os') {
      await eventually(async () => (await scrapeMetric(b.httpUrl, 'ferrymq_sessions_expired_total') ?? 0) >= 1, 10_000, 'the session to expire')
    } else {
      // Session expiry is itself a clock (aedes' timer, 1 s); CONNACK below shows it ran.
      await passTime(2000)
    }

    const again = await rawConnect(b, version, fields)
    expect(again.sessionPresent).toBe(false)
    const delivered = collect(sub, 1, 5000, (t) => t === 't')
    again.raw.send(qos2(42))
    expect(await again.raw.next('pubrec')).toMatchObject({ messageId: 42 })
    expect((await delivered).map((m) => m.payload)).toEqual(['p'])
    // The expired session's ids take no slot: MAX - 1 more fresh ids fit.
    expect(await sendQos2(again.raw, range(101, 100 + MAX - 1))).toEqual(range(101, 100 + MAX - 1))
    await expectOpen(again.raw)
    expect(await inflightClosed(b)).toBe(0)
  })
})

// -------------------------------------------------------------------------------------------------

describe('GHSA-5jvp-3p2v-5qgf: at most limits.maxInflightInbound QoS 2 messages awaiting PUBREL per client', () => {
  const MAX = 50

  describe.each(DURABILITIES)('on durability %s', (durability) => {
    it('MQTT 3.1.1: 50 fresh ids get PUBRECs, the 51st closes the connection (counted); a clean start begins again at 0', async () => {
      const { b } = await start(durability, { maxInflightInbound: MAX })
      const other = await bystander(b)
      const clientId = fresh('cap4')
      const { raw } = await rawConnect(b, 4, { clientId })
      expect(await sendQos2(raw, range(1, MAX))).toEqual(range(1, MAX))
      await expectOpen(raw)
      raw.send(qos2(MAX + 1, 'cap/t', 'one too many'))
      await raw.waitClosed()
      // Everything the broker sent arrived before the close: no PUBREC for the 51st.
      expect(raw.packets.filter((p) => p.cmd === 'pubrec')).toEqual([])
      expect(await inflightClosed(b)).toBe(1)
      await other.check()

      // Other ids than before: the old session's ids no longer count.
      const again = await rawConnect(b, 4, { clientId, clean: true })
      expect(await sendQos2(again.raw, range(101, 100 + MAX))).toEqual(range(101, 100 + MAX))
      await expectOpen(again.raw)
    })

    it('MQTT 5: the 51st fresh id gets DISCONNECT 0x93 (Receive Maximum exceeded)', async () => {
      const { b } = await start(durability, { maxInflightInbound: MAX })
      const other = await bystander(b)
      const { raw } = await rawConnect(b, 5, { clientId: fresh('cap5') })
      expect(await sendQos2(raw, range(1, MAX))).toEqual(range(1, MAX))
      raw.send(qos2(MAX + 1, 'cap/t', 'one too many'))
      expect(await raw.next('disconnect')).toMatchObject({ reasonCode: RECEIVE_MAXIMUM_EXCEEDED })
      await raw.waitClosed()
      expect(raw.packets.filter((p) => p.cmd === 'pubrec')).toEqual([])
      expect(await inflightClosed(b)).toBe(1)
      await other.check()
    })

    it.each(VERSIONS)('MQTT version %i: DUP re-sends of ids in flight do not count; PUBRELs free slots for new ids', async (version) => {
      const { b } = await start(durability, { maxInflightInbound: MAX })
      const { raw } = await rawConnect(b, version, { clientId: fresh('cap-dup') })
      expect(await sendQos2(raw, range(1, MAX))).toEqual(range(1, MAX))
      // At the cap, each in-flight id sent again (DUP) is answered and the connection stays.
      expect(await sendQos2(raw, range(1, MAX), true)).toEqual(range(1, MAX))
      await expectOpen(raw)
      // A different message under an id in flight (LevelPersistence takes it as new, aedes' in-memory
      // store as a re-send): it takes no new slot either.
      raw.send(qos2(1, 'cap/t', 'another message under id 1'))
      expect(await raw.next('pubrec')).toMatchObject({ messageId: 1 })
      await expectOpen(raw)
      expect(await release(raw, range(1, 10))).toEqual(range(1, 10))
      // Ten slots free: ten new ids are taken (one of them an id just released), the next one is not.
      expect(await sendQos2(raw, [...range(MAX + 1, MAX + 9), 1])).toEqual([1, ...range(MAX + 1, MAX + 9)])
      await expectOpen(raw)
      expect(await inflightClosed(b)).toBe(0)
      raw.send(qos2(MAX + 10, 'cap/t', 'one too many'))
      if (version === 5) expect(await raw.next('disconnect')).toMatchObject({ reasonCode: RECEIVE_MAXIMUM_EXCEEDED })
      await raw.waitClosed()
      expect(raw.packets.filter((p) => p.cmd === 'pubrec')).toEqual([])
      expect(await inflightClosed(b)).toBe(1)
    })
  })

  it.each(VERSIONS)('durability os, MQTT version %i: the count survives a restart; the session can only send the remaining slots', async (version) => {
    const started = await start('os', { maxInflightInbound: MAX })
    const clientId = fresh('cap-restart')
    const first = await rawConnect(started.b, version, persistent(version, clientId))
    // A subscription makes aedes report the session as present after the restart (CONNACK).
    first.raw.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: 'cap/echo', qos: 1 }] })
    expect(await first.raw.next('suback')).toMatchObject({ granted: [1] })
    expect(await sendQos2(first.raw, range(1, 30))).toEqual(range(1, 30))
    await disconnect(first.raw)
    await started.b.close()

    const { b } = await start('os', { maxInflightInbound: MAX }, started.dir)
    const other = await bystander(b)
    const { raw, sessionPresent } = await rawConnect(b, version, persistent(version, clientId))
    expect(sessionPresent).toBe(true)
    expect(await sendQos2(raw, range(31, MAX))).toEqual(range(31, MAX))
    // An id stored before the restart, sent again, takes no new slot.
    expect(await sendQos2(raw, [1], true)).toEqual([1])
    await expectOpen(raw)
    raw.send(qos2(MAX + 1, 'cap/t', 'one too many'))
    if (version === 5) expect(await raw.next('disconnect')).toMatchObject({ reasonCode: RECEIVE_MAXIMUM_EXCEEDED })
    await raw.waitClosed()
    expect(raw.packets.filter((p) => p.cmd === 'pubrec')).toEqual([])
    expect(await inflightClosed(b)).toBe(1)
    await other.check()
  })
})

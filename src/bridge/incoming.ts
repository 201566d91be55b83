import { Readable } from 'node:stream'
import type { IStore, Packet } from 'mqtt'
import { decode, encode } from '../store/codec.js'
import { key, prefixRange, str, u16 } from '../store/keys.js'
import type { Store } from '../store/open.js'
import { sublevelOf, type StoreOp, type Sublevel } from '../store/writer.js'
import { messageExpiryInterval, messageProperties, type MessageProperties } from './properties.js'

/*
 * The bridge's inbound QoS 2 state, on disk:
 *
 *   n  bridge incoming   str(bridge) ‖ u16(packet id) → the PUBLISH received from the upstream
 *
 * MQTT.js puts an inbound QoS 2 PUBLISH here before it answers PUBREC, and hands it over
 * (handleMessage) when the PUBREL comes. With its in-memory default, a restart between the two
 * loses the message: the upstream has had its PUBREC and only sends PUBREL, which MQTT.js then
 * answers with PUBCOMP without delivering anything. Kept on disk, the PUBREL finds it.
 *
 * An entry is a MessagePack map: topic, payload, qos, retain, messageId, and only when the PUBLISH
 * had them (MQTT 5) `properties`, the application message's (see properties.ts), and
 * `messageExpiry`, the absolute deadline (ms since the epoch) of its Message Expiry Interval, so
 * the time spent waiting for the PUBREL (a restart included) counts. Entries written without
 * them (older builds) decode as messages without properties.
 */

interface StoredPublish {
  topic: string
  payload: Buffer
  qos: number
  retain: boolean
  messageId: number
  properties?: MessageProperties
  /** ms since the epoch: when the message expires (MQTT 5 Message Expiry Interval from its arrival). */
  messageExpiry?: number
}

export class IncomingStore implements IStore {
  readonly #store: Store
  readonly #entries: Sublevel
  readonly #prefix: Buffer
  /** Called when a put fails: the link is closed, so no PUBREC goes out for what was not written. */
  readonly #failed: (err: Error) => void

  constructor (store: Store, bridge: string, failed: (err: Error) => void) {
    this.#store = store
    this.#entries = sublevelOf(store.db, 'n')
    this.#prefix = str(bridge)
    this.#failed = failed
  }

  put (packet: Packet, cb: (err?: Error) => void): this {
    const p = packet as unknown as StoredPublish & { properties?: unknown }
    const properties = messageProperties(p.properties)
    const interval = messageExpiryInterval(p.properties)
    const stored: StoredPublish = {
      topic: p.topic,
      payload: Buffer.from(p.payload),
      qos: p.qos,
      retain: p.retain,
      messageId: p.messageId,
      ...(properties === undefined ? {} : { properties }),
      ...(interval === undefined ? {} : { messageExpiry: Date.now() + interval * 1000 }),
    }
    const value = encode(stored)
    this.#store.writer.write([{ type: 'put', sublevel: this.#entries, key: this.#key(p.messageId), value }]).then(() => cb(), (err: Error) => {
      // MQTT.js sends PUBREC whatever the put reports: not calling back keeps it from acknowledging.
      this.#failed(err)
    })
    return this
  }

  get (packet: Pick<Packet, 'messageId'>, cb: (err?: Error, packet?: Packet) => void): this {
    this.#entries.get(this.#key(packet.messageId ?? 0)).then((value) => {
      if (value === undefined) return cb(new Error('missing packet'))
      const p = decode<StoredPublish>(value)
      cb(undefined, { cmd: 'publish', dup: false, ...p } as unknown as Packet)
    }, (err: Error) => cb(err))
    return this
  }

  del (packet: Pick<Packet, 'messageId'>, cb: (err?: Error, packet?: Packet) => void): this {
    this.#store.writer.write([{ type: 'del', sublevel: this.#entries, key: this.#key(packet.messageId ?? 0) }])
      .then(() => cb(undefined, packet as Packet), (err: Error) => cb(err))
    return this
  }

  createStream (): ReturnType<IStore['createStream']> {
    return Readable.from([]) as unknown as ReturnType<IStore['createStream']>
  }

  close (cb: () => void): void {
    cb()
  }

  /** Forgets every entry (the upstream did not resume the session, so no PUBREL will come). */
  async clear (): Promise<void> {
    const keys = await this.#entries.keys(prefixRange(this.#prefix)).all()
    if (keys.length === 0) return
    await this.#store.writer.write(keys.map((k) => ({ type: 'del' as const, sublevel: this.#entries, key: k })))
  }

  /**
   * The write that forgets a message's entry, for the batch that queues its local copies: after a
   * crash the PUBREL then finds the entry exactly when the message was not queued (delivered once).
   */
  deleteOp (messageId: number): StoreOp {
    return { type: 'del', sublevel: this.#entries, key: this.#key(messageId) }
  }

  #key (messageId: number): Buffer {
    return key(this.#prefix, u16(messageId))
  }
}

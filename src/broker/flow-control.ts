import type { EventEmitter } from 'node:events'
import type { Duplex } from 'node:stream'
import type { Client } from 'aedes'
import type { MeteredConnection } from '../transport/packet-meter.js'

/**
 * MQTT 5 Receive Maximum toward the client (MQTT 5 §3.3.4 and §4.9 "Flow Control"): at most
 * `client.receiveMaximum` QoS 1/2 PUBLISH packets sent to a client and not yet acknowledged
 * (PUBACK, PUBCOMP, or a PUBREC with a failure reason code). aedes 2.0.0-beta.1 records the value
 * from CONNECT but does not enforce it; this module does, per connection, for MQTT 5 clients only.
 *
 * How:
 * - It is armed by the CONNECT packet itself (a listener on aedes' parser). A 3.1/3.1.1 CONNECT
 *   disarms it: those connections keep aedes' delivery functions untouched.
 * - For MQTT 5, `client.deliverQoS` is wrapped before aedes handles the CONNECT, so every
 *   subscription (restored or new) and every retained delivery goes through the wrapper. A QoS 1/2
 *   delivery goes on to aedes while the window has room and nothing is held; otherwise it is held,
 *   in arrival order, and let through as acknowledgements come in.
 * - "Sent" is counted where it happens: the packet meter reports each QoS 1/2 PUBLISH written to
 *   the connection. Deliveries that aedes ends up not writing (No Local, authorizeForward null, a
 *   downgrade to QoS 0, a closed connection) thus never take a slot for long.
 * - A resumed session's queue (aedes' emptyQueue writes it with write(), not deliverQoS) is gated
 *   through the persistence's outgoingUpdate, which aedes calls for each queued message before it
 *   writes it: that call is answered only once the window has room. Live deliveries wait until
 *   the queue has gone out, so the client gets the older messages first.
 *
 * A held delivery's callback is called at once: aedes' publish completes once all deliveries have
 * called back, and a client that does not acknowledge must not stall its publishers. The messages
 * themselves are still safe: a persistent session's copy is in its store queue (aedes enqueues
 * before it delivers), so if the connection closes with messages held, the next connection gets
 * them from the queue; a clean session's held messages end with it, as aedes' unsent ones do.
 *
 * Held messages are bounded like a slow subscriber's unsent bytes (broker.ts authorizeForward):
 * when held bytes plus unsent bytes pass `maxBufferBytes`, the connection is closed.
 *
 * QoS 0 messages are never held (MQTT 5 §4.9 lets a sender go on with QoS 0 when its quota is
 * used up); they can therefore overtake held QoS 1/2 messages. Order among QoS 1/2 messages is kept.
 *
 * Known limits:
 * - The count is conservative: a message let through takes a slot from when it is handed to aedes;
 *   once written it also counts as in flight, so until aedes reports the write complete (one
 *   setImmediate later, or after a drain) it counts twice. The window is never exceeded by this;
 *   it is briefly used short.
 * - Acknowledgements are counted, not matched to packet ids (as §4.9 describes the send quota). A
 *   PUBCOMP that answers a PUBREL re-sent from the previous connection frees a slot that no PUBLISH
 *   of this connection took (the count stays >= 0): the window may then be exceeded by one per
 *   such PUBREL. A client that acknowledges an id twice can do the same to itself.
 * - While a resumed session's queue goes out, aedes has not finished the CONNECT: its
 *   'clientReady' event (FerryMQ's session record) comes once the queue is out, which with a
 *   small Receive Maximum waits for the client's acknowledgements. The client is registered
 *   (takeover, session expiry and held wills see it) from before CONNACK, as without this module.
 * - A held message whose expiry passed is not sent; a persistent session's stored copy of it then
 *   stays queued until the next connection, where aedes drops it as expired.
 */

/** Receive Maximum when the CONNECT does not carry one. */
const RECEIVE_MAXIMUM_DEFAULT = 65_535
/** MQTT 5 reason codes from 0x80 are failures; a PUBREC with one ends the QoS 2 exchange. */
const FAILURE = 0x80
/** Bytes a held message is counted for beyond its topic and payload (the packet object, properties). */
const HELD_OVERHEAD = 64

type Callback = () => void

/** The fields of aedes' delivery packets (aedes-packet) this module reads or sets. */
interface DeliveryPacket {
  cmd?: string
  topic: string
  payload: Buffer | string
  qos: number
  nl?: boolean
  clientId?: string
  brokerId?: string | null
  brokerCounter?: number
  /** Absolute expiry (ms since the epoch), set by aedes from the Message Expiry Interval. */
  messageExpiry?: number
  properties?: Record<string, unknown>
  /** aedes' QoSPacket: called once the packet is written, or once aedes decided not to write it. */
  writeCallback?: unknown
}

type Deliver = (packet: DeliveryPacket, cb: Callback) => void

/** What the broker's persistence (FerryMQ's LevelPersistence or aedes' in-memory one) offers here. */
interface OutgoingPersistence {
  outgoingUpdate (client: object, packet: DeliveryPacket): Promise<unknown>
}

/** aedes 2.0.0-beta.1 Client internals used here (lib/client.js). */
interface AedesClient extends EventEmitter {
  id: string | null
  connected: boolean
  receiveMaximum?: number
  conn: Duplex
  deliverQoS: Deliver
  _parser: EventEmitter
  broker: { persistence: OutgoingPersistence }
}

export interface ReceiveMaximumOptions {
  /** The connection's packet meter: it reports each outgoing PUBLISH and the bytes not yet flushed. */
  meter: Pick<MeteredConnection, 'pendingBytes' | 'onPublishOut'>
  /** limits.maxClientBufferBytes: past this many held plus unsent bytes the connection is closed. */
  maxBufferBytes: number
  /** Called once, before the connection is closed for too many held messages; `bytes`: held plus unsent. */
  onOverflow?: (client: Client, bytes: number) => void
}

/** Per open MQTT 5 connection (by aedes Client), its flow; read by the persistence gate. */
const flows = new WeakMap<object, Flow>()
/** Persistences whose outgoingUpdate is gated already (once per broker). */
const gated = new WeakSet<object>()
/** The callbacks this module hands to aedes' deliverQoS: their outgoingUpdate calls are not the queue's. */
const ownCallbacks = new WeakSet<object>()

/**
 * Enforces the MQTT 5 Receive Maximum on one connection. Call it right after `aedes.handle()`
 * returns the Client, before the CONNECT is read. Costs nothing for MQTT 3.1/3.1.1 connections
 * beyond one listener call on their CONNECT.
 */
export function installReceiveMaximum (client: Client, options: ReceiveMaximumOptions): void {
  const raw = client as unknown as AedesClient
  const onFirstPacket = (packet: { cmd?: string, protocolVersion?: number }): void => {
    raw._parser.removeListener('packet', onFirstPacket)
    // Before aedes handles it (prepended): no subscription exists yet, none can miss the wrapper.
    if (packet.cmd === 'connect' && packet.protocolVersion === 5) new Flow(raw, options)
  }
  raw._parser.prependListener('packet', onFirstPacket)
}

interface Held { packet: DeliveryPacket, bytes: number }
interface QueuedSend { packet: DeliveryPacket, go: Callback }

class Flow {
  /** QoS 1/2 PUBLISH packets written to the connection and not acknowledged yet. */
  private inflight = 0
  /** Deliveries (and queued messages) let through whose write, or aedes' decision not to write, has not come yet. */
  private unsettled = 0
  /** Held deliveries, oldest first, from `head` on. */
  private held: Array<Held | undefined> = []
  private head = 0
  private heldBytes = 0
  /** Messages of the resumed session's queue waiting for room (aedes sends them one at a time). */
  private readonly queued: QueuedSend[] = []
  private closed = false
  private overflowed = false
  private readonly deliver: Deliver

  constructor (private readonly client: AedesClient, private readonly options: ReceiveMaximumOptions) {
    this.deliver = client.deliverQoS
    client.deliverQoS = (packet, cb) => this.onDelivery(packet, cb)
    options.meter.onPublishOut((qos) => { if (qos > 0) this.inflight++ })
    client._parser.prependListener('packet', (packet: { cmd?: string, reasonCode?: number }) => {
      if (packet.cmd === 'puback' || packet.cmd === 'pubcomp' || (packet.cmd === 'pubrec' && (packet.reasonCode ?? 0) >= FAILURE)) this.acknowledged()
    })
    // aedes emits 'connected' once the resumed session's queue has been sent: live deliveries go on.
    client.once('connected', () => this.pump())
    client.conn.once('close', () => this.close())
    flows.set(client, this)
    gateQueuedSends(client.broker.persistence)
  }

  private get receiveMaximum (): number {
    return this.client.receiveMaximum ?? RECEIVE_MAXIMUM_DEFAULT
  }

  private hasRoom (): boolean {
    return this.inflight + this.unsettled < this.receiveMaximum
  }

  private get heldCount (): number {
    return this.held.length - this.head
  }

  private onDelivery (packet: DeliveryPacket, cb: Callback): void {
    if (this.overflowed) {
      // The connection is being closed; a persistent session keeps the message in its queue.
      setImmediate(cb)
      return
    }
    // No Local drops the message (aedes' check): it and QoS 0 go straight on to aedes, which drops,
    // or sends, them as before. A second copy of a message (overlapping subscriptions) is held like
    // any other and dropped when it is let through (dedupe.ts, which runs inside this wrapper).
    if (this.closed || packet.qos === 0 || (packet.nl === true && packet.clientId === this.client.id)) {
      this.deliver(packet, cb)
      return
    }
    if (this.heldCount === 0 && this.client.connected && this.hasRoom()) {
      this.dispatch(packet, cb)
      return
    }
    const bytes = Buffer.byteLength(packet.topic) + (typeof packet.payload === 'string' ? Buffer.byteLength(packet.payload) : packet.payload.length) + HELD_OVERHEAD
    const total = this.heldBytes + bytes + this.options.meter.pendingBytes()
    if (total > this.options.maxBufferBytes) {
      this.overflow(total)
    } else {
      this.held.push({ packet, bytes })
      this.heldBytes += bytes
    }
    setImmediate(cb)
  }

  /** Hands a delivery to aedes; `cb` is called once aedes is done with it. */
  private dispatch (packet: DeliveryPacket, cb: Callback): void {
    this.unsettled++
    let settled = false
    const settle = (): void => {
      if (settled) return
      settled = true
      this.unsettled--
      cb()
      this.pump()
    }
    ownCallbacks.add(settle)
    this.deliver(packet, settle)
  }

  private acknowledged (): void {
    // Never below zero: a PUBCOMP may answer a PUBREL re-sent from the previous connection (§4.9).
    if (this.inflight > 0) this.inflight--
    this.pump()
  }

  /** Lets through what the window has room for: the resumed session's queue first, then held deliveries. */
  private pump (): void {
    if (this.closed) return
    while (this.queued.length > 0 && this.hasRoom()) this.send(this.queued.shift() as QueuedSend)
    if (!this.client.connected) return
    while (this.heldCount > 0 && this.hasRoom()) {
      const next = this.held[this.head] as Held
      this.held[this.head++] = undefined
      if (this.head >= 1024 && this.head * 2 >= this.held.length) {
        this.held = this.held.slice(this.head)
        this.head = 0
      }
      this.heldBytes -= next.bytes
      const packet = next.packet
      if (packet.messageExpiry !== undefined) {
        // [MQTT-3.3.2-5]: the interval sent is what is left of it; an expired message is not sent.
        // A persistent session's copy stays in its queue until the next connection drops it.
        const left = packet.messageExpiry - Date.now()
        if (left <= 0) continue
        packet.properties = { ...packet.properties, messageExpiryInterval: Math.ceil(left / 1000) }
      }
      this.dispatch(packet, noop)
    }
  }

  /** aedes is about to send a message of the resumed session's queue: `go` once there is room. */
  waitForRoom (packet: DeliveryPacket): Promise<void> {
    return new Promise((resolve) => {
      this.queued.push({ packet, go: resolve })
      this.pump()
    })
  }

  /** True for an outgoingUpdate that aedes' emptyQueue makes before writing a queued PUBLISH. */
  isQueuedSend (packet: DeliveryPacket): boolean {
    return !this.closed && packet.cmd === 'publish' && packet.qos > 0 &&
      typeof packet.writeCallback === 'function' && !ownCallbacks.has(packet.writeCallback)
  }

  private send ({ packet, go }: QueuedSend): void {
    // emptyQueue calls packet.writeCallback once the message is written, or dropped (expired,
    // refused by authorizeForward, a clean start), or its update failed.
    const next = packet.writeCallback as (...args: unknown[]) => void
    let settled = false
    this.unsettled++
    packet.writeCallback = (...args: unknown[]): void => {
      if (!settled) {
        settled = true
        this.unsettled--
      }
      next(...args)
      this.pump()
    }
    go()
  }

  private overflow (bytes: number): void {
    this.overflowed = true
    this.options.onOverflow?.(this.client as unknown as Client, bytes)
    this.client.conn.destroy(new Error(`slow subscriber: ${bytes} bytes held for MQTT 5 Receive Maximum or unsent, over limits.maxClientBufferBytes`))
  }

  private close (): void {
    if (this.closed) return
    this.closed = true
    flows.delete(this.client)
    // Held deliveries' callbacks were called when they were held: nothing is owed to aedes.
    this.held = []
    this.head = 0
    this.heldBytes = 0
    // The queue's pending sends go on (and fail on the closed connection) so aedes' connect ends.
    for (const q of this.queued.splice(0)) q.go()
  }
}

/** Gates aedes' sending of a resumed session's queue (lib/handlers/connect.js emptyQueue). */
function gateQueuedSends (persistence: OutgoingPersistence): void {
  if (gated.has(persistence)) return
  gated.add(persistence)
  const outgoingUpdate = persistence.outgoingUpdate.bind(persistence)
  persistence.outgoingUpdate = (client, packet) => {
    const flow = flows.get(client)
    if (flow === undefined || !flow.isQueuedSend(packet)) return outgoingUpdate(client, packet)
    return flow.waitForRoom(packet).then(() => outgoingUpdate(client, packet))
  }
}

function noop (): void {}

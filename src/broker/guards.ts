/**
 * What FerryMQ adds around aedes 2.0.0-beta.1's persistence calls, to close two advisories that
 * aedes 1.2.0 fixed and beta.1 does not carry, and an aedes quirk with refused subscriptions.
 *
 * - GHSA-5jvp-3p2v-5qgf: a client may keep at most `max` inbound QoS 2 messages awaiting PUBREL.
 *   Without a cap one client fills the broker's memory and store with half-finished exchanges.
 * - GHSA-p8r9-qf8w-p73r: `cleanIncoming` must run on a clean start, or a new session's QoS 2
 *   message that reuses a packet id of the old session is answered as a duplicate and lost. The
 *   broker calls `cleanIncoming`; this wrapper keeps the cap's counts in step with it.
 * - aedes stores a SUBSCRIBE's whole filter list once one filter is granted, refused ones
 *   included; `refused` filters are left out.
 * - aedes sends an MQTT 5 session's queued messages without the Subscription Identifiers of the
 *   subscriptions they matched [MQTT-3.3.4-3] (live deliveries carry them): they are added as the
 *   queue is read.
 *
 * The methods are wrapped on the persistence instance, so the same code guards FerryMQ's
 * LevelPersistence and aedes' in-memory one.
 */

import { Readable } from 'node:stream'
import { topicMatches } from './validate.js'

/** The MQTT 5 reason code for "Receive Maximum exceeded" (DISCONNECT). */
export const RECEIVE_MAXIMUM_EXCEEDED = 0x93

export class InboundQos2LimitError extends Error {
  constructor (readonly max: number) {
    super(`more than limits.maxInflightInbound (${max}) QoS 2 messages awaiting PUBREL`)
    this.name = 'InboundQos2LimitError'
  }
}

interface ClientLike { id: string, version?: number | null }
interface PacketLike { messageId?: number, topic?: string, properties?: Record<string, unknown> }

export interface GuardedPersistence {
  addSubscriptions (client: ClientLike, subs: object[]): Promise<unknown>
  incomingStorePacket (client: ClientLike, packet: PacketLike): Promise<unknown>
  incomingDelPacket (client: ClientLike, packet: PacketLike): Promise<unknown>
  cleanIncoming? (client: ClientLike): Promise<unknown>
  outgoingStream (client: ClientLike): Readable
}

export interface GuardOptions {
  /** Inbound QoS 2 messages a client may have awaiting PUBREL. */
  maxInflightInbound: number
  /** True for a subscription the broker refused (not to be stored). */
  refused: (sub: object) => boolean
  /** Called before an over-the-cap store is refused; the refusal waits for it (an MQTT 5 DISCONNECT). */
  overLimit: (client: ClientLike, err: InboundQos2LimitError) => Promise<void>
}

/** Per client id, the inbound QoS 2 packet ids stored and not yet released. */
export class InboundQos2Counts {
  readonly #ids = new Map<string, Set<number>>()

  /** Reserves `messageId` for the client; false when that would pass `max` (a re-send of a reserved id always passes). */
  reserve (clientId: string, messageId: number, max: number): boolean {
    let ids = this.#ids.get(clientId)
    if (ids === undefined) {
      ids = new Set()
      this.#ids.set(clientId, ids)
    }
    if (ids.has(messageId)) return true
    if (ids.size >= max) return false
    ids.add(messageId)
    return true
  }

  release (clientId: string, messageId: number): void {
    const ids = this.#ids.get(clientId)
    if (ids === undefined) return
    ids.delete(messageId)
    if (ids.size === 0) this.#ids.delete(clientId)
  }

  clear (clientId: string): void {
    this.#ids.delete(clientId)
  }

  count (clientId: string): number {
    return this.#ids.get(clientId)?.size ?? 0
  }
}

/** Wraps the persistence's methods in place; returns the counts (seeded by the caller from what is stored). */
export function guardPersistence (persistence: GuardedPersistence, options: GuardOptions): InboundQos2Counts {
  const counts = new InboundQos2Counts()
  const addSubscriptions = persistence.addSubscriptions.bind(persistence)
  const incomingStorePacket = persistence.incomingStorePacket.bind(persistence)
  const incomingDelPacket = persistence.incomingDelPacket.bind(persistence)
  const cleanIncoming = persistence.cleanIncoming?.bind(persistence)
  if (cleanIncoming === undefined) throw new Error('the persistence has no cleanIncoming (aedes-persistence 11 or later is required)')

  persistence.addSubscriptions = async (client, subs) => {
    const kept = subs.filter((sub) => !options.refused(sub))
    if (kept.length > 0) await addSubscriptions(client, kept)
    return client
  }
  persistence.incomingStorePacket = async (client, packet) => {
    const id = packet.messageId
    // Reserved before anything awaits: aedes handles the packets of one socket read concurrently.
    if (typeof id === 'number' && !counts.reserve(client.id, id, options.maxInflightInbound)) {
      const err = new InboundQos2LimitError(options.maxInflightInbound)
      await options.overLimit(client, err)
      throw err
    }
    try {
      return await incomingStorePacket(client, packet)
    } catch (err) {
      if (typeof id === 'number') counts.release(client.id, id)
      throw err
    }
  }
  persistence.incomingDelPacket = async (client, packet) => {
    if (typeof packet.messageId === 'number') counts.release(client.id, packet.messageId)
    // Never rejects: aedes 2.0.0-beta.1 calls it as `incomingDelPacket().finally(…)` (pubrel.js),
    // so a store failure here was an unhandled rejection, which ends a Node process. An entry that
    // could not be deleted stays stored; a new message reusing its id is told apart by its content.
    try {
      return await incomingDelPacket(client, packet)
    } catch {
      return undefined
    }
  }
  persistence.cleanIncoming = async (client) => {
    counts.clear(client.id)
    return await cleanIncoming(client)
  }
  const outgoingStream = persistence.outgoingStream.bind(persistence)
  persistence.outgoingStream = (client) => {
    const source = outgoingStream(client)
    if (client.version !== 5) return source
    return Readable.from((async function * () {
      for await (const packet of source) yield withSubscriptionIds(client, packet as PacketLike)
    })())
  }
  return counts
}

/** `packet` with the Subscription Identifiers of the client's subscriptions that match it (one, or a list). */
function withSubscriptionIds (client: ClientLike, packet: PacketLike): PacketLike {
  if (typeof packet.topic !== 'string' || packet.properties?.subscriptionIdentifier !== undefined) return packet
  const subs = (client as { subscriptions?: Record<string, { si?: number }> }).subscriptions ?? {}
  const ids: number[] = []
  for (const filter in subs) {
    const si = subs[filter]?.si
    if (si !== undefined && !ids.includes(si) && topicMatches(filter, packet.topic)) ids.push(si)
  }
  if (ids.length === 0) return packet
  packet.properties = { ...packet.properties, subscriptionIdentifier: ids.length === 1 ? ids[0] : ids }
  return packet
}

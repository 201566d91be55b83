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
 *
 * The methods are wrapped on the persistence instance, so the same code guards FerryMQ's
 * LevelPersistence and aedes' in-memory one.
 */

/** The MQTT 5 reason code for "Receive Maximum exceeded" (DISCONNECT). */
export const RECEIVE_MAXIMUM_EXCEEDED = 0x93

export class InboundQos2LimitError extends Error {
  constructor (readonly max: number) {
    super(`more than limits.maxInflightInbound (${max}) QoS 2 messages awaiting PUBREL`)
    this.name = 'InboundQos2LimitError'
  }
}

interface ClientLike { id: string, version?: number | null }
interface PacketLike { messageId?: number }

export interface GuardedPersistence {
  addSubscriptions (client: ClientLike, subs: object[]): Promise<unknown>
  incomingStorePacket (client: ClientLike, packet: PacketLike): Promise<unknown>
  incomingDelPacket (client: ClientLike, packet: PacketLike): Promise<unknown>
  cleanIncoming? (client: ClientLike): Promise<unknown>
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
    return await incomingDelPacket(client, packet)
  }
  persistence.cleanIncoming = async (client) => {
    counts.clear(client.id)
    return await cleanIncoming(client)
  }
  return counts
}

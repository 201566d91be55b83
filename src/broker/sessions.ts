import type { Aedes, Client, PublishPacket } from 'aedes'
import type { Logger } from '../observability/logger.js'
import type { Metrics } from '../observability/metrics.js'
import type { LevelPersistence, SessionRecord } from '../store/persistence.js'

/** MQTT 5's "the session does not expire" Session Expiry Interval. */
const NEVER = 0xFFFFFFFF
/** The longest a timer waits before the sweep looks again (records written by other means, clock changes). */
const MAX_SWEEP_GAP_MS = 3_600_000

export interface SessionKeeperOptions {
  /** limits.sessionExpirySeconds: how long a session without its own interval (MQTT 3.1.1) lasts away; 0 = forever. */
  limitSeconds: number
  logger: Logger
  metrics: Metrics
  /** True once the broker is stopping: clients leaving then are recorded at the next start. */
  closing: () => boolean
  /** The Will Delay Interval (seconds) the client's CONNECT carried, 0 if none. */
  willDelay: (client: Client) => number
  /** Clean Start (MQTT 5) / CleanSession (3.1.1) of the client's CONNECT. */
  cleanStart: (client: Client) => boolean
  /** A session ended at disconnect or by aedes' expiry timer: forget its inbound QoS 2 state (GHSA-p8r9-qf8w-p73r). */
  cleanIncoming: (client: Client) => Promise<void>
  /** Sessions the sweep ended (their stored state, inbound QoS 2 included, is gone). */
  ended: (clientIds: string[]) => void
}

interface StoredWill extends PublishPacket { clientId: string, brokerId?: string }

/**
 * FerryMQ's side of session lifetimes on the durable store (aedes keeps MQTT 5's timers in memory
 * only). Each persistent session has a record in the sessions sublevel: when its client went away,
 * its own Session Expiry Interval (MQTT 5), and when a delayed will falls due. A sweep ends the
 * sessions whose time is up, at start (for what expired while the broker was down) and on a timer
 * set to the next deadline; delayed wills left pending by a stop or a crash are published when due
 * unless their client comes back first.
 */
export class SessionKeeper {
  #timer: NodeJS.Timeout | null = null
  #timerAt = Infinity
  readonly #heldWills = new Map<string, NodeJS.Timeout>()
  #stopped = false
  #sweeping: Promise<void> | null = null

  constructor (private readonly aedes: Aedes, private readonly persistence: LevelPersistence, private readonly options: SessionKeeperOptions) {}

  get #clients (): Record<string, Client> {
    return (this.aedes as unknown as { clients: Record<string, Client> }).clients
  }

  async start (): Promise<void> {
    const { aedes, persistence, options } = this
    const warn = (err: Error): void => options.logger.warn({ err: err.message }, 'session record not updated')
    persistence.holdWills((clientId) => this.#heldWills.has(clientId))
    aedes.on('clientReady', (client) => {
      this.#cancelHeldWill(client.id)
      if (!client.clean) {
        persistence.sessionConnected(client.id, ownExpiry(client)).catch(warn)
      } else if (options.cleanStart(client)) {
        // A clean start ends the session stored before (aedes has dropped its subscriptions and queue).
        persistence.sessionConnected(client.id).catch(warn)
      }
    })
    aedes.on('clientDisconnect', (client) => {
      if (options.closing()) return
      if (client.clean) {
        options.cleanIncoming(client).catch(warn)
        return
      }
      const now = Date.now()
      const expiry = ownExpiry(client)
      const pendingWill = client.version === 5 && (aedes as unknown as { delayedWills: Map<string, unknown> }).delayedWills.has(client.id)
      const willAt = pendingWill ? now + Math.min(options.willDelay(client), client.sessionExpiryInterval) * 1000 : undefined
      persistence.sessionDisconnected(client.id, now, expiry, willAt).catch(warn)
      if (expiry !== undefined) this.#schedule(now + expiry * 1000)
    })
    // aedes' own timer for an MQTT 5 session (the sweep ends it too, from the store).
    aedes.on('sessionExpired', (client) => { options.cleanIncoming(client).catch(warn) })
    await this.#restoreWills()
    await this.sweep()
  }

  stop (): void {
    this.#stopped = true
    if (this.#timer !== null) clearTimeout(this.#timer)
    for (const timer of this.#heldWills.values()) clearTimeout(timer)
    this.#heldWills.clear()
  }

  /** Ends the sessions whose time is up; sets the timer for the next one. */
  async sweep (): Promise<void> {
    if (this.#sweeping !== null) return await this.#sweeping
    this.#sweeping = this.#sweep().finally(() => { this.#sweeping = null })
    await this.#sweeping
  }

  async #sweep (): Promise<void> {
    const { persistence, options } = this
    const now = Date.now()
    const limitMs = options.limitSeconds * 1000
    const ended = await persistence.expireSessions(limitMs === 0 ? -Infinity : now - limitMs, now, (id) => this.#clients[id] !== undefined)
    if (ended.length > 0) {
      options.ended(ended)
      options.metrics.sessionsExpired.inc(ended.length)
      options.logger.info({ sessions: ended.length }, 'expired persistent sessions whose clients stayed away')
    }
    const regular = now + (limitMs === 0 ? MAX_SWEEP_GAP_MS : Math.min(limitMs / 2, MAX_SWEEP_GAP_MS))
    this.#timerAt = Infinity
    this.#schedule(Math.min(regular, persistence.nextSessionExpiry ?? Infinity))
  }

  #schedule (at: number): void {
    if (this.#stopped || at >= this.#timerAt) return
    if (this.#timer !== null) clearTimeout(this.#timer)
    this.#timerAt = at
    this.#timer = setTimeout(() => {
      this.#timer = null
      this.#timerAt = Infinity
      this.sweep().catch((err: Error) => this.options.logger.error({ err: err.message }, 'session expiry sweep failed'))
    }, Math.max(0, at - Date.now()) + 5)
    this.#timer.unref()
  }

  /**
   * Delayed wills (MQTT 5) still stored at start belong to clients that left before the stop or
   * were connected when the broker went down: each is published when its delay (or its session)
   * runs out, unless the client connects first. aedes' own will sweep would publish them at once;
   * it is told to leave them (holdWills). Wills without a delay keep aedes' behaviour.
   */
  async #restoreWills (): Promise<void> {
    const records = new Map<string, SessionRecord>()
    for await (const record of this.persistence.sessionRecords()) records.set(record.clientId, record)
    const now = Date.now()
    for await (const item of this.persistence.streamWill({})) {
      const will = item as StoredWill
      const delay = (will.properties as { willDelayInterval?: number } | undefined)?.willDelayInterval ?? 0
      if (delay <= 0) continue
      const record = records.get(will.clientId)
      const since = record === undefined || record.connected === true ? now : record.at
      const expiry = record?.expirySeconds ?? Infinity
      const due = record?.willAt ?? since + Math.min(delay, expiry) * 1000
      const timer = setTimeout(() => { this.#publishHeldWill(will).catch(() => {}) }, Math.max(0, due - now))
      timer.unref()
      this.#heldWills.set(will.clientId, timer)
    }
    if (this.#heldWills.size > 0) this.options.logger.info({ wills: this.#heldWills.size }, 'delayed wills from before the restart will be published when due unless their clients return')
  }

  async #publishHeldWill (will: StoredWill): Promise<void> {
    if (!this.#heldWills.delete(will.clientId) || this.#stopped) return
    if (this.#clients[will.clientId] !== undefined) return
    // Still the same will (a client that came back and left again has stored a new one).
    const current = await this.persistence.getWill({ id: will.clientId }) as StoredWill | undefined
    if (current === undefined || current.brokerId !== will.brokerId) return
    const packet = { cmd: 'publish', topic: current.topic, payload: current.payload, qos: current.qos, retain: current.retain, dup: false, properties: current.properties }
    await new Promise<void>((resolve) => this.aedes.publish(packet as PublishPacket, () => resolve()))
    await this.persistence.delWill({ id: will.clientId })
    this.options.logger.info({ clientId: will.clientId }, 'delayed will published')
  }

  #cancelHeldWill (clientId: string): void {
    const timer = this.#heldWills.get(clientId)
    if (timer === undefined) return
    clearTimeout(timer)
    this.#heldWills.delete(clientId)
  }
}

/** An MQTT 5 session's own expiry interval (seconds), or undefined: 3.1.1, or never (limits.sessionExpirySeconds applies). */
function ownExpiry (client: Client): number | undefined {
  if (client.version !== 5) return undefined
  const interval = client.sessionExpiryInterval
  return interval >= NEVER ? undefined : interval
}

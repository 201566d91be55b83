/*
 * The MQTT 5 PUBLISH properties a bridge carries across, in either direction: those that belong to
 * the application message, which a broker passes on to subscribers unchanged (MQTT 5.0 §3.3.2.3).
 * Not the connection-scoped ones: a Topic Alias names a topic on one connection only, and a
 * Subscription Identifier names a subscription of the receiving client. The Message Expiry
 * Interval is carried too, but on its own (it counts down while a message waits; see Outbox and
 * IncomingStore). A Response Topic is passed unchanged, not remapped by the topic mappings (as
 * Mosquitto's bridge does).
 */

/** The application-message properties of a PUBLISH, as MQTT.js and mqtt-packet name them. */
export interface MessageProperties {
  payloadFormatIndicator?: boolean
  contentType?: string
  responseTopic?: string
  correlationData?: Buffer
  /** A key sent several times has its values in order, as an array (mqtt-packet's shape). */
  userProperties?: Record<string, string | string[]>
}

/**
 * The application-message properties among `properties` (a PUBLISH's, or a stored copy), or
 * undefined when there are none: only those present, with the types MQTT.js writes, so an entry
 * without properties stores nothing for them. Anything else (topic alias, subscription
 * identifier, message expiry, unknown fields) is left out.
 */
export function messageProperties (properties: unknown): MessageProperties | undefined {
  if (typeof properties !== 'object' || properties === null) return undefined
  const p = properties as Record<string, unknown>
  const out: MessageProperties = {}
  let any = false
  const pfi = p.payloadFormatIndicator
  if (typeof pfi === 'boolean' || typeof pfi === 'number') {
    out.payloadFormatIndicator = pfi === true || pfi === 1
    any = true
  }
  if (typeof p.contentType === 'string') {
    out.contentType = p.contentType
    any = true
  }
  if (typeof p.responseTopic === 'string') {
    out.responseTopic = p.responseTopic
    any = true
  }
  if (p.correlationData instanceof Uint8Array) {
    out.correlationData = Buffer.isBuffer(p.correlationData) ? p.correlationData : Buffer.from(p.correlationData)
    any = true
  }
  const user = userProperties(p.userProperties)
  if (user !== undefined) {
    out.userProperties = user
    any = true
  }
  return any ? out : undefined
}

/** A copy of user properties with string values (a repeated key: an array, in order), or undefined when none. */
function userProperties (value: unknown): Record<string, string | string[]> | undefined {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return undefined
  const out: Record<string, string | string[]> = {}
  let any = false
  for (const [k, v] of Object.entries(value as Record<string, unknown>)) {
    let kept: string | string[]
    if (typeof v === 'string') kept = v
    else if (Array.isArray(v) && v.length > 0 && v.every((s) => typeof s === 'string')) kept = [...(v as string[])]
    else continue
    // An own property even for the name `__proto__` (mqtt-packet keeps user properties in a
    // null-prototype object; an assignment here would set the copy's prototype instead).
    Object.defineProperty(out, k, { value: kept, enumerable: true, writable: true, configurable: true })
    any = true
  }
  return any ? out : undefined
}

/** The Message Expiry Interval of `properties` in seconds, when it is a positive number (0 or absent: no expiry). */
export function messageExpiryInterval (properties: unknown): number | undefined {
  if (typeof properties !== 'object' || properties === null) return undefined
  const interval = (properties as { messageExpiryInterval?: unknown }).messageExpiryInterval
  return typeof interval === 'number' && interval > 0 ? interval : undefined
}

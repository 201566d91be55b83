import { Packr } from 'msgpackr'

/**
 * Value encoding for everything the store keeps (packets, wills, subscription records):
 * one format-version byte, then MessagePack (msgpackr).
 *
 * What is kept: every own enumerable field of the object, recursively, so Buffers stay Buffers,
 * string payloads stay strings, MQTT 5 `properties` (userProperties, correlationData, …),
 * `messageExpiry`, `subscriptionIdentifier`, brokerId/brokerCounter/messageId all round-trip, and
 * a field set to `undefined` comes back as an own `undefined` field (aedes-packet's shape has
 * `messageId: undefined`, and the aedes-persistence suite compares key sets).
 * What is dropped: function-valued fields (aedes attaches `writeCallback`) and the top-level
 * `length` (the size of the packet as it arrived on the wire, meaningless once stored).
 * Known limit: msgpackr decodes a key named `__proto__` (e.g. an MQTT 5 user property) as
 * `__proto_`, which prevents prototype pollution but changes that one name.
 */

/** The format version written by this code. Bump it when the encoding changes. */
export const CODEC_VERSION = 1

/** Thrown when a stored value has a format version this code does not know. */
export class UnknownCodecVersionError extends Error {
  constructor (readonly version: number | undefined) {
    super(version === undefined
      ? 'store value is empty: no format-version byte'
      : `store value has format version ${version}, this FerryMQ reads only version ${CODEC_VERSION}; ` +
        'the data was written by a newer FerryMQ (or is corrupt)')
    this.name = 'UnknownCodecVersionError'
  }
}

/**
 * Records off: each value must decode on its own (record structures are shared state).
 * Plain objects come back as plain objects, bins as Buffers.
 */
const packr = new Packr({ useRecords: false, mapsAsObjects: true, moreTypes: false })

/** A stored object: string keys, any values. */
export type StoredValue = Record<string, unknown>

/** Encodes `value` as version byte ‖ MessagePack, without functions and the top-level `length`. */
export function encode (value: object): Buffer {
  const plain: StoredValue = {}
  for (const [k, v] of Object.entries(value)) {
    if (k === 'length' || typeof v === 'function') continue
    plain[k] = v
  }
  const body = packr.pack(plain)
  const out = Buffer.allocUnsafe(body.length + 1)
  out[0] = CODEC_VERSION
  body.copy(out, 1)
  return out
}

/** Decodes a value written by {@link encode}; throws UnknownCodecVersionError for another version. */
export function decode<T extends object = StoredValue> (buf: Uint8Array): T {
  const version = buf[0]
  if (version !== CODEC_VERSION) throw new UnknownCodecVersionError(version)
  const body = Buffer.from(buf.buffer, buf.byteOffset + 1, buf.byteLength - 1)
  return packr.unpack(body) as T
}

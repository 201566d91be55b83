/**
 * Key helpers for the LevelDB store. Every key is a Buffer built from components:
 * - a variable-length string is its UTF-8 bytes followed by 0x00 (MQTT forbids U+0000 in client
 *   ids and topics, so `utf8(id) ‖ 0x00` is prefix-free: client `abc` never covers `abcd`);
 * - a sequence is a uint64 big-endian, so byte order is numeric order;
 * - a packet identifier is a uint16 big-endian.
 */

/** Separator written after every variable-length string component. */
export const SEP = 0x00

/** `utf8(s) ‖ 0x00`: a prefix-free string component. */
export function str (s: string): Buffer {
  const len = Buffer.byteLength(s, 'utf8')
  const out = Buffer.allocUnsafe(len + 1)
  out.write(s, 0, 'utf8')
  out[len] = SEP
  return out
}

/** The raw UTF-8 bytes of `s`, with no separator (for keys that are a single string). */
export function utf8 (s: string): Buffer {
  return Buffer.from(s, 'utf8')
}

/** A non-negative integer (≤ 2^53 − 1) as 8 bytes big-endian. */
export function u64 (n: number): Buffer {
  if (!Number.isSafeInteger(n) || n < 0) throw new RangeError(`u64: not a non-negative safe integer: ${n}`)
  const out = Buffer.allocUnsafe(8)
  out.writeBigUInt64BE(BigInt(n))
  return out
}

/** Reads the 8-byte big-endian sequence at `offset` (default: the last 8 bytes of `buf`). */
export function readU64 (buf: Uint8Array, offset = buf.length - 8): number {
  return Number(Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength).readBigUInt64BE(offset))
}

/** An MQTT packet identifier (0‥65535) as 2 bytes big-endian. */
export function u16 (n: number): Buffer {
  if (!Number.isInteger(n) || n < 0 || n > 0xffff) throw new RangeError(`u16: not a packet identifier: ${n}`)
  const out = Buffer.allocUnsafe(2)
  out.writeUInt16BE(n)
  return out
}

/** Concatenates key components. */
export function key (...parts: Buffer[]): Buffer {
  return Buffer.concat(parts)
}

/**
 * The smallest key greater than every key that starts with `prefix`: the prefix with its last
 * non-0xFF byte incremented (trailing 0xFF bytes dropped). For a UTF-8 prefix this is equivalent to
 * the `prefix ‖ 0xFF` bound (0xFF never occurs in UTF-8), but unlike that bound it stays correct
 * when binary bytes (sequences, packet ids ≥ 0xFF00) follow the prefix. Returns undefined for an
 * empty or all-0xFF prefix (no upper bound: scan to the end).
 */
export function upperBound (prefix: Uint8Array): Buffer | undefined {
  const out = Buffer.from(prefix)
  for (let i = out.length - 1; i >= 0; i--) {
    if (out[i] !== 0xff) {
      out[i] = (out[i] as number) + 1
      return out.subarray(0, i + 1)
    }
  }
  return undefined
}

/** Iterator bounds covering exactly the keys that start with `prefix`. */
export interface PrefixRange { gte: Buffer, lt?: Buffer }

/** `{ gte: prefix, lt: upperBound(prefix) }`; an empty prefix covers the whole key space. */
export function prefixRange (prefix: Buffer): PrefixRange {
  const lt = upperBound(prefix)
  return lt === undefined ? { gte: prefix } : { gte: prefix, lt }
}

/** Splits `utf8(a) ‖ 0x00 ‖ rest` into the string `a` and the bytes after the separator. */
export function splitFirst (k: Uint8Array): [string, Buffer] {
  const buf = Buffer.from(k.buffer, k.byteOffset, k.byteLength)
  const i = buf.indexOf(SEP)
  if (i < 0) throw new Error('key has no 0x00 separator')
  return [buf.toString('utf8', 0, i), buf.subarray(i + 1)]
}

import { z } from 'zod'

/**
 * A telemetry message as a simulated device sends it: JSON, numbered per device, stamped with the
 * time it was produced (ms since the epoch), a few readings and optional padding so the encoded
 * size reaches a configured number of bytes.
 */
export interface Telemetry {
  /** Run id: a verifier ignores messages from other runs (a persistent session may replay them). */
  run: string
  /** Device id. */
  d: string
  /** Per-device sequence number, from 1, without gaps across reconnects. */
  s: number
  /** Production time, ms since the epoch. */
  t: number
  /** The QoS the device published it with. */
  q: 0 | 1 | 2
  /** Readings. */
  r: { temp: number, hum: number, bat: number }
  /** 1 when the message waited in the device's offline buffer. */
  b?: 1
  /** Padding, present when a payload size was asked for. */
  p?: string
}

const telemetrySchema = z.strictObject({
  run: z.string().min(1),
  d: z.string().min(1),
  s: z.number().int().min(1),
  t: z.number().int().min(0),
  q: z.union([z.literal(0), z.literal(1), z.literal(2)]),
  r: z.strictObject({ temp: z.number(), hum: z.number(), bat: z.number() }),
  b: z.literal(1).optional(),
  p: z.string().optional(),
})

const round = (x: number): number => Math.round(x * 100) / 100

/** Plausible readings that drift with the sequence number. */
export function readings (seq: number): Telemetry['r'] {
  return {
    temp: round(21 + 4 * Math.sin(seq / 20) + Math.random() * 0.5),
    hum: round(45 + 10 * Math.cos(seq / 30) + Math.random()),
    bat: round(Math.max(0, 100 - seq * 0.01)),
  }
}

/**
 * Encodes a message; with `size` > 0 the JSON is padded to exactly `size` bytes when it is shorter
 * (it is never truncated).
 */
export function encodeTelemetry (msg: Omit<Telemetry, 'p'>, size = 0): Buffer {
  const plain = JSON.stringify(msg)
  if (size <= 0) return Buffer.from(plain, 'utf8')
  // ,"p":"" adds 7 bytes before any padding character.
  const room = size - Buffer.byteLength(plain, 'utf8') - 7
  if (room < 0) return Buffer.from(plain, 'utf8')
  return Buffer.from(plain.slice(0, -1) + ',"p":"' + 'x'.repeat(room) + '"}', 'utf8')
}

export class PayloadError extends Error {}

/** Decodes and validates a telemetry payload; throws PayloadError when it is not one. */
export function decodeTelemetry (payload: Buffer | string): Telemetry {
  let value: unknown
  try {
    value = JSON.parse(typeof payload === 'string' ? payload : payload.toString('utf8'))
  } catch (err) {
    throw new PayloadError(`not JSON: ${(err as Error).message}`)
  }
  const parsed = telemetrySchema.safeParse(value)
  if (!parsed.success) throw new PayloadError(`not a telemetry message: ${parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`)
  return parsed.data as Telemetry
}

/** A cheap decoder for the verifier's hot path: JSON.parse plus the fields it needs. */
export function decodeTelemetryFast (payload: Buffer): Telemetry | undefined {
  try {
    const v = JSON.parse(payload.toString('utf8')) as Partial<Telemetry>
    if (typeof v.run !== 'string' || typeof v.d !== 'string' || typeof v.s !== 'number' || typeof v.t !== 'number' || !Number.isInteger(v.s) || v.s < 1) return undefined
    return v as Telemetry
  } catch {
    return undefined
  }
}

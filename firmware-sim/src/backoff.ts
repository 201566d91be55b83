/** Exponential backoff with full jitter: a random delay in [0, min(max, base * 2^attempt)). */
export interface BackoffOptions {
  /** Base delay, ms. */
  baseMs: number
  /** Cap, ms. */
  maxMs: number
}

export function backoffCeiling (attempt: number, { baseMs, maxMs }: BackoffOptions): number {
  // 2^31 overflows nothing in a double, but keep the exponent small anyway.
  return Math.min(maxMs, baseMs * 2 ** Math.min(attempt, 30))
}

/** `random` is injectable for tests; it must return a number in [0, 1). */
export function backoffDelay (attempt: number, options: BackoffOptions, random: () => number = Math.random): number {
  return Math.floor(random() * backoffCeiling(attempt, options))
}

import legacyAssert from 'node:assert'
import { expect, test as vitestTest } from 'vitest'

/** The part of node:test's TestContext that aedes-persistence's abstract suite uses. */
export interface ShimContext {
  plan (n: number): void
  /** node:test's `t.assert` wraps the legacy (loose) assert. */
  assert: typeof legacyAssert
  diagnostic (msg: string): void
}

/**
 * Runs a node:test-style `test(name, async t => …)` as a vitest test: counts assertions made
 * through `t.assert` and checks them against `t.plan(n)`.
 */
export function nodeTestShim (name: string, fn: (t: ShimContext) => unknown): void {
  vitestTest(name, async () => {
    let planned: number | undefined
    let count = 0
    const assert = new Proxy(legacyAssert, {
      get (target, prop, receiver) {
        const v: unknown = Reflect.get(target, prop, receiver)
        if (typeof v !== 'function') return v
        return (...args: unknown[]) => {
          count++
          return (v as (...a: unknown[]) => unknown).apply(target, args)
        }
      }
    })
    await fn({ plan: (n) => { planned = n }, assert, diagnostic: () => {} })
    if (planned !== undefined) expect(count, `t.plan(${planned}) vs assertions run`).toBe(planned)
  }, 60_000)
}

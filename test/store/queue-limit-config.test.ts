import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { ConfigError, loadConfig } from '../../src/config/load.js'

// The queue-bound settings the persistence takes (limits.maxQueuedBytes, limits.queueFullPolicy).
// Kept beside the persistence tests; test/unit/config.test.ts covers the rest of the schema.
const dir = mkdtempSync(join(tmpdir(), 'ferrymq-queue-config-'))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

let n = 0
function withLimits (yaml: string): ReturnType<typeof loadConfig> {
  const path = join(dir, `c${++n}.yaml`)
  writeFileSync(path, `limits:\n${yaml}\n`)
  return loadConfig({ file: path })
}
function errorOf (yaml: string): string {
  try {
    withLimits(yaml)
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError)
    return (err as Error).message
  }
  throw new Error('expected a ConfigError')
}

describe('limits.maxQueuedBytes and limits.queueFullPolicy', () => {
  it('default to 128 MiB and drop-new, beside maxQueuedMessages 100000', () => {
    const { limits } = loadConfig({})
    expect([limits.maxQueuedMessages, limits.maxQueuedBytes, limits.queueFullPolicy]).toEqual([100_000, 134_217_728, 'drop-new'])
  })

  it('accept drop-oldest and a byte count in range', () => {
    const { limits } = withLimits('  queueFullPolicy: drop-oldest\n  maxQueuedBytes: 1048576')
    expect([limits.maxQueuedBytes, limits.queueFullPolicy]).toEqual([1_048_576, 'drop-oldest'])
  })

  it('reject other values with the key path, the origin and what is allowed', () => {
    expect(errorOf('  queueFullPolicy: drop-newest')).toMatch(/^limits\.queueFullPolicy \(in .*\): expected one of drop-new, drop-oldest, got "drop-newest"$/)
    expect(errorOf('  queueFullPolicy: 1')).toContain('expected one of drop-new, drop-oldest, got 1')
    expect(errorOf('  maxQueuedBytes: 1000')).toMatch(/^limits\.maxQueuedBytes \(in .*\): expected a size in bytes, an integer 65536–1099511627776, got 1000$/)
    expect(errorOf('  maxQueuedBytes: 100000.5')).toContain('expected a size in bytes, an integer 65536–1099511627776')
    expect(errorOf('  maxQueuedBytes: lots')).toContain('expected a size in bytes, an integer 65536–1099511627776, got "lots"')
  })
})

import { describe, expect, it } from 'vitest'
import { backoffDelay, checkBridges } from '../../src/bridge/bridge.js'
import { ConfigError } from '../../src/config/load.js'
import { configSchema, type BridgeConfig } from '../../src/config/schema.js'

function bridge (over: Record<string, unknown>): BridgeConfig {
  return configSchema.parse({ bridges: [{ name: 'cloud', url: 'mqtt://127.0.0.1:1', topics: [{ pattern: 'a/#' }], ...over }] }).bridges[0] as BridgeConfig
}

function problem (b: BridgeConfig, durability = 'fsync'): string {
  try {
    checkBridges([b], durability)
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError)
    return (err as Error).message
  }
  return ''
}

describe('checkBridges (start-up checks past the schema)', () => {
  it('a good bridge passes', () => {
    expect(problem(bridge({}))).toBe('')
  })

  it('names the mapping and field of a bad topic mapping', () => {
    expect(problem(bridge({ topics: [{ pattern: 'a/#' }, { pattern: 'a/#/b' }] }))).toMatch(/^bridges\[0\]\.topics\[1\]\.pattern: /)
    expect(problem(bridge({ topics: [{ pattern: 'x', remotePrefix: 'site/+/' }] }))).toMatch(/^bridges\[0\]\.topics\[0\]\.remotePrefix: a prefix cannot contain \+ or #/)
    expect(problem(bridge({ topics: [{ pattern: '', localPrefix: 'a' }] }))).toMatch(/^bridges\[0\]\.topics\[0\]: with an empty pattern, localPrefix and remotePrefix are whole topics and must both be set/)
  })

  it('refuses durability memory, unreadable TLS files and tls on a plain URL', () => {
    expect(problem(bridge({}), 'memory')).toMatch(/^bridges\[0\]: a bridge needs storage\.durability fsync or os/)
    expect(problem(bridge({ url: 'mqtts://h:8883', tls: { ca: '/nonexistent/ca.crt' } }))).toMatch(/^bridges\[0\]\.tls\.ca: cannot read \/nonexistent\/ca\.crt \(ENOENT\)/)
    expect(problem(bridge({ url: undefined, urls: ['mqtts://a', 'mqtt://b'], tls: { verify: false } }))).toMatch(/^bridges\[0\]\.urls\[1\]: tls is set but "mqtt:\/\/b" is not mqtts:\/\/ or wss:\/\//)
  })
})

describe('backoffDelay (reconnect back-off with full jitter)', () => {
  it('grows exponentially from minDelayMs, is capped at maxDelayMs, and spreads uniformly below the cap', () => {
    const low = (): number => 0
    const high = (): number => 1
    expect([0, 1, 2, 3, 4, 5, 10, 100].map((a) => backoffDelay(a, 500, 30_000, high))).toEqual([1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000])
    expect([0, 3, 100].map((a) => backoffDelay(a, 500, 30_000, low))).toEqual([500, 500, 500])
    expect(backoffDelay(2, 500, 30_000, () => 0.5)).toBe(2250)
    expect(backoffDelay(0, 1000, 1000, high)).toBe(1000) // min = max: no jitter room
    const samples = Array.from({ length: 1000 }, () => backoffDelay(3, 100, 60_000))
    expect(Math.min(...samples)).toBeGreaterThanOrEqual(100)
    expect(Math.max(...samples)).toBeLessThanOrEqual(1600)
    expect(new Set(samples.map((v) => Math.floor(v / 300))).size).toBe(6) // 100–1600 ms: every 300 ms band is hit
  })
})

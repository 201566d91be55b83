import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, relative } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parse as parseYaml } from 'yaml'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { ConfigError, loadConfig, type ConfigSources } from '../../src/config/load.js'

let dir: string
beforeAll(() => { dir = mkdtempSync(join(tmpdir(), 'ferrymq-config-')) })
afterAll(() => { rmSync(dir, { recursive: true, force: true }) })

let fileCount = 0
/** Writes `text` to a fresh file named `name` in the temp dir (or a sub-directory of it) and returns its path. */
function file (name: string, text: string): string {
  const sub = join(dir, String(++fileCount))
  const path = join(sub, name)
  mkdirSync(join(path, '..'), { recursive: true })
  writeFileSync(path, text)
  return path
}

/** The ConfigError loadConfig throws for `sources` (fails the test when it does not throw one). */
function configError (sources: ConfigSources): string {
  try {
    loadConfig(sources)
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError)
    expect((err as ConfigError).code).toBe('FERRYMQ_BAD_CONFIG')
    return (err as Error).message
  }
  throw new Error(`expected a ConfigError for ${JSON.stringify(sources)}`)
}

const DEFAULTS = {
  listeners: {
    mqtt: { port: 1883, host: '0.0.0.0' },
    ws: { port: 8083, host: '0.0.0.0', path: '/mqtt' },
    mqtts: { port: 8883, host: '0.0.0.0' },
    wss: { port: 8084, host: '0.0.0.0', path: '/mqtt' },
    http: { port: 18083, host: '127.0.0.1' },
  },
  storage: { dir: './data', durability: 'fsync' },
  limits: {
    maxPacketSize: 1_048_576,
    maxQueuedMessages: 100_000,
    maxQueuedBytes: 134_217_728,
    queueFullPolicy: 'drop-new',
    maxPublishRate: 0,
    connectTimeoutMs: 10_000,
    drainTimeoutMs: 10_000,
    maxClientBufferBytes: 8_388_608,
    sessionExpirySeconds: 604_800,
    maxConnections: 10_000,
    maxClientIdLength: 256,
    maxTopicLevels: 100,
    maxTopicLength: 65_535,
    maxInflightInbound: 1000,
    maxTopicAlias: 10,
    maxKeepaliveSeconds: 0,
  },
  log: { level: 'info' },
  sys: { intervalSeconds: 10, heartbeatSeconds: 60 },
  bridges: [],
}

describe('defaults', () => {
  it('with no sources, every setting has its documented default and TLS is off', () => {
    const config = loadConfig({})
    expect(config).toEqual(DEFAULTS)
    expect(config.tls).toBeUndefined()
    expect(loadConfig()).toEqual(DEFAULTS)
  })

  it('equal the "Every setting, with its default" block of the README', () => {
    const readme = readFileSync(fileURLToPath(new URL('../../README.md', import.meta.url)), 'utf8')
    const block = /Every setting, with its default:\s*```yaml\n([\s\S]*?)```/.exec(readme)
    expect(block, 'README defaults block').not.toBeNull()
    const documented = parseYaml((block as RegExpExecArray)[1] as string) as Record<string, unknown>
    delete documented.tls // an example: TLS has no default
    expect(loadConfig({})).toEqual(documented)
  })

  it('an empty file, or one with only comments, gives the defaults', () => {
    expect(loadConfig({ file: file('empty.yaml', '') })).toEqual(DEFAULTS)
    expect(loadConfig({ file: file('comments.yaml', '# nothing set yet\n\n') })).toEqual(DEFAULTS)
    expect(loadConfig({ file: file('null.json', 'null') })).toEqual(DEFAULTS)
  })

  it('FERRYMQ_CONFIG and variables that are not FERRYMQ_* are accepted and change nothing', () => {
    expect(loadConfig({ env: { FERRYMQ_CONFIG: '/nowhere.yaml', HOME: '/root', PORT: '1' } })).toEqual(DEFAULTS)
  })
})

describe('config files', () => {
  it('reads YAML and merges it over the defaults', () => {
    const config = loadConfig({
      file: file('ferrymq.yaml', [
        'listeners:',
        '  mqtt: { port: 1884 }',
        '  ws:',
        '    path: /ws',
        'storage:',
        '  durability: os',
        'limits:',
        '  maxPacketSize: 4096',
        'log: { level: debug }',
        '',
      ].join('\n')),
    })
    expect(config.listeners.mqtt).toEqual({ port: 1884, host: '0.0.0.0' })
    expect(config.listeners.ws).toEqual({ port: 8083, host: '0.0.0.0', path: '/ws' })
    expect(config.storage).toEqual({ dir: './data', durability: 'os' })
    expect(config.limits).toEqual({ ...DEFAULTS.limits, maxPacketSize: 4096 })
    expect(config.log.level).toBe('debug')
    expect(config.listeners.http).toEqual(DEFAULTS.listeners.http)
  })

  it('reads JSON when the file ends in .json (any case), and YAML otherwise (.yml, no extension)', () => {
    const settings = { listeners: { http: { port: 9100, host: '0.0.0.0' } }, sys: { intervalSeconds: 0 } }
    for (const name of ['ferrymq.json', 'FERRYMQ.JSON']) {
      const config = loadConfig({ file: file(name, JSON.stringify(settings)) })
      expect(config.listeners.http).toEqual({ port: 9100, host: '0.0.0.0' })
      expect(config.sys).toEqual({ intervalSeconds: 0, heartbeatSeconds: 60 })
    }
    expect(loadConfig({ file: file('ferrymq.yml', 'listeners:\n  http:\n    port: 9101\n') }).listeners.http.port).toBe(9101)
    expect(loadConfig({ file: file('ferrymq', 'listeners: { http: { port: 9102 } }\n') }).listeners.http.port).toBe(9102)
  })

  it('a .json file is parsed as JSON only: YAML in it is an error', () => {
    const path = file('bad.json', 'listeners:\n  mqtt:\n    port: 1\n')
    expect(configError({ file: path })).toMatch(new RegExp(`^config file ${escape(path)}: not valid JSON: `))
  })

  it('a missing file is an error naming the file and the reason', () => {
    const path = join(dir, 'does-not-exist.yaml')
    expect(configError({ file: path })).toBe(`config file ${path}: cannot read it (ENOENT)`)
  })

  it('invalid YAML is an error with the line and column', () => {
    const path = file('broken.yaml', 'listeners:\n  mqtt: { port: 1883\n')
    expect(configError({ file: path })).toMatch(new RegExp(`^config file ${escape(path)}: not valid YAML at line \\d+, column \\d+: `))
  })

  it('duplicate YAML keys are rejected', () => {
    const path = file('dup.yaml', 'listeners:\n  mqtt:\n    port: 1883\n    port: 1884\n')
    expect(configError({ file: path })).toMatch(new RegExp(`^config file ${escape(path)}: not valid YAML at line 4, column 5: .*unique`))
    const top = file('dup-top.yaml', 'log: { level: info }\nlog: { level: debug }\n')
    expect(configError({ file: top })).toMatch(/not valid YAML at line 2, column 1: .*unique/)
  })

  it('a top-level list or scalar is rejected', () => {
    const list = file('list.yaml', '- listeners\n- storage\n')
    expect(configError({ file: list })).toBe(`config file ${list}: expected a mapping of settings at the top level, got a list`)
    const json = file('list.json', '[]')
    expect(configError({ file: json })).toBe(`config file ${json}: expected a mapping of settings at the top level, got a list`)
    const scalar = file('scalar.yaml', 'hello\n')
    expect(configError({ file: scalar })).toBe(`config file ${scalar}: expected a mapping of settings at the top level, got "hello"`)
  })

  it('unknown keys are errors that give their full path and the file', () => {
    const path = file('typo.yaml', 'listeners:\n  mqtt:\n    prot: 1883\n')
    expect(configError({ file: path })).toBe(`listeners.mqtt.prot: unknown key in ${path}`)
    const top = file('top.yaml', 'listener: {}\nlimits: { maxPacketSize: 2048, maxPackets: 1 }\n')
    expect(configError({ file: top }).split('\n').sort()).toEqual([
      `limits.maxPackets: unknown key in ${top}`,
      `listener: unknown key in ${top}`,
    ])
  })

  it('a bad value in the file names the key path and the file', () => {
    const path = file('values.yaml', 'listeners:\n  mqtt:\n    port: 70000\n')
    expect(configError({ file: path })).toBe(`listeners.mqtt.port (in ${path}): expected an integer 0–65535, got 70000`)
    const small = file('small.yaml', 'limits:\n  maxPacketSize: 10\n')
    expect(configError({ file: small })).toBe(`limits.maxPacketSize (in ${small}): expected a size in bytes, an integer 64–268435460, got 10`)
    const path2 = file('path.yaml', 'listeners:\n  ws:\n    path: mqtt\n')
    expect(configError({ file: path2 })).toBe(`listeners.ws.path (in ${path2}): expected a URL path starting with "/", got "mqtt"`)
  })

  it('an unknown enum value lists the allowed ones', () => {
    const path = file('enum.yaml', 'storage:\n  durability: sometimes\n')
    expect(configError({ file: path })).toBe(`storage.durability (in ${path}): expected one of fsync, os, memory, got "sometimes"`)
    expect(configError({ env: { FERRYMQ_LOG_LEVEL: 'loud' } }))
      .toBe('log.level (from FERRYMQ_LOG_LEVEL): expected one of fatal, error, warn, info, debug, trace, silent, got "loud"')
    expect(configError({ flags: { durability: 'FSYNC' } }))
      .toBe('storage.durability (from --durability): expected one of fsync, os, memory, got "FSYNC"')
  })

  it('the bridges section of DESIGN.md parses, with defaults for what it leaves out', () => {
    const config = loadConfig({
      file: file('bridges.yaml', [
        'bridges:',
        '  - name: cloud',
        '    urls: [ "mqtts://cloud.example.com:8883" ]',
        '    clientId: edge-gw-01',
        '    protocolVersion: 5',
        '    clean: false',
        '    tls: { ca: ca.crt, cert: edge.crt, key: edge.key }',
        '    reconnect: { minDelayMs: 500, maxDelayMs: 30000 }',
        '    topics:',
        '      - { pattern: "telemetry/#", direction: out, qos: 1, localPrefix: "", remotePrefix: "site-a/" }',
        '      - { pattern: "cmd/#",       direction: in,  qos: 1, localPrefix: "", remotePrefix: "site-a/" }',
        '    outbox: { maxMessages: 1000000, maxBytes: 1073741824, maxAgeSeconds: 604800, whenFull: drop-oldest }',
        '  - name: backup',
        '    url: mqtt://10.0.0.2',
        '    topics: [ { pattern: "#" } ]',
        '',
      ].join('\n')),
    })
    expect(config.bridges[0]).toMatchObject({ name: 'cloud', protocolVersion: 5, clean: false, maxInflight: 1000, maxInflightQos2: 20, keepaliveSeconds: 60 })
    // Files named in the config file are found beside it (as for the listeners' tls).
    expect(config.bridges[0]?.tls).toMatchObject({ verify: true, ca: expect.stringMatching(/^\/.*\/ca\.crt$/), key: expect.stringMatching(/^\/.*\/edge\.key$/) })
    expect(config.bridges[1]).toMatchObject({
      protocolVersion: 4,
      clean: false,
      reconnect: { minDelayMs: 500, maxDelayMs: 30000, stableMs: 10000 },
      topics: [{ pattern: '#', direction: 'out', qos: 1, localPrefix: '', remotePrefix: '' }],
      outbox: { maxMessages: 1_000_000, maxBytes: 1_073_741_824, maxAgeSeconds: 604_800, whenFull: 'drop-oldest' },
    })
    expect(loadConfig({ file: file('bridges-none.yaml', 'bridges: []\n') })).toMatchObject(DEFAULTS)
  })

  it('bad bridge settings name the bridge and the key', () => {
    const bridge = (lines: string): string => configError({ file: file('bad-bridge.yaml', `bridges:\n  - name: cloud\n${lines}`) })
    const topics = '    topics: [ { pattern: "a/#" } ]\n'
    expect(bridge(topics)).toMatch(/^bridges\[0\]\.url\b.*: set either url or urls/)
    expect(bridge(`    url: mqtt://a\n    urls: [ "mqtt://b" ]\n${topics}`)).toMatch(/^bridges\[0\]\.url\b.*: set either url or urls/)
    expect(bridge(`    url: http://a\n${topics}`)).toMatch(/^bridges\[0\]\.url\b.*: unsupported scheme "http:" in "http:\/\/a": use mqtt:\/\/, mqtts:\/\/, ws:\/\/ or wss:\/\//)
    expect(bridge(`    url: not a url\n${topics}`)).toMatch(/^bridges\[0\]\.url\b.*: expected a URL like mqtt:\/\/host:1883/)
    expect(bridge('    url: mqtt://a\n    topics: [ { pattern: "a/#", qos: 3 } ]\n')).toMatch(/^bridges\[0\]\.topics\[0\]\.qos\b.*: expected 0, 1 or 2/)
    expect(bridge('    url: mqtt://a\n    topics: [ { pattern: "a/#", direction: sideways } ]\n')).toMatch(/^bridges\[0\]\.topics\[0\]\.direction\b.*: expected one of out, in, both/)
    expect(bridge('    url: mqtt://a\n    topics: [ { pattern: "a/#", prefix: x } ]\n')).toMatch(/^bridges\[0\]\.topics\[0\]\.prefix: unknown key/)
    expect(bridge('    url: mqtt://a\n    topics: []\n')).toMatch(/^bridges\[0\]\.topics\b.*: expected at least one topic mapping/)
    expect(bridge(`    url: mqtt://a\n    reconnect: { minDelayMs: 5000, maxDelayMs: 1000 }\n${topics}`)).toMatch(/^bridges\[0\]\.reconnect\.minDelayMs\b.*: minDelayMs must not exceed maxDelayMs/)
    expect(bridge(`    url: mqtts://a\n    tls: { cert: edge.crt }\n${topics}`)).toMatch(/^bridges\[0\]\.tls\b.*: cert and key go together/)
    expect(bridge(`    url: mqtt://a\n    outbox: { whenFull: drop-new }\n${topics}`)).toMatch(/^bridges\[0\]\.outbox\.whenFull\b.*: expected one of drop-oldest, reject/)
    expect(configError({ file: file('dup-bridge.yaml', `bridges:\n  - { name: a, url: "mqtt://x", topics: [ { pattern: "#" } ] }\n  - { name: a, url: "mqtt://y", topics: [ { pattern: "#" } ] }\n`) }))
      .toMatch(/^bridges\[1\]\.name\b.*: duplicate bridge name "a" \(also bridges\[0\]\)/)
    expect(configError({ file: file('bridge-name.yaml', 'bridges:\n  - { name: "my cloud", url: "mqtt://x", topics: [ { pattern: "#" } ] }\n') }))
      .toMatch(/^bridges\[0\]\.name\b.*: expected a name of letters, digits/)
  })
})

describe('TLS settings', () => {
  it('requireClientCert without ca is an error that says ca is needed', () => {
    const path = file('mtls.yaml', 'tls:\n  cert: server.crt\n  key: server.key\n  requireClientCert: true\n')
    expect(configError({ file: path })).toMatch(/^tls\.requireClientCert\b.*: requireClientCert needs tls\.ca, the CA that signs client certificates$/)
  })

  it('cert and key are required once tls is present', () => {
    const path = file('half.yaml', 'tls:\n  cert: server.crt\n')
    expect(configError({ file: path })).toMatch(/^tls\.key\b.*: expected a file path/)
  })

  it('relative paths are resolved against the config file\'s directory, absolute ones kept', () => {
    const path = file(join('etc', 'ferrymq', 'ferrymq.yaml'), [
      'tls:',
      '  cert: certs/server.crt',
      '  key: /secure/server.key',
      '  ca: ../ca.crt',
      '  requireClientCert: true',
      '',
    ].join('\n'))
    const base = join(path, '..')
    // Also when the file itself is named by a relative path (from the working directory).
    for (const named of [path, relative(process.cwd(), path)]) {
      expect(loadConfig({ file: named }).tls).toEqual({
        cert: join(base, 'certs', 'server.crt'),
        key: '/secure/server.key',
        ca: join(base, '..', 'ca.crt'),
        requireClientCert: true,
      })
    }
    const noCa = file('no-ca.yaml', 'tls: { cert: a.crt, key: a.key }\n')
    expect(loadConfig({ file: noCa }).tls).toEqual({ cert: join(noCa, '..', 'a.crt'), key: join(noCa, '..', 'a.key'), ca: undefined, requireClientCert: false })
  })
})

describe('environment variables and flags', () => {
  it('precedence is flags > environment > file > defaults, per setting', () => {
    const path = file('prec.yaml', 'listeners:\n  mqtt: { port: 1000 }\n  ws: { port: 1001 }\n  http: { port: 1002 }\nlog: { level: warn }\n')
    const env = { FERRYMQ_PORT: '2000', FERRYMQ_WS_PORT: '2001', FERRYMQ_LOG_LEVEL: 'error' }
    const flags = { port: '3000', 'log-level': 'debug' }

    const fileOnly = loadConfig({ file: path })
    expect([fileOnly.listeners.mqtt.port, fileOnly.listeners.ws.port, fileOnly.listeners.http.port, fileOnly.log.level]).toEqual([1000, 1001, 1002, 'warn'])
    const withEnv = loadConfig({ file: path, env })
    expect([withEnv.listeners.mqtt.port, withEnv.listeners.ws.port, withEnv.listeners.http.port, withEnv.log.level]).toEqual([2000, 2001, 1002, 'error'])
    const all = loadConfig({ file: path, env, flags })
    expect([all.listeners.mqtt.port, all.listeners.ws.port, all.listeners.http.port, all.log.level]).toEqual([3000, 2001, 1002, 'debug'])
    // The host next to an overridden port still comes from the file or the defaults.
    expect(all.listeners.mqtt.host).toBe('0.0.0.0')
    const noFile = loadConfig({ env, flags })
    expect([noFile.listeners.mqtt.port, noFile.listeners.ws.port, noFile.listeners.http.port]).toEqual([3000, 2001, 18083])
  })

  it('every documented flag and variable sets its setting', () => {
    const flags = { port: '1', 'ws-port': '2', 'mqtts-port': '3', 'wss-port': '4', 'http-port': '5', 'data-dir': '/var/lib/ferrymq', durability: 'memory', 'log-level': 'trace' }
    const env = { FERRYMQ_PORT: '1', FERRYMQ_WS_PORT: '2', FERRYMQ_MQTTS_PORT: '3', FERRYMQ_WSS_PORT: '4', FERRYMQ_HTTP_PORT: '5', FERRYMQ_DATA_DIR: '/var/lib/ferrymq', FERRYMQ_DURABILITY: 'memory', FERRYMQ_LOG_LEVEL: 'trace' }
    for (const sources of [{ flags }, { env }]) {
      const config = loadConfig(sources)
      expect([config.listeners.mqtt.port, config.listeners.ws.port, config.listeners.mqtts.port, config.listeners.wss.port, config.listeners.http.port]).toEqual([1, 2, 3, 4, 5])
      expect(config.storage).toEqual({ dir: '/var/lib/ferrymq', durability: 'memory' })
      expect(config.log.level).toBe('trace')
    }
  })

  it('port 0 is accepted (it turns a listener off), and surrounding spaces are ignored', () => {
    expect(loadConfig({ flags: { 'ws-port': '0' } }).listeners.ws.port).toBe(0)
    expect(loadConfig({ env: { FERRYMQ_PORT: ' 1885 ' } }).listeners.mqtt.port).toBe(1885)
  })

  it('a bad flag or variable value names the key path, where it came from, and what was given', () => {
    expect(configError({ flags: { 'ws-port': 'abc' } })).toBe('listeners.ws.port (from --ws-port): expected an integer 0–65535, got "abc"')
    expect(configError({ env: { FERRYMQ_WS_PORT: '70000' } })).toBe('listeners.ws.port (from FERRYMQ_WS_PORT): expected an integer 0–65535, got 70000')
    expect(configError({ flags: { port: '-1' } })).toBe('listeners.mqtt.port (from --port): expected an integer 0–65535, got -1')
    expect(configError({ flags: { 'http-port': '80.5' } })).toBe('listeners.http.port (from --http-port): expected an integer 0–65535, got "80.5"')
    expect(configError({ flags: { 'data-dir': '' } })).toBe('storage.dir (from --data-dir): expected a directory path, got ""')
  })

  it('the origin named is the source that won: a flag over a bad file value', () => {
    const path = file('good-port.yaml', 'listeners:\n  mqtt: { port: 1883 }\n')
    expect(configError({ file: path, env: { FERRYMQ_PORT: '1' }, flags: { port: 'x' } }))
      .toBe('listeners.mqtt.port (from --port): expected an integer 0–65535, got "x"')
    expect(loadConfig({ file: file('fixed.yaml', 'listeners:\n  mqtt: { port: nope }\n'), flags: { port: '1884' } }).listeners.mqtt.port).toBe(1884)
  })

  it('every problem is reported, one per line', () => {
    const lines = configError({ flags: { port: 'a', durability: 'b' }, env: { FERRYMQ_HTTP_PORT: 'c' } }).split('\n').sort()
    expect(lines).toEqual([
      'listeners.http.port (from FERRYMQ_HTTP_PORT): expected an integer 0–65535, got "c"',
      'listeners.mqtt.port (from --port): expected an integer 0–65535, got "a"',
      'storage.durability (from --durability): expected one of fsync, os, memory, got "b"',
    ])
  })

  it('an unknown FERRYMQ_ variable is an error that lists the known ones', () => {
    const message = configError({ env: { FERRYMQ_PROT: '1883' } })
    expect(message).toMatch(/^FERRYMQ_PROT: unknown environment variable; known ones are FERRYMQ_CONFIG, FERRYMQ_PORT, FERRYMQ_WS_PORT, /)
    expect(message).toContain('FERRYMQ_LOG_LEVEL')
  })
})

function escape (s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')
}

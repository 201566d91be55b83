import { Writable } from 'node:stream'
import { createBroker, type Broker, type BrokerOptions } from '../../src/broker/broker.js'
import { loadConfig } from '../../src/config/load.js'
import { configSchema, type Config, type ListenerName } from '../../src/config/schema.js'
import { createLogger } from '../../src/observability/logger.js'

type DeepPartial<T> = { [K in keyof T]?: T[K] extends object ? DeepPartial<T[K]> : T[K] }

export interface TestBroker {
  broker: Broker
  config: Config
  /** mqtt://127.0.0.1:PORT */
  mqttUrl: string
  /** ws://127.0.0.1:PORT/mqtt */
  wsUrl: string
  /** http://127.0.0.1:PORT */
  httpUrl: string
  mqttsUrl?: string
  wssUrl?: string
  port (name: ListenerName): number
  close (): Promise<void>
}

function merge (base: Record<string, unknown>, over: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = { ...base }
  for (const [k, v] of Object.entries(over)) {
    out[k] = v !== null && typeof v === 'object' && !Array.isArray(v) && typeof out[k] === 'object'
      ? merge(out[k] as Record<string, unknown>, v as Record<string, unknown>)
      : v
  }
  return out
}

/**
 * Starts a real FerryMQ in this process on ephemeral loopback ports (MQTT, WebSocket, HTTP, and
 * MQTTS/WSS when `tls` is given), in-memory storage, logs off unless FERRYMQ_TEST_LOG is set.
 */
export interface StartOptions {
  /** Collects the broker's log lines (parsed JSON) here, at level info and up. */
  logs?: Array<Record<string, unknown>>
  storeRetry?: BrokerOptions['storeRetry']
}

export async function startBroker (overrides: DeepPartial<Config> = {}, options: StartOptions = {}): Promise<TestBroker> {
  const defaults = loadConfig({})
  const local = { port: 0, host: '127.0.0.1' }
  const base = merge(defaults as unknown as Record<string, unknown>, {
    listeners: { mqtt: local, ws: local, http: local, mqtts: local, wss: local },
    storage: { durability: 'memory' },
    log: { level: process.env.FERRYMQ_TEST_LOG ?? 'silent' },
  })
  // Parsed again so sections a test adds (bridges) get their defaults, as from a config file.
  const config = configSchema.parse(merge(base, overrides as Record<string, unknown>))
  const logs = options.logs
  const logger = logs === undefined
    ? createLogger(config.log.level, process.stderr)
    : createLogger('info', new Writable({
      write (chunk: Buffer, _encoding, callback) {
        for (const line of chunk.toString('utf8').split('\n')) if (line !== '') logs.push(JSON.parse(line) as Record<string, unknown>)
        callback()
      },
    }))
  const broker = createBroker(config, {
    logger,
    ephemeral: ['mqtt', 'ws', 'http', 'mqtts', 'wss'],
    ...(options.storeRetry === undefined ? {} : { storeRetry: options.storeRetry }),
  })
  await broker.start()
  const port = (name: ListenerName): number => {
    const address = broker.address(name)
    if (address === undefined) throw new Error(`listener ${name} is not running`)
    return address.port
  }
  const tls = config.tls !== undefined
  return {
    broker,
    config,
    mqttUrl: `mqtt://127.0.0.1:${port('mqtt')}`,
    wsUrl: `ws://127.0.0.1:${port('ws')}${config.listeners.ws.path}`,
    httpUrl: `http://127.0.0.1:${port('http')}`,
    ...(tls ? { mqttsUrl: `mqtts://127.0.0.1:${port('mqtts')}`, wssUrl: `wss://127.0.0.1:${port('wss')}${config.listeners.wss.path}` } : {}),
    port,
    close: () => broker.close(),
  }
}

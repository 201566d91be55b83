import { once, type EventEmitter } from 'node:events'
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt'

const live = new Set<MqttClient>()
const connacks = new WeakMap<MqttClient, { sessionPresent: boolean, returnCode?: number }>()

/** The CONNACK a client got from `connect`. */
export function connackOf (client: MqttClient): { sessionPresent: boolean, returnCode?: number } {
  const connack = connacks.get(client)
  if (connack === undefined) throw new Error('client was not connected through connect()')
  return connack
}

/** Connects a real MQTT.js client and resolves once CONNACK arrived; rejects on a refusal or after `timeoutMs`. */
export async function connect (url: string, options: IClientOptions = {}, timeoutMs = 5000): Promise<MqttClient> {
  const client = mqtt.connect(url, { reconnectPeriod: 0, connectTimeout: timeoutMs, ...options })
  holdEarlyMessages(client)
  live.add(client)
  client.on('end', () => live.delete(client))
  try {
    await withTimeout(new Promise<void>((resolve, reject) => {
      client.once('connect', (connack: { sessionPresent: boolean, returnCode?: number }) => {
        connacks.set(client, connack)
        resolve()
      })
      client.once('error', reject)
      client.once('close', () => reject(new Error('connection closed before CONNACK')))
    }), timeoutMs, `connect to ${url}`)
  } catch (err) {
    client.end(true)
    throw err
  }
  client.on('error', () => {})
  return client
}

/**
 * A broker may send a persistent session's queued messages in the same TCP read as the CONNACK:
 * MQTT.js then emits them before `await connect(...)` returns and the caller can listen. Messages
 * that arrive before the first 'message' listener is added are kept and handed to it.
 */
function holdEarlyMessages (client: MqttClient): void {
  const emitter = client as unknown as EventEmitter
  const early: unknown[][] = []
  const hold = (...args: unknown[]): void => { early.push(args) }
  const onNewListener = (event: string | symbol, listener: unknown): void => {
    if (event !== 'message' || listener === hold) return
    emitter.off('newListener', onNewListener)
    emitter.off('message', hold)
    // The listener is added right after this returns; later messages come from I/O, after this.
    queueMicrotask(() => { for (const args of early.splice(0)) emitter.emit('message', ...args) })
  }
  emitter.on('message', hold)
  emitter.on('newListener', onNewListener)
}

/** Ends every client `connect` made that is still open (afterEach). */
export async function endAllClients (): Promise<void> {
  await Promise.all([...live].map((c) => c.endAsync(true).catch(() => {})))
  live.clear()
}

export interface Received { topic: string, payload: string, qos: number, retain: boolean, dup: boolean }

/** Collects messages until `count` arrived, or rejects after `timeoutMs` with what was seen. */
export function collect (client: MqttClient, count: number, timeoutMs = 5000, filter: (topic: string) => boolean = () => true): Promise<Received[]> {
  const seen: Received[] = []
  return withTimeout(new Promise<Received[]>((resolve) => {
    const onMessage = (topic: string, payload: Buffer, packet: { qos: number, retain: boolean, dup: boolean }): void => {
      if (!filter(topic)) return
      seen.push({ topic, payload: payload.toString(), qos: packet.qos, retain: packet.retain, dup: packet.dup })
      if (seen.length >= count) {
        client.off('message', onMessage)
        resolve(seen)
      }
    }
    client.on('message', onMessage)
  }), timeoutMs, () => `waiting for ${count} messages; got ${seen.length}: ${JSON.stringify(seen.slice(0, 5))}`)
}

/** Rejects with a message that says what was awaited, instead of hanging the test. */
export async function withTimeout<T> (promise: Promise<T>, ms: number, what: string | (() => string)): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  const timeout = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${typeof what === 'string' ? what : what()}`)), ms)
  })
  try {
    return await Promise.race([promise, timeout])
  } finally {
    clearTimeout(timer)
  }
}

/** Waits for one event, with a timeout. */
export function waitForEvent<T extends unknown[]> (emitter: EventEmitter, event: string, timeoutMs = 5000): Promise<T> {
  return withTimeout(once(emitter, event) as Promise<T>, timeoutMs, `event "${event}"`)
}

/** Polls `check` until it returns true (for state only observable by asking, like /metrics). */
export async function eventually (check: () => boolean | Promise<boolean>, timeoutMs = 5000, what = 'condition'): Promise<void> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    if (await check()) return
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 25))
  }
}

import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { connect as netConnect, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import mqttPacket, { type Packet } from 'mqtt-packet'
import { afterAll, afterEach, beforeAll, expect, it } from 'vitest'
import { collect, connect, endAllClients, eventually, withTimeout } from '../helpers/clients.js'
import { freePort, spawnCli, type BrokerProcess } from '../helpers/process.js'
import { scrapeMetric } from '../helpers/metrics.js'

/**
 * 5,000 TCP connections opened at once against the built broker in a child process: each one is
 * either accepted (CONNACK 0) or refused by the connection limit (closed before any byte), the
 * broker survives it, and the refusals are exactly the excess over limits.maxConnections.
 */

const CONNECTIONS = 5000
/** How a refused socket may end on our side: a FIN, or a RST when our CONNECT was unread. */
const CLEAN_CLOSE_ERRORS = new Set(['ECONNRESET', 'EPIPE'])

let dir: string
let broker: BrokerProcess | undefined
const sockets: Socket[] = []

beforeAll(() => { dir = mkdtempSync(join(tmpdir(), 'ferrymq-connections-')) })
afterAll(() => { rmSync(dir, { recursive: true, force: true }) })
afterEach(async () => {
  for (const s of sockets.splice(0)) s.destroy()
  await endAllClients()
  if (broker !== undefined && broker.proc.exitCode === null && broker.proc.signalCode === null) {
    broker.proc.kill('SIGKILL')
    await broker.exited(5000).catch(() => {})
  }
  broker = undefined
})

interface Ports { mqtt: number, ws: number, http: number }

async function startBrokerProcess (extra: string[] = []): Promise<Ports> {
  const ports = new Set<number>()
  while (ports.size < 3) ports.add(await freePort())
  const [mqtt, ws, http] = [...ports] as [number, number, number]
  broker = spawnCli(['--port', String(mqtt), '--ws-port', String(ws), '--http-port', String(http), '--durability', 'memory', ...extra])
  await broker.ready()
  return { mqtt, ws, http }
}

type Outcome =
  | { kind: 'accepted' }
  | { kind: 'refused', error: string | undefined }
  | { kind: 'unexpected', detail: string }

interface Attempt {
  socket: Socket
  /** Settles on CONNACK 0, or when the socket closes first. */
  outcome: Promise<Outcome>
  /** Settles when the socket has closed, for whatever reason. */
  closed: Promise<void>
}

/** A raw TCP connection that sends CONNECT as soon as it is established. */
function attempt (port: number, clientId: string): Attempt {
  const socket = netConnect({ port, host: '127.0.0.1' })
  sockets.push(socket)
  const parser = mqttPacket.parser({ protocolVersion: 4 })
  let received = 0
  let error: string | undefined
  const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()))
  const outcome = new Promise<Outcome>((resolve) => {
    parser.on('packet', (packet: Packet) => {
      resolve(packet.cmd === 'connack' && packet.returnCode === 0
        ? { kind: 'accepted' }
        : { kind: 'unexpected', detail: `got ${JSON.stringify(packet)}` })
    })
    parser.on('error', (err: Error) => resolve({ kind: 'unexpected', detail: `unparsable reply: ${err.message}` }))
    socket.on('data', (chunk: Buffer) => {
      received += chunk.length
      parser.parse(chunk)
    })
    socket.on('error', (err: NodeJS.ErrnoException) => { error = err.code ?? err.message })
    socket.once('connect', () => {
      socket.write(mqttPacket.generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clean: true, clientId, keepalive: 120 }))
    })
    void closed.then(() => resolve(received === 0 && (error === undefined || CLEAN_CLOSE_ERRORS.has(error))
      ? { kind: 'refused', error }
      : { kind: 'unexpected', detail: `closed after ${received} bytes without CONNACK 0 (error ${error ?? 'none'})` }))
  })
  return { socket, outcome, closed }
}

/** Opens `n` connections at once and waits until each one was accepted or refused. */
async function openAtOnce (port: number, n: number, prefix: string): Promise<{ attempts: Attempt[], accepted: number, refused: number }> {
  const attempts = Array.from({ length: n }, (_, i) => attempt(port, `${prefix}-${i}`))
  const outcomes = await withTimeout(Promise.all(attempts.map((a) => a.outcome)), 40_000, `${n} connections to be accepted or refused`)
  const unexpected = outcomes.filter((o) => o.kind === 'unexpected')
  expect(unexpected.slice(0, 5), `${unexpected.length} connections ended neither accepted nor refused`).toEqual([])
  return {
    attempts,
    accepted: outcomes.filter((o) => o.kind === 'accepted').length,
    refused: outcomes.filter((o) => o.kind === 'refused').length,
  }
}

async function metric (http: number, name: string): Promise<number | undefined> {
  return await scrapeMetric(`http://127.0.0.1:${http}`, name)
}

/** A fresh MQTT.js client connects and gets its own message back: the broker serves. */
async function brokerServes (port: number, clientId: string): Promise<void> {
  const client = await connect(`mqtt://127.0.0.1:${port}`, { clientId }, 10_000)
  await client.subscribeAsync(`probe/${clientId}`, { qos: 1 })
  const got = collect(client, 1, 10_000)
  await client.publishAsync(`probe/${clientId}`, 'still here', { qos: 1 })
  expect((await got)[0]?.payload).toBe('still here')
  await client.endAsync()
}

it(`accepts ${CONNECTIONS} connections opened at once, keeps serving, and shuts down cleanly with all of them open`, async () => {
  const { mqtt, http } = await startBrokerProcess()
  const { attempts, accepted, refused } = await openAtOnce(mqtt, CONNECTIONS, 'burst')
  // Below the default limits.maxConnections (10,000) every one of them is accepted.
  expect({ accepted, refused }).toEqual({ accepted: CONNECTIONS, refused: 0 })
  expect(broker?.proc.exitCode).toBe(null)
  expect(await metric(http, 'ferrymq_clients_connected')).toBe(CONNECTIONS)
  expect(await metric(http, 'ferrymq_connections_refused_total')).toBe(0)

  await brokerServes(mqtt, 'after-burst')

  // SIGTERM with 5,000 clients connected: every socket is closed and the process exits 0 in time.
  const startedAt = Date.now()
  broker?.proc.kill('SIGTERM')
  expect(await broker?.exited(6000)).toBe(0)
  expect(Date.now() - startedAt).toBeLessThan(5000)
  await withTimeout(Promise.all(attempts.map((a) => a.closed)), 5000, 'every client socket to be closed by the shutdown')
})

it('with limits.maxConnections 1000, exactly the excess over 1000 is refused and counted in ferrymq_connections_refused_total', async () => {
  const limit = 1000
  const config = join(dir, 'limited.yaml')
  writeFileSync(config, `limits:\n  maxConnections: ${limit}\n`)
  const { mqtt, http } = await startBrokerProcess(['--config', config])

  const { attempts, accepted, refused } = await openAtOnce(mqtt, CONNECTIONS, 'limited')
  expect({ accepted, refused }).toEqual({ accepted: limit, refused: CONNECTIONS - limit })
  expect(broker?.proc.exitCode).toBe(null)
  expect(await metric(http, 'ferrymq_connections_refused_total')).toBe(CONNECTIONS - limit)
  expect(await metric(http, 'ferrymq_clients_connected')).toBe(limit)

  // At the limit a well-behaved client is refused too, and counted.
  await expect(connect(`mqtt://127.0.0.1:${mqtt}`, { clientId: 'one-too-many' })).rejects.toThrow()
  expect(await metric(http, 'ferrymq_connections_refused_total')).toBe(CONNECTIONS - limit + 1)

  // Once the held connections are gone the broker serves again.
  for (const a of attempts) a.socket.destroy()
  await eventually(async () => await metric(http, 'ferrymq_clients_connected') === 0, 10_000, 'the broker to see the 1000 clients leave')
  await brokerServes(mqtt, 'after-limit')
  expect(await metric(http, 'ferrymq_connections_refused_total')).toBe(CONNECTIONS - limit + 1)

  broker?.proc.kill('SIGTERM')
  expect(await broker?.exited(6000)).toBe(0)
})

import { createServer as createHttpServer, type IncomingMessage, type ServerResponse } from 'node:http'
import { createServer as createHttpsServer } from 'node:https'
import type { TlsOptions } from 'node:tls'
import websocketStream from 'websocket-stream'
import type { Logger } from '../observability/logger.js'
import { type AcceptConnection, type Listener, boundAddress, closeServer, listen, trackHandshakes } from './listener.js'

export interface WsListenerOptions {
  host: string
  port: number
  path: string
  /** Largest WebSocket message accepted: the MQTT maximum packet size. */
  maxPayload: number
  /** A socket that has not completed the WebSocket upgrade by then is closed (limits.connectTimeoutMs). */
  upgradeTimeoutMs: number
  tls?: TlsOptions
}

/**
 * MQTT over WebSocket (or secure WebSocket) through websocket-stream's server, which runs on the
 * patched ws@8 forced by package.json "overrides" (ws@3 crashes on a request with many headers,
 * CVE-2024-37890).
 */
export async function listenWs (name: string, opts: WsListenerOptions, accept: AcceptConnection, logger: Logger): Promise<Listener> {
  const onRequest = (req: IncomingMessage, res: ServerResponse): void => {
    res.writeHead(426, { 'content-type': 'text/plain', upgrade: 'websocket', connection: 'close' })
    res.end(`FerryMQ speaks MQTT over WebSocket at ${opts.path}; connect with an MQTT client (ws://host:port${opts.path}).\n`)
    req.resume()
  }
  // Node's own header timeout is 60 s, checked every 30 s: a socket that opens and never upgrades
  // would outlive limits.connectTimeoutMs by far. Hold it to the same timeout as a silent MQTT socket.
  const timeouts = {
    headersTimeout: opts.upgradeTimeoutMs,
    requestTimeout: opts.upgradeTimeoutMs,
    connectionsCheckingInterval: Math.min(1000, opts.upgradeTimeoutMs),
  }
  const server = opts.tls === undefined
    ? createHttpServer(timeouts, onRequest)
    : createHttpsServer({ ...opts.tls, ...timeouts }, onRequest)
  server.on('clientError', (err: Error, socket) => {
    logger.debug({ listener: name, err: err.message }, 'bad HTTP request')
    socket.destroy()
  })
  const destroyHandshakes = opts.tls === undefined ? () => {} : trackHandshakes(server as ReturnType<typeof createHttpsServer>)
  if (opts.tls !== undefined) {
    server.on('tlsClientError', (err: Error) => logger.info({ listener: name, err: err.message }, 'TLS handshake failed'))
  }
  const wss = websocketStream.createServer({ server, path: opts.path, maxPayload: opts.maxPayload, perMessageDeflate: false }, undefined)
  wss.on('stream', (stream, req) => accept(stream, name, req))
  wss.on('error', (err) => logger.error({ listener: name, err: err.message }, 'WebSocket server error'))
  await listen(server, name, opts.host, opts.port)
  return {
    name,
    address: () => boundAddress(server),
    close: async () => {
      const closed = closeServer(server)
      wss.close()
      server.closeAllConnections()
      destroyHandshakes()
      await closed
    },
  }
}

import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import type { Registry } from 'prom-client'
import type { Logger } from '../observability/logger.js'
import { type Listener, boundAddress, closeServer, listen } from './listener.js'

export interface HttpEndpoints {
  /** True while the process serves (up to the start of shutdown). */
  live (): boolean
  /** True once every listener and the store are up, until shutdown starts. */
  ready (): boolean
  registry: Registry
  /** GET /api/v1/bridges: each bridge's state and counters. */
  bridges?: () => Promise<unknown[]>
}

/** The operations endpoints: GET /healthz, /readyz, /metrics (Prometheus text format) and /api/v1/bridges (JSON). */
export async function listenHttp (name: string, host: string, port: number, endpoints: HttpEndpoints, logger: Logger): Promise<Listener> {
  const server = createServer((req, res) => {
    handle(req, res, endpoints).catch((err: Error) => {
      logger.error({ err: err.message, url: req.url }, 'HTTP handler failed')
      if (!res.headersSent) res.writeHead(500, { 'content-type': 'text/plain' })
      res.end('internal error\n')
    })
  })
  server.on('clientError', (_err, socket) => socket.destroy())
  await listen(server, name, host, port)
  return {
    name,
    address: () => boundAddress(server),
    close: async () => {
      const closed = closeServer(server)
      server.closeAllConnections()
      await closed
    },
  }
}

async function handle (req: IncomingMessage, res: ServerResponse, endpoints: HttpEndpoints): Promise<void> {
  const path = (req.url ?? '/').split('?')[0]
  if (req.method !== 'GET' && req.method !== 'HEAD') {
    res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain' })
    res.end('method not allowed\n')
    return
  }
  switch (path) {
    case '/healthz':
      return text(res, endpoints.live() ? 200 : 503, endpoints.live() ? 'ok\n' : 'shutting down\n')
    case '/readyz':
      return text(res, endpoints.ready() ? 200 : 503, endpoints.ready() ? 'ready\n' : 'not ready\n')
    case '/metrics': {
      const body = await endpoints.registry.metrics()
      res.writeHead(200, { 'content-type': endpoints.registry.contentType })
      res.end(body)
      return
    }
    case '/api/v1/bridges': {
      const body = JSON.stringify(await (endpoints.bridges?.() ?? Promise.resolve([])), null, 2) + '\n'
      res.writeHead(200, { 'content-type': 'application/json' })
      res.end(body)
      return
    }
    default:
      return text(res, 404, 'not found: try /healthz, /readyz, /metrics or /api/v1/bridges\n')
  }
}

function text (res: ServerResponse, status: number, body: string): void {
  res.writeHead(status, { 'content-type': 'text/plain' })
  res.end(body)
}

import { createServer as createNetServer } from 'node:net'
import { createServer as createTlsServer, type TlsOptions } from 'node:tls'
import type { Logger } from '../observability/logger.js'
import { type AcceptConnection, type Listener, boundAddress, closeServer, listen, trackHandshakes } from './listener.js'

/** MQTT over TCP, or over TLS when `tls` is given. */
export async function listenTcp (name: string, host: string, port: number, accept: AcceptConnection, logger: Logger, tls?: TlsOptions): Promise<Listener> {
  const server = tls === undefined ? createNetServer({ noDelay: true }) : createTlsServer({ ...tls, noDelay: true } as TlsOptions)
  let destroyHandshakes = (): void => {}
  if (tls === undefined) {
    server.on('connection', (socket) => accept(socket, name))
  } else {
    destroyHandshakes = trackHandshakes(server as ReturnType<typeof createTlsServer>)
    server.on('secureConnection', (socket) => accept(socket, name))
    server.on('tlsClientError', (err, socket) => {
      logger.info({ listener: name, remote: socket.remoteAddress, err: err.message }, 'TLS handshake failed')
    })
  }
  await listen(server, name, host, port)
  return {
    name,
    address: () => boundAddress(server),
    close: () => {
      const closed = closeServer(server)
      destroyHandshakes()
      return closed
    },
  }
}

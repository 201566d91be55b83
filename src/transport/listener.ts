import type { Server as NetServer, AddressInfo, Socket } from 'node:net'
import type { Server as TlsServer, TLSSocket } from 'node:tls'
import type { IncomingMessage } from 'node:http'
import type { Duplex } from 'node:stream'

/** Receives every accepted MQTT connection, whatever its transport. */
export type AcceptConnection = (conn: Duplex, listener: string, req?: IncomingMessage) => void

/** A bound network listener and the means to stop it. */
export interface Listener {
  readonly name: string
  address (): AddressInfo
  /** Stops accepting; resolves when the server has let go of its port and every connection is gone. */
  close (): Promise<void>
}

/** A listener could not be started (port in use, no permission): a runtime failure, exit code 1. */
export class ListenError extends Error {
  readonly code = 'FERRYMQ_LISTEN_FAILED'
  constructor (name: string, host: string, port: number, cause: NodeJS.ErrnoException) {
    const why = cause.code === 'EADDRINUSE'
      ? 'the address is in use by another process'
      : cause.code === 'EACCES' ? 'permission denied (ports below 1024 need privileges)' : cause.message
    super(`listeners.${name}: cannot listen on ${host}:${port}: ${why}`)
    this.name = 'ListenError'
  }
}

export function listen (server: NetServer, name: string, host: string, port: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: NodeJS.ErrnoException): void => reject(new ListenError(name, host, port, err))
    server.once('error', onError)
    server.listen({ port, host }, () => {
      server.off('error', onError)
      resolve()
    })
  })
}

/** Closes a server; pair with destroying its connections so the promise settles promptly. */
export function closeServer (server: NetServer): Promise<void> {
  return new Promise((resolve) => {
    if (!server.listening) return resolve()
    server.close(() => resolve())
  })
}

export function boundAddress (server: NetServer): AddressInfo {
  return server.address() as AddressInfo
}

/**
 * A TLS server hands a socket over only once its handshake is done, and server.close() waits for
 * the sockets still in it: a peer that connects and stays silent would hold close() up for the
 * TLS handshakeTimeout (120 s). Returns a function that destroys the sockets still in handshake.
 */
export function trackHandshakes (server: TlsServer): () => void {
  const pending = new Map<string, Socket>()
  const key = (socket: Socket): string => `${socket.remoteAddress}|${socket.remotePort}`
  server.on('connection', (socket: Socket) => {
    const k = key(socket)
    pending.set(k, socket)
    socket.once('close', () => { if (pending.get(k) === socket) pending.delete(k) })
  })
  server.on('secureConnection', (socket: TLSSocket) => pending.delete(key(socket)))
  return () => {
    for (const socket of pending.values()) socket.destroy()
    pending.clear()
  }
}

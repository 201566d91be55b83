import { createServer, connect as netConnect, type AddressInfo, type Server, type Socket } from 'node:net'

/**
 * How a cut link behaves. `reset`: open connections are destroyed and new ones are accepted and
 * closed at once (the peer sees ECONNRESET / close). `blackhole`: open connections stop carrying
 * bytes in both directions and new ones are accepted and never answered, as when a cable is pulled
 * or a firewall drops packets (the peer notices only by its own timeouts; the kernel still takes
 * what fits in its socket buffers).
 */
export type CutMode = 'reset' | 'blackhole'

interface Pair { client: Socket, upstream: Socket }

/**
 * A TCP proxy on loopback that a test controls: it forwards to `target` until told to cut the
 * link, and forwards again once restored. For partition tests of the bridge (issue 5) and the
 * fleet simulator's end-to-end run: real sockets, real timeouts, no mocks.
 */
export class FaultProxy {
  readonly #server: Server
  readonly #target: { host: string, port: number }
  readonly #pairs = new Set<Pair>()
  /** Sockets accepted while black-holed: held open, never forwarded. */
  readonly #held = new Set<Socket>()
  #cut: CutMode | null = null
  #delayMs = 0
  /** Connections accepted (all modes). */
  accepted = 0
  /** Bytes forwarded client → target and target → client. */
  bytesUp = 0
  bytesDown = 0

  private constructor (server: Server, target: { host: string, port: number }) {
    this.#server = server
    this.#target = target
  }

  /** Listens on an ephemeral loopback port and forwards to `target`. */
  static async start (target: { host?: string, port: number }): Promise<FaultProxy> {
    const server = createServer()
    const proxy = new FaultProxy(server, { host: target.host ?? '127.0.0.1', port: target.port })
    server.on('connection', (socket) => proxy.#accept(socket))
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject)
      server.listen(0, '127.0.0.1', () => resolve())
    })
    return proxy
  }

  /** The proxy's port: point the client here. */
  get port (): number {
    return (this.#server.address() as AddressInfo).port
  }

  /** Open forwarded connections. */
  get connections (): number {
    return this.#pairs.size
  }

  get isCut (): boolean {
    return this.#cut !== null
  }

  /** Cuts the link (see CutMode). */
  cut (mode: CutMode = 'reset'): void {
    this.#cut = mode
    for (const pair of [...this.#pairs]) {
      if (mode === 'reset') {
        this.#destroy(pair)
      } else {
        pair.client.pause()
        pair.upstream.pause()
      }
    }
  }

  /**
   * Forwards again. Black-holed connections resume where they stopped (a short outage TCP rides
   * out); connections accepted while black-holed are closed, as their peers have given up on them.
   */
  restore (): void {
    this.#cut = null
    for (const pair of this.#pairs) {
      pair.client.resume()
      pair.upstream.resume()
    }
    for (const socket of this.#held) socket.destroy()
    this.#held.clear()
  }

  /** Adds `ms` of latency to every chunk in both directions (0 removes it). */
  delay (ms: number): void {
    this.#delayMs = ms
  }

  /** Closes every connection and the listener. */
  async close (): Promise<void> {
    for (const pair of [...this.#pairs]) this.#destroy(pair)
    for (const socket of this.#held) socket.destroy()
    this.#held.clear()
    await new Promise<void>((resolve) => this.#server.close(() => resolve()))
  }

  #accept (client: Socket): void {
    this.accepted++
    client.on('error', () => {})
    if (this.#cut === 'reset') {
      client.destroy()
      return
    }
    if (this.#cut === 'blackhole') {
      this.#held.add(client)
      client.once('close', () => this.#held.delete(client))
      return
    }
    const upstream = netConnect(this.#target)
    upstream.on('error', () => {})
    const pair: Pair = { client, upstream }
    this.#pairs.add(pair)
    const end = (): void => this.#destroy(pair)
    client.once('close', end)
    upstream.once('close', end)
    this.#pipe(client, upstream, (n) => { this.bytesUp += n })
    this.#pipe(upstream, client, (n) => { this.bytesDown += n })
  }

  /** Forwards `from` → `to` in order, each chunk `delay` ms after it arrived, respecting backpressure. */
  #pipe (from: Socket, to: Socket, count: (n: number) => void): void {
    let chain = Promise.resolve()
    from.on('data', (chunk: Buffer) => {
      const due = performance.now() + this.#delayMs
      chain = chain.then(() => {
        const wait = due - performance.now()
        if (wait <= 0) return this.#write(to, from, chunk, count)
        return new Promise<void>((resolve) => setTimeout(() => {
          this.#write(to, from, chunk, count)
          resolve()
        }, wait))
      })
    })
  }

  #write (to: Socket, from: Socket, chunk: Buffer, count: (n: number) => void): void {
    if (to.destroyed) return
    count(chunk.length)
    if (!to.write(chunk) && !from.isPaused()) {
      from.pause()
      to.once('drain', () => { if (this.#cut === null) from.resume() })
    }
  }

  #destroy (pair: Pair): void {
    if (!this.#pairs.delete(pair)) return
    pair.client.destroy()
    pair.upstream.destroy()
  }
}

import { connect as netConnect, createServer, type AddressInfo, type Server, type Socket } from 'node:net'

/**
 * How a cut uplink behaves. `reset`: open connections are destroyed on both sides and new ones are
 * accepted and closed at once (the bridge sees a close / ECONNRESET at once). `blackhole`: open
 * connections stop carrying bytes both ways without being closed, and new ones are accepted and
 * never answered, as when a cable is pulled (the bridge notices only through its keepalive and
 * connect timeouts).
 */
export type CutMode = 'reset' | 'blackhole'

interface Pair { client: Socket, upstream: Socket }

/**
 * A TCP proxy on 127.0.0.1 that can cut the link and restore it: between FerryMQ's bridge and
 * the cloud broker in the simulator's end-to-end run, and in the project's partition tests
 * (test/helpers/fault-proxy.ts re-exports it). Real sockets, real timeouts.
 */
export class UplinkProxy {
  readonly #server: Server
  readonly #target: { host: string, port: number }
  readonly #pairs = new Set<Pair>()
  /** Connections accepted while black-holed: held open, never forwarded, closed on restore. */
  readonly #held = new Set<Socket>()
  #cut: CutMode | null = null
  #delayMs = 0
  /** Connections accepted (all modes), and bytes forwarded each way. */
  accepted = 0
  bytesUp = 0
  bytesDown = 0

  private constructor (server: Server, target: { host: string, port: number }) {
    this.#server = server
    this.#target = target
  }

  /** Listens on `port` (0: an ephemeral one) on 127.0.0.1 and forwards to `target`. */
  static async start (target: { host?: string, port: number }, port = 0): Promise<UplinkProxy> {
    const server = createServer()
    const proxy = new UplinkProxy(server, { host: target.host ?? '127.0.0.1', port: target.port })
    server.on('connection', (socket) => proxy.#accept(socket))
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject)
      server.listen(port, '127.0.0.1', () => {
        server.off('error', reject)
        resolve()
      })
    })
    return proxy
  }

  get port (): number {
    return (this.#server.address() as AddressInfo).port
  }

  /** Forwarded connections open now. */
  get connections (): number {
    return this.#pairs.size
  }

  /** The current cut, or null while the link forwards. */
  get cutMode (): CutMode | null {
    return this.#cut
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
   * Forwards again. Black-holed connections resume where they stopped (if their peers have not
   * given up on them meanwhile, TCP rides the outage out); connections accepted during the black
   * hole are closed.
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
    // A half-close from either side ends the pair (MQTT has no use for half-open links).
    client.once('end', end)
    upstream.once('end', end)
    this.#pipe(client, upstream, (n) => { this.bytesUp += n })
    this.#pipe(upstream, client, (n) => { this.bytesDown += n })
  }

  /**
   * Forwards `from` → `to` in order, each chunk `delay` ms after it arrived, pausing `from` while
   * `to` is full (resumed on drain unless the link is cut meanwhile).
   */
  #pipe (from: Socket, to: Socket, count: (n: number) => void): void {
    let chain = Promise.resolve()
    from.on('data', (chunk: Buffer) => {
      if (this.#delayMs === 0) {
        this.#write(to, from, chunk, count)
        return
      }
      const due = performance.now() + this.#delayMs
      chain = chain.then(async () => {
        const wait = due - performance.now()
        if (wait > 0) await new Promise<void>((resolve) => setTimeout(resolve, wait))
        this.#write(to, from, chunk, count)
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

import { createServer, connect as netConnect, type AddressInfo, type Server, type Socket } from 'node:net'

/**
 * The uplink of a bridge scenario: a TCP proxy on loopback in front of the upstream broker that
 * the bench switches on and off. While down, it accepts a connection and closes it at once (the
 * bridge sees its connect fail and retries); while up, it forwards with pipe() (kernel-sized
 * chunks, backpressure included), so it adds a hop but no per-message work. It is the bench's
 * version of test/helpers/fault-proxy.ts, reduced to what a drain measurement needs: when the
 * first connection was forwarded.
 */
export class LinkSwitch {
  readonly #server: Server
  readonly #target: number
  readonly #open = new Set<Socket>()
  #up = false
  /** performance.now() when the first connection after up() was forwarded; null before. */
  forwardedAt: number | null = null

  private constructor (server: Server, target: number) {
    this.#server = server
    this.#target = target
  }

  /** Listens on a free loopback port, down, in front of 127.0.0.1:`target`. */
  static async start (target: number): Promise<LinkSwitch> {
    const server = createServer()
    const link = new LinkSwitch(server, target)
    server.on('connection', (socket) => link.#accept(socket))
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject)
      server.listen(0, '127.0.0.1', () => resolve())
    })
    return link
  }

  get port (): number {
    return (this.#server.address() as AddressInfo).port
  }

  up (): void {
    this.#up = true
  }

  async close (): Promise<void> {
    for (const s of this.#open) s.destroy()
    await new Promise<void>((resolve) => this.#server.close(() => resolve()))
  }

  #accept (client: Socket): void {
    client.on('error', () => {})
    if (!this.#up) {
      client.destroy()
      return
    }
    this.forwardedAt ??= performance.now()
    client.setNoDelay(true)
    const upstream = netConnect({ port: this.#target, host: '127.0.0.1', noDelay: true })
    upstream.on('error', () => {})
    this.#open.add(client)
    this.#open.add(upstream)
    const end = (): void => {
      client.destroy()
      upstream.destroy()
      this.#open.delete(client)
      this.#open.delete(upstream)
    }
    client.once('close', end)
    upstream.once('close', end)
    client.pipe(upstream)
    upstream.pipe(client)
  }
}

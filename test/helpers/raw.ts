import { connect as netConnect, type Socket } from 'node:net'
import mqttPacket, { type Packet } from 'mqtt-packet'
import { withTimeout } from './clients.js'

/**
 * A bare TCP connection that speaks MQTT byte by byte, for what a well-behaved client library
 * will not send: malformed packets, a second CONNECT, invalid UTF-8, stalled reads.
 */
export class RawClient {
  readonly packets: Packet[] = []
  readonly closed: Promise<void>
  private readonly parser: ReturnType<typeof mqttPacket.parser>
  private waiters: (() => void)[] = []

  /** `protocolVersion` 5 encodes and decodes MQTT 5 packets (properties, reason codes); 4 (MQTT 3.1.1) by default. */
  constructor (readonly socket: Socket, readonly protocolVersion: 4 | 5 = 4) {
    this.parser = mqttPacket.parser({ protocolVersion })
    this.parser.on('packet', (packet: Packet) => {
      this.packets.push(packet)
      for (const wake of this.waiters.splice(0)) wake()
    })
    socket.on('data', (chunk) => this.parser.parse(chunk))
    socket.on('error', () => {})
    this.closed = new Promise((resolve) => socket.once('close', () => resolve()))
  }

  static async open (port: number, host = '127.0.0.1', protocolVersion: 4 | 5 = 4): Promise<RawClient> {
    const socket = netConnect({ port, host })
    await withTimeout(new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve)
      socket.once('error', reject)
    }), 5000, `TCP connect to ${host}:${port}`)
    return new RawClient(socket, protocolVersion)
  }

  send (packet: Packet): void {
    this.socket.write(mqttPacket.generate(packet, { protocolVersion: this.protocolVersion }))
  }

  sendBytes (bytes: Buffer | Uint8Array): void {
    this.socket.write(bytes)
  }

  /** CONNECT with sane defaults (this client's protocol version, MQTT 3.1.1 unless opened for 5; clean session, keepalive 60). */
  sendConnect (fields: Partial<mqttPacket.IConnectPacket> = {}): void {
    this.send({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: this.protocolVersion, clean: true, clientId: 'raw', keepalive: 60, ...fields } as mqttPacket.IConnectPacket)
  }

  /** Resolves with the next packet of type `cmd` (already received ones count), or rejects after `timeoutMs`. */
  async next<C extends Packet['cmd']> (cmd: C, timeoutMs = 5000): Promise<Extract<Packet, { cmd: C }>> {
    const take = (): Extract<Packet, { cmd: C }> | undefined => {
      const i = this.packets.findIndex((p) => p.cmd === cmd)
      return i === -1 ? undefined : this.packets.splice(i, 1)[0] as Extract<Packet, { cmd: C }>
    }
    return withTimeout((async () => {
      for (;;) {
        const found = take()
        if (found !== undefined) return found
        await new Promise<void>((resolve, reject) => {
          this.waiters.push(resolve)
          this.closed.then(() => reject(new Error(`connection closed while waiting for ${cmd}`)), () => {})
        })
      }
    })(), timeoutMs, `${cmd} packet`)
  }

  /** Resolves when the broker has closed the connection, or rejects after `timeoutMs`. */
  waitClosed (timeoutMs = 5000): Promise<void> {
    return withTimeout(this.closed, timeoutMs, 'the broker to close the connection')
  }

  destroy (): void {
    this.socket.destroy()
  }
}

import { createServer } from 'node:net'
import { CONNACK, FrameReader, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL, SUBACK, ackPacket } from './wire.js'

/**
 * The discard sink: a "broker" that accepts connections, answers CONNECT, SUBSCRIBE and every
 * QoS handshake, and throws messages away. Publishing against it measures the load generator's
 * own ceiling. Run as a child process; answers "count" over IPC with PUBLISH packets received.
 * Speaks 3.1.1 or 5, as each client's CONNECT asks: an MQTT 5 CONNACK and SUBACK carry an empty
 * property block; a v5 PUBLISH's identifier sits where 3.1.1's does and bare acknowledgements are
 * valid in both.
 */
const port = Number(process.argv[2])
let received = 0
const CONNECT = 1
const SUBSCRIBE = 8
const PINGREQ = 12

const server = createServer({ noDelay: true }, (socket) => {
  socket.on('error', () => {})
  let v5 = false
  const reader = new FrameReader((type, flags, body) => {
    switch (type) {
      case CONNECT:
        // Protocol name (length-prefixed), then the protocol level.
        v5 = body[2 + body.readUInt16BE(0)] === 5
        socket.write(v5 ? Buffer.from([CONNACK << 4, 3, 0, 0, 0]) : Buffer.from([CONNACK << 4, 2, 0, 0]))
        break
      case SUBSCRIBE:
        socket.write(v5
          ? Buffer.from([SUBACK << 4, 4, body[0] as number, body[1] as number, 0, 0])
          : Buffer.from([SUBACK << 4, 3, body[0] as number, body[1] as number, 0]))
        break
      case PUBLISH: {
        received++
        const qos = (flags >> 1) & 3
        if (qos > 0) socket.write(ackPacket(qos === 1 ? PUBACK : PUBREC, body.readUInt16BE(2 + body.readUInt16BE(0))))
        break
      }
      case PUBREL:
        socket.write(ackPacket(PUBCOMP, body.readUInt16BE(0)))
        break
      case PINGREQ:
        socket.write(Buffer.from([0xd0, 0]))
        break
    }
  })
  socket.on('data', (chunk) => reader.push(chunk))
})
server.listen(port, '127.0.0.1')
process.on('message', () => process.send?.({ received }))
process.on('SIGTERM', () => { server.close(); process.exit(0) })

import { createServer } from 'node:net'
import { CONNACK, FrameReader, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL, SUBACK, ackPacket } from './wire.js'

/**
 * The discard sink: a "broker" that accepts connections, answers CONNECT, SUBSCRIBE and every
 * QoS handshake, and throws messages away. Publishing against it measures the load generator's
 * own ceiling. Run as a child process; answers "count" over IPC with PUBLISH packets received.
 */
const port = Number(process.argv[2])
let received = 0
const CONNECT = 1
const SUBSCRIBE = 8
const PINGREQ = 12

const server = createServer({ noDelay: true }, (socket) => {
  socket.on('error', () => {})
  const reader = new FrameReader((type, flags, body) => {
    switch (type) {
      case CONNECT:
        socket.write(Buffer.from([CONNACK << 4, 2, 0, 0]))
        break
      case SUBSCRIBE:
        socket.write(Buffer.from([SUBACK << 4, 3, body[0] as number, body[1] as number, 0]))
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

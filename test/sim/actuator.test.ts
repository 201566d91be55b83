import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { Commander } from '../../firmware-sim/src/command.js'
import { Device } from '../../firmware-sim/src/device.js'
import { Ledger } from '../../firmware-sim/src/ledger.js'
import { connect, endAllClients, eventually } from '../helpers/clients.js'
import { startBroker, type TestBroker } from '../helpers/broker.js'

let broker: TestBroker
beforeAll(async () => { broker = await startBroker() })
afterAll(async () => { await endAllClients(); await broker.close() })

function actuator (id: string, protocol: 4 | 5): Device {
  return new Device({
    id, url: broker.mqttUrl, protocol, profile: 'actuator', runId: 'r', intervalMs: 60_000, jitter: 0, qosMix: [0, 1, 0],
    payloadSize: 0, bufferSize: 10, backoff: { baseMs: 100, maxMs: 1000 }, keepaliveSeconds: 30, sessionExpirySeconds: 60,
    connectTimeoutMs: 5000, sleepyBurst: 1, sleepMs: 1000, ledger: new Ledger('r').device(id),
  })
}

describe('actuator', () => {
  it.each([5, 4] as const)('answers a command on MQTT %s and keeps status retained', async (protocol) => {
    const id = `act-v${protocol}`
    const d = actuator(id, protocol)
    d.start()
    // A device drives itself only through tick(); a fleet calls it, here the test does.
    const timer = setInterval(() => { d.tick(Date.now()) }, 20)
    try {
      await eventually(() => d.connected, 5000, 'actuator connected')
      const commander = new Commander({ url: broker.mqttUrl, protocol })
      await commander.start()
      try {
        // The SUBSCRIBE follows the CONNACK; a command sent before the SUBACK would be missed.
        await eventually(() => d.commandsReady, 5000, 'command subscription')
        const answer = await commander.request(id, 'reboot', 5000)
        expect(answer).toMatchObject({ device: id, action: 'reboot', ok: true })
        expect(d.commandsAnswered).toBeGreaterThanOrEqual(1)
      } finally {
        await commander.stop()
      }
      const status = await connect(broker.mqttUrl, { protocolVersion: protocol })
      const got = new Promise<string>((resolve) => { status.on('message', (_t, p) => { resolve(p.toString()) }) })
      await status.subscribeAsync(`devices/${id}/status`, { qos: 1 })
      expect(await got).toBe('online')
    } finally {
      clearInterval(timer)
      await d.stop()
    }
  })
})

/**
 * Per-device credentials: "{id}" in the username and password stands for each device's id (the
 * CLI gives the verifier the same template with "verifier"). Checked against a real Mosquitto with
 * a password file and anonymous access off (FerryMQ has no authentication yet): every device logs
 * in as itself and nothing is lost.
 */
import { execFileSync } from 'node:child_process'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { runSimulation } from '../../firmware-sim/src/run.js'
import { hasMosquitto, startMosquitto, type Mosquitto } from '../helpers/mosquitto.js'

const dir = mkdtempSync(join(tmpdir(), 'ferrymq-sim-creds-'))
let up: Mosquitto | undefined
afterAll(async () => {
  await up?.stop()
  rmSync(dir, { recursive: true, force: true })
})

describe.skipIf(!hasMosquitto())('per-device credentials (needs the mosquitto binary)', () => {
  it('each device logs in as itself', async () => {
    const passwords = join(dir, 'passwd')
    writeFileSync(passwords, '')
    for (let i = 0; i < 5; i++) execFileSync('mosquitto_passwd', ['-b', passwords, `dev-cr-${i}`, `pw-cr-${i}`])
    execFileSync('mosquitto_passwd', ['-b', passwords, 'dev-verifier', 'pw-verifier'])
    up = await startMosquitto({ extra: ['allow_anonymous false', `password_file ${passwords}`] })
    const base = {
      devices: 5, url: up.url, protocol: 5 as const, idPrefix: 'cr-', profileMix: { sensor: 100 }, qosMix: [0, 1, 0] as [number, number, number],
      rate: 10, chattyFactor: 10, jitter: 0.2, sleepyBurst: 3, sleepSeconds: 0.5, payloadSize: 0, bufferSize: 100,
      backoff: { baseMs: 100, maxMs: 500 }, keepaliveSeconds: 30, sessionExpirySeconds: 60, connectTimeoutMs: 3000, rampPerSecond: 100,
      durationMs: 1500, graceMs: 5000,
      verify: { url: up.url, topic: 'devices/+/telemetry', qos: 1 as const, username: 'dev-verifier', password: 'pw-verifier' },
    }
    const s = await runSimulation({ ...base, username: 'dev-{id}', password: 'pw-{id}' })
    expect(s.ok).toBe(true)
    expect(s.totals.acked).toBeGreaterThan(20)
    expect(s.totals.lost).toBe(0)
  })
})

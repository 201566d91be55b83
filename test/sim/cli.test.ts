import { spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { Summary } from '../../firmware-sim/src/report.js'
import { startBroker, type TestBroker } from '../helpers/broker.js'

const ROOT = fileURLToPath(new URL('../../', import.meta.url))

interface Finished { code: number | null, stdout: string, stderr: string }

/** `node --import tsx firmware-sim/src/cli.ts ...` to completion. */
async function sim (args: string[]): Promise<Finished> {
  const p = spawn(process.execPath, ['--import', 'tsx', 'firmware-sim/src/cli.ts', ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] })
  let stdout = ''
  let stderr = ''
  p.stdout.on('data', (c: Buffer) => { stdout += c.toString() })
  p.stderr.on('data', (c: Buffer) => { stderr += c.toString() })
  const code = await new Promise<number | null>((resolve) => { p.on('close', (c) => { resolve(c) }) })
  return { code, stdout, stderr }
}

let broker: TestBroker
beforeAll(async () => { broker = await startBroker() })
afterAll(async () => { await broker.close() })

describe('firmware-sim CLI', () => {
  it('exits 2 with a clear message on a bad flag', async () => {
    const r = await sim(['--devices', '-3'])
    expect(r.code).toBe(2)
    expect(r.stderr).toMatch(/^firmware-sim: --devices: expected a device count, an integer 1–100000, got "-3"/)
    expect(r.stdout).toBe('')
    const u = await sim(['--qos-mix', '0:1,5:1'])
    expect(u.code).toBe(2)
    expect(u.stderr).toMatch(/--qos-mix/)
  })

  it('runs a small fleet, prints one JSON object and exits 0', async () => {
    const r = await sim(['--devices', '10', '--broker', broker.mqttUrl, '--messages', '100', '--rate', '20', '--ramp', '100', '--json', '--progress-every', '0.5', '--grace', '10'])
    expect(r.stderr).toMatch(/connected \d+\/10/)
    expect(r.code).toBe(0)
    const s = JSON.parse(r.stdout) as Summary
    expect(s.ok).toBe(true)
    expect(s.totals.produced).toBe(100)
    expect(s.totals.acked).toBe(100)
    expect(s.totals.received).toBe(100)
    expect(s.totals.lost).toBe(0)
  })

  it('prints the summary table', async () => {
    const r = await sim(['--devices', '5', '--broker', broker.wsUrl, '--protocol', '4', '--duration', '1', '--rate', '5', '--quiet'])
    expect(r.code).toBe(0)
    expect(r.stderr).toBe('')
    expect(r.stdout).toMatch(/LOST \(acknowledged, never received\)\s+0/)
    expect(r.stdout).toMatch(/result\s+OK/)
  })
})

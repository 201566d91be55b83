/**
 * `npm run sim:e2e` at a small size, as CI runs it: simulated devices → FerryMQ → bridge →
 * Mosquitto → verifier, with the uplink cut (reset, then a black hole) and FerryMQ killed with
 * SIGKILL twice and restarted, all while the devices publish. Zero acknowledged messages lost.
 */
import { spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { describe, expect, it } from 'vitest'
import { hasMosquitto } from '../../firmware-sim/src/e2e/index.js'
import { withTimeout } from '../helpers/clients.js'

const ROOT = fileURLToPath(new URL('../../', import.meta.url))

describe.skipIf(!hasMosquitto())('npm run sim:e2e (needs the mosquitto binary)', () => {
  it('40 devices for 12 s through two partitions and two kill -9: the verifier at the cloud reports no loss', async () => {
    const child = spawn(process.execPath, ['--import', 'tsx', 'firmware-sim/src/e2e/cli.ts', '--devices', '40', '--duration', '12', '--rate', '4', '--json', '--quiet'],
      { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] })
    let out = ''
    let err = ''
    child.stdout.setEncoding('utf8').on('data', (d: string) => { out += d })
    child.stderr.setEncoding('utf8').on('data', (d: string) => { err += d })
    const code = await withTimeout(new Promise<number | null>((resolve) => child.once('exit', (c) => resolve(c))), 90_000, () => `sim:e2e; stderr: ${err}`)
    expect(code, err).toBe(0)
    const summary = JSON.parse(out) as { ok: boolean, totals: { acked: number, lost: number, received: number }, scenario: Array<{ do: string }> }
    expect(summary.ok).toBe(true)
    expect(summary.totals.lost).toBe(0)
    expect(summary.totals.acked).toBeGreaterThan(500)
    expect(summary.scenario.filter((s) => s.do === 'crash')).toHaveLength(2)
  }, 120_000)
})

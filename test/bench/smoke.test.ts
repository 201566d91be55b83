import { expect, it } from 'vitest'
import { markdown, svg } from '../../bench/report.js'
import { runBench } from '../../bench/run.js'

// Proves the bench machinery works end to end (broker process, publisher worker, subscriber,
// report). No thresholds: performance is judged from bench/results, not by CI.
it('the bench runs fan-in QoS 0 against a FerryMQ process for about a second and reports it', async () => {
  const lines: string[] = []
  const result = await runBench({
    scenarios: ['fanin-q0'], brokers: ['ferrymq'], reps: 1, quick: true, durationMs: 1000, ceiling: false,
    progress: (line) => lines.push(line),
  })
  const [throughput] = result.results
  expect(result.results).toHaveLength(1)
  expect(throughput).toMatchObject({ scenario: 'fanin-q0', metric: 'throughput', broker: 'ferrymq', unit: 'msg/s', errors: [] })
  expect(throughput?.median).toBeGreaterThan(0)
  expect(throughput?.cpuSeconds[0]).toBeGreaterThan(0)
  expect(lines).toHaveLength(1)
  expect(result.machine.cores).toBeGreaterThan(0)
  expect(markdown(result)).toMatch(/\| fanin-q0 \| throughput \(msg\/s ↑\) \| [\d,]+ \|/)
  expect(svg(result)).toMatch(/^<svg [^>]+>[\s\S]*<\/svg>\n$/)
}, 60_000)

import { format, type BenchResult, type MetricResult } from './run.js'

/** FerryMQ against this broker in the main table's ratio column. */
const BASELINE = 'mosquitto'
const SUBJECT = 'ferrymq'

/**
 * Every FerryMQ peer in the run against every Mosquitto peer (ferrymq-fsync / mosquitto-persist, …),
 * in the order the brokers appear.
 */
export function pairs (result: BenchResult): { subject: string, baseline: string }[] {
  const brokers = [...new Set(result.results.map((r) => r.broker))]
  return brokers.filter((b) => b.startsWith('ferrymq')).flatMap((subject) =>
    brokers.filter((b) => b.startsWith('mosquitto')).map((baseline) => ({ subject, baseline })))
}

/** A ratio as `0.35×`, with two significant digits below 0.1 (`0.0041×`, not `0.00×`). */
function times (q: number): string {
  return `${q >= 0.095 ? q.toFixed(2) : q.toPrecision(2)}×`
}

function cell (r: MetricResult | undefined): string {
  if (r === undefined) return '—'
  if (r.runs.length === 0) return `failed: ${r.errors[0] ?? ''}`
  return r.runs.length > 1 ? `${format(r.median)} (${format(r.min)}–${format(r.max)})` : format(r.median)
}

/** FerryMQ's median over Mosquitto's, for one metric; undefined when either is missing. */
export function ratio (results: MetricResult[], scenario: string, metric: string, subject = SUBJECT, baseline = BASELINE): number | undefined {
  const find = (broker: string): MetricResult | undefined => results.find((r) => r.scenario === scenario && r.metric === metric && r.broker === broker)
  const s = find(subject)
  const b = find(baseline)
  if (s === undefined || b === undefined || !(b.median > 0) || !Number.isFinite(s.median)) return undefined
  return s.median / b.median
}

function rows (result: BenchResult): { scenario: string, metric: string, unit: string, higherIsBetter: boolean }[] {
  const seen = new Map<string, { scenario: string, metric: string, unit: string, higherIsBetter: boolean }>()
  for (const r of result.results) {
    const key = `${r.scenario}\u0000${r.metric}`
    if (!seen.has(key)) seen.set(key, { scenario: r.scenario, metric: r.metric, unit: r.unit, higherIsBetter: r.higherIsBetter })
  }
  return [...seen.values()]
}

/** The clients' protocol as the report names it: `MQTT 3.1.1 clients` or `MQTT 5 clients`. */
export function protocolLabel (result: BenchResult): string {
  return (result.options.protocol ?? 4) === 5 ? 'MQTT 5 clients' : 'MQTT 3.1.1 clients'
}

export function machineLine (result: BenchResult): string {
  const m = result.machine
  return `${m.cpu}, ${m.cores} cores, ${m.memoryGiB} GiB, ${m.os}, Node ${m.node}, Mosquitto ${m.mosquitto}, FerryMQ ${m.ferrymq}, ${protocolLabel(result)}`
}

/** The results as a markdown table: median (min–max) per broker, the ratio and CPU seconds. */
export function markdown (result: BenchResult): string {
  const brokers = [...new Set(result.results.map((r) => r.broker))]
  const head = ['scenario', 'metric', ...brokers, `${SUBJECT} / ${BASELINE}`, `CPU s (${brokers.join(' / ')})`]
  const lines = [
    `FerryMQ vs Mosquitto — ${result.mode} run with ${protocolLabel(result)}, ${result.date.slice(0, 10)}, median of ${result.options.reps} (min–max); ` +
      `ratio > 1 is FerryMQ ahead for ↑ metrics, behind for ↓ ones.`,
    '',
    `Machine: ${machineLine(result)}.${result.load === undefined ? '' : ` Load average (1 min) ${result.load.start.toFixed(1)} at the start, ${result.load.end.toFixed(1)} at the end.`}`,
    '',
    `| ${head.join(' | ')} |`,
    `|${head.map(() => '---').join('|')}|`,
  ]
  for (const row of rows(result)) {
    if (row.metric === '(failed)') continue
    const find = (broker: string): MetricResult | undefined => result.results.find((r) => r.scenario === row.scenario && r.metric === row.metric && r.broker === broker)
    const q = ratio(result.results, row.scenario, row.metric)
    const cpu = brokers.map((b) => {
      const r = find(b)
      return r === undefined || r.cpuSeconds.length === 0 ? '—' : format(r.cpuSeconds.reduce((a, c) => a + c, 0) / r.cpuSeconds.length)
    }).join(' / ')
    lines.push(`| ${row.scenario} | ${row.metric} (${row.unit} ${row.higherIsBetter ? '↑' : '↓'}) | ${brokers.map((b) => cell(find(b))).join(' | ')} | ${q === undefined ? '—' : times(q)} | ${cpu} |`)
  }
  const all = pairs(result)
  if (all.some((p) => p.subject !== SUBJECT || p.baseline !== BASELINE)) {
    const ratioHead = ['scenario', 'metric', ...all.map((p) => `${p.subject} / ${p.baseline}`)]
    lines.push('', 'Every FerryMQ mode against every Mosquitto configuration (medians; — where a broker did not run the scenario):', '',
      `| ${ratioHead.join(' | ')} |`, `|${ratioHead.map(() => '---').join('|')}|`)
    for (const row of rows(result)) {
      if (row.metric === '(failed)') continue
      const cells = all.map((p) => {
        const q = ratio(result.results, row.scenario, row.metric, p.subject, p.baseline)
        return q === undefined ? '—' : times(q)
      })
      if (cells.every((c) => c === '—')) continue
      lines.push(`| ${row.scenario} | ${row.metric} (${row.unit} ${row.higherIsBetter ? '↑' : '↓'}) | ${cells.join(' | ')} |`)
    }
  }
  const failures = result.results.filter((r) => r.errors.length > 0)
  if (failures.length > 0) {
    lines.push('', 'Failed runs:')
    for (const f of failures) lines.push(`- ${f.scenario} on ${f.broker}: ${f.errors.join('; ')}`)
  }
  if (brokers.includes('sink')) {
    lines.push('', 'The `sink` column is the load generator against a process that only parses and discards: its ceiling.')
  }
  lines.push('', ...result.scenarios.map((s) => `- **${s.name}**: ${s.description}`))
  return lines.join('\n') + '\n'
}

function escape (s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;')
}

/**
 * A bar per metric: how FerryMQ compares with Mosquitto, as a factor where > 1 is better
 * (throughput ratio, or the inverse ratio for latency, memory and time), on a log scale.
 */
export function svg (result: BenchResult): string {
  const all = pairs(result)
  const many = all.length > 1
  const bars = rows(result).flatMap((row) => all.flatMap(({ subject, baseline }) => {
    const q = ratio(result.results, row.scenario, row.metric, subject, baseline)
    if (q === undefined || q <= 0) return []
    return [{ label: `${row.scenario} · ${row.metric}${many ? ` · ${subject} / ${baseline}` : ''}`, factor: row.higherIsBetter ? q : 1 / q, raw: q }]
  }))
  const width = many ? 1020 : 860
  const left = many ? 460 : 300
  const barHeight = 22
  const top = 70
  const height = top + bars.length * barHeight + 50
  const span = 3 // log2 units each side of 1×: 1/8× … 8×
  const x = (factor: number): number => left + ((Math.max(-span, Math.min(span, Math.log2(factor))) + span) / (2 * span)) * (width - left - 40)
  const one = x(1)
  const parts = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="12">`,
    `<rect width="100%" height="100%" fill="white"/>`,
    `<text x="${width / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">FerryMQ vs Mosquitto (${result.mode} run, ${escape(result.date.slice(0, 10))})</text>`,
    `<text x="${width / 2}" y="40" text-anchor="middle" fill="#555">${escape(machineLine(result))}</text>`,
    `<text x="${width / 2}" y="56" text-anchor="middle" fill="#555">right of the line: FerryMQ better by that factor; left: worse (log scale)</text>`,
  ]
  for (const tick of [1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8]) {
    const tx = x(tick)
    parts.push(`<line x1="${tx}" y1="${top - 4}" x2="${tx}" y2="${height - 40}" stroke="${tick === 1 ? '#000' : '#ddd'}"/>`)
    parts.push(`<text x="${tx}" y="${height - 24}" text-anchor="middle" fill="#555">${tick < 1 ? `1/${1 / tick}` : tick}×</text>`)
  }
  bars.forEach((bar, i) => {
    const y = top + i * barHeight
    const bx = x(bar.factor)
    const [x1, x2] = bx < one ? [bx, one] : [one, bx]
    parts.push(`<text x="${left - 8}" y="${y + 15}" text-anchor="end">${escape(bar.label)}</text>`)
    parts.push(`<rect x="${x1}" y="${y + 4}" width="${Math.max(1, x2 - x1)}" height="${barHeight - 8}" fill="${bar.factor >= 1 ? '#2e7d32' : '#e65100'}"/>`)
    parts.push(`<text x="${bx < one ? x1 - 4 : x2 + 4}" y="${y + 15}" text-anchor="${bx < one ? 'end' : 'start'}">${times(bar.factor)}</text>`)
  })
  parts.push('</svg>')
  return parts.join('\n') + '\n'
}

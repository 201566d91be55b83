import { readFileSync } from 'node:fs'

/**
 * Summarises a V8 .cpuprofile (from `npm run bench -- --profile DIR`): self time by function and
 * by package, the view that says where a scenario's time goes.
 *
 *   node --import tsx bench/profile-summary.ts DIR/CPU.….cpuprofile [top]
 */
interface ProfileNode { id: number, callFrame: { functionName: string, url: string, lineNumber: number }, hitCount?: number }
interface Profile { nodes: ProfileNode[], samples: number[], timeDeltas: number[] }

function owner (url: string): string {
  if (url === '') return '(native / V8)'
  const nm = /node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(url)
  if (nm !== null) return nm[1] as string
  if (url.startsWith('node:')) return url
  const src = /\/(src|dist)\/(.*)$/.exec(url)
  return src !== null ? `ferrymq ${src[2]}` : url
}

export function summarise (profile: Profile, top = 25): string {
  const byId = new Map(profile.nodes.map((n) => [n.id, n]))
  const selfMs = new Map<number, number>()
  profile.samples.forEach((id, i) => selfMs.set(id, (selfMs.get(id) ?? 0) + (profile.timeDeltas[i] ?? 0) / 1000))
  const total = [...selfMs.values()].reduce((a, b) => a + b, 0)
  const fns = new Map<string, number>()
  const pkgs = new Map<string, number>()
  for (const [id, ms] of selfMs) {
    const frame = (byId.get(id) as ProfileNode).callFrame
    const name = `${frame.functionName === '' ? '(anonymous)' : frame.functionName}  ${owner(frame.url)}:${frame.lineNumber + 1}`
    fns.set(name, (fns.get(name) ?? 0) + ms)
    pkgs.set(owner(frame.url), (pkgs.get(owner(frame.url)) ?? 0) + ms)
  }
  const table = (m: Map<string, number>): string[] => [...m].sort((a, b) => b[1] - a[1]).slice(0, top)
    .map(([k, ms]) => `${(100 * ms / total).toFixed(1).padStart(5)} %  ${k}`)
  return [`total ${Math.round(total)} ms sampled`, '', 'self time by package:', ...table(pkgs), '', 'self time by function:', ...table(fns)].join('\n')
}

if (process.argv[1] !== undefined && import.meta.url.endsWith(process.argv[1].split('/').pop() as string)) {
  const file = process.argv[2]
  if (file === undefined) {
    process.stderr.write('usage: node --import tsx bench/profile-summary.ts FILE.cpuprofile [top]\n')
    process.exit(2)
  }
  process.stdout.write(summarise(JSON.parse(readFileSync(file, 'utf8')) as Profile, Number(process.argv[3] ?? 25)) + '\n')
}

/**
 * One sample from a broker's /metrics (Prometheus text), e.g. `ferrymq_store_available` or
 * `ferrymq_store_damaged_total{action="repaired"}`; undefined when the sample is absent.
 */
export async function scrapeMetric (httpUrl: string, sample: string): Promise<number | undefined> {
  const text = await (await fetch(`${httpUrl}/metrics`, { signal: AbortSignal.timeout(5000) })).text()
  const line = text.split('\n').find((l) => l.startsWith(`${sample} `))
  return line === undefined ? undefined : Number(line.slice(sample.length + 1))
}

import { spawn, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { existsSync } from 'node:fs'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { startBroker, type TestBroker } from '../helpers/broker.js'
import { collect, connect, endAllClients, withTimeout } from '../helpers/clients.js'

/**
 * Interoperability with Eclipse Mosquitto's command-line clients (Debian package
 * mosquitto-clients): the real mosquitto_pub and mosquitto_sub binaries against FerryMQ.
 */

const MOSQUITTO_SUB = '/usr/bin/mosquitto_sub'
const MOSQUITTO_PUB = '/usr/bin/mosquitto_pub'
const STDBUF = '/usr/bin/stdbuf'
// The only reason to skip: the binaries are not installed (CI installs mosquitto-clients).
const missing = [MOSQUITTO_SUB, MOSQUITTO_PUB].filter((bin) => !existsSync(bin))
const skipReason = missing.length === 0 ? '' : ` (SKIPPED: ${missing.join(' and ')} not installed; apt-get install mosquitto-clients)`

interface Seen { topic: string, payload: string, qos: number, retain: boolean }
interface Exit { code: number | string, stdout: string, stderr: string }

const children = new Set<ChildProcess>()

function run (bin: string, args: string[], stdin?: string): { proc: ChildProcess, exited: (timeoutMs?: number) => Promise<Exit> } {
  const proc = spawn(bin, args, { stdio: [stdin === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'] })
  children.add(proc)
  let stdout = ''
  let stderr = ''
  proc.stdout?.setEncoding('utf8').on('data', (d: string) => { stdout += d })
  proc.stderr?.setEncoding('utf8').on('data', (d: string) => { stderr += d })
  if (stdin !== undefined) proc.stdin?.end(stdin)
  // 'close' comes after the process exited and its output was read to the end.
  const closed = once(proc, 'close').then(([code, signal]: unknown[]) => {
    children.delete(proc)
    return { code: (code ?? signal) as number | string, stdout, stderr }
  })
  return { proc, exited: (timeoutMs = 10_000) => withTimeout(closed, timeoutMs, () => `${[bin, ...args].join(' ')} to exit; stdout: ${stdout}; stderr: ${stderr}`) }
}

/** Runs mosquitto_pub to completion against the broker's TCP port. */
async function mosquittoPub (port: number, args: string[], stdin?: string): Promise<Exit> {
  return run(MOSQUITTO_PUB, ['-h', '127.0.0.1', '-p', String(port), ...args], stdin).exited()
}

interface MosquittoSub {
  /** Resolves once mosquitto_sub got its SUBACK (from its -d debug output). */
  subscribed: Promise<void>
  /** Resolves when it exited (after -C N messages) with what it printed, parsed. */
  done: (timeoutMs?: number) => Promise<Exit & { messages: Seen[] }>
}

/**
 * Starts `mosquitto_sub -t '#' -v -C count` (plus `-d`, whose debug lines carry each PUBLISH's
 * QoS and retain flag and announce the SUBACK, and `-W` as a backstop against hanging).
 */
function mosquittoSub (port: number, count: number, args: string[] = []): MosquittoSub {
  const full = ['-h', '127.0.0.1', '-p', String(port), '-t', '#', '-v', '-d', '-q', '2', '-C', String(count), '-W', '20', ...args]
  // On a pipe, mosquitto_sub's stdout is block-buffered: stdbuf (coreutils) makes the SUBACK line
  // arrive when it is printed (stdbuf execs mosquitto_sub, so the process is mosquitto_sub itself).
  const { proc, exited } = run(STDBUF, ['-oL', MOSQUITTO_SUB, ...full])
  let out = ''
  const subscribed = withTimeout(new Promise<void>((resolve, reject) => {
    proc.stdout?.on('data', (d: string) => {
      out += d
      if (out.includes(' received SUBACK')) resolve()
    })
    proc.once('exit', (code) => reject(new Error(`mosquitto_sub exited (${code}) before its SUBACK: ${out}`)))
  }), 5000, () => `mosquitto_sub's SUBACK; output so far: ${out}`)
  subscribed.catch(() => {})
  return {
    subscribed,
    done: async (timeoutMs) => {
      const exit = await exited(timeoutMs)
      return { ...exit, messages: parseSubOutput(exit.stdout) }
    },
  }
}

/** Pairs each `-v` message line ("topic payload") with the flags of the PUBLISH debug line for its topic. */
function parseSubOutput (stdout: string): Seen[] {
  const pending: { topic: string, qos: number, retain: boolean }[] = []
  const seen: Seen[] = []
  for (const line of stdout.split('\n')) {
    const publish = /^Client \S+ received PUBLISH \(d\d, q(\d), r(\d), m\d+, '(.*)', \.\.\. \(\d+ bytes\)\)$/.exec(line)
    if (publish !== null) {
      pending.push({ qos: Number(publish[1]), retain: publish[2] === '1', topic: publish[3] as string })
      continue
    }
    if (line === '' || line.startsWith('Client ') || line.startsWith('Subscribed (mid')) continue
    const space = line.indexOf(' ')
    const topic = space === -1 ? line : line.slice(0, space)
    const i = pending.findIndex((p) => p.topic === topic)
    if (i === -1) throw new Error(`mosquitto_sub printed "${line}" without a PUBLISH before it:\n${stdout}`)
    const flags = pending.splice(i, 1)[0] as { qos: number, retain: boolean }
    seen.push({ topic, payload: space === -1 ? '' : line.slice(space + 1), qos: flags.qos, retain: flags.retain })
  }
  return seen
}

describe.skipIf(missing.length > 0)(`mosquitto_pub and mosquitto_sub against FerryMQ${skipReason}`, () => {
  let b: TestBroker
  let port: number
  beforeEach(async () => {
    // A broker per test: retained messages from one test must not reach another's '#'.
    b = await startBroker()
    port = b.port('mqtt')
  })
  afterEach(async () => {
    for (const proc of children) proc.kill('SIGKILL')
    children.clear()
    await endAllClients()
    await b.close()
  })

  it.each([0, 1, 2])('mosquitto_sub sees a QoS %i message from mosquitto_pub at that QoS', async (qos) => {
    const sub = mosquittoSub(port, 1)
    await sub.subscribed
    const pub = await mosquittoPub(port, ['-t', `interop/q${qos}`, '-m', `hello at qos ${qos}`, '-q', String(qos)])
    expect(pub).toMatchObject({ code: 0, stderr: '' })
    const got = await sub.done()
    expect(got.code).toBe(0)
    expect(got.messages).toEqual([{ topic: `interop/q${qos}`, payload: `hello at qos ${qos}`, qos, retain: false }])
  })

  it('a retained message (-r) reaches a live subscriber without the retain flag, a later one with it, and -r -n clears it', async () => {
    const live = mosquittoSub(port, 1)
    await live.subscribed
    expect(await mosquittoPub(port, ['-t', 'interop/state', '-m', 'on', '-q', '1', '-r'])).toMatchObject({ code: 0 })
    expect((await live.done()).messages).toEqual([{ topic: 'interop/state', payload: 'on', qos: 1, retain: false }])

    const later = mosquittoSub(port, 1)
    expect((await later.done()).messages).toEqual([{ topic: 'interop/state', payload: 'on', qos: 1, retain: true }])

    expect(await mosquittoPub(port, ['-t', 'interop/state', '-n', '-q', '1', '-r'])).toMatchObject({ code: 0 })
    const afterClear = mosquittoSub(port, 1)
    await afterClear.subscribed
    expect(await mosquittoPub(port, ['-t', 'interop/marker', '-m', 'live', '-q', '1'])).toMatchObject({ code: 0 })
    // The first (and only) message is the live marker: the retained one is gone.
    expect((await afterClear.done()).messages).toEqual([{ topic: 'interop/marker', payload: 'live', qos: 1, retain: false }])
  })

  it('mosquitto_sub sees what an MQTT.js WebSocket client publishes at QoS 0, 1 and 2, retained too', async () => {
    const sub = mosquittoSub(port, 4)
    await sub.subscribed
    const ws = await connect(b.wsUrl)
    await ws.publishAsync('from-ws/q0', 'zero', { qos: 0 })
    await ws.publishAsync('from-ws/q1', 'one', { qos: 1 })
    await ws.publishAsync('from-ws/q2', 'two', { qos: 2 })
    await ws.publishAsync('from-ws/kept', 'kept', { qos: 1, retain: true })
    const got = await sub.done()
    expect(got.code).toBe(0)
    expect([...got.messages].sort((x, y) => x.topic.localeCompare(y.topic))).toEqual([
      { topic: 'from-ws/kept', payload: 'kept', qos: 1, retain: false },
      { topic: 'from-ws/q0', payload: 'zero', qos: 0, retain: false },
      { topic: 'from-ws/q1', payload: 'one', qos: 1, retain: false },
      { topic: 'from-ws/q2', payload: 'two', qos: 2, retain: false },
    ])
    const later = mosquittoSub(port, 1)
    expect((await later.done()).messages).toEqual([{ topic: 'from-ws/kept', payload: 'kept', qos: 1, retain: true }])
  })

  it('an MQTT.js WebSocket subscriber sees what mosquitto_pub publishes', async () => {
    const ws = await connect(b.wsUrl)
    await ws.subscribeAsync('to-ws/#', { qos: 2 })
    const got = collect(ws, 2)
    expect(await mosquittoPub(port, ['-t', 'to-ws/a', '-m', 'first', '-q', '2'])).toMatchObject({ code: 0 })
    expect(await mosquittoPub(port, ['-t', 'to-ws/b', '-m', 'second', '-q', '1'])).toMatchObject({ code: 0 })
    expect(await got).toEqual([
      { topic: 'to-ws/a', payload: 'first', qos: 2, retain: false, dup: false },
      { topic: 'to-ws/b', payload: 'second', qos: 1, retain: false, dup: false },
    ])
  })

  it('mosquitto_pub -l sends each line read from stdin as one message, in order', async () => {
    const lines = ['line one', 'line two with  spaces', 'ünïcødé ✓', '{"json": true}', 'last']
    const sub = mosquittoSub(port, lines.length)
    await sub.subscribed
    const pub = await mosquittoPub(port, ['-t', 'interop/lines', '-l', '-q', '1'], lines.join('\n') + '\n')
    expect(pub).toMatchObject({ code: 0, stderr: '' })
    const got = await sub.done()
    expect(got.messages).toEqual(lines.map((payload) => ({ topic: 'interop/lines', payload, qos: 1, retain: false })))
  })

  it.each(['mqttv31', 'mqttv311'])('mosquitto_sub and mosquitto_pub with -V %s', async (version) => {
    const sub = mosquittoSub(port, 2, ['-V', version])
    await sub.subscribed
    expect(await mosquittoPub(port, ['-V', version, '-t', `interop/${version}/a`, '-m', 'qos1', '-q', '1'])).toMatchObject({ code: 0, stderr: '' })
    expect(await mosquittoPub(port, ['-V', version, '-t', `interop/${version}/b`, '-m', 'qos2', '-q', '2'])).toMatchObject({ code: 0, stderr: '' })
    const got = await sub.done()
    expect(got.code).toBe(0)
    expect(got.messages).toEqual([
      { topic: `interop/${version}/a`, payload: 'qos1', qos: 1, retain: false },
      { topic: `interop/${version}/b`, payload: 'qos2', qos: 2, retain: false },
    ])
  })

  it('-V mqttv31 really speaks MQTT 3.1: a 24-character client id is refused (identifier rejected), as 3.1 allows 23; 3.1.1 accepts it', async () => {
    const id = 'abcdefghijklmnopqrstuvwx'
    const old = await run(MOSQUITTO_SUB, ['-h', '127.0.0.1', '-p', String(port), '-V', 'mqttv31', '-i', id, '-t', 'x', '-E']).exited()
    expect(old.code).not.toBe(0)
    expect(old.stderr).toContain('identifier rejected')
    const current = await run(MOSQUITTO_SUB, ['-h', '127.0.0.1', '-p', String(port), '-V', 'mqttv311', '-i', id, '-t', 'x', '-E']).exited()
    expect(current).toMatchObject({ code: 0, stderr: '' })
  })

  it('a persistent mosquitto_sub session (-c -i) gets the QoS 1 messages published while it was away', async () => {
    const args = ['-h', '127.0.0.1', '-p', String(port), '-c', '-i', 'mosq-persistent', '-q', '1', '-t', 'away/#']
    // -E: exit once the subscription is acknowledged, leaving the session behind.
    expect(await run(MOSQUITTO_SUB, [...args, '-E']).exited()).toMatchObject({ code: 0, stderr: '' })
    expect(await mosquittoPub(port, ['-t', 'away/1', '-m', 'queued', '-q', '1'])).toMatchObject({ code: 0 })
    const back = await run(MOSQUITTO_SUB, [...args, '-v', '-C', '1', '-W', '20']).exited()
    expect(back).toMatchObject({ code: 0, stdout: 'away/1 queued\n' })
  })

  it('MQTT 5 (-V 5): a message from mosquitto_pub with a user property (-D publish user-property) reaches mosquitto_sub with it (-F %P)', async () => {
    // -F replaces -v's "topic payload" line: the same, then the user properties ("key:value").
    const sub = mosquittoSub(port, 1, ['-V', '5', '-F', '%t %p [%P]'])
    await sub.subscribed
    const pub = await mosquittoPub(port, ['-V', '5', '-t', 'interop/v5', '-m', 'with a property', '-q', '1', '-D', 'publish', 'user-property', 'k', 'v'])
    expect(pub).toMatchObject({ code: 0, stderr: '' })
    const got = await sub.done()
    expect(got.code).toBe(0)
    expect(got.messages).toEqual([{ topic: 'interop/v5', payload: 'with a property [k:v]', qos: 1, retain: false }])
  })
})

import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Cloud, hasMosquitto, type CloudOptions } from './cloud.js'
import { EdgeProcess, ensureBuilt, REPO_ROOT } from './edge.js'
import { UplinkProxy, type CutMode } from './uplink-proxy.js'
import { freePort, logLine, pollUntil, PollAbort } from './util.js'
import type { BridgeStatus } from '../../../src/bridge/bridge.js'

/*
 * The end-to-end topology of issue 7 (point 6): devices → FerryMQ (a child process, fsync store)
 * → its store-and-forward bridge → a TCP proxy that can cut the uplink → Mosquitto as the cloud.
 * Everything runs on 127.0.0.1 with free ports; everything it starts it stops by PID.
 *
 *   const topo = await startTopology({ qos: 1 })
 *   // devices connect to topo.edgeUrl and publish on devices/...; the verifier subscribes to
 *   // `${topo.remotePrefix}devices/#` at topo.cloudUrl
 *   await topo.cutUplink('reset'); await topo.restoreUplink()
 *   await topo.crashEdge(); await topo.restartEdge()
 *   await topo.waitForOutboxEmpty(30_000)
 *   await topo.stop()
 */

export { hasMosquitto, findMosquitto } from './cloud.js'
export type { CutMode } from './uplink-proxy.js'

export interface TopologyOptions {
  /** The bridge's name (admin API, metrics labels). Default "cloud". */
  bridgeName?: string
  /** Local topics the bridge forwards upstream. Default "devices/#". */
  pattern?: string
  /** Prepended upstream: `devices/x` arrives at the cloud as `<remotePrefix>devices/x`. Default "site1/". */
  remotePrefix?: string
  /** The mapping's QoS (a message goes up at the lower of its own and this). Default 1. */
  qos?: 1 | 2
  /** The bridge link's protocol: 4 (MQTT 3.1.1) or 5. Default 4. */
  protocolVersion?: 4 | 5
  /** The bridge's upstream client id (its persistent session at Mosquitto). Default "ferrymq-e2e-edge". */
  bridgeClientId?: string
  /** Bridge keepalive; a black-holed link is noticed after about 1.5× this. Default 2. */
  keepaliveSeconds?: number
  /** Bridge reconnect timing. Default { minDelayMs: 50, maxDelayMs: 500, connectTimeoutMs: 2000, stableMs: 1000 }. */
  reconnect?: { minDelayMs?: number, maxDelayMs?: number, connectTimeoutMs?: number, stableMs?: number }
  /** Bridge window (messages in flight upstream). FerryMQ's default when unset (1000). */
  maxInflight?: number
  /** QoS 2 messages in flight upstream; keep it ≤ the cloud's max_inflight_messages. Default 20. */
  maxInflightQos2?: number
  /** Mosquitto settings. Default: no persistence, max_inflight_messages 100, no queue limit. */
  cloud?: CloudOptions
  /**
   * Top-level keys merged over the generated FerryMQ config (e.g. `{ limits: {...}, sys: {...} }`).
   * `listeners`, `storage` and `bridges` are generated; a `bridges` entry here replaces them all.
   */
  edgeConfig?: Record<string, unknown>
  /** FerryMQ's log level. Default "info". */
  logLevel?: 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent'
  /** 'auto' (default): `npm run build` when dist/cli.js is missing or older than src/; 'always'; 'never'. */
  build?: 'auto' | 'always' | 'never'
  /** The FerryMQ checkout whose dist/cli.js runs. Default: this repository. */
  repoRoot?: string
  /** How long to wait for FerryMQ's "FerryMQ is ready" on each start. Default 15 000 ms. */
  readyTimeoutMs?: number
  /** How long to wait for the bridge to connect at start (and at restartEdge). Default 15 000 ms. */
  bridgeTimeoutMs?: number
  /** Keep the temp dir (configs, FerryMQ's data and per-run logs) after stop(). Default false. */
  keepTempDir?: boolean
  /** No step lines on stderr. Default false. */
  quiet?: boolean
}

/** One bridge's entry of GET /api/v1/bridges (see README "Bridges"): FerryMQ's own type. */
export type { BridgeStatus }

export interface Topology {
  /** mqtt://127.0.0.1:PORT — FerryMQ's MQTT listener, for devices; the same port after restartEdge(). */
  readonly edgeUrl: string
  /** mqtt://127.0.0.1:PORT — Mosquitto, directly (not through the cut-able proxy), for the verifier. */
  readonly cloudUrl: string
  /** http://127.0.0.1:PORT — FerryMQ's HTTP listener (/metrics, /api/v1/bridges, /readyz). */
  readonly httpUrl: string
  readonly bridgeName: string
  /** The local pattern the bridge forwards, e.g. "devices/#". */
  readonly pattern: string
  /** The upstream prefix, e.g. "site1/": subscribe to `${remotePrefix}devices/#` at cloudUrl. */
  readonly remotePrefix: string
  readonly qos: 1 | 2
  /** The temp dir: mosquitto.conf, ferrymq.json, edge-data/, edge-N.log (one per FerryMQ run). */
  readonly dir: string
  /** PIDs of the processes running now. */
  pids (): { edge?: number, cloud?: number }
  readonly edgeRunning: boolean
  /** The current cut, or null while the uplink forwards. */
  readonly uplinkCut: CutMode | null
  /** Cuts the link between the bridge and the cloud (default 'reset'). */
  cutUplink (mode?: CutMode): Promise<void>
  /** Forwards again; with `waitForBridge` (and the edge running) resolves once the bridge is connected. */
  restoreUplink (options?: { waitForBridge?: boolean, timeoutMs?: number }): Promise<void>
  /** SIGKILL FerryMQ and wait for its exit. */
  crashEdge (): Promise<void>
  /**
   * Starts FerryMQ again: same config, ports and data dir. Resolves once it is ready and, unless
   * `waitForBridge: false` (the default when the uplink is cut), its bridge is connected.
   */
  restartEdge (options?: { waitForBridge?: boolean }): Promise<void>
  /** The bridge's entry of GET /api/v1/bridges (rejects while the edge is down). */
  bridgeStatus (): Promise<BridgeStatus>
  /** Resolves once the bridge reports connected. */
  waitForBridgeConnected (timeoutMs?: number): Promise<BridgeStatus>
  /**
   * Resolves once the bridge's outbox is empty (every message acknowledged by the cloud) and the
   * bridge is connected; rejects after `timeoutMs` with the last status. Needs the edge running.
   */
  waitForOutboxEmpty (timeoutMs?: number): Promise<BridgeStatus>
  /** Tails of the logs (FerryMQ: JSON lines of every run; Mosquitto: its stderr). */
  edgeLog (): string
  cloudLog (): string
  /** Stops FerryMQ, the proxy and Mosquitto (by PID), removes the temp dir (unless keepTempDir). Idempotent. */
  stop (): Promise<void>
}

function bridgeConfig (options: TopologyOptions, proxyPort: number): Record<string, unknown> {
  return {
    name: options.bridgeName ?? 'cloud',
    url: `mqtt://127.0.0.1:${proxyPort}`,
    clientId: options.bridgeClientId ?? 'ferrymq-e2e-edge',
    protocolVersion: options.protocolVersion ?? 4,
    clean: false,
    keepaliveSeconds: options.keepaliveSeconds ?? 2,
    reconnect: { minDelayMs: 50, maxDelayMs: 500, connectTimeoutMs: 2000, stableMs: 1000, ...options.reconnect },
    ...(options.maxInflight !== undefined ? { maxInflight: options.maxInflight } : {}),
    maxInflightQos2: options.maxInflightQos2 ?? 20,
    topics: [{ pattern: options.pattern ?? 'devices/#', direction: 'out', qos: options.qos ?? 1, localPrefix: '', remotePrefix: options.remotePrefix ?? 'site1/' }],
  }
}

/** Starts Mosquitto, the uplink proxy and FerryMQ (building it first if dist is stale); resolves once the bridge is connected. */
export async function startTopology (options: TopologyOptions = {}): Promise<Topology> {
  const quiet = options.quiet === true
  const log = (line: string): void => logLine(line, quiet)
  if (!hasMosquitto()) throw new Error('mosquitto binary not found (install the Debian package `mosquitto`, or set MOSQUITTO_BIN)')
  const repoRoot = options.repoRoot ?? REPO_ROOT
  ensureBuilt(options.build ?? 'auto', repoRoot, log)

  const dir = mkdtempSync(join(tmpdir(), 'ferrymq-e2e-'))
  const bridgeName = options.bridgeName ?? 'cloud'
  const readyTimeoutMs = options.readyTimeoutMs ?? 15_000
  const bridgeTimeoutMs = options.bridgeTimeoutMs ?? 15_000
  let cloud: Cloud | undefined
  let proxy: UplinkProxy | undefined
  let edge: EdgeProcess | undefined
  const onExit = (): void => {
    edge?.killSync()
    cloud?.killSync()
  }
  process.on('exit', onExit)

  let stopped = false
  const stop = async (): Promise<void> => {
    if (stopped) return
    stopped = true
    try {
      if (edge !== undefined) {
        await edge.stop()
        await edge.flushLog()
      }
      await proxy?.close()
      await cloud?.stop()
    } finally {
      process.off('exit', onExit)
      if (options.keepTempDir === true) log(`kept ${dir}`)
      else rmSync(dir, { recursive: true, force: true })
    }
  }

  try {
    cloud = await Cloud.start(dir, options.cloud)
    log(`cloud: mosquitto pid ${String(cloud.pid)} on ${cloud.url}`)
    const upstream = proxy = await UplinkProxy.start({ port: cloud.port })
    log(`uplink proxy on 127.0.0.1:${upstream.port} → ${cloud.port}`)

    const configPath = join(dir, 'ferrymq.json')
    const dataDir = join(dir, 'edge-data')
    mkdirSync(dataDir)
    let mqttPort = 0
    let httpPort = 0
    const writeConfig = (): void => {
      const config: Record<string, unknown> = {
        listeners: {
          mqtt: { port: mqttPort, host: '127.0.0.1' },
          ws: { port: 0 },
          http: { port: httpPort, host: '127.0.0.1' },
        },
        storage: { dir: dataDir, durability: 'fsync' },
        log: { level: options.logLevel ?? 'info' },
        bridges: [bridgeConfig(options, upstream.port)],
        ...options.edgeConfig,
      }
      writeFileSync(configPath, JSON.stringify(config, null, 2) + '\n')
    }
    const started = edge = new EdgeProcess(join(repoRoot, 'dist', 'cli.js'), configPath, dir)
    // First start: fresh ports; another process may take one between the probe and FerryMQ's bind.
    for (let attempt = 1; ; attempt++) {
      mqttPort = await freePort()
      do httpPort = await freePort(); while (httpPort === mqttPort)
      writeConfig()
      try {
        await started.start(readyTimeoutMs)
        break
      } catch (err) {
        if (attempt >= 5 || !/EADDRINUSE|address already in use/i.test((err as Error).message)) throw err
      }
    }
    log(`edge: FerryMQ pid ${String(started.pid)} on mqtt://127.0.0.1:${mqttPort}, http ${httpPort}, data ${dataDir}`)

    const httpUrl = `http://127.0.0.1:${httpPort}`
    const bridgeStatus = async (): Promise<BridgeStatus> => {
      const res = await fetch(`${httpUrl}/api/v1/bridges`, { signal: AbortSignal.timeout(3000) })
      if (!res.ok) throw new Error(`GET /api/v1/bridges: HTTP ${res.status}`)
      const list = await res.json() as BridgeStatus[]
      const entry = list.find((b) => b.name === bridgeName)
      if (entry === undefined) throw new Error(`GET /api/v1/bridges has no bridge "${bridgeName}"`)
      return entry
    }
    /** The edge's status for a wait; a FerryMQ that exited ends the wait at once (it will not come back by itself). */
    const liveStatus = async (what: string): Promise<BridgeStatus> => {
      if (!started.running) throw new PollAbort(`${what}: FerryMQ is not running (it exited; see edgeLog())\n${started.log.text.slice(-2000)}`)
      return await bridgeStatus()
    }
    let last: BridgeStatus | undefined
    const describeLast = (): string => last === undefined ? 'no status read' : `last status ${JSON.stringify(last)}`
    const waitForBridgeConnected = async (timeoutMs = bridgeTimeoutMs): Promise<BridgeStatus> => {
      return await pollUntil(async () => {
        last = await liveStatus('waitForBridgeConnected')
        return last.connected ? last : undefined
      }, timeoutMs, () => `bridge "${bridgeName}" connected; ${describeLast()}`)
    }
    await waitForBridgeConnected()
    log(`bridge "${bridgeName}" connected`)

    const topology: Topology = {
      edgeUrl: `mqtt://127.0.0.1:${mqttPort}`,
      cloudUrl: cloud.url,
      httpUrl,
      bridgeName,
      pattern: options.pattern ?? 'devices/#',
      remotePrefix: options.remotePrefix ?? 'site1/',
      qos: options.qos ?? 1,
      dir,
      pids: () => ({ edge: started.pid, cloud: cloud?.pid }),
      get edgeRunning () { return started.running },
      get uplinkCut () { return upstream.cutMode },
      cutUplink: async (mode = 'reset') => {
        upstream.cut(mode)
        log(`uplink cut (${mode})`)
      },
      restoreUplink: async (opts = {}) => {
        upstream.restore()
        log('uplink restored')
        if (opts.waitForBridge === true && started.running) {
          await waitForBridgeConnected(opts.timeoutMs)
          log(`bridge "${bridgeName}" connected`)
        }
      },
      crashEdge: async () => {
        const pid = started.pid
        if (pid === undefined) throw new Error('crashEdge: FerryMQ is not running')
        const how = await started.kill()
        log(`edge: FerryMQ pid ${pid} killed (SIGKILL), exit ${String(how)}`)
      },
      restartEdge: async (opts = {}) => {
        if (stopped) throw new Error('restartEdge: the topology was stopped')
        await started.start(readyTimeoutMs)
        log(`edge: FerryMQ restarted, pid ${String(started.pid)} (run ${started.runs})`)
        if (opts.waitForBridge ?? upstream.cutMode === null) {
          await waitForBridgeConnected()
          log(`bridge "${bridgeName}" connected`)
        }
      },
      bridgeStatus,
      waitForBridgeConnected,
      waitForOutboxEmpty: async (timeoutMs = 30_000) => {
        const status = await pollUntil(async () => {
          last = await liveStatus('waitForOutboxEmpty')
          return last.connected && last.outbox.messages === 0 && last.inflight === 0 ? last : undefined
        }, timeoutMs, () => `bridge "${bridgeName}" outbox empty; ${describeLast()}${upstream.cutMode !== null ? ' (the uplink is cut)' : ''}`, 100)
        log(`bridge "${bridgeName}" outbox empty (forwarded out ${status.forwarded.out})`)
        return status
      },
      edgeLog: () => started.log.text,
      cloudLog: () => cloud?.log.text ?? '',
      stop,
    }
    return topology
  } catch (err) {
    await stop().catch(() => {})
    const logs = `\n--- FerryMQ (tail) ---\n${edge?.log.text.slice(-3000) ?? ''}\n--- mosquitto (tail) ---\n${cloud?.log.text.slice(-2000) ?? ''}`
    throw new Error(`startTopology failed: ${(err as Error).message}${logs}`, { cause: err })
  }
}

import { z } from 'zod'

/** The shape of a FerryMQ configuration, its defaults and its limits. See README "Configuration". */

const port = (fallback: number) =>
  z.number({ error: 'expected an integer 0–65535' })
    .int({ error: 'expected an integer 0–65535' })
    .min(0, { error: 'expected an integer 0–65535' })
    .max(65535, { error: 'expected an integer 0–65535' })
    .default(fallback)

const host = (fallback: string) => z.string({ error: 'expected a host name or IP address' })
  .min(1, { error: 'expected a host name or IP address' })
  .default(fallback)

const wsPath = z.string({ error: 'expected a URL path starting with "/"' })
  .regex(/^\/[^\s?#]*$/, { error: 'expected a URL path starting with "/"' })
  .default('/mqtt')

const positiveInt = (what: string, min: number, max: number, fallback: number) =>
  z.number({ error: `expected ${what}, an integer ${min}–${max}` })
    .int({ error: `expected ${what}, an integer ${min}–${max}` })
    .min(min, { error: `expected ${what}, an integer ${min}–${max}` })
    .max(max, { error: `expected ${what}, an integer ${min}–${max}` })
    .default(fallback)

const filePath = z.string({ error: 'expected a file path' }).min(1, { error: 'expected a file path' })

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const
export const DURABILITIES = ['fsync', 'os', 'memory'] as const
export const QUEUE_FULL_POLICIES = ['drop-new', 'drop-oldest'] as const

const listenersSchema = z.strictObject({
  mqtt: z.strictObject({ port: port(1883), host: host('0.0.0.0') }).prefault({}),
  ws: z.strictObject({ port: port(8083), host: host('0.0.0.0'), path: wsPath }).prefault({}),
  mqtts: z.strictObject({ port: port(8883), host: host('0.0.0.0') }).prefault({}),
  wss: z.strictObject({ port: port(8084), host: host('0.0.0.0'), path: wsPath }).prefault({}),
  http: z.strictObject({ port: port(18083), host: host('127.0.0.1') }).prefault({}),
})

const tlsSchema = z.strictObject({
  cert: filePath,
  key: filePath,
  ca: filePath.optional(),
  requireClientCert: z.boolean({ error: 'expected true or false' }).default(false),
}).refine((tls) => !tls.requireClientCert || tls.ca !== undefined, {
  error: 'requireClientCert needs tls.ca, the CA that signs client certificates',
  path: ['requireClientCert'],
})

const storageSchema = z.strictObject({
  dir: z.string({ error: 'expected a directory path' }).min(1, { error: 'expected a directory path' }).default('./data'),
  durability: z.enum(DURABILITIES, { error: `expected one of ${DURABILITIES.join(', ')}` }).default('fsync'),
})

const limitsSchema = z.strictObject({
  /** Largest MQTT control packet accepted, in bytes, fixed header included (MQTT's own maximum is 268,435,460). */
  maxPacketSize: positiveInt('a size in bytes', 64, 268_435_460, 1_048_576),
  /** Per-session queue length; enforced by the persistence (LevelDB issue). */
  maxQueuedMessages: positiveInt('a message count', 1, 100_000_000, 100_000),
  /**
   * Per-session queue size in bytes: the stored size of each queued message (topic, payload,
   * properties and a few bytes of framing), so large messages cannot fill the disk under the
   * message count. Default 128 MiB: at least 128 messages of the default maxPacketSize.
   */
  maxQueuedBytes: positiveInt('a size in bytes', 65_536, 1_099_511_627_776, 134_217_728),
  /**
   * What a message for a full queue does: `drop-new` (Mosquitto's behaviour) does not queue it;
   * `drop-oldest` deletes the oldest queued messages not yet sent to make room. Either way the
   * drop is counted in ferrymq_messages_dropped_total{reason="queue_full"} and logged.
   */
  queueFullPolicy: z.enum(QUEUE_FULL_POLICIES, { error: `expected one of ${QUEUE_FULL_POLICIES.join(', ')}` }).default('drop-new'),
  /**
   * PUBLISH packets per second one client may send, with a burst of one second's worth; past it
   * the broker acknowledges and reads that client's messages more slowly (TCP backpressure does
   * the rest), nothing is dropped. 0: no limit.
   */
  maxPublishRate: positiveInt('messages per second', 0, 10_000_000, 0),
  /** A socket that has not sent CONNECT by then is closed. */
  connectTimeoutMs: positiveInt('milliseconds', 100, 3_600_000, 10_000),
  /** A subscriber whose socket has not drained for this long is disconnected, so it cannot hold up others. */
  drainTimeoutMs: positiveInt('milliseconds', 100, 3_600_000, 10_000),
  /**
   * Bytes the broker may hold unsent for one client (a subscriber that reads slower than it is
   * sent to). Past it, QoS 0 messages to that client are dropped and counted, and a QoS 1/2
   * delivery closes the connection: a persistent session keeps the message queued for its return.
   */
  maxClientBufferBytes: positiveInt('a size in bytes', 65_536, 4_294_967_295, 8_388_608),
  /**
   * A persistent (CleanSession = 0) session whose client has been away this long ends: its
   * subscriptions and queued messages are removed. 0 keeps sessions forever. (Durability fsync/os.)
   */
  sessionExpirySeconds: positiveInt('seconds', 0, 315_360_000, 604_800),
  /** Concurrent connections over all listeners; further sockets are closed at once. */
  maxConnections: positiveInt('a connection count', 1, 1_000_000, 10_000),
  /** Longest client identifier accepted from MQTT 3.1.1 clients (MQTT 3.1 keeps its own 23). */
  maxClientIdLength: positiveInt('a length in characters', 23, 65_535, 256),
  /** Topic levels in a topic name or filter; aedes' matcher caps this at 100. */
  maxTopicLevels: positiveInt('a level count', 1, 100, 100),
  /** Longest topic name or filter, in UTF-8 bytes (MQTT's own maximum is 65,535). */
  maxTopicLength: positiveInt('a length in bytes', 1, 65_535, 65_535),
  /**
   * Inbound QoS 2 messages a client may have awaiting PUBREL; past it the connection is closed
   * (MQTT 5: DISCONNECT 0x93). Advertised to MQTT 5 clients as the broker's Receive Maximum.
   */
  maxInflightInbound: positiveInt('a message count', 1, 65_535, 1000),
  /** MQTT 5 topic aliases a client may use toward the broker (Topic Alias Maximum in CONNACK); 0 turns them off. */
  maxTopicAlias: positiveInt('an alias count', 0, 65_535, 10),
  /**
   * Longest keepalive a client may ask for, in seconds; 0 sets none. An MQTT 5 client that asks
   * for more (or for 0) is told this value (Server Keep Alive); an MQTT 3.1/3.1.1 client that asks
   * for more is refused, as Mosquitto's max_keepalive does.
   */
  maxKeepaliveSeconds: positiveInt('seconds', 0, 65_535, 0),
})

const logSchema = z.strictObject({
  level: z.enum(LOG_LEVELS, { error: `expected one of ${LOG_LEVELS.join(', ')}` }).default('info'),
})

const sysSchema = z.strictObject({
  /** Seconds between $SYS/broker/... statistics messages; 0 turns them off. */
  intervalSeconds: positiveInt('seconds', 0, 86_400, 10),
  /** Seconds between aedes' $SYS/<id>/heartbeat messages. */
  heartbeatSeconds: positiveInt('seconds', 1, 86_400, 60),
})

export const BRIDGE_SCHEMES = ['mqtt:', 'mqtts:', 'ws:', 'wss:'] as const
export const OUTBOX_POLICIES = ['drop-oldest', 'reject'] as const
export const DIRECTIONS = ['out', 'in', 'both'] as const

const bridgeUrl = z.string({ error: 'expected a URL like mqtt://host:1883, mqtts://, ws:// or wss://' }).superRefine((value, ctx) => {
  let url: URL
  try {
    url = new URL(value)
  } catch {
    ctx.addIssue({ code: 'custom', message: `expected a URL like mqtt://host:1883, mqtts://, ws:// or wss:// (got "${value}")` })
    return
  }
  if (!(BRIDGE_SCHEMES as readonly string[]).includes(url.protocol)) {
    ctx.addIssue({ code: 'custom', message: `unsupported scheme "${url.protocol}" in "${value}": use mqtt://, mqtts://, ws:// or wss://` })
  } else if (url.hostname === '') {
    ctx.addIssue({ code: 'custom', message: `no host in "${value}"` })
  }
})

const mappingSchema = z.strictObject({
  /** Topic pattern (a filter) relative to the prefixes; "" makes the prefixes whole topics. */
  pattern: z.string({ error: 'expected a topic filter such as "telemetry/#"' }),
  direction: z.enum(DIRECTIONS, { error: `expected one of ${DIRECTIONS.join(', ')}` }).default('out'),
  qos: z.union([z.literal(0), z.literal(1), z.literal(2)], { error: 'expected 0, 1 or 2' }).default(1),
  localPrefix: z.string({ error: 'expected a topic prefix string' }).default(''),
  remotePrefix: z.string({ error: 'expected a topic prefix string' }).default(''),
})

const bridgeSchema = z.strictObject({
  /** Names the bridge in logs, metrics ({bridge="…"}), $SYS/ferrymq/bridges/<name>/… and the store. */
  name: z.string({ error: 'expected a name of letters, digits, "-", "_" or "." (1–64)' })
    .regex(/^[A-Za-z0-9_.-]{1,64}$/, { error: 'expected a name of letters, digits, "-", "_" or "." (1–64)' }),
  url: bridgeUrl.optional(),
  /** Tried in order; after a failed attempt the next one (failover), back to the first after the last. */
  urls: z.array(bridgeUrl, { error: 'expected a list of URLs' }).min(1, { error: 'expected at least one URL' }).optional(),
  /** Client identifier upstream; default `<hostname>.<name>`, as Mosquitto. Must be stable for a persistent session. */
  clientId: z.string({ error: 'expected a client identifier' }).min(1, { error: 'expected a client identifier' }).max(65535).optional(),
  protocolVersion: z.union([z.literal(4), z.literal(5)], { error: 'expected 4 (MQTT 3.1.1) or 5 (MQTT 5)' }).default(4),
  /** false: a persistent upstream session (needed for QoS 2 exactly-once across a restart). */
  clean: z.boolean({ error: 'expected true or false' }).default(false),
  username: z.string({ error: 'expected a string' }).optional(),
  password: z.string({ error: 'expected a string' }).optional(),
  keepaliveSeconds: positiveInt('seconds', 0, 65535, 60),
  /** MQTT 5 upstream with clean: false: how long the upstream keeps the session while the link is down. */
  sessionExpirySeconds: positiveInt('seconds', 0, 4_294_967_295, 604_800),
  tls: z.strictObject({
    /** CA that signs the upstream's certificate; default: Node's bundled public CAs. */
    ca: filePath.optional(),
    /** Client certificate and key (mutual TLS), both or neither. */
    cert: filePath.optional(),
    key: filePath.optional(),
    /** Checks the upstream's certificate and host name (default true; false only for tests). */
    verify: z.boolean({ error: 'expected true or false' }).default(true),
    /** Host name for SNI and the certificate check, when it differs from the URL's. */
    servername: z.string({ error: 'expected a host name' }).min(1).optional(),
  }).refine((tls) => (tls.cert === undefined) === (tls.key === undefined), {
    error: 'cert and key go together (the client certificate and its private key)',
  }).optional(),
  reconnect: z.strictObject({
    minDelayMs: positiveInt('milliseconds', 10, 3_600_000, 500),
    maxDelayMs: positiveInt('milliseconds', 10, 3_600_000, 30_000),
    /** A connection up this long resets the back-off to minDelayMs. */
    stableMs: positiveInt('milliseconds', 0, 3_600_000, 10_000),
    /** Time allowed for the TCP/TLS handshake and CONNACK. */
    connectTimeoutMs: positiveInt('milliseconds', 100, 600_000, 10_000),
  }).refine((r) => r.minDelayMs <= r.maxDelayMs, { error: 'minDelayMs must not exceed maxDelayMs', path: ['minDelayMs'] }).prefault({}),
  /**
   * Messages sent upstream and not yet acknowledged (PUBACK / PUBCOMP), at most. Large, so a drain
   * is bound by the link and not by round trips: at 100 ms of round trip, 1000 in flight allow
   * 10,000 msg/s. A crash re-sends at most this many QoS 1 messages.
   */
  maxInflight: positiveInt('a message count', 1, 65_535, 1000),
  /**
   * QoS 2 messages in flight at most (within maxInflight). An MQTT 3.1.1 upstream cannot say how
   * many it takes at once and refuses the excess (Mosquitto: max_inflight_messages, default 20);
   * an MQTT 5 upstream's Receive Maximum lowers both limits.
   */
  maxInflightQos2: positiveInt('a message count', 1, 65_535, 20),
  topics: z.array(mappingSchema, { error: 'expected a list of topic mappings' }).min(1, { error: 'expected at least one topic mapping' }),
  outbox: z.strictObject({
    maxMessages: positiveInt('a message count', 1, 1_000_000_000, 1_000_000),
    maxBytes: positiveInt('a size in bytes', 65_536, 1_099_511_627_776, 1_073_741_824),
    /** Messages older than this are dropped (counted as expired) instead of sent; 0: no limit. */
    maxAgeSeconds: positiveInt('seconds', 0, 315_360_000, 604_800),
    whenFull: z.enum(OUTBOX_POLICIES, { error: `expected one of ${OUTBOX_POLICIES.join(', ')}` }).default('drop-oldest'),
  }).prefault({}),
}).superRefine((b, ctx) => {
  if ((b.url === undefined) === (b.urls === undefined)) {
    ctx.addIssue({ code: 'custom', path: ['url'], message: 'set either url or urls (a list tried in order), not both and not neither' })
  }
  if (b.password !== undefined && b.username === undefined) {
    ctx.addIssue({ code: 'custom', path: ['password'], message: 'a password needs a username' })
  }
})

export const configSchema = z.strictObject({
  listeners: listenersSchema.prefault({}),
  tls: tlsSchema.optional(),
  storage: storageSchema.prefault({}),
  limits: limitsSchema.prefault({}),
  log: logSchema.prefault({}),
  sys: sysSchema.prefault({}),
  bridges: z.array(bridgeSchema, { error: 'expected a list of bridges' }).default([]).superRefine((bridges, ctx) => {
    const seen = new Map<string, number>()
    bridges.forEach((b, i) => {
      const first = seen.get(b.name)
      if (first !== undefined) ctx.addIssue({ code: 'custom', path: [i, 'name'], message: `duplicate bridge name "${b.name}" (also bridges[${first}])` })
      seen.set(b.name, i)
    })
  }),
})

export type Config = z.infer<typeof configSchema>
export type BridgeConfig = Config['bridges'][number]
export type ListenerName = keyof Config['listeners']

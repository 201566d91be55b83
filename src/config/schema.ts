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
  /** Inbound QoS 2 messages a client may have awaiting PUBREL. */
  maxInflightInbound: positiveInt('a message count', 1, 65_535, 1000),
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

export const configSchema = z.strictObject({
  listeners: listenersSchema.prefault({}),
  tls: tlsSchema.optional(),
  storage: storageSchema.prefault({}),
  limits: limitsSchema.prefault({}),
  log: logSchema.prefault({}),
  sys: sysSchema.prefault({}),
  // Any form of the section (a list, a mapping, an empty `bridges:`) gets this message; only [] passes.
  bridges: z.unknown().refine((value) => value === undefined || (Array.isArray(value) && value.length === 0), {
    error: 'store-and-forward bridges are not available in this release yet; remove the bridges section',
  }).optional(),
})

export type Config = z.infer<typeof configSchema>
export type ListenerName = keyof Config['listeners']

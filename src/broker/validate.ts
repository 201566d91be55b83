/**
 * Checks on names that arrive from the wire, in the spec's terms. Each returns null when the
 * input is acceptable, or a sentence that says what is wrong (logged, and sent as the reason).
 */

export interface NameLimits {
  maxTopicLevels: number
  maxTopicLength: number
}

/**
 * mqtt-packet decodes strings with Buffer#toString, which turns ill-formed UTF-8 into U+FFFD, so
 * U+FFFD is the only trace of a malformed string that reaches the broker [MQTT-1.5.3-1]. U+0000
 * is forbidden outright [MQTT-1.5.3-2].
 */
function utf8Problem (s: string): string | null {
  if (s.includes('\u0000')) return 'contains U+0000'
  if (s.includes('\ufffd')) return 'is not well-formed UTF-8'
  return null
}

function commonProblem (what: string, s: string, limits: NameLimits): string | null {
  if (s.length === 0) return `${what} is empty`
  const bad = utf8Problem(s)
  if (bad !== null) return `${what} ${bad}`
  const bytes = Buffer.byteLength(s, 'utf8')
  if (bytes > limits.maxTopicLength) return `${what} is ${bytes} bytes long, over limits.maxTopicLength (${limits.maxTopicLength})`
  let levels = 1
  for (let i = 0; i < s.length; i++) if (s.charCodeAt(i) === 47) levels++
  if (levels > limits.maxTopicLevels) return `${what} has ${levels} levels, over limits.maxTopicLevels (${limits.maxTopicLevels})`
  return null
}

/** A topic name in PUBLISH or a will: no wildcards [MQTT-3.3.2-2]. */
export function topicNameProblem (topic: string, limits: NameLimits): string | null {
  const problem = commonProblem('topic', topic, limits)
  if (problem !== null) return problem
  if (topic.includes('+') || topic.includes('#')) return 'topic contains a wildcard (+ or #), which PUBLISH does not allow'
  return null
}

/** A topic filter in SUBSCRIBE or UNSUBSCRIBE: `+` fills a whole level, `#` is a whole last level [MQTT-4.7.1-2/3]. */
export function topicFilterProblem (filter: string, limits: NameLimits): string | null {
  const problem = commonProblem('topic filter', filter, limits)
  if (problem !== null) return problem
  const levels = filter.split('/')
  for (let i = 0; i < levels.length; i++) {
    const level = levels[i] as string
    if (level.includes('#') && (level !== '#' || i !== levels.length - 1)) return 'topic filter has # other than as the whole last level'
    if (level.includes('+') && level !== '+') return 'topic filter has + other than as a whole level'
  }
  return null
}

/** A client identifier in CONNECT, for MQTT 3.1.1 [MQTT-3.1.3-4/5/8]. */
export function clientIdProblem (clientId: string, clean: boolean, maxLength: number): string | null {
  if (clientId.length === 0) {
    return clean ? null : 'an empty client identifier needs CleanSession = 1 [MQTT-3.1.3-8]'
  }
  const bad = utf8Problem(clientId)
  if (bad !== null) return `client identifier ${bad}`
  if (clientId.length > maxLength) return `client identifier is ${clientId.length} characters long, over limits.maxClientIdLength (${maxLength})`
  return null
}

/**
 * Whether `topic` matches `filter` [MQTT-4.7]: `+` one level, `#` this level and all below (also
 * the parent: `a/#` matches `a`), and wildcards at the first level never match `$` topics.
 */
export function topicMatches (filter: string, topic: string): boolean {
  if (topic.charCodeAt(0) === 36 && (filter.charCodeAt(0) === 43 || filter.charCodeAt(0) === 35)) return false
  const f = filter.split('/')
  const t = topic.split('/')
  for (let i = 0; i < f.length; i++) {
    const level = f[i]
    if (level === '#') return true
    if (i >= t.length) return false
    if (level !== '+' && level !== t[i]) return false
  }
  return f.length === t.length
}

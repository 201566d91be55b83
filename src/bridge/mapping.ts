import { topicFilterProblem, topicMatches } from '../broker/validate.js'

/*
 * Topic mappings of a bridge, with Mosquitto's `topic` semantics:
 *
 *   topic <pattern> <direction> <qos> <local prefix> <remote prefix>
 *
 * A message on local topic `localPrefix + t` goes upstream as `remotePrefix + t` (direction out or
 * both), and one on remote topic `remotePrefix + t` comes in as `localPrefix + t` (in or both),
 * where `t` matches `pattern`. The bridge subscribes locally to `localPrefix + pattern` and
 * upstream to `remotePrefix + pattern`. An empty pattern, as in Mosquitto, makes the two prefixes
 * whole topics mapped onto each other (`topic "" out 1 local/name remote/name`).
 */

export interface TopicMapping {
  pattern: string
  direction: 'out' | 'in' | 'both'
  qos: 0 | 1 | 2
  localPrefix: string
  remotePrefix: string
}

/** Generous limits for checking configured filters (the broker's own limits apply to traffic). */
const CONFIG_LIMITS = { maxTopicLevels: 100, maxTopicLength: 65535 }

/**
 * What is wrong with a mapping, or null. `where` names it in the message
 * (e.g. `bridges[0].topics[2]`), so a bad config points at the line to fix.
 */
export function mappingProblem (m: TopicMapping, where: string): string | null {
  if (m.pattern === '') {
    for (const side of ['localPrefix', 'remotePrefix'] as const) {
      if (m[side] === '') return `${where}: with an empty pattern, localPrefix and remotePrefix are whole topics and must both be set`
      if (m[side].includes('+') || m[side].includes('#')) return `${where}.${side}: with an empty pattern this is a whole topic and cannot contain + or # ("${m[side]}")`
    }
    return null
  }
  const pattern = topicFilterProblem(m.pattern, CONFIG_LIMITS)
  if (pattern !== null) return `${where}.pattern: ${pattern} ("${m.pattern}")`
  for (const side of ['localPrefix', 'remotePrefix'] as const) {
    const prefix = m[side]
    if (prefix.includes('+') || prefix.includes('#')) return `${where}.${side}: a prefix cannot contain + or # ("${prefix}")`
    if (prefix.includes('\u0000')) return `${where}.${side}: contains U+0000`
  }
  const local = topicFilterProblem(localFilter(m), CONFIG_LIMITS)
  if (local !== null) return `${where}: localPrefix + pattern is not a valid filter: ${local} ("${localFilter(m)}")`
  const remote = topicFilterProblem(remoteFilter(m), CONFIG_LIMITS)
  if (remote !== null) return `${where}: remotePrefix + pattern is not a valid filter: ${remote} ("${remoteFilter(m)}")`
  return null
}

/** The local filter an out-mapping listens on. */
export function localFilter (m: TopicMapping): string {
  return m.localPrefix + m.pattern
}

/** The upstream filter an in-mapping subscribes to. */
export function remoteFilter (m: TopicMapping): string {
  return m.remotePrefix + m.pattern
}

/** The remote topic for a local one, or null when this mapping does not send it upstream. */
export function toRemote (m: TopicMapping, localTopic: string): string | null {
  if (m.direction === 'in') return null
  return translate(localTopic, m.localPrefix, m.remotePrefix, m.pattern)
}

/** The local topic for a remote one, or null when this mapping does not bring it in. */
export function toLocal (m: TopicMapping, remoteTopic: string): string | null {
  if (m.direction === 'out') return null
  return translate(remoteTopic, m.remotePrefix, m.localPrefix, m.pattern)
}

function translate (topic: string, from: string, to: string, pattern: string): string | null {
  if (pattern === '') return topic === from ? to : null
  if (!topic.startsWith(from)) return null
  const rest = topic.slice(from.length)
  if (rest.length === 0 || !topicMatches(pattern, rest)) return null
  return to + rest
}

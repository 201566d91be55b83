import { describe, expect, it } from 'vitest'
import { clientIdProblem, topicFilterProblem, topicMatches, topicNameProblem } from '../../src/broker/validate.js'

const LIMITS = { maxTopicLevels: 100, maxTopicLength: 65_535 }

describe('topicNameProblem', () => {
  it.each([
    'a', 'a/b', 'a/b/c', '/', '/a', 'a/', 'a//b', ' ', 'a b/ c', 'ü/€/中文', '😀', '$SYS/x', '$share/g/t', 'a\u0001b',
  ])('accepts %j', (topic) => {
    expect(topicNameProblem(topic, LIMITS)).toBeNull()
  })

  it('refuses an empty topic', () => {
    expect(topicNameProblem('', LIMITS)).toBe('topic is empty')
  })

  it.each(['+', '#', 'a/+', 'a/#', '+/b', 'a/+/b', 'a+b', 'a#', 'sport/tennis#'])('refuses the wildcard topic %j', (topic) => {
    expect(topicNameProblem(topic, LIMITS)).toBe('topic contains a wildcard (+ or #), which PUBLISH does not allow')
  })

  it('refuses U+0000 and the U+FFFD that ill-formed UTF-8 decodes to', () => {
    expect(topicNameProblem('a\u0000b', LIMITS)).toBe('topic contains U+0000')
    expect(topicNameProblem(Buffer.from([0x61, 0xc3, 0x28]).toString('utf8'), LIMITS)).toBe('topic is not well-formed UTF-8')
  })

  it('measures the length in UTF-8 bytes, up to limits.maxTopicLength inclusive', () => {
    const limits = { ...LIMITS, maxTopicLength: 10 }
    expect(topicNameProblem('a'.repeat(10), limits)).toBeNull()
    expect(topicNameProblem('a'.repeat(11), limits)).toBe('topic is 11 bytes long, over limits.maxTopicLength (10)')
    expect(topicNameProblem('ü'.repeat(5), limits)).toBeNull() // 10 bytes
    expect(topicNameProblem('ü'.repeat(6), limits)).toBe('topic is 12 bytes long, over limits.maxTopicLength (10)')
    expect(topicNameProblem('a'.repeat(65_535), LIMITS)).toBeNull()
    expect(topicNameProblem('a'.repeat(65_536), LIMITS)).toMatch(/65536 bytes long/)
  })

  it('counts levels, empty ones included, up to limits.maxTopicLevels inclusive', () => {
    const limits = { ...LIMITS, maxTopicLevels: 3 }
    expect(topicNameProblem('a/b/c', limits)).toBeNull()
    expect(topicNameProblem('a/b/c/d', limits)).toBe('topic has 4 levels, over limits.maxTopicLevels (3)')
    expect(topicNameProblem('//', limits)).toBeNull()
    expect(topicNameProblem('///', limits)).toBe('topic has 4 levels, over limits.maxTopicLevels (3)')
    expect(topicNameProblem(Array(100).fill('x').join('/'), LIMITS)).toBeNull()
    expect(topicNameProblem(Array(101).fill('x').join('/'), LIMITS)).toMatch(/101 levels/)
  })
})

describe('topicFilterProblem', () => {
  it.each([
    '#', '+', 'a', 'a/b', 'a/#', 'a/+', '+/b', 'a/+/b', '+/+', '+/#', '/#', '/+', '+/', '/', 'a//b', 'a/+/#', '$SYS/#', '$SYS/+/clients', '+/+/+',
  ])('accepts %j', (filter) => {
    expect(topicFilterProblem(filter, LIMITS)).toBeNull()
  })

  it.each(['a#', '#a', 'a/#/b', '#/a', '#/#', 'a/b#', 'sport/tennis#', '##'])('refuses %j: # must be the whole last level', (filter) => {
    expect(topicFilterProblem(filter, LIMITS)).toBe('topic filter has # other than as the whole last level')
  })

  it.each(['a+', '+a', 'a+/b', 'a/+b/c', 'a/b+', '++', 'sport+'])('refuses %j: + must be a whole level', (filter) => {
    expect(topicFilterProblem(filter, LIMITS)).toBe('topic filter has + other than as a whole level')
  })

  it('refuses an empty filter, U+0000, ill-formed UTF-8 and filters over the limits', () => {
    expect(topicFilterProblem('', LIMITS)).toBe('topic filter is empty')
    expect(topicFilterProblem('a/\u0000', LIMITS)).toBe('topic filter contains U+0000')
    expect(topicFilterProblem('a/\ufffd/#', LIMITS)).toBe('topic filter is not well-formed UTF-8')
    expect(topicFilterProblem('a/b/#', { ...LIMITS, maxTopicLevels: 2 })).toBe('topic filter has 3 levels, over limits.maxTopicLevels (2)')
    expect(topicFilterProblem('abcd/#', { ...LIMITS, maxTopicLength: 5 })).toBe('topic filter is 6 bytes long, over limits.maxTopicLength (5)')
  })
})

describe('clientIdProblem', () => {
  it('an empty client id needs CleanSession = 1 [MQTT-3.1.3-8]', () => {
    expect(clientIdProblem('', true, 256)).toBeNull()
    expect(clientIdProblem('', false, 256)).toBe('an empty client identifier needs CleanSession = 1 [MQTT-3.1.3-8]')
  })

  it('accepts any well-formed id up to the maximum length, whatever the session flag', () => {
    for (const clean of [true, false]) {
      expect(clientIdProblem('sensor-42', clean, 256)).toBeNull()
      expect(clientIdProblem('ü-/#+$ with spaces', clean, 256)).toBeNull()
      expect(clientIdProblem('x'.repeat(23), clean, 23)).toBeNull()
    }
  })

  it('refuses an id over limits.maxClientIdLength', () => {
    expect(clientIdProblem('x'.repeat(24), true, 23)).toBe('client identifier is 24 characters long, over limits.maxClientIdLength (23)')
    expect(clientIdProblem('x'.repeat(257), false, 256)).toBe('client identifier is 257 characters long, over limits.maxClientIdLength (256)')
  })

  it('refuses U+0000 and ill-formed UTF-8', () => {
    expect(clientIdProblem('a\u0000', true, 256)).toBe('client identifier contains U+0000')
    expect(clientIdProblem(Buffer.from([0x63, 0xff]).toString('utf8'), true, 256)).toBe('client identifier is not well-formed UTF-8')
  })
})

describe('topicMatches', () => {
  const cases: [filter: string, topic: string, matches: boolean][] = [
    // exact
    ['a/b', 'a/b', true],
    ['a/b', 'a/c', false],
    ['a/b', 'a/b/c', false],
    ['a/b/c', 'a/b', false],
    ['a', 'A', false],
    // + matches exactly one level, an empty one too
    ['a/+', 'a/b', true],
    ['a/+', 'a/b/c', false],
    ['a/+', 'a', false],
    ['a/+', 'a/', true],
    ['+', 'a', true],
    ['+', '/a', false],
    ['+/+', '/a', true],
    ['+/+', '/', true],
    ['/+', '/x', true],
    ['a/+/c', 'a/b/c', true],
    ['a/+/c', 'a//c', true],
    ['a/+/c', 'a/b/d', false],
    ['+/+/+', 'a/b', false],
    // # matches the level and everything below, and the parent
    ['#', 'a', true],
    ['#', 'a/b/c', true],
    ['#', '/', true],
    ['#', '/a', true],
    ['a/#', 'a', true],
    ['a/#', 'a/', true],
    ['a/#', 'a/b', true],
    ['a/#', 'a/b/c', true],
    ['a/#', 'b', false],
    ['a/#', 'ab', false],
    ['a/#', 'ab/c', false],
    ['a/b/#', 'a', false],
    ['a/+/#', 'a/b', true],
    ['a/+/#', 'a/b/c/d', true],
    ['a/+/#', 'a', false],
    ['+/#', 'a', true],
    ['/#', '/a', true],
    ['/#', 'a', false],
    // empty levels are levels
    ['a//b', 'a//b', true],
    ['a/b', 'a//b', false],
    ['a//b', 'a/b', false],
    ['/a', 'a', false],
    ['a/', 'a', false],
    ['a', 'a/', false],
    // $ topics: first-level wildcards never match them [MQTT-4.7.2-1]
    ['#', '$SYS', false],
    ['#', '$SYS/broker/uptime', false],
    ['+/broker/uptime', '$SYS/broker/uptime', false],
    ['+', '$x', false],
    ['+/#', '$SYS/x', false],
    ['$SYS/#', '$SYS/broker/uptime', true],
    ['$SYS/#', '$SYS', true],
    ['$SYS/+/uptime', '$SYS/broker/uptime', true],
    ['$SYS/broker/uptime', '$SYS/broker/uptime', true],
    ['a/#', 'a/$b', true], // $ only matters at the first level
    ['a/+', 'a/$b', true],
    ['#', 'a$', true],
  ]

  it.each(cases)('%j on %j → %s', (filter, topic, matches) => {
    expect(topicMatches(filter, topic)).toBe(matches)
  })
})

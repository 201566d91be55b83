import { describe, expect, it } from 'vitest'
import { localFilter, mappingProblem, remoteFilter, toLocal, toRemote, type TopicMapping } from '../../src/bridge/mapping.js'

const m = (over: Partial<TopicMapping>): TopicMapping => ({ pattern: '#', direction: 'both', qos: 1, localPrefix: '', remotePrefix: '', ...over })

describe('bridge topic mappings (Mosquitto `topic` semantics)', () => {
  it('translates with prefixes both ways, as Mosquitto does', () => {
    const tele = m({ pattern: 'telemetry/#', direction: 'out', remotePrefix: 'site-a/' })
    expect(localFilter(tele)).toBe('telemetry/#')
    expect(toRemote(tele, 'telemetry/dev1/temp')).toBe('site-a/telemetry/dev1/temp')
    expect(toRemote(tele, 'other/x')).toBeNull()
    expect(toLocal(tele, 'site-a/telemetry/x')).toBeNull() // out only

    const cmd = m({ pattern: 'cmd/+', direction: 'in', localPrefix: 'edge/', remotePrefix: 'site-a/' })
    expect(remoteFilter(cmd)).toBe('site-a/cmd/+')
    expect(toLocal(cmd, 'site-a/cmd/reboot')).toBe('edge/cmd/reboot')
    expect(toLocal(cmd, 'site-a/cmd/reboot/now')).toBeNull() // + is one level
    expect(toLocal(cmd, 'site-b/cmd/reboot')).toBeNull()
    expect(toRemote(cmd, 'edge/cmd/reboot')).toBeNull() // in only

    const both = m({ pattern: 'sync/#', localPrefix: 'l/', remotePrefix: 'r/' })
    expect(toRemote(both, 'l/sync/a')).toBe('r/sync/a')
    expect(toLocal(both, 'r/sync/a')).toBe('l/sync/a')
    // A round trip returns the topic it started from: what makes loop prevention by origin workable.
    expect(toLocal(both, toRemote(both, 'l/sync/a/b') as string)).toBe('l/sync/a/b')
  })

  it('an empty pattern maps the two prefixes onto each other as whole topics (Mosquitto)', () => {
    const exact = m({ pattern: '', direction: 'both', localPrefix: 'plant/state', remotePrefix: 'cloud/plant-7/state' })
    expect(mappingProblem(exact, 'b[0].t[0]')).toBeNull()
    expect(toRemote(exact, 'plant/state')).toBe('cloud/plant-7/state')
    expect(toRemote(exact, 'plant/state/x')).toBeNull()
    expect(toLocal(exact, 'cloud/plant-7/state')).toBe('plant/state')
    expect(mappingProblem(m({ pattern: '', localPrefix: 'a' }), 'b[0].t[1]')).toBe('b[0].t[1]: with an empty pattern, localPrefix and remotePrefix are whole topics and must both be set')
    expect(mappingProblem(m({ pattern: '', localPrefix: 'a/#', remotePrefix: 'b' }), 'b[0].t[1]')).toMatch(/^b\[0\]\.t\[1\]\.localPrefix: with an empty pattern/)
  })

  it('names the mapping and the field in every problem', () => {
    expect(mappingProblem(m({ pattern: 'a/#/b' }), 'bridges[0].topics[2]')).toBe('bridges[0].topics[2].pattern: topic filter has # other than as the whole last level ("a/#/b")')
    expect(mappingProblem(m({ localPrefix: 'a/+/' }), 'bridges[0].topics[0]')).toBe('bridges[0].topics[0].localPrefix: a prefix cannot contain + or # ("a/+/")')
    expect(mappingProblem(m({ remotePrefix: 'x#' }), 'bridges[0].topics[0]')).toBe('bridges[0].topics[0].remotePrefix: a prefix cannot contain + or # ("x#")')
    expect(mappingProblem(m({ pattern: 'a+' }), 'b[0].t[0]')).toMatch(/\+ other than as a whole level/)
    expect(mappingProblem(m({ pattern: 'telemetry/#', remotePrefix: 'site-a/' }), 'b[0].t[0]')).toBeNull()
  })
})

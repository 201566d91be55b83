import { describe, expect, it } from 'vitest'
import { key, prefixRange, readU64, splitFirst, str, u16, u64, upperBound } from '../../src/store/keys.js'

describe('keys', () => {
  it('terminates strings so one client id never covers another', () => {
    const range = prefixRange(str('abc'))
    const inRange = (k: Buffer) => Buffer.compare(k, range.gte) >= 0 && (range.lt === undefined || Buffer.compare(k, range.lt) < 0)
    expect(inRange(key(str('abc'), u64(1)))).toBe(true)
    expect(inRange(key(str('abc'), u16(0xffff)))).toBe(true)
    expect(inRange(key(str('abcd'), u64(1)))).toBe(false)
    expect(inRange(key(str('ab'), u64(1)))).toBe(false)
  })

  it('orders sequences numerically and reads them back', () => {
    const seqs = [0, 1, 255, 256, 65536, 2 ** 40, Number.MAX_SAFE_INTEGER]
    const keys = seqs.map(n => key(str('c'), u64(n)))
    expect([...keys].sort(Buffer.compare)).toEqual(keys)
    expect(keys.map(k => readU64(k))).toEqual(seqs)
    expect(() => u64(-1)).toThrow(RangeError)
    expect(() => u16(65536)).toThrow(RangeError)
  })

  it('computes upper bounds past trailing 0xFF bytes', () => {
    expect(upperBound(Buffer.from([1, 2, 0xff]))).toEqual(Buffer.from([1, 3]))
    expect(upperBound(Buffer.from([0xff]))).toBeUndefined()
    expect(prefixRange(Buffer.alloc(0))).toEqual({ gte: Buffer.alloc(0) })
  })

  it('splits the first string component off', () => {
    const [client, rest] = splitFirst(key(str('clïent'), Buffer.from('a/b')))
    expect(client).toBe('clïent')
    expect(rest.toString()).toBe('a/b')
  })
})

import { createRequire } from 'node:module'
import { afterAll, describe } from 'vitest'
import { openStore } from '../../src/store/open.js'
import { LevelPersistence } from '../../src/store/persistence.js'
import { nodeTestShim } from './node-test-shim.js'
import { removeTempDirs, tempDir } from './helpers.js'

// aedes-persistence's conformance suite (v11, node:test style, CommonJS, no typings).
const require = createRequire(import.meta.url)
const abstractPersistence = require('aedes-persistence/abstract.js') as (opts: {
  test: typeof nodeTestShim
  persistence: () => Promise<LevelPersistence>
  testAsync: boolean
}) => void

afterAll(removeTempDirs)

describe('aedes-persistence@11 abstract suite on LevelPersistence (fsync)', () => {
  abstractPersistence({
    test: nodeTestShim,
    persistence: async () => new LevelPersistence(await openStore(tempDir(), 'fsync')),
    testAsync: true
  })
})

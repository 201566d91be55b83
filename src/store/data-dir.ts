import { accessSync, constants, mkdirSync } from 'node:fs'
import { resolve } from 'node:path'
import { ConfigError } from '../config/load.js'
import type { Config } from '../config/schema.js'

/**
 * Makes sure `storage.dir` exists and is writable before anything listens, so a bad path fails at
 * start-up with exit code 2 rather than at the first write. Returns the absolute path, or null
 * for `durability: memory`, which keeps nothing on disk.
 */
export function prepareDataDir (storage: Config['storage']): string | null {
  if (storage.durability === 'memory') return null
  const dir = resolve(storage.dir)
  try {
    mkdirSync(dir, { recursive: true })
    accessSync(dir, constants.W_OK | constants.R_OK)
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? String(err)
    throw new ConfigError(`storage.dir: cannot use ${dir} as the data directory (${code}); choose a writable directory or --durability memory`)
  }
  return dir
}

import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

/** Temporary directories made by a test file; `removeTempDirs()` (in afterAll) deletes them. */
const dirs: string[] = []

/** A fresh empty directory under the OS temp dir. */
export function tempDir (label = 'ferrymq-store-'): string {
  const dir = mkdtempSync(join(tmpdir(), label))
  dirs.push(dir)
  return dir
}

/** Deletes every directory made by tempDir() in this file. */
export function removeTempDirs (): void {
  for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true })
}

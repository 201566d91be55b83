import { defineConfig } from 'vitest/config'

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    pool: 'forks',
    testTimeout: 30_000,
    hookTimeout: 30_000,
    // Network tests bind ephemeral ports on loopback; two workers keep the 2-core machine busy
    // without starving the brokers the tests spawn.
    maxWorkers: 2,
    // The JSON report is what .ci/run turns into its closing "N passed, N failed" line.
    reporters: ['default', 'json'],
    outputFile: { json: '.vitest-results.json' },
  },
})

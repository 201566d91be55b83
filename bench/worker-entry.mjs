// Worker threads in Node 20 do not run their entry file through loaders given with --import, so
// this plain-JS entry registers tsx in the worker, then loads the TypeScript worker.
import { register } from 'tsx/esm/api'

register()
await import('./publisher-worker.ts')

import { pino, type Logger } from 'pino'
import type { Config } from '../config/schema.js'

export type { Logger }

/** Structured JSON logs on stdout; `silent` costs nothing per call. */
export function createLogger (level: Config['log']['level'], destination?: NodeJS.WritableStream): Logger {
  return pino({ name: 'ferrymq', level, base: { pid: process.pid } }, destination ?? pino.destination({ dest: 1, sync: false }))
}

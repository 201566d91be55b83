import { readFileSync } from 'node:fs'
import { createSecureContext, type TlsOptions } from 'node:tls'
import { ConfigError } from '../config/load.js'
import type { Config } from '../config/schema.js'

/** Reads the certificate, key and CA files named in `tls`; a missing or unreadable file is a config error. */
export function loadTlsMaterial (tls: NonNullable<Config['tls']>): TlsOptions {
  const read = (key: string, file: string): Buffer => {
    try {
      return readFileSync(file)
    } catch (err) {
      throw new ConfigError(`tls.${key}: cannot read ${file} (${(err as NodeJS.ErrnoException).code ?? String(err)})`)
    }
  }
  const options: TlsOptions = {
    cert: read('cert', tls.cert),
    key: read('key', tls.key),
    ...(tls.ca === undefined ? {} : { ca: read('ca', tls.ca) }),
    requestCert: tls.requireClientCert,
    rejectUnauthorized: tls.requireClientCert,
    minVersion: 'TLSv1.2',
  }
  try {
    createSecureContext(options)
  } catch (err) {
    throw new ConfigError(`tls: ${tls.cert} and ${tls.key} are not a usable certificate and key (${(err as Error).message})`)
  }
  return options
}

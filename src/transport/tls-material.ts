import { X509Certificate } from 'node:crypto'
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
    createSecureContext({ cert: options.cert, key: options.key })
  } catch (err) {
    throw new ConfigError(`tls.cert, tls.key: ${tls.cert} and ${tls.key} are not a usable certificate and key (${(err as Error).message})`)
  }
  // Node's TLS skips a CA file that holds no PEM certificate without a word: every client certificate would be refused.
  if (options.ca !== undefined) {
    const ca = options.ca as Buffer
    try {
      if (!ca.includes('-----BEGIN CERTIFICATE-----')) throw new Error('no "-----BEGIN CERTIFICATE-----" line')
      void new X509Certificate(ca)
      createSecureContext({ ca })
    } catch (err) {
      throw new ConfigError(`tls.ca: ${tls.ca} is not a usable PEM CA certificate (${(err as Error).message})`)
    }
  }
  return options
}

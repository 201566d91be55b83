import { execFileSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

const OPENSSL = process.env.OPENSSL ?? 'openssl'

/** A throwaway PKI on disk: paths of each PEM file, plus their contents for clients. */
export interface TestCerts {
  dir: string
  /** Self-signed CA that signs the server and client certificates. */
  caCert: string
  caKey: string
  /** Server certificate for IP:127.0.0.1 and DNS:localhost, signed by the CA. */
  serverCert: string
  serverKey: string
  /** Client certificate (clientAuth), signed by the CA. */
  clientCert: string
  clientKey: string
  /** A second, unrelated CA and a client certificate it signed (trusted by nobody). */
  otherCaCert: string
  otherClientCert: string
  otherClientKey: string
  read (path: string): Buffer
  /** Removes the directory (afterAll). */
  remove (): void
}

function openssl (cwd: string, args: string[]): void {
  execFileSync(OPENSSL, args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] })
}

/** A P-256 key and CSR for `subject`. */
function keyAndCsr (dir: string, name: string, subject: string): void {
  openssl(dir, ['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', subject])
}

function selfSignedCa (dir: string, name: string, subject: string): void {
  openssl(dir, ['req', '-x509', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', `${name}.key`, '-out', `${name}.crt`, '-days', '2', '-subj', subject,
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign'])
}

function sign (dir: string, name: string, ca: string, extensions: string): void {
  writeFileSync(join(dir, `${name}.ext`), extensions)
  openssl(dir, ['x509', '-req', '-in', `${name}.csr`, '-CA', `${ca}.crt`, '-CAkey', `${ca}.key`, '-set_serial',
    String(Date.now()), '-days', '2', '-sha256', '-extfile', `${name}.ext`, '-out', `${name}.crt`])
}

/** Generates a CA, a server and a client certificate (and a foreign CA and client) with openssl into a temp dir. */
export function generateCerts (): TestCerts {
  const dir = mkdtempSync(join(tmpdir(), 'ferrymq-certs-'))
  try {
    selfSignedCa(dir, 'ca', '/CN=FerryMQ Test CA')
    keyAndCsr(dir, 'server', '/CN=localhost')
    sign(dir, 'server', 'ca', 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n' +
      'extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n')
    keyAndCsr(dir, 'client', '/CN=ferrymq-test-client')
    sign(dir, 'client', 'ca', 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n')
    selfSignedCa(dir, 'other-ca', '/CN=Someone Else CA')
    keyAndCsr(dir, 'other-client', '/CN=ferrymq-foreign-client')
    sign(dir, 'other-client', 'other-ca', 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n')
  } catch (err) {
    rmSync(dir, { recursive: true, force: true })
    const stderr = (err as { stderr?: Buffer }).stderr?.toString() ?? ''
    throw new Error(`openssl failed: ${(err as Error).message}\n${stderr}`)
  }
  const at = (file: string): string => join(dir, file)
  return {
    dir,
    caCert: at('ca.crt'),
    caKey: at('ca.key'),
    serverCert: at('server.crt'),
    serverKey: at('server.key'),
    clientCert: at('client.crt'),
    clientKey: at('client.key'),
    otherCaCert: at('other-ca.crt'),
    otherClientCert: at('other-client.crt'),
    otherClientKey: at('other-client.key'),
    read: (path) => readFileSync(path),
    remove: () => rmSync(dir, { recursive: true, force: true }),
  }
}

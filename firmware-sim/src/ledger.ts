/**
 * What happened to every numbered message of every device: the devices write produced / sent /
 * acknowledged / dropped, the verifier writes received. One byte of state per message plus a
 * saturating receive count, so 10,000 devices × thousands of messages stay small.
 */

const QOS_MASK = 0b11
const SENT = 0b100
const ACKED = 0b1000
const DROPPED = 0b10000
const REJECTED = 0b100000

function grow (a: Uint8Array<ArrayBuffer>, need: number): Uint8Array<ArrayBuffer> {
  if (need < a.length) return a
  let n = a.length * 2
  while (n <= need) n *= 2
  const b = new Uint8Array(n)
  b.set(a)
  return b
}

export class DeviceLedger {
  produced = 0
  sent = 0
  acked = 0
  rejected = 0
  dropped = 0
  received = 0
  duplicates = 0
  duplicatesQos2 = 0
  outOfOrder = 0
  /** Acknowledged QoS 1/2 messages not received (yet). */
  awaiting = 0
  /** Highest sequence number received, per QoS: MQTT orders messages within one QoS level only. */
  private readonly highest = [0, 0, 0]
  /** Indexed by sequence number. */
  private state = new Uint8Array(64)
  private recv = new Uint8Array(64)

  constructor (readonly id: string) {}

  produce (seq: number, qos: 0 | 1 | 2): void {
    this.state = grow(this.state, seq)
    this.state[seq] = qos
    this.produced++
  }

  markSent (seq: number): void { this.state[seq] |= SENT; this.sent++ }
  markAcked (seq: number): void {
    const st = this.state[seq]
    if ((st & ACKED) !== 0) return
    this.state[seq] = st | ACKED
    this.acked++
    if ((st & QOS_MASK) !== 0 && (seq >= this.recv.length || this.recv[seq] === 0)) this.awaiting++
  }
  markRejected (seq: number): void { this.state[seq] |= REJECTED; this.rejected++ }
  markDropped (seq: number): void { this.state[seq] |= DROPPED; this.dropped++ }

  /** Returns false for a sequence number this device never produced (counted by the caller). */
  receive (seq: number): boolean {
    if (seq > this.produced) return false
    this.recv = grow(this.recv, seq)
    const n = this.recv[seq]
    if (n > 0) {
      this.duplicates++
      if ((this.state[seq] & QOS_MASK) === 2) this.duplicatesQos2++
    } else {
      this.received++
      const st = this.state[seq]
      const q = st & QOS_MASK
      if (seq < this.highest[q]) this.outOfOrder++
      else this.highest[q] = seq
      if ((st & ACKED) !== 0 && (st & QOS_MASK) !== 0) this.awaiting--
    }
    if (n < 255) this.recv[seq] = n + 1
    return true
  }

  qosOf (seq: number): number { return this.state[seq] & QOS_MASK }

  /** Acknowledged QoS 1/2 messages never received. */
  lost (): number[] {
    const out: number[] = []
    for (let s = 1; s <= this.produced; s++) {
      const st = this.state[s]
      if ((st & ACKED) !== 0 && (st & QOS_MASK) !== 0 && (s >= this.recv.length || this.recv[s] === 0)) out.push(s)
    }
    return out
  }

  lostCount (): number { return this.awaiting }

  /** Sent QoS 0 messages that did not arrive: allowed by QoS 0, reported apart. */
  qos0NotReceived (): number {
    let n = 0
    const recv = this.recv
    for (let s = 1; s <= this.produced; s++) {
      const st = this.state[s]
      if ((st & SENT) !== 0 && (st & QOS_MASK) === 0 && (s >= recv.length || recv[s] === 0)) n++
    }
    return n
  }

  /** Produced, not dropped, QoS > 0 and not acknowledged yet (in flight or still buffered). */
  unacked (): number {
    let n = 0
    for (let s = 1; s <= this.produced; s++) {
      const st = this.state[s]
      if ((st & (ACKED | DROPPED | REJECTED)) === 0 && (st & QOS_MASK) !== 0) n++
    }
    return n
  }

  /** True when every acknowledged QoS 1/2 message has been received. */
  complete (): boolean { return this.awaiting === 0 }
}

export class Ledger {
  readonly devices = new Map<string, DeviceLedger>()
  /** Messages whose device or sequence number this run never produced. */
  unknown = 0
  /** Messages from another run (ignored). */
  foreign = 0
  /** Payloads that were not telemetry. */
  malformed = 0

  constructor (readonly runId: string) {}

  /** Acknowledged QoS 1/2 messages not received (yet), over every device. */
  awaiting (): number {
    let n = 0
    for (const d of this.devices.values()) n += d.awaiting
    return n
  }

  device (id: string): DeviceLedger {
    let d = this.devices.get(id)
    if (d === undefined) { d = new DeviceLedger(id); this.devices.set(id, d) }
    return d
  }
}

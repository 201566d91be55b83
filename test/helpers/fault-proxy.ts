/**
 * A TCP proxy on loopback that a test controls: it forwards to a target until told to cut the link
 * (reset or black hole), and forwards again once restored; it can add latency. For partition tests
 * of the bridge: real sockets, real timeouts, no mocks. One implementation, shared with the fleet
 * simulator's end-to-end run.
 */
export { UplinkProxy as FaultProxy, type CutMode } from '../../firmware-sim/src/e2e/uplink-proxy.js'

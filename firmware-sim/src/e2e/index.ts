/** The end-to-end topology (issue 7, point 6) and the scenario runner that drives it. */
export { startTopology, hasMosquitto, findMosquitto, type Topology, type TopologyOptions, type BridgeStatus, type CutMode } from './topology.js'
export { runScenario, validatePlan, planFor, DEFAULT_PLAN, type ScenarioPlan, type ScenarioStep, type ScenarioEvent, type ScenarioHooks, type ScenarioOptions, type ScenarioResult, type StepResult } from './scenario.js'
export { UplinkProxy } from './uplink-proxy.js'

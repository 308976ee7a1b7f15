// Where the State Relay plugs into a reload. The orchestrator owns the timing
// and the failure path (state_handoff.timeout, rollback on any failure); the
// relay owns the protocol. Without state_handoff, no relay runs.
import type { Generation } from '../supervisor/generation';
import type { ReadinessSource } from './readiness';

/** What a generation's first load is: see StateRelay.attach. */
export type RelayRole = 'fresh' | 'candidate' | 'stateless';

export interface RelayProgress {
  bytes: number;
  total: number;
}

/** A checkpoint Aeterna holds, for status (docs/srp.md, "Checkpoints"). */
export interface CheckpointSummary {
  seq: number;
  size: number;
  age_ms: number;
}

/**
 * The old generation could not dump its state (it hung past the timeout, died, or refused) before any of it
 * reached the new generation, which still waits for its initial load (orchestration.state_handoff.on_dump_failure).
 */
export class DumpFailed extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DumpFailed';
  }
}

/** The relay is also a readiness source: a generation's {"op":"ready"} says it is ready. */
export interface StateRelay extends ReadinessSource {
  /** The value of LIVERELAY_STATE_SOCK for the app. */
  readonly socketPath: string;
  /**
   * A generation was spawned: its processes may connect. A `candidate` (a
   * reload's new generation) waits for the old state; a `fresh` one (first
   * start, restart) is told at once that there is none (or given the latest
   * checkpoint of its instance, gen.instance); a `stateless` one (a reload whose config turned
   * state_handoff.enabled off) gets an empty load: no state of any kind.
   */
  attach(gen: Generation, role: RelayRole): void;
  /**
   * A generation started with no live predecessor became ready (`ready`), or exited before it was: a checkpoint
   * it was offered and could not load is set aside after a few tries (docs/srp.md, "Checkpoints").
   */
  startOutcome(gen: Generation, ready: boolean): void;
  /**
   * Instance `instance`'s latest checkpoint (service.instances), or without `instance` the most recently stored
   * of any instance's; null when there is none.
   */
  lastCheckpoint(instance?: number): CheckpointSummary | null;
  /** The generation is being stopped with no one to hand its state to: close its connection. */
  release(gen: Generation): void;
  /**
   * At Handover: ask `old` for its state and deliver it to `next` (no state when `old` has no relay connection);
   * resolves once `next` acknowledged it. Rejects (with a reason) on any failure: with DumpFailed when it was `old`
   * that failed and `next` is untouched. Must stop promptly when `signal` aborts (timeout, rollback, stop).
   * `timeoutMs` is when the caller will abort: the dump request tells `old` (its SDK waits that long for the ack,
   * whatever the size of its state).
   */
  relay(
    old: Generation,
    next: Generation,
    progress: (p: RelayProgress) => void,
    signal: AbortSignal,
    timeoutMs: number,
  ): Promise<{ bytes: number }>;
  /**
   * After a relay failed with DumpFailed: give `next` the latest checkpoint of its instance as its load instead;
   * resolves once `next` acknowledged it. Rejects when there is none, or on any failure (as relay does).
   */
  restoreCheckpoint(next: Generation, signal: AbortSignal, timeoutMs: number): Promise<{ bytes: number }>;
  /**
   * At promotion, after SIGTERM to `old`: carry what changed since the first
   * snapshot to `next`. Best effort: the promotion stands either way.
   */
  finalSync(old: Generation, next: Generation, signal: AbortSignal, timeoutMs: number): Promise<{ bytes: number }>;
  /** Whether a state is on its way to or from this generation right now. */
  relaying(gen: Generation): boolean;
  close(): Promise<void>;
}

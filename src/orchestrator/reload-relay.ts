// The state relay's part of a reload (docs/srp.md): at Handover, old instance i's state to new instance i (or,
// when an old one could not dump and on_dump_failure is checkpoint, its instance's latest checkpoint); at promotion,
// each old instance's final sync of what it changed since. The relay (relay.ts) speaks the protocol; this module is
// what a reload makes of it: state_handoff.timeout, the log lines, metrics and phases, and which FSM event each
// outcome fires. It is apart from the orchestrator so the relay's steps read in one place; it holds no state of its
// own and reaches the orchestrator only through ReloadRelayHost.
import type { ErrorCode } from '../errors';
import { formatDuration } from '../config/duration';
import type { Logger } from '../log';
import type { Metrics } from '../monitor/metrics';
import type { Generation } from '../supervisor/generation';
import type { Event, State } from './fsm';
import { instanceName, type InstanceSet } from './instance-set';
import { DumpFailed, type StateRelay } from './relay';
import type { ReloadRun } from './reload-run';
import type { ReloadEvent, ReloadPhase } from './types';

/** What the relay's part of a reload needs of the orchestrator that runs the reload. */
export interface ReloadRelayHost {
  /** The state relay, when state_handoff is enabled (at start): without it a reload relays nothing. */
  readonly relay: StateRelay | null;
  readonly log: Logger;
  readonly metrics: Pick<Metrics, 'stateRelayed'>;
  /** The serving generation: before promotion, the one a reload replaces. */
  serving(): InstanceSet | null;
  /** A reload's new generation, before promotion. */
  candidate(): InstanceSet | null;
  /** After promotion, the old generation being stopped. */
  draining(): InstanceSet | null;
  /** Whether a callback of `run` still applies: its reload is the current one and in `state`. */
  stillCurrent(run: ReloadRun, state: State): boolean;
  /** Fire an FSM event; false (logged) when it is not legal now. */
  fire(event: Event): boolean;
  /** The reload in flight reached `phase` (its record, the log and its events). */
  phase(phase: ReloadPhase, detail?: string): void;
  /** An event of the reload in flight, to whoever follows it. */
  emit(event: ReloadEvent): void;
  /** Roll the reload in flight back. */
  rollBack(event: Event, reason: string, code: ErrorCode): void;
  /** The reload's new instances may be ready and relayed now: its next step, if so. */
  promoteWhenDone(run: ReloadRun): void;
}

export class ReloadRelay {
  constructor(private readonly host: ReloadRelayHost) {}

  /**
   * Whether `run` relays the state: the relay runs (state_handoff.enabled at start) and the config this reload
   * read still enables it (docs/configuration.md: turning it off takes effect at the next reload).
   */
  relays(run: ReloadRun): boolean {
    return this.host.relay !== null && run.config.orchestration.stateHandoff.enabled;
  }

  /**
   * 5. Relay the old generation's state to the new one (nothing to do without the relay): old instance i to new
   * instance i. A new instance with no old one of its number (service.instances grew) was offered the latest
   * checkpoint of its instance number when it was attached ('fresh'); an old one with no new one of its number
   * (it shrank) gives nothing (its checkpoint is kept).
   */
  relayState(run: ReloadRun, started: Generation[]): void {
    const host = this.host;
    const relay = host.relay;
    const old = host.serving();
    const next = host.candidate()!;
    if (relay && !this.relays(run) && started.includes(next.at(0)!)) {
      host.log.warn(
        { reload: run.record.id, generation: next.number },
        `orchestration.state_handoff.enabled is off in ${run.config.file}: no state is relayed; generation ${next.number} starts without state`,
      );
    }
    const pairs = started.flatMap((n) => {
      const o = old?.at(next.indexOf(n));
      return o === undefined ? [] : [[o, n] as const];
    });
    if (!relay || !old || !this.relays(run) || pairs.length === 0) {
      run.awaiting.delete('relay');
      return;
    }
    host.phase(
      'relaying',
      next.size > 1
        ? `instance${pairs.length > 1 ? 's' : ''} ${pairs.map(([, n]) => next.indexOf(n)).join(', ')}`
        : undefined,
    );
    const timeoutMs = run.config.orchestration.stateHandoff.timeoutMs;
    const abort = new AbortController(); // this batch's: the reload's relayAbort ends every batch's
    run.checkpointAborts.push(abort);
    run.timers.push(
      setTimeout(() => abort.abort(new Error(`timed out after ${formatDuration(timeoutMs)}`)), timeoutMs),
    );
    const began = performance.now();
    const progress = (p: { bytes: number; total: number }): void =>
      host.emit({
        type: 'relay',
        reload: run.record.id,
        bytes: p.bytes,
        total: p.total,
        rate_bps: Math.round(p.bytes / Math.max(0.001, (performance.now() - began) / 1000)),
      });
    void Promise.all(pairs.map(([o, n]) => this.relayInstance(run, relay, o, n, progress, abort.signal))).then(
      (results) => {
        if (!host.stillCurrent(run, 'Handover')) return;
        const bytes = results.reduce((sum, r) => sum + r.bytes, 0);
        const checkpoint = results.find((r) => r.from !== null)?.from;
        if (checkpoint === undefined) host.metrics.stateRelayed(bytes, (performance.now() - began) / 1000);
        else host.metrics.stateRelayed(bytes);
        host.fire('state-relayed');
        host.phase(
          'relayed',
          `${bytes} bytes${checkpoint !== undefined && results.length === 1 ? ` from ${checkpoint}` : ''}`,
        );
        run.awaiting.delete('relay');
        host.promoteWhenDone(run);
      },
      (err: Error) => {
        if (host.stillCurrent(run, 'Handover')) host.rollBack('relay-failed', err.message, 'E_RELAY_FAILED');
      },
    );
  }

  /**
   * One instance's relay: the state of `old` to `next`, or the latest checkpoint when `old` could not dump and
   * on_dump_failure is checkpoint. Rejects with the rollback's reason.
   */
  private relayInstance(
    run: ReloadRun,
    relay: StateRelay,
    old: Generation,
    next: Generation,
    progress: (p: { bytes: number; total: number }) => void,
    signal: AbortSignal,
  ): Promise<{ bytes: number; from: string | null }> {
    const set = this.host.candidate()!;
    const which = set.size > 1 ? `instance ${set.indexOf(next)}: ` : '';
    const timeoutMs = run.config.orchestration.stateHandoff.timeoutMs;
    const both = AbortSignal.any([signal, run.relayAbort.signal]);
    return relay.relay(old, next, progress, both, timeoutMs).then(
      ({ bytes }) => ({ bytes, from: null }),
      (err: Error) => {
        const fallBack =
          err instanceof DumpFailed && run.config.orchestration.stateHandoff.onDumpFailure === 'checkpoint';
        if (fallBack && relay.lastCheckpoint(next.instance) && this.host.stillCurrent(run, 'Handover'))
          return this.relayCheckpoint(run, old, next, err.message);
        const none = fallBack
          ? `; no checkpoint${set.size > 1 ? ` of instance ${next.instance}` : ''} is stored to go on with (on_dump_failure: checkpoint)`
          : '';
        throw new Error(`state relay failed: ${which}${err.message}${none}`);
      },
    );
  }

  /** 5b. on_dump_failure: checkpoint: the old instance could not dump, so the new one loads its instance's latest checkpoint. */
  private relayCheckpoint(
    run: ReloadRun,
    old: Generation,
    next: Generation,
    why: string,
  ): Promise<{ bytes: number; from: string }> {
    const host = this.host;
    const relay = host.relay!;
    const c = relay.lastCheckpoint(next.instance)!;
    const what = `checkpoint ${c.seq} (${c.size} bytes, ${formatDuration(c.age_ms)} old)`;
    const name = instanceName(old, host.serving());
    host.log.warn(
      { reload: run.record.id, generation: old.number, seq: c.seq, age_ms: c.age_ms, reason: why },
      `${name} could not dump its state (${why}): going on with ${what} (on_dump_failure: checkpoint)`,
    );
    host.phase('relaying', `${what}: ${name} could not dump (${why})`);
    run.fromCheckpoint.add(Math.max(0, host.candidate()!.indexOf(next)));
    // The first signal may be spent on the failed dump (its timeout): the checkpoint's load gets one of its own.
    const abort = new AbortController();
    run.checkpointAborts.push(abort);
    const timeoutMs = run.config.orchestration.stateHandoff.timeoutMs;
    run.timers.push(
      setTimeout(() => abort.abort(new Error(`timed out after ${formatDuration(timeoutMs)}`)), timeoutMs),
    );
    return relay.restoreCheckpoint(next, abort.signal, timeoutMs).then(
      ({ bytes }) => ({ bytes, from: what }),
      (err: Error) => {
        throw new Error(`state relay failed: ${why}; loading ${what} instead failed too: ${err.message}`);
      },
    );
  }

  /**
   * At promotion: carry what each old instance changed since its first dump to the new instance of its number.
   * Best effort: the promotion stands. Resolves once all settled, relayed or lost (within state_handoff.timeout).
   */
  finalSync(run: ReloadRun, pairs: ReadonlyArray<readonly [Generation, Generation]>): Promise<void> {
    return Promise.all(pairs.map(([o, n]) => this.finalSyncOne(run, o, n))).then((ok) => {
      if (this.host.stillCurrent(run, 'Draining')) this.host.fire(ok.every(Boolean) ? 'state-relayed' : 'relay-failed');
    });
  }

  /** One old instance's final sync to its successor; resolves with whether it arrived (a loss is logged). */
  finalSyncOne(run: ReloadRun, old: Generation, next: Generation): Promise<boolean> {
    const host = this.host;
    const relay = host.relay;
    if (!relay || !this.relays(run)) return Promise.resolve(true);
    const abort = new AbortController();
    const timeoutMs = run.config.orchestration.stateHandoff.timeoutMs;
    const timer = setTimeout(() => abort.abort(new Error('final sync timed out')), timeoutMs);
    const draining = host.draining();
    const set = draining?.has(old) === true ? draining : host.serving();
    const name = set !== null && set.size > 1 ? `old instance ${set.indexOf(old)}` : 'old generation';
    return relay.finalSync(old, next, abort.signal, timeoutMs).then(
      ({ bytes }) => {
        clearTimeout(timer);
        host.metrics.stateRelayed(bytes);
        host.log.info({ reload: run.record.id, bytes }, 'final state sync relayed');
        return true;
      },
      (err: Error) => {
        clearTimeout(timer);
        host.log.warn(
          { reload: run.record.id, err: err.message },
          `final state sync lost: changes made by the ${name} after the first dump did not reach the new one (${err.message})`,
        );
        return false;
      },
    );
  }
}

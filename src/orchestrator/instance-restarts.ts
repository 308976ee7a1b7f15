// Instance crashes and restarts between reloads (service.restart): a serving instance that exits is restarted after
// its backoff, or Aeterna stops (its policy says so, or a crash loop). With one instance that is the restart of the
// generation (Starting again, a new generation number); with more, the instance is restarted alone in its slot, with
// its own budget and crash loop count, while the others serve on. Apart from the orchestrator because it owns state
// of its own: each instance number's budget (restart.ts), the restarts pending behind their backoff timers (freed by
// clear()), and the counts status reports. It reaches the orchestrator only through InstanceRestartsHost.
import type { ServiceConfig } from '../config/types';
import { formatDuration } from '../config/duration';
import type { Logger } from '../log';
import type { Metrics } from '../monitor/metrics';
import type { ExitInfo } from '../native/binding';
import type { AeternaError } from '../errors';
import { describeExit, exitCodeOf, exitRecord } from '../supervisor/exit';
import type { Generation } from '../supervisor/generation';
import type { Event, State } from './fsm';
import { instanceName, type InstanceSet } from './instance-set';
import { RestartBudget } from './restart';
import type { CrashEvent, OperatorEvent } from './types';

/** How an exited instance's start went: what its exit counts as. */
export interface StartRecord {
  /** It said it was ready. */
  ready: boolean;
  /** Aeterna stopped it: it never became ready in time, or its watchdog fired. A failure, whatever its exit code. */
  failed: boolean;
  /** Its watchdog fired. */
  watchdog: boolean;
}

/** What instance restarts need of the orchestrator. */
export interface InstanceRestartsHost {
  readonly log: Logger;
  readonly metrics: Pick<Metrics, 'childRestarted'>;
  /** Every operator event as it happens. */
  readonly onEvent?: (event: OperatorEvent) => void;
  /** The last lines generation `number` wrote to stderr, or null when Aeterna does not read them. */
  readonly stderrTail?: (number: number, instance?: number) => string[] | null;
  /** The serving generation. */
  serving(): InstanceSet | null;
  state(): State;
  /** The running config's service.restart. */
  policy(): ServiceConfig['restart'];
  /** Fire an FSM event; false (logged) when it is not legal now. */
  fire(event: Event): boolean;
  /**
   * Serving instance `gen` exited and goes through service.restart: Aeterna's exit code follows `info` from now on,
   * its start is over (its readiness watch ends, a checkpoint it could not load counts). Says how its start went.
   */
  exited(gen: Generation, info: ExitInfo): StartRecord;
  /** Starting: spawn a new serving generation (each of its instances) and wait for it to be ready. */
  startServing(): void;
  /** Start instance `instance` of `set` alone in its slot, attached 'fresh'; throws E_SPAWN_FAILED. */
  spawnAlone(set: InstanceSet, instance: number): Generation;
  /** Wait for a serving instance with no predecessor to be ready (its start watch). */
  watchStart(gen: Generation): void;
  /** Stop Aeterna, which then exits with `code`. */
  exit(code: number, reason: string): void;
}

export class InstanceRestarts {
  /** How many times an app process was restarted since Aeterna started (an upgrade carries it over). */
  total = 0;
  /** The latest exit of a serving instance outside a reload, for status. */
  lastCrash: CrashEvent | null = null;
  /** service.restart's budget, per instance number (the crash loop limit counts per instance). */
  private readonly budgets: RestartBudget[] = [];
  /** How many times each instance number of the serving generation was restarted alone since Aeterna started. */
  private readonly counts: number[] = [];
  /** Serving instances waiting for their restart alone, by instance number. */
  private readonly pendingAlone = new Map<number, NodeJS.Timeout>();
  /** The restart of the whole generation (one instance), waiting for its backoff. */
  private restartTimer: NodeJS.Timeout | null = null;

  constructor(private readonly host: InstanceRestartsHost) {}

  /** How many instances wait for their restart alone. */
  get pending(): number {
    return this.pendingAlone.size;
  }

  /** Whether instance `instance` waits for its restart alone. */
  isPending(instance: number): boolean {
    return this.pendingAlone.has(instance);
  }

  /** How many times instance `instance` of the serving generation was restarted alone. */
  countOf(instance: number): number {
    return this.counts[instance] ?? 0;
  }

  /** A promoted reload may change service.restart; each instance's history carries over. */
  updatePolicy(policy: ServiceConfig['restart']): void {
    for (const b of this.budgets) b.update(policy);
  }

  /** Restarts alone still pending are void (a reload promoted a new generation). */
  cancelAlone(): void {
    for (const t of this.pendingAlone.values()) clearTimeout(t);
    this.pendingAlone.clear();
  }

  /** Aeterna stops: no restart is pending any more. */
  clear(): void {
    if (this.restartTimer) clearTimeout(this.restartTimer);
    this.restartTimer = null;
    this.cancelAlone();
  }

  private budget(instance: number): RestartBudget {
    return (this.budgets[instance] ??= new RestartBudget(this.host.policy()));
  }

  /**
   * A serving instance exited outside a reload (or its drain): restart it, or stop. With one instance that is the
   * restart of the generation (Starting again, a new generation number); with more, the instance is restarted alone
   * in its slot, with its own backoff and crash loop count, and the others serve on (the state does not change).
   */
  handleCrash(gen: Generation, info: ExitInfo): void {
    const host = this.host;
    const set = host.serving()!;
    const instance = Math.max(0, set.indexOf(gen));
    const start = host.exited(gen, info);
    const decision = this.budget(instance).decide(info, Date.now(), start.failed);
    const fields = { generation: gen.number, ...(set.size > 1 ? { instance } : {}) };
    const reason = start.watchdog
      ? 'watchdog'
      : !start.ready
        ? 'start_failed'
        : info.code === 0 && info.signal === null
          ? 'exited'
          : 'crashed';
    this.lastCrash = {
      type: 'crash',
      at: new Date().toISOString(),
      generation: gen.number,
      ...(set.size > 1 ? { instance } : {}),
      pid: gen.pid,
      exit: exitRecord(info),
      reason,
      restart_in_ms: decision.restart ? decision.delayMs : null,
      stderr_tail: host.stderrTail?.(gen.number, gen.instance) ?? null,
    };
    host.onEvent?.(this.lastCrash);
    if (decision.restart) {
      this.total++;
      this.counts[instance] = (this.counts[instance] ?? 0) + 1;
      host.metrics.childRestarted(reason);
      const alone = set.size > 1 ? `${instanceName(gen, set)} ` : 'app ';
      host.log.warn(
        {
          ...fields,
          child: gen.pid,
          exit_code: exitCodeOf(info),
          attempt: decision.attempt,
          backoff_ms: decision.delayMs,
        },
        `${alone}${describeExit(info)}: restarting ${set.size > 1 ? 'it alone ' : ''}in ${formatDuration(decision.delayMs)}`,
      );
      if (set.size > 1) {
        clearTimeout(this.pendingAlone.get(instance));
        this.pendingAlone.set(
          instance,
          setTimeout(() => this.restartInstance(set, instance), decision.delayMs),
        );
        return;
      }
      host.fire('exited'); // Starting
      this.restartTimer = setTimeout(() => {
        this.restartTimer = null;
        host.startServing();
        const next = host.serving();
        if (next !== null && !next.has(gen))
          host.onEvent?.({
            type: 'restart',
            at: new Date().toISOString(),
            generation: next.number,
            pid: next.pid,
            attempt: decision.attempt,
          });
      }, decision.delayMs);
      return;
    }
    (decision.crashLoop ? host.log.error.bind(host.log) : host.log.info.bind(host.log))(
      {
        ...fields,
        exit_code: decision.exitCode,
        code: decision.crashLoop ? 'E_CRASH_LOOP' : 'E_CHILD_EXITED',
      },
      set.size > 1 ? `${instanceName(gen, set)}: ${decision.reason}` : decision.reason,
    );
    host.exit(decision.exitCode, decision.reason);
  }

  /**
   * Start instance `instance` of `set` again, alone, in its slot (the generation's number, AETERNA_INSTANCE
   * `instance`): attached 'fresh', it is offered its instance's latest checkpoint. Nothing when `set` no longer serves.
   */
  restartInstance(set: InstanceSet, instance: number, why = 'restarted'): void {
    const host = this.host;
    this.pendingAlone.delete(instance);
    const state = host.state();
    if (host.serving() !== set || set.at(instance)?.alive === true || state === 'Stopping' || state === 'Stopped')
      return;
    let gen: Generation;
    try {
      gen = host.spawnAlone(set, instance);
    } catch (err) {
      const e = err as AeternaError;
      host.log.error({ err, code: e.code, generation: set.number, instance }, e.message);
      host.exit(127, `generation ${set.number} instance ${instance} could not be started again`);
      return;
    }
    host.log.info(
      { generation: set.number, instance, child: gen.pid },
      `generation ${set.number} instance ${instance} ${why}`,
    );
    host.watchStart(gen);
  }

  /** Every instance of the serving generation that is gone goes through handleCrash (after a drain or a rollback). */
  reviveDead(): void {
    const set = this.host.serving();
    if (set === null) return;
    for (let i = 0; i < set.size; i++) {
      const gen = set.at(i);
      if (gen !== undefined && !gen.alive && !this.pendingAlone.has(i) && this.host.state() !== 'Stopping')
        this.handleCrash(gen, gen.exitInfo!);
      if (set.size === 1) return; // the generation restarts as a whole
    }
  }
}

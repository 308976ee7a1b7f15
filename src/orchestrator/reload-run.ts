// One reload as the orchestrator runs it (orchestrator.ts): what it started from, what it has done so far, and
// its record, the answer `aeterna reload` and status give. Here are the run's data, how a run starts, and how each
// of its phases and events reaches the record, the log and whoever follows it (the reload's caller, `aeterna
// events`). The steps themselves, which need the generations, stay in the orchestrator.
import type { ErrorCode } from '../errors';
import type { Config } from '../config/types';
import type { Logger } from '../log';
import type { ReadinessWatch } from './readiness';
import type { Generation } from '../supervisor/generation';
import type { WeightedSplit } from '../resources/canary-split';
import type { OperatorEvent, ReloadEvent, ReloadPhase, ReloadRecord, ReloadTrigger } from './types';

/** What a reload does with a weighted canary split. */
export type CanarySplit = Pick<
  WeightedSplit,
  'canary' | 'noMigration' | 'weight' | 'candidateListeners' | 'steer' | 'drained' | 'promote' | 'discard'
>;

/** One reload, from the request to its outcome. */
export interface ReloadRun {
  record: ReloadRecord;
  startedAt: number;
  /** The config it re-read: the running one once it is promoted. */
  config: Config;
  previousConfig: Config;
  subscribers: Array<(e: ReloadEvent) => void>;
  resolve: (record: ReloadRecord) => void;
  /** The readiness watch of each new instance started so far. */
  readiness: ReadinessWatch[];
  /** What the new generation must still do before it counts as ready (both, in either order). */
  awaiting: Set<'ready' | 'relay'>;
  relayAbort: AbortController;
  /** The old instances that could not dump, whose successor loaded the checkpoint (on_dump_failure: checkpoint): no final sync. */
  fromCheckpoint: Set<number>;
  /** Each instance's checkpoint load after a failed dump gets a timeout of its own; aborted with the reload. */
  checkpointAborts: AbortController[];
  /** A rolling reload (max_surge): the instances of this batch, and those still to start after it. */
  batch: number[];
  pending: number[];
  /** Old instances a rolling reload already stopped, each once its successor was ready: not crashes; restarted on a rollback. */
  replaced: Set<Generation>;
  /** The new instance whose exit failed the reload (its stderr tail goes into the record). */
  failedInstance?: number;
  timers: NodeJS.Timeout[];
  /** orchestration.canary: the candidate's own sockets and the steering of new connections; null for a shared socket. */
  split: CanarySplit | null;
  /** When a canary soak promotes on its own (epoch ms), once it soaks. */
  soakEndsAt?: number;
  /** Why the reload is being rolled back or has failed, once it is. */
  failure: { reason: string; code: ErrorCode; outcome: 'rolled_back' | 'failed' } | null;
}

/** A new run `id` of `config`'s strategy, from generation `fromGeneration`; `done` resolves with its final record. */
export function newReloadRun(
  id: string,
  trigger: ReloadTrigger,
  config: Config,
  fromGeneration: number,
  onEvent?: (event: ReloadEvent) => void,
): { run: ReloadRun; done: Promise<ReloadRecord> } {
  let resolve!: (r: ReloadRecord) => void;
  const done = new Promise<ReloadRecord>((r) => (resolve = r));
  const run: ReloadRun = {
    record: {
      id,
      strategy: config.orchestration.strategy,
      trigger,
      started_at: new Date().toISOString(),
      phases: [],
      outcome: 'in_progress',
      reason: null,
      code: null,
      duration_ms: null,
      from_generation: fromGeneration,
      to_generation: null,
      new_pid: null,
      serving_since: null,
      retiring: [],
    },
    startedAt: performance.now(),
    config,
    previousConfig: config,
    subscribers: onEvent ? [onEvent] : [],
    resolve,
    readiness: [],
    awaiting: new Set(['ready', 'relay']),
    relayAbort: new AbortController(),
    fromCheckpoint: new Set(),
    checkpointAborts: [],
    batch: [],
    pending: [],
    replaced: new Set(),
    timers: [],
    split: null,
    failure: null,
  };
  return { run, done };
}

/** `run` reached `phase`: in its record, one log line, and an event to whoever follows it. */
export function recordPhase(
  run: ReloadRun,
  phase: ReloadPhase,
  detail: string | undefined,
  log: Logger,
  onEvent?: (event: OperatorEvent) => void,
): void {
  const at = new Date().toISOString();
  run.record.phases.push(detail === undefined ? { phase, at } : { phase, at, detail });
  log.info({ reload: run.record.id, phase, detail }, `${run.record.id} ${phase}${detail ? `: ${detail}` : ''}`);
  publish(
    run,
    {
      type: 'phase',
      reload: run.record.id,
      phase,
      at,
      elapsed_ms: Math.round(performance.now() - run.startedAt),
      ...(detail === undefined ? {} : { detail }),
    },
    log,
    onEvent,
  );
}

/** An event of `run`: to the operator events (with its trigger) and to the run's own subscribers (a failing one is logged). */
export function publish(
  run: ReloadRun,
  event: ReloadEvent,
  log: Logger,
  onEvent?: (event: OperatorEvent) => void,
): void {
  onEvent?.({ ...event, trigger: run.record.trigger });
  for (const l of run.subscribers) {
    try {
      l(event);
    } catch (err) {
      log.warn({ err }, 'reload event listener failed');
    }
  }
}

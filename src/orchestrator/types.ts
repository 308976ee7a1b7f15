// What the orchestrator tells the outside world: reload records, progress
// events and status. These shapes travel over the control socket as JSON, so
// their field names are the wire format (snake_case) and stay stable.
import type { ErrorCode } from '../errors';
import type { State } from './fsm';
import type { Strategy } from '../config/types';
import type { GenerationResources } from '../monitor/app-resources';

export type ReloadOutcome = 'in_progress' | 'promoted' | 'rolled_back' | 'failed';

export type ReloadPhase =
  | 'accepted' // the request was taken; nothing has changed yet
  | 'config' // the config was re-read and validated
  | 'spawned' // generation N+1 runs beside N
  | 'relaying' // the state relay is under way
  | 'relayed' // the new generation acknowledged the state
  | 'ready' // the new generation is ready
  | 'soaking' // canary: both generations serve for soak_time
  | 'draining' // promotion: the new generation serves, the old one is told to stop (and its final sync runs)
  | 'rolling_back' // the new generation is being stopped; the old keeps serving
  | 'done'; // the outcome is final

export interface PhaseMark {
  phase: ReloadPhase;
  /** ISO time. */
  at: string;
  detail?: string;
}

/** What asked for a reload: `aeterna reload`, SIGHUP, or a change of a file under orchestration.watch. */
export type ReloadTrigger = 'control' | 'sighup' | 'watch';

export interface ReloadRecord {
  /** e.g. "reload-3": the third reload since Aeterna started. */
  id: string;
  strategy: Strategy;
  trigger: ReloadTrigger;
  started_at: string;
  phases: PhaseMark[];
  outcome: ReloadOutcome;
  /** Why it was rolled back or failed, e.g. "exited with code 3 during soak". */
  reason: string | null;
  code: ErrorCode | null;
  duration_ms: number | null;
  from_generation: number;
  to_generation: number | null;
  new_pid: number | null;
  /** When the new generation began serving (its promotion), ISO time; null until then, and for a reload not promoted. */
  serving_since?: string | null;
  /**
   * The old generations still draining when the outcome was final (a promoted reload ends before its old generation
   * has exited): this reload's old one, and those of earlier reloads.
   */
  retiring?: RetiringInfo[];
  /** A reload not promoted: how its new generation ended (exit code, or the signal's name), once it exited; else null. */
  exit?: ExitRecord | null;
  /**
   * A reload not promoted: the last lines its new generation wrote to stderr (at most 20 lines, 8 KiB), or null when
   * Aeterna does not read the app's stderr (observability.app_output: raw).
   */
  stderr_tail?: string[] | null;
}

/** How a process ended: exactly one of code and signal is non-null. */
export interface ExitRecord {
  code: number | null;
  /** e.g. "SIGKILL". */
  signal: string | null;
}

/** An old generation that was replaced and drains in the background: SIGTERM sent, SIGKILL at `kill_deadline`. */
export interface RetiringInfo {
  generation: number;
  pid: number;
  /** ISO time it got SIGTERM. */
  draining_since: string;
  /** ISO time of its SIGKILL: its stop_timeout after SIGTERM (earlier when orchestration.max_generations needed room). */
  kill_deadline: string;
}

/** Streamed to `aeterna reload` while a reload runs. */
export type ReloadEvent =
  | { type: 'phase'; reload: string; phase: ReloadPhase; at: string; elapsed_ms: number; detail?: string }
  | { type: 'soak'; reload: string; elapsed_ms: number; soak_ms: number; total_ms: number }
  | { type: 'relay'; reload: string; bytes: number; total: number; rate_bps: number }
  | { type: 'outcome'; reload: string; record: ReloadRecord };

/**
 * Streamed to `aeterna events` (control/events.ts): every reload's events with what started it, and what happens
 * outside reloads: a crash of the serving generation, its restart, an upgrade of Aeterna, the stop.
 */
export type OperatorEvent =
  | (ReloadEvent & { trigger: ReloadTrigger })
  | CrashEvent
  | { type: 'restart'; at: string; generation: number; pid: number; attempt: number }
  | { type: 'upgrade'; at: string; from: string; reexecs: number }
  | { type: 'stopping'; at: string; reason: string };

/** The serving generation exited outside a reload: how, why it counts as it does, and what Aeterna does next. */
export interface CrashEvent {
  type: 'crash';
  at: string;
  generation: number;
  /** With service.instances > 1: which instance crashed (it is restarted alone). */
  instance?: number;
  pid: number;
  exit: ExitRecord;
  /** crashed (a signal or a non-zero code), exited (code 0), watchdog, start_failed (before it was ready). */
  reason: 'crashed' | 'exited' | 'watchdog' | 'start_failed';
  /** When it is restarted (after service.restart's backoff); null when Aeterna stops instead. */
  restart_in_ms: number | null;
  /** Its last stderr lines (null in raw mode: see ReloadRecord.stderr_tail). */
  stderr_tail: string[] | null;
}

/** A live generation's role and its memory and CPU. */
export interface GenerationUsage extends Partial<GenerationResources> {
  generation: number;
  /** With service.instances > 1: which instance (absent: 0). Each instance is a process tree of its own. */
  instance?: number;
  pid: number;
  /** serving; candidate (a reload's new one); previous (the old one while its promotion settles); retiring (draining on). */
  role: 'serving' | 'candidate' | 'previous' | 'retiring';
}

export interface GenerationInfo {
  generation: number;
  pid: number;
  started_at: string;
  ready: boolean;
  /** The latest STATUS= text it sent over sd_notify, or null. */
  app_status?: string | null;
  /** With service.instances > 1: each of its instances. */
  instances?: InstanceInfo[];
}

/** One instance of a generation (service.instances). */
export interface InstanceInfo {
  /** Its AETERNA_INSTANCE, 0..instances-1. */
  instance: number;
  /** Its root pid while it runs, else null. */
  pid: number | null;
  /**
   * `starting` (not ready yet), `ready`, `restarting` (exited, restarted alone after its backoff), `exited` (not
   * restarted: stopping, or replaced by a reload), `pending` (a rolling reload has not started it yet).
   */
  state: 'pending' | 'starting' | 'ready' | 'restarting' | 'exited';
  ready: boolean;
  /** How many times this instance number was restarted alone since Aeterna started (serving generation only). */
  restarts: number;
  started_at: string | null;
  /** The names of the fds this instance number stored (FDSTORE=1), oldest first: what its next process gets. */
  fdstore: string[];
  /** service.instances > 1, serving generation: this instance number's latest checkpoint, or null (absent otherwise). */
  checkpoint?: { seq: number; size: number; age_ms: number } | null;
}

export interface StatusReport {
  state: State;
  service: string;
  /** The strategy in effect: while a reload runs, that reload's (from the config it re-read), else the running config's. */
  strategy: Strategy;
  /** The serving generation's number (0 before the first one started). */
  generation: number;
  /** The serving generation's root pid, or null when none runs. */
  pid: number | null;
  /** The serving generation's latest STATUS= text (sd_notify), or null when it sent none. */
  app_status?: string | null;
  /** The serving generation's instances (service.instances; one entry with 1). */
  instances?: InstanceInfo[];
  /** Aeterna's own pid (inside the container: 1). */
  daemon_pid: number;
  uptime_ms: number;
  started_at: string;
  listeners: Array<{ name: string; address: string; fd: number }>;
  /** While a reload runs: the generation being replaced (the old one) ... */
  previous: GenerationInfo | null;
  /** ... and the one being started (the new one). */
  candidate: GenerationInfo | null;
  /** Old generations of promoted reloads still draining, oldest first (none serves; each exits on its own or is killed). */
  retiring: RetiringInfo[];
  restarts: number;
  /**
   * The names of the fds in the fd store (FDSTORE=1), oldest first, one per fd: what LISTEN_FDNAMES gets after the
   * listeners'. With service.instances > 1, instance 0's (each of `instances` has its own).
   */
  fdstore: string[];
  /** The latest checkpoint the app stored (state_handoff.checkpoint; with service.instances > 1, any instance's), or null. */
  checkpoint?: { seq: number; size: number; age_ms: number } | null;
  /** orchestration.canary: the percentage of new connections the candidate receives now; null without a weighted split. */
  canary_weight: number | null;
  last_reload: ReloadRecord | null;
  /** The serving generation's last exit outside a reload (a crash, or a clean exit that was restarted), or null. */
  last_crash?: CrashEvent | null;
  /** Every live generation, what it is to the service, and what it uses (monitor/app-resources.ts). */
  generations?: GenerationUsage[];
  /** During a canary soak: how long until it promotes on its own (ms); null otherwise. */
  soak_remaining_ms?: number | null;
  /** The daemon's own version, when it last exec'd (start or upgrade), and how many times it re-executed itself. */
  version?: string;
  exec_at?: string;
  reexecs?: number;
  /**
   * The config file, and how it compares to the config Aeterna runs with (which an upgrade carries over): `applied`,
   * `changed` (the next reload applies it), `invalid` (the next reload refuses it), `unreadable`.
   */
  config_file?: { path: string; state: 'applied' | 'changed' | 'invalid' | 'unreadable' };
  /** This Aeterna took over again because the program an upgrade exec'd could not start: which one, and why. */
  upgrade_fell_back?: { from: string; error: string } | null;
}

/** What the control socket may ask of the daemon. */
export interface ControlApi {
  status(): StatusReport;
  /**
   * Start a reload. Throws AeternaError E_RELOAD_BUSY when one is in progress
   * (or E_ILLEGAL_TRANSITION when the daemon is starting or stopping). Resolves
   * with the final record; onEvent sees every progress event until then.
   */
  reload(trigger: ReloadTrigger, onEvent?: (event: ReloadEvent) => void): Promise<ReloadRecord>;
  /** End a canary soak now, promoting / rolling back. Throws E_ILLEGAL_TRANSITION when no soak runs. */
  promote(): void;
  rollback(): void;
  /** Graceful stop, as SIGTERM. */
  stop(reason: string): void;
  /**
   * `aeterna signal`: pass `signal` to the serving generation's process group (`main`: its root process only).
   * Throws E_ILLEGAL_TRANSITION when no generation serves (starting, restarting, stopping).
   */
  signal?(signal: NodeJS.Signals, main: boolean): Signalled;
  /**
   * `aeterna upgrade`: check the target (E_UPGRADE_REFUSED), refuse during a reload (E_RELOAD_BUSY); resolves when
   * the daemon is about to re-execute itself; `execNow` (called once the reply is flushed) does it.
   */
  upgrade?(exec: string | undefined): Promise<{ from: string; reexecs: number; execNow: () => void }>;
  /**
   * `aeterna events`: `sink` gets every OperatorEvent from now on until it is closed (the returned function ends the
   * subscription). Throws E_CONTROL_UNAVAILABLE when the subscribers are at their limit (control/events.ts).
   */
  subscribe?(sink: EventSink): () => void;
}

/** Where one subscriber's events go: a control connection. */
export interface EventSink {
  /** Queue one encoded line; never blocks. */
  send(line: string): void;
  /** Bytes queued and not yet taken by the subscriber. */
  backlog(): number;
  /** End the subscription with a last line saying why (a slow subscriber, Aeterna stopping). */
  close(line: string): void;
}

/** What `aeterna signal` did: which generation got which signal, and whether its whole group or its root only. */
export interface Signalled {
  signal: NodeJS.Signals;
  generation: number;
  pid: number;
  to: 'group' | 'main';
}

/**
 * A generation as a re-exec carries it (the handover's `generations`, upgrade/handover.ts): the serving one, and
 * the old generations of promoted reloads still draining (handover version 4).
 */
export interface CarriedGeneration {
  number: number;
  pid: number;
  pgid: number;
  /** Its role when the exec happened: one generation serves (no reload runs), others may still be retiring. */
  state: 'serving' | 'retiring';
  started_at: string;
  /** Its cgroup's directory, when it has one. */
  cgroup: string | null;
  /** Its AETERNA_INSTANCE with service.instances > 1 (absent: instance 0). */
  instance?: number;
  /** A retiring generation: when it got SIGTERM, and when its SIGKILL is due (ISO times). */
  draining_since?: string;
  kill_deadline?: string;
}

/** The orchestrator's counters as an upgrade carries them (the handover's `counters`, without `reexecs`). */
export interface CarriedCounters {
  reloads: number;
  restarts: number;
  generations: number;
  last_reload: ReloadRecord | null;
  started_at: string;
}

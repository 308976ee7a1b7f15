// The Brain: drives the state machine (fsm.ts) with real processes. It starts
// and restarts the serving generation, runs reloads (Handover -> Draining for
// immediate, Handover -> Soaking -> Draining for canary, or RollingBack), and
// stops everything on request. Every decision about when a process may die is
// made here; the FSM only says which event is legal when, and the table there
// is the authority on that.
//
// Invariants:
// - At most two generations live at once: `serving` and, during a reload, `candidate`.
// - A failed reload never touches `serving`: its process, its memory and the
//   listeners it uses are left as they were.
// - Listeners are never closed during a reload; one dropped from the config is
//   closed only once no generation uses it.
import { AeternaError, type ErrorCode } from '../errors';
import type { Config } from '../config/types';
import { formatDuration } from '../config/duration';
import type { Logger } from '../log';
import type { Metrics } from '../monitor/metrics';
import type { ExitInfo } from '../native/binding';
import type { ListenerSet } from '../resources/listeners';
import type { ListenerWatch } from '../resources/listener-watch';
import { Generation } from '../supervisor/generation';
import { describeExit, exitCodeOf } from '../supervisor/exit';
import type { Reaper } from '../supervisor/reaper';
import type { Cgroups } from '../supervisor/cgroup';
import { IllegalTransitionError, StateMachine, type Event, type State } from './fsm';
import type { NotifySocket } from '../resources/notify';
import { ReadinessWatch, probeOnce } from './readiness';
import type { StateRelay } from './relay';
import { RestartBudget } from './restart';
import type { ControlApi, GenerationInfo, ReloadEvent, ReloadPhase, ReloadRecord, StatusReport } from './types';

export interface OrchestratorDeps {
  log: Logger;
  metrics: Metrics;
  reaper: Reaper;
  listeners: ListenerSet;
  /** Repairs listeners an app broke; checked before every spawn. */
  listenerWatch: ListenerWatch;
  notify: NotifySocket;
  /** Re-reads and validates the config file at each reload (throws ConfigError). */
  loadConfig: (file: string) => Config;
  /** The state relay, when state_handoff is enabled. */
  relay: StateRelay | null;
  /** One cgroup per generation, where the machine allows it (service.cgroups). */
  cgroups: Cgroups | null;
}

/** A reload in flight: its record, its listeners and what it is waiting for. */
interface ActiveReload {
  record: ReloadRecord;
  startedAt: number;
  config: Config;
  previousConfig: Config;
  listeners: Array<(e: ReloadEvent) => void>;
  resolve: (record: ReloadRecord) => void;
  readiness: ReadinessWatch | null;
  ready: boolean;
  relayed: boolean;
  relayAbort: AbortController;
  timers: NodeJS.Timeout[];
  /** Why the reload is being rolled back, once it is. */
  failure: { reason: string; code: ErrorCode; outcome: 'rolled_back' | 'failed' } | null;
}

const RELOADING: readonly State[] = ['Handover', 'Soaking', 'Draining', 'RollingBack'];
const SERVING_STATES: readonly State[] = ['Running', ...RELOADING];

export class Orchestrator implements ControlApi {
  readonly fsm = new StateMachine();
  private config: Config;
  private serving: Generation | null = null;
  private servingReady = false;
  private candidate: Generation | null = null;
  /** Draining: the candidate was promoted and serves; the old one is being stopped. */
  private promoted = false;
  private startupWatch: ReadinessWatch | null = null;
  /** The generation Aeterna stopped because it never became ready at start: its exit is a failure, whatever its code. */
  private neverReady: Generation | null = null;
  private restartTimer: NodeJS.Timeout | null = null;
  private generations = 0;
  private reloads = 0;
  private restarts = 0;
  private active: ActiveReload | null = null;
  private lastReload: ReloadRecord | null = null;
  private readonly budget: RestartBudget;
  private readonly startedAt = new Date();
  private lastExit: ExitInfo | null = null;
  private exitCode: number | null = null;
  private stopRequests = 0;
  private readonly stopped: Promise<number>;
  private resolveStopped!: (code: number) => void;

  constructor(
    config: Config,
    private readonly deps: OrchestratorDeps,
  ) {
    this.config = config;
    this.budget = new RestartBudget(config.service.restart);
    this.stopped = new Promise((resolve) => (this.resolveStopped = resolve));
    // The relay's {"op":"ready"} counts as ready for whichever generation is being waited for.
    deps.relay?.onReady((gen) => {
      if (gen === this.candidate) this.active?.readiness?.markReady('state relay ready op');
      else if (gen === this.serving && this.fsm.state === 'Starting') this.startupWatch?.markReady('state relay ready op');
    });
    this.fsm.onTransition((t) => {
      deps.metrics.setState(t.to);
      const level = t.from === t.to ? 'debug' : 'info';
      deps.log[level]({ from: t.from, to: t.to, event: t.event, generation: this.serving?.number, reload: this.active?.record.id }, `state ${t.from} -> ${t.to} (${t.event})`);
    });
  }

  // ---- lifecycle ---------------------------------------------------------------------------

  /** Start generation 1; resolves with Aeterna's exit code once everything has stopped. */
  run(): Promise<number> {
    this.fire('start');
    this.startServing();
    return this.stopped;
  }

  /** The running config's service.stop_timeout: Aeterna's leftover processes get as long at exit. */
  get stopTimeoutMs(): number {
    return this.config.service.stopTimeoutMs;
  }

  /** Whether a generation is serving and ready (GET /readyz). */
  isReady(): boolean {
    return SERVING_STATES.includes(this.fsm.state) && this.servingReady;
  }

  private fire(event: Event): boolean {
    try {
      this.fsm.fire(event);
      return true;
    } catch (err) {
      if (!(err instanceof IllegalTransitionError)) throw err;
      this.deps.log.warn({ state: err.state, event, code: err.code }, err.message);
      return false;
    }
  }

  private extraEnv(gen: number): Record<string, string> {
    const env: Record<string, string> = { NOTIFY_SOCKET: this.deps.notify.address, AETERNA_GENERATION: String(gen) };
    if (this.deps.relay) env.LIVERELAY_STATE_SOCK = this.deps.relay.socketPath;
    return env;
  }

  private spawn(config: Config, role: 'fresh' | 'candidate'): Generation {
    const number = ++this.generations;
    this.deps.listenerWatch.check(`spawn of generation ${number}`, true); // the new generation gets listening sockets
    this.deps.notify.grant(config.service);
    const gen = Generation.spawn(number, config.service, this.deps.listeners.list(), this.deps.reaper, this.extraEnv(number), this.deps.cgroups);
    this.deps.relay?.attach(gen, role);
    this.deps.log.info({ generation: number, child: gen.pid, command: config.service.command }, 'generation started');
    gen.exited.then((info) => this.onExit(gen, info));
    return gen;
  }

  /** Starting: spawn the serving generation and wait for it to be ready. */
  private startServing(): void {
    this.restartTimer = null;
    let gen: Generation;
    try {
      gen = this.spawn(this.config, 'fresh');
    } catch (err) {
      const e = err as AeternaError;
      const errno = (e.cause as NodeJS.ErrnoException | undefined)?.code;
      this.deps.log.error({ err, code: e.code }, e.message);
      // A command that cannot be executed will not start on a retry either: stop, as a shell would report it.
      this.exitCode = errno === 'EACCES' ? 126 : 127;
      this.stop('the app could not be started');
      return;
    }
    this.serving = gen;
    this.servingReady = false;
    const watch = new ReadinessWatch(gen, this.config.orchestration.readiness, this.deps);
    this.startupWatch = watch;
    watch.ready.then(
      () => {
        if (this.serving !== gen || this.fsm.state !== 'Starting') return;
        this.servingReady = true;
        this.deps.metrics.setGeneration(gen.number);
        this.fire('ready');
      },
      (err: AeternaError) => {
        if (this.serving !== gen || this.fsm.state !== 'Starting') return;
        this.deps.log.error({ generation: gen.number, child: gen.pid, code: err.code }, `stopping generation ${gen.number}, then service.restart decides: ${err.message}`);
        this.fire('ready-timeout');
        this.neverReady = gen;
        void gen.stop(this.config.service.stopTimeoutMs); // its exit goes through the restart policy, as a failure
      },
    );
  }

  /** The serving generation exited outside a reload: restart it, or stop. */
  private handleCrash(gen: Generation, info: ExitInfo): void {
    this.lastExit = info;
    this.servingReady = false;
    this.startupWatch?.cancel();
    const decision = this.budget.decide(info, Date.now(), gen === this.neverReady);
    if (decision.restart) {
      this.restarts++;
      const reason = this.fsm.state === 'Starting' ? 'start_failed' : info.code === 0 && info.signal === null ? 'exited' : 'crashed';
      this.deps.metrics.childRestarted(reason);
      this.deps.log.warn(
        { generation: gen.number, child: gen.pid, exit_code: exitCodeOf(info), attempt: decision.attempt, backoff_ms: decision.delayMs },
        `app ${describeExit(info)}: restarting in ${formatDuration(decision.delayMs)}`,
      );
      this.fire('exited');
      this.restartTimer = setTimeout(() => this.startServing(), decision.delayMs);
      return;
    }
    (decision.crashLoop ? this.deps.log.error.bind(this.deps.log) : this.deps.log.info.bind(this.deps.log))(
      { generation: gen.number, exit_code: decision.exitCode, code: decision.crashLoop ? 'E_CRASH_LOOP' : 'E_CHILD_EXITED' },
      decision.reason,
    );
    this.exitCode = decision.exitCode;
    this.stop(decision.reason);
  }

  private onExit(gen: Generation, info: ExitInfo): void {
    const state = this.fsm.state;
    const how = describeExit(info);
    if (gen === this.serving) {
      this.deps.log.info({ generation: gen.number, child: gen.pid, exit_code: exitCodeOf(info) }, `generation ${gen.number} ${how}`);
      this.lastExit = info;
      if (state === 'Starting' || state === 'Running') return this.handleCrash(gen, info);
      if (state === 'Stopping') return this.checkStopped();
      if (state === 'Draining') return this.finishDrain();
      // Handover, Soaking, RollingBack: the old generation died on its own.
      this.servingReady = false;
      this.fire('old-exited');
      if (this.fsm.state === 'Draining') this.enterDraining(); // Soaking: the new one serves now
      return;
    }
    if (gen === this.candidate) {
      this.deps.log.info({ generation: gen.number, child: gen.pid, exit_code: exitCodeOf(info) }, `generation ${gen.number} ${how}`);
      if (state === 'Stopping') return this.checkStopped();
      if (state === 'RollingBack') return this.finishRollback();
      if (state === 'Handover' || state === 'Soaking') {
        const when = state === 'Soaking' ? 'during soak' : this.deps.relay?.relaying(gen) ? 'during the state relay' : 'before becoming ready';
        return this.rollBack('exited', `${how} ${when}`, 'E_CHILD_EXITED');
      }
      // Draining: the new generation died while the old one drains; handled once the drain is done.
    }
  }

  // ---- reload ------------------------------------------------------------------------------

  reload(trigger: 'control' | 'sighup', onEvent?: (event: ReloadEvent) => void): Promise<ReloadRecord> {
    const state = this.fsm.state;
    if (this.active || RELOADING.includes(state)) {
      throw new AeternaError('E_RELOAD_BUSY', `a reload is already in progress (${this.active?.record.id ?? state})`);
    }
    if (!this.fsm.can('reload')) {
      throw new AeternaError('E_ILLEGAL_TRANSITION', `cannot reload while ${state}`);
    }
    const id = `reload-${++this.reloads}`;
    let resolve!: (r: ReloadRecord) => void;
    const done = new Promise<ReloadRecord>((r) => (resolve = r));
    const active: ActiveReload = {
      record: {
        id,
        strategy: this.config.orchestration.strategy,
        trigger,
        started_at: new Date().toISOString(),
        phases: [],
        outcome: 'in_progress',
        reason: null,
        code: null,
        duration_ms: null,
        from_generation: this.serving?.number ?? 0,
        to_generation: null,
        new_pid: null,
      },
      startedAt: performance.now(),
      config: this.config,
      previousConfig: this.config,
      listeners: onEvent ? [onEvent] : [],
      resolve,
      readiness: null,
      ready: false,
      relayed: false,
      relayAbort: new AbortController(),
      timers: [],
      failure: null,
    };
    this.active = active;
    this.phase('accepted', `trigger ${trigger}`);

    // 1. Re-read and validate the config: on error nothing changes.
    try {
      active.config = this.deps.loadConfig(this.config.file);
    } catch (err) {
      this.finish('failed', (err as Error).message, (err as AeternaError).code ?? 'E_CONFIG_INVALID');
      return done;
    }
    active.record.strategy = active.config.orchestration.strategy;
    this.phase('config', active.config.file);

    // 2. Bind listeners that are new in the config (all or nothing).
    try {
      const { added, dropped } = this.deps.listeners.apply(active.config.service.listeners);
      for (const l of added) this.deps.log.info({ listener: l.name, address: l.address, fd: l.fd, reload: id }, 'listener added');
      for (const l of dropped) this.deps.log.info({ listener: l.name, reload: id }, 'listener dropped from config: closed once the old generation is gone');
    } catch (err) {
      this.finish('failed', (err as Error).message, (err as AeternaError).code);
      return done;
    }

    this.fire('reload'); // Handover
    let next: Generation;
    try {
      next = this.spawn(active.config, 'candidate');
    } catch (err) {
      active.failure = { reason: (err as Error).message, code: 'E_SPAWN_FAILED', outcome: 'failed' };
      this.fire('exited'); // RollingBack, with nothing to stop
      this.finishRollback();
      return done;
    }
    this.candidate = next;
    active.record.to_generation = next.number;
    active.record.new_pid = next.pid;
    this.phase('spawned', `generation ${next.number} (pid ${next.pid})`);

    // 3. State relay, 4. readiness: both must complete before the new generation is ready.
    const readiness = new ReadinessWatch(next, active.config.orchestration.readiness, this.deps);
    active.readiness = readiness;
    readiness.ready.then(
      () => {
        if (this.active !== active || this.fsm.state !== 'Handover') return;
        active.ready = true;
        this.maybeReady();
      },
      (err: AeternaError) => {
        if (this.active !== active || this.fsm.state !== 'Handover') return;
        this.rollBack('ready-timeout', err.message, err.code);
      },
    );
    const relay = this.deps.relay;
    if (relay && this.serving) {
      this.runRelay(active, relay, this.serving, next);
    } else {
      active.relayed = true;
    }
    return done;
  }

  private runRelay(active: ActiveReload, relay: StateRelay, old: Generation, next: Generation): void {
    this.phase('relaying');
    const timeoutMs = active.config.orchestration.stateHandoff.timeoutMs;
    const timer = setTimeout(() => active.relayAbort.abort(new Error(`timed out after ${formatDuration(timeoutMs)}`)), timeoutMs);
    active.timers.push(timer);
    const began = performance.now();
    relay
      .handover(old, next, (p) => this.emit({ type: 'relay', reload: active.record.id, bytes: p.bytes, total: p.total, rate_bps: Math.round(p.bytes / Math.max(0.001, (performance.now() - began) / 1000)) }), active.relayAbort.signal, timeoutMs)
      .then(
        ({ bytes }) => {
          clearTimeout(timer);
          if (this.active !== active || this.fsm.state !== 'Handover') return;
          this.deps.metrics.stateRelayed(bytes, (performance.now() - began) / 1000);
          active.relayed = true;
          this.fire('state-relayed');
          this.phase('relayed', `${bytes} bytes`);
          this.maybeReady();
        },
        (err: Error) => {
          clearTimeout(timer);
          if (this.active !== active || this.fsm.state !== 'Handover') return;
          this.rollBack('relay-failed', `state relay failed: ${err.message}`, 'E_RELAY_FAILED');
        },
      );
  }

  /** Ready and relayed: promote at once (immediate) or soak first (canary). */
  private maybeReady(): void {
    const active = this.active!;
    if (!active.ready || !active.relayed) return;
    const orchestration = active.config.orchestration;
    const immediate = orchestration.strategy === 'immediate';
    this.fire(immediate ? 'ready-immediate' : 'ready'); // Draining, or Soaking
    this.phase('ready');
    if (immediate) {
      this.enterDraining();
      return;
    }
    const soakMs = orchestration.soakTimeMs;
    this.phase('soaking', formatDuration(soakMs));
    const began = performance.now();
    active.timers.push(
      setTimeout(() => {
        if (this.active === active && this.fsm.state === 'Soaking' && this.fire('soak-elapsed')) this.enterDraining();
      }, soakMs),
      setInterval(() => {
        const elapsed = Math.round(performance.now() - began);
        this.emit({ type: 'soak', reload: active.record.id, elapsed_ms: elapsed, soak_ms: soakMs, total_ms: Math.round(performance.now() - active.startedAt) });
      }, 1000),
    );
    if (orchestration.readiness.mode === 'exec') void this.probeDuringSoak(active);
  }

  /** Canary with an exec probe: keep probing while soaking; a failure rolls back. */
  private async probeDuringSoak(active: ActiveReload): Promise<void> {
    const next = this.candidate!;
    const cfg = active.config.orchestration.readiness;
    while (this.active === active && this.fsm.state === 'Soaking' && next.alive) {
      let ok: boolean;
      try {
        ok = await probeOnce(next, cfg, this.deps.reaper);
      } catch {
        ok = false;
      }
      if (this.active !== active || this.fsm.state !== 'Soaking') return;
      if (!ok && next.alive) {
        this.rollBack('rollback', 'readiness probe failed during soak', 'E_PROBE_FAILED');
        return;
      }
      await new Promise((r) => active.timers.push(setTimeout(r, cfg.intervalMs)));
    }
  }

  promote(): void {
    if (this.fsm.state !== 'Soaking') {
      throw new AeternaError('E_ILLEGAL_TRANSITION', `no canary soak is in progress (state ${this.fsm.state})`);
    }
    this.deps.log.info({ reload: this.active?.record.id }, 'operator promote');
    this.fire('promote');
    this.enterDraining();
  }

  rollback(): void {
    if (this.fsm.state !== 'Soaking') {
      throw new AeternaError('E_ILLEGAL_TRANSITION', `no canary soak is in progress (state ${this.fsm.state})`);
    }
    this.rollBack('rollback', 'operator rollback', 'E_OPERATOR_ROLLBACK');
  }

  /** Promotion: SIGTERM the old generation (SIGKILL after stop_timeout); the new one serves. */
  private enterDraining(): void {
    const active = this.active!;
    this.clearTimers(active);
    active.readiness?.cancel();
    this.phase('draining', this.serving ? `generation ${this.serving.number} (pid ${this.serving.pid})` : 'old generation already gone');
    const old = this.serving;
    // The new generation serves from now on; /readyz stays 200 through the drain.
    this.promoted = true;
    this.servingReady = true;
    this.deps.metrics.setGeneration(this.candidate!.number);
    if (old && old.alive) {
      void old.stop(active.previousConfig.service.stopTimeoutMs);
      const relay = this.deps.relay;
      if (relay) {
        const abort = new AbortController();
        const timeoutMs = active.config.orchestration.stateHandoff.timeoutMs;
        const timer = setTimeout(() => abort.abort(new Error('final sync timed out')), timeoutMs);
        relay.finalSync(old, this.candidate!, abort.signal, timeoutMs).then(
          ({ bytes }) => {
            clearTimeout(timer);
            this.deps.metrics.stateRelayed(bytes);
            this.deps.log.info({ reload: active.record.id, bytes }, 'final state sync relayed');
          },
          (err: Error) => {
            clearTimeout(timer);
            this.deps.log.warn({ reload: active.record.id, err: err.message }, `final state sync lost: changes made by the old generation after the first dump did not reach the new one (${err.message})`);
          },
        );
      }
    } else {
      this.finishDrain();
    }
  }

  /** The old generation is gone: the new one is the serving generation. */
  private finishDrain(): void {
    const active = this.active;
    const next = this.candidate!;
    this.serving = next;
    this.candidate = null;
    this.promoted = false;
    this.config = active?.config ?? this.config;
    this.budget.update(this.config.service.restart);
    for (const l of this.deps.listeners.releaseRetired()) this.deps.log.info({ listener: l.name }, 'listener closed');
    this.fire('drain-done'); // Running
    this.finish('promoted', null, null);
    if (!next.alive) this.handleCrash(next, next.exitInfo!); // died while the old one drained
  }

  /** Roll back: stop the new generation; the old one was never touched. */
  private rollBack(event: Event, reason: string, code: ErrorCode): void {
    const active = this.active!;
    active.failure = { reason, code, outcome: 'rolled_back' };
    this.deps.log.warn({ reload: active.record.id, code, reason }, `rolling back: ${reason}`);
    this.fire(event); // RollingBack
    this.clearTimers(active);
    active.readiness?.cancel();
    active.relayAbort.abort(new Error(reason));
    this.phase('rolling_back', reason);
    const next = this.candidate;
    if (next && next.alive) {
      void next.stop(active.config.service.stopTimeoutMs);
      this.deps.relay?.release(next);
    } else {
      this.finishRollback();
    }
  }

  private finishRollback(): void {
    const active = this.active!;
    this.candidate = null;
    this.config = active.previousConfig;
    try {
      // Listeners bound for the failed config are retired and closed; the old ones were never touched.
      this.deps.listeners.apply(this.config.service.listeners);
      this.deps.listeners.releaseRetired();
    } catch (err) {
      this.deps.log.error({ err }, 'restoring the listener set after a rollback failed');
    }
    this.fire('drain-done'); // Running
    const failure = active.failure ?? { reason: 'rolled back', code: 'E_CHILD_EXITED' as ErrorCode, outcome: 'rolled_back' as const };
    this.finish(failure.outcome, failure.reason, failure.code);
    const old = this.serving;
    if (old && !old.alive) this.handleCrash(old, old.exitInfo!); // the old one died meanwhile
  }

  private clearTimers(active: ActiveReload): void {
    for (const t of active.timers) clearTimeout(t);
    active.timers = [];
  }

  private phase(phase: ReloadPhase, detail?: string): void {
    const active = this.active;
    if (!active) return;
    const at = new Date().toISOString();
    active.record.phases.push(detail === undefined ? { phase, at } : { phase, at, detail });
    this.deps.log.info({ reload: active.record.id, phase, detail }, `${active.record.id} ${phase}${detail ? `: ${detail}` : ''}`);
    this.emit({ type: 'phase', reload: active.record.id, phase, at, elapsed_ms: Math.round(performance.now() - active.startedAt), ...(detail === undefined ? {} : { detail }) });
  }

  private emit(event: ReloadEvent): void {
    for (const l of this.active?.listeners ?? []) {
      try {
        l(event);
      } catch (err) {
        this.deps.log.warn({ err }, 'reload event listener failed');
      }
    }
  }

  /** The reload's outcome is final: record it, count it, tell whoever waits. */
  private finish(outcome: ReloadRecord['outcome'], reason: string | null, code: ErrorCode | null): void {
    const active = this.active;
    if (!active) return;
    this.clearTimers(active);
    const record = active.record;
    record.outcome = outcome;
    record.reason = reason;
    record.code = code;
    record.duration_ms = Math.round(performance.now() - active.startedAt);
    this.phase('done', outcome);
    this.deps.metrics.reloadFinished(record.strategy, outcome, record.duration_ms / 1000);
    const fields = { reload: record.id, outcome, reason, code, duration_ms: record.duration_ms, generation: this.serving?.number };
    if (outcome === 'promoted') this.deps.log.info(fields, `${record.id} promoted generation ${record.to_generation}`);
    else this.deps.log.warn(fields, `${record.id} ${outcome}: ${reason}`);
    this.emit({ type: 'outcome', reload: record.id, record });
    this.lastReload = record;
    this.active = null;
    active.resolve(record);
  }

  // ---- stop --------------------------------------------------------------------------------

  /** Graceful stop: every live generation gets SIGTERM, then SIGKILL after stop_timeout. A second request kills at once. */
  stop(reason: string): void {
    this.stopRequests++;
    if (this.fsm.state === 'Stopped') return;
    if (this.fsm.state !== 'Stopping') {
      this.deps.log.info({ reason, stop_timeout_ms: this.config.service.stopTimeoutMs }, `stopping: ${reason}`);
      this.fire('stop');
      if (this.restartTimer) clearTimeout(this.restartTimer);
      this.startupWatch?.cancel();
      const active = this.active;
      if (active) {
        active.readiness?.cancel();
        active.relayAbort.abort(new Error('Aeterna is stopping'));
        this.finish('failed', `Aeterna was stopped during the reload (${reason})`, 'E_STOPPED');
      }
      for (const gen of this.live()) {
        void gen.stop(this.config.service.stopTimeoutMs);
        this.deps.relay?.release(gen);
      }
    } else if (this.stopRequests > 1) {
      this.deps.log.warn({ reason }, 'second stop request: killing every generation now');
      this.fire('stop');
      for (const gen of this.live()) void gen.kill();
    }
    this.checkStopped();
  }

  private live(): Generation[] {
    return [this.serving, this.candidate].filter((g): g is Generation => g !== null && g.alive);
  }

  private checkStopped(): void {
    if (this.fsm.state !== 'Stopping' || this.live().length > 0) return;
    this.fire('drain-done'); // Stopped
    // Once the old generation is draining, the new one is the serving one, though `serving` moves only at drain-done.
    const servingNow = this.promoted && this.candidate ? this.candidate : this.serving;
    const last = servingNow?.exitInfo ?? this.lastExit;
    const code = this.exitCode ?? (last ? exitCodeOf(last) : 0);
    this.resolveStopped(code);
  }

  /** Pass a signal on to the serving generation's root process (SIGUSR1 and the like). */
  forward(signal: NodeJS.Signals): void {
    this.deps.log.debug({ signal, child: this.serving?.pid }, 'forwarding signal');
    this.serving?.signal(signal);
  }

  // ---- status ------------------------------------------------------------------------------

  status(): StatusReport {
    const info = (g: Generation | null, ready: boolean): GenerationInfo | null =>
      g && g.alive ? { generation: g.number, pid: g.pid, started_at: g.startedAt.toISOString(), ready } : null;
    const reloading = this.candidate !== null;
    return {
      state: this.fsm.state,
      service: this.config.service.name,
      strategy: this.active?.record.strategy ?? this.config.orchestration.strategy, // a reload runs with its own config's
      generation: this.serving?.number ?? 0,
      pid: this.serving?.alive ? this.serving.pid : null,
      daemon_pid: process.pid,
      uptime_ms: Date.now() - this.startedAt.getTime(),
      started_at: this.startedAt.toISOString(),
      listeners: this.deps.listeners.list().map((l) => ({ name: l.name, address: l.address, fd: l.fd })),
      previous: reloading ? info(this.serving, this.fsm.state !== 'Draining') : null,
      candidate: reloading ? info(this.candidate, this.active?.ready ?? false) : null,
      restarts: this.restarts,
      last_reload: this.active?.record ?? this.lastReload,
    };
  }
}

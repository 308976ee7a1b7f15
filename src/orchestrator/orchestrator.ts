// The Brain: drives the state machine (fsm.ts) with real processes. It starts
// and restarts the serving generation, runs reloads (Handover -> Draining for
// immediate, Handover -> Soaking -> Draining for canary, or RollingBack), and
// stops everything on request. Every decision about when a process may die is
// made here; the FSM's table is the authority on which event is legal when, and
// the FSM state is the one truth about where a reload is: no flag repeats it.
//
// The generations, by role:
// - `serving`: the generation that serves. At promotion it becomes the new one.
// - `candidate`: a reload's new generation, before promotion (Handover, Soaking, RollingBack).
// - `draining`: after promotion, the old generation being stopped while the promotion settles (Draining).
// - `retiring`: old generations of promoted reloads, still draining in the background once their reload is over
//   (retiring.ts): their exit is no crash, and a reload kills the oldest ones to stay within max_generations.
//
// A generation runs service.instances processes, its instances (instance-set.ts): `serving`, `candidate` and
// `draining` are each an InstanceSet. A reload starts the new set (orchestration.max_surge instances at a time for
// an immediate reload; the whole set for a canary), relays the state of old instance i to new instance i, and rolls
// back as a whole. Between reloads, an instance that exits is restarted alone (service.restart counts per instance)
// while the others serve; with one instance that is the restart of the generation, as it always was.
//
// Beside this file: the state relay's part of a reload (reload-relay.ts), the listeners and canary split of a reload
// (reload-sockets.ts), instance crashes and restarts between reloads (instance-restarts.ts), the run of one reload, its
// record and events (reload-run.ts), and the status report (status-report.ts).
//
// Invariants:
// - A failed reload never touches `serving`: its process, its memory and the
//   listeners it uses are left as they were.
// - Listeners are never closed during a reload; one dropped from the config is
//   closed only once no generation uses it.
import { AeternaError, type ErrorCode } from '../errors';
import type { CanaryConfig, Config } from '../config/types';
import { formatDuration } from '../config/duration';
import type { Logger } from '../log';
import type { Metrics } from '../monitor/metrics';
import type { ExitInfo } from '../native/binding';
import type { Listener, ListenerSet } from '../resources/listeners';
import type { PassedFd } from '../app-env';
import type { ListenerWatch } from '../resources/listener-watch';
import type { NotifyMessage, NotifySocket } from '../resources/notify';
import type { FdStore } from '../resources/fd-store';
import type { Generation, SpawnSpec } from '../supervisor/generation';
import { describeExit, exitCodeOf, exitRecord } from '../supervisor/exit';
import type { Reaper } from '../supervisor/reaper';
import { IllegalTransitionError, StateMachine, type Event, type State } from './fsm';
import { NotifyReadiness, ReadinessWatch, probeOnce, type ReadinessSource } from './readiness';
import type { RelayRole, StateRelay } from './relay';
import { ReloadRelay } from './reload-relay';
import { ReloadSockets } from './reload-sockets';
import { InstanceRestarts, type StartRecord } from './instance-restarts';
import { RetiringGenerations } from './retiring';
import { AppNotices } from './app-notices';
import { InstanceSet, instanceName } from './instance-set';
import { newReloadRun, publish, recordPhase, type CanarySplit, type ReloadRun } from './reload-run';
import { Watchdog } from './watchdog';
import { instancesOf, statusReport, type StatusView } from './status-report';
import type {
  CarriedCounters,
  CarriedGeneration,
  ControlApi,
  GenerationUsage,
  OperatorEvent,
  ReloadEvent,
  ReloadPhase,
  ReloadRecord,
  ReloadTrigger,
  Signalled,
  StatusReport,
} from './types';

export interface OrchestratorDeps {
  log: Logger;
  metrics: Metrics;
  reaper: Reaper;
  listeners: ListenerSet;
  /** Repairs listeners an app broke; checked before every spawn. */
  listenerWatch: ListenerWatch;
  notify: NotifySocket;
  /** systemd's fd store: what the app parked with FDSTORE=1, passed to every later generation. */
  fdStore: FdStore;
  /** Re-reads and validates the config file at each reload (throws ConfigError). */
  loadConfig: (file: string) => Config;
  /** The state relay, when state_handoff is enabled. */
  relay: StateRelay | null;
  /**
   * Start instance `instance` of generation `number` with `fds` at 3, 4, ... and `env` added to its environment
   * (Generation.spawn, in its cgroup where the machine allows it). Throws E_SPAWN_FAILED.
   */
  spawn: (
    number: number,
    spec: SpawnSpec,
    fds: readonly PassedFd[],
    env: Record<string, string>,
    instance: number,
  ) => Generation;
  /** Open a weighted canary split of `listeners` (WeightedSplit.open). Throws E_CANARY_UNSUPPORTED or E_LISTEN_FAILED. */
  split: (listeners: readonly Listener[], canary: CanaryConfig) => CanarySplit;
  /** Whether process `pid` is `root` or one of its descendants (proctree.belongsTo, which reads /proc). */
  belongsTo: (pid: number, root: number) => boolean;
  /** What a generation uses now: memory and CPU (monitor/app-resources.ts). */
  resourcesOf?: (gen: Generation) => Omit<GenerationUsage, 'generation' | 'pid' | 'role'>;
  /** Every operator event as it happens (`aeterna events`, control/events.ts). */
  onEvent?: (event: OperatorEvent) => void;
  /** The last lines generation `number` wrote to stderr, or null when Aeterna does not read them (monitor/app-output.ts). */
  stderrTail?: (number: number, instance?: number) => string[] | null;
  /** Told when a reload's outcome is final, with the config now in effect (the file watch queues on it). */
  reloadSettled?: (record: ReloadRecord, config: Config) => void;
}

export type { CanarySplit } from './reload-run';

/** orchestration.max_generations when a config does not have it: a handover from an Aeterna before it carries none. */
const DEFAULT_MAX_GENERATIONS = 3;

/** States in which a generation serves (/readyz is 200 while it is alive). */
const SERVING_STATES: readonly State[] = ['Running', 'Handover', 'Soaking', 'Draining', 'RollingBack'];

export class Orchestrator implements ControlApi {
  readonly fsm = new StateMachine();
  private config: Config;
  private serving: InstanceSet | null = null;
  private candidate: InstanceSet | null = null;
  private draining: InstanceSet | null = null;
  /** When `draining` got SIGTERM and its SIGKILL deadline (set once it got it: a weighted split first drains its queue). */
  private drainStop: { since: Date; deadline: Date } | null = null;
  /** Old generations of promoted reloads still draining. */
  private readonly retiring: RetiringGenerations;
  /** Told when what carry() returns may have changed without a state transition (a retiring generation exited). */
  private readonly carryListeners: Array<() => void> = [];
  /** The reload in flight, from its request to its outcome. */
  private inFlight: ReloadRun | null = null;
  /** The state relay's part of each reload: the relay at Handover, the final sync at promotion. */
  private readonly reloadRelay: ReloadRelay;
  /** Serving instances that exit between reloads: restarted after their backoff (service.restart), or Aeterna stops. */
  private readonly restarts: InstanceRestarts;
  /** The listeners a reload binds, restores or releases, and its canary split. */
  private readonly sockets: ReloadSockets;
  private readonly readinessSources: ReadinessSource[];
  /** The readiness watch of each serving instance not yet ready (at start, or restarted alone). */
  private readonly startupWatches = new Map<Generation, ReadinessWatch>();
  /** Instances that said they are ready (status, and when Starting ends). */
  private readonly readyInstances = new WeakSet<Generation>();
  /** STATUS= and the other sd_notify fields beyond readiness, watchdog and fd store. */
  private readonly notices: AppNotices;
  /** Instances Aeterna stopped because they never became ready at start: their exit is a failure, whatever its code. */
  private readonly neverReady = new WeakSet<Generation>();
  /** The watchdog of each generation with service.watchdog (its deadlines run once it is ready), until it exits or drains. */
  private readonly watchdogs = new Map<Generation, Watchdog>();
  /** Generations the watchdog fired on: their exit is a failure, whatever its code. */
  private readonly watchdogFired = new WeakSet<Generation>();
  /** Old instances a rolled back rolling reload had stopped: started again when they have exited. */
  private readonly restartOnExit = new WeakSet<Generation>();
  private generations = 0;
  private reloads = 0;
  private lastReload: ReloadRecord | null = null;
  private startedAt = new Date();
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
    this.stopped = new Promise((resolve) => (this.resolveStopped = resolve));
    this.retiring = new RetiringGenerations(deps.log, deps.metrics);
    this.reloadRelay = new ReloadRelay({
      relay: deps.relay,
      log: deps.log,
      metrics: deps.metrics,
      serving: () => this.serving,
      candidate: () => this.candidate,
      draining: () => this.draining,
      stillCurrent: (run, state) => this.stillCurrent(run, state),
      fire: (event) => this.fire(event),
      phase: (phase, detail) => this.phase(phase, detail),
      emit: (event) => this.emit(event),
      rollBack: (event, reason, code) => this.rollBack(event, reason, code),
      promoteWhenDone: (run) => this.promoteWhenDone(run),
    });
    this.sockets = new ReloadSockets({
      listeners: deps.listeners,
      split: deps.split,
      log: deps.log,
      metrics: deps.metrics,
      retiringCount: () => this.retiring.count,
      current: (run) => this.inFlight === run,
    });
    this.restarts = new InstanceRestarts({
      log: deps.log,
      metrics: deps.metrics,
      onEvent: deps.onEvent,
      stderrTail: deps.stderrTail,
      serving: () => this.serving,
      state: () => this.fsm.state,
      policy: () => this.config.service.restart,
      fire: (event) => this.fire(event),
      exited: (gen, info) => this.endStart(gen, info),
      startServing: () => this.startServing(),
      spawnAlone: (set, instance) =>
        this.spawnInstances(set, this.config, () => 'fresh', this.deps.listeners.list(), [instance])[0],
      watchStart: (gen) => this.watchStart(gen),
      exit: (code, reason) => {
        this.exitCode = code;
        this.stop(reason);
      },
    });
    // Every channel on which a generation can say it is ready, each watched the same way.
    this.readinessSources = [new NotifyReadiness(deps.notify, deps.log), ...(deps.relay ? [deps.relay] : [])];
    deps.notify.on('message', (m) => this.storeFds(m));
    deps.metrics.watchInstances(() => (this.serving ? instancesOf(this.statusView(), this.serving) : []));
    this.notices = new AppNotices(
      deps.notify,
      deps.log,
      () => this.liveGenerations(),
      (gen, ms) => gen.extendStop(ms),
    );
    this.fsm.onTransition((t) => {
      deps.metrics.setState(t.to);
      const level = t.from === t.to ? 'debug' : 'info';
      deps.log[level](
        { from: t.from, to: t.to, event: t.event, generation: this.serving?.number, reload: this.inFlight?.record.id },
        `state ${t.from} -> ${t.to} (${t.event})`,
      );
    });
  }

  // ---- lifecycle ---------------------------------------------------------------------------

  /** Start generation 1; resolves with Aeterna's exit code once everything has stopped. */
  run(): Promise<number> {
    this.fire('start');
    this.startServing();
    return this.stopped;
  }

  /**
   * What an upgrade or a recovery carries (upgrade/carried.ts): the serving generation, the old generations of
   * promoted reloads still draining (the next Aeterna keeps their SIGKILL deadlines), and the counters. Only while
   * Running (no reload, no restart pending): otherwise it throws E_RELOAD_BUSY or E_ILLEGAL_TRANSITION.
   */
  carry(): { fds: never[]; part: { generations: CarriedGeneration[]; counters: CarriedCounters } } {
    const restarting = this.restarts.pending + this.startupWatches.size;
    if (this.inFlight === null && this.fsm.state === 'Running' && restarting > 0) {
      throw new AeternaError(
        'E_RELOAD_BUSY',
        `cannot upgrade now: ${restarting} instance(s) of generation ${this.serving?.number} are restarting; try again once every instance is ready (aeterna status lists them)`,
      );
    }
    if (this.inFlight !== null || this.fsm.state !== 'Running' || this.serving === null || !this.serving.alive) {
      const code = this.inFlight !== null ? 'E_RELOAD_BUSY' : 'E_ILLEGAL_TRANSITION';
      throw new AeternaError(
        code,
        `cannot upgrade now: ${this.inFlight !== null ? `${this.inFlight.record.id} is in progress` : `the state is ${this.fsm.state}`}; ` +
          `try again once it is Running`,
      );
    }
    const counters = {
      reloads: this.reloads,
      restarts: this.restarts.total,
      generations: this.generations,
      last_reload: this.lastReload,
      started_at: this.startedAt.toISOString(),
    };
    // One entry per instance: the next Aeterna adopts them as one generation's set.
    const generations = this.serving.live.map((s): CarriedGeneration => ({
      number: s.number,
      pid: s.pid,
      pgid: s.pid,
      state: 'serving',
      started_at: s.startedAt.toISOString(),
      cgroup: s.cgroup?.dir ?? null,
      ...(this.serving!.size > 1 ? { instance: this.serving!.indexOf(s) } : {}),
    }));
    const retiring = this.retiring.alive().map(({ gen, since, deadline }): CarriedGeneration => ({
      number: gen.number,
      pid: gen.pid,
      pgid: gen.pid,
      state: 'retiring',
      started_at: gen.startedAt.toISOString(),
      cgroup: gen.cgroup?.dir ?? null,
      ...(gen.instance ? { instance: gen.instance } : {}),
      draining_since: since.toISOString(),
      kill_deadline: deadline.toISOString(),
    }));
    return { fds: [], part: { generations: [...generations, ...retiring], counters } };
  }

  /** Calls `listener` when what carry() returns may have changed without a state transition (upgrade/carried.ts). */
  onCarryChanged(listener: () => void): void {
    this.carryListeners.push(listener);
  }

  /**
   * A re-executed Aeterna goes on where the old one was: `serving` (one generation's instances, by instance number)
   * runs and is ready; `retiring` (old generations' processes) drain on, each SIGKILLed at the deadline the previous
   * Aeterna set. Resolves as run().
   */
  adopt(
    serving: Generation | Generation[],
    counters: CarriedCounters,
    retiring: ReadonlyArray<{ gen: Generation; since: Date; deadline: Date }> = [],
  ): Promise<number> {
    const instances = Array.isArray(serving) ? serving : [serving];
    this.reloads = counters.reloads;
    this.restarts.total = counters.restarts;
    this.generations = counters.generations;
    this.lastReload = counters.last_reload;
    this.startedAt = new Date(counters.started_at);
    this.fire('start');
    const set = new InstanceSet(instances[0].number, Math.max(instances.length, this.instanceCount(this.config)));
    instances.forEach((gen, i) => {
      set.put(gen.instance ?? i, gen);
      this.track(gen, this.config, 'fresh');
      this.readyInstances.add(gen);
    });
    this.serving = set;
    this.deps.metrics.setGeneration(set.number);
    this.fire('ready'); // Running
    for (const gen of instances) this.watchdogs.get(gen)?.start();
    for (const r of retiring) {
      this.retiring.add(r.gen, r.since, r.deadline);
      void r.gen.resumeStop(r.deadline);
      void r.gen.exited.then((info) => this.onExit(r.gen, info));
    }
    return this.stopped;
  }

  /** The running config's service.stop_timeout: Aeterna's leftover processes get as long at exit. */
  get stopTimeoutMs(): number {
    return this.config.service.stopTimeoutMs;
  }

  /** Whether a generation is serving and ready (GET /readyz): at least one of its instances. */
  isReady(): boolean {
    return (
      SERVING_STATES.includes(this.fsm.state) &&
      this.serving !== null &&
      this.serving.live.some((g) => this.readyInstances.has(g))
    );
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

  /**
   * Whether a callback of `run` (a timer, the relay, a readiness watch) still applies: its reload is the
   * current one and in `state`. Late callbacks of a finished or superseded reload end here, in one place.
   */
  private stillCurrent(run: ReloadRun, state: State): boolean {
    return this.inFlight === run && this.fsm.state === state;
  }

  private readiness(gen: Generation, config: Config): ReadinessWatch {
    return new ReadinessWatch(gen, config.orchestration.readiness, {
      sources: this.readinessSources,
      reaper: this.deps.reaper,
      log: this.deps.log,
    });
  }

  /** service.instances of `config`. */
  private instanceCount(config: Config): number {
    return config.service.instances ?? 1;
  }

  private extraEnv(gen: number): Record<string, string> {
    const env: Record<string, string> = { NOTIFY_SOCKET: this.deps.notify.address, AETERNA_GENERATION: String(gen) };
    if (this.deps.relay) env.LIVERELAY_STATE_SOCK = this.deps.relay.socketPath;
    return env;
  }

  /**
   * Start the instances `instances` of `set` (all of them when left out), each attached to the relay as `role(i)`.
   * All or none: when one cannot be started, those started here are killed and it throws E_SPAWN_FAILED.
   */
  private spawnInstances(
    set: InstanceSet,
    config: Config,
    role: (instance: number) => RelayRole,
    listeners: readonly Listener[] = this.deps.listeners.list(),
    instances: readonly number[] = [...Array(set.size).keys()],
  ): Generation[] {
    const number = set.number;
    this.deps.listenerWatch.check(`spawn of generation ${number}`, true); // the new generation gets listening sockets
    this.deps.notify.grant(config.service);
    const started: Generation[] = [];
    try {
      for (const i of instances) {
        // The fd store's fds (instance i's own) come after the listeners, as systemd passes them.
        const fds = [...listeners, ...this.deps.fdStore.list(i)];
        const gen = this.deps.spawn(number, config.service, fds, this.extraEnv(number), i);
        const instance = set.size > 1 ? { instance: i } : {};
        this.deps.log.info(
          { generation: number, ...instance, child: gen.pid, command: config.service.command },
          set.size > 1 ? `generation ${number} instance ${i} started` : 'generation started',
        );
        set.put(i, gen);
        started.push(gen);
        this.track(gen, config, role(i));
      }
    } catch (err) {
      for (const gen of started) {
        this.deps.relay?.release(gen);
        void gen.kill();
      }
      throw err;
    }
    return started;
  }

  /** A new generation of `config`'s service.instances, none started yet. */
  private newSet(config: Config): InstanceSet {
    return new InstanceSet(++this.generations, this.instanceCount(config));
  }

  /** "generation 3" with one instance, "generation 3 instance 1" with more: how logs and reasons name an instance. */
  private nameOf(gen: Generation, set: InstanceSet | null = this.setOf(gen)): string {
    return instanceName(gen, set);
  }

  /** The set `gen` is a current instance of (serving, candidate or draining), or null. */
  private setOf(gen: Generation): InstanceSet | null {
    return [this.serving, this.candidate, this.draining].find((s) => s?.has(gen)) ?? null;
  }

  /** A generation Aeterna now runs (spawned, or adopted after a re-exec): its relay, its exit, its watchdog. */
  private track(gen: Generation, config: Config, role: RelayRole): void {
    this.deps.relay?.attach(gen, role);
    void gen.exited.then((info) => this.onExit(gen, info));
    const watchdogMs = config.service.watchdogMs;
    if (watchdogMs !== null)
      this.watchdogs.set(
        gen,
        new Watchdog(gen, watchdogMs, this.deps.notify, this.deps.log, (why) => this.watchdogTimeout(gen, config, why)),
      );
  }

  /** FDSTORE=1 / FDSTOREREMOVE=1: only from the processes of a generation Aeterna runs (as READY=1); a stranger's fds are closed. */
  private storeFds(m: NotifyMessage): void {
    if (m.fields.get('FDSTORE') !== '1' && m.fields.get('FDSTOREREMOVE') !== '1') return;
    const gen = this.liveGenerations().find((g) => this.deps.belongsTo(m.pid, g.pid));
    if (gen === undefined) return this.deps.fdStore.refuseStranger(m.pid);
    // Instance i's store goes to later processes of instance i: none beyond the instance counts still to come.
    const count = Math.max(
      this.instanceCount(this.config),
      this.inFlight ? this.instanceCount(this.inFlight.config) : 0,
    );
    if (gen.instance >= count) return this.deps.fdStore.refuseBeyond(m.pid, gen.instance, count);
    this.deps.fdStore.handle(m, this.config.service.fdstoreMax, gen.number, gen.instance);
  }

  private stopWatchdog(gen: Generation | null): void {
    if (gen === null) return;
    this.watchdogs.get(gen)?.stop();
    this.watchdogs.delete(gen);
  }

  /** The watchdog fired: SIGABRT (so the app can dump core), SIGKILL after stop_timeout; its exit counts as a crash. */
  private watchdogTimeout(gen: Generation, config: Config, why: string): void {
    this.watchdogs.delete(gen);
    if (!gen.alive || this.fsm.state === 'Stopping') return;
    this.watchdogFired.add(gen);
    this.deps.metrics.watchdogTimedOut();
    this.deps.log.error(
      {
        generation: gen.number,
        ...this.instanceField(gen),
        child: gen.pid,
        code: 'E_WATCHDOG',
        stop_timeout_ms: config.service.stopTimeoutMs,
      },
      `watchdog: ${this.nameOf(gen)} (pid ${gen.pid}) timed out: ${why}; sending SIGABRT, SIGKILL after ${formatDuration(config.service.stopTimeoutMs)}`,
    );
    void gen.stop(config.service.stopTimeoutMs, 'SIGABRT');
  }

  /** Starting: spawn the serving generation (each of its instances) and wait for every one to be ready. */
  private startServing(): void {
    // A generation started here has no live predecessor to dump: attached 'fresh', the relay offers each instance
    // the latest checkpoint as its initial load (SrpCoordinator.sendCheckpoint, docs/srp.md "Checkpoints").
    const set = this.newSet(this.config);
    try {
      this.spawnInstances(set, this.config, () => 'fresh');
    } catch (err) {
      const e = err as AeternaError;
      const errno = (e.cause as NodeJS.ErrnoException | undefined)?.code;
      this.deps.log.error({ err, code: e.code }, e.message);
      // A command that cannot be executed will not start on a retry either: stop, as a shell would report it.
      this.exitCode = errno === 'EACCES' ? 126 : 127;
      this.stop('the app could not be started');
      return;
    }
    this.serving = set;
    for (const gen of set.all) this.watchStart(gen);
  }

  /**
   * Wait for a serving instance with no predecessor (at start, or restarted alone) to be ready: then its watchdog
   * runs, and once every instance is ready Starting ends. One not ready in time is stopped; its exit goes through
   * service.restart as a failure.
   */
  private watchStart(gen: Generation): void {
    const watch = this.readiness(gen, this.config);
    this.startupWatches.set(gen, watch);
    const current = (): boolean => {
      if (this.startupWatches.get(gen) !== watch) return false;
      this.startupWatches.delete(gen);
      return this.serving?.has(gen) === true && gen.alive && this.fsm.state !== 'Stopping';
    };
    watch.ready.then(
      () => {
        if (!current()) return;
        this.deps.relay?.startOutcome(gen, true);
        this.readyInstances.add(gen);
        this.watchdogs.get(gen)?.start(); // with service.watchdog, it must ping from now on
        const serving = this.serving!;
        if (this.fsm.state === 'Starting' && this.allReady(serving)) {
          this.deps.metrics.setGeneration(serving.number);
          this.fire('ready'); // Running
        }
      },
      (err: AeternaError) => {
        if (!current()) return;
        this.deps.log.error(
          { generation: gen.number, ...this.instanceField(gen), child: gen.pid, code: err.code },
          `stopping ${this.nameOf(gen)}, then service.restart decides: ${err.message}`,
        );
        if (this.fsm.state === 'Starting') this.fire('ready-timeout');
        this.neverReady.add(gen);
        void gen.stop(this.config.service.stopTimeoutMs); // its exit goes through the restart policy, as a failure
      },
    );
  }

  private cancelStartWatch(gen: Generation): void {
    this.startupWatches.get(gen)?.cancel();
    this.startupWatches.delete(gen);
  }

  /** Whether every instance of `set` is started, alive and ready. */
  private allReady(set: InstanceSet): boolean {
    return set.all.length === set.size && set.all.every((g) => g.alive && this.readyInstances.has(g));
  }

  /** `{ instance: i }` for the log fields of an instance of a set of more than one, else nothing. */
  private instanceField(gen: Generation): { instance?: number } {
    const set = this.setOf(gen);
    return set !== null && set.size > 1 ? { instance: set.indexOf(gen) } : {};
  }

  /**
   * Serving instance `gen` exited and goes through service.restart (InstanceRestarts.handleCrash): Aeterna exits
   * with its exit from now on, and its start is over. How its start went decides what its exit counts as.
   */
  private endStart(gen: Generation, info: ExitInfo): StartRecord {
    this.lastExit = info;
    this.cancelStartWatch(gen);
    const ready = this.readyInstances.has(gen);
    // Died before it was ready: the checkpoint it was offered, if any, counts one failed load.
    if (!ready) this.deps.relay?.startOutcome(gen, false);
    const watchdog = this.watchdogFired.has(gen);
    return { ready, failed: this.neverReady.has(gen) || watchdog, watchdog };
  }

  private onExit(gen: Generation, info: ExitInfo): void {
    const state = this.fsm.state;
    const how = describeExit(info);
    this.stopWatchdog(gen);
    const drainedMs = this.retiring.drainedMs(gen);
    const set = this.setOf(gen);
    this.deps.log.info(
      {
        generation: gen.number,
        ...this.instanceField(gen),
        child: gen.pid,
        exit_code: exitCodeOf(info),
        ...(drainedMs === null ? {} : { retiring: true, drained_ms: drainedMs }),
      },
      `${set !== null ? this.nameOf(gen, set) : `generation ${gen.number}`} ${how}`,
    );
    if (drainedMs !== null) return this.retired(gen);
    if (state === 'Stopping') return this.checkStopped();
    const run = this.inFlight;
    if (run !== null && run.replaced.has(gen)) return; // a rolling reload stopped it: awaited in rollOn
    if (this.restartOnExit.has(gen) && set !== null && set === this.serving)
      return this.restarts.restartInstance(set, set.indexOf(gen), 'started again: its reload was rolled back');
    if (set !== null && set === this.serving) {
      this.lastExit = info;
      if (state === 'Starting' || state === 'Running') return this.restarts.handleCrash(gen, info);
      if (state === 'Draining') {
        this.fire('exited'); // the new generation died while the old one drains: restarted once the drain is done
        return;
      }
      // Handover, Soaking, RollingBack: the old generation died on its own (all of its instances).
      if (set.alive) {
        this.deps.log.warn(
          { generation: gen.number, ...this.instanceField(gen), reload: run?.record.id },
          `${this.nameOf(gen, set)} exited during the reload: the other instances serve on; it is restarted if the reload is rolled back`,
        );
        return;
      }
      this.fire('old-exited');
      if (this.fsm.state === 'Draining') this.enterDraining(); // it was soaking: the new one serves now
      return;
    }
    if (set !== null && set === this.draining) {
      if (!set.alive) this.finishDrain(); // gone before the promotion settled
      return;
    }
    if (set !== null && set === this.candidate) {
      // How it ended, for the reload's record: the first instance to exit (the others may be stopped because of it).
      if (run !== null && !run.record.exit) {
        run.record.exit = exitRecord(info);
        run.failedInstance = set.indexOf(gen);
      }
      if (state === 'RollingBack') {
        if (!set.alive) this.finishRollback();
        return;
      }
      if (run === null) {
        // A candidate outliving its reload is a bookkeeping bug (seen once, under load, when SIGTERM met a
        // canary soak): never let it take PID 1 down; forget it and say so.
        this.deps.log.error(
          { generation: gen.number, state },
          `generation ${gen.number} exited as a candidate with no reload in flight`,
        );
        if (!set.alive) this.candidate = null;
        return this.checkStopped();
      }
      const when =
        state === 'Soaking'
          ? 'during soak'
          : this.deps.relay?.relaying(gen)
            ? 'during the state relay'
            : 'before becoming ready';
      const which = set.size > 1 ? `instance ${set.indexOf(gen)} ` : '';
      if (this.watchdogFired.has(gen))
        return this.rollBack('exited', `the watchdog fired and ${which}it was ${how} ${when}`, 'E_WATCHDOG');
      this.rollBack('exited', `${which}${how} ${when}`, 'E_CHILD_EXITED');
    }
  }

  // ---- reload: the steps of docs/architecture.md's sequence --------------------------------

  reload(trigger: ReloadTrigger, onEvent?: (event: ReloadEvent) => void): Promise<ReloadRecord> {
    if (this.inFlight)
      throw new AeternaError('E_RELOAD_BUSY', `a reload is already in progress (${this.inFlight.record.id})`);
    if (!this.fsm.can('reload'))
      throw new AeternaError('E_ILLEGAL_TRANSITION', `cannot reload while ${this.fsm.state}`);
    const { run, done } = this.beginReload(trigger, onEvent);
    if (this.rereadConfig(run) && this.bindNewListeners(run)) {
      this.fire('reload'); // Handover
      const max = run.config.orchestration.maxGenerations ?? DEFAULT_MAX_GENERATIONS;
      this.retiring.makeRoom(max, this.serving?.alive ? 1 : 0, run.record.id);
      this.spawnCandidate(run);
    }
    return done;
  }

  private beginReload(
    trigger: ReloadTrigger,
    onEvent?: (event: ReloadEvent) => void,
  ): { run: ReloadRun; done: Promise<ReloadRecord> } {
    const { run, done } = newReloadRun(
      `reload-${++this.reloads}`,
      trigger,
      this.config,
      this.serving?.number ?? 0,
      onEvent,
    );
    this.inFlight = run;
    this.phase('accepted', `trigger ${trigger}`);
    return { run, done };
  }

  /** 1. Re-read and validate the config: on error nothing changes. */
  private rereadConfig(run: ReloadRun): boolean {
    try {
      run.config = this.deps.loadConfig(this.config.file);
    } catch (err) {
      this.finish('failed', (err as Error).message, (err as AeternaError).code ?? 'E_CONFIG_INVALID');
      return false;
    }
    run.record.strategy = run.config.orchestration.strategy;
    this.phase('config', run.config.file);
    return true;
  }

  /** 2. Bind the listeners that are new in the config (all or nothing). */
  private bindNewListeners(run: ReloadRun): boolean {
    try {
      this.sockets.bindNew(run);
      return true;
    } catch (err) {
      this.sockets.restore(run.previousConfig, run.split);
      this.finish('failed', (err as Error).message, (err as AeternaError).code);
      return false;
    }
  }

  /**
   * 3. Start generation N+1 beside N, on the same sockets: all its instances at once, or for an immediate reload
   * with orchestration.max_surge, that many at a time (a rolling reload, see rollOn). A canary starts the whole set.
   */
  private spawnCandidate(run: ReloadRun): void {
    const next = this.newSet(run.config);
    const canary = run.config.orchestration.strategy === 'canary';
    const surge = canary ? next.size : Math.min(next.size, run.config.orchestration.maxSurge ?? next.size);
    const all = [...Array(next.size).keys()];
    run.batch = all.slice(0, surge);
    run.pending = all.slice(surge);
    this.candidate = next;
    run.record.to_generation = next.number;
    this.startBatch(run);
  }

  /** What the relay gives new instance `instance`: the state of old instance `instance`, the latest checkpoint where there is none, or nothing. */
  private roleOf(run: ReloadRun, instance: number): RelayRole {
    if (!this.reloadRelay.relays(run)) return 'stateless';
    return this.serving?.at(instance) !== undefined ? 'candidate' : 'fresh';
  }

  /** Start the instances of `run.batch`, then wait for their readiness and relay their state. */
  private startBatch(run: ReloadRun): void {
    const next = this.candidate!;
    let started: Generation[];
    try {
      // With state_handoff.enabled turned off in the config this reload read, it relays nothing: the new
      // generation still gets the relay's socket (a later reload may turn it on again), and an empty load.
      started = this.spawnInstances(
        next,
        run.config,
        (i) => this.roleOf(run, i),
        run.split?.candidateListeners(),
        run.batch,
      );
    } catch (err) {
      run.failure = { reason: (err as Error).message, code: 'E_SPAWN_FAILED', outcome: 'failed' };
      if (next.alive) return this.rollBack('spawn-failed', run.failure.reason, 'E_SPAWN_FAILED');
      this.fire('spawn-failed'); // RollingBack, with nothing to stop
      this.finishRollback();
      return;
    }
    run.record.new_pid = next.pid;
    this.phase(
      'spawned',
      next.size > 1
        ? `generation ${next.number} instance${started.length > 1 ? 's' : ''} ${run.batch.join(', ')} (pid ${started.map((g) => g.pid).join(', ')})`
        : `generation ${next.number} (pid ${started[0].pid})`,
    );
    run.awaiting = new Set(['ready', 'relay']);
    this.awaitReadiness(run, started);
    this.reloadRelay.relayState(run, started);
  }

  /** 4. Wait until the new instances say they are ready (or one's readiness times out: a rollback). */
  private awaitReadiness(run: ReloadRun, started: Generation[]): void {
    const next = this.candidate!;
    for (const gen of started) {
      const watch = this.readiness(gen, run.config);
      run.readiness.push(watch);
      const which = next.size > 1 ? `instance ${next.indexOf(gen)}: ` : '';
      watch.ready.then(
        () => {
          if (!this.stillCurrent(run, 'Handover')) return;
          if (this.roleOf(run, next.indexOf(gen)) === 'fresh') this.deps.relay?.startOutcome(gen, true);
          this.readyInstances.add(gen);
          this.watchdogs.get(gen)?.start();
          if (!run.batch.every((i) => this.readyInstances.has(next.at(i)!))) return;
          run.awaiting.delete('ready');
          this.promoteWhenDone(run);
        },
        (err: AeternaError) => {
          if (this.stillCurrent(run, 'Handover')) this.rollBack('ready-timeout', which + err.message, err.code);
        },
      );
    }
  }

  /** 6. Ready and relayed: the next batch of a rolling reload, or promote at once (immediate) or soak first (canary). */
  private promoteWhenDone(run: ReloadRun): void {
    if (run.awaiting.size > 0) return;
    if (run.pending.length > 0) return this.rollOn(run);
    const orchestration = run.config.orchestration;
    const immediate = orchestration.strategy === 'immediate';
    this.fire(immediate ? 'ready-immediate' : 'ready'); // Draining, or Soaking
    this.phase('ready');
    if (immediate) return this.enterDraining();
    const soakMs = orchestration.soakTimeMs;
    run.soakEndsAt = Date.now() + soakMs;
    if (run.split) this.sockets.steer(run.split, run.split.canary.weight);
    this.phase(
      'soaking',
      formatDuration(soakMs) +
        (run.split ? `, ${run.split.weight}% of new connections to generation ${this.candidate!.number}` : ''),
    );
    const began = performance.now();
    run.timers.push(
      setTimeout(() => {
        if (this.stillCurrent(run, 'Soaking') && this.fire('soak-elapsed')) this.enterDraining();
      }, soakMs),
      setInterval(() => {
        const elapsed = Math.round(performance.now() - began);
        this.emit({
          type: 'soak',
          reload: run.record.id,
          elapsed_ms: elapsed,
          soak_ms: soakMs,
          total_ms: Math.round(performance.now() - run.startedAt),
        });
      }, 1000),
    );
    if (orchestration.readiness.mode === 'exec') void this.probeDuringSoak(run, this.candidate!);
  }

  /**
   * A rolling reload's batch is ready and has its state: each old instance it replaces gets SIGTERM and its final
   * sync, and once those have exited the next batch starts. So at most max_surge instances more than one
   * generation's run at any time. The old ones stopped here are restarted if the reload is rolled back later.
   */
  private rollOn(run: ReloadRun): void {
    const old = this.serving;
    const next = this.candidate!;
    const stopMs = run.previousConfig.service.stopTimeoutMs;
    this.phase(
      'ready',
      `instance${run.batch.length > 1 ? 's' : ''} ${run.batch.join(', ')}: their old ones are stopped`,
    );
    const steps = run.batch.map(async (i) => {
      const o = old?.at(i);
      if (o === undefined || !o.alive) return;
      run.replaced.add(o);
      this.stopWatchdog(o);
      void o.stop(stopMs);
      const sync =
        this.reloadRelay.relays(run) && !run.fromCheckpoint.has(i)
          ? this.reloadRelay.finalSyncOne(run, o, next.at(i)!)
          : Promise.resolve();
      if (!this.reloadRelay.relays(run) || run.fromCheckpoint.has(i)) this.deps.relay?.release(o);
      await Promise.all([o.exited, sync]);
    });
    void Promise.all(steps).then(() => {
      if (!this.stillCurrent(run, 'Handover')) return;
      const surge = run.batch.length;
      run.batch = run.pending.splice(0, surge);
      this.startBatch(run);
    });
  }

  /** Canary with an exec probe: keep probing each new instance while soaking; a failure rolls back. */
  private async probeDuringSoak(run: ReloadRun, next: InstanceSet): Promise<void> {
    const cfg = run.config.orchestration.readiness;
    while (this.stillCurrent(run, 'Soaking') && next.alive) {
      let ok = true;
      for (const gen of next.live) {
        try {
          ok = await probeOnce(gen, cfg, this.deps.reaper);
        } catch {
          ok = false;
        }
        if (!ok) break;
      }
      if (!this.stillCurrent(run, 'Soaking')) return;
      if (!ok && next.alive) {
        this.rollBack('rollback', 'readiness probe failed during soak', 'E_PROBE_FAILED');
        return;
      }
      await new Promise((r) => run.timers.push(setTimeout(r, cfg.intervalMs)));
    }
  }

  promote(): void {
    if (!this.fsm.can('promote'))
      throw new AeternaError('E_ILLEGAL_TRANSITION', `no canary soak is in progress (state ${this.fsm.state})`);
    this.deps.log.info({ reload: this.inFlight?.record.id }, 'operator promote');
    this.fire('promote');
    this.enterDraining();
  }

  rollback(): void {
    if (!this.fsm.can('rollback'))
      throw new AeternaError('E_ILLEGAL_TRANSITION', `no canary soak is in progress (state ${this.fsm.state})`);
    this.rollBack('rollback', 'operator rollback', 'E_OPERATOR_ROLLBACK');
  }

  /**
   * Promotion: the new generation serves from now on; each old instance gets SIGTERM (SIGKILL after stop_timeout)
   * and its final sync to the new instance of its number. Once all are done the reload is over; the old instances
   * drain on as retiring ones.
   */
  private enterDraining(): void {
    const run = this.inFlight!;
    this.clearTimers(run);
    for (const w of run.readiness) w.cancel();
    const old = this.serving;
    const next = this.candidate!;
    this.serving = next;
    this.candidate = null;
    this.draining = old;
    // Restarts of old instances still pending are void: the new generation serves.
    this.restarts.cancelAlone();
    run.record.serving_since = new Date().toISOString();
    const live = old?.live ?? [];
    this.phase(
      'draining',
      live.length === 0
        ? 'old generation already gone'
        : `generation ${old!.number} (pid ${live.map((g) => g.pid).join(', ')})`,
    );
    for (const g of old?.all ?? []) this.stopWatchdog(g); // it is being stopped: a missed ping no longer matters
    this.deps.metrics.setGeneration(next.number);
    if (!old || !old.alive) return this.finishDrain();
    // An old one that could not dump is not asked again; with the relay off in this reload's config, none is; an
    // old instance with no new one of its number (service.instances shrank) has no one to give its changes to.
    const syncs = !this.reloadRelay.relays(run)
      ? []
      : live.flatMap((o) => {
          const i = old.indexOf(o);
          const n = next.at(i);
          return n !== undefined && n.alive && !run.fromCheckpoint.has(i) ? [[o, n] as const] : [];
        });
    const stopMs = run.previousConfig.service.stopTimeoutMs;
    const stopped = this.sockets.settleSplit(run, 'new').then(() => {
      if (old.alive && this.draining === old) {
        const since = new Date();
        this.drainStop = { since, deadline: new Date(since.getTime() + stopMs) };
        void old.stop(stopMs);
      }
      // End of file: no final dump will be asked of these (docs/srp.md, step 5).
      for (const o of live) if (!syncs.some(([x]) => x === o)) this.deps.relay?.release(o);
    });
    const synced = syncs.length > 0 ? this.reloadRelay.finalSync(run, syncs) : null;
    void Promise.all([stopped, synced]).then(() => {
      if (this.stillCurrent(run, 'Draining')) this.finishDrain();
    });
  }

  /**
   * The promotion settled: the old generation exited (`drain-done`), or it has its SIGTERM and its final sync is over
   * (`retire`): then it drains on in the background, and the reload ends now all the same.
   */
  private finishDrain(): void {
    const run = this.inFlight;
    const old = this.draining;
    const event = old !== null && old.alive ? 'retire' : 'drain-done';
    if (old !== null && old.alive) {
      const stop = this.drainStop ?? { since: new Date(), deadline: new Date() };
      for (const g of old.live) this.retiring.add(g, stop.since, stop.deadline);
    }
    this.draining = null;
    this.drainStop = null;
    this.config = run?.config ?? this.config;
    this.restarts.updatePolicy(this.config.service.restart);
    const dropped = this.deps.fdStore.keepInstances(this.instanceCount(this.config));
    if (dropped > 0)
      this.deps.log.info(
        { dropped, instances: this.instanceCount(this.config) },
        `fd store: closed ${dropped} fd(s) stored by instances beyond service.instances ${this.instanceCount(this.config)}`,
      );
    run?.split?.promote();
    this.sockets.releaseRetired();
    this.fire(event); // Running
    this.finish('promoted', null, null);
    this.restarts.reviveDead(); // an instance that died while the promotion settled
  }

  /** A retiring generation exited: it is forgotten (whatever its exit, no crash of the serving one, no restart). */
  private retired(gen: Generation): void {
    this.retiring.exited(gen);
    if (this.inFlight === null) this.sockets.releaseRetired(); // else when that reload ends
    for (const l of this.carryListeners) l();
    this.checkStopped();
  }

  /**
   * Roll back: stop the new generation (each of its instances). The old one was never touched, except the old
   * instances a rolling reload already replaced: those start again once the rollback is done.
   */
  private rollBack(event: Event, reason: string, code: ErrorCode): void {
    const run = this.inFlight!;
    run.failure = { reason, code, outcome: run.failure?.outcome ?? 'rolled_back' };
    this.deps.log.warn({ reload: run.record.id, code, reason }, `rolling back: ${reason}`);
    this.fire(event); // RollingBack
    this.clearTimers(run);
    for (const w of run.readiness) w.cancel();
    run.relayAbort.abort(new Error(reason));
    for (const a of run.checkpointAborts) a.abort(new Error(reason));
    this.phase('rolling_back', reason);
    const next = this.candidate;
    if (next && next.alive) {
      void this.sockets.settleSplit(run, 'old').then(() => {
        if (next.alive) void next.stop(run.config.service.stopTimeoutMs);
      });
      for (const g of next.live) this.deps.relay?.release(g);
    } else {
      this.finishRollback();
    }
  }

  private finishRollback(): void {
    const run = this.inFlight!;
    this.candidate = null;
    this.config = run.previousConfig;
    if (run.split) this.sockets.steer(run.split, 0);
    this.sockets.restore(this.config, run.split); // the old listeners were never touched
    this.fire('drain-done'); // Running
    const failure = run.failure ?? {
      reason: 'rolled back',
      code: 'E_CHILD_EXITED' as ErrorCode,
      outcome: 'rolled_back' as const,
    };
    this.finish(failure.outcome, failure.reason, failure.code);
    // The old instances a rolling reload replaced start again (no crash: no restart budget spent), once exited.
    const old = this.serving;
    for (const g of run.replaced) {
      if (old === null || !old.has(g)) continue;
      if (g.alive) this.restartOnExit.add(g);
      else this.restarts.restartInstance(old, old.indexOf(g), 'started again: its reload was rolled back');
    }
    this.restarts.reviveDead(); // an old instance died meanwhile
  }

  private clearTimers(run: ReloadRun): void {
    for (const t of run.timers) clearTimeout(t);
    run.timers = [];
  }

  /** The reload in flight reached `phase`: in its record, the log and its events. */
  private phase(phase: ReloadPhase, detail?: string): void {
    if (this.inFlight) recordPhase(this.inFlight, phase, detail, this.deps.log, this.deps.onEvent);
  }

  private emit(event: ReloadEvent): void {
    if (this.inFlight) publish(this.inFlight, event, this.deps.log, this.deps.onEvent);
  }

  /** The reload's outcome is final: record it, count it, tell whoever waits. */
  private finish(outcome: ReloadRecord['outcome'], reason: string | null, code: ErrorCode | null): void {
    const run = this.inFlight;
    if (!run) return;
    this.clearTimers(run);
    const record = run.record;
    record.outcome = outcome;
    record.reason = reason;
    record.code = code;
    record.duration_ms = Math.round(performance.now() - run.startedAt);
    record.retiring = this.retiring.info();
    if (outcome !== 'promoted' && record.to_generation !== null)
      record.stderr_tail = this.deps.stderrTail?.(record.to_generation, run.failedInstance ?? 0) ?? null;
    this.phase('done', outcome);
    this.deps.metrics.reloadFinished(record.strategy, outcome, record.duration_ms / 1000);
    const fields = {
      reload: record.id,
      outcome,
      reason,
      code,
      duration_ms: record.duration_ms,
      generation: this.serving?.number,
    };
    if (outcome === 'promoted') this.deps.log.info(fields, `${record.id} promoted generation ${record.to_generation}`);
    else this.deps.log.warn(fields, `${record.id} ${outcome}: ${reason}`);
    this.emit({ type: 'outcome', reload: record.id, record });
    this.lastReload = record;
    this.inFlight = null;
    run.resolve(record);
    this.deps.reloadSettled?.(record, this.config);
  }

  // ---- stop --------------------------------------------------------------------------------

  /** Graceful stop: every live generation gets SIGTERM, then SIGKILL after stop_timeout. A second request kills at once. */
  stop(reason: string): void {
    this.stopRequests++;
    if (this.fsm.state === 'Stopped') return;
    if (this.fsm.state !== 'Stopping') {
      this.deps.log.info({ reason, stop_timeout_ms: this.config.service.stopTimeoutMs }, `stopping: ${reason}`);
      this.fire('stop');
      this.restarts.clear();
      for (const gen of [...this.startupWatches.keys()]) this.cancelStartWatch(gen);
      const run = this.inFlight;
      if (run) {
        for (const w of run.readiness) w.cancel();
        run.relayAbort.abort(new Error('Aeterna is stopping'));
        for (const a of run.checkpointAborts) a.abort(new Error('Aeterna is stopping'));
        this.finish('failed', `Aeterna was stopped during the reload (${reason})`, 'E_STOPPED');
      }
      for (const gen of this.liveGenerations()) {
        this.stopWatchdog(gen);
        void gen.stop(this.config.service.stopTimeoutMs);
        this.deps.relay?.release(gen);
      }
    } else if (this.stopRequests > 1) {
      this.deps.log.warn({ reason }, 'second stop request: killing every generation now');
      this.fire('stop');
      for (const gen of this.liveGenerations()) void gen.kill();
    }
    this.checkStopped();
  }

  /** Every live process tree Aeterna runs: the instances of the serving, new and draining generations, and the retiring ones. */
  private liveGenerations(): Generation[] {
    return [
      ...(this.serving?.live ?? []),
      ...(this.candidate?.live ?? []),
      ...(this.draining?.live ?? []),
      ...this.retiring.generations().filter((g) => g.alive),
    ];
  }

  private checkStopped(): void {
    if (this.fsm.state !== 'Stopping' || this.liveGenerations().length > 0) return;
    this.fire('drain-done'); // Stopped
    const last = this.serving?.exitInfo ?? this.lastExit;
    const code = this.exitCode ?? (last ? exitCodeOf(last) : 0);
    this.resolveStopped(code);
  }

  /** Pass a signal on to the serving generation's root process (of each instance) (SIGUSR1 and the like). */
  forward(signal: NodeJS.Signals): void {
    this.deps.log.debug({ signal, child: this.serving?.pid }, 'forwarding signal');
    this.serving?.signal(signal);
  }

  /**
   * `aeterna signal`: pass a signal the app uses for itself to the serving generation's process group (`main`: its
   * root process only). Not to a candidate, nor to old generations still draining: they are on their way out.
   */
  signal(signal: NodeJS.Signals, main: boolean): Signalled {
    const gen = this.serving;
    const state = this.fsm.state;
    if (gen === null || !gen.alive || state === 'Starting' || state === 'Stopping' || state === 'Stopped')
      throw new AeternaError(
        'E_ILLEGAL_TRANSITION',
        `no generation serves (state ${state}${gen && !gen.alive ? `, generation ${gen.number} exited` : ''}): nothing to signal`,
      );
    this.deps.log.info(
      { signal, generation: gen.number, child: gen.pid, to: main ? 'main' : 'group' },
      `aeterna signal: ${signal} to generation ${gen.number} (${main ? `pid ${gen.pid}` : `process group ${gen.pid}`})`,
    );
    if (main) gen.signal(signal);
    else gen.signalGroup(signal);
    return { signal, generation: gen.number, pid: gen.pid, to: main ? 'main' : 'group' };
  }

  // ---- status ------------------------------------------------------------------------------

  status(): StatusReport {
    return statusReport(this.statusView());
  }

  /** What the status report reads, as it is now. */
  private statusView(): StatusView {
    return {
      state: this.fsm.state,
      config: this.config,
      serving: this.serving,
      candidate: this.candidate,
      draining: this.draining,
      inFlight: this.inFlight,
      startedAt: this.startedAt,
      lastReload: this.lastReload,
      restarts: this.restarts,
      retiring: this.retiring,
      notices: this.notices,
      listeners: this.deps.listeners,
      fdStore: this.deps.fdStore,
      relay: this.deps.relay,
      resourcesOf: this.deps.resourcesOf,
      isReady: (gen) => this.readyInstances.has(gen),
      liveGenerations: () => this.liveGenerations(),
    };
  }
}

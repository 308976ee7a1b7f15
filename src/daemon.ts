// `aeterna start`: the PID-1 daemon. It wires the pieces together: the reaper,
// the listeners Aeterna owns, its own sockets (own-sockets.ts: control, metrics,
// sd_notify, state relay), the fd store, the orchestrator and the signal handlers;
// then it runs until everything has stopped and returns Aeterna's exit code. A
// fresh start opens everything; a re-executed Aeterna (an upgrade, a recovery)
// adopts what the previous one carried. Crossing the exec itself is the
// carrier's (upgrade/carrier.ts).
import { AeternaError, ExitCodes } from './errors';
import type { Config } from './config/types';
import { loadConfigFile } from './config/load';
import type { Logger } from './log';
import { Metrics } from './monitor/metrics';
import { AppOutput } from './monitor/app-output';
import { EventHub } from './control/events';
import { generationResources } from './monitor/app-resources';
import { Reaper } from './supervisor/reaper';
import { openCgroups, type Cgroups } from './supervisor/cgroup';
import { endLeftovers, killLeftovers } from './supervisor/leftovers';
import { ListenerSet, inheritedListeners } from './resources/listeners';
import { ListenerWatch } from './resources/listener-watch';
import { FdStore } from './resources/fd-store';
import { fdStoreBudget } from './resources/fd-budget';
import { Orchestrator } from './orchestrator/orchestrator';
import { STATES, type State } from './orchestrator/fsm';
import type { ControlApi, ReloadTrigger } from './orchestrator/types';
import { FileWatch } from './orchestrator/file-watch';
import { ownFiles } from './own-files';
import { Generation } from './supervisor/generation';
import { belongsTo } from './supervisor/proctree';
import { WeightedSplit } from './resources/canary-split';
import type { Handover } from './upgrade/handover';
import { adoptGenerations, adoptRelayConnections } from './upgrade/adopt';
import type { Carried } from './upgrade/carried';
import { Carrier } from './upgrade/carrier';
import { HeldConfig } from './upgrade/held-config';
import { TEST_FAULT_ENV, injectFault, takeTestFault, type TestFault } from './upgrade/recovery';
import { packageVersion } from './version';
import { installSignalHandlers } from './signals';
import { describeStartFailure, startFailureCode } from './start-failure';
import { OwnSockets } from './own-sockets';

export class Daemon {
  private readonly reaper = new Reaper();
  private readonly metrics: Metrics;
  /** observability.app_output: the app's stdout and stderr, inherited or read line by line. */
  private readonly appOutput: AppOutput;
  /** `aeterna events`: every operator event to each subscriber. */
  private readonly events: EventHub;
  private readonly listeners: ListenerSet;
  private readonly listenerWatch: ListenerWatch;
  /** Removes the signal handlers (at shutdown). */
  private uninstallSignalHandlers: () => void = () => undefined;
  private fdStore: FdStore | null = null;
  /** The control socket, the metrics endpoint, the notify socket and the state relay. */
  private readonly sockets: OwnSockets;
  private orchestrator: Orchestrator | null = null;
  private cgroups: Cgroups | null = null;
  /** orchestration.watch: reloads on file change. */
  private readonly fileWatch: FileWatch;
  /** A stop requested before the orchestrator existed. */
  private pendingStop: string | null = null;
  /** Aborted by a second stop request while leftover processes are being ended: SIGKILL them now. */
  private readonly hurry = new AbortController();
  private readonly version = packageVersion();
  private readonly execAt = new Date();
  /** The config Aeterna runs with (the start's, then each settled reload's): what a handover carries. */
  private readonly held: HeldConfig;
  /** Crossing Aeterna's exec: the handover, signal recovery, `aeterna upgrade`, crash recovery, the fallback. */
  private readonly carrier: Carrier;
  /** AETERNA_TEST_FAULT: a fault tests inject inside the daemon; null outside tests. */
  private readonly testFault: TestFault | null = takeTestFault(process.env);

  constructor(
    private readonly config: Config,
    private readonly log: Logger,
    /** What the Aeterna this one replaced handed over (aeterna upgrade), or null for a fresh start. */
    private readonly handover: Handover | null = null,
  ) {
    this.held = new HeldConfig(config);
    this.carrier = new Carrier(handover, this.version, this.execAt, this.held, this.reaper, log);
    this.listeners = new ListenerSet(handover ? handover.listeners : inheritedListeners(process.env));
    this.metrics = new Metrics(
      config.observability.metrics !== null,
      STATES,
      'Stopped' satisfies State,
      () => this.sockets.relay?.lastCheckpoint() ?? null,
      () => this.orchestrator?.status().generations ?? [],
    );
    this.events = new EventHub(log);
    this.appOutput = new AppOutput(config.observability.appOutput ?? 'raw', config.service.name, log);
    this.listenerWatch = new ListenerWatch(
      this.listeners,
      (name, result) => this.metrics.listenerRepaired(name, result),
      log,
    );
    this.fileWatch = new FileWatch(() => this.reloadAndLog('watch'), log, ownFiles);
    this.sockets = new OwnSockets({
      config,
      log,
      api: this.api(),
      metrics: this.metrics,
      listenerWatch: this.listenerWatch,
      isReady: () => this.orchestrator?.isReady() ?? false,
      changed: () => this.carrier.changed(),
    });
  }

  /** Run until everything has stopped; resolves with Aeterna's exit code. */
  async run(): Promise<number> {
    if (this.carrier.givesUp()) return this.endTheApp();
    // Handlers first: PID 1 gets no default action from the kernel, and a SIGTERM during the setup must still stop us.
    this.installSignalHandlers();
    const started = this.handover ? await this.adoptAll(this.handover) : await this.openAll();
    if (typeof started === 'number') return started; // the start failed: its exit code
    const code = await started.stopped;
    await this.endLeftovers();
    this.log.info({ exit_code: code }, 'aeterna exiting');
    await this.sockets.control?.exiting(code); // `aeterna stop --wait` learns the code; Aeterna's exit closes it
    await this.shutdown();
    return code;
  }

  private installSignalHandlers(): void {
    const reload = (): void => {
      if (this.orchestrator) this.reloadAndLog('sighup');
    };
    this.uninstallSignalHandlers = installSignalHandlers(
      { stop: (s) => this.stop(s), forward: (s) => this.orchestrator?.forward(s), reload },
      this.log,
    );
  }

  /** The generations are gone; whatever is still Aeterna's child escaped them (see leftovers.ts). */
  private async endLeftovers(): Promise<void> {
    const ended = await endLeftovers(this.reaper, this.orchestrator!.stopTimeoutMs, this.hurry.signal);
    if (ended.length > 0)
      this.log.warn({ pids: ended }, `ended ${ended.length} leftover process(es) that outlived their generations`);
  }

  /** A fresh start: open everything the config names, then start generation 1. A failed start: its exit code. */
  private async openAll(): Promise<{ stopped: Promise<number> } | number> {
    this.installReaper();
    const failed = await this.startFails(() => this.sockets.open(null, () => this.applyListeners()));
    if (failed !== null) return failed;
    this.cgroups = openCgroups(this.config.service.cgroups, null, this.log);
    this.openFdStore([]);
    return { stopped: this.serve(this.startOrchestrator().run()) };
  }

  /**
   * A re-executed Aeterna (an upgrade, a recovery): adopt what the previous one carried, then its serving generation.
   * A failed start comes back to the previous program if it can, else it is its exit code.
   */
  private async adoptAll(h: Handover): Promise<{ stopped: Promise<number> } | number> {
    if (h.fell_back)
      this.log.warn(
        { failed: h.fell_back.from, error: h.fell_back.error },
        `upgrade to aeterna ${h.fell_back.from} failed before it took over (${h.fell_back.error}): aeterna ${this.version} takes over again`,
      );
    this.carrier.prepareFallbackOnFatalSignal();
    // The cgroups before the generation, which keeps the cgroup it runs in (the handover names both directories).
    this.cgroups = openCgroups(this.config.service.cgroups, h.cgroups ?? null, this.log);
    const { serving, retiring } = adoptGenerations(h, this.reaper, this.cgroups, this.appOutput); // before the reaper
    this.installReaper();
    const failed = await this.startFails(() => this.sockets.open(h, () => this.applyListeners()));
    if (failed !== null) return failed;
    this.openFdStore(h.fdstore);
    const orchestrator = this.startOrchestrator();
    if (this.testFault === 'throw-before-takeover')
      throw new Error(`${TEST_FAULT_ENV}=${this.testFault}: a fault injected before the takeover`);
    if (serving.length === 0 || serving.some((g) => g.number !== serving[0].number))
      return { stopped: this.serve(orchestrator.run()) };
    const stopped = orchestrator.adopt(serving, h.counters, retiring);
    adoptRelayConnections(h, this.sockets.relay, serving, retiring, this.log);
    this.carrier.changed(); // the relay connections are part of what a fatal signal carries now
    this.metrics.reexecuted(this.carrier.reexecsByReason);
    this.log.info(
      {
        reason: h.reason,
        recoveries_last_minute: this.carrier.recoveries.length,
        from: h.from.version,
        to: this.version,
        reexecs: this.carrier.reexecs,
        generation: serving[0].number,
        child: serving[0].pid,
        ...(retiring.length > 0 ? { retiring: retiring.map((r) => r.gen.number) } : {}),
      },
      `aeterna ${h.from.version} re-executed as ${this.version} (${h.reason}): took over generation ${serving[0].number} (pid ${serving[0].pid})` +
        (retiring.length > 0 ? ` and ${retiring.length} retiring generation(s) still draining` : ''),
    );
    return { stopped: this.serve(stopped) };
  }

  /** Open (or adopt) Aeterna's sockets; a failure is one line an operator can act on, and the start's exit code. */
  private async startFails(open: () => Promise<void>): Promise<number | null> {
    try {
      await open();
      return null;
    } catch (err) {
      const { code, message } = describeStartFailure(err);
      this.log.error({ code }, message);
      this.log.debug({ err }, 'start failed'); // the stack is for bugs, at debug level
      this.carrier.comeBack(err); // a re-executed Aeterna that cannot take over: back to the previous program, if any
      await this.shutdown();
      return startFailureCode(err);
    }
  }

  /** The reaper, listening first: install() reaps at once what exited before (during an exec, say), and that counts too. */
  private installReaper(): void {
    this.reaper.on('orphan', (info) => {
      this.metrics.zombieReaped();
      this.log.debug({ orphan: info.pid }, 'reaped orphan');
    });
    this.reaper.install();
  }

  private applyListeners(): void {
    this.listeners.apply(this.config.service.listeners, this.config.orchestration.canary !== null);
    for (const l of this.listeners.list())
      this.log.info({ listener: l.name, address: l.address, fd: l.fd }, 'listener ready');
  }

  /** The fd store gets what the fd limit leaves once every socket and server of Aeterna's is up (fd-budget.ts). */
  private openFdStore(carried: Handover['fdstore']): void {
    this.fdStore = new FdStore(
      this.log,
      (count) => {
        this.metrics.fdStoreChanged(count);
        this.carrier.changed();
      },
      fdStoreBudget(carried.length),
    );
    this.fdStore.adopt(carried);
    this.fdStore.limit(this.config.service.fdstoreMax); // a service.fdstore_max that does not fit is reported now
  }

  /** The orchestrator over everything opened; from now on the carrier carries it all. */
  private startOrchestrator(): Orchestrator {
    const cgroups = this.cgroups;
    const orchestrator = new Orchestrator(this.config, {
      log: this.log,
      metrics: this.metrics,
      reaper: this.reaper,
      listeners: this.listeners,
      listenerWatch: this.listenerWatch,
      notify: this.sockets.notify!,
      fdStore: this.fdStore!,
      loadConfig: loadConfigFile,
      relay: this.sockets.relay,
      spawn: (number, spec, fds, env, instance) =>
        this.appOutput.spawn((stdio) =>
          Generation.spawn(number, stdio ? { ...spec, ...stdio } : spec, fds, this.reaper, env, cgroups, instance),
        ),
      split: (listeners, canary) => WeightedSplit.open(listeners, canary),
      belongsTo,
      stderrTail: (number, instance) => this.appOutput.stderrTail(number, instance),
      onEvent: (event) => this.events.publish(event),
      resourcesOf: (gen) => generationResources(gen.pid, gen.cgroup?.dir ?? null),
      reloadSettled: (_record, config) => {
        this.held.set(config);
        this.fileWatch.reloadSettled(config);
        this.carrier.changed();
      },
    });
    this.orchestrator = orchestrator;
    // Every state change may change what the handover describes (a reload starting drops it, Running prepares it
    // again): prepared in the transition itself, so whoever sees Running also finds it ready.
    orchestrator.fsm.onTransition(() => this.carrier.changed());
    // The orchestrator first: while it cannot be carried (a reload in flight), nothing is.
    const { control, notify, relay, metricsEndpoint } = this.sockets;
    const carried: Carried[] = [orchestrator, this.listeners, control!, notify!, this.fdStore!];
    for (const c of [relay, metricsEndpoint, this.cgroups]) if (c) carried.push(c);
    carried.push(this.appOutput);
    this.carrier.carry(carried);
    return orchestrator;
  }

  /** The app runs (generation 1 spawned, or the serving one taken over): what waits for that starts. */
  private serve(stopped: Promise<number>): Promise<number> {
    this.carrier.tookOver();
    // A stop requested while starting (or while the previous program exec'd): applied now that there is something to stop.
    if (this.pendingStop) this.orchestrator!.stop(this.pendingStop);
    this.listenerWatch.start();
    if (!this.pendingStop) this.fileWatch.apply(this.config.orchestration.watch, ownFiles(this.config));
    // The app has been spawned: now load the metrics library (kept off the start-to-exec path).
    setImmediate(() => this.metrics.export());
    return stopped;
  }

  /** The control socket's view of the daemon: the orchestrator, once it exists. */
  private api(): ControlApi {
    const need = (): Orchestrator => {
      if (!this.orchestrator) throw new AeternaError('E_ILLEGAL_TRANSITION', 'Aeterna is still starting');
      return this.orchestrator;
    };
    // The file watch pauses while an accepted upgrade execs, and resumes if the exec fails.
    const watch = {
      pause: () => this.fileWatch.suspend(),
      resume: () => this.fileWatch.apply(this.held.current.orchestration.watch, ownFiles(this.held.current)),
    };
    return {
      status: () => {
        const report = {
          ...need().status(),
          version: this.version,
          exec_at: this.execAt.toISOString(),
          reexecs: this.carrier.reexecs,
          config_file: { path: this.held.current.file, state: this.held.fileState() },
          upgrade_fell_back: this.handover?.fell_back ?? null,
        };
        if (this.testFault && this.testFault !== 'throw-before-takeover' && report.state === 'Running')
          injectFault(this.testFault);
        return report;
      },
      upgrade: (exec) =>
        this.carrier.upgrade(exec, watch).then((accepted) => {
          const at = new Date().toISOString();
          this.events.publish({ type: 'upgrade', at, from: accepted.from, reexecs: accepted.reexecs });
          return accepted;
        }),
      subscribe: (sink) => this.events.subscribe(sink),
      reload: (trigger, onEvent) => need().reload(trigger, onEvent),
      promote: () => need().promote(),
      rollback: () => need().rollback(),
      stop: (reason) => this.stop(reason),
      signal: (signal, main) => need().signal(signal, main),
    };
  }

  /** Aeterna hit a bug (already logged): re-execute in place (Carrier.recoverFromCrash); returns when that is impossible. */
  recoverFromCrash(error: unknown): void {
    this.carrier.recoverFromCrash(error);
  }

  /** Recoveries recur too often (carrier.givesUp): take the app down, with the cgroups it was handed, and exit so the platform sees it. */
  private endTheApp(): number {
    this.cgroups = openCgroups(this.config.service.cgroups, this.handover?.cgroups ?? null, this.log);
    for (const g of this.handover?.generations ?? []) if (g.cgroup !== null) this.cgroups?.adoptGeneration(g.cgroup);
    this.killEverything();
    return ExitCodes.SOFTWARE;
  }

  stop(reason: string): void {
    this.events.publish({ type: 'stopping', at: new Date().toISOString(), reason });
    this.carrier.stop(); // no upgrade execs any more, and a fatal signal no longer re-executes
    this.fileWatch.close(); // no reload starts once stopping
    if (this.orchestrator?.fsm.state === 'Stopped') this.hurry.abort();
    if (this.orchestrator) this.orchestrator.stop(reason);
    else this.pendingStop = reason;
  }

  /**
   * Aeterna is dying of an internal error: take every process of the app with it, and its cgroup directories
   * (waiting a moment, synchronously, for the killed processes to leave them).
   */
  killEverything(): void {
    this.cgroups?.killAll();
    killLeftovers();
    this.cgroups?.removeAllNow();
  }

  /** Start a reload that nobody waits on (SIGHUP, a watched change) and log its outcome; throws as Orchestrator.reload. */
  private reloadAndLog(trigger: ReloadTrigger): void {
    const orchestrator = this.orchestrator;
    if (!orchestrator) throw new AeternaError('E_ILLEGAL_TRANSITION', 'Aeterna is still starting');
    const name = trigger === 'sighup' ? 'SIGHUP' : trigger;
    orchestrator.reload(trigger).then(
      (record) =>
        this.log.info(
          { reload: record.id, trigger, outcome: record.outcome, reason: record.reason, code: record.code },
          `${name} reload ${record.outcome}`,
        ),
      (err: Error) => this.log.error({ err }, `${name} reload failed`),
    );
  }

  private async shutdown(): Promise<void> {
    this.carrier.dropSignalRecovery();
    this.uninstallSignalHandlers();
    this.listenerWatch.stop();
    this.fileWatch.close();
    this.events.close('Aeterna exits');
    await this.sockets.close();
    this.fdStore?.close();
    await this.sockets.closeRelay();
    this.listeners.closeAll();
    await this.cgroups?.close();
    this.reaper.sweep();
    this.reaper.uninstall();
  }
}

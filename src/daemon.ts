// `aeterna start`: the PID-1 daemon. It wires the pieces together: the reaper,
// the listeners Aeterna owns, the sd_notify socket, the orchestrator, the
// control socket, the metrics endpoint and the signal handlers; then it runs
// until everything has stopped and returns Aeterna's exit code.
import type http from 'node:http';
import path from 'node:path';
import { AeternaError, ExitCodes } from './errors';
import type { Config } from './config/types';
import { loadConfigFile } from './config/load';
import type { Logger } from './log';
import { Metrics, startMetricsServer } from './monitor/metrics';
import { Reaper } from './supervisor/reaper';
import { Cgroups } from './supervisor/cgroup';
import { endLeftovers, killLeftovers } from './supervisor/leftovers';
import { ListenerSet, inheritedListeners } from './resources/listeners';
import { ListenerWatch } from './resources/listener-watch';
import { NotifySocket } from './resources/notify';
import { keepSocketFile, type SocketFileWatch } from './resources/socket-file';
import { FdStore } from './resources/fd-store';
import { fdStoreBudget } from './resources/fd-budget';
import { Orchestrator } from './orchestrator/orchestrator';
import { STATES, type State } from './orchestrator/fsm';
import type { ControlApi, ReloadTrigger } from './orchestrator/types';
import { FileWatch } from './orchestrator/file-watch';
import { ownFiles } from './own-files';
import { startControlServer, type ControlServer } from './control/server';
import { SrpCoordinator } from './srp/coordinator';
import { resolveIdentity } from './supervisor/identity';
import { ROOT_RUNTIME_DIR, defaultRuntimeDir, ensurePrivateRuntimeDir } from './config/runtime-dir';
import { Generation } from './supervisor/generation';
import { belongsTo } from './supervisor/proctree';
import { WeightedSplit } from './resources/canary-split';
import { HANDOVER_VERSION, type FdRole, type Handover, type ReexecReason } from './upgrade/handover';
import { checkTarget, prepareSignalExec, reexec, upgradeArgv } from './upgrade/reexec';
import { fallBack, fallbackArgv, fallbackHandover } from './upgrade/fallback';
import { HeldConfig } from './upgrade/held-config';
import { takeEarlySignals } from './upgrade/early-signals';
import { RECOVERY_LIMIT, RECOVERY_WINDOW_MS, TEST_FAULT_ENV, injectFault, recentRecoveries, reexecsByReason, takeTestFault, type TestFault } from './upgrade/recovery';
import { native } from './native/binding';
import { packageVersion } from './version';

/** Signals passed on to the serving generation's root process as they are. */
const FORWARDED_SIGNALS: NodeJS.Signals[] = ['SIGQUIT', 'SIGUSR1', 'SIGUSR2', 'SIGWINCH'];
const STOP_SIGNALS: NodeJS.Signals[] = ['SIGTERM', 'SIGINT'];

/** Aeterna's exit code for a start that failed before the app ran. */
function startFailureCode(err: unknown): number {
  if (err instanceof AeternaError) {
    if (err.code === 'E_DAEMON_RUNNING') return ExitCodes.SOFTWARE;
    if (err.code === 'E_CONFIG_INVALID') return ExitCodes.CONFIG;
    if (err.code === 'E_LISTEN_ADDR_IN_USE' || err.code === 'E_LISTEN_FAILED' || err.code === 'E_METRICS_FAILED' || err.code === 'E_CANARY_UNSUPPORTED') return ExitCodes.UNAVAILABLE;
  }
  return ExitCodes.SOFTWARE;
}

/** What to do about a failed start, for errors whose message does not say it already (after a ';'). */
const STARTUP_FIXES: Partial<Record<string, string>> = {
  E_LISTEN_ADDR_IN_USE: 'stop what listens there, or change the address in service.listeners',
  E_LISTEN_FAILED: 'the path must be in a directory this user can create or write, the host must resolve; or change it in aeterna.yaml',
  E_METRICS_FAILED: 'free the port, or change observability.metrics_port',
  E_CANARY_UNSUPPORTED: 'remove orchestration.canary (a weighted split needs Linux 4.5 or later)',
  E_INTERNAL: 'a bug in Aeterna: please report it (observability.log_level "debug" logs the stack)',
};

/** A failed start as one line: the message with its fix, and the code (the stack only at debug level). */
function describeStartFailure(err: unknown): { code: string; message: string } {
  const code = err instanceof AeternaError ? err.code : 'E_INTERNAL';
  const message = err instanceof Error ? err.message : String(err);
  const fix = STARTUP_FIXES[code];
  return { code, message: fix === undefined || message.includes('; ') ? message : `${message}; ${fix}` };
}

/** The sd_notify socket, beside the control socket; a path that cannot be used is E_LISTEN_FAILED with its fix. */
function openNotifySocket(socketPath: string, log: Logger): NotifySocket {
  try {
    return NotifySocket.open(socketPath, log);
  } catch (err) {
    throw new AeternaError(
      'E_LISTEN_FAILED',
      `cannot create the notify socket ${socketPath}: ${(err as Error).message}; it goes beside control.socket_path, whose directory must be writable`,
      { cause: err },
    );
  }
}

/** The state relay's socket; a path that cannot be used is E_LISTEN_FAILED with its fix, not an internal error. */
function openStateRelay(handoff: Config['orchestration']['stateHandoff'], identity: ReturnType<typeof resolveIdentity>, log: Logger): SrpCoordinator {
  try {
    return SrpCoordinator.open(handoff, identity, log);
  } catch (err) {
    if (err instanceof AeternaError) throw err;
    throw new AeternaError(
      'E_LISTEN_FAILED',
      `cannot create the state relay socket ${handoff.socketPath}: ${(err as Error).message}; set orchestration.state_handoff.socket_path to a path in a directory this user can write`,
      { cause: err },
    );
  }
}

export class Daemon {
  private readonly reaper = new Reaper();
  private readonly metrics: Metrics;
  private readonly listeners: ListenerSet;
  private readonly listenerWatch: ListenerWatch;
  private readonly handlers = new Map<NodeJS.Signals, () => void>();
  private notify: NotifySocket | null = null;
  private fdStore: FdStore | null = null;
  private control: ControlServer | null = null;
  private metricsServer: http.Server | null = null;
  /** The metrics endpoint's listening socket (handed over at an upgrade). */
  private metricsFd: number | null = null;
  private relay: SrpCoordinator | null = null;
  private orchestrator: Orchestrator | null = null;
  private cgroups: Cgroups | null = null;
  /** The state relay's and the notify socket files, kept like the control socket's (see keepSocketFile). */
  private readonly socketWatches: SocketFileWatch[] = [];
  /** orchestration.watch: reloads on file change. */
  private readonly fileWatch: FileWatch;
  /** A stop requested before the orchestrator existed. */
  private pendingStop: string | null = null;
  /** Aborted by a second stop request while leftover processes are being ended: SIGKILL them now. */
  private readonly hurry = new AbortController();
  private readonly version = packageVersion();
  private readonly execAt = new Date();
  /** Upgrades since the container started (carried by the handover). */
  private readonly reexecs: number;
  /** An upgrade is being checked or exec'd: a second one is refused. */
  private upgrading = false;
  /** Re-execs since the container started, by reason, and the recoveries within the recovery window (carried by the handover). */
  private readonly reexecsByReason: Partial<Record<ReexecReason, number>>;
  private readonly recoveries: string[];
  /** The handover a fatal signal execs with: its memfd and what it says (kept current as things change). */
  private signalExec: { fd: number; json: string } | null = null;
  /** The config Aeterna runs with (the start's, then each settled reload's): what a handover carries. */
  private readonly held: HeldConfig;
  /**
   * A re-executed Aeterna has taken over the serving generation. Until then a failure of its start goes back to
   * the program that handed over (fallback.ts) instead of ending the container.
   */
  private takenOver = false;
  /** A stop requested while an upgrade's exec is being prepared: the exec is abandoned. */
  private stopRequested = false;
  /** AETERNA_TEST_FAULT: a fault tests inject inside the daemon; null outside tests. */
  private readonly testFault: TestFault | null = takeTestFault(process.env);

  constructor(
    private readonly config: Config,
    private readonly log: Logger,
    /** What the Aeterna this one replaced handed over (aeterna upgrade), or null for a fresh start. */
    private readonly handover: Handover | null = null,
  ) {
    this.held = new HeldConfig(config);
    this.listeners = new ListenerSet(handover ? handover.listeners : inheritedListeners(process.env));
    this.reexecs = handover ? handover.counters.reexecs + 1 : 0;
    this.reexecsByReason = reexecsByReason(handover);
    this.recoveries = recentRecoveries(handover, this.execAt);
    this.metrics = new Metrics(config.observability.metrics !== null, STATES, 'Stopped' satisfies State, () => this.relay?.lastCheckpoint() ?? null);
    this.listenerWatch = new ListenerWatch(this.listeners, (name, result) => this.metrics.listenerRepaired(name, result), log);
    this.fileWatch = new FileWatch(() => this.reloadAndLog('watch'), log, ownFiles);
  }

  /** Run until everything has stopped; resolves with Aeterna's exit code. */
  async run(): Promise<number> {
    const h = this.handover;
    if (this.recoveries.length > RECOVERY_LIMIT) return this.giveUpRecovering();
    // Handlers first: PID 1 gets no default action from the kernel, and a
    // SIGTERM that arrives while we set up must still stop us.
    this.installSignalHandlers();
    if (h?.fell_back) this.log.warn({ failed: h.fell_back.from, error: h.fell_back.error }, `upgrade to aeterna ${h.fell_back.from} failed before it took over (${h.fell_back.error}): aeterna ${this.version} takes over again`);
    if (h) this.prepareFallbackOnFatalSignal(h);
    // A re-executed Aeterna takes over the cgroups before adopting its generation, which keeps the cgroup it runs
    // in (the handover names both directories); a fresh start opens them once its sockets are bound (below).
    if (h) this.cgroups = this.openCgroups(h.cgroups ?? null);
    // Before the reaper's first sweep: a generation that exited during the exec is reported, not reaped as an orphan.
    const adopted = h
      ? h.generations.map((g) => Generation.adopt(g.number, g.pid, new Date(g.started_at), this.reaper, this.cgroups, g.cgroup === null ? null : (this.cgroups?.adoptGeneration(g.cgroup) ?? null)))
      : [];
    // Listening first: install() reaps at once what exited before (during an exec, say), and that counts too.
    this.reaper.on('orphan', (info) => {
      this.metrics.zombieReaped();
      this.log.debug({ orphan: info.pid }, 'reaped orphan');
    });
    this.reaper.install();
    let code: number;
    try {
      this.prepareRuntimeDir();
      // The control socket first: if another daemon answers there, refuse before binding anything.
      const kept = (role: FdRole): number | undefined => h?.fds.find((f) => f.role === role)?.fd;
      const controlFd = kept('control');
      const listeningChanged = (): void => this.prepareSignalRecovery();
      this.control = await startControlServer(this.config.control.socketPath, this.api(), this.log, h && controlFd !== undefined ? { adopt: { fd: controlFd, file: h.control }, listeningChanged } : { listeningChanged });
      this.listeners.apply(this.config.service.listeners, this.config.orchestration.canary !== null);
      for (const l of this.listeners.list()) {
        this.log.info({ listener: l.name, address: l.address, fd: l.fd }, 'listener ready');
      }
      const metricsAddress = this.config.observability.metrics;
      if (metricsAddress) {
        const endpoint = await startMetricsServer(this.metrics, metricsAddress, () => this.orchestrator?.isReady() ?? false, (probe) => this.listenerWatch.check(probe), this.log, kept('metrics'));
        this.metricsServer = endpoint.server;
        this.metricsFd = endpoint.fd;
        this.log.info({ metrics: `${metricsAddress.host}:${metricsAddress.port}` }, 'metrics endpoint ready');
      }
      const notifyFd = kept('notify');
      this.notify = h && notifyFd !== undefined ? NotifySocket.adopt(h.notify, notifyFd, this.log) : openNotifySocket(NotifySocket.pathFor(this.config.control.socketPath), this.log);
      const handoff = this.config.orchestration.stateHandoff;
      if (handoff.enabled) {
        const identity = resolveIdentity(this.config.service.user, this.config.service.group);
        const relayFd = kept('relay');
        this.relay = h?.relay && relayFd !== undefined ? SrpCoordinator.adopt(handoff, h.relay, relayFd, this.log, h.checkpoint ?? null) : openStateRelay(handoff, identity, this.log);
        this.relay.on('checkpoint', (result) => this.metrics.checkpointed(result));
        // A connection going idle or busy, a new checkpoint: what a fatal signal's handover carries changed.
        this.relay.on('carry', () => this.prepareSignalRecovery());
        this.log.info({ socket: handoff.socketPath }, 'state relay ready');
      }
      this.keepSocketFiles();
    } catch (err) {
      // One line an operator can act on; the stack is for bugs, at debug level.
      const { code, message } = describeStartFailure(err);
      this.log.error({ code }, message);
      this.log.debug({ err }, 'start failed');
      this.comeBack(err); // a re-executed Aeterna that cannot take over: back to the previous program, if any
      await this.shutdown();
      return startFailureCode(err);
    }
    if (!h) this.cgroups = this.openCgroups(null);
    // The fd store gets what the fd limit leaves once every socket and server of Aeterna's is up (fd-budget.ts).
    this.fdStore = new FdStore(this.log, (count) => {
      this.metrics.fdStoreChanged(count);
      this.prepareSignalRecovery();
    }, fdStoreBudget(h ? h.fdstore.length : 0));
    if (h) this.fdStore.adopt(h.fdstore);
    this.fdStore.limit(this.config.service.fdstoreMax); // a service.fdstore_max that does not fit is reported now
    const cgroups = this.cgroups;
    this.orchestrator = new Orchestrator(this.config, {
      log: this.log,
      metrics: this.metrics,
      reaper: this.reaper,
      listeners: this.listeners,
      listenerWatch: this.listenerWatch,
      notify: this.notify,
      fdStore: this.fdStore,
      loadConfig: loadConfigFile,
      relay: this.relay,
      spawn: (number, spec, fds, env) => Generation.spawn(number, spec, fds, this.reaper, env, cgroups),
      split: (listeners, canary) => WeightedSplit.open(listeners, canary),
      belongsTo,
      reloadSettled: (_record, config) => {
        this.held.set(config);
        this.fileWatch.reloadSettled(config);
        this.prepareSignalRecovery();
      },
    });
    // Every state change may change what the handover describes (a reload starting drops it, Running prepares it
    // again): prepared in the transition itself, so whoever sees Running also finds it ready.
    this.orchestrator.fsm.onTransition(() => this.prepareSignalRecovery());
    if (h && this.testFault === 'throw-before-takeover') throw new Error(`${TEST_FAULT_ENV}=${this.testFault}: a fault injected before the takeover`);
    let stopped: Promise<number>;
    if (h && adopted.length === 1) {
      stopped = this.orchestrator.adopt(adopted[0], h.counters);
      this.adoptRelayConnections(h, adopted);
      this.metrics.reexecuted(this.reexecsByReason);
      this.log.info({ reason: h.reason, recoveries_last_minute: this.recoveries.length, from: h.from.version, to: this.version, reexecs: this.reexecs, generation: adopted[0].number, child: adopted[0].pid }, `aeterna ${h.from.version} re-executed as ${this.version} (${h.reason}): took over generation ${adopted[0].number} (pid ${adopted[0].pid})`);
    } else {
      stopped = this.orchestrator.run();
    }
    this.takenOver = true;
    // A stop requested while starting (or while the previous program exec'd): applied now that there is something to stop.
    if (this.pendingStop) this.orchestrator.stop(this.pendingStop);
    this.listenerWatch.start();
    if (!this.pendingStop) this.fileWatch.apply(this.config.orchestration.watch, ownFiles(this.config));
    // The app has been spawned: now load the metrics library (kept off the start-to-exec path).
    setImmediate(() => this.metrics.export());
    code = await stopped;
    // The generations are gone; whatever is still Aeterna's child escaped them (see leftovers.ts).
    const ended = await endLeftovers(this.reaper, this.orchestrator.stopTimeoutMs, this.hurry.signal);
    if (ended.length > 0) this.log.warn({ pids: ended }, `ended ${ended.length} leftover process(es) that outlived their generations`);
    this.log.info({ exit_code: code }, 'aeterna exiting');
    await this.shutdown();
    return code;
  }

  /** The relay connections the previous Aeterna handed over (closed when the relay is off now: nobody would read them). */
  private adoptRelayConnections(h: Handover, adopted: Generation[]): void {
    const entries = h.relay_connections ?? [];
    if (this.relay) this.relay.adoptConnections(entries, adopted);
    else entries.forEach((e) => native.close(e.fd));
    if (!this.relay && h.checkpoint) native.close(h.checkpoint.fd);
    if (entries.length > 0) this.log.info({ generations: entries.map((e) => e.generation), relay: this.relay !== null }, `took over ${entries.length} state relay connection(s)`);
    this.prepareSignalRecovery(); // they are part of what a fatal signal carries now
  }

  /**
   * Check the state relay's and the notify socket files like the control socket's (a tmp cleaner may delete
   * them): re-created at the same path, which the generations' environment names; the handover then names the new fd.
   */
  private keepSocketFiles(): void {
    const notify = this.notify!;
    this.socketWatches.push(
      keepSocketFile(
        notify.file,
        {
          what: 'notify socket',
          consequence: "the app's READY=1 (and WATCHDOG=1, FDSTORE=1) cannot reach Aeterna",
          recreate: () => {
            const file = notify.rebind();
            this.prepareSignalRecovery();
            return file;
          },
        },
        this.log,
      ),
    );
    const relay = this.relay;
    if (!relay) return;
    this.socketWatches.push(
      keepSocketFile(
        relay.listening.file,
        {
          what: 'state relay socket',
          consequence: 'new generations cannot connect to the state relay (a reload starts without the state)',
          recreate: () => {
            const file = relay.relisten(resolveIdentity(this.config.service.user, this.config.service.group));
            this.prepareSignalRecovery();
            return file;
          },
        },
        this.log,
      ),
    );
  }

  /** Sockets left at their default as a non-root user go to a private directory: create it 0700, or refuse one that is not ours. */
  private prepareRuntimeDir(): void {
    const dir = defaultRuntimeDir();
    const sockets = [this.config.control.socketPath, this.config.orchestration.stateHandoff.socketPath];
    if (dir !== ROOT_RUNTIME_DIR && sockets.some((p) => path.dirname(p) === dir)) ensurePrivateRuntimeDir(dir);
  }

  /** The control socket's view of the daemon: the orchestrator, once it exists. */
  private api(): ControlApi {
    const need = (): Orchestrator => {
      if (!this.orchestrator) throw new AeternaError('E_ILLEGAL_TRANSITION', 'Aeterna is still starting');
      return this.orchestrator;
    };
    return {
      status: () => {
        const report = { ...need().status(), version: this.version, exec_at: this.execAt.toISOString(), reexecs: this.reexecs, config_file: { path: this.held.current.file, state: this.held.fileState() }, upgrade_fell_back: this.handover?.fell_back ?? null };
        if (this.testFault && this.testFault !== 'throw-before-takeover' && report.state === 'Running') injectFault(this.testFault);
        return report;
      },
      upgrade: (exec) => this.upgrade(exec),
      reload: (trigger, onEvent) => need().reload(trigger, onEvent),
      promote: () => need().promote(),
      rollback: () => need().rollback(),
      stop: (reason) => this.stop(reason),
    };
  }

  /**
   * `aeterna upgrade`: only while one generation serves and no reload runs (E_RELOAD_BUSY). The target must pass its
   * check (E_UPGRADE_REFUSED); then `execNow` re-executes in place. If execve fails, everything goes on as before.
   */
  private async upgrade(exec: string | undefined): Promise<{ from: string; reexecs: number; execNow: () => void }> {
    const orchestrator = this.orchestrator;
    if (!orchestrator) throw new AeternaError('E_ILLEGAL_TRANSITION', 'Aeterna is still starting');
    if (this.upgrading) throw new AeternaError('E_RELOAD_BUSY', 'an upgrade is already in progress');
    orchestrator.handoverState(); // refuses during a reload
    const argv = upgradeArgv(exec);
    this.upgrading = true;
    try {
      // The dry run's copy: what the handover describes now (a busy relay connection is left out, not waited for).
      await checkTarget(argv, { ...this.describeHandover('signal'), reason: 'upgrade' }, this.reaper);
      await this.relayIdle();
      orchestrator.handoverState(); // a reload may have started while the target was checked
      // From here to the exec nothing is read from or accepted on the relay: its connections stay idle.
      this.relay?.freeze();
    } catch (err) {
      this.upgrading = false;
      this.log.warn({ code: (err as AeternaError).code, target: argv[0] }, `upgrade refused: ${(err as Error).message}`);
      throw err;
    }
    this.fileWatch.suspend(); // no reload starts once the upgrade is accepted (watched again if the exec fails)
    return {
      from: this.version,
      reexecs: this.reexecs,
      execNow: () => {
        // From now on a stop signal stays pending across the exec, for the new program. One that libuv caught
        // before (queued for the next turn of the loop) must win over the exec: two turns let it through first.
        native.holdStopSignals(true);
        setImmediate(() => setImmediate(() => this.execUpgrade(argv)));
      },
    };
  }

  /** The exec of an accepted upgrade, unless a stop came first. If execve fails, everything goes on as before. */
  private execUpgrade(argv: string[]): void {
    if (this.stopRequested) {
      this.log.info({ target: argv[0] }, 'upgrade abandoned: Aeterna is stopping');
    } else {
      try {
        const handover = this.describeHandover('upgrade');
        this.log.info({ target: argv[0], handover_version: HANDOVER_VERSION, fds: handover.fds.length }, `upgrade: re-executing ${argv[0]}`);
        reexec(argv, handover);
      } catch (err) {
        this.log.error({ err, code: (err as AeternaError).code }, `upgrade failed, going on as before: ${(err as Error).message}`);
      }
    }
    native.holdStopSignals(false); // the exec did not happen: a stop that waited is delivered now
    this.relay?.thaw();
    this.upgrading = false;
    if (!this.stopRequested) this.fileWatch.apply(this.held.current.orchestration.watch, ownFiles(this.held.current));
  }

  /**
   * Wait until no relay connection is busy (a checkpoint being received or streamed, a relay): an upgrade carries
   * only idle ones. Bounded by state_handoff.timeout, then E_UPGRADE_REFUSED naming what kept it busy.
   */
  private async relayIdle(): Promise<void> {
    if (!this.relay) return;
    const timeoutMs = this.held.current.orchestration.stateHandoff.timeoutMs;
    const why = this.relay.busyReason();
    if (why) this.log.info({ reason: why }, `upgrade: waiting until ${why.replace(' is busy with ', ' is done with ')}`);
    try {
      await this.relay.whenIdle(timeoutMs);
    } catch (err) {
      throw new AeternaError('E_UPGRADE_REFUSED', `${(err as Error).message} after ${timeoutMs / 1000}s (orchestration.state_handoff.timeout), which an upgrade cannot cut short; nothing changed`);
    }
  }

  /**
   * Aeterna hit a bug (an uncaught exception or rejection, already logged): re-execute in place with the current
   * handover, so the app keeps running. Returns only when that is impossible (no generation serving on its own, e.g.
   * during a reload, or execve failed): the caller then ends everything.
   */
  recoverFromCrash(error: unknown): void {
    if (!this.takenOver) {
      this.comeBack(error); // not yet a running Aeterna: back to the previous program, if any
      return;
    }
    try {
      const busy = this.relay?.busyReason();
      // A crash cannot wait: a busy connection is not carried (it closes at the exec; the client's call on it fails).
      if (busy) this.log.warn({ reason: busy }, `recovery: a state relay connection is not carried over: ${busy}`);
      const argv = upgradeArgv(undefined);
      const handover = this.describeHandover('exception');
      this.log.info({ reason: 'exception', target: argv[0], fds: handover.fds.length }, 'recovery: re-executing aeterna in place (reason exception)');
      reexec(argv, handover);
    } catch (err) {
      this.log.error({ err, code: (err as AeternaError).code }, `recovery impossible, ending everything: ${(err as Error).message}`);
    }
  }

  /**
   * A re-executed Aeterna fails before it took over: exec the program that handed over to it, with that same
   * handover (fallback.ts). Returns when there is none (a fresh start, a recovery) or execve failed.
   */
  private comeBack(error: unknown): void {
    const h = this.handover;
    if (this.takenOver || fallbackArgv(h) === null) return;
    const message = error instanceof Error ? error.message : String(error);
    this.log.error({ target: fallbackArgv(h)![0], error: message }, `aeterna ${this.version} cannot take over (${message}): coming back to aeterna ${h!.from.version}`);
    try {
      fallBack(h, this.version, error);
    } catch (err) {
      this.log.error({ err }, `cannot come back to the previous program: ${(err as Error).message}`);
    }
  }

  /** Until this Aeterna has taken over, a fatal signal execs the previous program too (with the handover it was given). */
  private prepareFallbackOnFatalSignal(h: Handover): void {
    const argv = fallbackArgv(h);
    if (argv === null) return;
    try {
      const handover = fallbackHandover(h, this.version, 'a fatal signal before it took over');
      const json = JSON.stringify(handover);
      this.signalExec = { fd: prepareSignalExec(argv, handover), json };
    } catch (err) {
      this.log.warn({ err }, `cannot prepare coming back to the previous program on a fatal signal: ${(err as Error).message}`);
    }
  }

  /** Too many recoveries within the window: take the app down and exit, so the platform sees it. */
  private giveUpRecovering(): number {
    this.log.error(
      { code: 'E_RECOVERY_LOOP', recoveries: this.recoveries },
      `aeterna recovered from its own crash ${this.recoveries.length} times within ${RECOVERY_WINDOW_MS / 1000}s (at most ${RECOVERY_LIMIT}): giving up, ending the app (E_RECOVERY_LOOP)`,
    );
    // The cgroups the previous program handed over, so that they go with the app.
    this.cgroups = this.openCgroups(this.handover?.cgroups ?? null);
    for (const g of this.handover?.generations ?? []) if (g.cgroup !== null) this.cgroups?.adoptGeneration(g.cgroup);
    this.killEverything();
    return ExitCodes.SOFTWARE;
  }

  /**
   * Re-write the handover a fatal signal execs with, if what it describes changed. Called on every change it
   * describes: the orchestrator's state transitions (reloads, restarts, stops), a reload's outcome, the fd store,
   * the control socket re-created. With no generation serving on its own (a reload in flight, starting, stopping)
   * there is nothing it could describe: it is dropped, and a fatal signal kills as it would without recovery.
   */
  private prepareSignalRecovery(): void {
    if (!this.orchestrator) return;
    let handover: Handover;
    try {
      handover = this.describeHandover('signal');
    } catch {
      this.dropSignalRecovery(); // a reload in flight, starting or stopping: nothing the handover can describe
      return;
    }
    const json = JSON.stringify(handover);
    if (json === this.signalExec?.json) return;
    try {
      // The new one first: the handler must always find a valid memfd.
      const fd = prepareSignalExec(upgradeArgv(undefined), handover);
      if (this.signalExec) native.close(this.signalExec.fd);
      this.signalExec = { fd, json };
    } catch (err) {
      this.log.warn({ err }, `cannot prepare recovery from a fatal signal: ${(err as Error).message}`);
    }
  }

  private dropSignalRecovery(): void {
    if (!this.signalExec) return;
    native.clearFatalSignalExec();
    native.close(this.signalExec.fd);
    this.signalExec = null;
  }

  /** Everything the next Aeterna takes over: the serving generation, every fd kept with its role and name, the counters. */
  private describeHandover(reason: ReexecReason): Handover {
    const { serving, counters } = this.orchestrator!.handoverState();
    const fds: Handover['fds'] = this.listeners.list().map((l) => ({ role: 'listener', name: l.name, fd: l.fd }));
    const control = this.control!.listening;
    fds.push({ role: 'control', name: 'control', fd: control.fd });
    fds.push({ role: 'notify', name: 'notify', fd: this.notify!.handoverFd });
    const relay = this.relay?.listening ?? null;
    if (relay) fds.push({ role: 'relay', name: 'state', fd: relay.fd });
    if (this.metricsFd !== null) fds.push({ role: 'metrics', name: 'metrics', fd: this.metricsFd });
    const relayConnections = this.relay?.carry(reason) ?? [];
    for (const c of relayConnections) fds.push({ role: 'relay-connection', name: `generation ${c.generation}`, fd: c.fd });
    const checkpoint = this.relay?.carryCheckpoint() ?? null;
    if (checkpoint) fds.push({ role: 'checkpoint', name: `checkpoint ${checkpoint.seq}`, fd: checkpoint.fd });
    const fdstore = this.fdStore!.handover();
    for (const f of fdstore) fds.push({ role: 'fdstore', name: f.name, fd: f.fd });
    return {
      version: HANDOVER_VERSION,
      from: { version: this.version, pid: process.pid, argv: upgradeArgv(undefined) },
      reason,
      fds,
      listeners: this.listeners.list().map((l) => ({ ...l })),
      control: control.file,
      relay: relay?.file ?? null,
      notify: this.notify!.address,
      fdstore,
      generations: [{ number: serving.number, pid: serving.pid, pgid: serving.pid, state: 'serving', started_at: serving.startedAt.toISOString(), cgroup: serving.cgroup?.dir ?? null }],
      cgroups: this.cgroups?.dir ?? null,
      counters: { ...counters, reexecs: this.reexecs },
      reexecs_by_reason: this.reexecsByReason,
      recoveries: this.recoveries,
      relay_connections: relayConnections,
      checkpoint,
      config: this.held.current,
    };
  }

  stop(reason: string): void {
    this.stopRequested = true;
    this.fileWatch.close(); // no reload starts once stopping
    this.dropSignalRecovery();
    if (this.orchestrator?.fsm.state === 'Stopped') this.hurry.abort();
    if (this.orchestrator) this.orchestrator.stop(reason);
    else this.pendingStop = reason;
  }

  /** One cgroup per generation where possible; says once which attribution is in use. `handed`: the directory a re-exec handed over. */
  private openCgroups(handed: string | null): Cgroups | null {
    const fallback = 'process attribution: process group, session and AETERNA_GENERATION (a daemon that leaves all three survives reloads until Aeterna exits)';
    if (!this.config.service.cgroups) {
      this.log.info({ cgroups: false }, `${fallback}: service.cgroups is false`);
      return null;
    }
    const onFallBack = (reason: string): void => this.log.warn({ cgroups: false }, `${fallback} from now on: ${reason}`);
    if (handed !== null) {
      try {
        const cgroups = Cgroups.adopt(handed, onFallBack);
        this.log.info({ cgroups: true, cgroup: cgroups.group }, `process attribution: one cgroup per generation below ${cgroups.dir} (taken over)`);
        return cgroups;
      } catch (err) {
        this.log.warn({ err: (err as Error).message }, `cannot take over the cgroups of the previous program: ${(err as Error).message}; a new directory for the next generations`);
      }
    }
    try {
      const cgroups = Cgroups.open(onFallBack);
      this.log.info({ cgroups: true, cgroup: cgroups.group }, `process attribution: one cgroup per generation below ${cgroups.dir}`);
      if (cgroups.swept.length > 0) this.log.info({ removed: cgroups.swept }, `removed ${cgroups.swept.length} empty cgroup director${cgroups.swept.length === 1 ? 'y' : 'ies'} left by an Aeterna that died without cleaning up`);
      return cgroups;
    } catch (err) {
      this.log.warn({ cgroups: false }, `${fallback}: cgroups unavailable: ${(err as Error).message}`);
      return null;
    }
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
      (record) => this.log.info({ reload: record.id, trigger, outcome: record.outcome, reason: record.reason, code: record.code }, `${name} reload ${record.outcome}`),
      (err: Error) => this.log.error({ err }, `${name} reload failed`),
    );
  }

  private reloadFromSignal(): void {
    if (!this.orchestrator) return;
    try {
      this.reloadAndLog('sighup');
    } catch (err) {
      const e = err as AeternaError;
      this.log.warn({ code: e.code }, `SIGHUP ignored: ${e.message}`);
    }
  }

  private installSignalHandlers(): void {
    const on = (signal: NodeJS.Signals, handler: () => void): void => {
      this.handlers.set(signal, handler);
      process.on(signal, handler);
    };
    for (const signal of STOP_SIGNALS) on(signal, () => this.stop(signal));
    for (const signal of FORWARDED_SIGNALS) {
      on(signal, () => this.orchestrator?.forward(signal));
    }
    on('SIGHUP', () => this.reloadFromSignal());
    // What arrived while Aeterna loaded (early-signals.ts), now that these handlers are in place: a stop is kept
    // until there is something to stop; a reload has nothing to reload yet.
    for (const signal of takeEarlySignals()) {
      if (STOP_SIGNALS.includes(signal)) this.stop(signal);
      else this.log.warn({ signal }, `${signal} while starting ignored: nothing to reload yet`);
    }
  }

  private async shutdown(): Promise<void> {
    this.dropSignalRecovery();
    for (const [signal, handler] of this.handlers) process.off(signal, handler);
    this.handlers.clear();
    this.listenerWatch.stop();
    this.fileWatch.close();
    for (const watch of this.socketWatches) watch.stop(); // before the sockets are closed: never re-created after
    await this.control?.close().catch(() => undefined);
    this.metricsServer?.closeAllConnections();
    this.metricsServer?.close();
    this.notify?.close();
    this.fdStore?.close();
    await this.relay?.close();
    this.listeners.closeAll();
    await this.cgroups?.close();
    this.reaper.sweep();
    this.reaper.uninstall();
  }
}

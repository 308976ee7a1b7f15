// The carrier: everything about crossing Aeterna's own exec. It describes the
// handover from what each carried component says it carries (carried.ts), keeps
// the handover a fatal signal execs with prepared, runs `aeterna upgrade` (check
// the target, wait until nothing is busy, freeze, exec), re-executes after a crash,
// comes back to the previous program when a re-executed Aeterna cannot take over,
// and says when recoveries recur too often to go on.
import { AeternaError } from '../errors';
import type { Logger } from '../log';
import { native } from '../native/binding';
import type { Reaper } from '../supervisor/reaper';
import type { Carried, CarriedPart } from './carried';
import { fallBack, fallbackArgv, fallbackHandover } from './fallback';
import {
  HANDOVER_VERSION,
  HANDOVER_VERSION_WITH_RETIRING,
  type FdRole,
  type Handover,
  type ReexecReason,
} from './handover';
import type { HeldConfig } from './held-config';
import { RECOVERY_LIMIT, RECOVERY_WINDOW_MS, recentRecoveries, reexecsByReason } from './recovery';
import { checkTarget, prepareSignalExec, reexec, upgradeArgv } from './reexec';

/** The order of the kept fds in the handover, by role (the order Aeterna always wrote them in). */
const FD_ORDER: readonly FdRole[] = [
  'listener',
  'control',
  'notify',
  'relay',
  'metrics',
  'relay-connection',
  'checkpoint',
  'fdstore',
  'app-output',
];

/** What `aeterna upgrade` answers once the target passed its check: `execNow` re-executes in place. */
export interface AcceptedUpgrade {
  from: string;
  reexecs: number;
  execNow: () => void;
}

export class Carrier {
  /** Upgrades since the container started (carried by the handover). */
  readonly reexecs: number;
  /** Re-execs since the container started, by reason, and the recoveries within the recovery window (carried by the handover). */
  readonly reexecsByReason: Partial<Record<ReexecReason, number>>;
  readonly recoveries: string[];
  /** What is carried; null until the orchestrator runs (nothing a handover could describe before). */
  private carried: Carried[] | null = null;
  /** The handover a fatal signal execs with: its memfd and what it says (kept current as things change). */
  private signalExec: { fd: number; json: string } | null = null;
  /** An upgrade is being checked or exec'd: a second one is refused. */
  private upgrading = false;
  /** A stop was requested: an upgrade being prepared is abandoned, a fatal signal no longer re-executes. */
  private stopping = false;
  /**
   * A re-executed Aeterna has taken over the serving generation. Until then a failure of its start goes back to
   * the program that handed over (fallback.ts) instead of ending the container.
   */
  private takenOver = false;

  constructor(
    /** What the Aeterna this one replaced handed over, or null for a fresh start. */
    private readonly handover: Handover | null,
    private readonly version: string,
    execAt: Date,
    private readonly held: HeldConfig,
    private readonly reaper: Reaper,
    private readonly log: Logger,
  ) {
    this.reexecs = handover ? handover.counters.reexecs + 1 : 0;
    this.reexecsByReason = reexecsByReason(handover);
    this.recoveries = recentRecoveries(handover, execAt);
  }

  /** Too many recoveries within the window: says so (E_RECOVERY_LOOP); the caller ends the app and exits, so the platform sees it. */
  givesUp(): boolean {
    if (this.recoveries.length <= RECOVERY_LIMIT) return false;
    this.log.error(
      { code: 'E_RECOVERY_LOOP', recoveries: this.recoveries },
      `aeterna recovered from its own crash ${this.recoveries.length} times within ${RECOVERY_WINDOW_MS / 1000}s (at most ${RECOVERY_LIMIT}): ` +
        `giving up, ending the app (E_RECOVERY_LOOP)`,
    );
    return true;
  }

  /** Carry these from now on (the orchestrator runs): the signal handover is prepared, and kept current as they change. */
  carry(carried: Carried[]): void {
    this.carried = carried;
    for (const c of carried) c.onCarryChanged?.(() => this.changed());
  }

  /** The serving generation is taken over (or generation 1 started): a failure no longer comes back to the previous program. */
  tookOver(): void {
    this.takenOver = true;
  }

  /** Aeterna is stopping: no upgrade execs any more, and a fatal signal kills as it would without recovery. */
  stop(): void {
    this.stopping = true;
    this.dropSignalRecovery();
  }

  /** Everything the next Aeterna takes over: the serving generation, every fd kept with its role and name, the counters. */
  describe(reason: ReexecReason): Handover {
    if (!this.carried) throw new AeternaError('E_ILLEGAL_TRANSITION', 'Aeterna is still starting');
    const carries = this.carried.map((c) => c.carry(reason));
    const fds = carries.flatMap((c) => c.fds).sort((a, b) => FD_ORDER.indexOf(a.role) - FD_ORDER.indexOf(b.role));
    const part = Object.assign({}, ...carries.map((c) => c.part)) as CarriedPart;
    // The fields in the order Aeterna always wrote them: the document stays byte for byte what it was.
    const generations = part.generations ?? [];
    return {
      version: generations.some((g) => g.state === 'retiring') ? HANDOVER_VERSION_WITH_RETIRING : HANDOVER_VERSION,
      from: { version: this.version, pid: process.pid, argv: upgradeArgv(undefined) },
      reason,
      fds,
      listeners: part.listeners ?? [],
      control: part.control!,
      relay: part.relay ?? null,
      notify: part.notify!,
      fdstore: part.fdstore ?? [],
      generations,
      cgroups: part.cgroups ?? null,
      counters: { ...part.counters!, reexecs: this.reexecs },
      reexecs_by_reason: this.reexecsByReason,
      recoveries: this.recoveries,
      relay_connections: part.relay_connections ?? [],
      checkpoint: part.checkpoint ?? null,
      ...(part.instance_checkpoints?.length ? { instance_checkpoints: part.instance_checkpoints } : {}),
      config: this.held.current,
    };
  }

  /**
   * Re-write the handover a fatal signal execs with, if what it describes changed. Called on every change it
   * describes: the orchestrator's state transitions (reloads, restarts, stops), a reload's outcome, the fd store,
   * a socket re-created, a relay connection going idle or busy. With no generation serving on its own (a reload in
   * flight, starting, stopping) there is nothing it could describe: it is dropped, and a fatal signal kills as it
   * would without recovery.
   */
  changed(): void {
    if (!this.carried) return;
    let handover: Handover;
    try {
      handover = this.describe('signal');
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

  dropSignalRecovery(): void {
    if (!this.signalExec) return;
    native.clearFatalSignalExec();
    native.close(this.signalExec.fd);
    this.signalExec = null;
  }

  /** Until this Aeterna has taken over, a fatal signal execs the previous program too (with the handover it was given). */
  prepareFallbackOnFatalSignal(): void {
    const argv = fallbackArgv(this.handover);
    if (argv === null) return;
    try {
      const handover = fallbackHandover(this.handover!, this.version, 'a fatal signal before it took over');
      const json = JSON.stringify(handover);
      this.signalExec = { fd: prepareSignalExec(argv, handover), json };
    } catch (err) {
      this.log.warn(
        { err },
        `cannot prepare coming back to the previous program on a fatal signal: ${(err as Error).message}`,
      );
    }
  }

  /**
   * `aeterna upgrade`: only while one generation serves and no reload runs (E_RELOAD_BUSY). The target must pass its
   * check (E_UPGRADE_REFUSED); then `execNow` re-executes in place. If execve fails, everything goes on as before.
   * `watch`: the file watch, paused once the upgrade is accepted (no reload starts) and resumed if the exec fails.
   */
  async upgrade(exec: string | undefined, watch: { pause(): void; resume(): void }): Promise<AcceptedUpgrade> {
    if (this.upgrading) throw new AeternaError('E_RELOAD_BUSY', 'an upgrade is already in progress');
    this.describe('signal'); // refuses during a reload
    const argv = upgradeArgv(exec);
    this.upgrading = true;
    try {
      // The dry run's copy: what the handover describes now (a busy relay connection is left out, not waited for).
      await checkTarget(argv, { ...this.describe('signal'), reason: 'upgrade' }, this.reaper);
      await this.whenIdle();
      this.describe('signal'); // a reload may have started while the target was checked
      // From here to the exec nothing is read from or accepted on the relay: its connections stay idle.
      for (const c of this.carried!) c.freeze?.();
    } catch (err) {
      this.upgrading = false;
      this.log.warn(
        { code: (err as AeternaError).code, target: argv[0] },
        `upgrade refused: ${(err as Error).message}`,
      );
      throw err;
    }
    watch.pause();
    return {
      from: this.version,
      reexecs: this.reexecs,
      execNow: () => {
        // From now on a stop signal stays pending across the exec, for the new program. One that libuv caught
        // before (queued for the next turn of the loop) must win over the exec: two turns let it through first.
        native.holdStopSignals(true);
        setImmediate(() => setImmediate(() => this.execUpgrade(argv, watch)));
      },
    };
  }

  /** The exec of an accepted upgrade, unless a stop came first. If execve fails, everything goes on as before. */
  private execUpgrade(argv: string[], watch: { resume(): void }): void {
    if (this.stopping) {
      this.log.info({ target: argv[0] }, 'upgrade abandoned: Aeterna is stopping');
    } else {
      try {
        const handover = this.describe('upgrade');
        this.log.info(
          { target: argv[0], handover_version: HANDOVER_VERSION, fds: handover.fds.length },
          `upgrade: re-executing ${argv[0]}`,
        );
        reexec(argv, handover);
      } catch (err) {
        this.log.error(
          { err, code: (err as AeternaError).code },
          `upgrade failed, going on as before: ${(err as Error).message}`,
        );
      }
    }
    native.holdStopSignals(false); // the exec did not happen: a stop that waited is delivered now
    for (const c of this.carried!) c.thaw?.();
    this.upgrading = false;
    if (!this.stopping) watch.resume();
  }

  /**
   * Wait until nothing carried is busy (a relay connection receiving or streaming a checkpoint, a relay): an upgrade
   * carries only idle ones. Bounded by state_handoff.timeout, then E_UPGRADE_REFUSED naming what kept it busy.
   */
  private async whenIdle(): Promise<void> {
    const timeoutMs = this.held.current.orchestration.stateHandoff.timeoutMs;
    for (const c of this.carried!) {
      if (!c.whenIdle) continue;
      const why = c.busyReason?.() ?? null;
      if (why)
        this.log.info({ reason: why }, `upgrade: waiting until ${why.replace(' is busy with ', ' is done with ')}`);
      try {
        await c.whenIdle(timeoutMs);
      } catch (err) {
        throw new AeternaError(
          'E_UPGRADE_REFUSED',
          `${(err as Error).message} after ${timeoutMs / 1000}s (orchestration.state_handoff.timeout), which an upgrade cannot cut short; nothing changed`,
        );
      }
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
      // A crash cannot wait: a busy connection is not carried (it closes at the exec; the client's call on it fails).
      for (const c of this.carried ?? []) {
        const busy = c.busyReason?.();
        if (busy) this.log.warn({ reason: busy }, `recovery: a state relay connection is not carried over: ${busy}`);
      }
      const argv = upgradeArgv(undefined);
      const handover = this.describe('exception');
      this.log.info(
        { reason: 'exception', target: argv[0], fds: handover.fds.length },
        'recovery: re-executing aeterna in place (reason exception)',
      );
      reexec(argv, handover);
    } catch (err) {
      this.log.error(
        { err, code: (err as AeternaError).code },
        `recovery impossible, ending everything: ${(err as Error).message}`,
      );
    }
  }

  /**
   * A re-executed Aeterna fails before it took over: exec the program that handed over to it, with that same
   * handover (fallback.ts). Returns when there is none (a fresh start, a recovery) or execve failed.
   */
  comeBack(error: unknown): void {
    const h = this.handover;
    const argv = fallbackArgv(h);
    if (this.takenOver || argv === null) return;
    const message = error instanceof Error ? error.message : String(error);
    this.log.error(
      { target: argv[0], error: message },
      `aeterna ${this.version} cannot take over (${message}): coming back to aeterna ${h!.from.version}`,
    );
    try {
      fallBack(h, this.version, error);
    } catch (err) {
      this.log.error({ err }, `cannot come back to the previous program: ${(err as Error).message}`);
    }
  }
}

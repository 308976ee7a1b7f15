// One generation of the app: the process tree started from service.command,
// with Aeterna's listeners at fds 3.. . A generation is a unit: it runs in its
// own session and process group, is signalled as a group, and when its root
// process exits any stragglers are killed (its group, and orphans that left
// it), so no worker of a dead generation keeps accepting on the shared sockets.
// With service.instances > 1 a generation runs several such process trees, its
// instances (orchestrator/instance-set.ts): each is a Generation object of its
// own, with the same number and its own `instance` (AETERNA_INSTANCE), so what
// works per process tree (relay, readiness, watchdog, cgroup) works per instance.
import fs from 'node:fs';
import os from 'node:os';
import { EventEmitter } from 'node:events';
import { native, type ExitInfo } from '../native/binding';
import { signalIfAlive } from './signal';
import { AeternaError } from '../errors';
import type { PassedFd } from '../app-env';
import { childEnvironment } from './environment';
import { signalNumber } from './exit';
import { resolveIdentity } from './identity';
import type { Reaper } from './reaper';
import { descendantsWithEnv } from './proctree';
import type { Cgroups, GenerationCgroup } from './cgroup';

/** What the supervisor needs to start a generation (the orchestrator passes service.*, which has these fields). */
export interface SpawnSpec {
  /** argv: the program and its arguments. */
  command: string[];
  /** KEY=VALUE entries added to Aeterna's own environment. */
  env: string[];
  cwd?: string;
  /** User/group the app runs as (name or numeric id), dropped in the child before exec. */
  user?: string | number;
  group?: string | number;
  /** The passed fd (by name) that also becomes the app's fd 0. */
  stdinListener?: string;
  /** With a watchdog the app gets WATCHDOG_USEC and WATCHDOG_PID. */
  watchdogMs: number | null;
  /** The fds that become the app's stdout and stderr (observability.app_output's pipes); default Aeterna's own. */
  stdout?: number;
  stderr?: number;
}

export interface GenerationEvents {
  exit: [info: ExitInfo];
}

export class Generation extends EventEmitter<GenerationEvents> {
  startedAt = new Date();
  exitInfo: ExitInfo | null = null;
  /** Resolves when the root process has exited and been reaped. */
  readonly exited: Promise<ExitInfo>;
  private killTimer: NodeJS.Timeout | null = null;
  /** When the SIGKILL of a stop is due (epoch ms). */
  private killAt = 0;
  private stopping: Promise<ExitInfo> | null = null;

  private constructor(
    readonly number: number,
    readonly pid: number,
    exit: Promise<ExitInfo>,
    private readonly cgroups: Cgroups | null,
    /** Its cgroup, when it has one: every process it starts is in it. */
    readonly cgroup: GenerationCgroup | null,
    /** Which instance of its generation it is (AETERNA_INSTANCE, 0 with service.instances 1). */
    readonly instance = 0,
  ) {
    super();
    this.exited = exit.then((info) => {
      this.exitInfo = info;
      if (this.killTimer) clearTimeout(this.killTimer);
      this.killStragglers();
      this.emit('exit', info);
      return info;
    });
  }

  /**
   * The generation is gone with its root: kill what is left of it. Its process
   * group first; then, with a cgroup, everything in it (and the cgroup goes).
   * Without one, processes that left the group with setsid() (as daemonizing
   * programs do) and came back to Aeterna as orphans are found by the
   * AETERNA_GENERATION they inherited (best effort: a process that rewrote its
   * environment is not found until Aeterna exits: see leftovers.ts).
   */
  private killStragglers(): void {
    signalIfAlive(-this.pid, os.constants.signals.SIGKILL);
    if (this.cgroup !== null) {
      void this.cgroups!.release(this.cgroup);
      return;
    }
    // The instance too: its sibling instances share the generation's number and go on serving.
    const instance = [`AETERNA_INSTANCE=${this.instance}`];
    for (const pid of descendantsWithEnv(process.pid, 'AETERNA_GENERATION', String(this.number), instance)) {
      signalIfAlive(pid, os.constants.signals.SIGKILL);
    }
  }

  /**
   * Start generation `number` of the service with the given fds (the listeners, then the fd store's), in a cgroup
   * of its own when `cgroups` is given (if that cgroup cannot be joined, cgroups fall back for good and it starts
   * without). With service.watchdog it gets WATCHDOG_USEC and WATCHDOG_PID. Throws E_SPAWN_FAILED.
   */
  static spawn(
    number: number,
    service: SpawnSpec,
    listeners: readonly PassedFd[],
    reaper: Reaper,
    extraEnv: Record<string, string> = {},
    cgroups: Cgroups | null = null,
    instance = 0,
  ): Generation {
    const identity = resolveIdentity(service.user, service.group);
    const watchdogEnv: Record<string, string> =
      service.watchdogMs === null ? {} : { WATCHDOG_USEC: String(service.watchdogMs * 1000) };
    const start = (cgroup: GenerationCgroup | null): number => {
      const procs = cgroup?.openProcs();
      try {
        return native.spawn({
          argv: service.command,
          env: childEnvironment(process.env, service.env, listeners, {
            AETERNA_GENERATION: String(number),
            AETERNA_INSTANCE: String(instance),
            ...watchdogEnv,
            ...extraEnv,
          }),
          cwd: service.cwd,
          fds: listeners.map((l) => l.fd),
          ...stdioOf(service, listeners),
          listenPid: listeners.length > 0,
          pidEnv: service.watchdogMs === null ? [] : ['WATCHDOG_PID'],
          uid: identity?.uid,
          gid: identity?.gid,
          groups: identity?.groups,
          cgroupProcsFd: procs,
        });
      } finally {
        if (procs !== undefined) fs.closeSync(procs);
      }
    };
    let cgroup = cgroups?.create(number, instance) ?? null;
    let pid: number;
    try {
      try {
        pid = start(cgroup);
      } catch (err) {
        // Only the cgroup's fault (cgroup.procs could not be opened or written) falls back; anything else is the app's.
        const e = err as NodeJS.ErrnoException;
        if (cgroup === null || !(e.syscall === 'write' || e.syscall === 'open')) throw err;
        cgroups!.fallBack(`cannot join ${cgroup.dir}: ${e.message}`);
        void cgroups!.release(cgroup);
        cgroup = null;
        pid = start(null);
      }
    } catch (err) {
      if (cgroup !== null) void cgroups!.release(cgroup);
      throw new AeternaError('E_SPAWN_FAILED', (err as Error).message, { cause: err });
    }
    const generation = new Generation(number, pid, reaper.watch(pid), cgroups, cgroup, instance);
    reaper.sweep(); // it may already have exited
    return generation;
  }

  /**
   * A generation a re-executed Aeterna takes over (aeterna upgrade): its process is already Aeterna's child.
   * Watch it before the reaper's first sweep, so an exit during the exec is reported, not taken for an orphan's.
   */
  static adopt(
    number: number,
    pid: number,
    startedAt: Date,
    reaper: Reaper,
    cgroups: Cgroups | null,
    cgroup: GenerationCgroup | null,
    instance = 0,
  ): Generation {
    const generation = new Generation(number, pid, reaper.watch(pid), cgroups, cgroup, instance);
    generation.startedAt = startedAt;
    return generation;
  }

  get alive(): boolean {
    return this.exitInfo === null;
  }

  /** Signal the root process only (forwarded signals such as SIGUSR1). */
  signal(signal: NodeJS.Signals | number): void {
    if (this.alive) signalIfAlive(this.pid, signalNumber(signal));
  }

  /** Signal the whole process group. */
  signalGroup(signal: NodeJS.Signals | number): void {
    if (this.alive) signalIfAlive(-this.pid, signalNumber(signal));
  }

  /** `signal` (SIGTERM; SIGABRT for a watchdog timeout) to the group, SIGKILL after timeoutMs; resolves with the exit. Idempotent. */
  stop(timeoutMs: number, signal: NodeJS.Signals = 'SIGTERM'): Promise<ExitInfo> {
    if (!this.alive) return this.exited;
    if (!this.stopping) {
      this.signalGroup(signal);
      this.killAt = Date.now() + timeoutMs;
      this.killTimer = setTimeout(() => this.signalGroup('SIGKILL'), timeoutMs);
      this.stopping = this.exited;
    }
    return this.stopping;
  }

  /**
   * A generation adopted by a re-executed Aeterna that was already told to stop (a retiring one): its SIGTERM was
   * sent by the Aeterna before the exec; only its SIGKILL is due, at `killAt` (now, when that has passed).
   */
  resumeStop(killAt: Date): Promise<ExitInfo> {
    if (!this.alive || this.stopping) return this.exited;
    const ms = Math.max(0, killAt.getTime() - Date.now());
    this.killAt = Date.now() + ms;
    this.killTimer = setTimeout(() => this.signalGroup('SIGKILL'), ms);
    this.stopping = this.exited;
    return this.stopping;
  }

  /**
   * While stopping, the app asked for more time (sd_notify EXTEND_TIMEOUT_USEC=): SIGKILL no earlier than `ms` from
   * now. Never earlier than already due; false when not stopping, or when that changes nothing.
   */
  extendStop(ms: number): boolean {
    if (!this.alive || this.killTimer === null || Date.now() + ms <= this.killAt) return false;
    clearTimeout(this.killTimer);
    this.killAt = Date.now() + ms;
    this.killTimer = setTimeout(() => this.signalGroup('SIGKILL'), ms);
    return true;
  }

  /** SIGKILL the group now (a second stop request, or a stop timeout that already passed). */
  kill(): Promise<ExitInfo> {
    this.signalGroup('SIGKILL');
    return this.exited;
  }
}

/**
 * The app's fds 0, 1, 2 when they are not Aeterna's own: service.stdin_listener (that listener also becomes fd 0)
 * and the output pipes (SpawnSpec.stdout, .stderr).
 */
function stdioOf(service: SpawnSpec, listeners: readonly PassedFd[]): { stdio?: [number, number, number] } {
  if (service.stdinListener === undefined && service.stdout === undefined && service.stderr === undefined) return {};
  let stdin = 0;
  if (service.stdinListener !== undefined) {
    const listener = listeners.find((l) => l.name === service.stdinListener);
    if (listener === undefined)
      throw new Error(`service.stdin_listener names no open listener ("${service.stdinListener}")`);
    stdin = listener.fd;
  }
  return { stdio: [stdin, service.stdout ?? 1, service.stderr ?? 2] };
}

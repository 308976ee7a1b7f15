// One generation of the app: the process tree started from service.command,
// with Aeterna's listeners at fds 3.. . A generation is a unit: it runs in its
// own session and process group, is signalled as a group, and when its root
// process exits any stragglers are killed (its group, and orphans that left
// it), so no worker of a dead generation keeps accepting on the shared sockets.
import fs from 'node:fs';
import os from 'node:os';
import { EventEmitter } from 'node:events';
import { native, type ExitInfo } from '../native/binding';
import { signalIfAlive } from './signal';
import { AeternaError } from '../errors';
import type { ServiceConfig } from '../config/types';
import { RESERVED_ENV } from '../config/checks';
import type { Listener } from '../resources/listeners';
import type { Reaper } from './reaper';
import { descendantsWithEnv } from './proctree';
import type { Cgroups, GenerationCgroup } from './cgroup';


export function signalNumber(signal: NodeJS.Signals | number): number {
  return typeof signal === 'number' ? signal : os.constants.signals[signal];
}

export function signalName(signal: number): string {
  const entry = Object.entries(os.constants.signals).find(([, n]) => n === signal);
  return entry ? entry[0] : `signal ${signal}`;
}

/** The exit code a shell would report for this exit: the code, or 128 + signal. */
export function exitCodeOf(info: ExitInfo): number {
  return info.code ?? 128 + (info.signal ?? 0);
}

export function describeExit(info: ExitInfo): string {
  return info.signal !== null ? `killed by ${signalName(info.signal)}` : `exited with code ${info.code}`;
}

/** The child's environment: Aeterna's own, then service.env, then the socket-activation variables. */
export function childEnvironment(
  base: NodeJS.ProcessEnv,
  serviceEnv: readonly string[],
  listeners: readonly Listener[],
  extra: Record<string, string>,
): string[] {
  const vars = new Map<string, string>();
  for (const [k, v] of Object.entries(base)) {
    // Variables Aeterna sets itself: inherited values are never passed on.
    if (v !== undefined && !(RESERVED_ENV as readonly string[]).includes(k)) vars.set(k, v);
  }
  for (const entry of serviceEnv) {
    const eq = entry.indexOf('=');
    vars.set(entry.slice(0, eq), entry.slice(eq + 1));
  }
  if (listeners.length > 0) {
    vars.set('LISTEN_FDS', String(listeners.length));
    vars.set('LISTEN_FDNAMES', listeners.map((l) => l.name).join(':'));
  }
  for (const [k, v] of Object.entries(extra)) vars.set(k, v);
  // LISTEN_PID is appended by the addon after fork: only the child knows its pid.
  return [...vars].map(([k, v]) => `${k}=${v}`);
}

export interface Identity {
  uid: number;
  gid: number;
  groups: number[];
}

/** Resolve service.user/group (names or numeric ids) before fork: name lookups are not async-signal-safe. */
export function resolveIdentity(user?: string | number, group?: string | number): Identity | undefined {
  if (user === undefined && group === undefined) return undefined;
  let uid = process.getuid?.() ?? 0;
  let gid = process.getgid?.() ?? 0;
  let groups: number[] = [];
  if (typeof user === 'number' || (typeof user === 'string' && /^\d+$/.test(user))) {
    uid = Number(user);
    gid = uid; // a bare uid has no passwd entry to name its group: use the same number unless service.group says otherwise
    groups = [gid];
  } else if (typeof user === 'string') {
    const found = native.lookupUser(user);
    if (!found) throw new AeternaError('E_SPAWN_FAILED', `service.user: unknown user "${user}"`);
    ({ uid, gid, groups } = found);
  }
  if (typeof group === 'number' || (typeof group === 'string' && /^\d+$/.test(group))) {
    gid = Number(group);
    groups = [gid];
  } else if (typeof group === 'string') {
    const found = native.lookupGroup(group);
    if (found === null) throw new AeternaError('E_SPAWN_FAILED', `service.group: unknown group "${group}"`);
    gid = found;
    groups = [gid];
  }
  return { uid, gid, groups };
}

export interface GenerationEvents {
  exit: [info: ExitInfo];
}

export class Generation extends EventEmitter<GenerationEvents> {
  readonly startedAt = new Date();
  exitInfo: ExitInfo | null = null;
  /** Resolves when the root process has exited and been reaped. */
  readonly exited: Promise<ExitInfo>;
  private killTimer: NodeJS.Timeout | null = null;
  private stopping: Promise<ExitInfo> | null = null;

  private constructor(
    readonly number: number,
    readonly pid: number,
    exit: Promise<ExitInfo>,
    private readonly cgroups: Cgroups | null,
    /** Its cgroup, when it has one: every process it starts is in it. */
    readonly cgroup: GenerationCgroup | null,
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
    for (const pid of descendantsWithEnv(process.pid, 'AETERNA_GENERATION', String(this.number))) {
      signalIfAlive(pid, os.constants.signals.SIGKILL);
    }
  }

  /**
   * Start generation `number` of the service with the given listeners, in a cgroup of its own when `cgroups`
   * is given (if that cgroup cannot be joined, cgroups fall back for good and it starts without). Throws E_SPAWN_FAILED.
   */
  static spawn(
    number: number,
    service: ServiceConfig,
    listeners: readonly Listener[],
    reaper: Reaper,
    extraEnv: Record<string, string> = {},
    cgroups: Cgroups | null = null,
  ): Generation {
    const identity = resolveIdentity(service.user, service.group);
    const start = (cgroup: GenerationCgroup | null): number => {
      const procs = cgroup?.openProcs();
      try {
        return native.spawn({
          argv: service.command,
          env: childEnvironment(process.env, service.env, listeners, { AETERNA_GENERATION: String(number), ...extraEnv }),
          cwd: service.cwd,
          fds: listeners.map((l) => l.fd),
          listenPid: listeners.length > 0,
          uid: identity?.uid,
          gid: identity?.gid,
          groups: identity?.groups,
          cgroupProcsFd: procs,
        });
      } finally {
        if (procs !== undefined) fs.closeSync(procs);
      }
    };
    let cgroup = cgroups?.create(number) ?? null;
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
    const generation = new Generation(number, pid, reaper.watch(pid), cgroups, cgroup);
    reaper.sweep(); // it may already have exited
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

  /** SIGTERM to the group, SIGKILL after timeoutMs; resolves with the exit. Idempotent. */
  stop(timeoutMs: number): Promise<ExitInfo> {
    if (!this.alive) return this.exited;
    if (!this.stopping) {
      this.signalGroup('SIGTERM');
      this.killTimer = setTimeout(() => this.signalGroup('SIGKILL'), timeoutMs);
      this.stopping = this.exited;
    }
    return this.stopping;
  }

  /** SIGKILL the group now (a second stop request, or a stop timeout that already passed). */
  kill(): Promise<ExitInfo> {
    this.signalGroup('SIGKILL');
    return this.exited;
  }
}

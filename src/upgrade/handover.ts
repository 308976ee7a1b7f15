// The handover of `aeterna upgrade`: everything a re-executed Aeterna needs to go
// on where the old one stopped, without touching the app. It is one JSON document
// in a sealed memfd (nobody can change it once written) whose fd number the new
// program finds in AETERNA_HANDOVER_FD. It names every fd that survives the exec,
// with its role and name: every other fd is close-on-exec and closes.
import fs from 'node:fs';
import { native } from '../native/binding';
import { AeternaError } from '../errors';
import type { Listener } from '../resources/listeners';
import type { SocketFile } from '../resources/socket-file';
import type { ReloadRecord } from '../orchestrator/types';

/** The handover version this Aeterna writes; it reads only this one (`start --check-handover` says so). */
export const HANDOVER_VERSION = 1;
/** The environment variable that carries the handover's fd number across the exec. */
export const HANDOVER_ENV = 'AETERNA_HANDOVER_FD';

/** Why Aeterna re-executed itself: `aeterna upgrade`, an uncaught exception or rejection, a fatal signal. */
export type ReexecReason = 'upgrade' | 'exception' | 'signal';

export type FdRole = 'listener' | 'control' | 'relay' | 'notify' | 'metrics' | 'fdstore';

/** One fd that survives the exec. */
export interface KeptFd {
  role: FdRole;
  name: string;
  fd: number;
}

export interface HandedGeneration {
  number: number;
  pid: number;
  pgid: number;
  /** Its role when the exec happened (an upgrade runs only while one generation serves). */
  state: 'serving';
  started_at: string;
  /** Its cgroup's directory, when it has one. */
  cgroup: string | null;
}

export interface Handover {
  version: typeof HANDOVER_VERSION;
  /** The Aeterna that wrote it. */
  from: { version: string; pid: number };
  /** Why the exec happened (aeterna_reexecs_total's label). */
  reason: ReexecReason;
  fds: KeptFd[];
  /** The listeners as the ListenerSet knows them (their fds are among `fds`). */
  listeners: Listener[];
  control: SocketFile;
  relay: SocketFile | null;
  notify: string;
  /** The fd store, oldest first: name, and whether its hangups are watched. */
  fdstore: Array<{ name: string; fd: number; watched: boolean }>;
  generations: HandedGeneration[];
  counters: { reloads: number; restarts: number; generations: number; reexecs: number; last_reload: ReloadRecord | null; started_at: string };
  /** Re-execs before this one, by reason (absent in a handover from an Aeterna that counted only upgrades). */
  reexecs_by_reason?: Partial<Record<ReexecReason, number>>;
  /** When the recent recoveries (exception, signal) happened, ISO times, within the recovery window. */
  recoveries?: string[];
}

/** Write the handover to a new sealed memfd (close-on-exec until the exec's keep list clears it); returns its fd. */
export function writeHandover(handover: Handover): number {
  const fd = native.memfdCreate('aeterna-handover');
  try {
    fs.writeSync(fd, JSON.stringify(handover));
    native.sealMemfd(fd);
  } catch (err) {
    native.close(fd);
    throw err;
  }
  return fd;
}

/** The handover whose fd `env` names, or null when there is none; the memfd is closed once read. Throws E_HANDOVER_INVALID. */
export function readHandover(env: NodeJS.ProcessEnv): Handover | null {
  const value = env[HANDOVER_ENV];
  if (value === undefined) return null;
  delete env[HANDOVER_ENV]; // the app's generations must not see it
  const fd = Number(value);
  if (!/^\d+$/.test(value) || fd < 3) throw new AeternaError('E_HANDOVER_INVALID', `${HANDOVER_ENV}=${JSON.stringify(value)} is not an fd number`);
  let parsed: unknown;
  try {
    const size = fs.fstatSync(fd).size;
    const buf = Buffer.alloc(size);
    fs.readSync(fd, buf, 0, size, 0);
    parsed = JSON.parse(buf.toString('utf8'));
  } catch (err) {
    throw new AeternaError('E_HANDOVER_INVALID', `cannot read the handover at fd ${fd} (${HANDOVER_ENV}): ${(err as Error).message}`, { cause: err });
  } finally {
    try {
      native.close(fd);
    } catch {
      // already closed
    }
  }
  const version = (parsed as { version?: unknown } | null)?.version;
  if (version !== HANDOVER_VERSION) {
    throw new AeternaError('E_HANDOVER_INVALID', `the handover at fd ${fd} has version ${JSON.stringify(version)}; this Aeterna reads version ${HANDOVER_VERSION}`);
  }
  const handover = parsed as Handover;
  // The kept fds lost close-on-exec for the exec: they must reach the app only where Aeterna places them.
  for (const kept of handover.fds) native.setCloexec(kept.fd);
  return handover;
}

/** `aeterna start --check-handover V`: whether this Aeterna can read handover version V. */
export function canReadHandover(version: string): boolean {
  return version === String(HANDOVER_VERSION);
}

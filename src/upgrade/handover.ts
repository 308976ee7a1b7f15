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
import type { CarriedStoredFd } from '../resources/fd-store';
import type { CarriedCounters, CarriedGeneration } from '../orchestrator/types';
import type { Config } from '../config/types';
import type { CarriedCheckpoint, CarriedRelayConnection, CarryReason } from '../srp/carry';

/**
 * The handover version this Aeterna writes. Version 2 added the relay connections and the in-memory checkpoint: an
 * Aeterna that reads only 1 would leave them open and unattended, so it must refuse (its check says it cannot).
 * Version 3 added the config the daemon runs with (the re-executed Aeterna runs with it, never with a file no reload
 * accepted), the previous program's argv (to come back to it when the new one cannot start) and the dry run.
 * Version 4 adds retiring generations (old generations of promoted reloads still draining) beside the serving one;
 * it is written only when there is one, so that an Aeterna that reads 3 can still be upgraded (or downgraded) to
 * whenever no old generation drains, and refuses (its check says why) when one does, rather than lose track of it.
 */
export const HANDOVER_VERSION = 3;
export const HANDOVER_VERSION_WITH_RETIRING = 4;
/** The versions this Aeterna reads (`start --check-handover` says so): versions 1 and 2 carry no config (the file is read). */
export const READABLE_HANDOVER_VERSIONS: readonly number[] = [1, 2, 3, 4];
/** The environment variable that carries the handover's fd number across the exec. */
export const HANDOVER_ENV = 'AETERNA_HANDOVER_FD';

/** Why Aeterna re-executed itself: `aeterna upgrade`, an uncaught exception or rejection, a fatal signal. */
export type ReexecReason = CarryReason;

export type FdRole =
  | 'listener'
  | 'control'
  | 'relay'
  | 'relay-connection'
  | 'checkpoint'
  | 'notify'
  | 'metrics'
  | 'fdstore'
  /** The read end of a generation's stdout or stderr pipe (observability.app_output), named "<generation>/<stream>". */
  | 'app-output';

/** One fd that survives the exec. */
export interface KeptFd {
  role: FdRole;
  name: string;
  fd: number;
}

/** A generation the next Aeterna takes over (the serving one, and any still retiring). */
export type HandedGeneration = CarriedGeneration;

export interface Handover {
  version: 1 | 2 | typeof HANDOVER_VERSION | typeof HANDOVER_VERSION_WITH_RETIRING;
  /**
   * The Aeterna that wrote it; version 3: its argv, which the new program execs with this same handover when it
   * cannot start (fallback.ts).
   */
  from: { version: string; pid: number; argv?: string[] };
  /** Why the exec happened (aeterna_reexecs_total's label). */
  reason: ReexecReason;
  fds: KeptFd[];
  /** The listeners as the ListenerSet knows them (their fds are among `fds`). */
  listeners: Listener[];
  control: SocketFile;
  relay: SocketFile | null;
  notify: string;
  /** The fd store, oldest first: name, whether its hangups are watched, and the instance (absent: 0). */
  fdstore: CarriedStoredFd[];
  generations: HandedGeneration[];
  /** Aeterna's own cgroup directory (the generations' cgroups are below it); absent or null without cgroups. */
  cgroups?: string | null;
  counters: CarriedCounters & { reexecs: number };
  /** Re-execs before this one, by reason (absent in a handover from an Aeterna that counted only upgrades). */
  reexecs_by_reason?: Partial<Record<ReexecReason, number>>;
  /** When the recent recoveries (exception, signal) happened, ISO times, within the recovery window. */
  recoveries?: string[];
  /** Version 2: the generations' idle state relay connections, and the latest checkpoint (null: none). */
  relay_connections?: CarriedRelayConnection[];
  /** Instance 0's checkpoint (the only one with service.instances 1). */
  checkpoint?: CarriedCheckpoint | null;
  /**
   * The checkpoints of instances 1 and beyond (service.instances > 1), each with its `instance`; absent when there
   * is none, so that a single-instance handover stays what an older Aeterna reads. Their fds are among `fds`.
   */
  instance_checkpoints?: CarriedCheckpoint[];
  /**
   * Version 3: the config the daemon runs with (the one its last start or promoted reload applied), as the Config
   * of this handover version. A later Aeterna that changes Config's shape bumps the version and converts it.
   */
  config?: Config;
  /**
   * Version 3: `aeterna upgrade` checks its target by starting it with a copy of the handover that says so: the
   * target loads its code, reads the handover and the config in it, answers and exits; it takes nothing over (the
   * fds it names are not passed).
   */
  dry_run?: boolean;
  /** Set when the program this was handed to could not start and came back: what it was and why (logged). */
  fell_back?: { from: string; error: string };
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
  if (!/^\d+$/.test(value) || fd < 3)
    throw new AeternaError('E_HANDOVER_INVALID', `${HANDOVER_ENV}=${JSON.stringify(value)} is not an fd number`);
  let parsed: unknown;
  try {
    const size = fs.fstatSync(fd).size;
    const buf = Buffer.alloc(size);
    fs.readSync(fd, buf, 0, size, 0);
    parsed = JSON.parse(buf.toString('utf8'));
  } catch (err) {
    throw new AeternaError(
      'E_HANDOVER_INVALID',
      `cannot read the handover at fd ${fd} (${HANDOVER_ENV}): ${(err as Error).message}`,
      { cause: err },
    );
  } finally {
    try {
      native.close(fd);
    } catch {
      // already closed
    }
  }
  const version = (parsed as { version?: unknown } | null)?.version;
  if (typeof version !== 'number' || !READABLE_HANDOVER_VERSIONS.includes(version)) {
    throw new AeternaError(
      'E_HANDOVER_INVALID',
      `the handover at fd ${fd} has version ${JSON.stringify(version)}; this Aeterna reads ${readableVersions()}`,
    );
  }
  const handover = parsed as Handover;
  // A dry run names fds it did not pass: nothing to take.
  if (handover.dry_run === true) return handover;
  // The kept fds lost close-on-exec for the exec: they must reach the app only where Aeterna places them.
  for (const kept of handover.fds) native.setCloexec(kept.fd);
  return handover;
}

/** `aeterna start --check-handover V`: whether this Aeterna can read handover version V. */
export function canReadHandover(version: string): boolean {
  return READABLE_HANDOVER_VERSIONS.some((v) => String(v) === version);
}

/** "version 1, 2 and 3", for messages. */
export function readableVersions(): string {
  const all = READABLE_HANDOVER_VERSIONS.map(String);
  return `version ${all.slice(0, -1).join(', ')} and ${all[all.length - 1]}`;
}

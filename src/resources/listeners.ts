// The resource manager: Aeterna owns the listening sockets, the app does not.
// Sockets are bound once and then only handed to each new generation as fds
// 3, 4, ...; they are never closed or re-bound during a reload, so both
// generations accept on the same kernel socket and no connection is refused.
// Aeterna itself never accepts on them. An app can still break one (shutdown(2)
// on its inherited fd acts on the shared socket): `ListenerSet.repair` notices
// that and repairs it.
import { native } from '../native/binding';
import { AeternaError } from '../errors';
import type { ListenerConfig } from '../config/types';
import type { Listener } from './listener';
import { steerToServing } from './reuseport';
import { SocketPathError, claimSocketPath, listenSocketFile, removeSocketFile } from './socket-file';

export type { Listener } from './listener';

/** listen(2) backlog when Aeterna revives an inherited socket, whose own backlog it cannot read (the kernel caps it at somaxconn). */
const INHERITED_BACKLOG = 4096;

/**
 * What is wrong with a listener: `not-listening` (TCP after shutdown(2): back to CLOSE), `shut-down` (unix after
 * shutdown(2): still LISTEN, but refuses every connection).
 */
export type ListenerProblem = 'not-listening' | 'shut-down';

/** What repairing a broken listener did. */
export interface ListenerRepair {
  listener: Listener;
  problem: ListenerProblem;
  /**
   * relistened: listen() again on the same socket, so every generation, the serving one too, accepts on it again;
   * rebound: a new socket at the same address, which the generations spawned from now on get;
   * failed: still broken (`error` says why).
   */
  result: 'relistened' | 'rebound' | 'failed';
  error?: string;
}

/** Sockets passed to Aeterna itself by systemd or another activator (sd_listen_fds semantics). */
export function inheritedListeners(env: NodeJS.ProcessEnv, pid = process.pid): Listener[] {
  if (env.LISTEN_PID === undefined || Number(env.LISTEN_PID) !== pid) return [];
  const count = Number(env.LISTEN_FDS);
  if (!Number.isInteger(count) || count <= 0 || count > 1024) return [];
  const names = (env.LISTEN_FDNAMES ?? '').split(':');
  const found: Listener[] = [];
  for (let i = 0; i < count; i++) {
    const fd = 3 + i;
    // They arrive without close-on-exec; they must reach the app only where we place them.
    native.setCloexec(fd);
    found.push({
      name: names[i] || `fd${fd}`,
      fd,
      address: 'inherited',
      inherited: true,
      watched: native.isListeningSocket(fd),
    });
  }
  return found;
}

function bindListener(config: ListenerConfig, reusePort: boolean): Listener {
  const where = `listener "${config.name}" (${config.address.raw})`;
  try {
    if (config.address.kind === 'tcp') {
      const { fd } = native.listenTcp(config.address.host, config.address.port, config.backlog, reusePort);
      const listener: Listener = {
        name: config.name,
        fd,
        address: config.address.raw,
        inherited: false,
        config,
        watched: true,
        reusePort,
      };
      if (reusePort) {
        try {
          steerToServing(listener); // checks at bind time that this kernel can steer the group
        } catch (err) {
          native.close(fd);
          throw err;
        }
      }
      return listener;
    }
    claimSocketPath(config.address.path, false); // a stale file left by a process that died is taken over
    const { fd, file } = listenSocketFile(config.address.path, config.backlog, config.mode);
    return {
      name: config.name,
      fd,
      address: config.address.raw,
      inherited: false,
      socketFile: file,
      config,
      watched: true,
    };
  } catch (err) {
    if (err instanceof AeternaError) throw err;
    if (err instanceof SocketPathError && err.problem === 'live') {
      throw new AeternaError('E_LISTEN_ADDR_IN_USE', `${where}: address already in use (${err.message})`, {
        cause: err,
      });
    }
    const e = err as NodeJS.ErrnoException;
    if (e.code === 'EADDRINUSE') {
      throw new AeternaError('E_LISTEN_ADDR_IN_USE', `${where}: address already in use`, { cause: err });
    }
    throw new AeternaError('E_LISTEN_FAILED', `${where}: ${e.message}`, { cause: err });
  }
}

export class ListenerSet {
  private listeners: Listener[] = [];
  /** Dropped from the config but maybe still used by a generation that has not gone yet. */
  private retired: Listener[] = [];

  constructor(inherited: Listener[] = []) {
    this.listeners = [...inherited];
  }

  /**
   * Make the set match the config: a listener whose name and address are
   * unchanged keeps its socket; a new one is bound; an inherited socket with a
   * configured name stands in for that entry. Order: config order, then
   * inherited sockets the config does not name. Nothing is closed here: a
   * listener dropped from the config is retired and stays open until
   * `releaseRetired` (once the generations that used it have gone), so a
   * rollback to the old config finds it again. All-or-nothing: if one bind
   * fails, the ones bound by this call are closed and the set is unchanged.
   * `reusePort` (orchestration.canary is set): new TCP sockets are bound with SO_REUSEPORT.
   */
  apply(configs: ListenerConfig[], reusePort = false): { added: Listener[]; dropped: Listener[] } {
    const known = [...this.listeners, ...this.retired];
    const next: Listener[] = [];
    const added: Listener[] = [];
    try {
      for (const config of configs) {
        const existing = known.find((l) => l.name === config.name && (l.inherited || l.address === config.address.raw));
        if (existing) {
          next.push(existing);
        } else {
          const bound = bindListener(config, reusePort);
          added.push(bound);
          next.push(bound);
        }
      }
    } catch (err) {
      for (const l of added) closeListener(l);
      throw err;
    }
    for (const l of known) {
      if (l.inherited && !next.includes(l)) next.push(l);
    }
    const dropped = this.listeners.filter((l) => !next.includes(l));
    this.retired = known.filter((l) => !next.includes(l));
    this.listeners = next;
    return { added, dropped };
  }

  /** Close the listeners no longer in the config (no generation uses them any more). */
  releaseRetired(): Listener[] {
    const released = this.retired;
    for (const l of released) closeListener(l);
    this.retired = [];
    return released;
  }

  /** The listeners in fd order (the child's fd 3 is the first). */
  list(): readonly Listener[] {
    return this.listeners;
  }

  /** What an upgrade carries (upgrade/carried.ts): every listener's fd, and the set as it is. */
  carry(): { fds: Array<{ role: 'listener'; name: string; fd: number }>; part: { listeners: Listener[] } } {
    return {
      fds: this.listeners.map((l) => ({ role: 'listener', name: l.name, fd: l.fd })),
      part: { listeners: this.listeners.map((l) => ({ ...l })) },
    };
  }

  /**
   * Check every listener in the config and repair the broken ones (an app
   * called shutdown(2) on its inherited socket). `rebind` allows a new socket
   * where listen() cannot help: only when a generation is about to be spawned,
   * since the serving one keeps the socket it has. Returns one entry per
   * broken listener found; none when all listen.
   */
  repair(rebind: boolean): ListenerRepair[] {
    const repairs: ListenerRepair[] = [];
    for (const l of this.listeners) {
      if (!l.watched) continue;
      let problem: ListenerProblem | null;
      try {
        problem = problemOf(l);
      } catch (err) {
        repairs.push({ listener: l, problem: 'not-listening', result: 'failed', error: (err as Error).message });
        continue;
      }
      if (problem) repairs.push(repairListener(l, problem, rebind));
    }
    return repairs;
  }

  /** Close every listener (Aeterna is exiting). */
  closeAll(): void {
    for (const l of [...this.listeners, ...this.retired]) closeListener(l);
    this.listeners = [];
    this.retired = [];
  }
}

/** What is wrong with a listener's socket, or null when it listens. Only looks: never accepts, never changes it. */
function problemOf(l: Listener): ListenerProblem | null {
  if (!native.isListeningSocket(l.fd)) return 'not-listening';
  return native.isReadShutdown(l.fd) ? 'shut-down' : null;
}

/**
 * Repair one broken listener. listen() again where that can work: only on a
 * socket that is not listening, so no queued connection is ever touched (TCP
 * keeps its bound port through shutdown(2), so the socket listens again where
 * it was). Otherwise, with `rebind`, bind a new socket at the same address and
 * close Aeterna's copy of the dead one; the generations keep their own copies.
 */
function repairListener(l: Listener, problem: ListenerProblem, rebind: boolean): ListenerRepair {
  let error = 'listen() again cannot revive a unix socket that was shut down';
  if (problem === 'not-listening') {
    try {
      native.listen(l.fd, l.config?.backlog ?? INHERITED_BACKLOG);
      const left = problemOf(l);
      if (left === null) return { listener: l, problem, result: 'relistened' };
      error = `listen() again left it ${left}`;
    } catch (err) {
      error = (err as Error).message;
    }
  }
  if (!rebind)
    return {
      listener: l,
      problem,
      result: 'failed',
      error: `${error}; a new socket is bound when the next generation is spawned`,
    };
  if (!l.config)
    return {
      listener: l,
      problem,
      result: 'failed',
      error: `${error}; an inherited socket cannot be bound again by Aeterna`,
    };
  try {
    const fresh = bindListener(l.config, l.reusePort === true);
    try {
      native.close(l.fd);
    } catch {
      // already closed
    }
    l.fd = fresh.fd;
    l.socketFile = fresh.socketFile;
    return { listener: l, problem, result: 'rebound' };
  } catch (err) {
    return {
      listener: l,
      problem,
      result: 'failed',
      error: `${error}; binding a new socket failed: ${(err as Error).message}`,
    };
  }
}

/** Close a listener that no generation uses any more. */
export function closeListener(l: Listener): void {
  try {
    native.close(l.fd);
  } catch {
    // already closed
  }
  if (l.socketFile) removeSocketFile(l.socketFile);
}

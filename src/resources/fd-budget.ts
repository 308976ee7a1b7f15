// Aeterna's file descriptors: the limit (RLIMIT_NOFILE), how many are open, and
// how many connections a server of Aeterna's may hold, and how many fds the fd
// store may keep, so that some fds are always free. Without a bound, clients that hold connections (to the control
// socket, to /healthz) can use up every fd; then a reload cannot even read the
// config, /healthz stops answering and the operator cannot run `aeterna stop`.
import fs from 'node:fs';
import type net from 'node:net';

/**
 * Fds kept free whatever the clients do: re-reading the config at a reload, the
 * pipes and fds of a spawn, the relay's connections and memfds, the operator's
 * own status or stop connection.
 */
export const FD_RESERVE = 32;

/** The soft RLIMIT_NOFILE (Node raises it to the hard limit at start); Infinity when unlimited or unknown. */
export function fdLimit(): number {
  try {
    const line = fs
      .readFileSync('/proc/self/limits', 'utf8')
      .split('\n')
      .find((l) => l.startsWith('Max open files'));
    const soft = Number(line?.trim().split(/\s+/)[3]);
    return Number.isInteger(soft) && soft > 0 ? soft : Infinity;
  } catch {
    return Infinity;
  }
}

/** Fds open in this process now. */
export function openFdCount(): number {
  return fs.readdirSync('/proc/self/fd').length - 1; // not the one readdir itself used
}

/**
 * How many connections one server may hold: `preferred`, or less when the fd
 * limit is low, namely a `share` of the fds left after those open now and the
 * reserve. Never below `minimum`: a server that accepts nothing serves no one.
 */
export function connectionBudget(preferred: number, share: number, minimum = 2): number {
  const spare = fdLimit() - openFdCount() - FD_RESERVE;
  const budget = Math.max(minimum, Math.min(preferred, Math.floor(spare * share)));
  claimedByServers += budget;
  return budget;
}

/** Fds the servers' connection budgets may take (each connectionBudget() claims its own): the fd store must leave them. */
let claimedByServers = 0;

/**
 * How many fds the fd store may hold: what the fd limit leaves after the fds open now (but for the `stored`
 * ones, already the store's), the reserve and every server's connection budget. Taken once the servers are up;
 * Infinity when the limit is unknown.
 */
export function fdStoreBudget(stored: number): number {
  return Math.max(0, fdLimit() - (openFdCount() - stored) - FD_RESERVE - claimedByServers);
}

/**
 * The connections of one server, at most `limit`. When full, a newcomer evicts
 * the oldest idle connection (one without a request in progress): clients that
 * hold connections without asking anything must not lock out the one who asks
 * (the operator's `aeterna status`, the kubelet's /healthz). Only when every
 * connection is busy is the newcomer turned away.
 */
export class ConnectionPool {
  /** Oldest first (a Set keeps insertion order; a connection that turns idle again goes to the end). */
  private readonly idle = new Set<net.Socket>();
  private readonly busy = new Set<net.Socket>();
  /** Connections evicted so far. */
  evicted = 0;

  constructor(readonly limit: number) {}

  get size(): number {
    return this.idle.size + this.busy.size;
  }

  /**
   * Take `socket` in as idle, evicting the oldest idle connection when full
   * (`evict` ends it). False when the pool is full of busy connections: the
   * caller turns `socket` away.
   */
  admit(socket: net.Socket, evict: (victim: net.Socket) => void): boolean {
    if (this.size >= this.limit) {
      const oldest = this.idle.values().next();
      if (oldest.done) return false;
      this.idle.delete(oldest.value);
      this.evicted++;
      evict(oldest.value);
    }
    this.idle.add(socket);
    socket.once('close', () => {
      this.idle.delete(socket);
      this.busy.delete(socket);
    });
    return true;
  }

  /** A request is in progress on `socket` (busy) or it waits for the next one (idle). */
  mark(socket: net.Socket, busy: boolean): void {
    if (!this.idle.has(socket) && !this.busy.has(socket)) return; // evicted or closed
    this.idle.delete(socket);
    this.busy.delete(socket);
    (busy ? this.busy : this.idle).add(socket);
  }
}

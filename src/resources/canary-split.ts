// The weighted canary split (orchestration.canary). Outside a soak every
// generation accepts on the one socket of each listener. For a weighted soak
// each TCP listener gets a second socket in its SO_REUSEPORT group, which only
// the candidate receives (same fd position, same LISTEN_FDNAMES), and a classic
// BPF program attached to the group picks the socket of every new connection.
//
// Socket order in a group is the kernel's: the serving socket is index 0 (the
// only member outside a soak), the candidate's joins at index 1. A member leaves
// the group when it stops listening (shutdown, not just close: a leftover
// process may still hold a copy), and the last member moves into its slot, so
// after a promotion the winner is index 0 again. An index the group does not
// have makes the kernel fall back to its hash, i.e. to the one socket left.
import fs from 'node:fs';
import { native } from '../native/binding';
import { AeternaError } from '../errors';
import type { CanaryConfig } from '../config/types';
import type { Listener } from './listener';
import { canaryUnsupported, leaveGroup, steerToServing, steeringProgram } from './reuseport';

/** Which socket of a pair: the serving generation's, or the candidate's. */
export type Side = 'old' | 'new';

interface Pair {
  listener: Listener;
  /** The candidate's socket, in the listener's reuseport group. */
  fd: number;
}

/** Where the kernel migrates a closing listener's queued connections to another member of its group (Linux 5.14+). */
const MIGRATE_SYSCTL = '/proc/sys/net/ipv4/tcp_migrate_req';

export class WeightedSplit {
  private constructor(
    private readonly pairs: Pair[],
    readonly canary: CanaryConfig,
    /** Why the kernel will not migrate a closing socket's queued connections (null: it will). */
    readonly noMigration: string | null,
    /** The percentage of new connections the candidate receives now. */
    private percent = 0,
  ) {}

  /**
   * Open the candidate's socket beside each listener, with every new connection still steered to the serving
   * one. All or nothing: E_CANARY_UNSUPPORTED names the first listener that cannot be split.
   */
  static open(listeners: readonly Listener[], canary: CanaryConfig): WeightedSplit {
    const pairs: Pair[] = [];
    try {
      for (const l of listeners) {
        if (!l.reusePort)
          throw canaryUnsupported(
            l,
            l.inherited
              ? 'an inherited socket is not in a reuseport group Aeterna made'
              : 'it was bound before orchestration.canary was set; restart Aeterna to bind it with SO_REUSEPORT',
          );
        steerToServing(l);
        pairs.push({ listener: l, fd: native.listenBeside(l.fd, l.config?.backlog ?? 511) });
      }
    } catch (err) {
      for (const p of pairs) leaveGroup(p.fd);
      if (err instanceof AeternaError) throw err;
      throw new AeternaError(
        'E_LISTEN_FAILED',
        `orchestration.canary: a second socket for the candidate: ${(err as Error).message}`,
        { cause: err },
      );
    }
    return new WeightedSplit(pairs, canary, enableMigration());
  }

  /** The listeners as the candidate gets them: same names and order, its own sockets. */
  candidateListeners(): Listener[] {
    return this.pairs.map((p) => ({ ...p.listener, fd: p.fd }));
  }

  /** The share of new connections the candidate receives now (0..100). */
  get weight(): number {
    return this.percent;
  }

  /** Send `percent` of new connections to the candidate (0: all to the serving one; 100: all to the candidate). */
  steer(percent: number): void {
    const program = steeringProgram(percent, this.canary.affinity);
    for (const p of this.pairs) native.attachReuseportProgram(p.listener.fd, program);
    this.percent = percent;
  }

  /** Connections waiting in the accept queues of one side. */
  queued(side: Side): number {
    let total = 0;
    for (const p of this.pairs) {
      try {
        total += native.acceptQueueLength(side === 'old' ? p.listener.fd : p.fd);
      } catch {
        // not listening: nothing can wait in it
      }
    }
    return total;
  }

  /** Resolves once the side's accept queues are empty twice in a row, `intervalMs` apart (its process keeps accepting meanwhile). */
  async drained(side: Side, intervalMs = 20, stillWanted: () => boolean = () => true): Promise<void> {
    let empty = 0;
    while (empty < 2 && stillWanted()) {
      empty = this.queued(side) === 0 ? empty + 1 : 0;
      await new Promise((r) => setTimeout(r, intervalMs));
    }
  }

  /** The candidate won and the old generation is gone: its sockets become the listeners', the old ones leave the groups. */
  promote(): void {
    for (const p of this.pairs) {
      leaveGroup(p.listener.fd);
      p.listener.fd = p.fd;
      steerToServing(p.listener);
    }
  }

  /** The candidate lost and is gone: its sockets leave the groups. */
  discard(): void {
    for (const p of this.pairs) {
      leaveGroup(p.fd);
      steerToServing(p.listener);
    }
  }
}

/**
 * Ask the kernel to move connections still queued on a closing listener to another socket of its group
 * (net.ipv4.tcp_migrate_req, in Aeterna's network namespace). The drain wait is the first safety; this is
 * the second, for a candidate that dies with connections in its queue. Returns why it is off, or null.
 */
function enableMigration(): string | null {
  let value: string;
  try {
    value = fs.readFileSync(MIGRATE_SYSCTL, 'utf8').trim();
  } catch {
    return 'this kernel has no net.ipv4.tcp_migrate_req (Linux 5.14+)';
  }
  if (value === '1') return null;
  try {
    fs.writeFileSync(MIGRATE_SYSCTL, '1');
    return null;
  } catch (err) {
    // A container's /proc/sys is often read-only: the runtime has to set it (docker run --sysctl, a pod's sysctls).
    return `net.ipv4.tcp_migrate_req is ${value} and Aeterna cannot set it (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`;
  }
}

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
import type { Listener } from './listeners';

/** Which socket of a pair: the serving generation's, or the candidate's. */
export type Side = 'old' | 'new';

interface Pair {
  listener: Listener;
  /** The candidate's socket, in the listener's reuseport group. */
  fd: number;
}

/** Where the kernel migrates a closing listener's queued connections to another member of its group (Linux 5.14+). */
const MIGRATE_SYSCTL = '/proc/sys/net/ipv4/tcp_migrate_req';

// Classic BPF (linux/filter.h): the opcodes the programs below use.
const BPF_LD_W_ABS = 0x20; // k = SKF_AD_OFF + n loads an ancillary value, SKF_NET_OFF + n the network header
const BPF_JA = 0x05;
const BPF_ALU_MUL_K = 0x24;
const BPF_ALU_XOR_X = 0xac;
const BPF_MISC_TAX = 0x07;
const BPF_JEQ_K = 0x15;
const BPF_JGE_K = 0x35;
const BPF_RET_K = 0x06;
const SKF_AD_OFF = -0x1000;
const SKF_AD_PROTOCOL = 0;
const SKF_AD_RANDOM = 56;
const SKF_NET_OFF = -0x100000;
const ETH_P_IP = 0x0800;
/** Knuth's multiplicative hash: spreads addresses that differ in their low bits (10.0.0.1, 10.0.0.2) over the whole range. */
const GOLDEN = 2654435761;

type Insn = [code: number, jt: number, jf: number, k: number];

/**
 * The program for `percent` (0..100) of new connections to the candidate (index 1), the rest to index 0.
 * Random per connection, or (client_ip) by a hash of the client's address: IPv4 source, or the XOR of the
 * four words of an IPv6 source. A 32-bit value at or above the threshold picks the serving socket.
 */
export function steeringProgram(percent: number, affinity: CanaryConfig['affinity']): Buffer {
  let insns: Insn[];
  if (percent <= 0 || percent >= 100) {
    insns = [[BPF_RET_K, 0, 0, percent >= 100 ? 1 : 0]];
  } else {
    const threshold = Math.floor((percent / 100) * 2 ** 32);
    const pick: Insn[] = [
      [BPF_JGE_K, 1, 0, threshold],
      [BPF_RET_K, 0, 0, 1],
      [BPF_RET_K, 0, 0, 0],
    ];
    if (affinity === 'none') {
      insns = [[BPF_LD_W_ABS, 0, 0, SKF_AD_OFF + SKF_AD_RANDOM], ...pick];
    } else {
      const v6: Insn[] = [
        [BPF_LD_W_ABS, 0, 0, SKF_NET_OFF + 8],
        [BPF_MISC_TAX, 0, 0, 0],
        ...[12, 16, 20].flatMap((off): Insn[] => [
          [BPF_LD_W_ABS, 0, 0, SKF_NET_OFF + off],
          [BPF_ALU_XOR_X, 0, 0, 0],
          [BPF_MISC_TAX, 0, 0, 0],
        ]),
      ];
      insns = [
        [BPF_LD_W_ABS, 0, 0, SKF_AD_OFF + SKF_AD_PROTOCOL],
        [BPF_JEQ_K, 0, 2, ETH_P_IP],
        [BPF_LD_W_ABS, 0, 0, SKF_NET_OFF + 12],
        [BPF_JA, 0, 0, v6.length],
        ...v6,
        [BPF_ALU_MUL_K, 0, 0, GOLDEN],
        ...pick,
      ];
    }
  }
  const buf = Buffer.alloc(insns.length * 8);
  insns.forEach(([code, jt, jf, k], i) => {
    buf.writeUInt16LE(code, i * 8); // struct sock_filter is host-endian; Linux on x86-64 and arm64 is little-endian
    buf.writeUInt8(jt, i * 8 + 2);
    buf.writeUInt8(jf, i * 8 + 3);
    buf.writeUInt32LE(k >>> 0, i * 8 + 4);
  });
  return buf;
}

function unsupported(l: Listener, why: string, cause?: unknown): AeternaError {
  return new AeternaError('E_CANARY_UNSUPPORTED', `orchestration.canary: listener "${l.name}" (${l.address}) cannot be split by weight: ${why}`, { cause });
}

/** Steer every new connection of `l`'s group to index 0, the serving socket; also the check that this kernel can steer at all. */
export function steerToServing(l: Listener): void {
  try {
    native.attachReuseportProgram(l.fd, steeringProgram(0, 'none'));
  } catch (err) {
    throw unsupported(l, `the kernel refused SO_ATTACH_REUSEPORT_CBPF (${(err as Error).message}); a weighted canary needs Linux 4.5 or later`, err);
  }
}

/** Take a socket out of its reuseport group for good and close Aeterna's copy. */
function leaveGroup(fd: number): void {
  try {
    native.shutdownListener(fd);
  } catch {
    // not listening any more
  }
  try {
    native.close(fd);
  } catch {
    // already closed
  }
}

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
        if (!l.reusePort) throw unsupported(l, l.inherited ? 'an inherited socket is not in a reuseport group Aeterna made' : 'it was bound before orchestration.canary was set; restart Aeterna to bind it with SO_REUSEPORT');
        steerToServing(l);
        pairs.push({ listener: l, fd: native.listenBeside(l.fd, l.config?.backlog ?? 511) });
      }
    } catch (err) {
      for (const p of pairs) leaveGroup(p.fd);
      if (err instanceof AeternaError) throw err;
      throw new AeternaError('E_LISTEN_FAILED', `orchestration.canary: a second socket for the candidate: ${(err as Error).message}`, { cause: err });
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

// Steering a SO_REUSEPORT group: the classic BPF program that picks the socket
// of every new connection (index 0 the serving socket, index 1 the candidate's),
// and leaving a group. The listener set uses it to check at bind time that the
// kernel can steer; the weighted canary split (canary-split.ts) to steer.
import { native } from '../native/binding';
import { AeternaError } from '../errors';
import type { CanaryConfig } from '../config/types';
import type { Listener } from './listener';

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

export function canaryUnsupported(l: Listener, why: string, cause?: unknown): AeternaError {
  return new AeternaError(
    'E_CANARY_UNSUPPORTED',
    `orchestration.canary: listener "${l.name}" (${l.address}) cannot be split by weight: ${why}`,
    { cause },
  );
}

/** Steer every new connection of `l`'s group to index 0, the serving socket; also the check that this kernel can steer at all. */
export function steerToServing(l: Listener): void {
  try {
    native.attachReuseportProgram(l.fd, steeringProgram(0, 'none'));
  } catch (err) {
    throw canaryUnsupported(
      l,
      `the kernel refused SO_ATTACH_REUSEPORT_CBPF (${(err as Error).message}); a weighted canary needs Linux 4.5 or later`,
      err,
    );
  }
}

/** Take a socket out of its reuseport group for good and close Aeterna's copy. */
export function leaveGroup(fd: number): void {
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

// What one component carries across Aeterna's exec (an upgrade, a recovery). Each
// component that outlives the exec (the listeners, the control, notify and relay
// sockets, the metrics endpoint, the fd store, the cgroups, the orchestrator) says
// what it carries the same way: the fds it keeps open, and its fields of the
// handover. The carrier (carrier.ts) merges them into one handover document.
//
// The components implement this by shape, without importing it: they sit below
// upgrade/ and must not import upward. Their carry() is checked against it where
// the daemon hands them to the carrier.
import type { Handover, KeptFd, ReexecReason } from './handover';

/** A component's fields of the handover; the counters come without `reexecs` (the carrier counts those). */
export type CarriedPart = Partial<Omit<Handover, 'counters'>> & { counters?: Omit<Handover['counters'], 'reexecs'> };

/** What a component carries: the fds the exec keeps open (their role and name), and its fields of the handover. */
export interface Carry {
  fds: KeptFd[];
  part: CarriedPart;
}

export interface Carried {
  /**
   * What the next Aeterna takes over from this component. Throws when it cannot be carried now (the orchestrator
   * during a reload; the relay at an upgrade while a connection is busy): the exec does not happen.
   */
  carry(reason: ReexecReason): Carry;
  /** Why it cannot be carried whole now (an upgrade waits for it; a crash goes without it), or null. */
  busyReason?(): string | null;
  /** Resolves once busyReason() is null; rejects with the reason after `timeoutMs`. */
  whenIdle?(timeoutMs: number): Promise<void>;
  /** An upgrade is about to exec: take nothing in that carry() would miss. thaw() undoes it (the exec failed). */
  freeze?(): void;
  thaw?(): void;
  /** Calls `listener` when what carry() returns has changed: the prepared signal handover is rewritten. */
  onCarryChanged?(listener: () => void): void;
}

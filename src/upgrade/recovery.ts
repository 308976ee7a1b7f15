// Recovery from Aeterna's own crash: an uncaught exception or a fatal signal re-executes
// Aeterna in place with the handover, like `aeterna upgrade`, so the app never notices.
// A recovery that keeps recurring means something is deeply wrong: after more than
// RECOVERY_LIMIT within RECOVERY_WINDOW_MS, Aeterna gives up (E_RECOVERY_LOOP).
import type { Handover, ReexecReason } from './handover';

/** Recoveries allowed within RECOVERY_WINDOW_MS; one more and Aeterna gives up. */
export const RECOVERY_LIMIT = 5;
export const RECOVERY_WINDOW_MS = 60_000;

/** The fault-injection hook's variable: only Aeterna's tests set it (see docs/operations.md). */
export const TEST_FAULT_ENV = 'AETERNA_TEST_FAULT';
/**
 * The faults the hook knows: thrown (or rejected) inside the daemon when it answers `status`; or, in a re-executed
 * Aeterna, thrown during its start before it takes over (it must come back to the previous program).
 */
export type TestFault = 'throw-on-status' | 'reject-on-status' | 'throw-before-takeover';
const TEST_FAULTS: readonly string[] = ['throw-on-status', 'reject-on-status', 'throw-before-takeover'];

/** The fault the hook should inject, or null (the normal case). Taken out of `env`: once, and the app never sees it. */
export function takeTestFault(env: NodeJS.ProcessEnv): TestFault | null {
  const value = env[TEST_FAULT_ENV];
  delete env[TEST_FAULT_ENV];
  return value !== undefined && TEST_FAULTS.includes(value) ? (value as TestFault) : null;
}

/** Throw (or reject) outside any caller that could catch it, as a bug in the daemon would. */
export function injectFault(fault: Exclude<TestFault, 'throw-before-takeover'>): void {
  const err = new Error(`${TEST_FAULT_ENV}=${fault}: a fault injected inside the daemon`);
  setImmediate(() => {
    if (fault === 'throw-on-status') throw err;
    void Promise.reject(err);
  });
}

/** The recoveries within the window ending `now`, this exec included when it is one. */
export function recentRecoveries(handover: Handover | null, now: Date): string[] {
  if (!handover) return [];
  const since = now.getTime() - RECOVERY_WINDOW_MS;
  const earlier = (handover.recoveries ?? []).filter((t) => Date.parse(t) > since);
  return handover.reason === 'upgrade' ? earlier : [...earlier, now.toISOString()];
}

/** Re-execs by reason, this one included. */
export function reexecsByReason(handover: Handover | null): Partial<Record<ReexecReason, number>> {
  if (!handover) return {};
  const before = handover.reexecs_by_reason ?? { upgrade: handover.counters.reexecs };
  return { ...before, [handover.reason]: (before[handover.reason] ?? 0) + 1 };
}

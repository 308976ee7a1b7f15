// The last step before Aeterna exits: end every process that is still its
// child. As PID 1 or a subreaper, Aeterna adopts every orphan below it, so
// whatever escaped attribution to a generation (a daemon that left its session
// and environment behind, where there are no cgroups) is its child by now; and
// the supervisor starts nothing but the app (no child_process), so every child
// is the app's. Ending a child may orphan its own children to Aeterna: each
// round looks again.
import os from 'node:os';
import { signalIfAlive } from './signal';
import type { Reaper } from './reaper';
import { childrenOf } from './proctree';

const POLL_MS = 20;
const KILL_ROUNDS = 250;

function pause(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    signal?.addEventListener('abort', done, { once: true });
    function done(): void {
      clearTimeout(timer);
      signal?.removeEventListener('abort', done);
      resolve();
    }
  });
}

/**
 * SIGTERM every child, and each child that appears meanwhile, until none is left or timeoutMs has passed (or
 * `hurry` is aborted); then SIGKILL until none is left (at most KILL_ROUNDS rounds). Reaps them. Resolves with the pids that were signalled.
 */
export async function endLeftovers(reaper: Reaper, timeoutMs: number, hurry?: AbortSignal): Promise<number[]> {
  const signalled = new Set<number>();
  const deadline = performance.now() + timeoutMs;
  // A process in uninterruptible sleep ignores even SIGKILL: never wait for one forever.
  let killRounds = 0;
  for (;;) {
    reaper.sweep();
    const children = childrenOf(process.pid);
    const terminating = performance.now() < deadline && !hurry?.aborted;
    if (children.length === 0 || (!terminating && killRounds++ === KILL_ROUNDS)) return [...signalled];
    for (const pid of children) {
      if (!terminating) signalIfAlive(pid, os.constants.signals.SIGKILL);
      else if (!signalled.has(pid)) signalIfAlive(pid, os.constants.signals.SIGTERM);
      signalled.add(pid);
    }
    await pause(
      terminating ? Math.min(POLL_MS, Math.max(1, deadline - performance.now())) : POLL_MS,
      terminating ? hurry : undefined,
    );
  }
}

/** SIGKILL every child now, without waiting (Aeterna is exiting on an internal error). */
export function killLeftovers(): void {
  for (const pid of childrenOf(process.pid)) signalIfAlive(pid, os.constants.signals.SIGKILL);
}

// service.restart: what to do when the serving app exits between reloads.
// Restarts back off exponentially (the listeners stay bound meanwhile, so
// clients queue in the backlog instead of being refused); more than
// max_restarts within `window` is a crash loop, and Aeterna exits non-zero so
// the container platform sees it.
import { formatDuration } from '../config/duration';
import type { ServiceConfig } from '../config/types';
import type { ExitInfo } from '../native/binding';
import { describeExit, exitCodeOf } from '../supervisor/exit';

export const BACKOFF_BASE_MS = 100;
export const BACKOFF_MAX_MS = 10_000;

export type RestartDecision =
  | { restart: true; delayMs: number; attempt: number }
  | { restart: false; crashLoop: boolean; reason: string; exitCode: number };

export class RestartBudget {
  private recent: number[] = [];

  constructor(private policy: ServiceConfig['restart']) {}

  /** A reload may change service.restart; the history carries over. */
  update(policy: ServiceConfig['restart']): void {
    this.policy = policy;
  }

  /**
   * `neverReady`: Aeterna stopped the app because it did not become ready in time. That is a failure
   * whatever code the app exits with after our SIGTERM (often 0): `on-failure` restarts it.
   */
  decide(exit: ExitInfo, now = Date.now(), neverReady = false): RestartDecision {
    const code = neverReady && exitCodeOf(exit) === 0 ? 1 : exitCodeOf(exit);
    if (this.policy.policy === 'never') {
      return {
        restart: false,
        crashLoop: false,
        reason: `app ${describeExit(exit)}; restart policy is "never"`,
        exitCode: code,
      };
    }
    if (this.policy.policy === 'on-failure' && code === 0 && !neverReady) {
      return {
        restart: false,
        crashLoop: false,
        reason: 'app exited with code 0; restart policy is "on-failure"',
        exitCode: 0,
      };
    }
    this.recent = this.recent.filter((t) => now - t < this.policy.windowMs);
    if (this.recent.length >= this.policy.maxRestarts) {
      return {
        restart: false,
        crashLoop: true,
        reason:
          `crash loop: app ${describeExit(exit)} ` +
          `after ${this.recent.length} restarts within ${formatDuration(this.policy.windowMs)} (max_restarts ${this.policy.maxRestarts})`,
        exitCode: code === 0 ? 1 : code,
      };
    }
    const attempt = this.recent.length + 1;
    this.recent.push(now);
    return { restart: true, attempt, delayMs: Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** (attempt - 1)) };
  }
}

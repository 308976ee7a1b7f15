// Keeps the listeners listening. An app that calls shutdown(2) on its inherited
// socket breaks Aeterna's socket too (it is one kernel socket), and connections
// are refused from then on. The watch checks every listener at each spawn (a
// reload, a restart), on each /healthz and /readyz, and every CHECK_INTERVAL_MS;
// it repairs what it can (ListenerSet.repair), logs it and counts it. A listener
// that stays broken is reported by /healthz and /readyz until it is repaired.
import type { Logger } from '../log';
import type { ListenerRepair, ListenerSet } from './listeners';

/** Told of every repair and of every first failure to repair (the metrics count them). */
export type OnRepair = (listener: string, result: ListenerRepair['result']) => void;

/** How often the listeners are checked between spawns and probes (two syscalls per listener). */
export const CHECK_INTERVAL_MS = 5000;

const PROBLEMS: Record<ListenerRepair['problem'], string> = {
  'not-listening': 'had stopped listening (shutdown(2) on it?)',
  'shut-down': 'was shut down (shutdown(2) on it) and refused every connection',
};

const REPAIRS: Record<Exclude<ListenerRepair['result'], 'failed'>, string> = {
  relistened: 'listening again on the same socket',
  rebound: 'bound a new socket at the same address for the generations spawned from now on',
};

export class ListenerWatch {
  /** Listeners that are broken and could not be repaired: name -> what /healthz says about it. */
  private broken = new Map<string, string>();
  private timer: NodeJS.Timeout | null = null;

  constructor(
    private readonly listeners: ListenerSet,
    private readonly onRepair: OnRepair,
    private readonly log: Logger,
  ) {}

  /**
   * Check every listener now and repair the broken ones; `rebind` only when a
   * generation is about to be spawned (see ListenerSet.repair). A failure is
   * logged and counted once per breakage, not at every check. Returns what is
   * still broken, one line per listener.
   */
  check(trigger: string, rebind = false): string[] {
    const stillBroken = new Map<string, string>();
    for (const r of this.listeners.repair(rebind)) {
      const l = r.listener;
      const fields = { listener: l.name, address: l.address, fd: l.fd, problem: r.problem, result: r.result, trigger };
      const what = `listener "${l.name}" (${l.address}) ${PROBLEMS[r.problem]}`;
      if (r.result === 'failed') {
        const line = `listener "${l.name}" (${l.address}): ${r.problem}, not repaired: ${r.error}`;
        if (!this.broken.has(l.name)) {
          this.log.error({ ...fields, code: 'E_LISTEN_FAILED' }, `${what}; not repaired: ${r.error}`);
          this.onRepair(l.name, r.result);
        }
        stillBroken.set(l.name, line);
      } else {
        this.log.warn(fields, `${what}; repaired: ${REPAIRS[r.result]}`);
        this.onRepair(l.name, r.result);
      }
    }
    this.broken = stillBroken;
    return [...stillBroken.values()];
  }

  /** Check periodically until `stop`. */
  start(): void {
    if (this.timer) return;
    this.timer = setInterval(() => this.check('periodic'), CHECK_INTERVAL_MS);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }
}

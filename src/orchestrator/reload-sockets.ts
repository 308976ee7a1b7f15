// The listening sockets across a reload: the listeners a reload's config adds are bound before its new generation
// starts (all or nothing), those it drops are closed only once no generation that may use them still runs, a failed
// or rolled back reload gets the old set back; and with orchestration.canary, the weighted split that steers new
// connections between the two generations. Apart from the orchestrator so that what a reload does to a socket reads
// in one place (listeners are never closed during a reload); it holds no state of its own.
import type { CanaryConfig, Config } from '../config/types';
import type { Logger } from '../log';
import type { Metrics } from '../monitor/metrics';
import type { Listener, ListenerSet } from '../resources/listeners';
import type { Side } from '../resources/canary-split';
import type { CanarySplit, ReloadRun } from './reload-run';

/** What the sockets of a reload need of the orchestrator. */
export interface ReloadSocketsHost {
  readonly listeners: Pick<ListenerSet, 'apply' | 'list' | 'releaseRetired'>;
  /** Open a weighted canary split of `listeners` (WeightedSplit.open). */
  readonly split: (listeners: readonly Listener[], canary: CanaryConfig) => CanarySplit;
  readonly log: Logger;
  readonly metrics: Pick<Metrics, 'setCanaryWeight'>;
  /** How many old generations of promoted reloads still drain (they may use a dropped listener). */
  retiringCount(): number;
  /** Whether `run` is the reload in flight. */
  current(run: ReloadRun): boolean;
}

export class ReloadSockets {
  constructor(private readonly host: ReloadSocketsHost) {}

  /**
   * 2. Bind the listeners that are new in `run`'s config (all or nothing), and open its canary split. Throws when a
   * listener cannot be bound or the split cannot be opened: the caller restores the old set.
   */
  bindNew(run: ReloadRun): void {
    const host = this.host;
    const { added, dropped } = host.listeners.apply(
      run.config.service.listeners,
      run.config.orchestration.canary !== null,
    );
    const canary = run.config.orchestration.canary;
    if (canary && run.config.orchestration.strategy === 'canary') run.split = host.split(host.listeners.list(), canary);
    if (run.split?.noMigration) {
      host.log.warn(
        { reload: run.record.id },
        `orchestration.canary: ${run.split.noMigration}; ` +
          `if the new generation dies during the soak, the connections waiting in its socket's accept queue are reset`,
      );
    }
    for (const l of added)
      host.log.info({ listener: l.name, address: l.address, fd: l.fd, reload: run.record.id }, 'listener added');
    for (const l of dropped)
      host.log.info(
        { listener: l.name, reload: run.record.id },
        'listener dropped from config: closed once the old generation is gone',
      );
  }

  /**
   * After a failed or rolled back reload: the listener set of `config`; those bound for the failed one are closed,
   * and so is its canary split `split`.
   */
  restore(config: Config, split: CanarySplit | null | undefined): void {
    split?.discard();
    try {
      this.host.listeners.apply(config.service.listeners, config.orchestration.canary !== null);
      this.releaseRetired();
    } catch (err) {
      this.host.log.error({ err }, 'restoring the listener set after a rollback failed');
    }
  }

  /**
   * Close the listeners dropped from the config, once no old generation that may use them still drains (called as
   * a reload ends, and when the last retiring generation exits between reloads).
   */
  releaseRetired(): void {
    if (this.host.retiringCount() > 0) return;
    for (const l of this.host.listeners.releaseRetired()) this.host.log.info({ listener: l.name }, 'listener closed');
  }

  /**
   * A weighted split ends: every new connection to `winner`, then wait until the loser's accept queue is empty
   * (its process keeps accepting meanwhile), so stopping it refuses nothing. No split: nothing to wait for.
   */
  async settleSplit(run: ReloadRun, winner: Side): Promise<void> {
    if (!run.split) return;
    this.steer(run.split, winner === 'new' ? 100 : 0);
    await run.split.drained(winner === 'new' ? 'old' : 'new', 20, () => this.host.current(run));
  }

  /** `percent` of new connections to the new generation, and the canary weight metric with it. */
  steer(split: CanarySplit, percent: number): void {
    split.steer(percent);
    this.host.metrics.setCanaryWeight(percent > 0 && percent < 100 ? percent : 0);
  }
}

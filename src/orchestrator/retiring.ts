// Retiring generations: the old generations of promoted reloads, still draining in the background. A reload ends
// at its promotion (once the final state sync settled), not when its old generation exits: that one already has
// its SIGTERM (SIGKILL after its stop_timeout, as Generation.stop arranged) and is only waited for here. None of
// them serves new traffic, their exit is no crash, and orchestration.max_generations bounds how many generations
// are alive at once: a reload that needs room kills the oldest ones first.
import { formatDuration } from '../config/duration';
import type { Logger } from '../log';
import type { Metrics } from '../monitor/metrics';
import type { Generation } from '../supervisor/generation';
import type { RetiringInfo } from './types';

interface Retiring {
  gen: Generation;
  /** When it got SIGTERM, and when its SIGKILL is due (its stop_timeout later, or when it was killed to make room). */
  since: Date;
  deadline: Date;
  /** Killed to make room: no longer counted against the bound, only waited for. */
  killed: boolean;
}

export class RetiringGenerations {
  /** Oldest first. */
  private list: Retiring[] = [];

  constructor(
    private readonly log: Logger,
    private readonly metrics: Metrics,
  ) {}

  /** `gen` got SIGTERM at `since`, SIGKILL is due at `deadline`: it drains on in the background. */
  add(gen: Generation, since: Date, deadline: Date): void {
    this.list.push({ gen, since, deadline, killed: false });
    this.metrics.setRetiring(this.list.length);
  }

  /** How long `gen` has drained when it is a retiring generation, else null. */
  drainedMs(gen: Generation): number | null {
    const r = this.list.find((x) => x.gen === gen);
    return r ? Date.now() - r.since.getTime() : null;
  }

  /** `gen` exited: forget it. Whether it was a retiring generation. */
  exited(gen: Generation): boolean {
    const before = this.list.length;
    this.list = this.list.filter((r) => r.gen !== gen);
    if (this.list.length === before) return false;
    this.metrics.setRetiring(this.list.length);
    return true;
  }

  get count(): number {
    return this.list.length;
  }

  generations(): Generation[] {
    return this.list.map((r) => r.gen);
  }

  /** The ones alive, oldest first, with when each got SIGTERM and when its SIGKILL is due (what a re-exec carries). */
  alive(): Array<{ gen: Generation; since: Date; deadline: Date }> {
    return this.list.filter((r) => r.gen.alive).map(({ gen, since, deadline }) => ({ gen, since, deadline }));
  }

  /**
   * Make room for one more generation beside `others` alive (the serving one): kill (SIGKILL) the oldest retiring
   * ones until at most `max` are alive, each with a warning naming it, its pid and how long it drained.
   */
  makeRoom(max: number, others: number, reload: string): void {
    const counted = this.list.filter((r) => !r.killed && r.gen.alive);
    // A generation counts once, however many instances it has (each is an entry here): its instances go together.
    const numbers = [...new Set(counted.map((r) => r.gen.number))];
    let excess = others + numbers.length + 1 - max;
    for (const number of numbers) {
      if (excess-- <= 0) return;
      for (const r of counted.filter((x) => x.gen.number === number)) this.killToMakeRoom(r, max, reload);
    }
  }

  private killToMakeRoom(r: Retiring, max: number, reload: string): void {
    const drainedMs = Date.now() - r.since.getTime();
    this.log.warn(
      { reload, generation: r.gen.number, child: r.gen.pid, drained_ms: drainedMs, max_generations: max },
      `killing retiring generation ${r.gen.number} (pid ${r.gen.pid}) after ${formatDuration(drainedMs)} of draining: ` +
        `orchestration.max_generations is ${max}, and ${reload} starts a new generation`,
    );
    r.killed = true;
    r.deadline = new Date();
    this.metrics.retiringKilled();
    void r.gen.kill();
  }

  /** For status and the reload record: the ones alive, oldest first. */
  info(): RetiringInfo[] {
    return this.list
      .filter((r) => r.gen.alive)
      .map((r) => ({
        generation: r.gen.number,
        pid: r.gen.pid,
        draining_since: r.since.toISOString(),
        kill_deadline: r.deadline.toISOString(),
      }));
  }
}

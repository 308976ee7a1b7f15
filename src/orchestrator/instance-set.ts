// The instances of one generation (service.instances): N process trees of the same generation number on the same
// listeners, instance i with AETERNA_INSTANCE=i; the kernel spreads the connections accepted on a shared socket over
// them. Each instance is a Generation of its own (its process group, cgroup, relay connection, readiness and
// watchdog), so what works per process tree works per instance unchanged; this set is what the orchestrator holds as
// the serving generation, a reload's candidate and the one draining. An instance restarted alone (after a crash)
// takes its predecessor's slot and the generation's number.
import type { ExitInfo } from '../native/binding';
import type { Generation } from '../supervisor/generation';

export class InstanceSet {
  /** By instance number; a slot is empty until its instance is started (a rolling reload fills them batch by batch). */
  private readonly slots: Array<Generation | undefined>;

  constructor(
    readonly number: number,
    /** service.instances of the config it was started with. */
    readonly size: number,
  ) {
    this.slots = new Array<Generation | undefined>(size).fill(undefined);
  }

  /** `gen` is instance `instance` from now on (its first start, or a restart alone). */
  put(instance: number, gen: Generation): void {
    this.slots[instance] = gen;
  }

  /** Once none of its instances runs: the first one's exit (what Aeterna exits with after a stop), else null. */
  get exitInfo(): ExitInfo | null {
    return this.alive ? null : (this.all[0]?.exitInfo ?? null);
  }

  at(instance: number): Generation | undefined {
    return this.slots[instance];
  }

  /** Its instance number, or -1 when `gen` is none of this set's current instances. */
  indexOf(gen: Generation): number {
    return this.slots.indexOf(gen);
  }

  has(gen: Generation): boolean {
    return this.slots.includes(gen);
  }

  /** The instances started so far, by instance number. */
  get all(): Generation[] {
    return this.slots.filter((g): g is Generation => g !== undefined);
  }

  get live(): Generation[] {
    return this.all.filter((g) => g.alive);
  }

  /** Whether any of its instances runs. */
  get alive(): boolean {
    return this.live.length > 0;
  }

  /** The first running instance's root pid (instance 0's while it runs): "the" pid status and reload records name. */
  get pid(): number {
    return (this.live[0] ?? this.all[0])?.pid ?? 0;
  }

  get startedAt(): Date {
    return this.all[0]?.startedAt ?? new Date();
  }

  /** stop() every running instance (SIGTERM to each group, SIGKILL after timeoutMs); resolves once all exited. */
  async stop(timeoutMs: number, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    await Promise.all(this.live.map((g) => g.stop(timeoutMs, signal)));
  }

  async kill(): Promise<void> {
    await Promise.all(this.live.map((g) => g.kill()));
  }

  /** Signal each instance's root process. */
  signal(signal: NodeJS.Signals | number): void {
    for (const g of this.live) g.signal(signal);
  }

  /** Signal each instance's process group. */
  signalGroup(signal: NodeJS.Signals | number): void {
    for (const g of this.live) g.signalGroup?.(signal);
  }
}

/** "generation 3" with one instance, "generation 3 instance 1" with more: how logs and reasons name an instance of `set`. */
export function instanceName(gen: Generation, set: InstanceSet | null): string {
  return set !== null && set.size > 1
    ? `generation ${gen.number} instance ${set.indexOf(gen)}`
    : `generation ${gen.number}`;
}

// The latest checkpoint of each instance (service.instances; docs/srp.md,
// "Checkpoints"): a CheckpointStore per instance number, so that instance i
// stores and loads its own state, never another instance's. Instance 0's store
// is the one a single-instance app always had (the file at `path`, the
// handover's `checkpoint`); instance i > 0 writes `<path>.<i>`. Each store holds
// what one does (its latest memfd, the one being written, the one being
// received), so the total is bounded by service.instances x max_size.
import nodePath from 'node:path';
import type { CheckpointConfig } from '../config/types';
import { AeternaError } from '../errors';
import type { Logger } from '../log';
import { isTempOf } from './checkpoint-file';
import { closeQuietly } from './codec';
import { CheckpointStore, type CarriedCheckpoint, type Checkpoint } from './checkpoint-store';

/** The durable file of instance `instance`'s checkpoints: `path` itself for instance 0, `<path>.<instance>` beyond. */
export function instanceCheckpointPath(path: string, instance: number): string {
  return instance === 0 ? path : `${path}.${instance}`;
}

/**
 * Whether `file` is the checkpoint file of an instance beyond 0 of `path` (`<path>.<i>`), or one of its temporary
 * files: Aeterna's own, which orchestration.watch never reloads for.
 */
export function isInstanceCheckpointFile(path: string, file: string): boolean {
  if (nodePath.dirname(file) !== nodePath.dirname(path)) return false;
  const base = nodePath.basename(path);
  const name = nodePath.basename(file);
  if (name.startsWith(`${base}.`)) return /^[1-9]\d*$/.test(name.slice(base.length + 1));
  const temp = /^([1-9]\d*)\.\d+\.\d+\.tmp$/.exec(name.startsWith(`.${base}.`) ? name.slice(base.length + 2) : '');
  return temp !== null && isTempOf(instanceCheckpointPath(path, Number(temp[1])), name);
}

export class InstanceCheckpoints {
  /** By instance number; created at start for the configured instances, later for an instance a reload added. */
  private readonly stores = new Map<number, CheckpointStore>();

  /**
   * The stores of instances 0..instances-1, each with the checkpoint the previous Aeterna handed over (aeterna
   * upgrade) or else its file. A file at an instance's path that Aeterna did not write refuses the start.
   */
  constructor(
    readonly config: CheckpointConfig,
    private readonly log: Logger,
    instances: number,
    handed: CarriedCheckpoint[] = [],
  ) {
    const byInstance = new Map(handed.map((h) => [h.instance ?? 0, h]));
    try {
      // A handed-over checkpoint of an instance number beyond the config's is kept too: the app's data is not dropped.
      const numbers = new Set([...Array(Math.max(1, instances)).keys(), ...byInstance.keys()]);
      for (const i of [...numbers].sort((a, b) => a - b)) this.create(i, byInstance.get(i) ?? null, true);
    } catch (err) {
      this.close();
      for (const h of handed) if (!this.stores.has(h.instance ?? 0)) closeQuietly(h.fd); // no store took it
      throw err;
    }
  }

  /** Instance `instance`'s store, created on first use (an instance a reload added loads its file then). */
  of(instance: number): CheckpointStore {
    const store = this.stores.get(instance);
    if (store) return store;
    try {
      return this.create(instance, null, true);
    } catch (err) {
      // A file Aeterna did not write at that instance's path: not read, and every durable write of it is refused.
      if (!(err instanceof AeternaError)) throw err;
      this.log.error({ instance, code: err.code }, err.message);
      return this.create(instance, null, false);
    }
  }

  /** Instance `instance`'s latest checkpoint, or null (without creating its store). */
  current(instance: number): Checkpoint | null {
    return this.stores.get(instance)?.current ?? null;
  }

  /** The most recently stored checkpoint of any instance, with its instance number, or null. */
  latest(): { instance: number; checkpoint: Checkpoint } | null {
    let found: { instance: number; checkpoint: Checkpoint } | null = null;
    for (const [instance, store] of this.stores) {
      const c = store.current;
      if (c && (found === null || c.savedAt > found.checkpoint.savedAt)) found = { instance, checkpoint: c };
    }
    return found;
  }

  /** Every instance's latest checkpoint for what a re-exec carries, by instance number (`instance` set beyond 0). */
  carry(): CarriedCheckpoint[] {
    const carried: CarriedCheckpoint[] = [];
    for (const [instance, store] of [...this.stores].sort(([a], [b]) => a - b)) {
      const c = store.carry();
      if (c) carried.push(instance === 0 ? c : { ...c, instance });
    }
    return carried;
  }

  close(): void {
    for (const store of this.stores.values()) store.close();
  }

  private create(instance: number, handed: CarriedCheckpoint | null, readFile: boolean): CheckpointStore {
    const config =
      this.config.path === null
        ? this.config
        : { ...this.config, path: instanceCheckpointPath(this.config.path, instance) };
    // Instance 0 logs as a single-instance app always did; the others say which instance.
    const log = instance === 0 ? this.log : this.log.child({ instance });
    const store = new CheckpointStore(config, log, handed, readFile);
    this.stores.set(instance, store);
    return store;
  }
}

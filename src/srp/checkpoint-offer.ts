// An instance's latest checkpoint offered as its initial load (docs/srp.md,
// "Checkpoints"): to a generation (instance i of one, with service.instances)
// with no live predecessor, or whose predecessor could not dump; instance i is
// offered instance i's checkpoint, never another instance's.
// A checkpoint the app cannot load is offered again a few times, then set aside.
import type { ErrorCode } from '../errors';
import type { Logger } from '../log';
import type { Generation } from '../supervisor/generation';
import { closeQuietly } from './codec';
import { readAt } from './checkpoint-file';
import type { InstanceCheckpoints } from './checkpoint-instances';
import type { Checkpoint, CheckpointStore } from './checkpoint-store';
import { drained } from './fd-stream';
import { carryChanged, type RelayEmitter, type Session } from './session';

/**
 * Times a checkpoint is offered as an initial load that the app refuses (`ack` ok:false) or dies after before it
 * is ready: then it is set aside, never offered again (docs/srp.md, "Checkpoints").
 */
export const MAX_CHECKPOINT_LOAD_TRIES = 2;
/** A stored checkpoint is streamed to an "fds": false client in reads of this size (at most max_frame). */
const CHECKPOINT_CHUNK = 1 << 20;

/** "generation 3", or "generation 3 instance 1" beyond instance 0: how the logs name it. */
function nameOf(gen: Generation): string {
  return gen.instance > 0 ? `generation ${gen.number} instance ${gen.instance}` : `generation ${gen.number}`;
}

/** `{ instance }` for the log fields of an instance beyond 0. */
function instanceField(gen: Generation): { instance?: number } {
  return gen.instance > 0 ? { instance: gen.instance } : {};
}

export class CheckpointOffers {
  /** The checkpoint each generation was offered as its initial load, until it is known to have loaded it or not. */
  private readonly offered = new WeakMap<Generation, { seq: number; judged: boolean }>();
  /** By instance: how often its latest checkpoint failed to load (refused, or the app died before it was ready). */
  private readonly loadFailures = new Map<number, { seq: number; count: number }>();

  constructor(
    private readonly checkpoints: InstanceCheckpoints,
    private readonly maxFrame: number,
    private readonly log: Logger,
    private readonly events: RelayEmitter,
  ) {}

  /**
   * The initial load of a generation with no live predecessor (or whose predecessor could not dump): the latest
   * checkpoint as a sealed memfd, streamed to a client that cannot take one, or empty. Returns its size.
   */
  send(s: Session): number {
    const store = this.storeOf(s.gen!);
    const latest = store.openLatest();
    if (!latest) {
      s.conn.send({ op: 'load', size: 0 });
      return 0;
    }
    const { checkpoint: c, fd } = latest;
    const age = Date.now() - c.savedAt;
    const how = s.noFds ? 'streamed' : 'memfd';
    this.log.info(
      { generation: s.gen!.number, ...instanceField(s.gen!), seq: c.seq, size: c.size, age_ms: age, transport: how },
      'checkpoint: offered as the initial load',
    );
    this.offered.set(s.gen!, { seq: c.seq, judged: false });
    if (s.noFds) {
      void this.stream(s, store, c, fd, age);
      return c.size;
    }
    s.conn.send(
      {
        op: 'load',
        size: c.size,
        encoding: c.encoding,
        transport: 'memfd',
        fds: ['state'],
        source: 'checkpoint',
        seq: c.seq,
        age_ms: age,
      },
      [fd],
      { closeFds: true },
    );
    return c.size;
  }

  /**
   * A client whose hello said "fds": false gets the checkpoint's bytes as data frames, with its sha256, read from
   * our memfd a chunk at a time (off the event loop, waiting for the client's queue to drain: bounded memory).
   */
  private async stream(s: Session, store: CheckpointStore, c: Checkpoint, fd: number, age: number): Promise<void> {
    s.receivingCheckpoint = true;
    try {
      const sha256 = c.size > 0 ? await store.digest(c, fd) : undefined;
      if (s.conn.closed) return;
      s.conn.send({
        op: 'load',
        size: c.size,
        encoding: c.encoding,
        ...(sha256 ? { sha256 } : {}),
        source: 'checkpoint',
        seq: c.seq,
        age_ms: age,
      });
      const chunk = Math.min(this.maxFrame, CHECKPOINT_CHUNK);
      for (let off = 0; off < c.size && !s.conn.closed;) {
        const buffer = Buffer.allocUnsafe(Math.min(chunk, c.size - off)); // its own: the stream may hold it queued
        const { bytesRead } = await readAt(fd, buffer, buffer.length, off);
        if (bytesRead === 0) throw new Error(`checkpoint ended after ${off} of ${c.size} bytes`);
        off += bytesRead;
        if (!s.conn.sendData(buffer.subarray(0, bytesRead), chunk) && !s.conn.closed) await drained(s.conn.stream);
      }
    } catch (err) {
      this.log.error(
        { generation: s.gen?.number, err: (err as Error).message },
        'checkpoint: could not be streamed to the client; its connection is closed',
      );
      s.conn.close(err as Error);
    } finally {
      s.receivingCheckpoint = false;
      closeQuietly(fd);
      carryChanged(s, this.events);
    }
  }

  /** The store of `gen`'s instance: its checkpoint is what it is offered. */
  private storeOf(gen: Pick<Generation, 'instance'>): CheckpointStore {
    return this.checkpoints.of(gen.instance);
  }

  /** `gen` answered its initial load: the seq of the checkpoint it was offered (a refusal counts against it), or null. */
  answered(gen: Generation, ok: boolean, error: string | undefined): number | null {
    const offer = this.offered.get(gen);
    if (offer && !offer.judged && !ok) {
      offer.judged = true;
      this.loadFailed(gen.instance, offer.seq, `${nameOf(gen)} refused it (${error ?? 'no reason given'})`);
    }
    return offer ? offer.seq : null;
  }

  /** A generation started with no live predecessor became ready, or exited before it was. */
  startOutcome(gen: Generation, ready: boolean): void {
    const offer = this.offered.get(gen);
    if (!offer || offer.judged) return;
    offer.judged = true;
    if (ready) {
      // It loads: the tries start over.
      if (this.loadFailures.get(gen.instance)?.seq === offer.seq) this.loadFailures.delete(gen.instance);
    } else {
      this.loadFailed(gen.instance, offer.seq, `${nameOf(gen)} exited before it was ready`);
    }
  }

  /**
   * Instance `instance`'s checkpoint `seq` failed to load once more: at MAX_CHECKPOINT_LOAD_TRIES it is set aside
   * and that instance starts fresh.
   */
  private loadFailed(instance: number, seq: number, why: string): void {
    const store = this.storeOf({ instance });
    if (store.current?.seq !== seq) return; // a newer one was stored since: that one is offered next
    const failures = this.loadFailures.get(instance);
    const count = failures?.seq === seq ? failures.count + 1 : 1;
    this.loadFailures.set(instance, { seq, count });
    const which = instance > 0 ? { instance } : {};
    if (count < MAX_CHECKPOINT_LOAD_TRIES) {
      this.log.warn(
        { seq, ...which, tries: count },
        `checkpoint ${seq} did not load: ${why}; try ${count} of ${MAX_CHECKPOINT_LOAD_TRIES}, it is offered again`,
      );
      return;
    }
    this.loadFailures.delete(instance);
    this.events.emit('checkpoint', 'set_aside');
    this.events.emit('carry'); // the checkpoint memfd is gone
    void store.setAside(seq).then((movedTo) => {
      this.log.error(
        {
          code: 'E_CHECKPOINT_REFUSED' satisfies ErrorCode,
          seq,
          ...which,
          tries: count,
          ...(movedTo ? { moved_to: movedTo } : {}),
        },
        `checkpoint ${seq} set aside after ${count} failed loads (last: ${why}); ` +
          `it is never offered again${movedTo ? ` (its file is now ${movedTo})` : ''}: the app starts without a checkpoint`,
      );
    });
  }
}

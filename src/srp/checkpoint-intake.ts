// Checkpoints coming in (docs/srp.md, "Checkpoints"): the app stores its latest
// state in Aeterna at any time, as a memfd or streamed into one (nothing is
// buffered here), as the checkpoint of the instance its connection speaks for. Each is answered with `checkpointed`, in order, once durable;
// an app that sends faster than they are stored, or does not read its answers,
// is not read until they are.
import { native } from '../native/binding';
import type { Logger } from '../log';
import { SrpError, closeQuietly } from './codec';
import type { InstanceCheckpoints } from './checkpoint-instances';
import { CheckpointRefused, type CheckpointStore } from './checkpoint-store';
import { drained } from './fd-stream';
import type { Message, StateHeader, TrailerDigest } from './messages';
import { carryChanged, type RelayEmitter, type Session } from './session';

/**
 * Checkpoints of one connection not answered yet (waiting for their durable write, or for the answers before
 * them): at this many, Aeterna stops reading that connection until one is answered (docs/srp.md, "Checkpoints").
 */
export const MAX_CHECKPOINTS_IN_FLIGHT = 8;

/** `{ instance }` for the log fields of an instance beyond 0 (a single-instance app logs as it always did). */
function instanceField(s: Session): { instance?: number } {
  const instance = (s.gen ?? s.owner).instance;
  return instance > 0 ? { instance } : {};
}

/** An empty sealed memfd: an empty checkpoint is stored like any other. */
function emptyMemfd(): number {
  const fd = native.memfdCreate('aeterna-checkpoint');
  native.sealMemfd(fd);
  return fd;
}

export class CheckpointIntake {
  constructor(
    private readonly checkpoints: InstanceCheckpoints,
    private readonly log: Logger,
    private readonly events: RelayEmitter,
  ) {}

  /** The store of the instance `s` speaks for: a checkpoint of instance i's process is instance i's. */
  private storeOf(s: Session): CheckpointStore {
    return this.checkpoints.of((s.gen ?? s.owner).instance);
  }

  /** A `checkpoint` header: stored at once (memfd, empty), or its data frames follow (and its trailer, if announced). */
  begin(s: Session, m: StateHeader, fds: number[]): void {
    if (s.receivingCheckpoint) throw new SrpError('unexpected_op', `"checkpoint" is not valid now (${s.phase})`);
    const extra = fds.filter((_, i) => (m.fds ?? [])[i] !== 'state');
    extra.forEach(closeQuietly); // a checkpoint carries bytes, not the app's other fds
    const streamed = m.transport !== 'memfd' && m.size > 0;
    if (!streamed) {
      let seq: number;
      try {
        seq =
          m.transport === 'memfd'
            ? this.storeOf(s).adopt(fds[(m.fds ?? []).indexOf('state')], m)
            : this.storeOf(s).adopt(emptyMemfd(), m);
      } catch (err) {
        return this.refuse(s, err);
      }
      return this.stored(s, seq);
    }
    s.checkpoint = { writer: null, refused: null };
    try {
      s.checkpoint.writer = this.storeOf(s).begin(m);
    } catch (err) {
      if (!(err instanceof CheckpointRefused)) throw err;
      s.checkpoint.refused = err; // its bytes are still coming: read and dropped, then refused
    }
  }

  /** Part of a streamed checkpoint: into its memfd at once (nothing is buffered here). */
  data(s: Session, payload: Buffer, remaining: number): void {
    const c = s.checkpoint!;
    try {
      c.writer?.write(payload);
    } catch (err) {
      c.writer?.discard();
      c.writer = null;
      c.refused ??= new CheckpointRefused('bad_state', `could not store the checkpoint: ${(err as Error).message}`);
    }
    if (remaining === 0 && !s.conn.trailerDue) this.end(s);
  }

  /** The streamed checkpoint's trailer: its sha256. */
  trailer(s: Session, m: TrailerDigest): void {
    if (m.sha256 === undefined) throw new SrpError('bad_json', 'trailer: a checkpoint is checked with "sha256"');
    this.end(s, m.sha256);
  }

  /** The connection closed mid-stream: the previous checkpoint stays. */
  cutShort(s: Session): void {
    if (!s.checkpoint) return;
    s.checkpoint.writer?.discard();
    s.checkpoint = null;
    this.log.warn(
      { generation: s.gen?.number },
      'checkpoint cut short (the connection closed mid-stream); the previous one stays',
    );
    this.events.emit('checkpoint', 'cut_short');
  }

  private end(s: Session, trailerSha?: string): void {
    const c = s.checkpoint!;
    s.checkpoint = null;
    if (c.refused || !c.writer) return this.refuse(s, c.refused);
    let seq: number;
    try {
      seq = c.writer.finish(trailerSha);
    } catch (err) {
      return this.refuse(s, err);
    }
    this.stored(s, seq);
  }

  /** Answered once it is stored (durably, with `path`). */
  private stored(s: Session, seq: number): void {
    const store = this.storeOf(s);
    const c = store.current!;
    s.answering += 1;
    this.throttle(s);
    this.events.emit('carry'); // a new checkpoint memfd (the previous one is closed)
    store.persist(seq).then(
      () => {
        this.log.info({ generation: s.gen!.number, ...instanceField(s), seq, size: c.size }, 'checkpoint stored');
        this.events.emit('checkpoint', 'stored');
        this.answer(s, { op: 'checkpointed', seq });
      },
      (err: Error) => {
        // Its turn in line is now: answered at once (waiting for the writes asked since would answer it after them).
        this.refuse(
          s,
          new CheckpointRefused(
            'write_failed',
            `checkpoint ${seq} could not be written to ${store.config.path} (the file keeps the previous one): ${err.message}`,
          ),
          true,
        );
        s.answering -= 1; // answered by the refusal
      },
    );
  }

  /** `now`: the answers before it are out already (otherwise it waits for the durable writes under way). */
  private refuse(s: Session, err: unknown, now = false): void {
    if (!(err instanceof CheckpointRefused)) throw err;
    this.log.warn(
      { generation: s.gen!.number, ...instanceField(s), code: err.code },
      `checkpoint refused: ${err.message}`,
    );
    this.events.emit('checkpoint', err.code);
    // Answers go out in the order of the checkpoints: after any durable write still under way.
    s.answering += 1;
    this.throttle(s);
    const answer = { op: 'checkpointed' as const, code: err.code, message: err.message };
    if (now) this.answer(s, answer);
    else
      void this.storeOf(s)
        .afterWrites()
        .then(() => this.answer(s, answer));
  }

  private answer(s: Session, m: Message): void {
    s.answering -= 1;
    if (!s.conn.closed && !s.conn.send(m) && !s.answersBlocked) {
      // The app does not read its answers: read no more of its checkpoints until it does.
      s.answersBlocked = true;
      void drained(s.conn.stream).then(() => {
        s.answersBlocked = false;
        this.throttle(s);
      });
    }
    this.throttle(s);
    carryChanged(s, this.events);
  }

  /**
   * Backpressure on checkpoints: at MAX_CHECKPOINTS_IN_FLIGHT unanswered (or answers the app does not read),
   * stop reading its connection; read again once one is answered. Memory and fds stay bounded, nothing is lost.
   */
  private throttle(s: Session): void {
    const full = s.answering >= MAX_CHECKPOINTS_IN_FLIGHT || s.answersBlocked;
    if (full && !s.checkpointsThrottled) {
      s.checkpointsThrottled = true;
      s.conn.pause();
    } else if (!full && s.checkpointsThrottled) {
      s.checkpointsThrottled = false;
      s.conn.resume();
    }
  }
}

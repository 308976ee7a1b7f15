// The latest checkpoint of the app (docs/srp.md, "Checkpoints"), kept outside
// Aeterna's JS heap: a streamed checkpoint is written into a memfd Aeterna owns
// as its bytes arrive (hashed on the way), a memfd checkpoint is kept as the fd
// itself. Only a complete, verified checkpoint within max_size replaces the
// previous one; whatever else happens, the previous one stays.
//
// Durable writes (with `path`) go one at a time, and only the newest checkpoint
// is written: one superseded before its write started is answered once a newer
// one is on disk. So however many checkpoints an app pipelines, Aeterna holds at
// most the latest memfd and the one being written (and one being received).
import crypto from 'node:crypto';
import fs from 'node:fs';
import { native } from '../native/binding';
import type { CheckpointConfig } from '../config/types';
import { AeternaError, type ErrorCode } from '../errors';
import type { Logger } from '../log';
import {
  CheckpointFileCorrupt,
  CheckpointFileForeign,
  CheckpointFileTooLarge,
  fileSeq,
  hashFd,
  readCheckpointFile,
  removeLeftoverTemps,
  writeCheckpointFile,
  type Checkpoint,
} from './checkpoint-file';
import { closeQuietly, isSealedState } from './codec';
import type { StateHeader } from './messages';

/** An instance's latest checkpoint, a sealed memfd (among the handover's `fds`, role 'checkpoint'). */
export interface CarriedCheckpoint {
  fd: number;
  /** Which instance stored it (service.instances); absent: instance 0 (the handover's `checkpoint`). */
  instance?: number;
  seq: number;
  size: number;
  encoding: string;
  sha256?: string;
  /** When it was stored (ISO time): its age goes on. */
  saved_at: string;
}

/** Why a checkpoint was refused: the code the client gets in `checkpointed`. */
export type CheckpointRefusal = 'disabled' | 'too_large' | 'checksum_mismatch' | 'bad_state' | 'write_failed';

export class CheckpointRefused extends Error {
  constructor(
    readonly code: CheckpointRefusal,
    message: string,
  ) {
    super(message);
    this.name = 'CheckpointRefused';
  }
}

export type { Checkpoint };

/** A streamed checkpoint being received: written into its own memfd, never visible until finish() verified it. */
export class CheckpointWriter {
  private readonly fd: number;
  private readonly hash = crypto.createHash('sha256');
  private written = 0;

  constructor(
    private readonly store: CheckpointStore,
    readonly header: StateHeader,
  ) {
    this.fd = native.memfdCreate('aeterna-checkpoint');
  }

  /** Bytes as they arrive (a view of the read buffer: written out at once, never kept). */
  write(payload: Buffer): void {
    for (let off = 0; off < payload.length;)
      off += fs.writeSync(this.fd, payload, off, payload.length - off, this.written + off);
    this.hash.update(payload);
    this.written += payload.length;
  }

  /** All bytes arrived (and the trailer's digest, when announced): verify, seal and store. Returns the new seq. */
  finish(trailerSha?: string): number {
    const expected = this.header.sha256 ?? trailerSha;
    const actual = this.hash.digest('hex');
    if (this.written !== this.header.size) {
      this.discard();
      throw new CheckpointRefused('bad_state', `received ${this.written} bytes, ${this.header.size} announced`);
    }
    if (this.header.size > 0 && expected !== actual) {
      this.discard();
      throw new CheckpointRefused(
        'checksum_mismatch',
        `sha256 of the ${this.written} bytes received is not ${expected}`,
      );
    }
    native.sealMemfd(this.fd);
    return this.store.replace(this.fd, this.header, actual);
  }

  /** Cut short or refused: the previous checkpoint stays. */
  discard(): void {
    closeQuietly(this.fd);
  }
}

export class CheckpointStore {
  private latest: Checkpoint | null = null;
  /** The seq of the last checkpoint taken: numbering goes on after one is set aside. */
  private lastSeq = 0;
  /** Durable writes, one after the other, so `checkpointed` answers go out in order. */
  private writes: Promise<void> = Promise.resolve();
  /** The newest seq on disk (with `path`): an answer for an older one waits for nothing more. */
  private writtenSeq = 0;
  /** The last write that failed: a later answer for the same latest checkpoint gets its error without a new try. */
  private failedWrite: { seq: number; error: Error } | null = null;
  /** Aborted at close(): a durable write under way removes its temporary file. */
  private readonly stopping = new AbortController();

  /**
   * `handed`: the checkpoint the previous Aeterna held (aeterna upgrade): it is the latest, the file is not read.
   * `readFile` false: the file at `config.path` is not loaded (one Aeterna did not write: its writes are refused).
   */
  constructor(
    readonly config: CheckpointConfig,
    private readonly log: Logger,
    handed: CarriedCheckpoint | null = null,
    readFile = true,
  ) {
    if (handed) this.adoptHanded(handed);
    else if (config.enabled && config.path !== null && readFile) this.loadFile(config.path);
    this.lastSeq = this.latest?.seq ?? 0;
    this.writtenSeq = handed ? 0 : this.lastSeq;
  }

  private adoptHanded(h: CarriedCheckpoint): void {
    if (!this.config.enabled) {
      closeQuietly(h.fd); // checkpoints were turned off in the config the new Aeterna read
      return;
    }
    let size: number;
    try {
      size = fs.fstatSync(h.fd).size;
    } catch (err) {
      this.log.error(
        { seq: h.seq },
        `checkpoint ${h.seq} handed over at fd ${h.fd} cannot be read: ${(err as Error).message}; the app has no checkpoint`,
      );
      return;
    }
    if (!isSealedState(h.fd) || size !== h.size) {
      closeQuietly(h.fd);
      this.log.error(
        { seq: h.seq },
        `checkpoint ${h.seq} handed over at fd ${h.fd} is not the sealed ${h.size} bytes it should be; the app has no checkpoint`,
      );
      return;
    }
    this.latest = {
      fd: h.fd,
      size: h.size,
      seq: h.seq,
      encoding: h.encoding,
      savedAt: Date.parse(h.saved_at),
      ...(h.sha256 ? { sha256: h.sha256 } : {}),
    };
  }

  /** The latest checkpoint for what a re-exec carries (its memfd stays ours until the exec), or null. */
  carry(): CarriedCheckpoint | null {
    const c = this.latest;
    if (!c) return null;
    return {
      fd: c.fd,
      seq: c.seq,
      size: c.size,
      encoding: c.encoding,
      ...(c.sha256 ? { sha256: c.sha256 } : {}),
      saved_at: new Date(c.savedAt).toISOString(),
    };
  }

  /**
   * The durable file of a previous Aeterna, offered to generation 1. A file Aeterna did not write (no checkpoint
   * magic, or not a regular file) refuses the start: it is never renamed nor replaced. A corrupt one of its own is
   * set aside as `<path>.corrupt`; one above max_size is left where it is, not loaded.
   */
  private loadFile(file: string): void {
    for (const temp of removeLeftoverTemps(file))
      this.log.info(
        { path: temp },
        'checkpoint: removed the temporary file of a write an earlier Aeterna did not finish',
      );
    try {
      const loaded = readCheckpointFile(file, this.config.maxSizeBytes);
      if (!loaded) return;
      this.latest = loaded;
      this.log.info({ path: file, seq: loaded.seq, size: loaded.size }, 'checkpoint loaded from its file');
    } catch (err) {
      if (err instanceof CheckpointFileForeign) {
        throw new AeternaError(
          'E_CONFIG_INVALID',
          `orchestration.state_handoff.checkpoint.path: ${err.message}; ` +
            `Aeterna never renames or replaces a file it did not write: move that file, or choose another path`,
        );
      }
      if (err instanceof CheckpointFileTooLarge) {
        this.log.error(
          { code: 'E_CHECKPOINT_CORRUPT' satisfies ErrorCode, path: file },
          `checkpoint file ${file} not loaded: ${err.message}; left where it is, the app starts without a checkpoint`,
        );
        return;
      }
      if (!(err instanceof CheckpointFileCorrupt)) {
        this.log.error(
          { code: 'E_CHECKPOINT_CORRUPT' satisfies ErrorCode, path: file },
          `checkpoint file ${file} cannot be read: ${(err as Error).message}; the app starts without a checkpoint`,
        );
        return;
      }
      const aside = `${file}.corrupt`;
      const moved = this.moveAside(file, aside);
      this.log.error(
        { code: 'E_CHECKPOINT_CORRUPT' satisfies ErrorCode, path: file, ...(moved ? { moved_to: aside } : {}) },
        `checkpoint file ${file} ignored: ${err.message}; the app starts without a checkpoint`,
      );
    }
  }

  /** Rename a checkpoint file of Aeterna's own out of the way, unless `aside` names a file Aeterna did not write. */
  private moveAside(file: string, aside: string): boolean {
    try {
      if (fs.existsSync(aside) && fileSeq(aside) === null) return false; // someone else's file: left alone
      fs.renameSync(file, aside);
      return true;
    } catch {
      return false; // left where it is: the next durable checkpoint replaces it
    }
  }

  /**
   * The app could not load checkpoint `seq` (it refused it, or died before it was ready, too often): it is never
   * offered again. Dropped from memory; its file, once the writes under way are done, renamed to `<path>.refused`
   * so a new `aeterna start` does not offer it either. The next checkpoint the app sends is numbered on.
   */
  setAside(seq: number): Promise<string | null> {
    if (this.latest?.seq === seq) {
      closeQuietly(this.latest.fd);
      this.latest = null;
    }
    const file = this.config.path;
    if (file === null) return Promise.resolve(null);
    const done = this.writes.then(() => {
      // Only the file that holds that very checkpoint: an older or newer one is another checkpoint.
      if (this.latest !== null || fileSeq(file) !== seq) return null;
      const aside = `${file}.refused`;
      return this.moveAside(file, aside) ? aside : null;
    });
    this.writes = done.then(() => undefined);
    return done;
  }

  /** Resolves once the durable writes asked so far are done: an answer sent then keeps its place in line. */
  afterWrites(): Promise<void> {
    return this.writes;
  }

  /**
   * With `path`, resolves once checkpoint `seq`, or a newer one, is on disk (in the order asked); rejects when
   * it could not be written (it stays the latest in memory). Only the latest checkpoint is ever written: one
   * superseded before its turn is covered by the newer one. Without `path`, resolves at once.
   */
  persist(seq: number): Promise<void> {
    const file = this.config.path;
    if (file === null || this.latest?.seq !== seq) return Promise.resolve();
    const write = this.writes.then(() => this.writeLatest(file, seq));
    this.writes = write.catch(() => undefined);
    return write;
  }

  private async writeLatest(file: string, seq: number): Promise<void> {
    if (this.writtenSeq >= seq) return; // a newer checkpoint is on disk already
    const c = this.latest;
    if (!c || c.seq < seq) throw new Error(`checkpoint ${seq} was set aside`);
    if (this.failedWrite?.seq === c.seq) throw this.failedWrite.error; // tried already: one try per checkpoint
    // Our own open file description: a later checkpoint may close c.fd while this one is still being written.
    const fd = fs.openSync(`/proc/self/fd/${c.fd}`, 'r');
    try {
      await writeCheckpointFile(file, { ...c, fd }, this.stopping.signal);
      this.writtenSeq = c.seq;
    } catch (err) {
      this.failedWrite = { seq: c.seq, error: err as Error };
      throw err;
    } finally {
      closeQuietly(fd);
    }
  }

  get current(): Checkpoint | null {
    return this.latest;
  }

  /** A streamed checkpoint is announced. Throws CheckpointRefused when it cannot be taken (its bytes are then dropped). */
  begin(header: StateHeader): CheckpointWriter {
    this.admit(header.size);
    return new CheckpointWriter(this, header);
  }

  /** A memfd checkpoint: kept as the fd itself (ours now, closed on refusal). Returns the new seq. */
  adopt(memfd: number, header: StateHeader): number {
    try {
      this.admit(header.size);
      if (!isSealedState(memfd))
        throw new CheckpointRefused('bad_state', 'memfd checkpoint is not sealed against write, shrink and grow');
      const size = fs.fstatSync(memfd).size;
      if (size !== header.size)
        throw new CheckpointRefused('bad_state', `memfd checkpoint has ${size} bytes, ${header.size} announced`);
    } catch (err) {
      closeQuietly(memfd);
      throw err;
    }
    return this.replace(memfd, header);
  }

  /** Takes a verified, sealed fd as the latest checkpoint; `sha256` only when Aeterna hashed the bytes itself. */
  replace(fd: number, header: StateHeader, sha256?: string): number {
    const seq = ++this.lastSeq;
    if (this.latest) closeQuietly(this.latest.fd);
    this.latest = {
      fd,
      size: header.size,
      seq,
      encoding: header.encoding ?? 'binary',
      savedAt: Date.now(),
      ...(sha256 ? { sha256 } : {}),
    };
    return seq;
  }

  /** The sha256 of checkpoint `c` (hex): hashed off the event loop the first time, then kept with it. */
  async digest(c: Checkpoint, fd: number): Promise<string> {
    c.sha256 ??= (await hashFd(fd, c.size)).toString('hex');
    return c.sha256;
  }

  /**
   * The latest checkpoint with an fd of its own to send (a new open file description of the memfd, so each
   * reader starts at offset 0), or null.
   */
  openLatest(): { checkpoint: Checkpoint; fd: number } | null {
    const c = this.latest;
    if (!c) return null;
    return { checkpoint: c, fd: fs.openSync(`/proc/self/fd/${c.fd}`, 'r') /* Node opens close-on-exec */ };
  }

  close(): void {
    this.stopping.abort(); // a durable write under way removes its temporary file now
    if (this.latest) closeQuietly(this.latest.fd);
    this.latest = null;
  }

  private admit(size: number): void {
    if (!this.config.enabled)
      throw new CheckpointRefused('disabled', 'checkpoints are off (orchestration.state_handoff.checkpoint.enabled)');
    if (size > this.config.maxSizeBytes) {
      throw new CheckpointRefused(
        'too_large',
        `checkpoint of ${size} bytes exceeds orchestration.state_handoff.checkpoint.max_size (${this.config.maxSizeBytes} bytes)`,
      );
    }
  }
}

// SRP framing: a 4-byte big-endian length, then that many bytes (docs/srp.md).
// The decoder checks a frame's length against the limit before it buffers the
// frame, and ties fds that arrived with SCM_RIGHTS to the frame that starts in
// the bytes they rode on, so a control frame can claim exactly the fds it names.
import { native } from '../native/binding';

export const HEADER_BYTES = 4;
const EMPTY = Buffer.alloc(0);
/** SCM_MAX_FD: the kernel's limit of fds in one message. */
export const MAX_FDS_PER_FRAME = 253;

export type SrpErrorCode =
  | 'forbidden'
  | 'bad_frame'
  | 'too_large'
  | 'bad_json'
  | 'unexpected_op'
  | 'unsupported_version'
  | 'busy'
  | 'checksum_mismatch'
  | 'timeout';

/** A protocol violation: answered with {"op":"error","code":...} and a closed connection. */
export class SrpError extends Error {
  constructor(
    readonly code: SrpErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'SrpError';
  }
}

/**
 * Part of a data frame, as it arrived: a view, never a copy (valid only until the next push when the bytes
 * were pushed as borrowed). `frameLength` is set on the first part of each frame (its header was just read).
 */
export interface DataPart {
  frameLength: number | null;
  payload: Buffer;
}

export interface Frame {
  /** Offset of the frame's first byte in the stream. */
  start: number;
  /** The frame as it was on the wire: header and payload (forwarded as is). */
  raw: Buffer;
  payload: Buffer;
}

/** The length header of a frame of `length` payload bytes. */
export function frameHeader(length: number): Buffer {
  const header = Buffer.allocUnsafe(HEADER_BYTES);
  header.writeUInt32BE(length, 0);
  return header;
}

/** A whole frame (header + payload) in one buffer. */
export function encodeFrame(payload: Buffer): Buffer {
  const frame = Buffer.allocUnsafe(HEADER_BYTES + payload.length);
  frame.writeUInt32BE(payload.length, 0);
  payload.copy(frame, HEADER_BYTES);
  return frame;
}

interface FdBatch {
  /** Stream offsets [from, to) of the bytes the fds arrived with. */
  from: number;
  to: number;
  fds: number[];
  claimed: boolean;
}

export class FrameDecoder {
  private chunks: Buffer[] = [];
  private buffered = 0;
  /** Stream offset of the first buffered byte. */
  private consumed = 0;
  private received = 0;
  private batches: FdBatch[] = [];
  /** The last `borrowed` chunks are views of a buffer the caller reuses: settle() copies what is left of them. */
  private borrowed = 0;
  /** Payload bytes of the current data frame not taken yet (0: the next bytes are a header). */
  private inDataFrame = 0;

  constructor(private maxFrame: number) {}

  /** Nothing buffered: no byte of a frame, no fd, that a new reader of the same socket would miss. */
  get isEmpty(): boolean {
    return this.buffered === 0 && this.inDataFrame === 0 && this.batches.length === 0;
  }

  /** Lower (never raise) the frame limit: a client learns the limit Aeterna keeps to from `welcome`. */
  lowerLimit(maxFrame: number): void {
    if (Number.isInteger(maxFrame) && maxFrame > 0 && maxFrame < this.maxFrame) this.maxFrame = maxFrame;
  }

  /**
   * Feed bytes (and any fds that arrived with them). `borrowed`: the caller reuses `data`'s memory after
   * this turn, so call settle() before it does; frames and data parts taken until then are views of it.
   */
  push(data: Buffer, fds: number[] = [], borrowed = false): void {
    if (fds.length > 0)
      this.batches.push({ from: this.received, to: this.received + data.length, fds, claimed: false });
    this.received += data.length;
    if (data.length === 0) return;
    this.chunks.push(data);
    this.buffered += data.length;
    this.borrowed = borrowed ? this.borrowed + 1 : 0;
  }

  /** Copy what is left of borrowed bytes (a partial frame, or what a pause left unread): the caller may now reuse them. */
  settle(): void {
    for (let i = Math.max(0, this.chunks.length - this.borrowed); i < this.chunks.length; i++)
      this.chunks[i] = Buffer.from(this.chunks[i]);
    this.borrowed = 0;
  }

  /**
   * The next part of the data frames that carry `announced` more bytes, without reassembling frames: a frame's
   * header is checked (length 0, above the limit, more than announced) and its payload comes out in the
   * pieces it arrived in. Null when nothing is buffered.
   */
  nextData(announced: number): DataPart | null {
    if (this.inDataFrame === 0) {
      if (this.buffered < HEADER_BYTES) return null;
      const length = this.peekLength();
      if (length === 0) throw new SrpError('bad_frame', 'frame length 0');
      if (length > this.maxFrame)
        throw new SrpError('too_large', `frame length ${length} is above the limit of ${this.maxFrame} bytes`);
      if (length > announced)
        throw new SrpError('bad_frame', `data frame of ${length} bytes where only ${announced} were announced`);
      this.take(HEADER_BYTES);
      this.inDataFrame = length;
      this.checkUnclaimedBefore(this.consumed); // data frames carry no fds
      return { frameLength: length, payload: EMPTY };
    }
    if (this.buffered === 0) return null;
    const payload = this.take(Math.min(this.inDataFrame, this.chunks[0].length));
    this.inDataFrame -= payload.length;
    this.checkUnclaimedBefore(this.consumed);
    return { frameLength: null, payload };
  }

  /** The next complete frame, or null. Throws SrpError for a length of 0 or above the limit. */
  next(): Frame | null {
    if (this.buffered < HEADER_BYTES) return null;
    const length = this.peekLength();
    if (length === 0) throw new SrpError('bad_frame', 'frame length 0');
    if (length > this.maxFrame)
      throw new SrpError('too_large', `frame length ${length} is above the limit of ${this.maxFrame} bytes`);
    const total = HEADER_BYTES + length;
    if (this.buffered < total) return null;
    const start = this.consumed;
    const raw = this.take(total);
    return { start, raw, payload: raw.subarray(HEADER_BYTES) };
  }

  /**
   * The fds a control frame announced. They must have arrived with the bytes
   * where the frame starts, and be exactly `count`; otherwise bad_frame.
   */
  claimFds(frame: Frame, count: number): number[] {
    if (count > MAX_FDS_PER_FRAME)
      throw new SrpError('bad_frame', `${count} fds announced; at most ${MAX_FDS_PER_FRAME}`);
    const batch = this.batches.find((b) => !b.claimed && b.from <= frame.start && frame.start < b.to);
    if (count === 0) return [];
    if (!batch) throw new SrpError('bad_frame', `${count} fds announced but none arrived with the frame`);
    if (batch.fds.length !== count)
      throw new SrpError('bad_frame', `${count} fds announced but ${batch.fds.length} arrived`);
    batch.claimed = true;
    return batch.fds;
  }

  /** After a frame was handled: fds that no frame can claim any more are a protocol error. */
  checkUnclaimed(frame: Frame): void {
    this.checkUnclaimedBefore(frame.start + frame.raw.length);
  }

  private checkUnclaimedBefore(end: number): void {
    // The next frame starts at `end`: a batch that ended by then can only have belonged to frames already handled.
    const stray = this.batches.find((b) => !b.claimed && b.to <= end);
    this.batches = this.batches.filter((b) => !b.claimed);
    if (stray) throw new SrpError('bad_frame', `${stray.fds.length} fds arrived where none were announced`);
  }

  /** Close every fd received but not claimed (on error or close). */
  closeUnclaimed(): void {
    for (const b of this.batches) if (!b.claimed) for (const fd of b.fds) closeQuietly(fd);
    this.batches = [];
  }

  private peekLength(): number {
    const first = this.chunks[0];
    if (first.length >= HEADER_BYTES) return first.readUInt32BE(0);
    const header = Buffer.allocUnsafe(HEADER_BYTES);
    let n = 0;
    for (const c of this.chunks) {
      n += c.copy(header, n, 0, Math.min(c.length, HEADER_BYTES - n));
      if (n === HEADER_BYTES) break;
    }
    return header.readUInt32BE(0);
  }

  private take(n: number): Buffer {
    this.buffered -= n;
    this.consumed += n;
    const first = this.chunks[0];
    if (first.length >= n) {
      // Within one chunk: no copy.
      if (first.length === n) {
        this.chunks.shift();
        this.borrowed = Math.min(this.borrowed, this.chunks.length);
      } else this.chunks[0] = first.subarray(n);
      return first.subarray(0, n);
    }
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const c = this.chunks[0];
      const need = n - filled;
      if (c.length <= need) {
        c.copy(out, filled);
        filled += c.length;
        this.chunks.shift();
        this.borrowed = Math.min(this.borrowed, this.chunks.length);
      } else {
        c.copy(out, filled, 0, need);
        this.chunks[0] = c.subarray(need);
        filled = n;
      }
    }
    return out;
  }
}

/** F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE: what makes a memfd state immutable. */
const STATE_SEALS = 0x2 | 0x4 | 0x8;

/** Whether a memfd is sealed against write, shrink and grow: the one test every end applies to a memfd state. */
export function isSealedState(memfd: number): boolean {
  return (native.getSeals(memfd) & STATE_SEALS) === STATE_SEALS;
}

export function closeQuietly(fd: number): void {
  try {
    native.close(fd);
  } catch {
    // already closed
  }
}

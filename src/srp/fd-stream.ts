// A non-blocking Unix stream socket driven by the addon's Poller, carrying fds
// (SCM_RIGHTS) with the bytes: node:net cannot pass fds on an ordinary socket.
// Reads arrive as 'data' (bytes, fds); writes are queued, with a high-water
// mark for backpressure ('drain'), and each write's fds ride on its first byte.
import { EventEmitter } from 'node:events';
import util from 'node:util';
import { native, READABLE, WRITABLE, type Poller } from '../native/binding';
import { closeQuietly, MAX_FDS_PER_FRAME } from './codec';

const READ_CHUNK = 1 << 20;
const EMPTY = Buffer.alloc(0);
/** Reads per poll callback, so one busy peer cannot starve the event loop. */
const READS_PER_TURN = 16;

/** The peer is gone: it exited, or closed its end with bytes it never read. */
export function isPeerGone(err: Error): boolean {
  const code = (err as NodeJS.ErrnoException).code;
  return code === 'ECONNRESET' || code === 'EPIPE';
}

/** A socket error reported by the poller (the socket's pending error, see the addon), as an ErrnoException. */
function socketError(errno: number): NodeJS.ErrnoException {
  const code = util.getSystemErrorName(-errno);
  const what =
    code === 'ECONNRESET'
      ? 'connection reset by the peer'
      : code === 'EPIPE'
        ? 'the peer closed its end'
        : `socket error ${code}`;
  return Object.assign(new Error(what), { errno, code });
}

interface Pending {
  data: Buffer;
  offset: number;
  fds: number[];
  /** Close these fds once they are sent (they were ours only to pass on). */
  closeFds: boolean;
  /** Bytes of the spill ring this write holds until it is sent. */
  held: number;
}

/**
 * Where the unsent rest of borrowed writes waits (see write): one buffer, taken and given back in the
 * queue's order (FIFO), so relaying allocates nothing per byte however much goes through.
 */
class SpillRing {
  private buffer = EMPTY;
  /** The next free byte. */
  private head = 0;
  /** Bytes taken and not given back yet, with any end of the buffer skipped at a wrap. */
  private used = 0;

  constructor(private readonly size: number) {}

  /** A copy of `data` in the ring and the ring bytes it holds (give them back in the same order), or null when it does not fit. */
  take(data: Buffer): { copy: Buffer; held: number } | null {
    const n = data.length;
    if (n > this.size) return null;
    if (this.buffer.length === 0) this.buffer = Buffer.allocUnsafeSlow(this.size);
    if (this.used === 0) this.head = 0;
    const tail = (this.head - this.used + this.size) % this.size;
    let start = this.head;
    let skipped = 0;
    if (this.used > 0 && this.head <= tail) {
      if (this.head + n > tail) return null; // in use wraps around: free is [head, tail)
    } else if (this.head + n > this.size) {
      if (n > tail) return null; // in use is [tail, head): free is [head, size) then [0, tail)
      skipped = this.size - this.head;
      start = 0;
    }
    data.copy(this.buffer, start);
    this.head = (start + n) % this.size;
    this.used += skipped + n;
    return { copy: this.buffer.subarray(start, start + n), held: skipped + n };
  }

  give(held: number): void {
    this.used -= held;
  }

  release(): void {
    this.buffer = EMPTY;
    this.used = 0;
  }
}

export interface FdStreamEvents {
  /** Bytes read: a view of the read buffer, valid only during the event (the next read reuses it). */
  data: [data: Buffer, fds: number[]];
  end: [];
  error: [err: Error];
  drain: [];
  /** Everything queued is in the kernel. */
  empty: [];
  close: [];
}

export class FdStream extends EventEmitter<FdStreamEvents> {
  private readonly poller: Poller;
  private queue: Pending[] = [];
  private queued = 0;
  private reading = true;
  private closed = false;
  private ending = false;
  /** The read buffer, allocated at the first read (a connection refused before it reads never needs one). */
  private chunk = EMPTY;
  private watching = 0;
  /** A write returned false: emit 'drain' once the queue is below the mark again. */
  private needDrain = false;
  /** Room for what borrowed writes could not send at once: the queue's limit and one more read. */
  private readonly spill: SpillRing;

  constructor(
    readonly fd: number,
    private readonly highWaterMark = 8 << 20,
  ) {
    super();
    this.spill = new SpillRing(highWaterMark + READ_CHUNK);
    this.poller = new native.Poller(fd, (errno, events) => this.onPoll(errno, events));
    this.update();
  }

  /**
   * Queue bytes (with fds on their first byte). False when the queue is at or above the high-water mark.
   * `borrowed`: `data`'s memory is reused after this call (a read buffer): what cannot be sent at once is
   * copied into the spill ring (no fds then).
   */
  write(data: Buffer, fds: number[] = [], options: { closeFds?: boolean; borrowed?: boolean } = {}): boolean {
    if (this.closed) {
      if (options.closeFds) fds.forEach(closeQuietly);
      return false;
    }
    if (fds.length > MAX_FDS_PER_FRAME) throw new RangeError(`at most ${MAX_FDS_PER_FRAME} fds per write`);
    const pending: Pending = { data, offset: 0, fds, closeFds: options.closeFds ?? false, held: 0 };
    this.queue.push(pending);
    this.queued += data.length;
    this.flush();
    if (options.borrowed && this.queue.at(-1) === pending) {
      const rest = data.subarray(pending.offset);
      const spilled = this.spill.take(rest);
      pending.data = spilled?.copy ?? Buffer.from(rest);
      pending.held = spilled?.held ?? 0;
      pending.offset = 0;
    }
    if (this.queued < this.highWaterMark) return true;
    this.needDrain = true;
    return false;
  }

  get writableLength(): number {
    return this.queued;
  }

  pause(): void {
    this.reading = false;
    this.update();
  }

  resume(): void {
    if (this.closed || this.reading) return;
    this.reading = true;
    this.update();
  }

  /** Resolves once everything queued so far is in the kernel, or the stream closed. */
  flushed(): Promise<void> {
    if (this.queue.length === 0 || this.closed) return Promise.resolve();
    return new Promise((resolve) => {
      const done = (): void => {
        this.off('empty', done);
        this.off('close', done);
        resolve();
      };
      this.on('empty', done);
      this.on('close', done);
    });
  }

  /** Close once everything queued has been sent. */
  end(): void {
    this.ending = true;
    if (this.queue.length === 0) this.close();
  }

  /** Close now; whatever is still queued is dropped. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.poller.close();
    for (const p of this.queue) if (p.closeFds && p.offset === 0) p.fds.forEach(closeQuietly);
    this.queue = [];
    this.queued = 0;
    this.spill.release();
    closeQuietly(this.fd);
    this.chunk = EMPTY; // the read buffer is 1 MiB: free it now, not when the last listener lets go of us
    this.emit('close');
  }

  get isClosed(): boolean {
    return this.closed;
  }

  private update(): void {
    if (this.closed) return;
    const events = (this.reading ? READABLE : 0) | (this.queue.length > 0 ? WRITABLE : 0);
    if (events === this.watching) return;
    this.watching = events;
    if (events === 0) this.poller.stop();
    else this.poller.start(events);
  }

  private onPoll(errno: number, events: number): void {
    if (this.closed) return;
    if (errno !== 0) {
      this.fail(socketError(errno));
      return;
    }
    if (events & WRITABLE) this.flush();
    if (events & READABLE && this.reading) this.readSome();
  }

  private readSome(): void {
    for (let i = 0; i < READS_PER_TURN && this.reading && !this.closed; i++) {
      if (this.chunk.length === 0) this.chunk = Buffer.allocUnsafe(READ_CHUNK);
      let got;
      try {
        got = native.recvmsgInto(this.fd, this.chunk, MAX_FDS_PER_FRAME);
      } catch (err) {
        this.fail(err as Error);
        return;
      }
      if (got === null) return;
      if (got.bytes === 0) {
        this.reading = false;
        this.update();
        this.emit('end');
        return;
      }
      // A view of the read buffer, which the next read reuses: no copy and no fresh memory per read.
      this.emit('data', this.chunk.subarray(0, got.bytes), got.fds);
    }
  }

  private flush(): void {
    while (this.queue.length > 0 && !this.closed) {
      const p = this.queue[0];
      let n: number;
      try {
        n = native.sendmsg(this.fd, p.offset === 0 ? p.data : p.data.subarray(p.offset), p.offset === 0 ? p.fds : []);
      } catch (err) {
        this.fail(err as Error);
        return;
      }
      if (n < 0) break; // EAGAIN: wait for WRITABLE
      if (p.offset === 0 && p.closeFds) p.fds.forEach(closeQuietly); // the kernel holds its own references now
      p.offset += n;
      this.queued -= n;
      if (p.offset < p.data.length) break;
      this.queue.shift();
      this.spill.give(p.held);
    }
    this.update();
    if (this.queue.length === 0) this.emit('empty');
    if (this.queue.length === 0 && this.ending) {
      this.close();
    } else if (this.needDrain && this.queued < this.highWaterMark) {
      this.needDrain = false;
      this.emit('drain');
    }
  }

  private fail(err: Error): void {
    if (this.closed) return;
    this.emit('error', err);
    this.close();
  }
}

/** Resolves once the stream's write queue is below its mark again, or it closed. */
export function drained(stream: FdStream): Promise<void> {
  return new Promise((resolve) => {
    const done = (): void => {
      stream.off('drain', done);
      stream.off('close', done);
      resolve();
    };
    stream.once('drain', done);
    stream.once('close', done);
  });
}

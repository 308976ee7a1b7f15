// Connection handoff (docs/srp.md, "Connection handoff"): at promotion the old generation gives its live client
// connections to the new one over a socket pair Aeterna made for the two, and the new one goes on answering on
// the same TCP connections. `Handoff` is the old generation's side (one `conn` frame per connection, carrying its
// fd, its app-defined state and the bytes read but not processed, then `end`); `HandoffReceiver` the new one's
// (adopts each as a net.Socket with those bytes first). Aeterna takes no part in it: it holds none of the fds.
import net from 'node:net';
import { native } from '../native/binding';
import { FdStream } from '../srp/fd-stream';
import { FrameDecoder, SrpError, closeQuietly, encodeFrame, frameHeader, type Frame } from '../srp/codec';

/** A connection the previous generation handed over. */
export interface AdoptedConnection {
  /** The app's name for it (1 to 256 characters). */
  id: string;
  /** The app's own state for it, as the old generation gave it. */
  meta: unknown;
  /** The connection, yours to serve and close. The bytes the old generation had read but not processed come first. */
  socket: net.Socket;
  /** How many such bytes there were. */
  unreadBytes: number;
}

/** The longest `id`. */
const MAX_ID = 256;
/** The most unread bytes one connection may carry (the old generation's read buffer, not a transfer channel). */
export const MAX_UNREAD = 16 << 20;

/** A net.Socket's fd (TCP, pipe or Unix socket on Linux), or null for one without (closed, not fd-backed). */
function fdOf(socket: net.Socket): number | null {
  const handle = (socket as unknown as { _handle?: { fd?: number } | null })._handle;
  return typeof handle?.fd === 'number' && handle.fd >= 0 ? handle.fd : null;
}

/** Stop the socket's reads at the source (libuv), whoever consumes them (the app, node:http's parser). */
function stopReading(socket: net.Socket): void {
  socket.pause();
  const handle = (socket as unknown as { _handle?: { readStop?: () => number; reading?: boolean } | null })._handle;
  if (handle?.readStop) {
    handle.readStop();
    handle.reading = false;
  }
}

/** What the socket had read and not delivered yet. */
function takeBuffered(socket: net.Socket): Buffer {
  const parts: Buffer[] = [];
  for (let chunk: unknown; (chunk = socket.read()) !== null;)
    parts.push(typeof chunk === 'string' ? Buffer.from(chunk) : (chunk as Buffer));
  return Buffer.concat(parts);
}

/**
 * Close a channel the app never took, after saying "no connections" (`end` with count 0), so the next generation
 * reads a clean end rather than an old generation that died while handing over. Best effort: a few bytes on an
 * empty socket, sent without blocking.
 */
export function endUntakenChannel(fd: number): void {
  try {
    native.sendmsg(fd, encodeFrame(Buffer.from(JSON.stringify({ op: 'end', count: 0 }))), []);
  } catch {
    // the next generation is gone: nothing to tell
  }
  closeQuietly(fd);
}

/** The old generation's end of the channel: hand connections over one by one, then `end()`. */
export class Handoff {
  private readonly stream: FdStream;
  private sent = 0;
  private ended = false;
  /** Sends go out one after the other: a frame's fd rides on its own first byte. */
  private queue: Promise<void> = Promise.resolve();

  /** @internal `fd`: the end Aeterna sent with the final dump. */
  constructor(fd: number) {
    this.stream = new FdStream(fd);
    this.stream.pause(); // nothing comes this way
    this.stream.on('error', () => undefined); // a write to a gone receiver: send() reports it
  }

  /** How many connections went out. */
  get count(): number {
    return this.sent;
  }

  /**
   * Hand `socket` over at a boundary of its protocol (nothing half-written, no request half-answered): its reads
   * stop, what Node had read of it goes along as unread bytes, its pending writes are flushed, then it is sent
   * with `id` and `meta` (any JSON value: what the next generation needs to continue it), and this process's
   * copy is closed without shutdown. The connection lives on in the next generation. Rejects (and leaves the
   * socket to you) if the socket has no fd, the channel is closed, or the next generation went away.
   *
   * Under node:http, hand a connection over only between requests or during a response you stream yourself:
   * bytes already inside Node's HTTP parser (a pipelined next request) are not recoverable.
   */
  send(socket: net.Socket, id: string, meta: unknown = null, unread: Buffer = Buffer.alloc(0)): Promise<void> {
    const next = this.queue.then(() => this.sendNow(socket, id, meta, unread));
    this.queue = next.catch(() => undefined);
    return next;
  }

  private async sendNow(socket: net.Socket, id: string, meta: unknown, unread: Buffer): Promise<void> {
    if (this.ended || this.stream.isClosed) throw new Error('the handoff channel is closed');
    if (typeof id !== 'string' || id.length === 0 || id.length > MAX_ID)
      throw new RangeError(`a handed-over connection's id must be 1 to ${MAX_ID} characters`);
    const fd = fdOf(socket);
    if (fd === null) throw new Error(`connection ${id} has no fd to hand over (closed, or not a socket)`);
    stopReading(socket);
    const pending = Buffer.concat([unread, takeBuffered(socket)]);
    // read() asks for more when the buffer runs low, which starts libuv reading again: stop it once more, before
    // the event loop turns (libuv reads only then), so no byte is read here after this point.
    stopReading(socket);
    if (pending.length > MAX_UNREAD)
      throw new RangeError(`connection ${id}: ${pending.length} unread bytes, above ${MAX_UNREAD}`);
    // What the app wrote goes out from this process before the socket leaves it.
    // An empty write's callback runs once everything written before it is in the kernel ('drain' fires only after
    // a write that filled the buffer, so it is no way to wait for a queue below that mark).
    if (socket.writableLength > 0 && !socket.destroyed)
      await new Promise<void>((r) => socket.write(Buffer.alloc(0), () => r()));
    const header = Buffer.from(JSON.stringify({ op: 'conn', id, meta, unread: pending.length, fds: ['conn'] }));
    this.stream.write(encodeFrame(header), [fd]);
    for (let off = 0; off < pending.length; off += 1 << 20) {
      const part = pending.subarray(off, off + (1 << 20));
      this.stream.write(frameHeader(part.length));
      this.stream.write(part);
    }
    // Until the frame with its fd is in the kernel, the fd must stay open here.
    await this.stream.flushed();
    if (this.stream.isClosed) throw new Error(`the next generation went away before connection ${id} was handed over`);
    this.sent++;
    socket.destroy(); // closes this copy only: the connection is the next generation's
  }

  /** Every connection is handed over: say how many, and close the channel. Resolves to that count. */
  async end(): Promise<number> {
    await this.queue;
    if (!this.ended) {
      this.ended = true;
      this.stream.write(encodeFrame(Buffer.from(JSON.stringify({ op: 'end', count: this.sent }))));
      this.stream.end();
    }
    return this.sent;
  }
}

/** The new generation's end: reads the channel to its end, adopting each connection as it arrives. */
export class HandoffReceiver {
  private readonly stream: FdStream;
  private readonly decoder: FrameDecoder;
  /** The connection whose unread bytes are still arriving. */
  private partial: { id: string; meta: unknown; fd: number; unread: Buffer[]; left: number; total: number } | null =
    null;
  private done = false;
  adopted = 0;

  /** @internal */
  constructor(
    fd: number,
    maxFrame: number,
    private readonly onConnection: ((c: AdoptedConnection) => void) | null,
    private readonly warn: (message: string) => void,
  ) {
    this.decoder = new FrameDecoder(maxFrame);
    this.stream = new FdStream(fd);
    this.stream.on('data', (data, fds) => {
      this.decoder.push(data, fds, true);
      this.drain();
      this.decoder.settle();
    });
    // End of file before `end`: the old generation died while handing over (what arrived whole is adopted).
    this.stream.on('end', () => this.finish(new Error('the previous generation closed it without `end`')));
    this.stream.on('error', (err) => this.finish(err));
  }

  private drain(): void {
    try {
      while (!this.done) {
        if (this.partial) {
          const part = this.decoder.nextData(this.partial.left);
          if (part === null) return;
          if (part.payload.length > 0) this.partial.unread.push(Buffer.from(part.payload));
          this.partial.left -= part.payload.length;
          if (this.partial.left === 0) this.adopt();
          continue;
        }
        const frame = this.decoder.next();
        if (frame === null) return;
        this.onFrame(frame);
      }
    } catch (err) {
      this.finish(err as Error);
    }
  }

  private onFrame(frame: Frame): void {
    let m: Record<string, unknown>;
    try {
      m = JSON.parse(frame.payload.toString('utf8')) as Record<string, unknown>;
    } catch {
      throw new SrpError('bad_json', 'a handoff frame is not JSON');
    }
    if (m === null || typeof m !== 'object') throw new SrpError('bad_json', 'a handoff frame is not a JSON object');
    if (m.op === 'end') {
      this.decoder.checkUnclaimed(frame);
      if (m.count !== this.adopted)
        this.warn(
          `the previous generation said it handed over ${String(m.count)} connections; ${this.adopted} arrived`,
        );
      return this.finish(null);
    }
    if (m.op !== 'conn') throw new SrpError('unexpected_op', `"${String(m.op)}" on the handoff channel`);
    const fds = this.decoder.claimFds(frame, 1);
    const [fd] = fds;
    const bad = (why: string): never => {
      closeQuietly(fd);
      throw new SrpError('bad_json', `conn: ${why}`);
    };
    this.decoder.checkUnclaimed(frame);
    if (!Array.isArray(m.fds) || m.fds.length !== 1 || m.fds[0] !== 'conn') bad('"fds" must be ["conn"]');
    if (typeof m.id !== 'string' || m.id.length === 0 || m.id.length > MAX_ID)
      bad(`"id" must be 1 to ${MAX_ID} characters`);
    const unread = m.unread ?? 0;
    if (typeof unread !== 'number' || !Number.isSafeInteger(unread) || unread < 0 || unread > MAX_UNREAD)
      bad(`"unread" must be a byte count up to ${MAX_UNREAD}`);
    this.partial = {
      id: m.id as string,
      meta: m.meta ?? null,
      fd,
      unread: [],
      left: unread as number,
      total: unread as number,
    };
    if (unread === 0) this.adopt();
  }

  private adopt(): void {
    const p = this.partial!;
    this.partial = null;
    if (!this.onConnection) {
      closeQuietly(p.fd);
      this.warn(`connection ${p.id} was handed over, but this generation has no onConnection() callback: closed`);
      return;
    }
    let socket: net.Socket;
    try {
      socket = new net.Socket({ fd: p.fd, readable: true, writable: true });
    } catch (err) {
      closeQuietly(p.fd);
      this.warn(`connection ${p.id} cannot be adopted (${(err as Error).message}): closed`);
      return;
    }
    // Not flowing until the app reads it (no 'data' listener yet); the unread bytes come first.
    if (p.total > 0) socket.unshift(Buffer.concat(p.unread));
    this.adopted++;
    this.onConnection({ id: p.id, meta: p.meta, socket, unreadBytes: p.total });
  }

  private finish(err: Error | null): void {
    if (this.done) return;
    this.done = true;
    if (this.partial) closeQuietly(this.partial.fd); // its unread bytes never came whole
    this.partial = null;
    this.decoder.closeUnclaimed();
    this.stream.close();
    if (err) this.warn(`the connection handoff channel ended early: ${err.message}`);
  }
}

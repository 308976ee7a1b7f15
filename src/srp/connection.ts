// One SRP connection, either end: frames in, messages and data frames out. The
// connection itself knows which frames are data (the `size` announced by the
// last `state` or `load`), claims the fds a frame names, and answers any
// protocol violation with an `error` frame and a close.
import { EventEmitter } from 'node:events';
import { FdStream } from './fd-stream';
import { FrameDecoder, SrpError, closeQuietly, encodeFrame, frameHeader, type Frame, type SrpErrorCode } from './codec';
import { encodeMessage, parseMessage, type Message } from './messages';

/**
 * After an `error` frame, how long the connection stays open reading and dropping what the peer still
 * sends: a peer that writes before it reads (a hello racing our refusal) then reads the error instead of
 * failing on a closed socket.
 */
export const REFUSAL_LINGER_MS = 1000;

export interface ConnectionEvents {
  /** A control message, with the fds it named (in the order of its `fds` list). */
  message: [message: Message, fds: number[]];
  /**
   * Part of a data frame, as it arrived (a view of the read buffer: valid only during the event; copy what you
   * keep). `frameLength` is set on the first part of each frame (its header, checked), with an empty payload;
   * `remaining` bytes of the announced state are still to come after this part.
   */
  data: [payload: Buffer, frameLength: number | null, remaining: number];
  /** The connection closed; `error` says why when it was not a clean end. */
  close: [error: SrpError | Error | null];
}

export class SrpConnection extends EventEmitter<ConnectionEvents> {
  readonly stream: FdStream;
  private readonly decoder: FrameDecoder;
  private dataRemaining = 0;
  /** The last state/load announced a digest trailer: the frame after its data must be `trailer`. */
  private dueTrailer = false;
  private paused = false;
  private closing: SrpError | Error | null = null;
  private closedEmitted = false;
  /** Refused (an `error` frame went out): nothing more is parsed; the fd closes at the peer's end or after the linger. */
  private refused = false;

  /** `highWaterMark`: queued bytes at which send/forward return false (the FdStream's backpressure). */
  constructor(fd: number, maxFrame: number, highWaterMark?: number) {
    super();
    this.decoder = new FrameDecoder(maxFrame);
    this.stream = new FdStream(fd, highWaterMark);
    this.stream.on('data', (data, fds) => {
      if (this.refused) {
        fds.forEach(closeQuietly); // lingering after a refusal: dropped, not buffered
        return;
      }
      // The stream reuses its read buffer at its next read, which cannot come while we are paused: only
      // then must what is left be copied (a partial frame). Paused, the rest stays a view until resume().
      this.decoder.push(data, fds, true);
      this.drainFrames();
      if (!this.paused) this.decoder.settle();
    });
    this.stream.on('end', () =>
      this.close(
        this.refused || this.dataRemaining === 0
          ? null
          : new Error(`connection closed with ${this.dataRemaining} bytes of state still announced`),
      ),
    );
    this.stream.on('error', (err) => this.close(err));
    this.stream.on('close', () => this.finish());
  }

  /** Refuse frames above this size from now on (the `max_frame` of `welcome`). */
  lowerFrameLimit(maxFrame: number): void {
    this.decoder.lowerLimit(maxFrame);
  }

  /** A digest trailer is due after (or right after) the announced data. */
  get trailerDue(): boolean {
    return this.dueTrailer;
  }

  /** Bytes of announced state data not received yet. */
  get pendingData(): number {
    return this.dataRemaining;
  }

  /**
   * Nothing of a frame is half-read or half-written here: another process could take over the fd and read and
   * write on it from the next frame on (aeterna upgrade carries such connections).
   */
  get quiet(): boolean {
    return (
      !this.closed &&
      this.dataRemaining === 0 &&
      !this.dueTrailer &&
      this.decoder.isEmpty &&
      this.stream.writableLength === 0
    );
  }

  /** Closed, or refused and only lingering: either way it carries nothing more. */
  get closed(): boolean {
    return this.refused || this.stream.isClosed;
  }

  send(message: Message, fds: number[] = [], options: { closeFds?: boolean } = {}): boolean {
    return this.stream.write(encodeMessage(message), fds, options);
  }

  /** Send state bytes as data frames of at most `frameSize`. */
  sendData(data: Buffer, frameSize: number): boolean {
    let ok = true;
    for (let off = 0; off < data.length; off += frameSize) {
      const part = data.subarray(off, Math.min(data.length, off + frameSize));
      ok = this.stream.write(part.length < 4096 ? encodeFrame(part) : frameHeader(part.length)) && ok;
      if (part.length >= 4096) ok = this.stream.write(part) && ok;
    }
    return ok;
  }

  /**
   * Pass on a part of a data frame as it arrived (from a 'data' event): the header of a frame, or payload
   * bytes (a view of the sender's read buffer: what cannot go out at once waits in the stream's spill ring).
   */
  forward(payload: Buffer, frameLength: number | null): boolean {
    if (frameLength !== null) return this.stream.write(frameHeader(frameLength));
    return this.stream.write(payload, [], { borrowed: true });
  }

  pause(): void {
    this.paused = true;
    this.stream.pause();
  }

  resume(): void {
    if (!this.paused) return;
    this.paused = false;
    this.drainFrames();
    if (this.paused) return;
    this.decoder.settle(); // the stream reads into its buffer again: keep no views of it
    this.stream.resume();
  }

  /**
   * Answer a protocol violation: an `error` frame, and the connection is over ('close' is emitted now).
   * The fd itself lingers a moment (REFUSAL_LINGER_MS), dropping what still arrives, so the peer can read why.
   */
  fail(code: SrpErrorCode, message: string): void {
    if (this.closed) return;
    this.closing = new SrpError(code, message);
    this.send({ op: 'error', code, message });
    this.refused = true;
    this.decoder.closeUnclaimed();
    this.dataRemaining = 0;
    this.stream.resume();
    const linger = setTimeout(() => this.stream.close(), REFUSAL_LINGER_MS);
    this.stream.once('close', () => clearTimeout(linger));
    this.finish();
  }

  close(error: SrpError | Error | null = null): void {
    if (error && !this.closing && !this.refused) this.closing = error;
    this.decoder.closeUnclaimed();
    this.stream.close();
  }

  private finish(): void {
    if (this.closedEmitted) return;
    this.closedEmitted = true;
    this.decoder.closeUnclaimed();
    this.emit('close', this.closing);
  }

  private drainFrames(): void {
    while (!this.paused && !this.closed && !this.closing) {
      let frame: Frame | null;
      try {
        if (this.dataRemaining > 0) {
          const part = this.decoder.nextData(this.dataRemaining);
          if (part === null) return;
          this.dataRemaining -= part.payload.length;
          this.emit('data', part.payload, part.frameLength, this.dataRemaining);
          continue;
        }
        frame = this.decoder.next();
        if (frame === null) return;
        this.handle(frame);
      } catch (err) {
        if (err instanceof SrpError) this.fail(err.code, err.message);
        else this.close(err as Error);
        return;
      }
    }
  }

  private handle(frame: Frame): void {
    const message = parseMessage(frame.payload);
    if (message.op === 'trailer' && !this.dueTrailer)
      throw new SrpError('unexpected_op', '"trailer" without a state that announced one');
    if (this.dueTrailer && message.op !== 'trailer' && message.op !== 'error')
      throw new SrpError('unexpected_op', `"${message.op}" where the announced digest trailer was due`);
    if (message.op === 'trailer') this.dueTrailer = false;
    const carriesState = message.op === 'state' || message.op === 'load' || message.op === 'checkpoint';
    // A direct dump carries the sender's end of the socket pair (docs/srp.md, "Direct transport").
    // At promotion, the two ends of the connection handoff channel: on the final dump, and the `handoff` op.
    const named = carriesState || message.op === 'dump' || message.op === 'handoff' ? (message.fds ?? []) : [];
    const fds = this.decoder.claimFds(frame, named.length);
    this.decoder.checkUnclaimed(frame); // before acting on the message: stray fds make the frame itself invalid
    if (carriesState && message.transport !== 'memfd') {
      // A direct state's bytes go on its socket pair: only its trailer follows here.
      this.dataRemaining = message.transport === 'direct' ? 0 : message.size;
      this.dueTrailer = message.trailer === true;
    }
    if (this.listenerCount('message') === 0) fds.forEach(closeQuietly);
    this.emit('message', message, fds);
  }
}

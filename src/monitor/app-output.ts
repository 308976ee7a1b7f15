// The app's stdout and stderr on their way to Aeterna's (observability.app_output). In `raw` mode the app inherits
// Aeterna's fds 1 and 2 and none of this runs. In `prefixed` and `json` mode each generation writes into two pipes
// of its own that Aeterna reads, whole line by whole line, and writes out again: each line prefixed with its
// generation and pid, or as one JSON record beside Aeterna's own log lines. Aeterna writes every line (its own and
// the app's) with one synchronous write from its one thread, so no line is ever cut by another.
//
// Everything the app can make Aeterna hold is bounded: a line is at most MAX_LINE_BYTES (a longer one is cut into
// pieces, each but the last marked as continued), a read turn takes at most READ_BYTES_PER_TURN, a generation's
// output at most MAX_BYTES_PER_SECOND (beyond that Aeterna stops reading until the next second: the pipe fills
// and the app's writes wait, as they would on a slow terminal; nothing is dropped), and the stderr tail kept for a
// failed reload's report at most STDERR_TAIL_LINES lines and STDERR_TAIL_BYTES bytes.
import fs from 'node:fs';
import { native, READABLE, type Poller } from '../native/binding';
import type { AppOutputMode } from '../config/types';
import type { Logger } from '../log';

/** Longest line written out as one; a longer one is cut into pieces of this size (on a UTF-8 character boundary). */
export const MAX_LINE_BYTES = 16 * 1024;
/** What one stream of one generation is read per turn of the event loop. */
export const READ_BYTES_PER_TURN = 256 * 1024;
/** What one generation's stdout and stderr together may pass per second before Aeterna stops reading them. */
export const MAX_BYTES_PER_SECOND = 8 * 1024 * 1024;
/** Lines of a generation's stderr kept for a failed reload's report, and their bytes at most. */
export const STDERR_TAIL_LINES = 20;
export const STDERR_TAIL_BYTES = 8 * 1024;
/** What is still read from a pipe once its generation has exited (the last lines it wrote before its end). */
export const EXIT_DRAIN_BYTES = 1024 * 1024;
/** The tails of this many exited generations are kept (a reload's report is made right after its generation exits). */
const KEPT_EXITED = 8;
/** What a continued piece ends with in the text modes (json says `"continues": true`). */
export const CONTINUES_MARKER = ' [line continues]';

export type StreamName = 'stdout' | 'stderr';

/** What Aeterna needs of a generation to read its output: its number, instance and root pid, and its end. */
export interface OutputOwner {
  number: number;
  /** Its AETERNA_INSTANCE (service.instances); absent: 0. */
  instance?: number;
  pid: number;
  exited: Promise<unknown>;
}

/** Which process of which generation a pipe belongs to: `3` for instance 0 of generation 3, `3-i1` for instance 1. */
export function outputKey(owner: { number: number; instance?: number }): string {
  return owner.instance ? `${owner.number}-i${owner.instance}` : String(owner.number);
}

/** A pipe an upgrade carries (the read end of a generation's stdout or stderr). */
export interface CarriedOutput {
  role: 'app-output';
  name: string;
  fd: number;
}

/** A generation's two pipes: the write ends it gets as fds 1 and 2, the read ends Aeterna keeps. */
export interface Pipes {
  stdout: number;
  stderr: number;
  read: { stdout: number; stderr: number };
}

/** One line, or a piece of a long one, as it is written out. */
interface Piece {
  text: string;
  continues: boolean;
}

/**
 * Writes `data` whole to `fd`, synchronously (as Aeterna's logger does): a non-blocking fd that is full is retried
 * for up to a second; then, or when nobody reads Aeterna's output any more (EPIPE), the rest is dropped.
 */
function writeWhole(fd: number, data: Buffer): boolean {
  let offset = 0;
  let waits = 0;
  while (offset < data.length) {
    try {
      offset += fs.writeSync(fd, data, offset);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EAGAIN' || waits++ >= 1000) return false;
      Atomics.wait(SLEEPER, 0, 0, 1);
    }
  }
  return true;
}
const SLEEPER = new Int32Array(new SharedArrayBuffer(4));

/** The byte length of the longest prefix of buf[0, len) that ends on a UTF-8 character boundary. */
export function utf8Boundary(buf: Buffer, len: number): number {
  for (let i = len - 1; i >= Math.max(0, len - 4); i--) {
    const b = buf[i];
    if ((b & 0xc0) === 0x80) continue; // a continuation byte: look further back for its lead
    const size = b >= 0xf0 ? 4 : b >= 0xe0 ? 3 : b >= 0xc0 ? 2 : 1;
    return i + size > len ? i : len;
  }
  return len;
}

/**
 * Splits a byte stream into lines of at most MAX_LINE_BYTES: a longer one comes out in pieces, each but the last
 * marked `continues`. Holds at most MAX_LINE_BYTES of an unfinished line.
 */
export class LineSplitter {
  private readonly pending = Buffer.alloc(MAX_LINE_BYTES);
  private length = 0;

  constructor(private readonly onPiece: (piece: Piece) => void) {}

  push(chunk: Buffer): void {
    let start = 0;
    while (start < chunk.length) {
      const nl = chunk.indexOf(0x0a, start);
      const end = nl === -1 ? chunk.length : nl;
      while (start < end) {
        const n = Math.min(end - start, MAX_LINE_BYTES - this.length);
        chunk.copy(this.pending, this.length, start, start + n);
        this.length += n;
        start += n;
        if (this.length === MAX_LINE_BYTES) this.cut();
      }
      if (nl === -1) return;
      this.emit(this.length, false);
      start = nl + 1;
    }
  }

  /** At the end of the stream: the last line, when it had no newline. */
  flush(): void {
    if (this.length > 0) this.emit(this.length, false);
  }

  /** The buffer is full without a newline: out goes a piece, up to the last whole character. */
  private cut(): void {
    const at = utf8Boundary(this.pending, this.length);
    this.emit(at === 0 ? this.length : at, true);
  }

  private emit(bytes: number, continues: boolean): void {
    let text = this.pending.toString('utf8', 0, bytes);
    if (!continues && text.endsWith('\r')) text = text.slice(0, -1);
    this.pending.copy(this.pending, 0, bytes, this.length);
    this.length -= bytes;
    this.onPiece({ text, continues });
  }
}

/** The last lines of a stream, bounded in lines and bytes (each line cut to the byte bound). */
export class TailRing {
  private readonly lines: string[] = [];
  private bytes = 0;

  constructor(
    private readonly maxLines = STDERR_TAIL_LINES,
    private readonly maxBytes = STDERR_TAIL_BYTES,
  ) {}

  push(line: string): void {
    const kept = Buffer.byteLength(line) > this.maxBytes ? line.slice(0, this.maxBytes / 4) : line;
    this.lines.push(kept);
    this.bytes += Buffer.byteLength(kept);
    while (this.lines.length > this.maxLines || this.bytes > this.maxBytes)
      this.bytes -= Buffer.byteLength(this.lines.shift()!);
  }

  list(): string[] {
    return [...this.lines];
  }
}

/** One stream (stdout or stderr) of one generation: a non-blocking pipe, read when the loop says it is readable. */
class OutputStream {
  private readonly poller: Poller;
  private readonly splitter: LineSplitter;
  private open = true;
  private paused = false;

  constructor(
    readonly name: StreamName,
    readonly fd: number,
    private readonly owner: GenerationOutput,
    onPiece: (piece: Piece) => void,
  ) {
    this.splitter = new LineSplitter(onPiece);
    this.poller = new native.Poller(fd, () => this.readTurn());
    this.poller.start(READABLE);
  }

  /** One turn: read what is there, up to the turn's and the second's budget. */
  private readTurn(): void {
    const budget = Math.min(READ_BYTES_PER_TURN, this.owner.allowance());
    const read = this.read(budget);
    this.owner.spent(read);
    if (this.open && this.owner.allowance() === 0) this.owner.throttle();
  }

  /** Reads up to `budget` bytes (fewer when the pipe is empty); at EOF the stream closes. Returns the bytes read. */
  read(budget: number): number {
    let total = 0;
    while (this.open && total < budget) {
      const buf = this.owner.scratch;
      let n: number;
      try {
        n = fs.readSync(this.fd, buf, 0, Math.min(buf.length, budget - total), null);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === 'EAGAIN' || code === 'EINTR') break;
        n = 0; // any other error ends the stream as EOF does
      }
      if (n === 0) {
        this.close();
        break;
      }
      total += n;
      this.splitter.push(buf.subarray(0, n));
    }
    this.owner.flushOut();
    return total;
  }

  pause(): void {
    if (this.open && !this.paused) this.poller.stop();
    this.paused = true;
  }

  resume(): void {
    if (this.open && this.paused) this.poller.start(READABLE);
    this.paused = false;
  }

  /** The generation is gone: read what it left in the pipe (up to EXIT_DRAIN_BYTES), its last unfinished line too. */
  drainAndClose(): void {
    if (!this.open) return;
    this.read(EXIT_DRAIN_BYTES);
    this.close();
  }

  private close(): void {
    if (!this.open) return;
    this.open = false;
    this.splitter.flush();
    this.owner.flushOut();
    this.poller.close();
    try {
      native.close(this.fd);
    } catch {
      // already closed
    }
  }

  get isOpen(): boolean {
    return this.open;
  }
}

/** A generation's stdout and stderr, read and written out; its stderr tail. */
export class GenerationOutput {
  readonly scratch: Buffer;
  readonly stderrTail = new TailRing();
  private readonly streams: OutputStream[];
  /** Lines waiting to be written out at the end of this read, by Aeterna's fd. */
  private readonly out = new Map<number, string[]>();
  private windowStart = Date.now();
  private windowBytes = 0;
  private resumeTimer: NodeJS.Timeout | null = null;

  constructor(
    readonly generation: number,
    readonly instance: number,
    readonly pid: number,
    private readonly mode: 'prefixed' | 'json',
    private readonly service: string,
    fds: { stdout: number; stderr: number },
    scratch: Buffer,
    /** Aeterna's fd a stream's lines go to. */
    private readonly destination: (stream: StreamName) => number,
  ) {
    this.scratch = scratch;
    this.streams = (['stdout', 'stderr'] as const).map(
      (name) => new OutputStream(name, fds[name], this, (piece) => this.line(name, piece)),
    );
  }

  /** Bytes this generation may still pass in the current second. */
  allowance(): number {
    const now = Date.now();
    if (now - this.windowStart >= 1000) {
      this.windowStart = now;
      this.windowBytes = 0;
    }
    return Math.max(0, MAX_BYTES_PER_SECOND - this.windowBytes);
  }

  spent(bytes: number): void {
    this.windowBytes += bytes;
  }

  /** Over the second's budget: stop reading until the next second (the app's writes wait meanwhile). */
  throttle(): void {
    if (this.resumeTimer !== null) return;
    for (const s of this.streams) s.pause();
    const wait = Math.max(1, this.windowStart + 1000 - Date.now());
    this.resumeTimer = setTimeout(() => {
      this.resumeTimer = null;
      for (const s of this.streams) s.resume();
    }, wait);
  }

  private line(stream: StreamName, piece: Piece): void {
    if (stream === 'stderr') this.stderrTail.push(piece.continues ? piece.text + CONTINUES_MARKER : piece.text);
    const text =
      this.mode === 'json'
        ? JSON.stringify({
            time: new Date().toISOString(),
            name: 'app',
            service: this.service,
            generation: this.generation,
            instance: this.instance,
            pid: this.pid,
            stream,
            line: piece.text,
            ...(piece.continues ? { continues: true } : {}),
          })
        : `[generation ${this.generation} pid ${this.pid}] ${piece.text}${piece.continues ? CONTINUES_MARKER : ''}`;
    const fd = this.destination(stream);
    let lines = this.out.get(fd);
    if (lines === undefined) this.out.set(fd, (lines = []));
    lines.push(text);
  }

  /** Write out what this read turned into lines: one write per destination. */
  flushOut(): void {
    for (const [fd, lines] of this.out) {
      if (lines.length > 0) writeWhole(fd, Buffer.from(lines.join('\n') + '\n'));
    }
    this.out.clear();
  }

  /** Read what is already in the pipes (the tail is then up to date), within the exit's bound. */
  catchUp(): void {
    for (const s of this.streams) if (s.isOpen) s.read(EXIT_DRAIN_BYTES);
  }

  close(): void {
    if (this.resumeTimer !== null) clearTimeout(this.resumeTimer);
    this.resumeTimer = null;
    for (const s of this.streams) s.drainAndClose();
  }

  get open(): boolean {
    return this.streams.some((s) => s.isOpen);
  }

  /** The read ends an upgrade keeps open for the next Aeterna. */
  carry(): CarriedOutput[] {
    return this.streams
      .filter((s) => s.isOpen)
      .map((s) => ({
        role: 'app-output' as const,
        name: `${outputKey({ number: this.generation, instance: this.instance })}/${s.name}`,
        fd: s.fd,
      }));
  }
}

/**
 * Where each generation's output goes, by observability.app_output. `raw`: nowhere (the app has Aeterna's fds 1
 * and 2). Else pipes per generation, read until it exits.
 */
export class AppOutput {
  /** By outputKey: an instance restarted alone keeps its generation's number. */
  private readonly live = new Map<string, GenerationOutput>();
  private readonly exited: GenerationOutput[] = [];
  /** One read buffer for every stream (they are read one after the other, on one thread). */
  private readonly scratch = Buffer.alloc(64 * 1024);

  constructor(
    readonly mode: AppOutputMode,
    private readonly service: string,
    private readonly log: Logger,
  ) {}

  /**
   * Start a generation through `start`, giving it pipes as its stdout and stderr (null in raw mode: it inherits
   * Aeterna's), and read them until it exits. Pipes that cannot be had (no fd left) fall back to raw for it.
   */
  spawn<G extends OutputOwner>(start: (stdio: { stdout: number; stderr: number } | null) => G): G {
    let pipes: Pipes | null = null;
    try {
      pipes = this.pipes();
    } catch (err) {
      this.log.warn(
        { err },
        `the app's output cannot be piped (${(err as Error).message}): this generation inherits Aeterna's`,
      );
    }
    if (pipes === null) return start(null);
    let owner: G;
    try {
      owner = start({ stdout: pipes.stdout, stderr: pipes.stderr });
    } catch (err) {
      this.abandon(pipes);
      throw err;
    }
    this.started(owner, pipes);
    return owner;
  }

  /**
   * The fds to give a generation as its stdout and stderr, or null in raw mode (it inherits Aeterna's).
   * Call `started` once it runs (or `abandon` when it could not start): the write ends are Aeterna's until then.
   */
  pipes(): Pipes | null {
    if (this.mode === 'raw') return null;
    const [outRead, outWrite] = native.outputPipe();
    let errPair: [number, number];
    try {
      errPair = native.outputPipe();
    } catch (err) {
      native.close(outRead);
      native.close(outWrite);
      throw err;
    }
    return { stdout: outWrite, stderr: errPair[1], read: { stdout: outRead, stderr: errPair[0] } };
  }

  /** The generation runs with the pipes' write ends: Aeterna closes its copies and reads the other ends. */
  started(owner: OutputOwner, pipes: Pipes): void {
    native.close(pipes.stdout);
    native.close(pipes.stderr);
    this.watch(owner, pipes.read);
  }

  /** It did not start: every end is closed. */
  abandon(pipes: Pipes): void {
    for (const fd of [pipes.stdout, pipes.stderr, pipes.read.stdout, pipes.read.stderr]) native.close(fd);
  }

  /** A generation a re-executed Aeterna took over, with the read ends the previous one carried. */
  adopt(owner: OutputOwner, carried: Array<{ name: string; fd: number }>): void {
    const fd = (stream: StreamName): number | undefined =>
      carried.find((c) => c.name === `${outputKey(owner)}/${stream}`)?.fd;
    const stdout = fd('stdout');
    const stderr = fd('stderr');
    if (stdout === undefined || stderr === undefined || this.mode === 'raw') {
      // Read by nobody, a pipe would block the app once full: the pipes the previous Aeterna read are read here
      // whatever the mode, and one carried alone is closed.
      if (stdout !== undefined && stderr !== undefined) return this.watch(owner, { stdout, stderr }, 'prefixed');
      for (const f of [stdout, stderr]) if (f !== undefined) native.close(f);
      return;
    }
    this.watch(owner, { stdout, stderr });
  }

  private watch(
    owner: OutputOwner,
    fds: { stdout: number; stderr: number },
    mode: 'prefixed' | 'json' = this.mode === 'json' ? 'json' : 'prefixed',
  ): void {
    // json: every record on Aeterna's stderr, beside its own log lines; prefixed: stdout to stdout, stderr to stderr.
    const destination = (stream: StreamName): number => (mode === 'json' || stream === 'stderr' ? 2 : 1);
    const key = outputKey(owner);
    const output = new GenerationOutput(
      owner.number,
      owner.instance ?? 0,
      owner.pid,
      mode,
      this.service,
      fds,
      this.scratch,
      destination,
    );
    this.live.set(key, output);
    void owner.exited.then(() => {
      output.close();
      if (this.live.get(key) === output) this.live.delete(key);
      this.exited.push(output);
      if (this.exited.length > KEPT_EXITED) this.exited.shift();
    });
    this.log.debug({ generation: owner.number, mode }, 'reading the app output');
  }

  /**
   * The last lines instance `instance` of generation `number` wrote to stderr (what it wrote until now: its pipe is
   * read first), or null when Aeterna does not read its stderr (raw mode) or no longer remembers it.
   */
  stderrTail(number: number, instance = 0): string[] | null {
    const live = this.live.get(outputKey({ number, instance }));
    if (live !== undefined) {
      live.catchUp();
      return live.stderrTail.list();
    }
    const exited = this.exited.filter((o) => o.generation === number && o.instance === instance);
    return exited[exited.length - 1]?.stderrTail.list() ?? null;
  }

  /** The read ends of every live generation's pipes, for an upgrade. */
  carry(): { fds: CarriedOutput[]; part: Record<string, never> } {
    return { fds: [...this.live.values()].flatMap((o) => o.carry()), part: {} };
  }
}

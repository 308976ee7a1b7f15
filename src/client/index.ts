// aeterna/client: what an app under Aeterna needs, in a few calls.
//   listeners()  the sockets Aeterna hands over (LISTEN_FDS), by name
//   connect()    the State Relay (docs/srp.md): load() the previous generation's
//                state, onDump() to hand yours over, ready(), shutdown()
//   drain()      a graceful HTTP drain for SIGTERM
// Outside Aeterna everything degrades to no-ops (load() gives null), so an app
// runs the same in development.
import crypto from 'node:crypto';
import fs from 'node:fs';
import zlib from 'node:zlib';
import { native, READABLE, type Poller } from '../native/binding';
import { SrpConnection } from '../srp/connection';
import { Handoff, HandoffReceiver, endUntakenChannel, type AdoptedConnection } from './handoff';
import { FdStream, drained } from '../srp/fd-stream';
import { SrpError, closeQuietly, isSealedState, type SrpErrorCode } from '../srp/codec';
import type { CheckpointRefusal } from '../srp/checkpoint-store';
import {
  trailerDigest,
  type Checksum,
  type LoadSource,
  type Message,
  type StateHeader,
  type TrailerDigest,
} from '../srp/messages';

export { drain, trackConnections, type DrainOptions } from './drain';
export { Handoff, type AdoptedConnection } from './handoff';
export { SseStream, formatEvent, resumeSse } from './sse';
export {
  handOverWebSocket,
  resumeWebSocket,
  type ResumeWebSocketOptions,
  type WebSocketLike,
  type WebSocketServerLike,
} from './websocket';

/**
 * Why an SDK call failed (docs/srp.md, "The app contract"): the protocol's codes (an `error` frame either way),
 * and the SDK's own: `checksum_mismatch` / `bad_state` (a state that failed verification), `load_failed` /
 * `dump_failed` (the app's callback threw or is missing), `closed` (no connection), `usage` (calls out of order);
 * and a refused checkpoint's: `disabled`, `too_large`, `checksum_mismatch`, `bad_state`.
 */
export type RelayErrorCode =
  SrpErrorCode | CheckpointRefusal | 'bad_state' | 'load_failed' | 'dump_failed' | 'closed' | 'usage';

export class RelayError extends Error {
  constructor(
    readonly code: RelayErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'RelayError';
  }
}

/** A refusing ack's `error` text: the code first, so Aeterna's log and the old generation can tell why. */
function refusal(code: RelayErrorCode, message: string): string {
  return `${code}: ${message}`;
}

const DECIMAL = /^[0-9]+$/;

/**
 * The sockets Aeterna passed to this process, by LISTEN_FDNAMES name (fd3, fd4... when unnamed or when the
 * name was taken by an earlier fd). Only when LISTEN_PID is this process; the fds become close-on-exec (as
 * sd_listen_fds does), and an fd that is not a socket is left out, with a warning.
 */
export function listeners(env: NodeJS.ProcessEnv = process.env): Map<string, number> {
  const found = new Map<string, number>();
  const pid = env.LISTEN_PID ?? '';
  const count = env.LISTEN_FDS ?? '';
  if (!DECIMAL.test(pid) || Number(pid) !== process.pid || !DECIMAL.test(count)) return found;
  const names = (env.LISTEN_FDNAMES ?? '').split(':');
  for (let i = 0; i < Number(count); i++) {
    const fd = 3 + i;
    let isSocket = false;
    try {
      isSocket = fs.fstatSync(fd).isSocket();
    } catch {
      // not open: left out like any other non-socket
    }
    if (!isSocket) {
      process.stderr.write(`aeterna/client: LISTEN_FDS: fd ${fd} is not a socket; left out\n`);
      continue;
    }
    native.setCloexec(fd);
    const name = names[i] && !found.has(names[i]) ? names[i] : `fd${fd}`;
    found.set(name, fd);
  }
  return found;
}

/** A state received from the relay. */
export interface LoadedState {
  encoding: string;
  size: number;
  /** The final sync after promotion (a second load, while serving). */
  final: boolean;
  /** "relay": the previous generation's live dump; "checkpoint": the latest checkpoint (no live predecessor). */
  source: LoadSource;
  /** The checkpoint's sequence number and age when it was sent (source "checkpoint"), else null. */
  seq: number | null;
  ageMs: number | null;
  /** fds that came with the state, by name (e.g. live connections "conn:1"); the app owns them. */
  fds: Map<string, number>;
  /** The memfd holding the state (memfd transport), or null. */
  memfd: number | null;
  /** The bytes (read from the memfd on first use for the memfd transport). */
  readonly data: Buffer;
  text(): string;
  json<T = unknown>(): T;
}

/** A dump result with its bytes: `data` as is (a string is UTF-8, encoding `text`). */
export interface DataResult {
  data: Buffer | string;
  encoding?: string;
  fds?: Record<string, number>;
  sha256?: string;
}

/** A dump result in a sealed memfd (from memfdState()); the SDK closes it once sent. */
export interface MemfdResult {
  memfd: number;
  encoding?: string;
  fds?: Record<string, number>;
  /** Sent as is when given; omitted otherwise (the seals already guarantee the content). */
  sha256?: string;
}

/**
 * What a dump callback may return: nothing (no state), bytes, text, a DataResult, a MemfdResult, or any other
 * object or array, sent as JSON. An object with a `memfd` or `data` key must be one of the two results, so a
 * mistyped one (`{ memfd: '3' }`) is a type error rather than silently sent as JSON.
 */
export type DumpResult =
  | null
  | undefined
  | Buffer
  | string
  | DataResult
  | MemfdResult
  | (Record<string, unknown> & { memfd?: never; data?: never })
  | unknown[];

export type DumpCallback = (request: { final: boolean }) => DumpResult | Promise<DumpResult>;

/** A sealed memfd holding `data`: hand it over with `{ memfd }` from a dump callback. */
export function memfdState(data: Buffer, name = 'aeterna-state'): number {
  const fd = native.memfdCreate(name);
  for (let off = 0; off < data.length;) off += fs.writeSync(fd, data, off, data.length - off, off);
  native.sealMemfd(fd);
  return fd;
}

/** Wait for `promise`, at most `ms` (not at all when ms <= 0). */
async function within(promise: Promise<void>, ms: number): Promise<void> {
  if (ms <= 0) return;
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([promise, new Promise<void>((r) => (timer = setTimeout(r, ms)))]);
  clearTimeout(timer);
}

function sha256(data: Buffer): string {
  return crypto.createHash('sha256').update(data).digest('hex');
}

/**
 * A streamed state's check, fed as the bytes go or come: SHA-256 by default, CRC-32 where the dump offered it
 * (docs/srp.md, "Checksums").
 */
class StreamCheck {
  private readonly sha: crypto.Hash | null;
  private crc = 0;

  constructor(checksum: Checksum | undefined) {
    this.sha = checksum === 'crc32' ? null : crypto.createHash('sha256');
  }

  update(bytes: Buffer): void {
    if (this.sha) this.sha.update(bytes);
    else this.crc = zlib.crc32(bytes, this.crc);
  }

  hex(): string {
    return this.sha ? this.sha.digest('hex') : (this.crc >>> 0).toString(16).padStart(8, '0');
  }

  trailer(): Message {
    return this.sha ? { op: 'trailer', sha256: this.hex() } : { op: 'trailer', crc32: this.hex() };
  }
}

/** Reads per poll callback, so a fast sender cannot starve the app's event loop. */
const DIRECT_READS_PER_TURN = 16;

/**
 * The receiving end of a direct state's socket pair (docs/srp.md, "Direct transport"): reads straight into the
 * state's buffer (the kernel's one copy, none here), checks as the bytes land, counts what comes beyond the
 * announced size, and closes the pair at its end of file (or when it fails: what arrived is judged as is).
 */
class DirectReader {
  ended = false;
  private readonly poller: Poller;
  private spare = Buffer.alloc(0);

  constructor(
    private readonly fd: number,
    private readonly incoming: Incoming,
    private readonly onEnd: () => void,
  ) {
    this.poller = new native.Poller(fd, (errno) => (errno === 0 ? this.readSome() : this.end()));
    this.poller.start(READABLE);
  }

  close(): void {
    if (this.ended) return;
    this.ended = true;
    this.poller.close();
    closeQuietly(this.fd);
  }

  private end(): void {
    if (this.ended) return;
    this.close();
    this.onEnd();
  }

  private readSome(): void {
    const incoming = this.incoming;
    for (let i = 0; i < DIRECT_READS_PER_TURN && !this.ended; i++) {
      const room = incoming.buffer.length - incoming.received;
      if (room === 0 && this.spare.length === 0) this.spare = Buffer.allocUnsafe(64 << 10); // only to count extra bytes
      const into = room > 0 ? incoming.buffer.subarray(incoming.received) : this.spare;
      let got;
      try {
        got = native.recvmsgInto(this.fd, into, 0);
      } catch {
        return this.end();
      }
      if (got === null) return;
      if (got.bytes === 0) return this.end();
      if (room > 0) incoming.hash.update(into.subarray(0, got.bytes));
      incoming.received += got.bytes;
    }
  }
}

function readMemfd(fd: number, size: number): Buffer {
  const out = Buffer.allocUnsafe(size);
  for (let off = 0; off < size;) {
    const n = fs.readSync(fd, out, off, size - off, off);
    if (n === 0) throw new Error(`memfd ended after ${off} of ${size} bytes`);
    off += n;
  }
  return out;
}

type LoadHeader = StateHeader & { final?: boolean; source?: LoadSource; seq?: number; age_ms?: number };

function makeState(h: LoadHeader, data: Buffer | null, fds: Map<string, number>, memfd: number | null): LoadedState {
  let bytes = data;
  return {
    encoding: h.encoding ?? 'binary',
    size: h.size,
    final: h.final === true,
    source: h.source ?? 'relay',
    seq: h.seq ?? null,
    ageMs: h.age_ms ?? null,
    fds,
    memfd,
    get data() {
      bytes ??= memfd === null ? Buffer.alloc(0) : readMemfd(memfd, h.size);
      return bytes;
    },
    text() {
      return this.data.toString('utf8');
    },
    json<T>() {
      return JSON.parse(this.text()) as T;
    },
  };
}

interface Incoming {
  header: LoadHeader;
  fds: Map<string, number>;
  /** The announced size, filled as data frames arrive, and hashed on the way (overlapping the transfer). */
  buffer: Buffer;
  received: number;
  hash: StreamCheck;
  /** The `trailer` frame, when the header announced one (null until it arrives). */
  trailer: TrailerDigest | null;
  /** The direct transport: the socket pair the bytes come on, until its end of file (docs/srp.md, "Direct transport"). */
  pair: DirectReader | null;
}

export interface ConnectOptions {
  /** The relay socket; default $LIVERELAY_STATE_SOCK. Without one, the client is a no-op. */
  path?: string;
  /** How long to wait for Aeterna's welcome. Default 10 s. */
  timeoutMs?: number;
}

/** Connect to Aeterna's State Relay. Without LIVERELAY_STATE_SOCK it returns a client whose calls do nothing. */
export async function connect(options: ConnectOptions = {}): Promise<StateClient> {
  const socketPath = options.path ?? process.env.LIVERELAY_STATE_SOCK;
  const client = new StateClient();
  if (socketPath) await client.open(socketPath, options.timeoutMs ?? 10_000);
  return client;
}

export class StateClient {
  /** This process's generation, from Aeterna's welcome (null outside Aeterna). */
  generation: number | null = null;
  private conn: SrpConnection | null = null;
  private maxFrame = 16 << 20;
  private incoming: Incoming | null = null;
  private initial: {
    promise: Promise<LoadedState | null>;
    resolve: (s: LoadedState | null) => void;
    reject: (e: Error) => void;
  };
  private initialTaken = false;
  private initialArrived = false;
  private initialAcked = false;
  private readyWanted = false;
  private dumpCallback: DumpCallback | null = null;
  private loadCallback: ((state: LoadedState) => void | Promise<void>) | null = null;
  private finalDumpPending = false;
  /** The last dump offered a digest trailer: the state can go out as it is hashed. */
  private trailerOffered = false;
  /** The last dump offered a cheaper check than SHA-256 for the trailer (docs/srp.md, "Checksums"). */
  private checksumOffered: Checksum | undefined = undefined;
  /** The last dump offered the direct transport: our end of its socket pair, until the answer uses or closes it. */
  private directPair: number | null = null;
  /** The final dump's end of the connection handoff channel, until handoff() takes it (docs/srp.md, "Connection handoff"). */
  private handoffEnd: number | null = null;
  private handoffTaken = false;
  private connectionCallback: ((c: AdoptedConnection) => void) | null = null;
  /** When Aeterna asked for the final dump (performance.now()), and how long it waits for the answer (its timeout_ms). */
  private finalAsked: { at: number; timeoutMs: number | null } | null = null;
  private finalAskedSignal: () => void = () => undefined;
  private readonly finalAskedOrFinished: Promise<void>;
  private shuttingDown = false;
  /** Aeterna's verdict on our final state (null until its ack arrives). */
  private finalAckOk: boolean | null = null;
  private finished: Promise<void>;
  private finish!: () => void;
  /** Aeterna's welcome said it stores checkpoints. */
  private checkpointsTaken = false;
  /** What this SDK sends (a dump's state, checkpoints) goes out one after the other, never interleaved. */
  private outgoing: Promise<void> = Promise.resolve();
  /** Checkpoints sent and not answered yet, in order (Aeterna answers them in order). */
  private checkpointWaiters: Array<{ resolve: (seq: number) => void; reject: (err: RelayError) => void }> = [];

  constructor() {
    let resolve!: (s: LoadedState | null) => void;
    let reject!: (e: Error) => void;
    const promise = new Promise<LoadedState | null>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    promise.catch(() => undefined);
    this.initial = { promise, resolve, reject };
    this.finished = new Promise((r) => (this.finish = r));
    this.finalAskedOrFinished = Promise.race([this.finished, new Promise<void>((r) => (this.finalAskedSignal = r))]);
  }

  /** Whether this process talks to Aeterna's relay. */
  get enabled(): boolean {
    return this.conn !== null;
  }

  /** @internal */
  async open(socketPath: string, timeoutMs: number): Promise<void> {
    let fd: number;
    try {
      fd = native.connectUnix(socketPath);
    } catch (err) {
      throw new RelayError('closed', `cannot connect to the state relay at ${socketPath}: ${(err as Error).message}`);
    }
    const conn = new SrpConnection(fd, 1 << 30);
    this.conn = conn;
    const welcomed = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new RelayError('timeout', `no welcome from Aeterna on ${socketPath} within ${timeoutMs} ms`)),
        timeoutMs,
      );
      conn.on('message', (m, fds) => {
        if (m.op === 'welcome') {
          clearTimeout(timer);
          if (m.v !== 1) {
            conn.fail('unsupported_version', `welcome with v=${m.v}; this SDK speaks version 1`);
            return;
          }
          this.generation = m.generation;
          this.maxFrame = m.max_frame;
          this.checkpointsTaken = m.checkpoint === true;
          conn.lowerFrameLimit(m.max_frame); // Aeterna keeps to it: a larger frame from it is not to be trusted
          resolve();
          return;
        }
        if (m.op === 'error') {
          clearTimeout(timer);
          reject(
            new RelayError(m.code as RelayErrorCode, `Aeterna refused the relay connection: ${m.code}: ${m.message}`),
          );
        }
        this.onMessage(m, fds);
      });
      conn.on('close', (err) => {
        clearTimeout(timer);
        const why = closedError(err);
        reject(why);
        this.onClose(why);
      });
    });
    conn.on('data', (payload, _frameLength, remaining) => this.onData(payload, remaining));
    // We verify a digest that follows the data, and can send and receive a state on a socket pair of its own.
    // Besides SHA-256 we compute and verify CRC-32 (docs/srp.md, "Checksums").
    // And we hand our client connections over at promotion, and adopt the previous generation's.
    conn.send({ op: 'hello', v: 1, trailer: true, direct: true, checksums: ['crc32', 'sha256'], handoff: true });
    await welcomed;
  }

  /**
   * The previous generation's state (null when there is none, or outside
   * Aeterna). Size and sha256 are verified. With `apply`, the state is
   * acknowledged only if apply succeeds (a throw refuses it: the reload rolls
   * back), and load resolves with apply's result.
   */
  async load(): Promise<LoadedState | null>;
  async load<T>(apply: (state: LoadedState) => T | Promise<T>): Promise<T | null>;
  async load<T>(apply?: (state: LoadedState) => T | Promise<T>): Promise<T | LoadedState | null> {
    if (!this.conn) return null;
    if (this.initialTaken) throw new RelayError('usage', 'load() was already called');
    this.initialTaken = true;
    const state = await this.initial.promise;
    if (state === null) {
      this.ack(true);
      return null;
    }
    try {
      const result = apply ? await apply(state) : state;
      this.ack(true);
      return result;
    } catch (err) {
      this.ack(false, refusal('load_failed', `the app could not load the state: ${(err as Error).message}`));
      throw err;
    }
  }

  /**
   * Store `state` (anything a dump callback may return) in Aeterna as the latest checkpoint: a generation
   * started after a crash loads it. Resolves to its sequence number once Aeterna has stored it; rejects with
   * a RelayError on refusal (`disabled`, `too_large`, `checksum_mismatch`, `bad_state`) or when the
   * connection closes first. Outside Aeterna a no-op: resolves to null.
   */
  async checkpoint(state: DumpResult): Promise<number | null> {
    const conn = this.conn;
    if (!conn) return null;
    if (!this.checkpointsTaken)
      throw new RelayError(
        'disabled',
        'this Aeterna does not store checkpoints (orchestration.state_handoff.checkpoint.enabled is off)',
      );
    if (conn.closed) throw new RelayError('closed', 'the relay connection is closed');
    const waiter = { resolve: (_seq: number) => undefined as void, reject: (_err: RelayError) => undefined as void };
    const stored = new Promise<number>((resolve, reject) => Object.assign(waiter, { resolve, reject }));
    this.checkpointWaiters.push(waiter);
    try {
      await this.send(() => this.sendState(conn, state, true, 'checkpoint'));
    } catch (err) {
      this.checkpointWaiters = this.checkpointWaiters.filter((w) => w !== waiter);
      throw err;
    }
    return stored;
  }

  /** Hand over this generation's state when Aeterna asks (at a reload, and a final time at promotion). */
  onDump(callback: DumpCallback): void {
    this.dumpCallback = callback;
  }

  /** States that arrive later, while serving: the final sync after promotion. */
  onLoad(callback: (state: LoadedState) => void | Promise<void>): void {
    this.loadCallback = callback;
  }

  /**
   * Connections the previous generation hands over at promotion (docs/srp.md, "Connection handoff"): `callback`
   * gets each as a net.Socket (the bytes it had read but not processed come first) with the app's `id` and
   * `meta`. Register it before ready(): without one, a handed-over connection is closed.
   */
  onConnection(callback: (c: AdoptedConnection) => void): void {
    this.connectionCallback = callback;
  }

  /**
   * For the SIGTERM handler, before draining: wait (at most `timeoutMs`) for Aeterna's final dump, and return the
   * channel to hand live connections to the next generation on, or null when there is none (no final dump, a
   * next generation that does not adopt connections, a rollback, outside Aeterna). Hand over what you can with
   * `send()`, then `end()`; drain the rest; then shutdown() answers the final dump as usual.
   */
  async handoff(timeoutMs = 10_000): Promise<Handoff | null> {
    if (!this.conn || this.handoffTaken) return null;
    if (!this.finalAsked) await within(this.finalAskedOrFinished, timeoutMs);
    if (this.handoffEnd === null || this.handoffTaken) return null;
    this.handoffTaken = true;
    const fd = this.handoffEnd;
    this.handoffEnd = null;
    return new Handoff(fd);
  }

  /** Tell Aeterna this generation is ready (counts like sd_notify READY=1). Sent once the initial state is acknowledged. */
  ready(): void {
    if (!this.conn || this.readyWanted) return;
    if (!this.initialTaken)
      throw new RelayError(
        'usage',
        'call load() before ready(): the new generation must take (or refuse) the state first',
      );
    this.readyWanted = true;
    if (this.initialAcked && !this.conn.closed) this.conn.send({ op: 'ready' });
  }

  /**
   * For the SIGTERM handler, after draining: answer the final dump if Aeterna
   * asks for one (now, so it includes the last requests), and wait until it is
   * acknowledged or Aeterna closes the connection (no final dump wanted).
   * `timeoutMs` bounds the wait for the final dump (Aeterna sends it, or closes,
   * right after its SIGTERM). Once it has arrived, handing the state over takes
   * as long as Aeterna said it waits (the dump's timeout_ms, its
   * state_handoff.timeout), however large the state; without timeout_ms,
   * `timeoutMs` bounds it all. Resolves true when the final state was handed over and acked ok.
   */
  async shutdown(timeoutMs = 10_000): Promise<boolean> {
    if (!this.conn || this.conn.closed) return false;
    const began = performance.now();
    this.shuttingDown = true;
    if (this.finalDumpPending) void this.answerDump(true);
    else await within(this.finalAskedOrFinished, timeoutMs);
    const asked = this.finalAsked;
    const until = asked?.timeoutMs != null ? asked.at + asked.timeoutMs : began + timeoutMs;
    await within(this.finished, until - performance.now());
    this.close();
    return this.finalAckOk === true;
  }

  close(): void {
    this.conn?.close();
    if (this.handoffEnd !== null) endUntakenChannel(this.handoffEnd); // never taken: the next generation adopts nothing
    this.handoffEnd = null;
  }

  private ack(ok: boolean, error?: string): void {
    if (!this.conn || this.conn.closed) return;
    this.conn.send(ok ? { op: 'ack', ok: true } : { op: 'ack', ok: false, error: error ?? 'refused' });
    if (!this.initialAcked) {
      this.initialAcked = true;
      if (this.readyWanted) this.conn.send({ op: 'ready' });
    }
  }

  private onMessage(m: Message, fds: number[]): void {
    switch (m.op) {
      case 'load': {
        const named = new Map<string, number>((m.fds ?? []).map((name, i) => [name, fds[i]]));
        const streamed = m.transport === 'memfd' ? 0 : m.size;
        const incoming: Incoming = {
          header: m,
          fds: named,
          buffer: Buffer.allocUnsafe(streamed),
          received: 0,
          hash: new StreamCheck(m.checksum),
          trailer: null,
          pair: null,
        };
        this.incoming = incoming;
        if (m.transport === 'direct') {
          incoming.pair = new DirectReader(named.get('direct')!, incoming, () => this.completeWhenWhole());
          named.delete('direct');
        }
        if (m.transport === 'memfd' || m.size === 0) this.completeLoad();
        return;
      }
      case 'trailer':
        // The connection lets a trailer through only right after the data of a load that announced one.
        if (this.incoming) {
          this.incoming.trailer = m;
          this.completeWhenWhole();
        }
        return;
      case 'dump':
        this.trailerOffered = m.trailer === true;
        this.checksumOffered = m.checksum;
        if (this.directPair !== null) closeQuietly(this.directPair); // an earlier offer nobody answered
        this.directPair = m.direct ? fds[0] : null;
        if (m.final) {
          if (this.handoffEnd !== null) endUntakenChannel(this.handoffEnd); // an earlier one nobody took
          this.handoffEnd = m.handoff ? fds[0] : null;
          this.finalAsked = { at: performance.now(), timeoutMs: m.timeout_ms ?? null };
          this.finalAskedSignal();
          this.finalDumpPending = true;
          if (this.shuttingDown) void this.answerDump(true);
        } else {
          void this.answerDump(false);
        }
        return;
      case 'handoff': {
        // We were promoted: the previous generation hands its connections over on this channel.
        // It reads the channel to its end on its own (its poller holds it), adopting each connection.
        new HandoffReceiver(fds[0], this.maxFrame, this.connectionCallback, (message) =>
          process.stderr.write(`aeterna/client: connection handoff: ${message}\n`),
        );
        return;
      }
      case 'checkpointed': {
        const waiter = this.checkpointWaiters.shift();
        if (!waiter) break;
        if (m.seq !== undefined) waiter.resolve(m.seq);
        else
          waiter.reject(
            new RelayError(
              (m.code ?? 'bad_state') as RelayErrorCode,
              `Aeterna refused the checkpoint: ${m.message ?? m.code ?? 'no reason given'}`,
            ),
          );
        return;
      }
      case 'ack':
        if (!m.ok) process.stderr.write(`aeterna/client: the new generation refused this state: ${m.error ?? ''}\n`);
        if (this.shuttingDown) {
          this.finalAckOk = m.ok;
          this.finish();
        }
        return;
      case 'error':
        // The sender closes after an error (docs/srp.md): so do we.
        process.stderr.write(`aeterna/client: relay error ${m.code}: ${m.message}\n`);
        this.close();
        return;
      default:
        // hello, welcome (again), state, ready: never valid from Aeterna.
        fds.forEach(closeQuietly);
        this.conn?.fail('unexpected_op', `"${m.op}" is not valid from Aeterna at this point`);
    }
  }

  private onData(payload: Buffer, remaining: number): void {
    const incoming = this.incoming;
    if (!incoming) return;
    this.received(incoming, payload);
    if (remaining === 0 && !incoming.header.trailer) this.completeLoad();
  }

  /** Bytes of a streamed state (data frames, or the direct pair): copied once into the state's place, hashed as they come. */
  private received(incoming: Incoming, payload: Buffer): void {
    const room = incoming.buffer.length - incoming.received;
    const part = payload.length > room ? payload.subarray(0, room) : payload; // more than announced is counted, not kept
    part.copy(incoming.buffer, incoming.received);
    incoming.hash.update(part);
    incoming.received += payload.length;
  }

  /** A direct state is whole once its pair reached end of file and its trailer arrived (in either order). */
  private completeWhenWhole(): void {
    const incoming = this.incoming;
    if (!incoming || incoming.trailer === null || (incoming.pair !== null && !incoming.pair.ended)) return;
    this.completeLoad();
  }

  /** A whole state arrived: verify it, then hand it to load() or onLoad. */
  private completeLoad(): void {
    const incoming = this.incoming!;
    this.incoming = null;
    const h = incoming.header;
    let state: LoadedState;
    let problem: RelayError | null = null;
    if (h.transport === 'memfd') {
      const memfd = incoming.fds.get('state')!;
      incoming.fds.delete('state');
      state = makeState(h, null, incoming.fds, memfd);
      const size = fs.fstatSync(memfd).size;
      if (!isSealedState(memfd))
        problem = new RelayError(
          'bad_state',
          'the memfd is not sealed with F_SEAL_WRITE, F_SEAL_SHRINK and F_SEAL_GROW',
        );
      else if (size !== h.size)
        problem = new RelayError('bad_state', `the memfd holds ${size} bytes, ${h.size} announced`);
      else if (h.sha256 && sha256(state.data) !== h.sha256)
        problem = new RelayError(
          'checksum_mismatch',
          `the memfd content does not match the announced sha256 ${h.sha256}`,
        );
    } else {
      const data = incoming.buffer;
      state = makeState(h, data, incoming.fds, null);
      const where = h.transport === 'direct' ? ' on the direct socket pair before its end of file' : '';
      if (incoming.received !== h.size)
        problem = new RelayError('bad_state', `received ${incoming.received} bytes${where}, ${h.size} announced`);
      else {
        // A trailer of the other kind than the header announced matches nothing (Aeterna never relays one).
        const expected =
          h.sha256 ?? (incoming.trailer ? (trailerDigest(incoming.trailer, h.checksum) ?? 'none') : undefined);
        const kind = h.sha256 ? 'sha256' : (h.checksum ?? 'sha256');
        if (expected !== undefined && incoming.hash.hex() !== expected)
          problem = new RelayError('checksum_mismatch', `${kind} of the ${h.size} bytes received is not ${expected}`);
      }
    }
    if (problem) {
      // A refused state's fds are not the app's: close them.
      for (const fd of incoming.fds.values()) closeQuietly(fd);
      if (state.memfd !== null) closeQuietly(state.memfd);
    }
    if (!this.initialArrived) {
      this.initialArrived = true;
      if (problem) {
        this.ack(false, refusal(problem.code, problem.message));
        this.initial.reject(problem);
      } else {
        this.initial.resolve(h.size === 0 && incoming.fds.size === 0 && state.memfd === null ? null : state);
      }
      return;
    }
    if (problem) {
      this.ack(false, refusal(problem.code, problem.message));
      return;
    }
    const apply = this.loadCallback;
    if (!apply) {
      // Acking a state nobody applied would tell Aeterna the final sync succeeded: refuse it, so the loss is logged.
      for (const fd of state.fds.values()) closeQuietly(fd);
      if (state.memfd !== null) closeQuietly(state.memfd);
      this.ack(false, refusal('load_failed', 'no onLoad() callback for a later load'));
      return;
    }
    Promise.resolve()
      .then(() => apply(state))
      .then(
        () => this.ack(true),
        (err: Error) => this.ack(false, refusal('load_failed', `the app could not apply the state: ${err.message}`)),
      );
  }

  private async answerDump(final: boolean): Promise<void> {
    if (final) this.finalDumpPending = false;
    const pair = final ? null : this.directPair; // ours from here: sendState uses or closes it
    if (!final) this.directPair = null;
    const conn = this.conn;
    let result: DumpResult;
    try {
      if (!conn || conn.closed) throw new RelayError('closed', 'the relay connection is closed');
      result = this.dumpCallback ? await this.dumpCallback({ final }) : null;
    } catch (err) {
      if (pair !== null) closeQuietly(pair);
      if (conn && !conn.closed)
        conn.send({ op: 'ack', ok: false, error: refusal('dump_failed', (err as Error).message) });
      return;
    }
    const trailer = this.trailerOffered;
    await this.send(() => this.sendState(conn, result, trailer, 'state', pair));
  }

  /** Run `sending` once what was queued before has gone out (a state and a checkpoint never interleave). */
  private send(sending: () => Promise<void>): Promise<void> {
    const next = this.outgoing.then(sending);
    this.outgoing = next.catch(() => undefined);
    return next;
  }

  /** `pair`: the direct transport's socket pair end, when the dump offered one; always used or closed here. */
  private async sendState(
    conn: SrpConnection,
    result: DumpResult,
    trailer: boolean,
    op: 'state' | 'checkpoint',
    pair: number | null = null,
  ): Promise<void> {
    let direct: number | null = null;
    try {
      direct = await this.sendStateVia(conn, result, trailer, op, pair);
    } finally {
      if (pair !== null && direct === null) closeQuietly(pair);
    }
  }

  /** Returns `pair` when it took the pair (an FdStream then owns it), null otherwise. */
  private async sendStateVia(
    conn: SrpConnection,
    result: DumpResult,
    trailer: boolean,
    op: 'state' | 'checkpoint',
    pair: number | null,
  ): Promise<number | null> {
    if (result === null || result === undefined) {
      conn.send({ op, size: 0 });
      return null;
    }
    let encoding = 'binary';
    let data: Buffer | null = null;
    let memfd: number | null = null;
    let extra: Record<string, number> = {};
    let knownSha: string | undefined;
    if (Buffer.isBuffer(result)) {
      data = result;
    } else if (typeof result === 'string') {
      data = Buffer.from(result);
      encoding = 'text';
    } else if (!Array.isArray(result) && typeof (result as { memfd?: unknown }).memfd === 'number') {
      const r = result as MemfdResult;
      memfd = r.memfd;
      encoding = r.encoding ?? encoding;
      extra = r.fds ?? {};
      knownSha = r.sha256;
    } else if (
      !Array.isArray(result) &&
      (Buffer.isBuffer((result as { data?: unknown }).data) || typeof (result as { data?: unknown }).data === 'string')
    ) {
      const r = result as DataResult;
      data = Buffer.isBuffer(r.data) ? r.data : Buffer.from(r.data);
      knownSha = r.sha256; // an app that already has the digest need not hash the state again
      encoding = r.encoding ?? (typeof r.data === 'string' ? 'text' : encoding);
      extra = r.fds ?? {};
    } else {
      data = Buffer.from(JSON.stringify(result));
      encoding = 'json';
    }
    const names = Object.keys(extra);
    const fds = Object.values(extra);
    if (names.includes('state')) {
      if (memfd !== null) closeQuietly(memfd);
      if (op === 'checkpoint') throw new RelayError('usage', 'the fd name "state" is reserved for the memfd transport');
      conn.send({
        op: 'ack',
        ok: false,
        error: refusal('dump_failed', 'the fd name "state" is reserved for the memfd transport'),
      });
      return null;
    }
    if (memfd !== null) {
      const size = fs.fstatSync(memfd).size;
      const header: Message = {
        op,
        encoding,
        size,
        transport: 'memfd',
        ...(knownSha ? { sha256: knownSha } : {}),
        fds: ['state', ...names],
      };
      // The memfd is the SDK's once handed over (the app's other fds stay the app's): closed once sent.
      if (fds.length === 0) {
        conn.send(header, [memfd], { closeFds: true });
      } else {
        conn.send(header, [memfd, ...fds]);
        if (conn.stream.writableLength === 0) closeQuietly(memfd);
      }
      return null;
    }
    const bytes = data!;
    if (bytes.length === 0 && names.length === 0) {
      conn.send({ op, size: 0 });
      return null;
    }
    const frameSize = Math.min(1 << 20, this.maxFrame);
    // The offered cheaper check, unless the app gave its own SHA-256 (then nothing is hashed here).
    const checksum = op === 'state' && knownSha === undefined ? this.checksumOffered : undefined;
    const announced = {
      op,
      encoding,
      size: bytes.length,
      trailer: true as const,
      ...(checksum ? { checksum } : {}),
      ...(names.length ? { fds: names } : {}),
    };
    if (pair !== null && trailer && bytes.length > 0 && op === 'state') {
      await this.sendDirect(conn, pair, bytes, { ...announced, transport: 'direct' }, fds, knownSha);
      return pair;
    }
    if (trailer && knownSha === undefined && bytes.length > 0) {
      // Hash each frame as it goes out and send the digest after the data: the first byte leaves at once,
      // and the receiver hashes what it got meanwhile (docs/srp.md, "Digest trailer").
      conn.send(announced, fds);
      const check = new StreamCheck(checksum);
      for (let off = 0; off < bytes.length && !conn.closed; off += frameSize) {
        const part = bytes.subarray(off, off + frameSize);
        check.update(part);
        if (!conn.sendData(part, frameSize) && !conn.stream.isClosed) await drained(conn.stream);
      }
      if (!conn.closed) conn.send(check.trailer());
      return null;
    }
    const header: Message = {
      op,
      encoding,
      size: bytes.length,
      ...(bytes.length > 0 ? { sha256: knownSha ?? sha256(bytes) } : {}),
      ...(names.length ? { fds: names } : {}),
    };
    conn.send(header, fds);
    if (bytes.length > 0) conn.sendData(bytes, frameSize);
    return null;
  }

  /**
   * The direct transport (docs/srp.md, "Direct transport"): the header here, the bytes on the socket pair
   * (hashed as they go, unless the app gave the digest), our end closed after the last one (the receiver's end
   * of file), then the digest in a trailer here. A receiver that went away ends the writing; the trailer is
   * sent all the same (the receiver, if any, refuses the short state), so the connection stays in step.
   */
  private async sendDirect(
    conn: SrpConnection,
    pair: number,
    bytes: Buffer,
    header: Message & { checksum?: Checksum },
    fds: number[],
    knownSha: string | undefined,
  ): Promise<void> {
    const out = new FdStream(pair);
    out.pause(); // nothing comes from the receiver on the pair
    out.on('error', () => undefined); // EPIPE: the receiver is gone; the stream closes itself
    conn.send(header, fds);
    const check = knownSha === undefined ? new StreamCheck(header.checksum) : null;
    const piece = 1 << 20;
    for (let off = 0; off < bytes.length && !out.isClosed && !conn.closed; off += piece) {
      const part = bytes.subarray(off, off + piece);
      check?.update(part);
      if (!out.write(part) && !out.isClosed) await drained(out);
    }
    const closed = new Promise<void>((resolve) => (out.isClosed ? resolve() : out.once('close', resolve)));
    out.end();
    await closed;
    if (!conn.closed) conn.send(check ? check.trailer() : { op: 'trailer', sha256: knownSha! });
  }

  private onClose(err: RelayError): void {
    this.incoming?.pair?.close();
    if (this.directPair !== null) closeQuietly(this.directPair);
    this.directPair = null;
    this.initial.reject(err);
    for (const w of this.checkpointWaiters.splice(0)) w.reject(err);
    this.finish();
  }
}

/** Resolves once the stream's write queue is below its high-water mark again, or it closed. */
/** Why the connection ended, as a RelayError: the protocol's code when it was a protocol error, else `closed`. */
function closedError(err: Error | null): RelayError {
  if (err instanceof SrpError) return new RelayError(err.code, err.message);
  return new RelayError(
    'closed',
    err ? `the relay connection failed: ${err.message}` : 'Aeterna closed the relay connection',
  );
}

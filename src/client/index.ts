// aeterna/client: what an app under Aeterna needs, in a few calls.
//   listeners()  the sockets Aeterna hands over (LISTEN_FDS), by name
//   connect()    the State Relay (docs/srp.md): load() the previous generation's
//                state, onDump() to hand yours over, ready(), shutdown()
//   drain()      a graceful HTTP drain for SIGTERM
// Outside Aeterna everything degrades to no-ops (load() gives null), so an app
// runs the same in development.
import crypto from 'node:crypto';
import fs from 'node:fs';
import { native } from '../native/binding';
import { SrpConnection } from '../srp/connection';
import { closeQuietly } from '../srp/codec';
import type { Message, StateHeader } from '../srp/messages';

export { drain, trackConnections, type DrainOptions } from './drain';

/** The sockets Aeterna passed to this process, by LISTEN_FDNAMES name (fd3, fd4... when unnamed). */
export function listeners(env: NodeJS.ProcessEnv = process.env): Map<string, number> {
  const found = new Map<string, number>();
  if (Number(env.LISTEN_PID) !== process.pid) return found;
  const count = Number(env.LISTEN_FDS);
  if (!Number.isInteger(count) || count <= 0) return found;
  const names = (env.LISTEN_FDNAMES ?? '').split(':');
  for (let i = 0; i < count; i++) found.set(names[i] || `fd${3 + i}`, 3 + i);
  return found;
}

/** A state received from the relay. */
export interface LoadedState {
  encoding: string;
  size: number;
  /** The final sync after promotion (a second load, while serving). */
  final: boolean;
  /** fds that came with the state, by name (e.g. live connections "conn:1"); the app owns them. */
  fds: Map<string, number>;
  /** The memfd holding the state (memfd transport), or null. */
  memfd: number | null;
  /** The bytes (read from the memfd on first use for the memfd transport). */
  readonly data: Buffer;
  text(): string;
  json<T = unknown>(): T;
}

/** What a dump callback may return. */
export type DumpResult =
  | null
  | undefined
  | Buffer
  | string
  | { data: Buffer | string; encoding?: string; fds?: Record<string, number>; sha256?: string }
  | { memfd: number; encoding?: string; fds?: Record<string, number> }
  | Record<string, unknown>
  | unknown[];

export type DumpCallback = (request: { final: boolean }) => DumpResult | Promise<DumpResult>;

/** A sealed memfd holding `data`: hand it over with `{ memfd }` from a dump callback. */
export function memfdState(data: Buffer, name = 'aeterna-state'): number {
  const fd = native.memfdCreate(name);
  for (let off = 0; off < data.length; ) off += fs.writeSync(fd, data, off, data.length - off, off);
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

function readMemfd(fd: number, size: number): Buffer {
  const out = Buffer.allocUnsafe(size);
  for (let off = 0; off < size; ) {
    const n = fs.readSync(fd, out, off, size - off, off);
    if (n === 0) throw new Error(`memfd ended after ${off} of ${size} bytes`);
    off += n;
  }
  return out;
}

function makeState(h: StateHeader & { final?: boolean }, data: Buffer | null, fds: Map<string, number>, memfd: number | null): LoadedState {
  let bytes = data;
  return {
    encoding: h.encoding ?? 'binary',
    size: h.size,
    final: h.final === true,
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
  header: StateHeader & { final?: boolean };
  fds: Map<string, number>;
  /** The announced size, filled as data frames arrive, and hashed on the way (overlapping the transfer). */
  buffer: Buffer;
  received: number;
  hash: crypto.Hash;
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
  private initial: { promise: Promise<LoadedState | null>; resolve: (s: LoadedState | null) => void; reject: (e: Error) => void };
  private initialTaken = false;
  private initialArrived = false;
  private initialAcked = false;
  private readyWanted = false;
  private dumpCallback: DumpCallback | null = null;
  private loadCallback: ((state: LoadedState) => void | Promise<void>) | null = null;
  private finalDumpPending = false;
  /** When Aeterna asked for the final dump (performance.now()), and how long it waits for the answer (its timeout_ms). */
  private finalAsked: { at: number; timeoutMs: number | null } | null = null;
  private finalAskedSignal: () => void = () => undefined;
  private readonly finalAskedOrFinished: Promise<void>;
  private shuttingDown = false;
  private finished: Promise<void>;
  private finish!: () => void;

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
    const conn = new SrpConnection(native.connectUnix(socketPath), 1 << 30);
    this.conn = conn;
    const welcomed = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no welcome from Aeterna on ${socketPath} within ${timeoutMs} ms`)), timeoutMs);
      conn.on('message', (m, fds) => {
        if (m.op === 'welcome') {
          clearTimeout(timer);
          this.generation = m.generation;
          this.maxFrame = m.max_frame;
          resolve();
          return;
        }
        if (m.op === 'error') {
          clearTimeout(timer);
          reject(new Error(`Aeterna refused the relay connection: ${m.code}: ${m.message}`));
        }
        this.onMessage(m, fds);
      });
      conn.on('close', (err) => {
        clearTimeout(timer);
        reject(err ?? new Error('Aeterna closed the relay connection'));
        this.onClose(err);
      });
    });
    conn.on('data', (payload, _raw, remaining) => this.onData(payload, remaining));
    conn.send({ op: 'hello', v: 1 });
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
    if (this.initialTaken) throw new Error('load() was already called');
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
      this.ack(false, `the app could not load the state: ${(err as Error).message}`);
      throw err;
    }
  }

  /** Hand over this generation's state when Aeterna asks (at a reload, and a final time at promotion). */
  onDump(callback: DumpCallback): void {
    this.dumpCallback = callback;
  }

  /** States that arrive later, while serving: the final sync after promotion. */
  onLoad(callback: (state: LoadedState) => void | Promise<void>): void {
    this.loadCallback = callback;
  }

  /** Tell Aeterna this generation is ready (counts like sd_notify READY=1). Sent once the initial state is acknowledged. */
  ready(): void {
    if (!this.conn) return;
    if (!this.initialTaken) throw new Error('call load() before ready(): the new generation must take (or refuse) the state first');
    if (this.initialAcked) this.conn.send({ op: 'ready' });
    else this.readyWanted = true;
  }

  /**
   * For the SIGTERM handler, after draining: answer the final dump if Aeterna
   * asks for one (now, so it includes the last requests), and wait until it is
   * acknowledged or Aeterna closes the connection (no final dump wanted).
   * `timeoutMs` bounds the wait for the final dump (Aeterna sends it, or closes,
   * right after its SIGTERM). Once it has arrived, handing the state over takes
   * as long as Aeterna said it waits (the dump's timeout_ms, its
   * state_handoff.timeout), however large the state; without timeout_ms,
   * `timeoutMs` bounds it all.
   */
  async shutdown(timeoutMs = 10_000): Promise<void> {
    if (!this.conn || this.conn.closed) return;
    const began = performance.now();
    this.shuttingDown = true;
    if (this.finalDumpPending) void this.answerDump(true);
    else await within(this.finalAskedOrFinished, timeoutMs);
    const asked = this.finalAsked;
    const until = asked?.timeoutMs != null ? asked.at + asked.timeoutMs : began + timeoutMs;
    await within(this.finished, until - performance.now());
    this.close();
  }

  close(): void {
    this.conn?.close();
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
        this.incoming = { header: m, fds: named, buffer: Buffer.allocUnsafe(streamed), received: 0, hash: crypto.createHash('sha256') };
        if (m.transport === 'memfd' || m.size === 0) this.completeLoad();
        return;
      }
      case 'dump':
        if (m.final) {
          this.finalAsked = { at: performance.now(), timeoutMs: m.timeout_ms ?? null };
          this.finalAskedSignal();
          this.finalDumpPending = true;
          if (this.shuttingDown) void this.answerDump(true);
        } else {
          void this.answerDump(false);
        }
        return;
      case 'ack':
        if (!m.ok) process.stderr.write(`aeterna/client: the new generation refused this state: ${m.error ?? ''}\n`);
        if (this.shuttingDown) this.finish();
        return;
      case 'error':
        process.stderr.write(`aeterna/client: relay error ${m.code}: ${m.message}\n`);
        return;
      default:
        fds.forEach(closeQuietly);
    }
  }

  private onData(payload: Buffer, remaining: number): void {
    const incoming = this.incoming;
    if (!incoming) return;
    payload.copy(incoming.buffer, incoming.received);
    incoming.hash.update(payload);
    incoming.received += payload.length;
    if (remaining === 0) this.completeLoad();
  }

  /** A whole state arrived: verify it, then hand it to load() or onLoad. */
  private completeLoad(): void {
    const incoming = this.incoming!;
    this.incoming = null;
    const h = incoming.header;
    let state: LoadedState;
    let problem: string | null = null;
    if (h.transport === 'memfd') {
      const memfd = incoming.fds.get('state')!;
      incoming.fds.delete('state');
      state = makeState(h, null, incoming.fds, memfd);
      const size = fs.fstatSync(memfd).size;
      if (size !== h.size) problem = `memfd has ${size} bytes, ${h.size} announced`;
      else if (h.sha256 && sha256(state.data) !== h.sha256) problem = 'checksum_mismatch: the memfd content does not match the announced sha256';
    } else {
      const data = incoming.buffer;
      state = makeState(h, data, incoming.fds, null);
      if (incoming.received !== h.size) problem = `received ${incoming.received} bytes, ${h.size} announced`;
      else if (h.size > 0 && incoming.hash.digest('hex') !== h.sha256) problem = `checksum_mismatch: sha256 of the ${h.size} bytes received is not ${h.sha256}`;
    }
    if (!this.initialArrived) {
      this.initialArrived = true;
      if (problem) {
        this.ack(false, problem);
        this.initial.reject(new Error(`state relay: ${problem}`));
      } else {
        this.initial.resolve(h.size === 0 && incoming.fds.size === 0 && state.memfd === null ? null : state);
      }
      return;
    }
    if (problem) {
      this.ack(false, problem);
      return;
    }
    const apply = this.loadCallback;
    Promise.resolve(apply ? apply(state) : undefined).then(
      () => this.ack(true),
      (err: Error) => this.ack(false, `the app could not apply the state: ${err.message}`),
    );
  }

  private async answerDump(final: boolean): Promise<void> {
    if (final) this.finalDumpPending = false;
    const conn = this.conn;
    if (!conn || conn.closed) return;
    let result: DumpResult;
    try {
      result = this.dumpCallback ? await this.dumpCallback({ final }) : null;
    } catch (err) {
      conn.send({ op: 'ack', ok: false, error: `dump failed: ${(err as Error).message}` });
      return;
    }
    this.sendState(conn, result);
  }

  private sendState(conn: SrpConnection, result: DumpResult): void {
    if (result === null || result === undefined) {
      conn.send({ op: 'state', size: 0 });
      return;
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
      encoding = 'utf8';
    } else if (!Array.isArray(result) && typeof (result as { memfd?: unknown }).memfd === 'number') {
      const r = result as { memfd: number; encoding?: string; fds?: Record<string, number> };
      memfd = r.memfd;
      encoding = r.encoding ?? encoding;
      extra = r.fds ?? {};
    } else if (!Array.isArray(result) && (Buffer.isBuffer((result as { data?: unknown }).data) || typeof (result as { data?: unknown }).data === 'string')) {
      const r = result as { data: Buffer | string; encoding?: string; fds?: Record<string, number>; sha256?: string };
      data = Buffer.isBuffer(r.data) ? r.data : Buffer.from(r.data);
      knownSha = r.sha256; // an app that already has the digest need not hash the state again
      encoding = r.encoding ?? (typeof r.data === 'string' ? 'utf8' : encoding);
      extra = r.fds ?? {};
    } else {
      data = Buffer.from(JSON.stringify(result));
      encoding = 'json';
    }
    const names = Object.keys(extra);
    const fds = Object.values(extra);
    if (memfd !== null) {
      const size = fs.fstatSync(memfd).size;
      conn.send({ op: 'state', encoding, size, transport: 'memfd', fds: ['state', ...names] }, [memfd, ...fds]);
      return;
    }
    const bytes = data!;
    const header: Message = { op: 'state', encoding, size: bytes.length, ...(bytes.length > 0 ? { sha256: knownSha ?? sha256(bytes) } : {}), ...(names.length ? { fds: names } : {}) };
    conn.send(header, fds);
    if (bytes.length > 0) conn.sendData(bytes, Math.min(1 << 20, this.maxFrame));
  }

  private onClose(err: Error | null): void {
    this.initial.reject(err ?? new Error('Aeterna closed the relay connection'));
    this.finish();
  }
}

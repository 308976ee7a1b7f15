// The SRP coordinator: Aeterna's end of the State Relay Protocol (docs/srp.md).
// It owns the state socket, admits only processes of the generations Aeterna
// runs (SO_PEERCRED), and relays a state from the old generation to the new
// one chunk by chunk: reading from the old one stops while the new one's queue
// is above a bounded window, so a multi-gigabyte state never sits in Aeterna's
// memory, and the event loop is never blocked. It never parses the state.
import fs from 'node:fs';
import { EventEmitter } from 'node:events';
import { native } from '../native/binding';
import type { StateHandoffConfig } from '../config/types';
import type { ErrorCode } from '../errors';
import type { Logger } from '../log';
import { type Generation } from '../supervisor/generation';
import { describeExit } from '../supervisor/exit';
import { belongsTo } from '../supervisor/proctree';
import { DumpFailed, type CheckpointSummary, type RelayProgress, type RelayRole, type StateRelay } from '../orchestrator/relay';
import { Acceptor } from '../resources/acceptor';
import { claimSocketPath, listenSocketFile, removeSocketFile, type SocketFile } from '../resources/socket-file';
import { SrpError, closeQuietly, isSealedState } from './codec';
import { readAt } from './checkpoint-file';
import { CheckpointRefused, CheckpointStore, type Checkpoint, type CheckpointWriter } from './checkpoint-store';
import { SrpConnection } from './connection';
import { refuseConnection } from './refusal';
import { drained, isPeerGone } from './fd-stream';
import { trailerDigest, type Checksum, type Message, type StateHeader, type TrailerDigest } from './messages';
import type { HandedCheckpoint, HandedRelayConnection, ReexecReason } from '../upgrade/handover';

/** The state socket at socketPath (mode 0600, chowned to `owner`): a stale file is taken over, a live one refused. */
function listenStateSocket(socketPath: string, owner: { uid: number; gid: number } | undefined): { fd: number; file: SocketFile } {
  claimSocketPath(socketPath, true);
  const { fd, file } = listenSocketFile(socketPath, 128, 0o600);
  try {
    if (owner) fs.chownSync(file.path, owner.uid, owner.gid);
  } catch (err) {
    closeQuietly(fd);
    removeSocketFile(file);
    throw err;
  }
  return { fd, file };
}

/** An empty sealed memfd: an empty checkpoint is stored like any other. */
function emptyMemfd(): number {
  const fd = native.memfdCreate('aeterna-checkpoint');
  native.sealMemfd(fd);
  return fd;
}

/** A client must say hello within this long. */
export const HELLO_TIMEOUT_MS = 5000;
/** Live relay connections at most (one per generation is the norm; the rest is abuse). */
export const MAX_CONNECTIONS = 64;
/**
 * Connections of one generation that have not said hello yet. A generation needs one (a few allow for a
 * retry): its own stray processes cannot fill the table that the next generation needs.
 */
export const MAX_PENDING_PER_GENERATION = 4;
/** After a peer's connection drops mid-relay, how long to wait for its exit to say that it died. */
const EXIT_EXPLAIN_MS = 1000;
/** Report relay progress at most this often (bytes). */
const PROGRESS_EVERY = 8 << 20;
/**
 * The relay's window in Aeterna: the old generation is read only while the new one's queue is below this.
 * What waits is held in the connection's spill ring (this plus one read), allocated once and reused.
 */
const RELAY_HIGH_WATER_MARK = 4 << 20;
/**
 * Checkpoints of one connection not answered yet (waiting for their durable write, or for the answers before
 * them): at this many, Aeterna stops reading that connection until one is answered (docs/srp.md, "Checkpoints").
 */
export const MAX_CHECKPOINTS_IN_FLIGHT = 8;
/**
 * Times a checkpoint is offered as an initial load that the app refuses (`ack` ok:false) or dies after before it
 * is ready: then it is set aside, never offered again (docs/srp.md, "Checkpoints").
 */
export const MAX_CHECKPOINT_LOAD_TRIES = 2;
/** A stored checkpoint is streamed to an "fds": false client in reads of this size (at most max_frame). */
const CHECKPOINT_CHUNK = 1 << 20;
/** Send and receive buffers of a direct relay's socket pair: the sender keeps writing while the receiver hashes. */
const DIRECT_PAIR_BUFFER = 4 << 20;

type Phase =
  | 'hello' // waiting for hello
  | 'waiting' // a reload's new generation: welcomed, waiting for the old state to arrive
  | 'load-sent' // we sent a load; waiting for its ack
  | 'idle' // nothing in flight
  | 'dump-requested' // we asked for a dump; waiting for `state`
  | 'streaming' // the state's data frames are coming in
  | 'trailer' // the data has arrived; its digest trailer is due
  | 'direct'; // the state's bytes go on the direct socket pair; its digest trailer is due here

interface Session {
  conn: SrpConnection;
  /** The generation of the connecting process, by its credentials at accept time. */
  owner: Generation;
  /** Set at hello: the generation this connection speaks for. */
  gen: Generation | null;
  phase: Phase;
  initialAcked: boolean;
  /** The client's hello said "fds": false (e.g. the Java SDK): it must never be sent a memfd state or fds. */
  noFds: boolean;
  /** Said in its hello that it can receive a state whose digest follows the data. */
  takesTrailer: boolean;
  /** Said in its hello that it can send and receive a state on a socket pair of its own (docs/srp.md, "Direct transport"). */
  takesDirect: boolean;
  /** Trailer checks it can compute and verify besides sha256 (its hello's `checksums`). */
  checksums: string[];
  transfer: Transfer | null;
  /** A streamed checkpoint being received (null: none; 'dropping' while the bytes of a refused one still arrive). */
  checkpoint: { writer: CheckpointWriter | null; refused: CheckpointRefused | null } | null;
  /** Aeterna is streaming the stored checkpoint to it (an "fds": false client): nothing else may go out meanwhile. */
  receivingCheckpoint: boolean;
  /** `checkpointed` answers still to send (one waits for a durable write). */
  answering: number;
  /** Not read for now: MAX_CHECKPOINTS_IN_FLIGHT checkpoints wait for their answers, or the answers wait to go out. */
  checkpointsThrottled: boolean;
  /** Answers queued past the stream's mark: no more checkpoints are read until the peer reads them. */
  answersBlocked: boolean;
  /** Whether the prepared signal handover lists it (last reported by carryChanged). */
  carried: boolean;
  helloTimer: NodeJS.Timeout | null;
  /** A relay it was the sender of was abandoned while its answer was still due: what still comes of it is dropped. */
  abandoned: Abandoned | null;
}

/**
 * What is left of an abandoned relay on the sender's connection (docs/srp.md, "When a relay is abandoned"): its
 * answer to the dump, or the rest of its state, is read and dropped, and the connection is usable again after it.
 */
interface Abandoned {
  /** Why the relay was abandoned, and when. */
  reason: string;
  since: string;
  /** While the rest of a state is due: closes the connection when no byte of it arrives for `stallMs`. */
  stall: NodeJS.Timeout | null;
  stallMs: number;
}

/** What a session learned from its hello: all a re-executed Aeterna needs to go on speaking with it. */
type HelloFlags = Pick<Session, 'noFds' | 'takesTrailer' | 'takesDirect' | 'checksums'>;

/** The hello-derived flags of a session (or of a handed-over entry): the one place that lists them. */
function helloFlags(s: Pick<HelloFlags, 'noFds' | 'takesTrailer'> & Partial<HelloFlags>): HelloFlags {
  // Optional in a handover: absent, the client was never offered the direct transport or another check.
  return { noFds: s.noFds, takesTrailer: s.takesTrailer, takesDirect: s.takesDirect ?? false, checksums: [...(s.checksums ?? [])] };
}

/** One relay of a state from `from` (the old generation, or none) to `to`. */
interface Transfer {
  from: Session | null;
  to: Session;
  final: boolean;
  total: number;
  sent: number;
  /** Payload bytes of the data frame being passed on that have not arrived yet (frames are not reassembled). */
  frameLeft: number;
  reported: number;
  /** The load header went to `to` and its bytes stream as data frames. */
  streaming: boolean;
  /** The state's digest follows its data (a `trailer` frame); `trailerSent` once it went on to `to`. */
  trailer: boolean;
  trailerSent: boolean;
  /** The dump offered the direct transport; `pair` is the receiver's end, held until the answer comes (then passed on or closed). */
  directOffered: boolean;
  pair: number | null;
  /** The state's bytes go on the pair, past Aeterna (the sender's `state` said "transport": "direct"). */
  direct: boolean;
  /** The check the dump offered besides sha256 (both generations listed it), and the one the state's header chose. */
  checksumOffered: Checksum | null;
  checksum: Checksum | undefined;
  /** Failed or abandoned: what still comes from `from` is read and dropped, never forwarded. */
  aborted: boolean;
  /** state_handoff.timeout as told in the dump: also how long the rest of an abandoned state may stall. */
  timeoutMs: number;
  progress: (p: RelayProgress) => void;
  resolve: (r: { bytes: number }) => void;
  reject: (err: Error) => void;
}

export class SrpCoordinator
  extends EventEmitter<{ ready: [gen: Generation]; checkpoint: [result: string]; carry: [] }>
  implements StateRelay
{
  private readonly sessions = new Set<Session>();
  private readonly byGeneration = new Map<Generation, Session>();
  /** Generations whose processes may connect; `candidate` ones wait for a handover's state. */
  private readonly generations = new Map<Generation, { role: RelayRole }>();
  private readonly waiters = new Map<Generation, Array<(s: Session) => void>>();
  /** Transfers not settled yet (a session that closed mid-relay is gone from the tables, its transfer is not). */
  private readonly transfers = new Set<Transfer>();
  /** Live generations whose relay connection closed, with when and why: a reload says so instead of relaying nothing in silence. */
  private readonly lostConnections = new Map<Generation, string>();
  private acceptor: Acceptor;
  private readonly maxFrame: number;
  /** An upgrade is about to exec: nothing is accepted or read (frames wait in the kernel for the next Aeterna). */
  private frozen = false;
  /** The app's latest checkpoint (docs/srp.md, "Checkpoints"). */
  readonly checkpoints: CheckpointStore;
  /** The checkpoint each generation was offered as its initial load, until it is known to have loaded it or not. */
  private readonly offered = new WeakMap<Generation, { seq: number; judged: boolean }>();
  /** How often the latest checkpoint failed to load (refused, or the app died before it was ready). */
  private loadFailures: { seq: number; count: number } | null = null;

  private constructor(
    private file: SocketFile,
    private fd: number,
    config: StateHandoffConfig,
    private readonly log: Logger,
    handedCheckpoint: HandedCheckpoint | null = null,
  ) {
    super();
    this.maxFrame = config.maxFrameBytes;
    this.checkpoints = new CheckpointStore(config.checkpoint, log, handedCheckpoint);
    this.acceptor = new Acceptor(fd, (conn) => this.admit(conn), log, 'state socket');
  }

  /** Create the state socket (mode 0600, owned by the app's user) and start accepting. */
  static open(config: StateHandoffConfig, owner: { uid: number; gid: number } | undefined, log: Logger): SrpCoordinator {
    const { fd, file } = listenStateSocket(config.socketPath, owner);
    try {
      // Refuses a checkpoint path that names a file Aeterna did not write (docs/srp.md, "Checkpoints").
      return new SrpCoordinator(file, fd, config, log);
    } catch (err) {
      closeQuietly(fd);
      removeSocketFile(file);
      throw err;
    }
  }

  /**
   * Listen on a new socket at the same path: the file was deleted or replaced (see keepSocketFile in
   * resources/socket-file.ts). The old socket, unreachable by its path, is closed; connections accepted on it go on.
   */
  relisten(owner: { uid: number; gid: number } | undefined): SocketFile {
    const { fd, file } = listenStateSocket(this.file.path, owner);
    this.acceptor.close();
    closeQuietly(this.fd);
    this.fd = fd;
    this.file = file;
    this.acceptor = new Acceptor(fd, (conn) => this.admit(conn), this.log, 'state socket');
    if (this.frozen) this.acceptor.suspend();
    return file;
  }

  /** The state socket a re-executed Aeterna took over (aeterna upgrade), with the checkpoint it held; connections: adoptConnections(). */
  static adopt(config: StateHandoffConfig, file: SocketFile, fd: number, log: Logger, checkpoint: HandedCheckpoint | null): SrpCoordinator {
    return new SrpCoordinator(file, fd, config, log, checkpoint);
  }

  // ---- re-exec (aeterna upgrade, recovery) -------------------------------------------------

  /**
   * Why session `s` cannot be carried across an exec now, or null. `framing`: also nothing half-read or
   * half-written on it (exact at an upgrade or an exception; a prepared signal handover cannot track bytes).
   */
  private busyWith(s: Session, framing: boolean): string | null {
    if (s.gen === null) return 'its hello';
    // A whole initial load went out (no relay behind it): only its ack is due, which the next Aeterna can take.
    const initialAckDue = s.phase === 'load-sent' && !s.initialAcked;
    if (s.transfer || (s.phase !== 'idle' && !initialAckDue)) return `a state relay (${s.phase})`;
    if (s.checkpoint) return 'a checkpoint being received';
    if (s.receivingCheckpoint) return 'the checkpoint being streamed to it';
    if (s.answering > 0) return 'the answer to its checkpoint';
    if (framing && !s.conn.quiet) return 'a frame half read or written';
    return null;
  }

  /** Why an upgrade cannot carry every relay connection now ("generation 1 is busy with ..."), or null. */
  busyReason(): string | null {
    for (const s of this.sessions) {
      const why = this.busyWith(s, true);
      if (why) return `${s.gen ? `generation ${s.gen.number}` : `a connection of generation ${s.owner.number}`} is busy with ${why}`;
    }
    return null;
  }

  /** Resolves once every connection is idle; rejects with the reason after `timeoutMs` (checked every 20 ms: transfers end on many paths). */
  whenIdle(timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const deadline = Date.now() + timeoutMs;
      const check = (): void => {
        const why = this.busyReason();
        if (why === null) return resolve();
        if (Date.now() >= deadline) return reject(new Error(why));
        setTimeout(check, 20);
      };
      check();
    });
  }

  /**
   * An upgrade is accepted: stop accepting and reading, so every connection stays idle until the exec (what
   * arrives meanwhile waits in the kernel for the next Aeterna). Throws if one is busy now. thaw() undoes it.
   */
  freeze(): void {
    const why = this.busyReason();
    if (why) throw new Error(why);
    this.frozen = true;
    this.acceptor.suspend();
    for (const s of this.sessions) s.conn.pause();
  }

  /** The exec did not happen: go on as before. */
  thaw(): void {
    if (!this.frozen) return;
    this.frozen = false;
    this.acceptor.resume();
    for (const s of this.sessions) s.conn.resume();
  }

  /**
   * The relay connections the next Aeterna takes over, with what their hellos said. At an upgrade all must be
   * idle (it throws naming the busy one). At a recovery the busy ones are left out: they close at the exec, the
   * client's call on it fails, and the serving generation keeps its memory (docs/operations.md).
   */
  handOver(reason: ReexecReason): HandedRelayConnection[] {
    if (reason === 'upgrade') {
      const why = this.busyReason();
      if (why) throw new Error(why);
    }
    const carried = [...this.sessions].filter((s) => s.gen !== null && this.busyWith(s, reason !== 'signal') === null);
    return carried.map((s) => ({ fd: s.conn.stream.fd, generation: s.gen!.number, initialAcked: s.initialAcked, ...helloFlags(s) }));
  }

  /** The latest checkpoint's memfd for the next Aeterna, or null. */
  handOverCheckpoint(): HandedCheckpoint | null {
    return this.checkpoints.handOver();
  }

  /**
   * A re-executed Aeterna: speak again on the connections the previous one handed over, each bound to its
   * (adopted, attached) generation, idle (or with the ack of its initial load due); no welcome is sent again.
   */
  adoptConnections(entries: HandedRelayConnection[], generations: Generation[]): void {
    for (const entry of entries) {
      const gen = generations.find((g) => g.number === entry.generation);
      if (!gen || !this.generations.has(gen)) {
        this.log.warn({ generation: entry.generation }, 'relay: a handed-over connection names no running generation; closed');
        closeQuietly(entry.fd);
        continue;
      }
      const conn = new SrpConnection(entry.fd, this.maxFrame, RELAY_HIGH_WATER_MARK);
      const session: Session = { ...this.newSession(conn, gen), ...helloFlags(entry), gen, phase: entry.initialAcked ? 'idle' : 'load-sent', initialAcked: entry.initialAcked };
      this.listen(session);
      this.byGeneration.set(gen, session);
      session.carried = true;
      this.log.debug({ generation: gen.number }, 'relay connection taken over');
    }
  }

  /** Tell the daemon when whether `s` can be carried changed (the prepared signal handover lists it, or not). */
  private carryChanged(s: Session): void {
    const now = !s.conn.closed && s.gen !== null && this.busyWith(s, false) === null;
    if (now === s.carried) return;
    s.carried = now;
    this.emit('carry');
  }

  /** The listening socket, for the handover. */
  get listening(): { fd: number; file: SocketFile } {
    return { fd: this.fd, file: this.file };
  }

  get socketPath(): string {
    return this.file.path;
  }

  watchReady(gen: Generation, ready: (how: string) => void): () => void {
    const onReady = (g: Generation): void => {
      if (g === gen) ready('state relay ready op');
    };
    this.on('ready', onReady);
    return () => this.off('ready', onReady);
  }

  /** Let this generation's processes connect. A candidate (a reload's new generation) gets the old state; others get none. */
  attach(gen: Generation, role: RelayRole): void {
    this.generations.set(gen, { role });
    void gen.exited.then(() => {
      this.generations.delete(gen);
      this.lostConnections.delete(gen);
      this.waiters.delete(gen);
      this.byGeneration.get(gen)?.conn.close();
    });
  }

  startOutcome(gen: Generation, ready: boolean): void {
    const offer = this.offered.get(gen);
    if (!offer || offer.judged) return;
    offer.judged = true;
    if (ready) {
      if (this.loadFailures?.seq === offer.seq) this.loadFailures = null; // it loads: the tries start over
    } else {
      this.checkpointLoadFailed(offer.seq, `generation ${gen.number} exited before it was ready`);
    }
  }

  /** Checkpoint `seq` failed to load once more: at MAX_CHECKPOINT_LOAD_TRIES it is set aside and the app starts fresh. */
  private checkpointLoadFailed(seq: number, why: string): void {
    if (this.checkpoints.current?.seq !== seq) return; // a newer one was stored since: that one is offered next
    const count = this.loadFailures?.seq === seq ? this.loadFailures.count + 1 : 1;
    this.loadFailures = { seq, count };
    if (count < MAX_CHECKPOINT_LOAD_TRIES) {
      this.log.warn({ seq, tries: count }, `checkpoint ${seq} did not load: ${why}; try ${count} of ${MAX_CHECKPOINT_LOAD_TRIES}, it is offered again`);
      return;
    }
    this.loadFailures = null;
    this.emit('checkpoint', 'set_aside');
    this.emit('carry'); // the checkpoint memfd is gone
    void this.checkpoints.setAside(seq).then((movedTo) => {
      this.log.error(
        { code: 'E_CHECKPOINT_REFUSED' satisfies ErrorCode, seq, tries: count, ...(movedTo ? { moved_to: movedTo } : {}) },
        `checkpoint ${seq} set aside after ${count} failed loads (last: ${why}); it is never offered again${movedTo ? ` (its file is now ${movedTo})` : ''}: the app starts without a checkpoint`,
      );
    });
  }

  /** No final dump will be asked of this generation: close its connection (the app sees end of file). */
  release(gen: Generation): void {
    const session = this.byGeneration.get(gen);
    if (!session) return;
    const t = session.transfer;
    session.conn.stream.end(); // first: a relay it was sending is not "abandoned" with its connection kept
    if (t) this.abort(t, new Error('generation released'));
  }

  async handover(old: Generation, next: Generation, progress: (p: RelayProgress) => void, signal: AbortSignal, timeoutMs: number): Promise<{ bytes: number }> {
    const deadline = Date.now() + timeoutMs; // the caller aborts then
    const to = await this.waitForSession(next, signal);
    const { session: from, waited } = await this.untilIdle(old, signal);
    // After waiting for an earlier relay, the dump tells the app what is left of the timeout, not all of it.
    if (waited) timeoutMs = Math.max(1, deadline - Date.now());
    const lost = from === null ? this.lostConnections.get(old) : undefined;
    if (lost !== undefined) {
      // Not an app that never used the relay: one whose connection is gone. Its state cannot reach the next one.
      this.log.warn({ generation: old.number, next: next.number }, `relay: generation ${old.number} has no state relay connection since ${lost}: generation ${next.number} starts without its state`);
    }
    return this.transfer(from, to, false, progress, signal, timeoutMs);
  }

  /** Nothing of an earlier relay is still in flight on `s`: a new dump may be asked. */
  private idleForRelay(s: Session): boolean {
    return s.phase === 'idle' && s.transfer === null;
  }

  /**
   * The live relay connection of `gen` (and whether it had to wait) once it is done with an earlier relay (the final sync of the reload before,
   * or the late answer to an abandoned dump), or null when it has none (or it closed meanwhile). Waits until
   * `signal` aborts (the reload's state_handoff.timeout), then rejects with DumpFailed naming what it waited for.
   */
  private untilIdle(gen: Generation, signal: AbortSignal): Promise<{ session: Session | null; waited: boolean }> {
    const first = this.liveSession(gen);
    if (first === null || this.idleForRelay(first)) return Promise.resolve({ session: first, waited: false });
    const busy = (s: Session): string => `${s.phase}${s.abandoned ? `: what is left of a relay abandoned at ${s.abandoned.since} (${s.abandoned.reason})` : ''}`;
    const what = busy(first);
    this.log.warn({ generation: gen.number, phase: first.phase }, `relay: generation ${gen.number} is busy with an earlier relay (${what}); the reload waits for it, at most state_handoff.timeout`);
    return new Promise((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const onAbort = (): void => {
        clearTimeout(timer);
        const s = this.liveSession(gen);
        const why = signal.reason instanceof Error ? signal.reason.message : 'aborted';
        reject(new DumpFailed(`${why}: generation ${gen.number} was still busy with an earlier relay (${s ? busy(s) : what})`));
      };
      if (signal.aborted) return onAbort();
      signal.addEventListener('abort', onAbort, { once: true });
      // Checked every 20 ms, as whenIdle: a relay ends on many paths.
      const check = (): void => {
        const s = this.liveSession(gen);
        if (s !== null && !this.idleForRelay(s)) {
          timer = setTimeout(check, 20);
          return;
        }
        signal.removeEventListener('abort', onAbort);
        this.log.info({ generation: gen.number }, s ? `relay: generation ${gen.number} is done with its earlier relay; the reload goes on` : `relay: generation ${gen.number}'s relay connection closed while the reload waited for it`);
        resolve({ session: s, waited: true });
      };
      timer = setTimeout(check, 20);
    });
  }

  restoreCheckpoint(next: Generation, signal: AbortSignal, timeoutMs: number): Promise<{ bytes: number }> {
    const to = this.liveSession(next);
    if (!to || to.phase !== 'waiting') return Promise.reject(new Error(`generation ${next.number} is not waiting for its initial load`));
    if (!this.checkpoints.current) return Promise.reject(new Error('no checkpoint is stored'));
    return this.transfer(null, to, false, () => undefined, signal, timeoutMs, 'checkpoint');
  }

  finalSync(old: Generation, next: Generation, signal: AbortSignal, timeoutMs: number): Promise<{ bytes: number }> {
    const to = this.liveSession(next);
    if (!to) return Promise.reject(new Error(`generation ${next.number} has no relay connection`));
    const from = this.liveSession(old);
    if (!from) return Promise.reject(new Error(`generation ${old.number} has no relay connection`));
    return this.transfer(from, to, true, () => undefined, signal, timeoutMs);
  }

  lastCheckpoint(): CheckpointSummary | null {
    const c = this.checkpoints.current;
    return c && { seq: c.seq, size: c.size, age_ms: Date.now() - c.savedAt };
  }

  relaying(gen: Generation): boolean {
    for (const t of this.transfers) if (!t.aborted && (t.to.gen === gen || t.from?.gen === gen)) return true;
    return false;
  }

  async close(): Promise<void> {
    this.acceptor.close();
    closeQuietly(this.fd);
    for (const s of this.sessions) s.conn.close();
    removeSocketFile(this.file);
    this.checkpoints.close();
  }

  // ---- connections -------------------------------------------------------------------------

  /**
   * Admission by the kernel's word on who connected, before a byte is read: a process that is not in a
   * current generation is refused at once and holds no slot, so strangers cannot use up what generations need.
   */
  private admit(fd: number): void {
    let peer: { pid: number; uid: number };
    try {
      peer = native.peerCred(fd);
    } catch (err) {
      this.log.warn({ err }, 'relay connection dropped: no peer credentials');
      closeQuietly(fd);
      return;
    }
    // Every refusal answers on the raw fd (refusal.ts): only an admitted connection gets a stream and its buffers.
    const owner = this.generationOf(peer.pid);
    if (!owner) {
      this.log.warn({ peer_pid: peer.pid, peer_uid: peer.uid }, 'relay connection refused: not a process of a managed generation');
      refuseConnection(fd, 'forbidden', `pid ${peer.pid} is not a process of a generation Aeterna runs`);
      return;
    }
    const pending = [...this.sessions].filter((s) => s.owner === owner && s.phase === 'hello').length;
    if (pending >= MAX_PENDING_PER_GENERATION) {
      refuseConnection(fd, 'busy', `generation ${owner.number} already has ${pending} relay connections waiting for their hello`);
      return;
    }
    if (this.sessions.size >= MAX_CONNECTIONS) {
      refuseConnection(fd, 'busy', `too many relay connections (at most ${MAX_CONNECTIONS})`);
      return;
    }
    const conn = new SrpConnection(fd, this.maxFrame, RELAY_HIGH_WATER_MARK);
    const session = this.newSession(conn, owner);
    session.helloTimer = setTimeout(() => conn.fail('timeout', `no hello within ${HELLO_TIMEOUT_MS} ms`), HELLO_TIMEOUT_MS);
    this.listen(session);
  }

  private newSession(conn: SrpConnection, owner: Generation): Session {
    return { conn, owner, gen: null, phase: 'hello', initialAcked: false, noFds: false, takesTrailer: false, takesDirect: false, checksums: [], transfer: null, checkpoint: null, receivingCheckpoint: false, answering: 0, checkpointsThrottled: false, answersBlocked: false, carried: false, helloTimer: null, abandoned: null };
  }

  private listen(session: Session): void {
    const conn = session.conn;
    this.sessions.add(session);
    conn.on('message', (m, fds) => {
      try {
        this.onMessage(session, m, fds);
      } catch (err) {
        fds.forEach(closeQuietly);
        if (err instanceof SrpError) conn.fail(err.code, err.message);
        else throw err;
      }
      this.endAbandoned(session);
      this.carryChanged(session);
    });
    conn.on('data', (payload, frameLength, remaining) => {
      this.onData(session, payload, frameLength, remaining);
      if (remaining === 0) {
        this.endAbandoned(session);
        this.carryChanged(session);
      }
    });
    conn.on('close', (error) => this.onClose(session, error));
  }

  private generationOf(pid: number): Generation | null {
    return [...this.generations.keys()].find((g) => g.alive && belongsTo(pid, g.pid)) ?? null;
  }

  private liveSession(gen: Generation): Session | null {
    const s = this.byGeneration.get(gen);
    return s && !s.conn.closed ? s : null;
  }

  private waitForSession(gen: Generation, signal: AbortSignal): Promise<Session> {
    const existing = this.liveSession(gen);
    if (existing && existing.phase === 'waiting') return Promise.resolve(existing);
    return new Promise((resolve, reject) => {
      const onAbort = (): void => reject(signal.reason instanceof Error ? signal.reason : new Error('aborted'));
      if (signal.aborted) return onAbort();
      signal.addEventListener('abort', onAbort, { once: true });
      const list = this.waiters.get(gen) ?? [];
      list.push((s) => {
        signal.removeEventListener('abort', onAbort);
        resolve(s);
      });
      this.waiters.set(gen, list);
      void gen.exited.then((info) => reject(new Error(`generation ${gen.number} exited (code ${info.code ?? `signal ${info.signal}`}) before it connected to the relay`)));
    });
  }

  private onMessage(s: Session, m: Message, fds: number[]): void {
    if (s.phase === 'hello') return this.onHello(s, m);
    if (m.op === 'error') {
      this.log.warn({ generation: s.gen?.number, code: m.code, message: m.message }, 'relay peer reported an error');
      s.conn.close(new Error(`peer error ${m.code}: ${m.message}`));
      return;
    }
    if (m.op === 'checkpoint' && s.checkpoint === null && !s.receivingCheckpoint && s.phase !== 'streaming' && s.phase !== 'trailer') return this.onCheckpoint(s, m, fds);
    if (m.op === 'trailer' && s.checkpoint !== null) {
      if (m.sha256 === undefined) throw new SrpError('bad_json', 'trailer: a checkpoint is checked with "sha256"');
      return this.endCheckpoint(s, m.sha256);
    }
    if (m.op === 'ready') {
      if (!s.initialAcked) throw new SrpError('unexpected_op', '"ready" before the initial load was acknowledged');
      this.emit('ready', s.gen!);
      return;
    }
    if (m.op === 'ack' && s.phase === 'load-sent') return this.onLoadAck(s, m.ok, m.error);
    if (m.op === 'ack' && s.phase === 'dump-requested' && !m.ok) {
      // The old generation declines to dump: the relay fails, its connection stays.
      s.phase = 'idle';
      const t = s.transfer;
      s.transfer = null;
      // No transfer: the refusal answers a dump that was abandoned; it ends that relay here.
      if (t) this.fail(t, new Error(`generation ${s.gen!.number} could not dump its state: ${m.error ?? 'no reason given'}`));
      return;
    }
    if (m.op === 'state' && s.phase === 'dump-requested') return this.onState(s, m, fds);
    if (m.op === 'trailer' && (s.phase === 'trailer' || s.phase === 'direct')) return this.onTrailer(s, m);
    throw new SrpError('unexpected_op', `"${m.op}" is not valid now (${s.phase})`);
  }

  private onHello(s: Session, m: Message): void {
    if (m.op !== 'hello') throw new SrpError('unexpected_op', `expected hello, got "${m.op}"`);
    if (m.v !== 1) throw new SrpError('unsupported_version', `version ${m.v} is not supported; this Aeterna speaks 1`);
    const gen = s.owner;
    if (!this.generations.has(gen) || !gen.alive) throw new SrpError('forbidden', `generation ${gen.number} has ended`);
    if (this.liveSession(gen)) throw new SrpError('busy', `generation ${gen.number} already has a relay connection`);
    clearTimeout(s.helloTimer!);
    s.helloTimer = null;
    s.gen = gen;
    this.lostConnections.delete(gen); // it connected again
    s.noFds = m.fds === false;
    s.takesTrailer = m.trailer === true;
    s.takesDirect = m.direct === true && !s.noFds;
    s.checksums = m.checksums ?? [];
    this.byGeneration.set(gen, s);
    s.conn.send({ op: 'welcome', v: 1, generation: gen.number, max_frame: this.maxFrame, ...(this.checkpoints.config.enabled ? { checkpoint: true as const } : {}), direct: true });
    this.log.debug({ generation: gen.number }, 'relay connection');
    const role = this.generations.get(gen)?.role;
    if (role === 'candidate') {
      s.phase = 'waiting';
      for (const w of this.waiters.get(gen) ?? []) w(s);
      this.waiters.delete(gen);
    } else if (role === 'stateless') {
      // A reload with state_handoff.enabled off: no state, not even a checkpoint (its format may be what changed).
      s.phase = 'load-sent';
      s.conn.send({ op: 'load', size: 0 });
    } else {
      // No live predecessor (the first generation, a restart after a crash): the latest checkpoint, if any.
      s.phase = 'load-sent';
      this.sendCheckpoint(s);
    }
  }

  // ---- checkpoints -------------------------------------------------------------------------

  /**
   * The initial load of a generation with no live predecessor (or whose predecessor could not dump): the latest
   * checkpoint as a sealed memfd, streamed to a client that cannot take one, or empty. Returns its size.
   */
  private sendCheckpoint(s: Session): number {
    const latest = this.checkpoints.openLatest();
    if (!latest) {
      s.conn.send({ op: 'load', size: 0 });
      return 0;
    }
    const { checkpoint: c, fd } = latest;
    const age = Date.now() - c.savedAt;
    const how = s.noFds ? 'streamed' : 'memfd';
    this.log.info({ generation: s.gen!.number, seq: c.seq, size: c.size, age_ms: age, transport: how }, 'checkpoint: offered as the initial load');
    this.offered.set(s.gen!, { seq: c.seq, judged: false });
    if (s.noFds) {
      void this.streamCheckpoint(s, c, fd, age);
      return c.size;
    }
    s.conn.send({ op: 'load', size: c.size, encoding: c.encoding, transport: 'memfd', fds: ['state'], source: 'checkpoint', seq: c.seq, age_ms: age }, [fd], { closeFds: true });
    return c.size;
  }

  /**
   * A client whose hello said "fds": false gets the checkpoint's bytes as data frames, with its sha256, read from
   * our memfd a chunk at a time (off the event loop, waiting for the client's queue to drain: bounded memory).
   */
  private async streamCheckpoint(s: Session, c: Checkpoint, fd: number, age: number): Promise<void> {
    s.receivingCheckpoint = true;
    try {
      const sha256 = c.size > 0 ? await this.checkpoints.digest(c, fd) : undefined;
      if (s.conn.closed) return;
      s.conn.send({ op: 'load', size: c.size, encoding: c.encoding, ...(sha256 ? { sha256 } : {}), source: 'checkpoint', seq: c.seq, age_ms: age });
      const chunk = Math.min(this.maxFrame, CHECKPOINT_CHUNK);
      for (let off = 0; off < c.size && !s.conn.closed; ) {
        const buffer = Buffer.allocUnsafe(Math.min(chunk, c.size - off)); // its own: the stream may hold it queued
        const { bytesRead } = await readAt(fd, buffer, buffer.length, off);
        if (bytesRead === 0) throw new Error(`checkpoint ended after ${off} of ${c.size} bytes`);
        off += bytesRead;
        if (!s.conn.sendData(buffer.subarray(0, bytesRead), chunk) && !s.conn.closed) await drained(s.conn.stream);
      }
    } catch (err) {
      this.log.error({ generation: s.gen?.number, err: (err as Error).message }, 'checkpoint: could not be streamed to the client; its connection is closed');
      s.conn.close(err as Error);
    } finally {
      s.receivingCheckpoint = false;
      closeQuietly(fd);
      this.carryChanged(s);
    }
  }

  private onCheckpoint(s: Session, m: StateHeader, fds: number[]): void {
    const extra = fds.filter((_, i) => (m.fds ?? [])[i] !== 'state');
    extra.forEach(closeQuietly); // a checkpoint carries bytes, not the app's other fds
    const streamed = m.transport !== 'memfd' && m.size > 0;
    if (!streamed) {
      let seq: number;
      try {
        seq = m.transport === 'memfd' ? this.checkpoints.adopt(fds[(m.fds ?? []).indexOf('state')], m) : this.checkpoints.adopt(emptyMemfd(), m);
      } catch (err) {
        return this.refuseCheckpoint(s, err);
      }
      return this.checkpointStored(s, seq);
    }
    s.checkpoint = { writer: null, refused: null };
    try {
      s.checkpoint.writer = this.checkpoints.begin(m);
    } catch (err) {
      if (!(err instanceof CheckpointRefused)) throw err;
      s.checkpoint.refused = err; // its bytes are still coming: read and dropped, then refused
    }
  }

  /** Part of a streamed checkpoint: into its memfd at once (nothing is buffered here). */
  private checkpointData(s: Session, payload: Buffer, remaining: number): void {
    const c = s.checkpoint!;
    try {
      c.writer?.write(payload);
    } catch (err) {
      c.writer?.discard();
      c.writer = null;
      c.refused ??= new CheckpointRefused('bad_state', `could not store the checkpoint: ${(err as Error).message}`);
    }
    if (remaining === 0 && !s.conn.trailerDue) this.endCheckpoint(s);
  }

  private endCheckpoint(s: Session, trailerSha?: string): void {
    const c = s.checkpoint!;
    s.checkpoint = null;
    if (c.refused || !c.writer) return this.refuseCheckpoint(s, c.refused);
    let seq: number;
    try {
      seq = c.writer.finish(trailerSha);
    } catch (err) {
      return this.refuseCheckpoint(s, err);
    }
    this.checkpointStored(s, seq);
  }

  /** Answered once it is stored (durably, with `path`). */
  private checkpointStored(s: Session, seq: number): void {
    const c = this.checkpoints.current!;
    s.answering += 1;
    this.throttle(s);
    this.emit('carry'); // a new checkpoint memfd (the previous one is closed)
    this.checkpoints.persist(seq).then(
      () => {
        this.log.info({ generation: s.gen!.number, seq, size: c.size }, 'checkpoint stored');
        this.emit('checkpoint', 'stored');
        this.answer(s, { op: 'checkpointed', seq });
      },
      (err: Error) => {
        // Its turn in line is now: answered at once (waiting for the writes asked since would answer it after them).
        this.refuseCheckpoint(s, new CheckpointRefused('write_failed', `checkpoint ${seq} could not be written to ${this.checkpoints.config.path} (the file keeps the previous one): ${err.message}`), true);
        s.answering -= 1; // answered by the refusal
      },
    );
  }

  /** `now`: the answers before it are out already (otherwise it waits for the durable writes under way). */
  private refuseCheckpoint(s: Session, err: unknown, now = false): void {
    if (!(err instanceof CheckpointRefused)) throw err;
    this.log.warn({ generation: s.gen!.number, code: err.code }, `checkpoint refused: ${err.message}`);
    this.emit('checkpoint', err.code);
    // Answers go out in the order of the checkpoints: after any durable write still under way.
    s.answering += 1;
    this.throttle(s);
    const answer = { op: 'checkpointed' as const, code: err.code, message: err.message };
    if (now) this.answer(s, answer);
    else void this.checkpoints.afterWrites().then(() => this.answer(s, answer));
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
    this.carryChanged(s);
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

  // ---- transfers ---------------------------------------------------------------------------

  /**
   * The relay `t` was abandoned while `s` (its sender, still serving) owed it an answer or the rest of a state.
   * The connection stays: it carries the generation's state at the next reload. What still comes of the
   * abandoned relay is read and dropped (endAbandoned() then says the connection is usable again); a state whose
   * rest stops arriving leaves the framing unknown, and its connection is closed (stallAbandoned()).
   */
  private abandon(s: Session, t: Transfer, err: Error): void {
    const gen = s.gen!.number;
    const dump = t.final ? 'final dump' : 'dump';
    const owed = s.phase === 'dump-requested' ? `its answer to the ${dump}` : `the rest of its state (${t.sent} of ${t.total} bytes arrived)`;
    s.abandoned = { reason: err.message, since: new Date().toISOString(), stall: null, stallMs: t.timeoutMs };
    this.log.warn({ generation: gen, phase: s.phase, reason: err.message }, `relay: generation ${gen}'s ${dump} was abandoned (${err.message}); ${owed} will be read and dropped, its relay connection stays for the next reload`);
    this.watchAbandoned(s);
  }

  /** While the rest of an abandoned state is due, it must keep arriving: no byte for `stallMs` closes the connection. */
  private watchAbandoned(s: Session): void {
    const a = s.abandoned;
    if (!a || a.stall !== null || (s.phase !== 'streaming' && s.phase !== 'trailer' && s.phase !== 'direct')) return;
    a.stall = setTimeout(() => this.stallAbandoned(s), a.stallMs);
  }

  private stallAbandoned(s: Session): void {
    const a = s.abandoned!;
    a.stall = null;
    const gen = s.gen!.number;
    const owed = s.phase === 'streaming' ? `${s.conn.pendingData} bytes of its announced state` : `the digest trailer of its state`;
    const why = `${owed} did not arrive within ${a.stallMs} ms after its relay was abandoned at ${a.since} (${a.reason}); Aeterna closed the connection, whose framing it could no longer trust`;
    this.log.warn({ generation: gen, phase: s.phase }, `relay: generation ${gen}: ${why}; the next reload starts its successor without its state, unless it connects again`);
    s.conn.close(new Error(why));
  }

  /** What was left of an abandoned relay arrived (and was dropped): the connection is usable again. */
  private endAbandoned(s: Session): void {
    const a = s.abandoned;
    if (!a || s.phase !== 'idle') return;
    if (a.stall) clearTimeout(a.stall);
    s.abandoned = null;
    this.log.info({ generation: s.gen!.number }, `relay: what was left of generation ${s.gen!.number}'s abandoned relay arrived and was dropped; its relay connection is usable again`);
  }

  /**
   * Send `bytes` of zeros (one shared zero buffer: no memory per byte): first the rest of the frame that was
   * being passed on (`frameLeft`), then as whole data frames; and a trailer that matches nothing.
   */
  private pad(to: Session, bytes: number, frameLeft: number, trailer: boolean): void {
    const zeros = Buffer.alloc(Math.min(bytes, 1 << 20));
    for (let left = frameLeft; left > 0; left -= zeros.length) to.conn.stream.write(zeros.subarray(0, Math.min(left, zeros.length)));
    for (let left = bytes - frameLeft; left > 0; left -= zeros.length) to.conn.sendData(zeros.subarray(0, Math.min(left, zeros.length)), zeros.length);
    if (trailer) to.conn.send({ op: 'trailer', sha256: '0'.repeat(64) });
    this.log.warn({ generation: to.gen?.number, bytes }, 'relay: final sync cut short; the rest was padded so the serving generation refuses it and keeps its connection');
  }

  /** `from` null: no live old generation; `to` gets an empty load, or the latest checkpoint (`empty` 'checkpoint'). */
  private transfer(from: Session | null, to: Session, final: boolean, progress: (p: RelayProgress) => void, signal: AbortSignal, timeoutMs: number, empty: 'nothing' | 'checkpoint' = 'nothing'): Promise<{ bytes: number }> {
    return new Promise((resolve, reject) => {
      if (from && from.phase !== 'idle') {
        reject(new Error(`generation ${from.gen!.number} is busy with an earlier relay (${from.phase})`));
        return;
      }
      const t: Transfer = { from, to, final, total: 0, sent: 0, frameLeft: 0, reported: 0, streaming: false, trailer: false, trailerSent: false, directOffered: false, pair: null, direct: false, checksumOffered: null, checksum: undefined, aborted: false, timeoutMs, progress, resolve, reject };
      const onAbort = (): void => this.abort(t, signal.reason instanceof Error ? signal.reason : new Error('aborted'));
      if (signal.aborted) return onAbort();
      signal.addEventListener('abort', onAbort, { once: true });
      this.transfers.add(t);
      const settle = (): void => {
        signal.removeEventListener('abort', onAbort);
        this.transfers.delete(t);
      };
      t.resolve = (r) => {
        settle();
        resolve(r);
      };
      t.reject = (err) => {
        settle();
        reject(err);
      };
      to.transfer = t;
      this.carryChanged(to);
      if (!from && empty === 'checkpoint') {
        to.phase = 'load-sent';
        t.total = this.sendCheckpoint(to);
        return;
      }
      if (!from) {
        // The old generation never connected: there is nothing to relay.
        this.log.warn({ generation: to.gen!.number }, 'relay: the old generation has no relay connection; the new one starts without state');
        to.phase = 'load-sent';
        to.conn.send({ op: 'load', size: 0, ...(final ? { final: true } : {}) });
        return;
      }
      from.transfer = t;
      from.phase = 'dump-requested';
      this.carryChanged(from);
      // The app's SDK waits as long as we do. A digest trailer is offered only if the receiver can take one.
      // A cheaper check than SHA-256 when both generations can use it; not on a final sync, whose cut-short
      // form must end in a trailer that can match nothing (docs/srp.md, "Checksums").
      t.checksumOffered = !final && to.takesTrailer && from.checksums.includes('crc32') && to.checksums.includes('crc32') ? 'crc32' : null;
      const trailer = to.takesTrailer ? { trailer: true as const, ...(t.checksumOffered ? { checksum: t.checksumOffered } : {}) } : {};
      const pair = this.directPair(from, to, final);
      if (pair) {
        // The sender's end goes with the dump and ours is closed once sent; the receiver's waits for the answer.
        t.directOffered = true;
        t.pair = pair[1];
        from.conn.send({ op: 'dump', final, timeout_ms: timeoutMs, ...trailer, direct: true, fds: ['direct'] }, [pair[0]], { closeFds: true });
      } else {
        from.conn.send({ op: 'dump', final, timeout_ms: timeoutMs, ...trailer });
      }
      this.log.debug({ from: from.gen!.number, to: to.gen!.number, final, timeout_ms: timeoutMs, trailer: to.takesTrailer, direct: pair !== null, checksum: t.checksumOffered ?? 'sha256' }, 'relay: dump requested');
    });
  }

  /**
   * A socket pair for the state's bytes (docs/srp.md, "Direct transport"), when both generations said they take
   * one: a first dump only (a final sync that fails must keep the serving generation's connection in step, which
   * Aeterna can only do with the bytes passing through it). Null when not offered, or the pair cannot be made.
   */
  private directPair(from: Session, to: Session, final: boolean): [number, number] | null {
    if (final || !from.takesDirect || !to.takesDirect || !to.takesTrailer) return null;
    try {
      return native.relayPair(DIRECT_PAIR_BUFFER);
    } catch (err) {
      this.log.warn({ err, from: from.gen!.number, to: to.gen!.number }, 'relay: no socket pair for the direct transport; the state passes through Aeterna');
      return null;
    }
  }

  /** The receiver's end of an offered pair that will not be passed on. */
  private closePair(t: Transfer): void {
    if (t.pair === null) return;
    closeQuietly(t.pair);
    t.pair = null;
  }

  private onState(from: Session, m: StateHeader, fds: number[]): void {
    const t = from.transfer;
    if (!t) {
      // The answer to a dump that was abandoned (it came after the timeout): its bytes are read and dropped.
      fds.forEach(closeQuietly);
      // Its bytes follow as data frames (streamed), on the pair Aeterna already closed (direct: only its trailer
      // comes here), or not at all (memfd, empty).
      from.phase = m.transport === 'direct' ? 'direct' : m.transport !== 'memfd' && m.size > 0 ? 'streaming' : 'idle';
      this.log.warn({ generation: from.gen!.number, size: m.size }, 'relay: a state arrived after its dump was abandoned; dropped');
      this.watchAbandoned(from);
      return;
    }
    if (m.trailer && !t.to.takesTrailer) throw new SrpError('bad_json', 'state: "trailer" was not offered in this dump (the receiving generation did not say it takes one)');
    if (m.transport === 'direct' && !t.directOffered) throw new SrpError('bad_json', 'state: transport "direct" was not offered in this dump');
    if (m.checksum !== undefined && m.checksum !== t.checksumOffered) throw new SrpError('bad_json', `state: checksum "${m.checksum}" was not offered in this dump`);
    const pair = m.transport === 'direct' ? t.pair : null;
    t.pair = null;
    if (m.transport !== 'direct' && t.directOffered && !t.aborted) this.log.debug({ from: from.gen!.number }, 'relay: the direct transport was offered and not taken');
    if (pair === null) this.closePair(t);
    if (m.transport === 'memfd') {
      const memfd = fds[(m.fds ?? []).indexOf('state')];
      const size = fs.fstatSync(memfd).size;
      if (!isSealedState(memfd)) throw new SrpError('bad_frame', 'memfd state is not sealed against write, shrink and grow');
      if (size !== m.size) throw new SrpError('bad_frame', `memfd state has ${size} bytes, ${m.size} announced`);
    }
    t.total = m.size;
    this.log.info({ from: from.gen!.number, to: t.to.gen!.number, size: m.size, transport: m.transport ?? 'stream', checksum: m.checksum ?? 'sha256', fds: (m.fds ?? []).length, final: t.final }, 'relay: state announced');
    from.phase = m.transport === 'direct' ? 'direct' : m.transport !== 'memfd' && m.size > 0 ? 'streaming' : 'idle';
    if (!t.aborted && t.to.noFds && fds.length > 0) {
      // Its hello said it cannot receive fds: fail the relay (a reload rolls back), never half-deliver the state.
      const what = m.transport === 'memfd' ? 'a memfd state' : `fds (${(m.fds ?? []).join(', ')})`;
      this.abort(t, new Error(`generation ${t.to.gen!.number} cannot receive fds (its hello said "fds": false), but generation ${from.gen!.number} sent ${what}`));
    }
    if (t.aborted) {
      fds.forEach(closeQuietly);
      if (pair !== null) closeQuietly(pair);
      return;
    }
    t.to.phase = 'load-sent';
    t.streaming = from.phase === 'streaming';
    t.trailer = m.trailer === true;
    t.direct = pair !== null;
    t.checksum = m.checksum;
    const { op: _state, ...fields } = m as StateHeader & { op: string };
    const header: Message = { ...fields, op: 'load', ...(t.final ? { final: true } : {}) };
    if (pair !== null) {
      // The receiver's end of the pair rides on the load; once it is sent only the two generations hold the
      // pair, so the sender closing its end is the receiver's end of file.
      header.fds = [...(m.fds ?? []), 'direct'];
      fds = [...fds, pair];
    }
    // Our copies of the fds are closed once the kernel has them on the way to the new generation.
    t.to.conn.send(header, fds, { closeFds: true });
    if (from.phase === 'idle') this.report(t, true);
  }

  /** Part of a data frame: passed on as it arrived, never reassembled (its header first, checked by the connection). */
  private onData(from: Session, payload: Buffer, frameLength: number | null, remaining: number): void {
    if (from.checkpoint) return this.checkpointData(from, payload, remaining);
    const t = from.transfer;
    if (remaining === 0) from.phase = from.conn.trailerDue ? 'trailer' : 'idle';
    if (!t || t.aborted) {
      if (from.phase === 'idle') from.transfer = null; // the rest of an abandoned dump was read and dropped
      from.abandoned?.stall?.refresh(); // it keeps arriving
      return;
    }
    t.sent += payload.length;
    t.frameLeft = frameLength ?? t.frameLeft - payload.length;
    if (!t.to.conn.forward(payload, frameLength)) {
      // The new generation reads slower than the old one writes: stop reading until its queue drains.
      from.conn.pause();
      t.to.conn.stream.once('drain', () => from.conn.resume());
    }
    this.report(t, remaining === 0);
  }

  /** The digest that follows a streamed state: passed on to the receiver, which verifies it. */
  private onTrailer(from: Session, m: TrailerDigest): void {
    from.phase = 'idle';
    const t = from.transfer;
    if (!t || t.aborted) {
      from.transfer = null; // the end of an abandoned dump
      return;
    }
    const digest = trailerDigest(m, t.checksum);
    if (digest === null) throw new SrpError('bad_json', `trailer: the state announced ${t.checksum ?? 'sha256'}, the trailer carries the other check`);
    t.trailerSent = true;
    t.to.conn.send(t.checksum === 'crc32' ? { op: 'trailer', crc32: digest } : { op: 'trailer', sha256: digest });
    if (t.direct) {
      // Its bytes went past Aeterna: the sender's trailer says it is done writing them.
      t.sent = t.total;
      this.report(t, true);
    }
  }

  private report(t: Transfer, done: boolean): void {
    if (done || t.sent - t.reported >= PROGRESS_EVERY) {
      t.reported = t.sent;
      t.progress({ bytes: t.sent, total: t.total });
    }
  }

  private onLoadAck(to: Session, ok: boolean, error: string | undefined): void {
    to.phase = 'idle';
    const offer = this.offered.get(to.gen!);
    if (offer && !offer.judged && !ok) {
      offer.judged = true;
      this.checkpointLoadFailed(offer.seq, `generation ${to.gen!.number} refused it (${error ?? 'no reason given'})`);
    }
    const first = !to.initialAcked;
    to.initialAcked = true;
    const t = to.transfer;
    to.transfer = null;
    if (!t) {
      if (!ok) this.log.warn({ generation: to.gen!.number, error }, `relay: the app refused its initial load (${offer ? `checkpoint ${offer.seq}` : 'empty'})`);
      else if (first) this.log.debug({ generation: to.gen!.number }, 'relay: initial load acknowledged');
      return;
    }
    const from = t.from;
    if (from) {
      from.transfer = null;
      if (!from.conn.closed) from.conn.send(ok ? { op: 'ack', ok: true } : { op: 'ack', ok: false, error: error ?? 'refused' });
    }
    if (ok) t.resolve({ bytes: t.total });
    else t.reject(new Error(`generation ${to.gen!.number} refused the state: ${error ?? 'no reason given'}`));
  }

  private onClose(s: Session, error: Error | null): void {
    if (s.helloTimer) clearTimeout(s.helloTimer);
    if (s.abandoned?.stall) clearTimeout(s.abandoned.stall);
    this.sessions.delete(s);
    this.carryChanged(s);
    if (s.checkpoint) {
      // Cut short: the previous checkpoint stays.
      s.checkpoint.writer?.discard();
      s.checkpoint = null;
      this.log.warn({ generation: s.gen?.number }, 'checkpoint cut short (the connection closed mid-stream); the previous one stays');
      this.emit('checkpoint', 'cut_short');
    }
    if (s.gen && this.byGeneration.get(s.gen) === s) {
      this.byGeneration.delete(s.gen);
      if (this.generations.has(s.gen)) this.lostConnections.set(s.gen, `${new Date().toISOString()} (${error ? error.message : 'the app closed it'})`);
    }
    if (error instanceof SrpError) this.log.warn({ generation: s.gen?.number, code: error.code }, `relay connection closed: ${error.message}`);
    const t = s.transfer;
    if (!t) return;
    const who = `generation ${s.gen?.number} (${t.from === s ? 'old' : 'new'})`;
    if (error instanceof SrpError) {
      // Aeterna itself refused what this peer sent: say so, the peer did not just go away.
      this.fail(t, new Error(`Aeterna refused a relay frame from ${who} (${error.code}): ${error.message}`));
      return;
    }
    const during = t.from === s && s.phase !== 'idle' ? ' mid-dump' : '';
    if (error !== null && !isPeerGone(error)) {
      this.fail(t, new Error(`${who} relay connection failed${during}: ${error.message}`));
      return;
    }
    // The peer's end closed or was reset: most often the process died, and its exit is reaped a moment
    // later. Wait briefly for it, so that the reason says what happened rather than how the socket looked.
    const gen = s.gen!;
    const closed = `${who} closed its relay connection${during}${error ? ` (${error.message})` : ''}`;
    let waited: NodeJS.Timeout | undefined;
    const gone = new Promise<string>((resolve) => {
      waited = setTimeout(() => resolve(closed), EXIT_EXPLAIN_MS);
      void gen.exited.then((info) => resolve(`${who} died during the relay (${describeExit(info)})`));
    });
    void gone.then((reason) => {
      clearTimeout(waited);
      this.fail(t, new Error(reason));
    });
  }

  /** The relay failed: tell the orchestrator; keep the old generation's connection usable. */
  private fail(t: Transfer, err: Error): void {
    if (t.aborted) return;
    this.abort(t, err);
  }

  private abort(t: Transfer, reason: Error): void {
    if (t.aborted) return;
    t.aborted = true;
    this.closePair(t);
    // The old generation failed before a byte of its state went to the new one, which still waits for a load.
    const dumpFailed = t.from !== null && !t.final && t.to.phase === 'waiting' && !t.to.conn.closed;
    const err = dumpFailed ? new DumpFailed(reason.message) : reason;
    if (t.from) {
      t.from.conn.resume();
      if (t.from.phase === 'dump-requested' || t.from.phase === 'idle') t.from.transfer = null;
      // While 'streaming' (or 'trailer'), the rest of its data and trailer are read and dropped, then it is idle again.
      if (t.from.phase !== 'idle' && !t.from.conn.closed) this.abandon(t.from, t, err);
    }
    if (t.to.transfer === t) {
      t.to.transfer = null;
      if (!t.final) {
        // A reload's new generation is being stopped anyway.
        // Unless the old one failed to dump: the orchestrator may still give it the checkpoint (or release it).
        if (t.to.phase === 'load-sent' || (t.to.phase === 'waiting' && !dumpFailed)) t.to.conn.close(new Error(`relay aborted: ${err.message}`));
      } else if (t.streaming && (t.sent < t.total || (t.trailer && !t.trailerSent))) {
        // The serving generation must keep its connection: finish the announced bytes with zeros (and a
        // trailer), so the framing stays in step; its checksum check then refuses the state, and nothing is applied.
        this.pad(t.to, t.total - t.sent, t.frameLeft, t.trailer);
      }
    }
    t.reject(err);
    if (t.from) this.carryChanged(t.from);
    this.carryChanged(t.to);
  }
}

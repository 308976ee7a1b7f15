// Admission and the handshake: which processes may speak on the state socket,
// and what each connection is (a Session) once it said hello. The kernel says
// who connected (SO_PEERCRED) before a byte is read; a process that is not in a
// generation Aeterna runs is refused on the bare fd (refusal.ts).
import type { EventEmitter } from 'node:events';
import { native } from '../native/binding';
import type { Logger } from '../log';
import type { Generation } from '../supervisor/generation';
import { belongsTo } from '../supervisor/proctree';
import type { RelayProgress, RelayRole } from '../orchestrator/relay';
import { SrpError, closeQuietly } from './codec';
import type { CheckpointRefused, CheckpointWriter } from './checkpoint-store';
import { SrpConnection } from './connection';
import type { Checksum, Message } from './messages';
import type { Phase } from './protocol';
import { refuseConnection } from './refusal';

/** What the relay tells the daemon: a generation said ready, a checkpoint's fate, a change in what an upgrade can carry. */
export type RelayEvents = { ready: [gen: Generation]; checkpoint: [result: string]; carry: [] };
export type RelayEmitter = EventEmitter<RelayEvents>;

/** A client must say hello within this long. */
export const HELLO_TIMEOUT_MS = 5000;
/** Live relay connections at most (one per generation is the norm; the rest is abuse). */
export const MAX_CONNECTIONS = 64;
/**
 * Connections of one generation that have not said hello yet. A generation needs one (a few allow for a
 * retry): its own stray processes cannot fill the table that the next generation needs.
 */
export const MAX_PENDING_PER_GENERATION = 4;
/**
 * The relay's window in Aeterna: the old generation is read only while the new one's queue is below this.
 * What waits is held in the connection's spill ring (this plus one read), allocated once and reused.
 */
export const RELAY_HIGH_WATER_MARK = 4 << 20;

export interface Session {
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
  /** Said in its hello that it hands its client connections over and adopts them (docs/srp.md, "Connection handoff"). */
  takesHandoff: boolean;
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
export interface Abandoned {
  /** Why the relay was abandoned, and when. */
  reason: string;
  since: string;
  /** While the rest of a state is due: closes the connection when no byte of it arrives for `stallMs`. */
  stall: NodeJS.Timeout | null;
  stallMs: number;
}

/** One relay of a state from `from` (the old generation, or none) to `to`: the sessions it ties, its progress (src/srp/transfer.ts runs it). */
export interface Transfer {
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

/**
 * Why session `s` cannot be carried across an exec now, or null. `framing`: also nothing half-read or
 * half-written on it (exact at an upgrade or an exception; a prepared signal handover cannot track bytes).
 */
export function busyWith(s: Session, framing: boolean): string | null {
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

/** Tell the daemon when whether `s` can be carried changed (the prepared signal handover lists it, or not). */
export function carryChanged(s: Session, events: RelayEmitter): void {
  const now = !s.conn.closed && s.gen !== null && busyWith(s, false) === null;
  if (now === s.carried) return;
  s.carried = now;
  events.emit('carry');
}

/** What a session learned from its hello: all a re-executed Aeterna needs to go on speaking with it. */
export type HelloFlags = Pick<Session, 'noFds' | 'takesTrailer' | 'takesDirect' | 'takesHandoff' | 'checksums'>;

/** The hello-derived flags of a session (or of a carried entry): the one place that lists them. */
export function helloFlags(s: Pick<HelloFlags, 'noFds' | 'takesTrailer'> & Partial<HelloFlags>): HelloFlags {
  // Optional in a handover: absent, the client was never offered the direct transport or another check.
  return {
    noFds: s.noFds,
    takesTrailer: s.takesTrailer,
    takesDirect: s.takesDirect ?? false,
    takesHandoff: s.takesHandoff ?? false,
    checksums: [...(s.checksums ?? [])],
  };
}

/** A connection of `owner`'s that has not said hello yet. */
export function newSession(conn: SrpConnection, owner: Generation): Session {
  return {
    conn,
    owner,
    gen: null,
    phase: 'hello',
    initialAcked: false,
    noFds: false,
    takesTrailer: false,
    takesDirect: false,
    takesHandoff: false,
    checksums: [],
    transfer: null,
    checkpoint: null,
    receivingCheckpoint: false,
    answering: 0,
    checkpointsThrottled: false,
    answersBlocked: false,
    carried: false,
    helloTimer: null,
    abandoned: null,
  };
}

/** What admission needs from the rest of the relay. */
export interface SessionHooks {
  /** Start reading a connection's frames. */
  listen(s: Session): void;
  /** Whether the welcome says that checkpoints are stored. */
  checkpointsEnabled(): boolean;
  /** The initial load of a generation with no live predecessor: the latest checkpoint, or empty. */
  offerCheckpoint(s: Session): void;
}

/** The connections, and the generations whose processes may connect. */
export class Sessions {
  readonly all = new Set<Session>();
  readonly byGeneration = new Map<Generation, Session>();
  /** Generations whose processes may connect; `candidate` ones wait for a reload's state. */
  readonly generations = new Map<Generation, { role: RelayRole }>();
  private readonly waiters = new Map<Generation, Array<(s: Session) => void>>();
  /** Live generations whose relay connection closed, with when and why: a reload says so instead of relaying nothing in silence. */
  readonly lostConnections = new Map<Generation, string>();

  constructor(
    private readonly maxFrame: number,
    private readonly log: Logger,
    private readonly hooks: SessionHooks,
  ) {}

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

  /**
   * Admission by the kernel's word on who connected, before a byte is read: a process that is not in a
   * current generation is refused at once and holds no slot, so strangers cannot use up what generations need.
   */
  admit(fd: number): void {
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
      this.log.warn(
        { peer_pid: peer.pid, peer_uid: peer.uid },
        'relay connection refused: not a process of a managed generation',
      );
      refuseConnection(fd, 'forbidden', `pid ${peer.pid} is not a process of a generation Aeterna runs`);
      return;
    }
    const pending = [...this.all].filter((s) => s.owner === owner && s.phase === 'hello').length;
    if (pending >= MAX_PENDING_PER_GENERATION) {
      refuseConnection(
        fd,
        'busy',
        `generation ${owner.number} already has ${pending} relay connections waiting for their hello`,
      );
      return;
    }
    if (this.all.size >= MAX_CONNECTIONS) {
      refuseConnection(fd, 'busy', `too many relay connections (at most ${MAX_CONNECTIONS})`);
      return;
    }
    const conn = new SrpConnection(fd, this.maxFrame, RELAY_HIGH_WATER_MARK);
    const session = newSession(conn, owner);
    session.helloTimer = setTimeout(
      () => conn.fail('timeout', `no hello within ${HELLO_TIMEOUT_MS} ms`),
      HELLO_TIMEOUT_MS,
    );
    this.hooks.listen(session);
  }

  onHello(s: Session, m: Message & { op: 'hello' }): void {
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
    s.takesHandoff = m.handoff === true; // the decoder refused it from a client without fds
    s.checksums = m.checksums ?? [];
    this.byGeneration.set(gen, s);
    s.conn.send({
      op: 'welcome',
      v: 1,
      generation: gen.number,
      max_frame: this.maxFrame,
      ...(this.hooks.checkpointsEnabled() ? { checkpoint: true as const } : {}),
      direct: true,
      handoff: true,
    });
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
      this.hooks.offerCheckpoint(s);
    }
  }

  /** A connection closed: it no longer speaks for its generation (which, while it lives, has lost its connection). */
  closed(s: Session, error: Error | null): void {
    if (s.helloTimer) clearTimeout(s.helloTimer);
    this.all.delete(s);
    if (s.gen && this.byGeneration.get(s.gen) === s) {
      this.byGeneration.delete(s.gen);
      if (this.generations.has(s.gen))
        this.lostConnections.set(s.gen, `${new Date().toISOString()} (${error ? error.message : 'the app closed it'})`);
    }
  }

  private generationOf(pid: number): Generation | null {
    return [...this.generations.keys()].find((g) => g.alive && belongsTo(pid, g.pid)) ?? null;
  }

  liveSession(gen: Generation): Session | null {
    const s = this.byGeneration.get(gen);
    return s && !s.conn.closed ? s : null;
  }

  /** The connection of a reload's new generation once it waits for the old state. */
  waitForSession(gen: Generation, signal: AbortSignal): Promise<Session> {
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
      void gen.exited.then((info) =>
        reject(
          new Error(
            `generation ${gen.number} exited (code ${info.code ?? `signal ${info.signal}`}) before it connected to the relay`,
          ),
        ),
      );
    });
  }
}

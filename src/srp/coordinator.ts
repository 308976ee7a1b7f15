// The SRP coordinator: Aeterna's end of the State Relay Protocol (docs/srp.md).
// It owns the state socket and puts together the parts of the relay: admission
// and the handshake (session.ts), which op is valid when (protocol.ts), the
// relay of a state (transfer.ts), checkpoints in and out (checkpoint-intake.ts,
// checkpoint-offer.ts) and what an upgrade carries (carry.ts). It never parses
// the state.
import fs from 'node:fs';
import { EventEmitter } from 'node:events';
import type { StateHandoffConfig } from '../config/types';
import type { Logger } from '../log';
import type { Generation } from '../supervisor/generation';
import {
  DumpFailed,
  type CheckpointSummary,
  type RelayProgress,
  type RelayRole,
  type StateRelay,
} from '../orchestrator/relay';
import { Acceptor } from '../resources/acceptor';
import { claimSocketPath, listenSocketFile, removeSocketFile, type SocketFile } from '../resources/socket-file';
import { SrpError, closeQuietly } from './codec';
import { endAbandoned, forgetAbandoned } from './abandoned';
import {
  RelayCarrier,
  type CarriedCheckpoint,
  type CarriedRelayConnection,
  type CarryReason,
  type RelayCarried,
} from './carry';
import { CheckpointIntake } from './checkpoint-intake';
import { CheckpointOffers } from './checkpoint-offer';
import { InstanceCheckpoints } from './checkpoint-instances';
import type { Message } from './messages';
import { ON, type Handler } from './protocol';
import { Sessions, carryChanged, type RelayEvents, type Session } from './session';
import { Transfers } from './transfer';

/** An fd of the relay's that an upgrade keeps open across the exec, with its role and name in the handover. */

/** The state socket at socketPath (mode 0600, chowned to `owner`): a stale file is taken over, a live one refused. */
function listenStateSocket(
  socketPath: string,
  owner: { uid: number; gid: number } | undefined,
): { fd: number; file: SocketFile } {
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

export class SrpCoordinator extends EventEmitter<RelayEvents> implements StateRelay {
  private readonly sessions: Sessions;
  private readonly transfers: Transfers;
  private readonly intake: CheckpointIntake;
  private readonly offers: CheckpointOffers;
  private readonly carrier: RelayCarrier;
  private acceptor: Acceptor;
  /** Each instance's latest checkpoint (docs/srp.md, "Checkpoints"). */
  readonly checkpoints: InstanceCheckpoints;
  /** What each handler of the protocol table does with a message. */
  private readonly handlers: { readonly [H in Handler]: (s: Session, m: Message, fds: number[]) => void };

  private constructor(
    private file: SocketFile,
    private fd: number,
    config: StateHandoffConfig,
    private readonly log: Logger,
    instances: number,
    carriedCheckpoints: CarriedCheckpoint[] = [],
  ) {
    super();
    const maxFrame = config.maxFrameBytes;
    this.checkpoints = new InstanceCheckpoints(config.checkpoint, log, instances, carriedCheckpoints);
    this.offers = new CheckpointOffers(this.checkpoints, maxFrame, log, this);
    this.intake = new CheckpointIntake(this.checkpoints, log, this);
    this.transfers = new Transfers(this.offers, log, this);
    this.sessions = new Sessions(maxFrame, log, {
      listen: (s) => this.listen(s),
      checkpointsEnabled: () => this.checkpoints.config.enabled,
      offerCheckpoint: (s) => void this.offers.send(s),
    });
    this.carrier = new RelayCarrier(this.sessions, this.checkpoints, maxFrame, log, (s) => this.listen(s));
    this.handlers = {
      hello: (s, m) => this.sessions.onHello(s, m as Message & { op: 'hello' }),
      peerError: (s, m) => this.onPeerError(s, m as Message & { op: 'error' }),
      checkpoint: (s, m, fds) => this.intake.begin(s, m as Message & { op: 'checkpoint' }, fds),
      checkpointTrailer: (s, m) => this.intake.trailer(s, m as Message & { op: 'trailer' }),
      ready: (s) => this.onReady(s),
      loadAck: (s, m) =>
        this.transfers.onLoadAck(s, (m as Message & { op: 'ack' }).ok, (m as Message & { op: 'ack' }).error),
      dumpDeclined: (s, m) => this.transfers.onDumpDeclined(s, m as Message & { op: 'ack' }),
      state: (s, m, fds) => this.transfers.onState(s, m as Message & { op: 'state' }, fds),
      trailer: (s, m) => this.transfers.onTrailer(s, m as Message & { op: 'trailer' }),
    };
    this.acceptor = new Acceptor(fd, (conn) => this.sessions.admit(conn), log, 'state socket');
  }

  /**
   * Create the state socket (mode 0600, owned by the app's user) and start accepting; the checkpoint files of
   * instances 0..instances-1 (service.instances) are loaded.
   */
  static open(
    config: StateHandoffConfig,
    owner: { uid: number; gid: number } | undefined,
    log: Logger,
    instances = 1,
  ): SrpCoordinator {
    const { fd, file } = listenStateSocket(config.socketPath, owner);
    try {
      // Refuses a checkpoint path that names a file Aeterna did not write (docs/srp.md, "Checkpoints").
      return new SrpCoordinator(file, fd, config, log, instances);
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
    this.acceptor = new Acceptor(fd, (conn) => this.sessions.admit(conn), this.log, 'state socket');
    if (this.carrier.frozen) this.acceptor.suspend();
    return file;
  }

  /**
   * The state socket a re-executed Aeterna took over (aeterna upgrade), with the checkpoints it carried (each
   * instance's); connections: adoptConnections().
   */
  static adopt(
    config: StateHandoffConfig,
    file: SocketFile,
    fd: number,
    log: Logger,
    checkpoints: CarriedCheckpoint[],
    instances = 1,
  ): SrpCoordinator {
    return new SrpCoordinator(file, fd, config, log, instances, checkpoints);
  }

  // ---- re-exec (aeterna upgrade, recovery): carry.ts ---------------------------------------

  /** Why an upgrade cannot carry every relay connection now ("generation 1 is busy with ..."), or null. */
  busyReason(): string | null {
    return this.carrier.busyReason();
  }

  /** Resolves once every connection is idle; rejects with the reason after `timeoutMs`. */
  whenIdle(timeoutMs: number): Promise<void> {
    return this.carrier.whenIdle(timeoutMs);
  }

  /**
   * An upgrade is accepted: stop accepting and reading, so every connection stays idle until the exec (what
   * arrives meanwhile waits in the kernel for the next Aeterna). Throws if one is busy now. thaw() undoes it.
   */
  freeze(): void {
    this.carrier.freeze();
    this.acceptor.suspend();
  }

  /** The exec did not happen: go on as before. */
  thaw(): void {
    if (this.carrier.thaw()) this.acceptor.resume();
  }

  /** What an upgrade or a recovery carries (upgrade/carried.ts): RelayCarrier.carryAll. */
  carry(reason: CarryReason): RelayCarried {
    return this.carrier.carryAll(reason, this.fd, this.file);
  }

  /** Calls `listener` when a connection goes idle or busy, or a checkpoint arrives: what carry() returns changed. */
  onCarryChanged(listener: () => void): void {
    this.on('carry', listener);
  }

  /** A re-executed Aeterna: speak again on the connections the previous one carried. */
  adoptConnections(entries: CarriedRelayConnection[], generations: Generation[]): void {
    this.carrier.adoptConnections(entries, generations);
  }

  /** The listening socket (its file is kept like the control socket's, see keepSocketFile). */
  get listening(): { fd: number; file: SocketFile } {
    return { fd: this.fd, file: this.file };
  }

  // ---- StateRelay --------------------------------------------------------------------------

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

  attach(gen: Generation, role: RelayRole): void {
    this.sessions.attach(gen, role);
  }

  startOutcome(gen: Generation, ready: boolean): void {
    this.offers.startOutcome(gen, ready);
  }

  /** No final dump will be asked of this generation: close its connection (the app sees end of file). */
  release(gen: Generation): void {
    const session = this.sessions.byGeneration.get(gen);
    if (session) this.transfers.release(session);
  }

  async relay(
    old: Generation,
    next: Generation,
    progress: (p: RelayProgress) => void,
    signal: AbortSignal,
    timeoutMs: number,
  ): Promise<{ bytes: number }> {
    const deadline = Date.now() + timeoutMs; // the caller aborts then
    const to = await this.sessions.waitForSession(next, signal);
    const { session: from, waited } = await this.untilIdle(old, signal);
    // After waiting for an earlier relay, the dump tells the app what is left of the timeout, not all of it.
    if (waited) timeoutMs = Math.max(1, deadline - Date.now());
    const lost = from === null ? this.sessions.lostConnections.get(old) : undefined;
    if (lost !== undefined) {
      // Not an app that never used the relay: one whose connection is gone. Its state cannot reach the next one.
      this.log.warn(
        { generation: old.number, next: next.number },
        `relay: generation ${old.number} has no state relay connection since ${lost}: generation ${next.number} starts without its state`,
      );
    }
    return this.transfers.start(from, to, false, progress, signal, timeoutMs);
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
    const first = this.sessions.liveSession(gen);
    if (first === null || this.idleForRelay(first)) return Promise.resolve({ session: first, waited: false });
    const busy = (s: Session): string =>
      `${s.phase}${s.abandoned ? `: what is left of a relay abandoned at ${s.abandoned.since} (${s.abandoned.reason})` : ''}`;
    const what = busy(first);
    this.log.warn(
      { generation: gen.number, phase: first.phase },
      `relay: generation ${gen.number} is busy with an earlier relay (${what}); the reload waits for it, at most state_handoff.timeout`,
    );
    return new Promise((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const onAbort = (): void => {
        clearTimeout(timer);
        const s = this.sessions.liveSession(gen);
        const why = signal.reason instanceof Error ? signal.reason.message : 'aborted';
        reject(
          new DumpFailed(
            `${why}: generation ${gen.number} was still busy with an earlier relay (${s ? busy(s) : what})`,
          ),
        );
      };
      if (signal.aborted) return onAbort();
      signal.addEventListener('abort', onAbort, { once: true });
      // Checked every 20 ms, as whenIdle: a relay ends on many paths.
      const check = (): void => {
        const s = this.sessions.liveSession(gen);
        if (s !== null && !this.idleForRelay(s)) {
          timer = setTimeout(check, 20);
          return;
        }
        signal.removeEventListener('abort', onAbort);
        this.log.info(
          { generation: gen.number },
          s
            ? `relay: generation ${gen.number} is done with its earlier relay; the reload goes on`
            : `relay: generation ${gen.number}'s relay connection closed while the reload waited for it`,
        );
        resolve({ session: s, waited: true });
      };
      timer = setTimeout(check, 20);
    });
  }

  restoreCheckpoint(next: Generation, signal: AbortSignal, timeoutMs: number): Promise<{ bytes: number }> {
    const to = this.sessions.liveSession(next);
    if (!to || to.phase !== 'waiting')
      return Promise.reject(new Error(`generation ${next.number} is not waiting for its initial load`));
    if (!this.checkpoints.current(next.instance))
      return Promise.reject(new Error(`no checkpoint of instance ${next.instance} is stored`));
    return this.transfers.start(null, to, false, () => undefined, signal, timeoutMs, 'checkpoint');
  }

  finalSync(old: Generation, next: Generation, signal: AbortSignal, timeoutMs: number): Promise<{ bytes: number }> {
    const to = this.sessions.liveSession(next);
    if (!to) return Promise.reject(new Error(`generation ${next.number} has no relay connection`));
    const from = this.sessions.liveSession(old);
    if (!from) return Promise.reject(new Error(`generation ${old.number} has no relay connection`));
    return this.transfers.start(from, to, true, () => undefined, signal, timeoutMs);
  }

  lastCheckpoint(instance?: number): CheckpointSummary | null {
    const c =
      instance === undefined ? (this.checkpoints.latest()?.checkpoint ?? null) : this.checkpoints.current(instance);
    return c && { seq: c.seq, size: c.size, age_ms: Date.now() - c.savedAt };
  }

  relaying(gen: Generation): boolean {
    return this.transfers.relaying(gen);
  }

  async close(): Promise<void> {
    this.acceptor.close();
    closeQuietly(this.fd);
    for (const s of this.sessions.all) s.conn.close();
    removeSocketFile(this.file);
    this.checkpoints.close();
  }

  // ---- connections -------------------------------------------------------------------------

  private listen(session: Session): void {
    const conn = session.conn;
    this.sessions.all.add(session);
    conn.on('message', (m, fds) => {
      try {
        this.onMessage(session, m, fds);
      } catch (err) {
        fds.forEach(closeQuietly);
        if (err instanceof SrpError) conn.fail(err.code, err.message);
        else throw err;
      }
      endAbandoned(session, this.log);
      carryChanged(session, this);
    });
    conn.on('data', (payload, frameLength, remaining) => {
      if (session.checkpoint) this.intake.data(session, payload, remaining);
      else this.transfers.onData(session, payload, frameLength, remaining);
      if (remaining === 0) {
        endAbandoned(session, this.log);
        carryChanged(session, this);
      }
    });
    conn.on('close', (error) => this.onClose(session, error));
  }

  /** The protocol table decides (protocol.ts); a pair it leaves out is `unexpected_op`. */
  private onMessage(s: Session, m: Message, fds: number[]): void {
    const handler = ON[s.checkpoint ? 'checkpoint' : s.phase][m.op];
    if (handler === null) {
      throw new SrpError(
        'unexpected_op',
        s.phase === 'hello' ? `expected hello, got "${m.op}"` : `"${m.op}" is not valid now (${s.phase})`,
      );
    }
    this.handlers[handler](s, m, fds);
  }

  private onPeerError(s: Session, m: Message & { op: 'error' }): void {
    this.log.warn({ generation: s.gen?.number, code: m.code, message: m.message }, 'relay peer reported an error');
    s.conn.close(new Error(`peer error ${m.code}: ${m.message}`));
  }

  private onReady(s: Session): void {
    if (!s.initialAcked) throw new SrpError('unexpected_op', '"ready" before the initial load was acknowledged');
    this.emit('ready', s.gen!);
  }

  private onClose(s: Session, error: Error | null): void {
    forgetAbandoned(s);
    this.sessions.closed(s, error);
    carryChanged(s, this);
    this.intake.cutShort(s);
    if (error instanceof SrpError)
      this.log.warn({ generation: s.gen?.number, code: error.code }, `relay connection closed: ${error.message}`);
    this.transfers.closed(s, error);
  }
}

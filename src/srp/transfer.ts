// The relay of one state from the old generation to the new one (or of the
// latest checkpoint, or of nothing, to the new one): the dump, the state's
// header, its bytes passed on chunk by chunk (reading from the old one stops
// while the new one's queue is above a bounded window), its trailer, the ack;
// and what happens when any of it fails. It never parses the state.
import fs from 'node:fs';
import type { Logger } from '../log';
import { describeExit } from '../supervisor/exit';
import type { Generation } from '../supervisor/generation';
import { DumpFailed, type RelayProgress } from '../orchestrator/relay';
import { SrpError, closeQuietly, isSealedState } from './codec';
import { abandon, watchAbandoned } from './abandoned';
import type { CheckpointOffers } from './checkpoint-offer';
import { closePair, requestDump } from './dump-request';
import { isPeerGone } from './fd-stream';
import { trailerDigest, type Message, type StateHeader, type TrailerDigest } from './messages';
import { carryChanged, type RelayEmitter, type Session, type Transfer } from './session';

/** After a peer's connection drops mid-relay, how long to wait for its exit to say that it died. */
const EXIT_EXPLAIN_MS = 1000;
/** Report relay progress at most this often (bytes). */
const PROGRESS_EVERY = 8 << 20;

export class Transfers {
  /** Transfers not settled yet (a session that closed mid-relay is gone from the tables, its transfer is not). */
  readonly live = new Set<Transfer>();

  constructor(
    private readonly offers: CheckpointOffers,
    private readonly log: Logger,
    private readonly events: RelayEmitter,
  ) {}

  /** `from` null: no live old generation; `to` gets an empty load, or the latest checkpoint (`empty` 'checkpoint'). */
  start(
    from: Session | null,
    to: Session,
    final: boolean,
    progress: (p: RelayProgress) => void,
    signal: AbortSignal,
    timeoutMs: number,
    empty: 'nothing' | 'checkpoint' = 'nothing',
  ): Promise<{ bytes: number }> {
    return new Promise((resolve, reject) => {
      if (from && from.phase !== 'idle') {
        reject(new Error(`generation ${from.gen!.number} is busy with an earlier relay (${from.phase})`));
        return;
      }
      const t: Transfer = {
        from,
        to,
        final,
        total: 0,
        sent: 0,
        frameLeft: 0,
        reported: 0,
        streaming: false,
        trailer: false,
        trailerSent: false,
        directOffered: false,
        pair: null,
        direct: false,
        checksumOffered: null,
        checksum: undefined,
        aborted: false,
        timeoutMs,
        progress,
        resolve,
        reject,
      };
      const onAbort = (): void => this.abort(t, signal.reason instanceof Error ? signal.reason : new Error('aborted'));
      if (signal.aborted) return onAbort();
      signal.addEventListener('abort', onAbort, { once: true });
      this.live.add(t);
      const settle = (): void => {
        signal.removeEventListener('abort', onAbort);
        this.live.delete(t);
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
      carryChanged(to, this.events);
      if (!from && empty === 'checkpoint') {
        to.phase = 'load-sent';
        t.total = this.offers.send(to);
        return;
      }
      if (!from) {
        // The old generation never connected: there is nothing to relay.
        this.log.warn(
          { generation: to.gen!.number },
          'relay: the old generation has no relay connection; the new one starts without state',
        );
        to.phase = 'load-sent';
        to.conn.send({ op: 'load', size: 0, ...(final ? { final: true } : {}) });
        return;
      }
      from.transfer = t;
      from.phase = 'dump-requested';
      carryChanged(from, this.events);
      requestDump(from, to, t, this.log);
    });
  }

  /** The old generation's answer to the dump: the state's header (its bytes follow, or came as a memfd, or go on the pair). */
  onState(from: Session, m: StateHeader, fds: number[]): void {
    const t = from.transfer;
    if (!t) {
      // The answer to a dump that was abandoned (it came after the timeout): its bytes are read and dropped.
      fds.forEach(closeQuietly);
      // Its bytes follow as data frames (streamed), on the pair Aeterna already closed (direct: only its trailer
      // comes here), or not at all (memfd, empty).
      from.phase = m.transport === 'direct' ? 'direct' : m.transport !== 'memfd' && m.size > 0 ? 'streaming' : 'idle';
      this.log.warn(
        { generation: from.gen!.number, size: m.size },
        'relay: a state arrived after its dump was abandoned; dropped',
      );
      watchAbandoned(from, this.log);
      return;
    }
    if (m.trailer && !t.to.takesTrailer)
      throw new SrpError(
        'bad_json',
        'state: "trailer" was not offered in this dump (the receiving generation did not say it takes one)',
      );
    if (m.transport === 'direct' && !t.directOffered)
      throw new SrpError('bad_json', 'state: transport "direct" was not offered in this dump');
    if (m.checksum !== undefined && m.checksum !== t.checksumOffered)
      throw new SrpError('bad_json', `state: checksum "${m.checksum}" was not offered in this dump`);
    const pair = m.transport === 'direct' ? t.pair : null;
    t.pair = null;
    if (m.transport !== 'direct' && t.directOffered && !t.aborted)
      this.log.debug({ from: from.gen!.number }, 'relay: the direct transport was offered and not taken');
    if (pair === null) closePair(t);
    if (m.transport === 'memfd') {
      const memfd = fds[(m.fds ?? []).indexOf('state')];
      const size = fs.fstatSync(memfd).size;
      if (!isSealedState(memfd))
        throw new SrpError('bad_frame', 'memfd state is not sealed against write, shrink and grow');
      if (size !== m.size) throw new SrpError('bad_frame', `memfd state has ${size} bytes, ${m.size} announced`);
    }
    t.total = m.size;
    this.log.info(
      {
        from: from.gen!.number,
        to: t.to.gen!.number,
        size: m.size,
        transport: m.transport ?? 'stream',
        checksum: m.checksum ?? 'sha256',
        fds: (m.fds ?? []).length,
        final: t.final,
      },
      'relay: state announced',
    );
    from.phase = m.transport === 'direct' ? 'direct' : m.transport !== 'memfd' && m.size > 0 ? 'streaming' : 'idle';
    if (!t.aborted && t.to.noFds && fds.length > 0) {
      // Its hello said it cannot receive fds: fail the relay (a reload rolls back), never half-deliver the state.
      const what = m.transport === 'memfd' ? 'a memfd state' : `fds (${(m.fds ?? []).join(', ')})`;
      this.abort(
        t,
        new Error(
          `generation ${t.to.gen!.number} cannot receive fds (its hello said "fds": false), but generation ${from.gen!.number} sent ${what}`,
        ),
      );
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
  onData(from: Session, payload: Buffer, frameLength: number | null, remaining: number): void {
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
  onTrailer(from: Session, m: TrailerDigest): void {
    from.phase = 'idle';
    const t = from.transfer;
    if (!t || t.aborted) {
      from.transfer = null; // the end of an abandoned dump
      return;
    }
    const digest = trailerDigest(m, t.checksum);
    if (digest === null)
      throw new SrpError(
        'bad_json',
        `trailer: the state announced ${t.checksum ?? 'sha256'}, the trailer carries the other check`,
      );
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

  /** The answer to a load Aeterna sent (the initial one, a relayed state, a checkpoint). */
  onLoadAck(to: Session, ok: boolean, error: string | undefined): void {
    to.phase = 'idle';
    const offered = this.offers.answered(to.gen!, ok, error);
    const first = !to.initialAcked;
    to.initialAcked = true;
    const t = to.transfer;
    to.transfer = null;
    if (!t) {
      if (!ok)
        this.log.warn(
          { generation: to.gen!.number, error },
          `relay: the app refused its initial load (${offered !== null ? `checkpoint ${offered}` : 'empty'})`,
        );
      else if (first) this.log.debug({ generation: to.gen!.number }, 'relay: initial load acknowledged');
      return;
    }
    const from = t.from;
    if (from) {
      from.transfer = null;
      if (!from.conn.closed)
        from.conn.send(ok ? { op: 'ack', ok: true } : { op: 'ack', ok: false, error: error ?? 'refused' });
    }
    if (ok) t.resolve({ bytes: t.total });
    else t.reject(new Error(`generation ${to.gen!.number} refused the state: ${error ?? 'no reason given'}`));
  }

  /** The old generation declines to dump (`ack` ok:false): the relay fails, its connection stays. */
  onDumpDeclined(s: Session, m: Message & { op: 'ack' }): void {
    if (m.ok) throw new SrpError('unexpected_op', `"ack" is not valid now (${s.phase})`);
    s.phase = 'idle';
    const t = s.transfer;
    s.transfer = null;
    // No transfer: the refusal answers a dump that was abandoned; it ends that relay here.
    if (t)
      this.fail(t, new Error(`generation ${s.gen!.number} could not dump its state: ${m.error ?? 'no reason given'}`));
  }

  /** Whether a state is on its way to or from this generation. */
  relaying(gen: Generation): boolean {
    for (const t of this.live) if (!t.aborted && (t.to.gen === gen || t.from?.gen === gen)) return true;
    return false;
  }

  /** No final dump will be asked of this session's generation: its connection ends (the app sees end of file). */
  release(s: Session): void {
    const t = s.transfer;
    s.conn.stream.end(); // first: a relay it was sending is not "abandoned" with its connection kept
    if (t) this.abort(t, new Error('generation released'));
  }

  /** `s` closed (`error`: why, when not a clean end): the relay it was part of fails, saying why. */
  closed(s: Session, error: Error | null): void {
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

  abort(t: Transfer, reason: Error): void {
    if (t.aborted) return;
    t.aborted = true;
    closePair(t);
    // The old generation failed before a byte of its state went to the new one, which still waits for a load.
    const dumpFailed = t.from !== null && !t.final && t.to.phase === 'waiting' && !t.to.conn.closed;
    const err = dumpFailed ? new DumpFailed(reason.message) : reason;
    if (t.from) {
      t.from.conn.resume();
      if (t.from.phase === 'dump-requested' || t.from.phase === 'idle') t.from.transfer = null;
      // While 'streaming' (or 'trailer'), the rest of its data and trailer are read and dropped, then it is idle again.
      if (t.from.phase !== 'idle' && !t.from.conn.closed) abandon(t.from, t, err, this.log);
    }
    if (t.to.transfer === t) {
      t.to.transfer = null;
      if (!t.final) {
        // A reload's new generation is being stopped anyway.
        // Unless the old one failed to dump: the orchestrator may still give it the checkpoint (or release it).
        if (t.to.phase === 'load-sent' || (t.to.phase === 'waiting' && !dumpFailed))
          t.to.conn.close(new Error(`relay aborted: ${err.message}`));
      } else if (t.streaming && (t.sent < t.total || (t.trailer && !t.trailerSent))) {
        // The serving generation must keep its connection: finish the announced bytes with zeros (and a
        // trailer), so the framing stays in step; its checksum check then refuses the state, and nothing is applied.
        this.pad(t.to, t.total - t.sent, t.frameLeft, t.trailer);
      }
    }
    t.reject(err);
    if (t.from) carryChanged(t.from, this.events);
    carryChanged(t.to, this.events);
  }

  /**
   * Send `bytes` of zeros (one shared zero buffer: no memory per byte): first the rest of the frame that was
   * being passed on (`frameLeft`), then as whole data frames; and a trailer that matches nothing.
   */
  private pad(to: Session, bytes: number, frameLeft: number, trailer: boolean): void {
    const zeros = Buffer.alloc(Math.min(bytes, 1 << 20));
    for (let left = frameLeft; left > 0; left -= zeros.length)
      to.conn.stream.write(zeros.subarray(0, Math.min(left, zeros.length)));
    for (let left = bytes - frameLeft; left > 0; left -= zeros.length)
      to.conn.sendData(zeros.subarray(0, Math.min(left, zeros.length)), zeros.length);
    if (trailer) to.conn.send({ op: 'trailer', sha256: '0'.repeat(64) });
    this.log.warn(
      { generation: to.gen?.number, bytes },
      'relay: final sync cut short; the rest was padded so the serving generation refuses it and keeps its connection',
    );
  }
}

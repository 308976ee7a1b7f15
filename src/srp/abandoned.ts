// A relay abandoned while its sender still owed an answer (docs/srp.md, "When a
// relay is abandoned"): the sender keeps its connection, which carries its state
// at the next reload. What still comes of the abandoned relay is read and
// dropped; a state whose rest stops arriving leaves the framing unknown, and its
// connection is closed.
import type { Logger } from '../log';
import type { Session, Transfer } from './session';

/** The relay `t` was abandoned while `s` (its sender, still serving) owed it an answer or the rest of a state. */
export function abandon(s: Session, t: Transfer, err: Error, log: Logger): void {
  const gen = s.gen!.number;
  const dump = t.final ? 'final dump' : 'dump';
  const owed =
    s.phase === 'dump-requested'
      ? `its answer to the ${dump}`
      : `the rest of its state (${t.sent} of ${t.total} bytes arrived)`;
  s.abandoned = { reason: err.message, since: new Date().toISOString(), stall: null, stallMs: t.timeoutMs };
  log.warn(
    { generation: gen, phase: s.phase, reason: err.message },
    `relay: generation ${gen}'s ${dump} was abandoned (${err.message}); ${owed} will be read and dropped, its relay connection stays for the next reload`,
  );
  watchAbandoned(s, log);
}

/** While the rest of an abandoned state is due, it must keep arriving: no byte for `stallMs` closes the connection. */
export function watchAbandoned(s: Session, log: Logger): void {
  const a = s.abandoned;
  if (!a || a.stall !== null || (s.phase !== 'streaming' && s.phase !== 'trailer' && s.phase !== 'direct')) return;
  a.stall = setTimeout(() => stallAbandoned(s, log), a.stallMs);
}

function stallAbandoned(s: Session, log: Logger): void {
  const a = s.abandoned!;
  a.stall = null;
  const gen = s.gen!.number;
  const owed =
    s.phase === 'streaming' ? `${s.conn.pendingData} bytes of its announced state` : `the digest trailer of its state`;
  const why =
    `${owed} did not arrive within ${a.stallMs} ms after its relay was abandoned at ${a.since} (${a.reason}); ` +
    `Aeterna closed the connection, whose framing it could no longer trust`;
  log.warn(
    { generation: gen, phase: s.phase },
    `relay: generation ${gen}: ${why}; the next reload starts its successor without its state, unless it connects again`,
  );
  s.conn.close(new Error(why));
}

/** What was left of an abandoned relay arrived (and was dropped): the connection is usable again. */
export function endAbandoned(s: Session, log: Logger): void {
  const a = s.abandoned;
  if (!a || s.phase !== 'idle') return;
  if (a.stall) clearTimeout(a.stall);
  s.abandoned = null;
  log.info(
    { generation: s.gen!.number },
    `relay: what was left of generation ${s.gen!.number}'s abandoned relay arrived and was dropped; its relay connection is usable again`,
  );
}

/** A connection closed: nothing more of its abandoned relay will come. */
export function forgetAbandoned(s: Session): void {
  if (s.abandoned?.stall) clearTimeout(s.abandoned.stall);
}

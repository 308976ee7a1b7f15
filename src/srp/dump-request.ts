// The dump that asks the old generation for its state, and what it offers: a digest trailer when the new
// generation takes one, crc32 instead of SHA-256 when both list it, a socket pair of their own for the state's
// bytes when both take the direct transport, and at a final sync a socket pair on which the old generation hands
// its client connections to the new one (docs/srp.md, "Checksums", "Direct transport", "Connection handoff").
import { native } from '../native/binding';
import type { Logger } from '../log';
import { closeQuietly } from './codec';
import type { Session, Transfer } from './session';

/** Send and receive buffers of a direct relay's socket pair: the sender keeps writing while the receiver hashes. */
const DIRECT_PAIR_BUFFER = 4 << 20;
/** The connection handoff channel's buffers: frames of a few hundred bytes, each with one fd. */
const HANDOFF_PAIR_BUFFER = 1 << 20;

/** Ask `from` for its state, for `t` (whose `final` and `timeoutMs` the dump tells); the SDK waits as long as Aeterna. */
export function requestDump(from: Session, to: Session, t: Transfer, log: Logger): void {
  const { final, timeoutMs } = t;
  // A digest trailer is offered only if the receiver can take one. A cheaper check than SHA-256 when both
  // generations can use it; not on a final sync, whose cut-short form must end in a trailer that can match nothing.
  t.checksumOffered =
    !final && to.takesTrailer && from.checksums.includes('crc32') && to.checksums.includes('crc32') ? 'crc32' : null;
  const trailer = to.takesTrailer
    ? { trailer: true as const, ...(t.checksumOffered ? { checksum: t.checksumOffered } : {}) }
    : {};
  const pair = directPair(from, to, final, log);
  const handoff = final && offerHandoff(from, to, log);
  if (handoff) {
    from.conn.send(
      { op: 'dump', final, timeout_ms: timeoutMs, ...trailer, handoff: true, fds: ['handoff'] },
      [handoff],
      {
        closeFds: true,
      },
    );
  } else if (pair) {
    // The sender's end goes with the dump and ours is closed once sent; the receiver's waits for the answer.
    t.directOffered = true;
    t.pair = pair[1];
    from.conn.send({ op: 'dump', final, timeout_ms: timeoutMs, ...trailer, direct: true, fds: ['direct'] }, [pair[0]], {
      closeFds: true,
    });
  } else {
    from.conn.send({ op: 'dump', final, timeout_ms: timeoutMs, ...trailer });
  }
  log.debug(
    {
      from: from.gen!.number,
      to: to.gen!.number,
      final,
      timeout_ms: timeoutMs,
      trailer: to.takesTrailer,
      direct: pair !== null,
      handoff,
      checksum: t.checksumOffered ?? 'sha256',
    },
    'relay: dump requested',
  );
}

/**
 * A socket pair for the state's bytes, when both generations said they take one: a first dump only (a final sync
 * that fails must keep the serving generation's connection in step, which Aeterna can only do with the bytes
 * passing through it). Null when not offered, or the pair cannot be made.
 */
function directPair(from: Session, to: Session, final: boolean, log: Logger): [number, number] | null {
  if (final || !from.takesDirect || !to.takesDirect || !to.takesTrailer) return null;
  try {
    return native.relayPair(DIRECT_PAIR_BUFFER);
  } catch (err) {
    log.warn(
      { err, from: from.gen!.number, to: to.gen!.number },
      'relay: no socket pair for the direct transport; the state passes through Aeterna',
    );
    return null;
  }
}

/**
 * At a final sync, when both generations take connection handoff: a socket pair, one end sent to the new
 * generation now (so it reads while the old one writes), the other returned for the old generation's final dump.
 * Aeterna keeps neither end. False when not offered, or the pair cannot be made (the old one then drains).
 */
function offerHandoff(from: Session, to: Session, log: Logger): number | false {
  if (!from.takesHandoff || !to.takesHandoff) return false;
  let pair: [number, number];
  try {
    pair = native.relayPair(HANDOFF_PAIR_BUFFER);
  } catch (err) {
    log.warn(
      { err, from: from.gen!.number, to: to.gen!.number },
      'relay: no socket pair for connection handoff; the old generation drains its connections instead',
    );
    return false;
  }
  to.conn.send({ op: 'handoff', fds: ['handoff'] }, [pair[1]], { closeFds: true });
  return pair[0];
}

/** The receiver's end of an offered pair that will not be passed on. */
export function closePair(t: Transfer): void {
  if (t.pair === null) return;
  closeQuietly(t.pair);
  t.pair = null;
}

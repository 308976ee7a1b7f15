// Refusing a connection on the state socket (a stranger, or a generation over its
// limits) on its raw fd, without ever wrapping it in a stream: Aeterna sends one
// small `error` frame and drops whatever the peer sends into one buffer shared by
// every refusal, so a refused peer costs an fd and a poller for at most
// REFUSAL_LINGER_MS, never a read buffer of its own, however much it sends and
// however many arrive at once (docs/srp.md, "1. Handshake").
import { native, READABLE, type Poller } from '../native/binding';
import { MAX_FDS_PER_FRAME, closeQuietly, type SrpErrorCode } from './codec';
import { encodeMessage } from './messages';
import { REFUSAL_LINGER_MS } from './connection';

/** Refused connections that linger at once; beyond this one is closed right after its error frame. */
export const MAX_LINGERING_REFUSALS = 64;
/** Reads per poll callback (and before an immediate close), so one flooding peer cannot starve the event loop. */
const READS_PER_TURN = 16;
/** Where every refused connection's bytes are read and dropped (the reads are synchronous: one buffer serves all). */
const DISCARD = Buffer.allocUnsafeSlow(64 << 10);

let lingering = 0;

/** Refused connections lingering now (for tests and status). */
export function lingeringRefusals(): number {
  return lingering;
}

/**
 * Answer `{"op":"error","code":...}` on `fd` (which this takes over) and close it: after up to REFUSAL_LINGER_MS
 * of dropping what arrives, so that a peer whose first frame crossed the refusal reads the error rather than a
 * broken pipe; at once when MAX_LINGERING_REFUSALS connections already linger.
 */
export function refuseConnection(fd: number, code: SrpErrorCode, message: string): void {
  try {
    native.sendmsg(fd, encodeMessage({ op: 'error', code, message }), []); // small: a fresh socket's buffer takes it whole
  } catch {
    // The peer is gone already: nothing to tell it.
  }
  if (lingering >= MAX_LINGERING_REFUSALS) {
    discardQueued(fd);
    closeQuietly(fd);
    return;
  }
  lingering += 1;
  let poller: Poller | null = null;
  const done = (): void => {
    if (poller === null) return;
    poller.close();
    poller = null;
    clearTimeout(timer);
    closeQuietly(fd);
    lingering -= 1;
  };
  const timer = setTimeout(done, REFUSAL_LINGER_MS);
  poller = new native.Poller(fd, (errno) => {
    if (errno !== 0 || discardQueued(fd) === 'end') done();
  });
  poller.start(READABLE);
}

/** Read and drop what is queued on `fd` (closing any fds that came with it): 'end' at end of file or an error. */
function discardQueued(fd: number): 'end' | 'more' {
  for (let i = 0; i < READS_PER_TURN; i++) {
    let got: { bytes: number; fds: number[] } | null;
    try {
      got = native.recvmsgInto(fd, DISCARD, MAX_FDS_PER_FRAME);
    } catch {
      return 'end';
    }
    if (got === null) return 'more'; // nothing more for now
    got.fds.forEach(closeQuietly);
    if (got.bytes === 0) return 'end';
  }
  return 'more';
}

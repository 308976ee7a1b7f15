// Accepting connections on a listening socket of Aeterna's own (the control
// socket, the state relay's socket) through the addon: each connection arrives
// as a raw fd, so the caller can check its peer's kernel credentials before a
// byte is read, and then wrap it (net.Socket) or speak on it directly.
// Never on the app's listeners: the poller makes the socket non-blocking for
// every process that holds it (see Poller in binding.ts).
import { native, READABLE, type Poller } from '../native/binding';
import type { Logger } from '../log';
import { LogThrottle } from '../log-throttle';
import { isFdExhaustion } from '../errors';

/** After accept failed (out of fds), how long to stop accepting: the pending connections wait in the backlog. */
const ACCEPT_PAUSE_MS = 100;
/**
 * Connections accepted per wakeup; the poll wakes us again for the rest. A full server makes room by closing
 * an idle connection for each new one, and that close completes only once the event loop turns: accepting a
 * whole backlog in one go would hold both, old and new, and a burst (clients that queued while Aeterna was
 * busy) would use up the fds a reload needs to read its config. So at most this many are over the budget.
 */
export const MAX_ACCEPTS_PER_WAKEUP = 4;

export class Acceptor {
  private readonly poller: Poller;
  private paused: NodeJS.Timeout | null = null;
  private closed = false;
  /** suspend()ed: the pause after fd exhaustion must not restart it. */
  private suspended = false;
  /** Out of fds, accept fails at every pause's end (10 a second): logged a few times a minute with a count. */
  private readonly failures: LogThrottle;

  /** Accept every connection on listening `fd` and hand it to `onConnection` (close-on-exec, non-blocking; the callee owns it). */
  constructor(
    private readonly fd: number,
    private readonly onConnection: (fd: number) => void,
    log: Logger,
    private readonly what: string,
  ) {
    this.failures = new LogThrottle(log);
    this.poller = new native.Poller(fd, (errno) =>
      errno === 0 ? this.acceptSome() : log.error({ errno }, `${what} poll error`),
    );
    this.poller.start(READABLE);
  }

  /** Stop accepting for good; does not close the listening fd. */
  close(): void {
    this.closed = true;
    if (this.paused) clearTimeout(this.paused);
    this.failures.flush();
    this.poller.close();
  }

  /** Stop accepting until resume(): new connections wait in the backlog (an upgrade hands the socket over with them). */
  suspend(): void {
    this.suspended = true;
    this.poller.stop();
  }

  resume(): void {
    this.suspended = false;
    if (!this.closed && !this.paused) this.poller.start(READABLE);
  }

  /** Accept what is queued, MAX_ACCEPTS_PER_WAKEUP at most. */
  private acceptSome(): void {
    for (let i = 0; i < MAX_ACCEPTS_PER_WAKEUP; i++) {
      let fd: number;
      try {
        fd = native.accept(this.fd);
      } catch (err) {
        this.failures.warn('accept', { err }, `${this.what}: accept failed`);
        // The connection stays queued and the poller would fire again at once: without fds, a busy loop.
        if (isFdExhaustion(err)) this.pause();
        return;
      }
      if (fd < 0) return;
      this.onConnection(fd);
    }
  }

  private pause(): void {
    this.poller.stop();
    this.paused = setTimeout(() => {
      this.paused = null;
      if (!this.closed && !this.suspended) this.poller.start(READABLE);
    }, ACCEPT_PAUSE_MS);
    this.paused.unref();
  }
}

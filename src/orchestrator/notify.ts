// The sd_notify endpoint (systemd's NOTIFY_SOCKET protocol), so unmodified apps
// that speak it can say READY=1. The socket carries SO_PASSCRED: each datagram
// comes with its sender's pid from the kernel, and the orchestrator only counts
// datagrams from the processes of the generation it is waiting for.
import crypto from 'node:crypto';
import { EventEmitter } from 'node:events';
import { native, READABLE, type Poller } from '../native/binding';
import type { Logger } from '../log';

/** sd_notify datagrams are short "KEY=VALUE\n..." texts; anything longer is cut here. */
const MAX_DATAGRAM = 4096;
/**
 * Datagrams read per wakeup. The socket is reachable by every process in the
 * network namespace (an abstract address has no file permissions): a flood
 * must not keep the event loop here; the poll wakes us again for the rest.
 */
const MAX_PER_WAKEUP = 256;
/**
 * Warnings about ignored datagrams: at most WARN_BURST per WARN_WINDOW_MS, the
 * rest are counted and summed up in one line, so a flood of garbage cannot
 * turn into a flood of PID 1's log lines (written synchronously to stderr).
 */
const WARN_BURST = 10;
const WARN_WINDOW_MS = 60_000;

export interface NotifyMessage {
  pid: number;
  uid: number;
  /** READY, STATUS, STOPPING, MAINPID, ... as sent. */
  fields: Map<string, string>;
}

/** Parse a datagram; null when it is not valid UTF-8 KEY=VALUE lines. */
export function parseNotify(data: Buffer): Map<string, string> | null {
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(data);
  } catch {
    return null;
  }
  const fields = new Map<string, string>();
  for (const line of text.split('\n')) {
    if (line === '') continue;
    const eq = line.indexOf('=');
    if (eq <= 0) return null;
    fields.set(line.slice(0, eq), line.slice(eq + 1));
  }
  return fields;
}

export class NotifySocket extends EventEmitter<{ message: [NotifyMessage] }> {
  private readonly poller: Poller;
  private warnWindowStart = 0;
  private warnings = 0;
  private suppressed = 0;
  /** Datagrams ignored so far (too long, or not KEY=VALUE lines). */
  ignored = 0;

  private constructor(
    /** The value for NOTIFY_SOCKET: an abstract address, so no file permissions stand between the app and it. */
    readonly address: string,
    private readonly fd: number,
    private readonly log: Logger,
  ) {
    super();
    this.poller = new native.Poller(fd, (errno) => (errno === 0 ? this.drain() : this.log.error({ errno }, 'notify socket poll error')));
    this.poller.start(READABLE);
  }

  static open(log: Logger): NotifySocket {
    const address = `@aeterna-notify-${process.pid}-${crypto.randomBytes(6).toString('hex')}`;
    return new NotifySocket(address, native.bindNotifySocket(address), log);
  }

  private drain(): void {
    for (let i = 0; i < MAX_PER_WAKEUP; i++) {
      let dgram;
      try {
        dgram = native.recvDatagram(this.fd, MAX_DATAGRAM + 1); // one byte more, to notice a cut datagram
      } catch (err) {
        this.warn({ err }, 'notify socket: receive failed');
        return;
      }
      if (dgram === null) return;
      if (dgram.data.length > MAX_DATAGRAM) {
        this.ignored++;
        this.warn({ sender: dgram.pid }, `notify socket: ignored a datagram longer than ${MAX_DATAGRAM} bytes`);
        continue;
      }
      const fields = parseNotify(dgram.data);
      if (fields === null) {
        this.ignored++;
        this.warn({ sender: dgram.pid }, 'notify socket: ignored a datagram that is not KEY=VALUE lines');
        continue;
      }
      this.emit('message', { pid: dgram.pid, uid: dgram.uid, fields });
    }
  }

  /** A rate-limited warning (see WARN_BURST). */
  private warn(fields: Record<string, unknown>, message: string): void {
    const now = Date.now();
    if (now - this.warnWindowStart >= WARN_WINDOW_MS) {
      this.flushSuppressed();
      this.warnWindowStart = now;
      this.warnings = 0;
    }
    if (this.warnings < WARN_BURST) {
      this.warnings++;
      this.log.warn(fields, message);
    } else {
      this.suppressed++;
    }
  }

  private flushSuppressed(): void {
    if (this.suppressed === 0) return;
    this.log.warn({ suppressed: this.suppressed }, `notify socket: ${this.suppressed} more ignored datagrams were not logged one by one (at most ${WARN_BURST} warnings a minute)`);
    this.suppressed = 0;
  }

  close(): void {
    this.flushSuppressed();
    this.poller.close();
    native.close(this.fd);
  }
}

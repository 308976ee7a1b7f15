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
    for (;;) {
      let dgram;
      try {
        dgram = native.recvDatagram(this.fd, MAX_DATAGRAM + 1); // one byte more, to notice a cut datagram
      } catch (err) {
        this.log.warn({ err }, 'notify socket: receive failed');
        return;
      }
      if (dgram === null) return;
      if (dgram.data.length > MAX_DATAGRAM) {
        this.log.warn({ sender: dgram.pid }, `notify socket: ignored a datagram longer than ${MAX_DATAGRAM} bytes`);
        continue;
      }
      const fields = parseNotify(dgram.data);
      if (fields === null) {
        this.log.warn({ sender: dgram.pid }, 'notify socket: ignored a datagram that is not KEY=VALUE lines');
        continue;
      }
      this.emit('message', { pid: dgram.pid, uid: dgram.uid, fields });
    }
  }

  close(): void {
    this.poller.close();
    native.close(this.fd);
  }
}

// The sd_notify endpoint (systemd's NOTIFY_SOCKET protocol), so unmodified apps
// that speak it can say READY=1 (and WATCHDOG=1, FDSTORE=1). The socket carries SO_PASSCRED: each datagram
// comes with its sender's pid from the kernel, and the orchestrator only counts
// datagrams from the processes of the generation it is waiting for.
//
// It is a path socket beside the control socket, mode 0600 and owned by the
// app's user: only that user (and root) can send to it. (An abstract address
// has no permissions: any process in the network namespace could flood it.)
import fs from 'node:fs';
import path from 'node:path';
import { EventEmitter } from 'node:events';
import { native, READABLE, type Poller } from '../native/binding';
import { resolveIdentity, type Identity } from '../supervisor/identity';
import type { Logger } from '../log';
import { LogThrottle } from '../log-throttle';
import { removeSocketFile, socketFileAt, type SocketFile } from './socket-file';

/** sd_notify datagrams are short "KEY=VALUE\n..." texts; anything longer is cut here. */
const MAX_DATAGRAM = 4096;
/**
 * Datagrams read per wakeup (one event-loop turn): a flood from the app's user
 * must not keep the event loop here; the poll wakes us again for the rest.
 */
const MAX_PER_WAKEUP = 256;

export interface NotifyMessage {
  pid: number;
  uid: number;
  /** READY, STATUS, STOPPING, MAINPID, ... as sent. */
  fields: Map<string, string>;
  /**
   * Takes the fds that came with the datagram (SCM_RIGHTS, close-on-exec): the taker owns them. Fds that no
   * listener takes are closed once the message has been handled. The second call gets [].
   */
  takeFds(): number[];
  /** The kernel dropped fds attached to the datagram (MSG_CTRUNC: Aeterna had no free fd, or more than 253 were sent). */
  fdsCut: boolean;
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
  private poller: Poller;
  /** The socket file as bound, to tell it from one created later (dev and ino -1: none was found at an upgrade). */
  private socketFile: SocketFile;
  /** Who owns the socket file, and so may send (with root). */
  private owner = { uid: process.getuid!(), gid: process.getgid!() };
  /**
   * Warnings about ignored datagrams, rate-limited (src/log-throttle.ts): a flood of garbage must not turn into a
   * flood of PID 1's log lines.
   */
  private readonly warnings: LogThrottle;
  /** Datagrams ignored so far (too long, or not KEY=VALUE lines). */
  ignored = 0;

  private constructor(
    /** The value for NOTIFY_SOCKET: the socket's path. */
    readonly address: string,
    private fd: number,
    private readonly log: Logger,
  ) {
    super();
    this.warnings = new LogThrottle(log);
    this.socketFile = existingSocketFile(address);
    this.poller = this.poll(fd);
  }

  private poll(fd: number): Poller {
    const poller = new native.Poller(fd, (errno) =>
      errno === 0 ? this.drain() : this.log.error({ errno }, 'notify socket poll error'),
    );
    poller.start(READABLE);
    return poller;
  }

  /** Bind at `socketPath` (mode 0600, Aeterna's own user; grant() hands it to the app's). A socket file left there is replaced. */
  static open(socketPath: string, log: Logger): NotifySocket {
    // The path derives from the control socket's, which already proved that no other daemon is alive.
    removeSocketAt(socketPath);
    return new NotifySocket(socketPath, native.bindNotifySocket(socketPath, 0o600), log);
  }

  /**
   * Bind a new socket at the same path: the file was deleted or replaced (see keepSocketFile in
   * resources/socket-file.ts), and a sender (sd_notify sends to the path each time) reaches this one from
   * its next datagram on. The old one's queued datagrams are read first, then it is closed. A non-socket
   * now at the path is never replaced (thrown).
   */
  rebind(): SocketFile {
    removeSocketAt(this.address);
    const fd = native.bindNotifySocket(this.address, 0o600);
    let file: SocketFile;
    try {
      file = socketFileAt(this.address);
      if (this.owner.uid !== process.getuid!() || this.owner.gid !== process.getgid!())
        fs.chownSync(this.address, this.owner.uid, this.owner.gid);
    } catch (err) {
      native.close(fd);
      throw err;
    }
    this.drain();
    this.poller.close();
    native.close(this.fd);
    this.fd = fd;
    this.socketFile = file;
    this.poller = this.poll(fd);
    return file;
  }

  /** The notify socket a re-executed Aeterna took over (aeterna upgrade); datagrams sent during the exec wait in it. */
  static adopt(socketPath: string, fd: number, log: Logger): NotifySocket {
    return new NotifySocket(socketPath, fd, log);
  }

  /** The socket file now (it changes when re-created). */
  get file(): SocketFile {
    return this.socketFile;
  }

  /** What an upgrade carries (upgrade/carried.ts): the socket, and its path. */
  carry(): { fds: Array<{ role: 'notify'; name: string; fd: number }>; part: { notify: string } } {
    return { fds: [{ role: 'notify', name: 'notify', fd: this.fd }], part: { notify: this.address } };
  }

  /**
   * Let the user the next generation runs as (service.user/group) send, before
   * it is spawned: the socket is chowned to that user (root, Aeterna's own user,
   * when none is set). A user that cannot be resolved is left to the spawn to report.
   */
  grant(service: { user?: string | number; group?: string | number }): void {
    let identity;
    try {
      identity = resolveIdentity(service.user, service.group);
    } catch {
      return;
    }
    const uid = identity?.uid ?? process.getuid!();
    const gid = identity?.gid ?? process.getgid!();
    if (uid === this.owner.uid && gid === this.owner.gid) return;
    try {
      fs.chownSync(this.address, uid, gid);
      this.owner = { uid, gid };
    } catch (err) {
      this.log.warn(
        { err, uid, gid },
        `notify socket: cannot hand ${this.address} to uid ${uid}; READY=1 from the app will not arrive`,
      );
      return;
    }
    const closed = identity === undefined ? null : unsearchableDirectory(path.dirname(this.address), identity);
    if (closed !== null) {
      this.log.warn(
        { uid, directory: closed },
        `notify socket: uid ${uid} (service.user) cannot enter ${closed}, so its READY=1 cannot reach ${this.address}; ` +
          `let it search that directory (chmod o+x) or move control.socket_path`,
      );
    }
  }

  /** Where the notify socket of the daemon whose control socket is `controlSocketPath` lives. */
  static pathFor(controlSocketPath: string): string {
    return `${controlSocketPath}.notify`;
  }

  private drain(): void {
    for (let i = 0; i < MAX_PER_WAKEUP; i++) {
      let dgram;
      try {
        // One byte more, to notice a cut datagram; fds are kept for the fd store (FDSTORE=1) and closed below otherwise.
        dgram = native.recvDatagram(this.fd, MAX_DATAGRAM + 1, true);
      } catch (err) {
        this.warn({ err }, 'notify socket: receive failed');
        return;
      }
      if (dgram === null) return;
      let fds = dgram.fds;
      try {
        if (dgram.fdsCut)
          this.warn(
            { sender: dgram.pid },
            'notify socket: the kernel dropped the fds attached to a datagram (more than 253, or Aeterna had no free fd); every one that arrived was closed',
          );
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
        const takeFds = (): number[] => {
          const taken = fds;
          fds = [];
          return taken;
        };
        this.emit('message', { pid: dgram.pid, uid: dgram.uid, fields, takeFds, fdsCut: dgram.fdsCut });
      } finally {
        for (const fd of fds) native.close(fd); // nobody kept them
      }
    }
  }

  /** A rate-limited warning about a datagram this socket could not use. */
  private warn(fields: Record<string, unknown>, message: string): void {
    this.warnings.warn('notify-datagram', fields, message);
  }

  close(): void {
    this.warnings.flush();
    this.poller.close();
    native.close(this.fd);
    removeSocketFile(this.socketFile); // never a file another process made there since
  }
}

/** Remove a socket file at socketPath (ours: the path derives from the control socket's); anything else there is refused. */
function removeSocketAt(socketPath: string): void {
  let stat: fs.Stats;
  try {
    stat = fs.lstatSync(socketPath);
  } catch {
    return; // nothing there
  }
  if (!stat.isSocket()) throw new Error(`${socketPath} exists and is not a socket`);
  fs.unlinkSync(socketPath);
}

/** The socket file at socketPath; dev and ino -1 when there is none (it matches no file, so it is re-created). */
function existingSocketFile(socketPath: string): SocketFile {
  try {
    if (fs.lstatSync(socketPath).isSocket()) return socketFileAt(socketPath);
  } catch {
    // none
  }
  return { path: socketPath, dev: -1, ino: -1 };
}

/** The first directory from `dir` up to / that `who` may not search (no x bit for it), or null. */
function unsearchableDirectory(dir: string, who: Identity): string | null {
  for (let at = dir; ; at = path.dirname(at)) {
    let stat: fs.Stats;
    try {
      stat = fs.statSync(at);
    } catch {
      return null; // cannot tell
    }
    const bit = stat.uid === who.uid ? 0o100 : stat.gid === who.gid || who.groups.includes(stat.gid) ? 0o010 : 0o001;
    if ((stat.mode & bit) === 0) return at;
    if (at === path.dirname(at)) return null;
  }
}

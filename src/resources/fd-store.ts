// systemd's fd store (FileDescriptorStoreMax=), for apps that already speak it:
// over sd_notify, FDSTORE=1 with fds attached parks them with Aeterna under
// FDNAME= (default "stored"), FDSTOREREMOVE=1 with FDNAME= closes them, and
// every later generation gets them after the listeners, in LISTEN_FDS and
// LISTEN_FDNAMES. Which senders may store is the orchestrator's decision (the
// processes of its generations); this module keeps the fds, enforces the limit
// and drops a stored socket that hangs up (unless FDPOLL=0), as systemd does.
import fs from 'node:fs';
import { native, READABLE, type Poller } from '../native/binding';
import type { Logger } from '../log';
import type { NotifyMessage } from './notify';
import type { PassedFd } from '../supervisor/environment';

/** The name systemd gives an fd stored without FDNAME=. */
export const DEFAULT_FDNAME = 'stored';
/** systemd's FDNAME_MAX. */
const FDNAME_MAX = 255;

/** Whether `name` may be an FDNAME=: as systemd's fdname_is_valid, ASCII without control characters or ":" (LISTEN_FDNAMES' separator). */
export function validFdName(name: string): boolean {
  return name.length > 0 && name.length <= FDNAME_MAX && /^[\x20-\x39\x3b-\x7e]+$/.test(name);
}

interface Entry extends PassedFd {
  /** Watched in the hangup set (a pollable fd stored without FDPOLL=0). */
  watched: boolean;
}

export class FdStore {
  private readonly entries: Entry[] = [];
  /** An epoll set of the stored sockets: it reports only their hangups and errors, and never changes their flags. */
  private readonly hangups: number;
  private readonly poller: Poller;

  constructor(
    private readonly log: Logger,
    /** Called with the number of stored fds whenever it changes (the aeterna_fdstore_fds gauge). */
    private readonly changed: (count: number) => void = () => undefined,
  ) {
    this.hangups = native.hangupSetCreate();
    this.poller = new native.Poller(this.hangups, (errno) => (errno === 0 ? this.dropHungUp() : this.log.error({ errno }, 'fd store: poll error')));
    this.poller.start(READABLE);
  }

  /** The stored fds, oldest first: what a new generation gets after its listeners. */
  list(): readonly PassedFd[] {
    return this.entries.map(({ name, fd }) => ({ name, fd }));
  }

  /** The stored fds with whether their hangups are watched: what an upgrade hands over. */
  handover(): Array<{ name: string; fd: number; watched: boolean }> {
    return this.entries.map(({ name, fd, watched }) => ({ name, fd, watched }));
  }

  /** Take over the fds a previous Aeterna stored (aeterna upgrade), in order. */
  adopt(entries: ReadonlyArray<{ name: string; fd: number; watched: boolean }>): void {
    for (const e of entries) this.add(e.name, e.fd, e.watched);
    if (entries.length > 0) this.changed(this.entries.length);
  }

  get size(): number {
    return this.entries.length;
  }

  /**
   * Act on a datagram's FDSTORE=1 or FDSTOREREMOVE=1 from a process allowed to use the store, with `max` the
   * limit (service.fdstore_max). Fds it does not keep are left in the message, which closes them.
   */
  handle(message: NotifyMessage, max: number, generation: number): void {
    const { fields, pid } = message;
    const named = fields.get('FDNAME');
    const context = { generation, sender: pid, fdname: named };
    if (fields.get('FDSTOREREMOVE') === '1') {
      if (named === undefined) return this.log.warn(context, 'fd store: FDSTOREREMOVE=1 without FDNAME=: nothing removed');
      const removed = this.remove(named);
      this.log.info({ ...context, removed }, `fd store: removed ${removed} fd(s) named "${named}"`);
      return;
    }
    if (fields.get('FDSTORE') !== '1') return;
    const fds = message.takeFds();
    try {
      if (fds.length === 0) return this.log.warn(context, 'fd store: FDSTORE=1 without fds attached: nothing stored');
      if (max === 0) return this.log.warn(context, `fd store: refused ${fds.length} fd(s) from pid ${pid}: service.fdstore_max is 0 (the fd store is off); they were closed`);
      let name = named ?? DEFAULT_FDNAME;
      if (!validFdName(name)) {
        // As systemd: an invalid name is ignored, the fds are stored under the default one.
        this.log.warn(context, `fd store: FDNAME=${JSON.stringify(name)} is not a valid name (1..255 ASCII characters, no control characters or ":"); storing as "${DEFAULT_FDNAME}"`);
        name = DEFAULT_FDNAME;
      }
      const poll = fields.get('FDPOLL') !== '0';
      let stored = 0;
      let already = 0;
      // systemd keeps one copy of each open file: the stored ones' identities, each fstat'ed once per message.
      const held = new Set(this.entries.map((e) => fileIdentity(e.fd)));
      while (fds.length > 0) {
        const identity = fileIdentity(fds[0]);
        if (held.has(identity)) {
          already++;
          native.close(fds.shift()!);
          continue;
        }
        if (this.entries.length >= max) break;
        this.add(name, fds.shift()!, poll);
        held.add(identity);
        stored++;
      }
      if (fds.length > 0) {
        this.log.warn(
          { ...context, refused: fds.length, stored, limit: max },
          `fd store: refused ${fds.length} fd(s) named "${name}" from pid ${pid}: the store is full (service.fdstore_max ${max}); they were closed`,
        );
      }
      if (stored > 0 || already > 0) this.log.info({ ...context, stored, already_stored: already, total: this.entries.length }, `fd store: stored ${stored} fd(s) named "${name}"`);
      if (stored > 0) this.changed(this.entries.length);
    } finally {
      for (const fd of fds) native.close(fd);
    }
  }

  /** Close every stored fd named `name`; returns how many. */
  remove(name: string): number {
    let removed = 0;
    for (let i = this.entries.length - 1; i >= 0; i--) {
      if (this.entries[i].name !== name) continue;
      this.release(this.entries.splice(i, 1)[0]);
      removed++;
    }
    if (removed > 0) this.changed(this.entries.length);
    return removed;
  }

  close(): void {
    this.poller.close();
    for (const entry of this.entries.splice(0)) this.release(entry);
    native.close(this.hangups);
  }

  private add(name: string, fd: number, poll: boolean): void {
    let watched = false;
    if (poll) {
      try {
        native.hangupSetAdd(this.hangups, fd);
        watched = true;
      } catch {
        // Not pollable (a memfd, a regular file): it cannot hang up.
      }
    }
    this.entries.push({ name, fd, watched });
  }

  private release(entry: Entry): void {
    if (entry.watched) native.hangupSetRemove(this.hangups, entry.fd); // before close: the app may hold the same socket
    native.close(entry.fd);
  }

  private dropHungUp(): void {
    const gone = new Set(native.hangupSetReady(this.hangups));
    if (gone.size === 0) return;
    for (let i = this.entries.length - 1; i >= 0; i--) {
      const entry = this.entries[i];
      if (!gone.has(entry.fd)) continue;
      this.entries.splice(i, 1);
      this.release(entry);
      this.log.info({ fdname: entry.name, total: this.entries.length }, `fd store: dropped a stored fd named "${entry.name}": its peer hung up or it reported an error (FDPOLL=0 keeps such fds)`);
    }
    this.changed(this.entries.length);
  }
}

/** The open file behind `fd`, as device and inode: two fds of one socket or memfd have the same. */
function fileIdentity(fd: number): string {
  const stat = fs.fstatSync(fd);
  return `${stat.dev}:${stat.ino}`;
}

// systemd's fd store (FileDescriptorStoreMax=), for apps that already speak it:
// over sd_notify, FDSTORE=1 with fds attached parks them with Aeterna under
// FDNAME= (default "stored"), FDSTOREREMOVE=1 with FDNAME= closes them, and
// every later generation gets them after the listeners, in LISTEN_FDS and
// LISTEN_FDNAMES. Which senders may store is the orchestrator's decision (the
// processes of its generations); this module keeps the fds, enforces the limit
// and drops a stored socket that hangs up (unless FDPOLL=0), as systemd does.
//
// With service.instances > 1 the store is one per instance number, as systemd's
// is one per unit: what a process of instance i stores goes to the later
// processes of instance i only, FDSTOREREMOVE=1 closes only instance i's, and
// service.fdstore_max bounds each instance's.
//
// The store counts against Aeterna's own fds: it never keeps more than the fd
// limit leaves after the fds Aeterna needs (fd-budget.ts), whatever
// service.fdstore_max says. An app may send as many datagrams as it likes, so
// each costs a bounded amount of work (no scan of the stored fds, no syscall per
// stored fd) and repeated lines are rate-limited (log-throttle.ts).
import fs from 'node:fs';
import { native, READABLE, type Poller } from '../native/binding';
import type { Logger } from '../log';
import { LogThrottle } from '../log-throttle';
import { fdLimit } from './fd-budget';
import type { NotifyMessage } from './notify';
import type { PassedFd } from '../app-env';

/** The name systemd gives an fd stored without FDNAME=. */
export const DEFAULT_FDNAME = 'stored';
/** systemd's FDNAME_MAX. */
const FDNAME_MAX = 255;
/**
 * Where the kernel cannot order open files (kcmp refused, as under a container's default seccomp profile), an
 * fd is compared with at most this many stored fds of the same inode (the most recent ones): eventfds, timerfds
 * and other anonymous fds all share one inode. Past that, it is taken as a new one.
 */
const MAX_SAME_INODE_COMPARISONS = 64;

/** Whether `name` may be an FDNAME=: as systemd's fdname_is_valid, ASCII without control characters or ":" (LISTEN_FDNAMES' separator). */
export function validFdName(name: string): boolean {
  return name.length > 0 && name.length <= FDNAME_MAX && /^[\x20-\x39\x3b-\x7e]+$/.test(name);
}

interface Entry extends PassedFd {
  /** The instance number (AETERNA_INSTANCE) whose processes get it. */
  instance: number;
  /** Watched in the hangup set (a pollable fd stored without FDPOLL=0). */
  watched: boolean;
  /** Its inode ("dev:ino"), where the index groups by inode; null otherwise. */
  inode: string | null;
}

/**
 * The stored fds by open file description, to tell whether an fd is one already stored: the same description
 * (a dup, or the same fd sent again) is stored once; distinct ones (two eventfds, the two ends of a pipe, two
 * opens of one file) are all kept, as systemd's same_fd does. Where kcmp works, the entries are sorted by the
 * kernel's order of their files and a lookup is a binary search; elsewhere they are grouped by inode.
 */
class OpenFileIndex {
  private readonly sorted: Entry[] = [];
  private readonly byInode = new Map<string, Entry[]>();

  constructor(private readonly ordered: boolean) {}

  /** The inode key an entry for `fd` carries (fstat once, only where the index groups by inode). */
  inodeOf(fd: number): string | null {
    if (this.ordered) return null;
    const stat = fs.fstatSync(fd);
    return `${stat.dev}:${stat.ino}`;
  }

  /** The stored entry sharing `fd`'s open file description, or undefined. */
  find(fd: number, inode: string | null): Entry | undefined {
    if (this.ordered) {
      const at = this.search(fd);
      return at.found ? this.sorted[at.index] : undefined;
    }
    const bucket = this.byInode.get(inode!) ?? [];
    for (let i = bucket.length - 1; i >= Math.max(0, bucket.length - MAX_SAME_INODE_COMPARISONS); i--) {
      if (native.compareOpenFiles(bucket[i].fd, fd) === 0) return bucket[i];
    }
    return undefined;
  }

  add(entry: Entry): void {
    if (this.ordered) {
      this.sorted.splice(this.search(entry.fd).index, 0, entry);
      return;
    }
    const bucket = this.byInode.get(entry.inode!);
    if (bucket) bucket.push(entry);
    else this.byInode.set(entry.inode!, [entry]);
  }

  /** Forget `entry` (before its fd is closed). No syscall. */
  delete(entry: Entry): void {
    const list = this.ordered ? this.sorted : this.byInode.get(entry.inode!);
    const at = list?.indexOf(entry) ?? -1;
    if (at >= 0) list!.splice(at, 1);
    if (!this.ordered && list?.length === 0) this.byInode.delete(entry.inode!);
  }

  /** Binary search by the kernel's order: where `fd`'s description is (found), or would go. */
  private search(fd: number): { index: number; found: boolean } {
    let low = 0;
    let high = this.sorted.length;
    while (low < high) {
      const mid = (low + high) >>> 1;
      const order = native.compareOpenFiles(this.sorted[mid].fd, fd);
      if (order === 0) return { index: mid, found: true };
      if (order === -1) low = mid + 1;
      else high = mid;
    }
    return { index: low, found: false };
  }
}

/** One instance number's stored fds. */
class InstanceFds {
  /** Oldest first (a Set keeps insertion order and deletes in O(1)). */
  readonly entries = new Set<Entry>();
  readonly byName = new Map<string, Set<Entry>>();

  constructor(readonly index: OpenFileIndex) {}
}

/** A stored fd as an upgrade carries it; `instance` only where it is not 0 (a handover from one instance is unchanged). */
export interface CarriedStoredFd {
  name: string;
  fd: number;
  watched: boolean;
  instance?: number;
}

export class FdStore {
  private readonly instances = new Map<number, InstanceFds>();
  /** Every stored fd, oldest first, over all instances. */
  private readonly entries = new Set<Entry>();
  private readonly byFd = new Map<number, Entry>();
  /** Whether the kernel orders open files here (kcmp), for each instance's index. */
  private readonly ordered: boolean;
  /** An epoll set of the stored sockets: it reports only their hangups and errors, and never changes their flags. */
  private readonly hangups: number;
  private readonly poller: Poller;
  private readonly throttle: LogThrottle;
  /** The soft RLIMIT_NOFILE, for messages (read once: when Aeterna is out of fds, /proc cannot be read). */
  private readonly rlimit = String(fdLimit()).replace('Infinity', 'unlimited');
  /** The service.fdstore_max last warned about as not fitting the fd budget (warned once per value). */
  private warnedMax: number | null = null;

  constructor(
    private readonly log: Logger,
    /** Called with the number of stored fds whenever it changes (the aeterna_fdstore_fds gauge). */
    private readonly changed: (count: number) => void = () => undefined,
    /** How many fds the fd limit leaves for the store, all instances together (fdStoreBudget()). */
    private readonly budget: number = Infinity,
  ) {
    this.throttle = new LogThrottle(log);
    this.hangups = native.hangupSetCreate();
    this.ordered = native.openFilesOrdered(this.hangups);
    this.poller = new native.Poller(this.hangups, (errno) =>
      errno === 0 ? this.dropHungUp() : this.log.error({ errno }, 'fd store: poll error'),
    );
    this.poller.start(READABLE);
  }

  /** Instance `instance`'s stored fds, oldest first: what its next process gets after its listeners. */
  list(instance = 0): readonly PassedFd[] {
    return [...(this.instances.get(instance)?.entries ?? [])].map(({ name, fd }) => ({ name, fd }));
  }

  /** The names of instance `instance`'s stored fds, oldest first (status). */
  names(instance = 0): string[] {
    return [...(this.instances.get(instance)?.entries ?? [])].map((e) => e.name);
  }

  /** What an upgrade carries (upgrade/carried.ts): the stored fds, oldest first, with whether their hangups are watched. */
  carry(): {
    fds: Array<{ role: 'fdstore'; name: string; fd: number }>;
    part: { fdstore: CarriedStoredFd[] };
  } {
    const fdstore = [...this.entries].map(({ name, fd, watched, instance }) =>
      instance === 0 ? { name, fd, watched } : { name, fd, watched, instance },
    );
    return { fds: fdstore.map((f) => ({ role: 'fdstore', name: f.name, fd: f.fd })), part: { fdstore } };
  }

  /** Take over the fds a previous Aeterna stored (aeterna upgrade), in order. */
  adopt(entries: ReadonlyArray<CarriedStoredFd>): void {
    for (const e of entries) {
      const instance = this.of(e.instance ?? 0);
      this.add(instance, e.instance ?? 0, e.name, e.fd, e.watched, instance.index.inodeOf(e.fd));
    }
    if (entries.length > 0) this.changed(this.entries.size);
  }

  /** Every stored fd, all instances together. */
  get size(): number {
    return this.entries.size;
  }

  /**
   * How many fds the store may hold with service.fdstore_max `max`: `max`, or less when the fd limit leaves less
   * room. The first time a `max` does not fit, a warning names both numbers (called at start, and at each store).
   */
  limit(max: number): number {
    if (max <= this.budget) return max;
    if (this.warnedMax !== max) {
      this.warnedMax = max;
      this.log.warn(
        { fdstore_max: max, effective_fdstore_max: this.budget },
        `fd store: service.fdstore_max ${max} does not fit Aeterna's fd limit (RLIMIT_NOFILE ${this.rlimit}): after the fds Aeterna holds and needs for ` +
          `its control socket, metrics, relay and spawns, it leaves room for ${this.budget} stored fd(s); the store keeps at most ${this.budget} ` +
          '(raise the fd limit, ulimit -n, or lower service.fdstore_max)',
      );
    }
    return this.budget;
  }

  /**
   * Act on a datagram's FDSTORE=1 or FDSTOREREMOVE=1 from a process of instance `instanceNumber` allowed to use the
   * store, with `max` the limit per instance (service.fdstore_max). Fds it does not keep are left in the message,
   * which closes them.
   */
  handle(message: NotifyMessage, max: number, generation: number, instanceNumber = 0): void {
    const { fields, pid } = message;
    const named = fields.get('FDNAME');
    const context = {
      generation,
      ...(instanceNumber > 0 ? { instance: instanceNumber } : {}),
      sender: pid,
      fdname: named,
    };
    if (fields.get('FDSTOREREMOVE') === '1') {
      if (named === undefined)
        return this.throttle.warn(
          'fdstore-remove-unnamed',
          context,
          'fd store: FDSTOREREMOVE=1 without FDNAME=: nothing removed',
        );
      const removed = this.remove(named, instanceNumber);
      if (removed === 0)
        this.throttle.info(
          'fdstore-remove-unknown',
          context,
          `fd store: FDSTOREREMOVE=1 for "${named}": no fd of that name is stored`,
        );
      else
        this.throttle.info(
          'fdstore-removed',
          { ...context, removed, total: this.entries.size },
          `fd store: removed ${removed} fd(s) named "${named}"`,
        );
      return;
    }
    if (fields.get('FDSTORE') !== '1') return;
    const fds = message.takeFds();
    try {
      if (fds.length === 0) {
        // MSG_CTRUNC: the kernel attached no fd it could not install here (out of fds, or over SCM_MAX_FD).
        if (message.fdsCut)
          return this.throttle.warn(
            'fdstore-fds-lost',
            context,
            `fd store: FDSTORE=1 from pid ${pid} arrived without its fds: the kernel dropped them ` +
              `(more than 253 in one datagram, or Aeterna had no free fd, RLIMIT_NOFILE ${this.rlimit}); nothing stored`,
          );
        return this.throttle.warn(
          'fdstore-no-fds',
          context,
          'fd store: FDSTORE=1 without fds attached: nothing stored',
        );
      }
      if (max === 0)
        return this.throttle.warn(
          'fdstore-off',
          context,
          `fd store: refused ${fds.length} fd(s) from pid ${pid}: service.fdstore_max is 0 (the fd store is off); they were closed`,
        );
      let name = named ?? DEFAULT_FDNAME;
      if (!validFdName(name)) {
        // As systemd: an invalid name is ignored, the fds are stored under the default one.
        this.throttle.warn(
          'fdstore-bad-name',
          context,
          `fd store: FDNAME=${JSON.stringify(name)} is not a valid name ` +
            `(1..255 ASCII characters, no control characters or ":"); storing as "${DEFAULT_FDNAME}"`,
        );
        name = DEFAULT_FDNAME;
      }
      const limit = this.limit(max);
      const instance = this.of(instanceNumber);
      const poll = fields.get('FDPOLL') !== '0';
      let stored = 0;
      let already = 0;
      // As systemd: a full store refuses before comparing (so a flood at the limit costs no syscall per fd). Each
      // instance may keep service.fdstore_max; all instances together stay within the fd budget.
      while (fds.length > 0 && instance.entries.size < limit && this.entries.size < this.budget) {
        const fd = fds.shift()!;
        const inode = instance.index.inodeOf(fd);
        if (instance.index.find(fd, inode) !== undefined) {
          already++; // the same open file description again (the app re-stores what it was passed): kept once
          native.close(fd);
          continue;
        }
        this.add(instance, instanceNumber, name, fd, poll, inode);
        stored++;
      }
      if (fds.length > 0) {
        const why =
          this.entries.size >= this.budget
            ? `the fd limit leaves room for ${this.budget} stored fd(s)${this.instances.size > 1 ? ', all instances together' : ''} ` +
              `(service.fdstore_max ${max}, RLIMIT_NOFILE ${this.rlimit})`
            : `the store is full (service.fdstore_max ${max})`;
        this.throttle.warn(
          'fdstore-full',
          { ...context, refused: fds.length, stored, limit },
          `fd store: refused ${fds.length} fd(s) named "${name}" from pid ${pid}: ${why}; they were closed`,
        );
      }
      if (stored > 0 || already > 0) {
        this.throttle.info(
          'fdstore-stored',
          { ...context, stored, already_stored: already, total: this.entries.size },
          `fd store: stored ${stored} fd(s) named "${name}"${already > 0 ? ` (${already} already stored)` : ''}`,
        );
      }
      if (stored > 0) this.changed(this.entries.size);
    } finally {
      for (const fd of fds) native.close(fd);
    }
  }

  /** FDSTORE=1 or FDSTOREREMOVE=1 from `pid`, which is no process of a running generation: its fds are closed with the message. */
  refuseStranger(pid: number): void {
    this.throttle.warn(
      'fdstore-stranger',
      { sender: pid },
      `fd store: ignored FDSTORE/FDSTOREREMOVE from pid ${pid}, which is not a process of a running generation; its fds were closed`,
    );
  }

  /**
   * FDSTORE=1 from a retiring process of instance `instance`, which a promoted reload left out (service.instances
   * is now `count`): no later process would get its fds, so they are closed with the message.
   */
  refuseBeyond(pid: number, instance: number, count: number): void {
    this.throttle.warn(
      'fdstore-beyond',
      { sender: pid, instance },
      `fd store: ignored FDSTORE/FDSTOREREMOVE from pid ${pid} of instance ${instance}: service.instances is now ${count}, ` +
        'so no later process of that instance gets stored fds; its fds were closed',
    );
  }

  /** Close every fd instance `instance` stored under `name`; returns how many. */
  remove(name: string, instance = 0): number {
    const named = this.instances.get(instance)?.byName.get(name);
    if (named === undefined) return 0;
    const removed = named.size;
    for (const entry of [...named]) this.release(entry);
    this.changed(this.entries.size);
    return removed;
  }

  /** At a promotion to `count` instances: close what instances `count` and up stored (nothing would get it again). */
  keepInstances(count: number): number {
    const beyond = [...this.entries].filter((e) => e.instance >= count);
    for (const entry of beyond) this.release(entry);
    if (beyond.length > 0) this.changed(this.entries.size);
    return beyond.length;
  }

  close(): void {
    this.poller.close();
    for (const entry of [...this.entries]) this.release(entry);
    this.throttle.flush();
    native.close(this.hangups);
  }

  /** Instance `number`'s fds, made on first use. */
  private of(number: number): InstanceFds {
    let instance = this.instances.get(number);
    if (instance === undefined) {
      instance = new InstanceFds(new OpenFileIndex(this.ordered));
      this.instances.set(number, instance);
    }
    return instance;
  }

  private add(
    instance: InstanceFds,
    instanceNumber: number,
    name: string,
    fd: number,
    poll: boolean,
    inode: string | null,
  ): void {
    let watched = false;
    if (poll) {
      try {
        native.hangupSetAdd(this.hangups, fd);
        watched = true;
      } catch {
        // Not pollable (a memfd, a regular file): it cannot hang up.
      }
    }
    const entry: Entry = { name, fd, watched, inode, instance: instanceNumber };
    this.entries.add(entry);
    instance.entries.add(entry);
    this.byFd.set(fd, entry);
    const named = instance.byName.get(name);
    if (named) named.add(entry);
    else instance.byName.set(name, new Set([entry]));
    instance.index.add(entry);
  }

  /** Forget `entry` and close its fd. */
  private release(entry: Entry): void {
    const instance = this.instances.get(entry.instance)!;
    instance.index.delete(entry); // while its fd is open: the ordered index compares with it
    instance.entries.delete(entry);
    this.entries.delete(entry);
    this.byFd.delete(entry.fd);
    const named = instance.byName.get(entry.name)!;
    named.delete(entry);
    if (named.size === 0) instance.byName.delete(entry.name);
    if (instance.entries.size === 0) this.instances.delete(entry.instance);
    if (entry.watched) native.hangupSetRemove(this.hangups, entry.fd); // before close: the app may hold the same socket
    native.close(entry.fd);
  }

  private dropHungUp(): void {
    let dropped = 0;
    for (const fd of native.hangupSetReady(this.hangups)) {
      const entry = this.byFd.get(fd);
      if (entry === undefined) continue;
      this.release(entry);
      dropped++;
      this.throttle.info(
        'fdstore-dropped',
        { fdname: entry.name, total: this.entries.size },
        `fd store: dropped a stored fd named "${entry.name}": its peer hung up or it reported an error (FDPOLL=0 keeps such fds)`,
      );
    }
    if (dropped > 0) this.changed(this.entries.size);
  }
}

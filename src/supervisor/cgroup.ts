// One cgroup (v2) per generation, where the machine lets Aeterna create them.
// A process can leave its process group and session (setsid) and rewrite its
// environment, but it cannot leave its cgroup without the right to write to
// another cgroup's cgroup.procs: so a cgroup is what attributes every process
// of a generation, daemonized ones included, and what ends them all at once.
//
// Layout: <Aeterna's own cgroup>/aeterna-<pid>-<random>/gen-<n>. Every exit
// Aeterna controls removes them (a crash it cannot recover from too: see
// removeAllNow); the directories of an Aeterna that died of SIGKILL are removed
// by the next one started in the same cgroup, once empty. Aeterna stays
// in its own cgroup and never enables a controller anywhere, so cgroup v2's
// no-internal-process rule cannot bite. Where the hierarchy is missing or not
// writable (read-only mount, no permission), `Cgroups.open` says why and the
// caller falls back to process group, session and AETERNA_GENERATION.
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { signalIfAlive } from './signal';

/** The generation cgroups alive now, by their path in the hierarchy (as /proc/<pid>/cgroup shows it). */
const liveGroups = new Set<string>();

/** A process's cgroup v2 path ("0::/path" in /proc/<pid>/cgroup), or null when unknown. */
export function cgroupOf(pid: number | 'self'): string | null {
  try {
    const line = fs
      .readFileSync(`/proc/${pid}/cgroup`, 'utf8')
      .split('\n')
      .find((l) => l.startsWith('0::'));
    return line === undefined ? null : line.slice(3);
  } catch {
    return null;
  }
}

/** The generation cgroup that pid is in (one Aeterna made and that is still alive), or null. */
export function generationCgroupOf(pid: number): string | null {
  const group = cgroupOf(pid);
  return group !== null && liveGroups.has(group) ? group : null;
}

/** Where the cgroup2 hierarchy is mounted, and which of its directories that mount shows. */
export function cgroup2Mount(mountinfo: string): { mountPoint: string; root: string } | null {
  for (const line of mountinfo.split('\n')) {
    const [mount, fsPart] = line.split(' - ');
    if (fsPart === undefined || fsPart.split(' ')[0] !== 'cgroup2') continue;
    const fields = mount.split(' ');
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    const unescape = (s: string): string =>
      s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
    return { root: unescape(fields[3]), mountPoint: unescape(fields[4]) };
  }
  return null;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Block for ms (only on the way out, when the event loop will not turn again). */
function sleepSync(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

/** The names of the directories Aeterna makes: its own (Cgroups.open) and a generation's. */
const AETERNA_DIR = /^aeterna-(\d+)-[0-9a-f]{8}$/;
const GENERATION_DIR = /^gen-\d+(-i\d+(-\d+)?)?$/;

/** Whether no process is in the cgroup at `dir` or below it (cgroup.events "populated 0"). */
function unpopulated(dir: string): boolean {
  try {
    return /^populated 0$/m.test(fs.readFileSync(path.join(dir, 'cgroup.events'), 'utf8'));
  } catch {
    return false;
  }
}

/**
 * Remove what an Aeterna that died without cleaning up (SIGKILL) left in `parentDir`: directories named as
 * Aeterna names them, holding nothing but generation cgroups, with no process in any. One whose pid is an
 * Aeterna alive in this cgroup is left alone. A live Aeterna's directory that is empty for a moment (between two
 * generations) may be taken too: Cgroups.create makes it again. Returns the directories removed.
 */
export function removeDeadAeternaDirs(parentDir: string, parentGroup: string): string[] {
  let names: string[];
  try {
    names = fs.readdirSync(parentDir);
  } catch {
    return [];
  }
  const removed: string[] = [];
  for (const name of names) {
    const m = AETERNA_DIR.exec(name);
    if (m === null) continue;
    const pid = Number(m[1]);
    if (pid !== process.pid && cgroupOf(pid) === parentGroup) continue; // an Aeterna beside this one, alive
    const dir = path.join(parentDir, name);
    if (!unpopulated(dir)) continue;
    try {
      const children = fs.readdirSync(dir, { withFileTypes: true }).filter((e) => e.isDirectory());
      if (!children.every((e) => GENERATION_DIR.test(e.name))) continue; // not only what Aeterna makes there
      for (const child of children) fs.rmdirSync(path.join(dir, child.name)); // EBUSY if a process joined since
      fs.rmdirSync(dir);
      removed.push(dir);
    } catch {
      // busy, or not ours to judge: left as it is
    }
  }
  return removed;
}

/** One generation's cgroup. */
export class GenerationCgroup {
  constructor(
    /** Its path in the hierarchy, as in /proc/<pid>/cgroup. */
    readonly group: string,
    /** Its directory in the file system. */
    readonly dir: string,
  ) {
    liveGroups.add(group);
  }

  /** cgroup.procs opened for writing, close-on-exec (Node's default), for the child to join: see SpawnOptions.cgroupProcsFd. */
  openProcs(): number {
    return fs.openSync(path.join(this.dir, 'cgroup.procs'), 'w');
  }

  /** The pids in it now. */
  pids(): number[] {
    try {
      return fs.readFileSync(path.join(this.dir, 'cgroup.procs'), 'utf8').split('\n').filter(Boolean).map(Number);
    } catch {
      return [];
    }
  }

  /** SIGKILL everything in it: cgroup.kill (Linux 5.14+) in one step, else each pid it lists now. */
  kill(): void {
    try {
      fs.writeFileSync(path.join(this.dir, 'cgroup.kill'), '1');
      return;
    } catch {
      // no cgroup.kill on this kernel: one pid at a time
    }
    for (const pid of this.pids()) signalIfAlive(pid, os.constants.signals.SIGKILL);
  }

  /** Kill what is in it and remove it once empty (a killed process leaves it as it exits). Resolves false when it stayed busy. */
  async remove(attempts = 250): Promise<boolean> {
    for (let i = 0; i < attempts; i++) {
      this.kill();
      try {
        fs.rmdirSync(this.dir);
        liveGroups.delete(this.group);
        return true;
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === 'ENOENT') {
          liveGroups.delete(this.group);
          return true;
        }
        if (code !== 'EBUSY') return false;
      }
      await sleep(20);
    }
    return false;
  }
}

/** This process's cgroup: its path in the hierarchy and its directory; throws an Error saying why cgroups cannot be used. */
export function ownCgroup(): { group: string; dir: string } {
  let mountinfo: string;
  try {
    mountinfo = fs.readFileSync('/proc/self/mountinfo', 'utf8');
  } catch (err) {
    throw new Error(`cannot read /proc/self/mountinfo (${(err as NodeJS.ErrnoException).code})`);
  }
  const mount = cgroup2Mount(mountinfo);
  if (mount === null) throw new Error('no cgroup2 file system is mounted');
  const own = cgroupOf('self');
  if (own === null) throw new Error('/proc/self/cgroup has no cgroup v2 entry');
  const root = mount.root === '/' ? '' : mount.root;
  if (own !== root && !own.startsWith(`${root}/`)) {
    throw new Error(`Aeterna's cgroup ${own} is outside the cgroup2 mount at ${mount.mountPoint}`);
  }
  return { group: own, dir: path.join(mount.mountPoint, own.slice(root.length)) };
}

/** The cgroups of this Aeterna: a directory of its own below its cgroup, with one cgroup per generation in it. */
export class Cgroups {
  private readonly generations = new Set<GenerationCgroup>();
  /** Why generations no longer get cgroups, once one could not be created or joined. */
  private failure: string | null = null;

  private constructor(
    readonly group: string,
    readonly dir: string,
    private readonly onFallBack: (reason: string) => void,
    /** The directories of dead Aeternas removed when this one opened (see removeDeadAeternaDirs). */
    readonly swept: string[] = [],
  ) {}

  /**
   * Create this Aeterna's directory; throws an Error saying why cgroups cannot be used here. `onFallBack` is
   * told (once) if a generation's cgroup later cannot be created or joined after all.
   */
  static open(onFallBack: (reason: string) => void): Cgroups {
    const own = ownCgroup();
    const swept = removeDeadAeternaDirs(own.dir, own.group);
    // pid and a random part: as PID 1 every Aeterna is pid 1, and containers may share a hierarchy.
    const name = `aeterna-${process.pid}-${crypto.randomBytes(4).toString('hex')}`;
    const group = path.posix.join(own.group, name);
    const dir = path.join(own.dir, name);
    try {
      fs.mkdirSync(dir, { mode: 0o755 });
    } catch (err) {
      throw new Error(`cannot create ${dir} (${(err as NodeJS.ErrnoException).code})`);
    }
    return new Cgroups(group, dir, onFallBack, swept);
  }

  /**
   * Take over the directory a previous Aeterna program of this process made (`aeterna upgrade`, a recovery: the
   * handover names it), so the generations it holds stay attributed and it is removed at exit. Throws when that
   * directory is not below this process's own cgroup any more, or is gone.
   */
  static adopt(dir: string, onFallBack: (reason: string) => void): Cgroups {
    const own = ownCgroup();
    const name = path.basename(dir);
    if (path.join(own.dir, name) !== dir || !name.startsWith('aeterna-'))
      throw new Error(`${dir} is not a directory of this Aeterna below ${own.dir}`);
    if (!fs.statSync(dir, { throwIfNoEntry: false })?.isDirectory()) throw new Error(`${dir} is gone`);
    return new Cgroups(path.posix.join(own.group, name), dir, onFallBack);
  }

  /** What an upgrade carries (upgrade/carried.ts): this directory, below which the generations' cgroups are. */
  carry(): { fds: never[]; part: { cgroups: string } } {
    return { fds: [], part: { cgroups: this.dir } };
  }

  /** The cgroup of a generation handed over with it (see adopt), or null when it is not one of this directory's. */
  adoptGeneration(dir: string): GenerationCgroup | null {
    if (path.dirname(dir) !== this.dir || !fs.statSync(dir, { throwIfNoEntry: false })?.isDirectory()) return null;
    const cgroup = new GenerationCgroup(path.posix.join(this.group, path.basename(dir)), dir);
    this.generations.add(cgroup);
    return cgroup;
  }

  /**
   * A fresh cgroup for instance `instance` of generation `number` (gen-<n> for instance 0, gen-<n>-i<i> for the
   * others, with -<k> when an instance restarted alone finds its predecessor's not yet removed), or null once
   * cgroups have failed here. One per instance: when an instance's root exits, what is left of it is killed
   * with its cgroup, and its sibling instances go on serving.
   */
  create(number: number, instance = 0): GenerationCgroup | null {
    if (this.failure !== null) return null;
    const base = instance === 0 ? `gen-${number}` : `gen-${number}-i${instance}`;
    let name = base;
    let dir = path.join(this.dir, name);
    try {
      // This Aeterna's directory too: another Aeterna starting beside it may have taken it while it was empty.
      fs.mkdirSync(this.dir, { mode: 0o755, recursive: true });
      for (let k = 1; ; k++) {
        try {
          fs.mkdirSync(dir, { mode: 0o755 });
          break;
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code !== 'EEXIST' || k > 64) throw err;
          name = `gen-${number}-i${instance}-${k}`;
          dir = path.join(this.dir, name);
        }
      }
    } catch (err) {
      this.fallBack(`cannot create ${dir} (${(err as NodeJS.ErrnoException).code})`);
      return null;
    }
    const cgroup = new GenerationCgroup(path.posix.join(this.group, name), dir);
    this.generations.add(cgroup);
    return cgroup;
  }

  /** From now on generations get no cgroup: say why, once. */
  fallBack(reason: string): void {
    if (this.failure !== null) return;
    this.failure = reason;
    this.onFallBack(reason);
  }

  /** Kill and remove one generation's cgroup (its root has exited). */
  async release(cgroup: GenerationCgroup): Promise<boolean> {
    const removed = await cgroup.remove();
    if (removed) this.generations.delete(cgroup);
    return removed;
  }

  /** Kill everything in every generation's cgroup now (Aeterna is exiting abnormally). */
  killAll(): void {
    for (const cgroup of this.generations) cgroup.kill();
  }

  /**
   * Aeterna is dying (a crash it cannot recover from, a recovery loop): kill everything in the generations'
   * cgroups and remove them and this Aeterna's directory, waiting at most `graceMs` for the killed processes
   * to leave (a zombie does not keep a cgroup busy). Synchronous: the event loop will not turn again.
   */
  removeAllNow(graceMs = 2000): boolean {
    this.killAll();
    const deadline = Date.now() + graceMs;
    for (;;) {
      for (const cgroup of [...this.generations]) {
        try {
          fs.rmdirSync(cgroup.dir);
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code !== 'ENOENT') continue;
        }
        liveGroups.delete(cgroup.group);
        this.generations.delete(cgroup);
      }
      if (this.generations.size === 0) {
        try {
          fs.rmdirSync(this.dir);
          return true;
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code === 'ENOENT') return true;
        }
      }
      if (Date.now() >= deadline) return false;
      sleepSync(10);
    }
  }

  /** At exit: remove every generation's cgroup (killing what is left) and this Aeterna's directory. */
  async close(): Promise<void> {
    for (const cgroup of [...this.generations]) await this.release(cgroup);
    try {
      fs.rmdirSync(this.dir);
    } catch {
      // still busy, or already gone: nothing more to do at exit
    }
  }
}

/** Where openCgroups says which process attribution is in use (Aeterna's logger). */
export interface AttributionLog {
  info(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
}

/**
 * One cgroup per generation where possible (`enabled`: service.cgroups); says once which attribution is in use.
 * `handed`: the directory a re-exec handed over, taken over when it still can be.
 */
export function openCgroups(enabled: boolean, handed: string | null, log: AttributionLog): Cgroups | null {
  const fallback =
    'process attribution: process group, session and AETERNA_GENERATION (a daemon that leaves all three survives reloads until Aeterna exits)';
  if (!enabled) {
    log.info({ cgroups: false }, `${fallback}: service.cgroups is false`);
    return null;
  }
  const onFallBack = (reason: string): void => log.warn({ cgroups: false }, `${fallback} from now on: ${reason}`);
  if (handed !== null) {
    try {
      const cgroups = Cgroups.adopt(handed, onFallBack);
      log.info(
        { cgroups: true, cgroup: cgroups.group },
        `process attribution: one cgroup per generation below ${cgroups.dir} (taken over)`,
      );
      return cgroups;
    } catch (err) {
      log.warn(
        { err: (err as Error).message },
        `cannot take over the cgroups of the previous program: ${(err as Error).message}; a new directory for the next generations`,
      );
    }
  }
  try {
    const cgroups = Cgroups.open(onFallBack);
    log.info(
      { cgroups: true, cgroup: cgroups.group },
      `process attribution: one cgroup per generation below ${cgroups.dir}`,
    );
    if (cgroups.swept.length > 0)
      log.info(
        { removed: cgroups.swept },
        `removed ${cgroups.swept.length} empty cgroup director${cgroups.swept.length === 1 ? 'y' : 'ies'} left by an Aeterna that died without cleaning up`,
      );
    return cgroups;
  } catch (err) {
    log.warn({ cgroups: false }, `${fallback}: cgroups unavailable: ${(err as Error).message}`);
    return null;
  }
}

// Reloads on file change (orchestration.watch). inotify (fs.watch) watches the
// directories that hold the watched paths, not the files: a watch on a file's
// inode misses a rename over it and the symlink swap of a Kubernetes ConfigMap
// volume (`aeterna.yaml -> ..data/aeterna.yaml`, with `..data` re-pointed by a
// rename). So each path P is seen through:
//   - its directory, for events naming P or the first step of P's symlink (`..data`);
//   - P itself when it is a directory: any change of an entry in it;
//   - the directory of P's real path, for writes to the file a symlink points at.
// A path that does not exist is watched for through its deepest existing
// ancestor; it reloads when it appears. A burst of events becomes one reload
// after `debounce` of quiet (or, for changes that never pause, after ten debounces, 5 s at least); at that moment the watches are set up again (a
// swap replaces the directories they were on). A reload already in progress
// queues exactly one more, started when that reload's outcome is final.
// Aeterna's own files (its sockets, the checkpoint file and its temporary
// files, the runtime directory) never trigger a reload, even in a watched
// directory: a checkpoint written every second would reload every second.
import fs from 'node:fs';
import path from 'node:path';
import { AeternaError } from '../errors';
import type { Config, WatchConfig } from '../config/types';
import type { Logger } from '../log';

/** Whether a path is one of Aeterna's own files (src/own-files.ts): never a watch trigger. */
export type OwnFile = (file: string) => boolean;

/** Which names in a watched directory matter to which watched paths; null: every name. */
interface Subscription {
  target: string;
  names: Set<string> | null;
}

/** A burst of changes that never pauses for `debounce` reloads after this many debounces (5 s at least) all the same. */
const MAX_BURST_FACTOR = 10;
const MIN_MAX_BURST_MS = 5000;

export class FileWatch {
  private config: WatchConfig | null = null;
  private own: OwnFile = () => false;
  /** One inotify watch per directory, whatever the number of paths seen through it. */
  private readonly watchers = new Map<string, fs.FSWatcher>();
  private readonly subscriptions = new Map<string, Subscription[]>();
  /** Watched paths that did not exist at the last setup: their appearance is logged. */
  private readonly missing = new Set<string>();
  /** Watched paths with an event since the last reload. */
  private readonly changed = new Set<string>();
  private debounce: NodeJS.Timeout | null = null;
  /** When the current burst began: a burst that never pauses still reloads after MAX_BURST_FACTOR debounces. */
  private burstSince = 0;
  private queuedStart: NodeJS.Immediate | null = null;
  /** A change arrived while a reload was in progress: one more reload when it settles. */
  private queued = false;
  private closed = false;

  /** `reload` starts a reload (trigger "watch") or throws AeternaError E_RELOAD_BUSY / E_ILLEGAL_TRANSITION. */
  constructor(
    private readonly reload: () => void,
    private readonly log: Logger,
    /** Aeterna's own files under a config: never a change (src/own-files.ts). */
    private readonly ownFilesOf: (config: Config) => OwnFile = () => () => false,
  ) {}

  /**
   * Watch what `config` says (null: nothing), never reloading for a change of one of `own` (Aeterna's own
   * files: see ownFiles); called at start and with the config of each settled reload.
   */
  apply(config: WatchConfig | null, own: OwnFile = () => false): void {
    this.own = own;
    if (this.closed || JSON.stringify(config) === JSON.stringify(this.config)) return;
    this.config = config;
    this.missing.clear();
    this.arm();
    if (config)
      this.log.info(
        { watch: config.paths, debounce_ms: config.debounceMs },
        `watching ${config.paths.length} path(s) for changes: a change reloads`,
      );
  }

  /** A reload's outcome is final: follow the config now in effect, then start the queued reload, if any. */
  reloadSettled(config: Config): void {
    this.apply(config.orchestration.watch, this.ownFilesOf(config));
    if (!this.queued || this.closed || this.queuedStart) return;
    // Not from inside the orchestrator's own call: it may still have work after the outcome.
    this.queuedStart = setImmediate(() => {
      this.queuedStart = null;
      this.queued = false;
      this.startReload('queued change');
    });
  }

  /** Stop watching for good: every watch and timer ends here (PID 1 runs on). */
  close(): void {
    this.closed = true;
    this.suspend();
  }

  /** Stop watching until the next apply() (an upgrade in progress, which goes on as before if its exec fails). */
  suspend(): void {
    this.config = null;
    this.queued = false;
    this.disarm();
    if (this.debounce) clearTimeout(this.debounce);
    if (this.queuedStart) clearImmediate(this.queuedStart);
    this.debounce = null;
    this.queuedStart = null;
  }

  private disarm(): void {
    for (const watcher of this.watchers.values()) watcher.close();
    this.watchers.clear();
    this.subscriptions.clear();
  }

  /** (Re)create the watches for the paths as they are now. */
  private arm(): void {
    this.disarm();
    if (!this.config || this.closed) return;
    for (const target of this.config.paths) {
      for (const [dir, names] of this.viewsOf(target)) {
        const list = this.subscriptions.get(dir) ?? [];
        list.push({ target, names });
        this.subscriptions.set(dir, list);
      }
    }
    for (const dir of this.subscriptions.keys()) this.watchDirectory(dir);
  }

  /** The directories `target` is seen through, each with the names in it that matter (null: all). */
  private viewsOf(target: string): Array<[string, Set<string> | null]> {
    let stat: fs.Stats;
    try {
      stat = fs.statSync(target);
    } catch {
      const ancestor = existingAncestor(target);
      if (!this.missing.has(target)) {
        this.missing.add(target);
        this.log.warn(
          { watch: target },
          `watched path ${target} does not exist (now): watching ${ancestor.dir} until it appears; its appearance reloads`,
        );
      }
      return [[ancestor.dir, new Set([ancestor.next])]];
    }
    if (this.missing.delete(target)) this.log.info({ watch: target }, `watched path ${target} appeared`);
    const names = new Set([path.basename(target)]);
    const link = symlinkFirstStep(target);
    if (link !== null) names.add(link);
    const views: Array<[string, Set<string> | null]> = [[path.dirname(target), names]];
    if (stat.isDirectory()) views.push([target, null]);
    const real = realPath(target);
    if (real !== null && real !== target && !stat.isDirectory())
      views.push([path.dirname(real), new Set([path.basename(real)])]);
    return views;
  }

  private watchDirectory(dir: string): void {
    let watcher: fs.FSWatcher;
    try {
      watcher = fs.watch(dir, { persistent: true }, (_event, name) =>
        this.onEvent(dir, name === null ? null : String(name)),
      );
    } catch (err) {
      // ENOSPC: out of inotify watches (fs.inotify.max_user_watches); ENOENT: gone since we looked.
      this.log.warn(
        { watch: dir, err: (err as Error).message },
        `cannot watch ${dir}: ${(err as Error).message}; changes there are not seen until the next reload`,
      );
      return;
    }
    // A watched directory removed or unmounted: set up again after the burst.
    watcher.on('error', () => this.onEvent(dir, null));
    this.watchers.set(dir, watcher);
  }

  private onEvent(dir: string, name: string | null): void {
    if (this.closed || !this.config) return;
    if (name !== null && this.own(path.join(dir, name))) return; // Aeterna's own file: its own doing
    let hit = false;
    for (const sub of this.subscriptions.get(dir) ?? []) {
      if (sub.names === null || name === null || sub.names.has(name)) {
        this.changed.add(sub.target);
        hit = true;
      }
    }
    if (!hit) return;
    const now = performance.now();
    if (this.debounce) clearTimeout(this.debounce);
    else this.burstSince = now;
    const left = Math.max(MIN_MAX_BURST_MS, MAX_BURST_FACTOR * this.config.debounceMs) - (now - this.burstSince);
    this.debounce = setTimeout(() => this.settle(), Math.max(0, Math.min(this.config.debounceMs, left)));
  }

  /** The burst is over: watch the paths as they are now, and reload for those that exist. */
  private settle(): void {
    this.debounce = null;
    const changed = [...this.changed];
    this.changed.clear();
    this.arm();
    const present = changed.filter((target) => !this.missing.has(target));
    // A path that disappeared has nothing to reload to; arm() logged it, and its return reloads.
    if (present.length === 0) return;
    this.startReload(present.join(', '));
  }

  private startReload(what: string): void {
    if (this.closed) return;
    try {
      this.log.info({ watch: what }, `watched change (${what}): reloading`);
      this.reload();
    } catch (err) {
      if (err instanceof AeternaError && err.code === 'E_RELOAD_BUSY') {
        if (!this.queued)
          this.log.info({ watch: what }, 'watched change during a reload: one more reload queued for when it ends');
        this.queued = true;
      } else {
        this.log.warn(
          { watch: what, code: (err as AeternaError).code },
          `watched change not reloaded: ${(err as Error).message}`,
        );
      }
    }
  }
}

/** The deepest existing directory on the way to `target`, and the name below it that leads on. */
function existingAncestor(target: string): { dir: string; next: string } {
  let next = path.basename(target);
  let dir = path.dirname(target);
  while (dir !== path.dirname(dir)) {
    try {
      if (fs.statSync(dir).isDirectory()) break;
    } catch {
      // not there either: one level up
    }
    next = path.basename(dir);
    dir = path.dirname(dir);
  }
  return { dir, next };
}

/** For a symlink with a relative target, the target's first step in the same directory (`..data`), else null. */
function symlinkFirstStep(target: string): string | null {
  try {
    const link = fs.readlinkSync(target);
    if (path.isAbsolute(link)) return null;
    const first = link.split('/').find((step) => step !== '' && step !== '.');
    return first === undefined || first === '..' ? null : first;
  } catch {
    return null; // not a symlink
  }
}

function realPath(target: string): string | null {
  try {
    return fs.realpathSync(target);
  } catch {
    return null;
  }
}

// The file of a Unix stream socket Aeterna listens on (the control socket, the
// state relay's socket, unix listeners), through its whole life: making the
// path free (its directory created, a stale file of a dead process taken over,
// a live one or a non-socket refused), creating the socket with its mode,
// telling it from a file created later at the same path, noticing that it was
// deleted or replaced (and re-creating it: keepSocketFile), and removing it
// only while it is still Aeterna's.
import fs from 'node:fs';
import path from 'node:path';
import { native } from '../native/binding';
import type { Logger } from '../log';

/** How often each socket file Aeterna owns is checked (and re-created when deleted or replaced). */
export const SOCKET_FILE_CHECK_MS = 2_000;

/** A socket file as created: enough to tell it from a file created later at the same path. */
export interface SocketFile {
  path: string;
  dev: number;
  ino: number;
}

/** Why a socket path cannot be used; the message names the path. */
export type SocketPathProblem = 'directory' | 'inspect' | 'not-a-socket' | 'live' | 'probe';

export class SocketPathError extends Error {
  constructor(
    readonly problem: SocketPathProblem,
    readonly path: string,
    message: string,
    options?: { cause: unknown },
  ) {
    super(message, options);
  }
}

/** Whether `stat` (an lstat of the path) is still this socket file. */
export function isSameSocketFile(stat: fs.Stats, file: SocketFile): boolean {
  return stat.isSocket() && stat.dev === file.dev && stat.ino === file.ino;
}

/**
 * Make socketPath free for a new socket: create its directory (mode 0755) when
 * `createDirectory`; remove a stale socket file, one that nobody listens on (a
 * process that died left it). Throws SocketPathError when something listens
 * there, when the path is not a socket, or when it cannot be looked at.
 * Returns whether a stale file was removed.
 */
export function claimSocketPath(socketPath: string, createDirectory: boolean): { removedStale: boolean } {
  if (createDirectory) {
    const dir = path.dirname(socketPath);
    try {
      fs.mkdirSync(dir, { recursive: true, mode: 0o755 });
    } catch (err) {
      throw new SocketPathError(
        'directory',
        socketPath,
        `cannot create the directory ${dir}: ${(err as Error).message}`,
        { cause: err },
      );
    }
  }
  let stat: fs.Stats;
  try {
    stat = fs.lstatSync(socketPath);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { removedStale: false };
    throw new SocketPathError('inspect', socketPath, `cannot inspect ${socketPath}: ${(err as Error).message}`, {
      cause: err,
    });
  }
  if (!stat.isSocket())
    throw new SocketPathError('not-a-socket', socketPath, `${socketPath} exists and is not a socket`);
  try {
    native.close(native.connectUnix(socketPath));
  } catch (err) {
    const errno = (err as NodeJS.ErrnoException).code;
    // Only a refused connection means that nobody listens: the file outlived its process.
    if (errno === 'ECONNREFUSED' || errno === 'ENOENT') {
      fs.rmSync(socketPath, { force: true });
      return { removedStale: true };
    }
    // EAGAIN: its listen backlog is full, so something is listening.
    if (errno !== 'EAGAIN')
      throw new SocketPathError('probe', socketPath, `cannot probe ${socketPath}: ${(err as Error).message}`, {
        cause: err,
      });
  }
  throw new SocketPathError('live', socketPath, `another process accepts on ${socketPath}`);
}

/**
 * Create a listening Unix stream socket at socketPath (free: see claimSocketPath).
 * The addon gives the file its mode before listen(), so no other user can
 * connect to a freshly bound, still world-accessible file. Errors are the addon's (errno codes).
 */
export function listenSocketFile(socketPath: string, backlog: number, mode: number): { fd: number; file: SocketFile } {
  const fd = native.listenUnix(socketPath, backlog, mode);
  try {
    const { dev, ino } = fs.statSync(socketPath);
    return { fd, file: { path: socketPath, dev, ino } };
  } catch (err) {
    native.close(fd);
    throw err;
  }
}

/** The socket file now at socketPath (just bound by Aeterna), to tell it from a file created later. */
export function socketFileAt(socketPath: string): SocketFile {
  const { dev, ino } = fs.statSync(socketPath);
  return { path: socketPath, dev, ino };
}

/** Remove the socket file, unless it is no longer Aeterna's (deleted, or another process created its own there). */
export function removeSocketFile(file: SocketFile): void {
  try {
    if (isSameSocketFile(fs.lstatSync(file.path), file)) fs.unlinkSync(file.path);
  } catch {
    // already gone
  }
}

/** What became of a watched socket file. */
export type SocketFileLoss = 'deleted' | 'replaced';

export interface SocketFileWatchHandlers {
  /** Make a new socket at the same path (claim it first); resolves with its file. */
  recreate(loss: SocketFileLoss): Promise<SocketFile>;
  recreated(loss: SocketFileLoss): void;
  /** Re-creating failed; called again on a later attempt only when the message differs. */
  failed(loss: SocketFileLoss, err: unknown): void;
}

/**
 * Watch a socket file: a tmp cleaner or an operator's rm can delete it while
 * the socket still listens, leaving the socket unreachable by its path. A cheap
 * periodic lstat() notices it, and `recreate` makes a new one at the same path.
 */
export class SocketFileWatch {
  private readonly timer: NodeJS.Timeout;
  private recreating = false;
  private stopped = false;
  private lastProblem: string | null = null;

  constructor(
    private file: SocketFile,
    intervalMs: number,
    private readonly handlers: SocketFileWatchHandlers,
  ) {
    this.timer = setInterval(() => void this.check(), intervalMs);
    this.timer.unref();
  }

  stop(): void {
    this.stopped = true;
    clearInterval(this.timer);
  }

  private async check(): Promise<void> {
    if (this.recreating || this.stopped) return;
    let now: fs.Stats | null = null;
    try {
      now = fs.lstatSync(this.file.path);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') return; // cannot tell: look again next time
    }
    if (now !== null && isSameSocketFile(now, this.file)) {
      this.lastProblem = null;
      return;
    }
    const loss: SocketFileLoss = now === null ? 'deleted' : 'replaced';
    this.recreating = true;
    try {
      const file = await this.handlers.recreate(loss);
      if (this.stopped) return;
      this.file = file;
      this.lastProblem = null;
      this.handlers.recreated(loss);
    } catch (err) {
      const message = (err as Error).message;
      if (message !== this.lastProblem) this.handlers.failed(loss, err);
      this.lastProblem = message;
    } finally {
      this.recreating = false;
    }
  }
}

export interface KeptSocketFile {
  /** What the socket is, for the log: "control socket", "state relay socket", "notify socket". */
  what: string;
  /** What does not work while the file cannot be re-created, for the error line. */
  consequence: string;
  /**
   * Bind a new socket at the same path and make it the one the owner serves (and hands over at an upgrade);
   * it claims the path first, so a path that became another process's, or a non-socket, is refused (thrown).
   */
  recreate(): SocketFile;
  intervalMs?: number;
}

/**
 * The one mechanism every socket file Aeterna owns (control, state relay, notify) is kept with: checked every
 * SOCKET_FILE_CHECK_MS, re-created at the same path when deleted or replaced (the generations' environment
 * names the path, so it must not change), with a warning; a failure is logged once per distinct reason and
 * retried at each check. stop() it before the owner closes (and removes) its socket.
 */
export function keepSocketFile(file: SocketFile, kept: KeptSocketFile, log: Logger): SocketFileWatch {
  return new SocketFileWatch(file, kept.intervalMs ?? SOCKET_FILE_CHECK_MS, {
    recreate: async () => kept.recreate(),
    recreated: (loss) => {
      log.warn(
        { socket: file.path },
        `the ${kept.what} file ${file.path} was ${loss === 'deleted' ? 'deleted' : 'replaced by a stale socket'} while the daemon ran; re-created it`,
      );
    },
    failed: (loss, err) => {
      log.error(
        { socket: file.path, code: (err as { code?: string }).code },
        `the ${kept.what} file ${file.path} was ${loss} and cannot be re-created: ${(err as Error).message}; ${kept.consequence} until it is`,
      );
    },
  });
}

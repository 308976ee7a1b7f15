// The typed face of the C++ addon (native/: aeterna.cc, spawn.cc). The addon does only what
// Node cannot: exact fd placement at fork/exec, subreaping, reaping without
// racing libuv, SCM_RIGHTS, peer credentials, memfd. Every decision (policy,
// timeouts, protocol) stays in TypeScript.
//
// Every function reports a failure the same way: it throws an ordinary Error
// with `code` set to the errno name (e.g. 'EADDRINUSE', 'ENOENT', 'ESRCH') and
// `syscall` set to the call that failed (e.g. 'bind', 'execve', 'kill'), like
// Node's own system errors; a bad argument is a TypeError or RangeError.

import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { AeternaError } from '../errors';

/** How a reaped process ended: exactly one of code/signal is non-null. */
export interface ExitInfo {
  pid: number;
  /** Exit status when the process exited normally. */
  code: number | null;
  /** Signal number when the process was killed by a signal. */
  signal: number | null;
}

export interface SpawnOptions {
  /** Full argv; argv[0] is the program. Without a '/', it is searched in the PATH of `env`. */
  argv: string[];
  /** The complete environment of the child, as KEY=VALUE strings. */
  env: string[];
  /** Working directory of the child; unset = Aeterna's own. */
  cwd?: string;
  /** fds placed at 3, 4, ... in this order. Every other fd >= 3 is closed at exec. */
  fds: number[];
  /** fds that become the child's 0, 1, 2; default: Aeterna's own 0, 1, 2. A listener may be both 0 and in `fds` (service.stdin_listener). */
  stdio?: [number, number, number];
  /** Append LISTEN_PID=<the child's own pid> to env (filled in after fork). */
  listenPid: boolean;
  /** More variables set to the child's own pid, as LISTEN_PID is (WATCHDOG_PID). */
  pidEnv?: string[];
  /** Drop to this uid/gid in the child before exec. Pass `groups` whenever `uid` is set: otherwise Aeterna's own supplementary groups stay. */
  uid?: number;
  gid?: number;
  groups?: number[];
  /**
   * An open (close-on-exec) cgroup.procs of a cgroup v2 the child joins first thing after fork, by writing "0".
   * Failing that, spawn throws with syscall 'write' and nothing runs.
   */
  cgroupProcsFd?: number;
}

/** The result of one non-blocking recvmsg. */
export interface Received {
  /** Bytes read; length 0 means the peer closed (EOF). */
  data: Buffer;
  /** fds that arrived with SCM_RIGHTS (close-on-exec); the caller owns them. */
  fds: number[];
}

/** Credentials of a Unix socket's peer (SO_PEERCRED) or of a datagram's sender (SCM_CREDENTIALS). */
export interface Credentials {
  pid: number;
  uid: number;
  gid: number;
}

export interface Datagram extends Credentials {
  data: Buffer;
  /** fds that arrived with SCM_RIGHTS (close-on-exec), when the caller asked to keep them; the caller owns them. */
  fds: number[];
  /** More fds were attached than fit: every one that arrived was closed. */
  fdsCut: boolean;
}

/** Poll events, as bits. */
export const READABLE = 1;
export const WRITABLE = 2;

/**
 * Watches a raw fd on libuv's loop (uv_poll). The callback gets an errno (0 = ok) and the ready events.
 * libuv sets O_NONBLOCK on the fd's open file description, which every process holding it shares:
 * never put a Poller on a listener that the app inherits.
 */
export interface Poller {
  start(events: number): void;
  stop(): void;
  /** Stops watching for good; does not close the fd. */
  close(): void;
}

export interface Binding {
  /** socket(AF_INET/AF_INET6, SOCK_STREAM|SOCK_CLOEXEC) + SO_REUSEADDR + bind + listen. Port 0 picks a free port. */
  /** `reusePort`: bind with SO_REUSEPORT, so `listenBeside` can add sockets to its group (the weighted canary). */
  listenTcp(host: string, port: number, backlog: number, reusePort?: boolean): { fd: number; port: number };
  /** A new listener in the SO_REUSEPORT group of `fd`, at the address `fd` is bound to (close-on-exec). */
  listenBeside(fd: number, backlog: number): number;
  /** Attach or atomically replace the classic BPF program (sock_filter entries, 8 bytes each) of fd's SO_REUSEPORT group. */
  attachReuseportProgram(fd: number, program: Buffer): void;
  /** Connections waiting in a TCP listener's accept queue (TCP_INFO). */
  acceptQueueLength(fd: number): number;
  /** shutdown(fd, SHUT_RDWR): the listener stops for every process holding it and leaves its reuseport group. */
  shutdownListener(fd: number): void;
  /** socket(AF_UNIX, SOCK_STREAM|SOCK_CLOEXEC) + bind + chmod(mode) + listen. A stale socket file is not removed here. */
  listenUnix(path: string, backlog: number, mode: number): number;

  /** fork/exec with exact fd placement. Returns the child's pid; throws when exec (or cwd, setuid...) failed in the child. */
  spawn(options: SpawnOptions): number;

  /** prctl(PR_SET_CHILD_SUBREAPER, 1). */
  setChildSubreaper(): void;
  /** waitpid(-1, WNOHANG) until nothing is left to reap. Never blocks. */
  reapAll(): ExitInfo[];
  /** kill(pid, signal); a negative pid is a process group. Throws ESRCH when there is nothing to signal (see supervisor/signal.ts). */
  kill(pid: number, signal: number): void;

  /** Non-blocking connect to a Unix stream socket; the fd is close-on-exec and non-blocking. */
  connectUnix(path: string): number;
  /** socketpair(AF_UNIX, SOCK_STREAM|SOCK_CLOEXEC), blocking, both ends with send/receive buffers of bufferBytes (the direct relay's pair). */
  relayPair(bufferBytes: number): [number, number];
  /**
   * pipe2(O_CLOEXEC) for the app's stdout or stderr: [read end (non-blocking, Aeterna's), write end (blocking, for
   * the child's fd 1 or 2)]; both close-on-exec.
   */
  outputPipe(): [number, number];
  /** Non-blocking accept4(SOCK_CLOEXEC|SOCK_NONBLOCK); -1 when no connection is waiting. */
  accept(fd: number): number;
  /** Non-blocking sendmsg of data with fds attached (SCM_RIGHTS). Returns bytes sent, or -1 on EAGAIN. */
  sendmsg(fd: number, data: Buffer, fds: number[]): number;
  /**
   * Non-blocking recvmsg into the caller's buffer (no allocation): bytes read (0 = EOF) and fds (close-on-exec);
   * null on EAGAIN. A truncated control message closes every fd that arrived and throws (code 'ECTRUNC').
   */
  recvmsgInto(fd: number, buffer: Buffer, maxFds: number): { bytes: number; fds: number[] } | null;
  /** SO_PEERCRED of a connected Unix socket. */
  peerCred(fd: number): Credentials;

  /**
   * A Unix datagram socket bound at path with SO_PASSCRED (for sd_notify); close-on-exec and non-blocking.
   * A path socket's file gets `mode` (default 0600) before anyone can send to it.
   */
  bindNotifySocket(path: string, mode?: number): number;
  /**
   * One datagram with its sender's credentials; null on EAGAIN. Attached fds are closed unless keepFds. A datagram
   * longer than maxBytes is cut: pass one byte more than the limit to notice.
   */
  recvDatagram(fd: number, maxBytes: number, keepFds?: boolean): Datagram | null;

  /** An epoll set (close-on-exec) that reports only hangups and errors of its members; watch its fd with a Poller. */
  hangupSetCreate(): number;
  /** Watch fd for POLLHUP/POLLERR without touching its flags; throws EPERM when fd cannot be polled (a memfd, a file). */
  hangupSetAdd(set: number, fd: number): void;
  /** Stop watching fd; call before closing it. */
  hangupSetRemove(set: number, fd: number): void;
  /** The members that hung up or failed, without waiting. */
  hangupSetReady(set: number): number[];

  /** memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING). */
  memfdCreate(name: string): number;
  /** fcntl(F_ADD_SEALS): seal a memfd against shrink, grow and write. */
  sealMemfd(fd: number): void;
  /** fcntl(F_GET_SEALS). */
  getSeals(fd: number): number;

  /** Mark an fd close-on-exec (for sockets Aeterna inherited through LISTEN_FDS). */
  setCloexec(fd: number): void;
  /** Clear close-on-exec on an fd (so that an execve keeps it). */
  clearCloexec(fd: number): void;
  /**
   * Replace this process's program (same pid, same children): clears close-on-exec on `keep` right before
   * execve(path, argv, env); every other fd closes. Returns only on failure: throws (syscall 'execve', or
   * 'fcntl'), and `keep` is close-on-exec again. `hold`: SIGTERM, SIGINT and SIGHUP are blocked right before the
   * exec, so one that arrives stays pending until the new program (started with this addon preloaded, see
   * native/hold.cc) calls releaseHeldSignals().
   */
  execve(path: string, argv: string[], env: string[], keep: number[], hold?: boolean): never;
  /**
   * What a fatal signal (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT) does from now on: a handler (on its own stack)
   * clears close-on-exec on `keep` and calls execve(path, argv, env). The first call installs the handler; each
   * call replaces the previous exec (the caller keeps `keep` open until it is replaced).
   */
  prepareFatalSignalExec(path: string, argv: string[], env: string[], keep: number[], hold?: boolean): void;
  /** A re-executed Aeterna's stop handlers exist: the stop signals held across its exec (and any pending one) go through. */
  releaseHeldSignals(): void;
  /**
   * Hold (true) or let through (false) SIGTERM, SIGINT and SIGHUP: held, one that arrives stays pending in this
   * thread, whichever thread caught it, across an execve too (native/hold.h). Before Aeterna's own exec: a signal
   * libuv caught just before is still delivered to its handler in the next turn of the loop, every later one waits
   * for the new program.
   */
  holdStopSignals(on: boolean): void;
  /** A fatal signal kills the process again (the handler finds nothing prepared). */
  clearFatalSignalExec(): void;
  /** Whether fd is a listening socket (SO_ACCEPTCONN). */
  isListeningSocket(fd: number): boolean;
  /** listen(fd, backlog) on an existing socket (revives a TCP listener that an app's shutdown(2) put back to CLOSE). */
  listen(fd: number, backlog: number): void;
  /** Whether the socket was shut down for reading (poll reports POLLRDHUP or POLLHUP); never accepts. */
  isReadShutdown(fd: number): boolean;
  /** close(fd). */
  close(fd: number): void;
  /**
   * Whether fds a and b share one open file description (as systemd's same_fd): 0 when they do; -1 or 1 when
   * not, in an order that stays the same while both are open (kcmp); 2 when not and no order is known (kcmp
   * refused: then F_DUPFD_QUERY, or else same inode, not a device, same status flags). Throws when one is not open.
   */
  compareOpenFiles(a: number, b: number): -1 | 0 | 1 | 2;
  /** Whether compareOpenFiles orders (kcmp works here); `fd` is any open fd to probe with. */
  openFilesOrdered(fd: number): boolean;

  /** getpwnam: uid, primary gid and supplementary groups of a user name; null when unknown. */
  lookupUser(name: string): { uid: number; gid: number; groups: number[] } | null;
  /** getgrnam: gid of a group name; null when unknown. */
  lookupGroup(name: string): number | null;

  Poller: new (fd: number, callback: (errno: number, events: number) => void) => Poller;

  /** Only Aeterna's tests use these; Aeterna itself never does. */
  test: TestOnlyBinding;
}

/** Functions of the addon that only tests use: to make socket pairs and read what the code under test sent. */
export interface TestOnlyBinding {
  /** socketpair(AF_UNIX, SOCK_STREAM), both ends close-on-exec and non-blocking. */
  socketpair(): [number, number];
  /**
   * Non-blocking recvmsg of up to maxBytes and maxFds fds; null on EAGAIN. A truncated control message closes every
   * fd that arrived and throws (code 'ECTRUNC').
   */
  recvmsg(fd: number, maxBytes: number, maxFds: number): Received | null;
}

// Loading. The addon is loaded on first use, not on import: the commands that do not need it (--help, --version,
// validate, and the client commands) run where it is missing or broken, and the ones that do need it fail with
// E_ADDON_UNAVAILABLE and the fix instead of a stack trace.

/** The package's root: node-gyp-build looks for prebuilds/ and build/Release there. */
const ROOT = path.join(__dirname, '..', '..', '..');
/** The name of the addon's asset in the self-contained build (scripts/standalone.ts embeds it). */
export const EMBEDDED_ADDON_ASSET = 'aeterna.node';
/** Where the self-contained build writes its addon to be loaded (default: a private directory under the temp dir). */
export const ADDON_DIR_ENV = 'AETERNA_ADDON_DIR';

interface Loaded {
  binding: Binding;
  /** The file the addon was loaded from. */
  file: string;
}
let loaded: Loaded | undefined;

/** Node's single executable application API, where this Node has it and this is one. */
interface SeaApi {
  isSea(): boolean;
  getAsset(key: string): ArrayBuffer;
}
function seaApi(): SeaApi | null {
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const sea = require('node:sea') as SeaApi;
    return sea.isSea() ? sea : null;
  } catch {
    return null; // before Node 20.12: no node:sea, so not a single executable either
  }
}

/** Whether this is the self-contained build (one executable with the addon inside). */
export function isStandalone(): boolean {
  return seaApi() !== null;
}

/** An installed package: a prebuilt binary from prebuilds/ when one matches, else the source build in build/Release. */
function loadInstalled(): Loaded {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const gypBuild = require('node-gyp-build') as { resolve(dir: string): string };
  const file = gypBuild.resolve(ROOT);
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  return { binding: require(file) as Binding, file };
}

/**
 * The self-contained build: dlopen needs a file, so the embedded addon is written once to a private directory
 * (created 0700, refused unless it is a real directory of this uid that nobody else can write) under a name made of
 * its sha256, and reused while it holds the same bytes. The file stays after exit: Aeterna's own re-exec preloads it
 * (LD_PRELOAD, upgrade/reexec.ts), and each further start finds it there.
 */
function loadEmbedded(sea: SeaApi): Loaded {
  const bytes = Buffer.from(sea.getAsset(EMBEDDED_ADDON_ASSET));
  const digest = crypto.createHash('sha256').update(bytes).digest('hex').slice(0, 32);
  const uid = process.getuid?.() ?? 0;
  const dir = process.env[ADDON_DIR_ENV] || path.join(os.tmpdir(), `aeterna-${uid}`);
  privateDirectory(dir, uid);
  const file = path.join(dir, `aeterna-${digest}.node`);
  if (!holds(file, bytes, uid)) {
    // Written under a name of its own (O_EXCL), then renamed into place: a concurrent start never loads half a file.
    const partial = path.join(dir, `.aeterna-${digest}.${process.pid}.${crypto.randomBytes(4).toString('hex')}`);
    const fd = fs.openSync(partial, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o500);
    try {
      fs.writeSync(fd, bytes);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(partial, file);
  }
  const module = { exports: {} as Binding };
  process.dlopen(module, file);
  return { binding: module.exports, file };
}

function privateDirectory(dir: string, uid: number): void {
  try {
    fs.mkdirSync(dir, { mode: 0o700 });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
  }
  const stat = fs.lstatSync(dir);
  if (!stat.isDirectory() || stat.uid !== uid || (stat.mode & 0o077) !== 0) {
    throw new Error(`${dir} is not a private directory of uid ${uid} (mode 0700); set ${ADDON_DIR_ENV} to one`);
  }
}

/** Whether file is a regular file of this uid holding exactly these bytes (a symlink there is never followed). */
function holds(file: string, bytes: Buffer, uid: number): boolean {
  let fd: number;
  try {
    fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
  } catch {
    return false;
  }
  try {
    const stat = fs.fstatSync(fd);
    if (!stat.isFile() || stat.uid !== uid || stat.size !== bytes.length) return false;
    return fs.readFileSync(fd).equals(bytes);
  } finally {
    fs.closeSync(fd);
  }
}

/** What to do about an addon that does not load, for the way this Aeterna was installed. */
function addonFix(): string {
  if (isStandalone()) {
    return (
      `  The self-contained aeterna writes its addon to a private directory (${ADDON_DIR_ENV}, default under $TMPDIR)\n` +
      `  and loads it from there: set ${ADDON_DIR_ENV} to a writable directory on a filesystem mounted without noexec.`
    );
  }
  return (
    '  It is built or picked when the package is installed; an install whose scripts did not run\n' +
    '  (npm ci --ignore-scripts, a copied node_modules) has none. Fix, one of:\n' +
    '    npm rebuild aeterna     in the project that installed it (-g for a global install): it takes the\n' +
    '                            prebuilt linux-x64 addon the package ships, else compiles one\n' +
    '                            (python3, make and a C++ compiler)\n' +
    `    npx node-gyp rebuild    in an Aeterna checkout (${ROOT})\n` +
    '    make standalone         in a checkout: one self-contained executable with the addon inside,\n' +
    '                            no Node needed (docs/operations.md, "Adding Aeterna to any image")\n' +
    '  aeterna --help, --version and validate work without it.'
  );
}

/** The addon, loaded on first use; throws E_ADDON_UNAVAILABLE (with what failed and the fix) when it cannot be. */
export function loadAddon(): Binding {
  if (loaded === undefined) {
    try {
      const sea = seaApi();
      loaded = sea !== null ? loadEmbedded(sea) : loadInstalled();
    } catch (err) {
      const reason = ((err as Error)?.message ?? String(err)).trim().split('\n')[0];
      throw new AeternaError(
        'E_ADDON_UNAVAILABLE',
        `cannot load Aeterna's native addon (aeterna.node): ${reason}\n${addonFix()}`,
        { cause: err },
      );
    }
    native = loaded.binding;
  }
  return loaded.binding;
}

/**
 * The addon's functions. Until first used this is a stand-in that loads the addon, then the addon itself (importers
 * read it through the module, so they see the replacement).
 */
export let native: Binding = new Proxy({} as Binding, {
  get: (_target, name) => Reflect.get(loadAddon(), name) as unknown,
});

/** The addon's file: Aeterna's own exec preloads it (LD_PRELOAD) to hold stop signals until its handlers exist. */
export function addonPath(): string {
  loadAddon();
  return (loaded as Loaded).file;
}

// Tests of the C++ addon through its typed binding, against the real kernel.
// Every child is started with native.spawn and reaped with native.reapAll (which
// takes any child of this process), so this file never uses child_process.
// Assertions are on states and counts; the only clock is the give-up limit of waitFor.

import { AsyncLocalStorage } from 'node:async_hooks';
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import v8 from 'node:v8';
import vm from 'node:vm';
import { native, READABLE, WRITABLE } from '../../src/native/binding';
import type { ExitInfo, Poller, SpawnOptions } from '../../src/native/binding';
import { signalIfAlive } from '../../src/supervisor/signal';
import { ROOT, tempDir } from '../helpers/aeterna';

const fixture = (name: string): string => path.join(ROOT, 'test', 'fixtures', 'native', name);
const { errno: E, signals } = os.constants;
const O_CLOEXEC = 0o2000000;
const F_SEAL_SEAL = 0x1;
const F_SEAL_SHRINK = 0x2;
const F_SEAL_GROW = 0x4;
const F_SEAL_WRITE = 0x8;
const BASE_ENV = ['PATH=/usr/local/bin:/usr/bin:/bin'];

let tmp = '';
let devnull = -1;

before(() => {
  tmp = tempDir('aeterna-native-');
  fs.chmodSync(tmp, 0o777); // writable by the child that drops to nobody
  devnull = fs.openSync('/dev/null', 'r+');
  // Grandchildren whose parent dies become ours, as they do for the supervisor.
  native.setChildSubreaper();
});

after(() => {
  fs.closeSync(devnull);
  fs.rmSync(tmp, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/** Every exit reaped so far, by pid: reapAll returns each exit once, whoever asked. */
const exits = new Map<number, ExitInfo>();
function collect(): void {
  for (const info of native.reapAll()) exits.set(info.pid, info);
}

/** Polls `check` until it returns a value; gives up (fails) after 60 s, a hang guard for a loaded machine. */
async function waitFor<T>(what: string | (() => string), check: () => T | undefined): Promise<T> {
  for (const deadline = Date.now() + 60000; Date.now() < deadline;) {
    const value = check();
    if (value !== undefined) return value;
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  throw new Error(`gave up waiting for ${typeof what === 'string' ? what : what()}`);
}

/** What /proc says of `pid` (state and parent), for a failure message. */
function procLine(pid: number): string {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const [state, ppid] = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return `state ${state}, parent ${ppid} (this process is ${process.pid})`;
  } catch {
    return 'no /proc entry: reaped by someone else';
  }
}

function waitExit(pid: number): Promise<ExitInfo> {
  return waitFor(
    () => `exit of ${pid}: ${procLine(pid)}`,
    () => {
      collect();
      return exits.get(pid);
    },
  );
}

function spawn(argv: string[], options: Partial<SpawnOptions> = {}): number {
  return native.spawn({ argv, env: BASE_ENV, fds: [], stdio: [devnull, devnull, 2], listenPid: false, ...options });
}

/** Children of this process that are zombies right now, from /proc/<pid>/stat. */
function zombieChildren(): number[] {
  const found: number[] = [];
  for (const name of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    let stat: string;
    try {
      stat = fs.readFileSync(`/proc/${name}/stat`, 'utf8');
    } catch {
      continue; // exited meanwhile
    }
    const [state, ppid] = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    if (state === 'Z' && Number(ppid) === process.pid) found.push(Number(name));
  }
  return found;
}

const openFdCount = (): number => fs.readdirSync('/proc/self/fd').length;
/** The open flags of one of this process's fds, from /proc. */
const fdFlags = (fd: number): number =>
  parseInt(/^flags:\s+(\d+)/m.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'))![1], 8);
const isCloexec = (fd: number): boolean => (fdFlags(fd) & O_CLOEXEC) !== 0;

interface Report {
  pid: number;
  sid: number;
  pgid: number;
  uid: number;
  gid: number;
  groups: number[];
  cwd: string;
  env: Record<string, string | null>;
  envCount: number;
  watchdogPid: string | null;
  fds: number[];
  links: Record<string, string>;
  listening: Record<string, boolean>;
}

/** Runs report.py (through `launcher`, if any) and returns what it saw. */
async function runReport(name: string, options: Partial<SpawnOptions>): Promise<{ pid: number; report: Report }> {
  const file = path.join(tmp, `${name}.json`);
  const pid = spawn(['python3', fixture('report.py')], {
    ...options,
    env: [...BASE_ENV, `REPORT=${file}`, ...(options.env ?? [])],
  });
  assert.deepEqual(await waitExit(pid), { pid, code: 0, signal: null });
  return { pid, report: JSON.parse(fs.readFileSync(file, 'utf8')) as Report };
}

function readAll(socket: net.Socket): Promise<string> {
  return new Promise((resolve, reject) => {
    let text = '';
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => (text += chunk));
    socket.on('end', () => resolve(text));
    socket.on('error', reject);
  });
}

function connectTcp(host: string, port: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host, port }, () => resolve(socket));
    socket.on('error', reject);
  });
}

// ---------------------------------------------------------------------------
// Listeners
// ---------------------------------------------------------------------------

describe('listeners', () => {
  test('listenTcp on port 0 gets a real port; a connection waits in the backlog', async () => {
    const { fd, port } = native.listenTcp('127.0.0.1', 0, 16);
    assert.ok(port > 0);
    assert.equal(native.isListeningSocket(fd), true);
    assert.equal(isCloexec(fd), true);
    const socket = await connectTcp('127.0.0.1', port); // nobody accepts: it completes in the backlog
    socket.destroy();
    native.close(fd);
  });

  test('a second listenTcp on the same port fails with EADDRINUSE naming the address', () => {
    const { fd, port } = native.listenTcp('127.0.0.1', 0, 16);
    assert.throws(() => native.listenTcp('127.0.0.1', port, 16), {
      code: 'EADDRINUSE',
      errno: E.EADDRINUSE,
      syscall: 'bind',
      message: `listen tcp://127.0.0.1:${port}: bind: Address already in use (EADDRINUSE)`,
    });
    native.close(fd);
  });

  test('listenTcp on [::1], localhost, 0.0.0.0 and ::', async () => {
    const v6 = native.listenTcp('::1', 0, 16);
    const socket = await connectTcp('::1', v6.port);
    socket.destroy();
    for (const host of ['localhost', '0.0.0.0', '::']) {
      const { fd, port } = native.listenTcp(host, 0, 16);
      assert.ok(port > 0, host);
      native.close(fd);
    }
    native.close(v6.fd);
    assert.throws(() => native.listenTcp('127.0.0.1', 65536, 16), RangeError);
  });

  test('listenUnix creates the socket file with exactly the given mode, whatever the umask', () => {
    const old = process.umask(0o077);
    try {
      for (const mode of [0o600, 0o660, 0o666]) {
        const file = path.join(tmp, `mode-${mode.toString(8)}.sock`);
        const fd = native.listenUnix(file, 16, mode);
        const stat = fs.statSync(file);
        assert.ok(stat.isSocket());
        assert.equal(stat.mode & 0o777, mode);
        assert.equal(native.isListeningSocket(fd), true);
        native.close(fd);
      }
    } finally {
      process.umask(old);
    }
  });

  test('listenUnix does not replace an existing file', () => {
    const file = path.join(tmp, 'taken');
    fs.writeFileSync(file, 'keep me');
    assert.throws(() => native.listenUnix(file, 16, 0o600), {
      code: 'EADDRINUSE',
      syscall: 'bind',
      message: new RegExp(`^listen unix:${file}: bind: `),
    });
    assert.equal(fs.readFileSync(file, 'utf8'), 'keep me');
  });

  test('connectUnix, accept and peerCred on a unix listener', () => {
    const file = path.join(tmp, 'control.sock');
    const listener = native.listenUnix(file, 16, 0o600);
    assert.equal(native.accept(listener), -1); // nothing waiting: returns, even on a blocking listener
    const client = native.connectUnix(file);
    const server = native.accept(listener);
    assert.ok(server >= 0);
    assert.equal(isCloexec(server), true);
    assert.deepEqual(native.peerCred(server), { pid: process.pid, uid: process.getuid!(), gid: process.getgid!() });
    assert.equal(native.accept(listener), -1);
    for (const fd of [client, server, listener]) native.close(fd);

    // The file is still there but nobody listens on it any more.
    assert.throws(() => native.connectUnix(file), { code: 'ECONNREFUSED', syscall: 'connect' });
    assert.throws(() => native.connectUnix(path.join(tmp, 'missing.sock')), { code: 'ENOENT', syscall: 'connect' });
  });
});

// ---------------------------------------------------------------------------
// Spawn
// ---------------------------------------------------------------------------

describe('spawn', () => {
  test('places stdio and fds exactly, sets LISTEN_PID to the child pid, inherits nothing else', async () => {
    const { fd: listener } = native.listenTcp('127.0.0.1', 0, 16);
    const memfd = native.memfdCreate('aeterna-test');
    const out = path.join(tmp, 'stdout');
    const outFd = fs.openSync(out, 'w');
    const marker = path.join(tmp, 'not-inherited');
    const markerFd = fs.openSync(marker, 'w');

    const { pid, report } = await runReport('placement', {
      fds: [listener, memfd],
      stdio: [devnull, outFd, 2],
      listenPid: true,
      env: ['LISTEN_FDS=2', 'LISTEN_FDNAMES=web:state', 'LISTEN_PID=1'], // a stale LISTEN_PID is replaced
    });
    assert.equal(report.pid, pid);
    assert.deepEqual(report.env, { LISTEN_FDS: '2', LISTEN_PID: String(pid), LISTEN_FDNAMES: 'web:state' });
    assert.equal(report.envCount, 1);
    assert.deepEqual(report.fds, [0, 1, 2, 3, 4]);
    assert.equal(report.links['0'], '/dev/null');
    assert.equal(report.links['1'], out);
    assert.match(report.links['3'], /^socket:\[\d+\]$/);
    assert.equal(report.listening['3'], true);
    assert.match(report.links['4'], /^\/memfd:aeterna-test/);
    assert.equal(report.listening['4'], false);
    assert.ok(!Object.values(report.links).includes(marker));

    for (const fd of [listener, memfd]) native.close(fd);
    fs.closeSync(outFd);
    fs.closeSync(markerFd);
  });

  test('pidEnv sets more variables to the child pid (WATCHDOG_PID), replacing a stale value', async () => {
    const { pid, report } = await runReport('pid-env', {
      fds: [],
      listenPid: false,
      pidEnv: ['WATCHDOG_PID'],
      env: ['WATCHDOG_PID=1'],
    });
    assert.equal(report.watchdogPid, String(pid));
    assert.equal(report.env.LISTEN_PID, null);
  });

  test('runs the child in its own session with default signal dispositions and an empty mask', async () => {
    // Node ignores SIGPIPE; that must not reach the child. Read what sleep got, from outside.
    const pid = spawn(['sleep', '100']);
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const [pgrp, session] = stat
      .slice(stat.lastIndexOf(')') + 2)
      .split(' ')
      .slice(2, 4)
      .map(Number);
    assert.equal(session, pid);
    assert.equal(pgrp, pid);
    const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    assert.match(status, /^SigBlk:\t0+$/m);
    assert.match(status, /^SigIgn:\t0+$/m);
    native.kill(pid, signals.SIGKILL);
    await waitExit(pid);
  });

  test('fds the spawner holds without close-on-exec are not inherited; swapped fds land right', async () => {
    // The intermediate (spawn-from-node.js, via python3) holds: 3 = listening socket, 4 = memfd,
    // 100 = a plain file without close-on-exec. It passes fds [4, 3] on to report.py.
    const { fd: listener } = native.listenTcp('127.0.0.1', 0, 16);
    const memfd = native.memfdCreate('swapped');
    const leak = path.join(tmp, 'leak');
    fs.writeFileSync(leak, '');
    const file = path.join(tmp, 'nested.json');
    const inner: SpawnOptions = {
      argv: ['python3', fixture('report.py')],
      env: [...BASE_ENV, `REPORT=${file}`],
      fds: [4, 3],
      listenPid: true,
    };
    const script =
      'import os, sys; os.dup2(os.open(sys.argv[1], os.O_RDONLY), 100); os.execv(sys.argv[2], sys.argv[2:])';
    const argv = [
      'python3',
      '-c',
      script,
      leak,
      process.execPath,
      fixture('spawn-from-node.js'),
      JSON.stringify(inner),
    ];
    const pid = spawn(argv, { fds: [listener, memfd] });
    assert.deepEqual(await waitExit(pid), { pid, code: 0, signal: null });
    const report = JSON.parse(fs.readFileSync(file, 'utf8')) as Report;
    assert.deepEqual(report.fds, [0, 1, 2, 3, 4]);
    assert.ok(!Object.values(report.links).includes(leak));
    assert.match(report.links['3'], /^\/memfd:swapped/);
    assert.equal(report.listening['4'], true);
    assert.equal(report.env.LISTEN_PID, String(report.pid));
    for (const fd of [listener, memfd]) native.close(fd);
  });

  test('drops to the given uid, gid and groups', async () => {
    const { report } = await runReport('identity', { uid: 65534, gid: 65534, groups: [65534, 4242] });
    assert.equal(report.uid, 65534);
    assert.equal(report.gid, 65534);
    assert.deepEqual(report.groups, [4242, 65534]);
  });

  test('passes cwd', async () => {
    const { report } = await runReport('cwd', { cwd: tmp });
    assert.equal(report.cwd, fs.realpathSync(tmp));
  });

  test('failures throw naming the command and the failed call, and leave no zombie', () => {
    const notExecutable = path.join(tmp, 'not-executable');
    fs.writeFileSync(notExecutable, '#!/bin/sh\n', { mode: 0o644 });
    collect();
    const before = exits.size;

    assert.throws(() => spawn(['/no/such/bin']), {
      code: 'ENOENT',
      errno: E.ENOENT,
      syscall: 'execve',
      message: 'spawn "/no/such/bin": execve: No such file or directory (ENOENT)',
    });
    assert.throws(() => spawn(['no-such-command-xyz']), { code: 'ENOENT', message: /^spawn "no-such-command-xyz": / });
    assert.throws(() => spawn([notExecutable]), { code: 'EACCES', syscall: 'execve', message: /not-executable/ });
    assert.throws(() => spawn(['true'], { cwd: path.join(tmp, 'no-such-dir') }), {
      code: 'ENOENT',
      syscall: 'chdir',
      message: /^spawn "true" \(cwd ".*no-such-dir"\): chdir: /,
    });
    assert.throws(() => spawn(['true'], { fds: [1_000_000] }), { code: 'EBADF' });
    assert.throws(() => spawn([]), TypeError);
    assert.throws(() => spawn(['tr\0ue']), TypeError);

    // The failed children were reaped inside spawn: nothing is left for reapAll, nothing is a zombie.
    collect();
    assert.equal(exits.size, before);
    assert.deepEqual(zombieChildren(), []);
  });
});

// ---------------------------------------------------------------------------
// Reaping and signals
// ---------------------------------------------------------------------------

describe('reaping and signals', () => {
  test('reapAll reaps the orphans adopted as subreaper', async () => {
    collect();
    const known = new Set(exits.keys());
    const pid = spawn(['python3', fixture('orphans.py'), '50']);
    assert.deepEqual(await waitExit(pid), { pid, code: 0, signal: null });
    const orphans = await waitFor('50 orphans', () => {
      collect();
      const found = [...exits.values()].filter((e) => !known.has(e.pid) && e.pid !== pid);
      return found.length >= 50 ? found : undefined;
    });
    assert.equal(orphans.length, 50);
    assert.ok(orphans.every((e) => e.code === 7 && e.signal === null));
    assert.deepEqual(native.reapAll(), []);
    assert.deepEqual(zombieChildren(), []);
  });

  test('kill signals a live process, and throws ESRCH once it is reaped, as every addon function reports errors', async () => {
    const pid = spawn(['sleep', '100']);
    assert.equal(native.kill(pid, 0), undefined);
    assert.equal(native.kill(pid, signals.SIGTERM), undefined);
    assert.deepEqual(await waitExit(pid), { pid, code: null, signal: signals.SIGTERM });
    assert.throws(() => native.kill(pid, 0), {
      code: 'ESRCH',
      errno: E.ESRCH,
      syscall: 'kill',
      message: `pid ${pid} (signal 0): kill: No such process (ESRCH)`,
    });
    assert.equal(signalIfAlive(pid, 0), false, 'the supervisor takes a process that is gone in its stride');
    assert.throws(() => native.kill(Number.NaN, 0), RangeError);
    assert.throws(() => native.kill(pid, 65), RangeError);
    assert.throws(() => native.kill('1' as unknown as number, 0), TypeError);
  });

  test('the functions only tests use are grouped apart: native.test', () => {
    assert.deepEqual(Object.keys(native.test).sort(), ['recvmsg', 'socketpair']);
    for (const name of Object.keys(native.test))
      assert.equal(name in native, false, `${name} is not a function of Aeterna's`);
  });

  test('kill(-pid) signals the whole process group', async () => {
    const pids = path.join(tmp, 'group-pids');
    // The shell execs a third sleep instead of waiting: a shell in wait() can reap a sleeper killed by the same
    // signal before its own death (the kernel looks for a zombie child before a pending signal), and this process
    // would never see that exit. A sleep never waits, so all three exits come here.
    const script =
      'sleep 100 & a=$!; sleep 100 & b=$!; echo "$a $b" > "$OUT.tmp"; mv "$OUT.tmp" "$OUT"; exec sleep 100';
    const pid = spawn(['sh', '-c', script], { env: [...BASE_ENV, `OUT=${pids}`] });
    const sleepers = await waitFor('the sleepers to start', () =>
      fs.existsSync(pids) ? fs.readFileSync(pids, 'utf8').trim().split(' ').map(Number) : undefined,
    );
    native.kill(-pid, signals.SIGKILL);
    for (const p of [pid, ...sleepers]) {
      assert.deepEqual(await waitExit(p), { pid: p, code: null, signal: signals.SIGKILL });
    }
    assert.throws(() => native.kill(-pid, 0), {
      code: 'ESRCH',
      syscall: 'kill',
      message: new RegExp(`^process group ${pid} \\(signal 0\\)`),
    });
  });
});

// ---------------------------------------------------------------------------
// Unix sockets, SCM_RIGHTS, credentials
// ---------------------------------------------------------------------------

describe('unix sockets', () => {
  test('a listening socket and a sealed memfd cross to another process and work there', async () => {
    const [mine, theirs] = native.test.socketpair();
    const { fd: listener, port } = native.listenTcp('127.0.0.1', 0, 16);
    const memfd = native.memfdCreate('state');
    fs.writeSync(memfd, 'hello from the memfd');
    native.sealMemfd(memfd);

    const pid = spawn([process.execPath, fixture('scm-child.js')], { fds: [theirs] });
    native.close(theirs);
    assert.equal(native.sendmsg(mine, Buffer.from('take these'), [listener, memfd]), 'take these'.length);
    // Our copies can go: the ones in flight keep the socket and the memfd alive.
    native.close(listener);
    native.close(memfd);

    const socket = await connectTcp('127.0.0.1', port);
    const answer = JSON.parse(await readAll(socket)) as Record<string, unknown>;
    assert.deepEqual(answer, {
      text: 'take these',
      fdCount: 2,
      cloexec: [true, true],
      listening: true,
      seals: F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE,
      content: 'hello from the memfd',
    });
    assert.deepEqual(await waitExit(pid), { pid, code: 0, signal: null });
    native.close(mine);
  });

  test('more fds than maxFds: ECTRUNC, and every fd that arrived is closed', () => {
    const [a, b] = native.test.socketpair();
    const sent = [native.memfdCreate('x'), native.memfdCreate('y'), native.memfdCreate('z')];
    assert.equal(native.sendmsg(a, Buffer.from('!'), sent), 1);
    const before = openFdCount();
    assert.throws(() => native.test.recvmsg(b, 16, 1), { code: 'ECTRUNC', syscall: 'recvmsg' });
    assert.equal(openFdCount(), before);
    assert.equal(native.test.recvmsg(b, 16, 1), null); // the message is consumed
    for (const fd of [...sent, a, b]) native.close(fd);
  });

  test('recvmsg and sendmsg: fds arrive, EAGAIN is null/-1, EOF is empty, EPIPE throws', () => {
    const [a, b] = native.test.socketpair();
    assert.equal(native.test.recvmsg(b, 16, 4), null);
    const memfd = native.memfdCreate('one');
    native.sendmsg(a, Buffer.from('x'), [memfd]);
    const got = native.test.recvmsg(b, 16, 4)!;
    assert.equal(got.data.toString(), 'x');
    assert.equal(got.fds.length, 1);
    assert.ok(isCloexec(got.fds[0]));
    assert.match(fs.readlinkSync(`/proc/self/fd/${got.fds[0]}`), /^\/memfd:one/);

    // Fill the socket buffer: sendmsg reports -1 instead of blocking.
    const chunk = Buffer.alloc(65536);
    let sent = 0;
    for (let n = native.sendmsg(a, chunk, []); n !== -1; n = native.sendmsg(a, chunk, [])) sent += n;
    assert.ok(sent > 0);

    native.close(a);
    let total = 0;
    for (
      let r = native.test.recvmsg(b, 1 << 20, 0);
      r !== null && r.data.length > 0;
      r = native.test.recvmsg(b, 1 << 20, 0)
    ) {
      total += r.data.length;
    }
    assert.equal(total, sent);
    assert.equal(native.test.recvmsg(b, 16, 0)!.data.length, 0); // EOF

    const [c, d] = native.test.socketpair();
    native.close(d);
    assert.throws(() => native.sendmsg(c, Buffer.from('x'), []), { code: 'EPIPE', syscall: 'sendmsg' });
    assert.throws(() => native.test.recvmsg(c, 65 * 1024 * 1024, 0), RangeError);
    assert.throws(() => native.test.recvmsg(c, 16, 254), RangeError);
    assert.throws(() => native.sendmsg(c, Buffer.from('x'), new Array<number>(254).fill(0)), RangeError);
    for (const fd of [b, c, memfd, got.fds[0]]) native.close(fd);
  });

  test('peerCred of a socketpair is this process', () => {
    const [a, b] = native.test.socketpair();
    assert.deepEqual(native.peerCred(a), { pid: process.pid, uid: process.getuid!(), gid: process.getgid!() });
    native.close(a);
    native.close(b);
  });
});

// ---------------------------------------------------------------------------
// Notify socket
// ---------------------------------------------------------------------------

describe('notify socket', () => {
  for (const abstract of [false, true]) {
    test(`a datagram carries its sender's pid (${abstract ? 'abstract name' : 'path'})`, async () => {
      const address = abstract ? `@aeterna-test-${process.pid}` : path.join(tmp, 'notify.sock');
      const fd = native.bindNotifySocket(address);
      assert.equal(native.recvDatagram(fd, 4096), null);
      const pid = spawn(['python3', fixture('notify.py'), address, 'READY=1']);
      assert.deepEqual(await waitExit(pid), { pid, code: 0, signal: null });
      const datagram = native.recvDatagram(fd, 4096)!;
      assert.equal(datagram.data.toString(), 'READY=1');
      assert.deepEqual(
        { pid: datagram.pid, uid: datagram.uid, gid: datagram.gid },
        { pid, uid: process.getuid!(), gid: process.getgid!() },
      );
      assert.equal(native.recvDatagram(fd, 4096), null);
      native.close(fd);
    });
  }

  test('fds attached to a notification are closed, not leaked', async () => {
    const fd = native.bindNotifySocket(path.join(tmp, 'notify-fds.sock'));
    const pid = spawn(['python3', fixture('notify.py'), path.join(tmp, 'notify-fds.sock'), 'FDSTORE=1', '0', '1', '2']);
    assert.deepEqual(await waitExit(pid), { pid, code: 0, signal: null });
    const before = openFdCount();
    assert.equal(native.recvDatagram(fd, 4096)!.data.toString(), 'FDSTORE=1');
    assert.equal(openFdCount(), before);
    native.close(fd);
  });

  test("with keepFds the attached fds are the caller's: open, close-on-exec, the same files", async () => {
    const address = path.join(tmp, 'notify-keep.sock');
    const fd = native.bindNotifySocket(address);
    const pid = spawn(['python3', fixture('notify.py'), address, 'FDSTORE=1', '0', '2']);
    assert.deepEqual(await waitExit(pid), { pid, code: 0, signal: null });
    const before = openFdCount();
    const datagram = native.recvDatagram(fd, 4096, true)!;
    assert.equal(datagram.fdsCut, false);
    assert.equal(datagram.fds.length, 2);
    assert.equal(openFdCount(), before + 2);
    for (const kept of datagram.fds) assert.ok(isCloexec(kept));
    assert.equal(fs.readlinkSync(`/proc/self/fd/${datagram.fds[0]}`), '/dev/null'); // spawn's stdin
    for (const kept of datagram.fds) native.close(kept);
    native.close(fd);
  });
});

describe('hangup set', () => {
  test('reports a member socket whose peer hung up, without setting O_NONBLOCK on it; a memfd cannot join', () => {
    const set = native.hangupSetCreate();
    const [a, b] = native.test.socketpair();
    const blocking = native.listenUnix(path.join(tmp, 'hangup-blocking.sock'), 4, 0o600); // created blocking
    native.hangupSetAdd(set, blocking);
    assert.equal(fdFlags(blocking) & 0o4000, 0, 'O_NONBLOCK stays off');
    const memfd = native.memfdCreate('not-pollable');
    assert.throws(() => native.hangupSetAdd(set, memfd), { code: 'EPERM' });
    native.hangupSetAdd(set, a);
    assert.deepEqual(native.hangupSetReady(set), []);
    native.close(b);
    assert.deepEqual(native.hangupSetReady(set), [a]);
    native.hangupSetRemove(set, a);
    assert.deepEqual(native.hangupSetReady(set), []);
    native.hangupSetRemove(set, blocking);
    for (const fd of [a, blocking, memfd, set]) native.close(fd);
  });
});

// ---------------------------------------------------------------------------
// Poller
// ---------------------------------------------------------------------------

describe('Poller', () => {
  test('fires readable when the peer writes, and writable', async () => {
    const [a, b] = native.test.socketpair();
    let onEvent: (value: [number, number]) => void = () => {};
    const next = (): Promise<[number, number]> => new Promise((resolve) => (onEvent = resolve));

    const reader = new native.Poller(b, (errno, events) => {
      reader.stop();
      onEvent([errno, events]);
    });
    const readable = next();
    reader.start(READABLE);
    native.sendmsg(a, Buffer.from('ping'), []);
    assert.deepEqual(await readable, [0, READABLE]);
    assert.equal(native.test.recvmsg(b, 16, 0)!.data.toString(), 'ping');
    reader.close();
    reader.close(); // twice is fine
    assert.throws(() => reader.start(READABLE), /closed/);

    const writer = new native.Poller(a, (errno, events) => {
      writer.stop();
      onEvent([errno, events]);
    });
    const writable = next();
    writer.start(WRITABLE);
    assert.deepEqual(await writable, [0, WRITABLE]);
    writer.close();
    native.close(a);
    native.close(b);
  });

  test('the callback runs in the async context of its creation, then ticks and microtasks run', async () => {
    const [a, b] = native.test.socketpair();
    const storage = new AsyncLocalStorage<string>();
    const seen: string[] = [];
    const done = new Promise<void>((resolve) => {
      storage.run('created here', () => {
        const poller = new native.Poller(b, () => {
          poller.close();
          seen.push(`callback in ${storage.getStore()}`);
          void Promise.resolve().then(() => seen.push('microtask'));
          process.nextTick(() => seen.push('tick'));
          setImmediate(resolve);
        });
        poller.start(READABLE);
      });
    });
    native.sendmsg(a, Buffer.from('x'), []);
    await done;
    assert.deepEqual(seen, ['callback in created here', 'tick', 'microtask']);
    native.close(a);
    native.close(b);
  });

  test('an exception in the callback reaches process uncaughtException', async () => {
    const pid = spawn([process.execPath, fixture('poller-throws.js')]);
    assert.deepEqual(await waitExit(pid), { pid, code: 42, signal: null });
  });

  test('a closed poller lets go of its callback: what the callback holds is garbage-collected', async () => {
    v8.setFlagsFromString('--expose-gc');
    const gc = vm.runInNewContext('gc') as () => void;
    const N = 40;
    let collected = 0;
    const registry = new FinalizationRegistry(() => collected++);
    for (let i = 0; i < N; i++) {
      const [a, b] = native.test.socketpair();
      // Like a relay connection's stream: the owner holds the poller and a read buffer, the callback holds the owner.
      const owner: { poller: Poller | null; buffer: Buffer } = { poller: null, buffer: Buffer.alloc(1 << 20) };
      registry.register(owner, i);
      owner.poller = new native.Poller(a, () => void owner.buffer.length);
      owner.poller.start(READABLE);
      owner.poller.close();
      native.close(a);
      native.close(b);
    }
    for (let round = 0; round < 10 && collected < N; round++) {
      gc();
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    assert.equal(collected, N, `${collected} of ${N} closed pollers' callbacks were collected`);
  });

  test('a socket error is reported as itself: ECONNRESET when the peer closes with unread data, not EBADF', async () => {
    const [a, b] = native.test.socketpair();
    native.sendmsg(a, Buffer.from('never read'), []);
    const reported = new Promise<number>((resolve) => {
      const poller = new native.Poller(a, (errno) => {
        poller.close();
        resolve(errno);
      });
      poller.start(READABLE);
    });
    native.close(b); // b dies with a byte in its queue: the kernel resets a
    assert.equal(await reported, E.ECONNRESET);
    native.close(a);
  });

  test('garbage collection of closed, stopped and never-started pollers is safe', async () => {
    v8.setFlagsFromString('--expose-gc');
    const gc = vm.runInNewContext('gc') as () => void;
    const fds: number[] = [];
    const closedFirst: number[] = [];
    for (let i = 0; i < 60; i++) {
      const [a, b] = native.test.socketpair();
      const poller = new native.Poller(a, () => {});
      if (i % 4 === 0) poller.close();
      if (i % 4 === 1) {
        poller.start(READABLE);
        poller.stop();
      }
      if (i % 4 === 3)
        closedFirst.push(a); // misuse: fd closed while the poller is still open
      else fds.push(a);
      fds.push(b);
    }
    for (const fd of closedFirst) native.close(fd);
    // Reuse those numbers for fds that are watched: a late uv_close must not unwatch them.
    const [x, y] = native.test.socketpair();
    let woke = false;
    const watcher = new native.Poller(y, () => {
      woke = true;
      watcher.close();
    });
    watcher.start(READABLE);
    try {
      for (let round = 0; round < 3; round++) {
        gc();
        await new Promise((resolve) => setImmediate(resolve));
      }
      native.sendmsg(x, Buffer.from('still watched'), []);
      await waitFor('the watcher to wake', () => (woke ? true : undefined));
    } finally {
      watcher.close(); // a started poller keeps the process alive
    }
    for (const fd of [...fds, x, y]) native.close(fd);
  });
});

// ---------------------------------------------------------------------------
// memfd, plain fds, users
// ---------------------------------------------------------------------------

describe('memfd and fds', () => {
  test('a sealed memfd refuses writes and resizes', () => {
    const fd = native.memfdCreate('sealed');
    assert.ok(isCloexec(fd));
    fs.writeSync(fd, 'content');
    assert.equal(native.getSeals(fd), 0);
    native.sealMemfd(fd);
    const seals = native.getSeals(fd);
    assert.equal(seals, F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE);
    assert.ok(seals & F_SEAL_WRITE);
    assert.throws(() => fs.writeSync(fd, 'more', 0), { code: 'EPERM' });
    assert.throws(() => fs.ftruncateSync(fd, 0), { code: 'EPERM' });
    assert.throws(() => native.sealMemfd(fd), { code: 'EPERM', syscall: 'fcntl' });
    native.close(fd);
  });

  test('isListeningSocket, setCloexec and close', () => {
    const [a, b] = native.test.socketpair();
    const memfd = native.memfdCreate('plain');
    assert.equal(native.isListeningSocket(a), false);
    assert.equal(native.isListeningSocket(memfd), false);
    native.setCloexec(memfd);
    assert.ok(isCloexec(memfd));
    for (const fd of [a, b, memfd]) native.close(fd);
    assert.throws(() => native.close(a), { code: 'EBADF', syscall: 'close' });
    assert.throws(() => native.isListeningSocket(a), { code: 'EBADF' });
    assert.throws(() => native.setCloexec(a), { code: 'EBADF' });
  });
});

describe('users and groups', () => {
  test('lookupUser and lookupGroup', () => {
    const root = native.lookupUser('root');
    assert.ok(root);
    assert.equal(root.uid, 0);
    assert.equal(root.gid, 0);
    assert.ok(root.groups.includes(0));
    assert.equal(native.lookupUser('no-such-user-xyz'), null);
    assert.equal(native.lookupGroup('root'), 0);
    assert.equal(native.lookupGroup('no-such-group-xyz'), null);
  });
});

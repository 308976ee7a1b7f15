// `aeterna upgrade`: the handover (a sealed memfd naming every fd that survives
// the exec) and Aeterna re-executing itself in place, as PID 1, under load.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { native } from '../src/native/binding';
import { HANDOVER_ENV, HANDOVER_VERSION, readHandover, writeHandover, type Handover } from '../src/upgrade/handover';

/** Whether fd is close-on-exec (fdinfo's flags are octal). */
function closeOnExec(fd: number): boolean {
  return (parseInt(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8').match(/flags:\s+(\d+)/)![1], 8) & 0o2000000) !== 0;
}

function sampleHandover(fds: Handover['fds']): Handover {
  return {
    version: HANDOVER_VERSION,
    from: { version: '0.0.0-test', pid: process.pid },
    reason: 'upgrade',
    fds,
    listeners: [],
    control: { path: '/nonexistent/control.sock', dev: 1, ino: 2 },
    relay: null,
    notify: '/nonexistent/control.sock.notify',
    fdstore: [],
    generations: [{ number: 3, pid: 42, pgid: 42, state: 'serving', started_at: new Date(0).toISOString(), cgroup: null }],
    counters: { reloads: 2, restarts: 1, generations: 3, reexecs: 0, last_reload: null, started_at: new Date(0).toISOString() },
  };
}

describe('handover', () => {
  it('is written to a sealed memfd and read back whole; the fds it lists get close-on-exec back', () => {
    const [a, b] = native.test.socketpair();
    native.clearCloexec(a);
    assert.ok(!closeOnExec(a));
    const written = sampleHandover([{ role: 'listener', name: 'http', fd: a }]);
    const fd = writeHandover(written);
    assert.notEqual(native.getSeals(fd) & 0x8, 0, 'F_SEAL_WRITE is set');
    assert.throws(() => fs.writeSync(fd, 'x'), /EPERM/);
    const env: NodeJS.ProcessEnv = { [HANDOVER_ENV]: String(fd) };
    const read = readHandover(env);
    assert.deepEqual(read, written);
    assert.equal(env[HANDOVER_ENV], undefined, 'the variable is removed, so the app never sees it');
    assert.throws(() => fs.fstatSync(fd), /EBADF/, 'the memfd is closed once read');
    assert.ok(closeOnExec(a), 'O_CLOEXEC again');
    native.close(a);
    native.close(b);
  });

  it('refuses another version and a bad fd number with E_HANDOVER_INVALID naming what was wrong', () => {
    const fd = writeHandover({ ...sampleHandover([]), version: 99 } as unknown as Handover);
    assert.throws(() => readHandover({ [HANDOVER_ENV]: String(fd) }), (err: Error & { code?: string }) => err.code === 'E_HANDOVER_INVALID' && /version 99; this Aeterna reads version 1/.test(err.message));
    assert.throws(() => readHandover({ [HANDOVER_ENV]: 'x' }), (err: Error & { code?: string }) => err.code === 'E_HANDOVER_INVALID' && /"x" is not an fd number/.test(err.message));
    assert.equal(readHandover({}), null);
  });

  it('execve failing leaves the process as it was: the kept fds are close-on-exec again', () => {
    const [a, b] = native.test.socketpair();
    assert.throws(() => native.execve('/nonexistent/aeterna', ['aeterna'], [], [a]), (err: Error & { code?: string; syscall?: string }) => err.code === 'ENOENT' && err.syscall === 'execve');
    assert.ok(closeOnExec(a));
    native.close(a);
    native.close(b);
  });
});

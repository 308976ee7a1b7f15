// `aeterna upgrade`: the handover (a sealed memfd naming every fd that survives
// the exec) and Aeterna re-executing itself in place, as PID 1, under load.
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { CLI, fixture, freePort, tempDir } from '../../helpers/aeterna';
import { Daemon, assertServedInPlace, statusOf, upgradeTimes } from '../../helpers/daemon';
import { getJson, startLoad } from '../../helpers/load';
import { fdCountAtRest } from '../../../bench/soak';

import { native } from '../../../src/native/binding';
import {
  HANDOVER_ENV,
  HANDOVER_VERSION,
  canReadHandover,
  readHandover,
  writeHandover,
  type Handover,
} from '../../../src/upgrade/handover';

/** Whether fd is close-on-exec (fdinfo's flags are octal). */
function closeOnExec(fd: number): boolean {
  return (
    (parseInt(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8').match(/flags:\s+(\d+)/)![1], 8) & 0o2000000) !== 0
  );
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
    generations: [
      { number: 3, pid: 42, pgid: 42, state: 'serving', started_at: new Date(0).toISOString(), cgroup: null },
    ],
    counters: {
      reloads: 2,
      restarts: 1,
      generations: 3,
      reexecs: 0,
      last_reload: null,
      started_at: new Date(0).toISOString(),
    },
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
    assert.throws(
      () => readHandover({ [HANDOVER_ENV]: String(fd) }),
      (err: Error & { code?: string }) =>
        err.code === 'E_HANDOVER_INVALID' && /version 99; this Aeterna reads version 1, 2, 3 and 4/.test(err.message),
    );
    assert.throws(
      () => readHandover({ [HANDOVER_ENV]: 'x' }),
      (err: Error & { code?: string }) =>
        err.code === 'E_HANDOVER_INVALID' && /"x" is not an fd number/.test(err.message),
    );
    assert.equal(readHandover({}), null);
  });

  it('reads a version 1 handover (from an Aeterna before relay connections were carried): it carries none', () => {
    const v1 = { ...sampleHandover([]), version: 1 } as Handover;
    assert.deepEqual(readHandover({ [HANDOVER_ENV]: String(writeHandover(v1)) }), v1);
    assert.deepEqual(['1', '2', '3', '4', '5'].map(canReadHandover), [true, true, true, true, false]);
  });

  it('execve failing leaves the process as it was: the kept fds are close-on-exec again', () => {
    const [a, b] = native.test.socketpair();
    assert.throws(
      () => native.execve('/nonexistent/aeterna', ['aeterna'], [], [a]),
      (err: Error & { code?: string; syscall?: string }) => err.code === 'ENOENT' && err.syscall === 'execve',
    );
    assert.ok(closeOnExec(a));
    native.close(a);
    native.close(b);
  });
});

describe('aeterna upgrade', { timeout: 240000 }, () => {
  const APP = [process.execPath, fixture('faults', 'app.js')];
  const daemons: Daemon[] = [];
  after(async () => {
    for (const d of daemons) await d.run.killAll();
  });

  async function started(): Promise<{ d: Daemon; port: number }> {
    const port = await freePort();
    const d = new Daemon({ command: APP, port, stopTimeout: '5s' }).start();
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Running');
    return { d, port };
  }

  it('20 upgrades under HTTP load: zero failed requests, the same daemon pid, app pid and generation; then a reload works', async () => {
    const { d, port } = await started();
    const before = await statusOf(d);
    const load = startLoad(port, { concurrency: 4 });
    for (let i = 1; i <= 20; i++) {
      const r = await d.cli('upgrade');
      assert.equal(r.code, 0, `upgrade ${i}: ${r.stderr}`);
      assert.match(r.stdout, /^upgraded: aeterna \S+ -> \S+/);
    }
    const stats = await load.stop();
    const after = await statusOf(d);
    assertServedInPlace(stats, before, after, 20);
    // Each re-executed Aeterna still logs where the first one did (stdio is kept across the exec).
    assert.equal(
      d.run.logs().filter((l) => /re-executed as .* \(upgrade\): took over generation/.test(String(l.msg))).length,
      20,
    );
    assert.equal((await d.cli('reload')).code, 0, 'a reload after the upgrades promotes');
    const reloaded = await statusOf(d);
    assert.equal(reloaded.generation, before.generation + 1);
    await d.untilRetired(); // the reload answers at promotion: until its SIGTERM is handled, the old one may accept
    assert.equal((await getJson<{ pid: number }>(port)).pid, reloaded.pid);
  });

  it("Aeterna's fd count is the same after 100 upgrades", async () => {
    const { d } = await started();
    const aeterna = d.run.child.pid!;
    const before = await statusOf(d);
    const fds = await fdCountAtRest(aeterna);
    await upgradeTimes(d, 100);
    const after = await statusOf(d);
    assert.equal(after.reexecs, 100);
    assert.equal(after.daemon_pid, aeterna);
    assert.equal(after.pid, before.pid, 'the same app process');
    assert.equal(after.state, 'Running');
    assert.equal(await fdCountAtRest(aeterna), fds, "Aeterna's fd count after 100 upgrades");
  });

  it('an app that connects to the state relay while the upgrade target is being checked: its connection is carried over too (none is cut)', async () => {
    const port = await freePort();
    const dir = fs.realpathSync(tempDir('aeterna-upgrade-race-'));
    const file = (name: string): string => path.join(dir, name);
    // The app connects to the relay only once told to (the same process: sh execs the relay client).
    const app = `while [ ! -e ${file('connect')} ]; do sleep 0.02; done; exec ${JSON.stringify(process.execPath)} ${JSON.stringify(fixture('apps', 'srp_peer.js'))} hang`;
    const d = new Daemon({ command: ['sh', '-c', app], port, handoff: true }).start();
    daemons.push(d);
    const appPid = (await d.waitStatus((s) => s.state === 'Running')).pid;
    // A target whose check waits until the test lets it go: the app connects in between.
    const target = file('aeterna-target');
    fs.writeFileSync(
      target,
      `#!/bin/sh\ntouch ${file('checking')}\nwhile [ ! -e ${file('go')} ]; do sleep 0.02; done\nexec ${JSON.stringify(process.execPath)} ${JSON.stringify(CLI)} "$@"\n`,
      { mode: 0o755 },
    );
    const upgrading = d.cli('upgrade', '--exec', target);
    while (!fs.existsSync(file('checking'))) await new Promise((r) => setTimeout(r, 20));
    fs.writeFileSync(file('connect'), '');
    await d.run.waitFor(/GOT \{"op":"welcome"/);
    fs.writeFileSync(file('go'), '');
    const r = await upgrading;
    assert.equal(r.code, 0, r.stderr);
    const after = await statusOf(d);
    assert.equal(after.reexecs, 1);
    assert.equal(d.run.logs().filter((l) => /took over 1 state relay connection/.test(String(l.msg))).length, 1);
    // The relay client exits when its connection closes: the same pid serving means the connection is intact.
    assert.equal(after.pid, appPid);
    assert.equal(after.generation, 1);
  });

  it('an upgrade to an entry that fails its check is refused (E_UPGRADE_REFUSED) and changes nothing', async () => {
    const { d, port } = await started();
    const before = await statusOf(d);
    const bad = path.join(d.dir, 'old-aeterna');
    fs.writeFileSync(bad, '#!/bin/sh\necho "I do not know --check-handover" >&2\nexit 2\n', { mode: 0o755 });
    const r = await d.cli('upgrade', '--exec', bad);
    assert.equal(r.code, 1, r.stderr);
    assert.match(
      r.stderr,
      new RegExp(
        `old-aeterna start -c \\S+ exited 2 in its dry run: it cannot take over handover version ${HANDOVER_VERSION}; nothing changed \\(E_UPGRADE_REFUSED\\)`,
      ),
    );
    const after = await statusOf(d);
    assert.equal(after.reexecs, 0);
    assert.equal(after.daemon_pid, before.daemon_pid);
    assert.equal(after.pid, before.pid);
    assert.equal((await getJson<{ pid: number }>(port)).pid, before.pid);
  });
});

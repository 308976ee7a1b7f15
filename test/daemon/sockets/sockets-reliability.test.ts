// Aeterna's own files under a hostile environment: a tmp cleaner deleting its
// sockets while it runs. Every socket file Aeterna owns is re-created at the
// same path (the generations' environment names it), and the fd an upgrade
// hands over is the current one. Real daemons, real apps, real signals.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fdCountAtRest, settle } from '../../../bench/soak';
import { fixture, freePort, pidNamespaceUnavailable, runAeterna } from '../../helpers/aeterna';
import { Daemon, statusOf, type ConfigOptions } from '../../helpers/daemon';
import { requestJson } from '../../helpers/load';
import { ownCgroup } from '../../../src/supervisor/cgroup';

const STATEFUL_APP = [process.execPath, fixture('apps', 'stateful_app.js')];
const NOTIFY_APP = ['python3', fixture('apps', 'notify_app.py')];
const daemons: Daemon[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
});

async function started(options: Omit<ConfigOptions, 'port'>): Promise<{ d: Daemon; port: number }> {
  const port = await freePort();
  const d = new Daemon({ port, stopTimeout: '5s', ...options }).start();
  daemons.push(d);
  await d.waitStatus((s) => s.state === 'Running', 60000);
  return { d, port };
}

/** Delete the socket file at `file` and wait (a hang guard) until a new socket is there; returns whether one came. */
async function deleteAndAwaitNew(file: string): Promise<boolean> {
  const inode = fs.statSync(file).ino;
  fs.rmSync(file);
  return settle(
    () => {
      try {
        const st = fs.lstatSync(file);
        return st.isSocket() && st.ino !== inode;
      } catch {
        return false;
      }
    },
    (ok) => ok,
    20000,
    100,
  );
}

type Reply = { pid: number; generation: string; history?: string[] };

describe('socket files deleted under Aeterna', { timeout: 240000 }, () => {
  it('the state relay socket deleted: re-created at the same path, the next reload relays the state, an upgrade hands the new socket over, no fd leaked', async () => {
    const { d, port } = await started({
      command: STATEFUL_APP,
      handoff: true,
      readiness: '{ mode: "notify", timeout: "60s" }',
    });
    const aeterna = d.run.child.pid!;
    const stateSocket = path.join(d.dir, 'state.sock');
    for (const m of ['one', 'two']) await requestJson<Reply>(port, 'POST', '/sessions/s1/messages', m);
    const baselineFds = await fdCountAtRest(aeterna);

    assert.equal(
      await deleteAndAwaitNew(stateSocket),
      true,
      `the state relay socket was re-created\n${d.run.stderr.slice(-2000)}`,
    );
    assert.equal(fs.statSync(stateSocket).mode & 0o777, 0o600, 'with mode 0600');
    // The file is bound a moment before the line saying so is written.
    await d.run.waitFor(/the state relay socket file .* was deleted while the daemon ran; re-created it/);
    assert.equal(
      d.run
        .logs()
        .filter(
          (l) =>
            l.level === 'warn' &&
            /the state relay socket file .* was deleted while the daemon ran; re-created it/.test(l.msg),
        ).length,
      1,
    );
    assert.equal(
      await fdCountAtRest(aeterna),
      baselineFds,
      'the old listening socket was closed, not kept beside the new one',
    );

    const r = await d.cli('reload');
    assert.equal(r.code, 0, `the reload promotes: ${r.stderr}`);
    await d.untilRetired(); // the reload answers at promotion: until its SIGTERM is handled the old one may accept
    const reloaded = await requestJson<Reply>(port, 'GET', '/sessions/s1');
    assert.equal(reloaded.generation, '2');
    assert.deepEqual(reloaded.history, ['one', 'two'], 'the state was relayed through the new socket');

    // The upgrade hands over the listening socket now at the path (the old fd is closed): the next Aeterna accepts on it.
    const up = await d.cli('upgrade');
    assert.equal(up.code, 0, `upgrade: ${up.stderr}`);
    assert.equal((await d.cli('reload')).code, 0, 'a reload after the upgrade promotes');
    await d.untilRetired(); // the reload answers at promotion: until its SIGTERM is handled the old one may accept
    const after = await requestJson<Reply>(port, 'GET', '/sessions/s1');
    assert.equal(after.generation, '3');
    assert.deepEqual(after.history, ['one', 'two'], 'relayed on the handed-over socket');
    assert.equal(await d.stop(), 0);
    assert.equal(fs.existsSync(stateSocket), false, 'removed at exit');
  });

  it('the notify socket deleted: re-created; the app killed with SIGKILL restarts and its READY=1 arrives (no crash loop); a reload works', async () => {
    const { d, port } = await started({
      command: NOTIFY_APP,
      readiness: '{ mode: "notify", timeout: "20s" }',
      restart: '{ policy: "always", max_restarts: 3, window: "60s" }',
    });
    const notifySocket = path.join(d.dir, 'control.sock.notify');
    const aeterna = d.run.child.pid!;
    const baselineFds = await fdCountAtRest(aeterna);
    assert.equal(
      await deleteAndAwaitNew(notifySocket),
      true,
      `the notify socket was re-created\n${d.run.stderr.slice(-2000)}`,
    );
    // The file is bound a moment before the line saying so is written.
    await d.run.waitFor(/the notify socket file .* was deleted while the daemon ran; re-created it/);
    assert.equal(
      d.run
        .logs()
        .filter(
          (l) =>
            l.level === 'warn' &&
            /the notify socket file .* was deleted while the daemon ran; re-created it/.test(l.msg),
        ).length,
      1,
    );
    assert.equal(await fdCountAtRest(aeterna), baselineFds, 'the old notify socket was closed');

    const before = await statusOf(d);
    process.kill(before.pid!, 'SIGKILL');
    const s = await d.waitStatus((x) => x.state === 'Running' && x.restarts === 1 && x.pid !== before.pid, 60000);
    assert.equal((await requestJson<Reply>(port, 'GET', '/')).pid, s.pid, 'the restarted app serves');

    const r = await d.cli('reload');
    assert.equal(r.code, 0, `the reload promotes (the new generation's READY=1 arrives): ${r.stderr}`);
    assert.equal((await d.status()).restarts, 1, 'no crash loop');
    assert.equal(await d.stop(), 0);
    assert.equal(fs.existsSync(notifySocket), false, 'removed at exit');
  });
});

describe("orchestration.watch on the directory that holds Aeterna's own files", { timeout: 240000 }, () => {
  it('checkpoints written into a watched directory (and its sockets there) trigger no reload; a change of another file there reloads once', async () => {
    const port = await freePort();
    const d = new Daemon({
      command: STATEFUL_APP,
      port,
      stopTimeout: '5s',
      readiness: '{ mode: "notify", timeout: "60s" }',
    });
    const checkpointFile = path.join(d.dir, 'state.ckpt');
    const marker = path.join(d.dir, 'marker');
    fs.mkdirSync(marker);
    // The config, the control, notify and state sockets, the checkpoint file and its temporary files all live in d.dir.
    d.write({
      ...d.options,
      handoff: `{ enabled: true, socket_path: "${d.dir}/state.sock", timeout: "60s", checkpoint: { enabled: true, path: "${checkpointFile}" } }`,
      watch: `{ paths: ["${d.dir}", "${marker}"], debounce: "100ms" }`,
    });
    d.start();
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Running', 60000);
    await d.run.waitFor(/watching 2 path\(s\) for changes/);

    const inode = (): number | null => {
      try {
        return fs.statSync(checkpointFile).ino;
      } catch {
        return null;
      }
    };
    for (let i = 0; i < 10; i++) {
      const before = inode();
      const r = await requestJson<{ seq?: number; error?: string }>(port, 'POST', '/checkpoint');
      assert.equal(typeof r.seq, 'number', `checkpoint stored: ${JSON.stringify(r)}`);
      // Each checkpoint is written to a temporary file and renamed over the file: a new inode once it is on disk.
      assert.notEqual(
        await settle(inode, (now) => now !== null && now !== before, 20000),
        before,
        `checkpoint ${i + 1} reached its file`,
      );
    }
    // The events of the checkpoint writes are queued before this one: a burst seen after it would include them.
    fs.writeFileSync(path.join(marker, 'app.conf'), 'x');
    const s = await d.waitStatus((x) => x.state === 'Running' && x.generation === 2, 60000);
    assert.equal(s.last_reload?.trigger, 'watch');
    const reloads = d.run.logs().filter((l) => /^watched change \(/.test(l.msg));
    assert.deepEqual(
      reloads.map((l) => l.msg),
      [`watched change (${marker}): reloading`],
      'one reload, for the marker only: the checkpoint writes are not a change of the watched directory',
    );

    // Another file in the directory that holds them is a change: it reloads.
    fs.writeFileSync(path.join(d.dir, 'app.conf'), 'y');
    await d.waitStatus((x) => x.state === 'Running' && x.generation === 3, 60000);
    assert.equal(d.run.logs().filter((l) => /^watched change \(/.test(l.msg)).length, 2);
    assert.equal(await d.stop(), 0);
  });
});

/** The cgroup directory a daemon made (from its log), or null when cgroups are unavailable here. */
function cgroupDirOf(d: Daemon): string | null {
  const line = d.run.logs().find((l) => /^process attribution: one cgroup per generation below /.test(l.msg));
  return line ? line.msg.replace(/^process attribution: one cgroup per generation below (\S+).*$/, '$1') : null;
}

/** Aeterna's directory and its generations' below it (none once removed). */
function cgroupDirs(dir: string): string[] {
  if (!fs.existsSync(dir)) return [];
  return [
    dir,
    ...fs
      .readdirSync(dir)
      .filter((n) => /^gen-\d+$/.test(n))
      .map((n) => path.join(dir, n)),
  ];
}

const SLEEPER = ['sleep', '1000'];

/** A new cgroup below the test runner's, or null when cgroup v2 cannot be used here. */
function privateCgroup(): string | null {
  try {
    const dir = path.join(ownCgroup().dir, `aeterna-test-${process.pid}`);
    fs.mkdirSync(dir);
    return dir;
  } catch {
    return null;
  }
}

describe('cgroup directories after abnormal exits', { timeout: 240000 }, () => {
  it('E_RECOVERY_LOOP (the 6th crash within a minute): the cgroup directories handed over are removed with the app', async () => {
    const { d } = await started({ command: SLEEPER });
    const dir = cgroupDirOf(d);
    if (dir === null) return; // no cgroups on this machine: nothing to leave behind
    assert.equal(cgroupDirs(dir).length, 2, 'its directory and generation 1');
    for (let i = 1; i <= 6; i++) {
      await d.run.signal('SIGSEGV');
      if (i < 6) await d.waitStatus((s) => (s as unknown as { reexecs: number }).reexecs === i, 60000);
    }
    assert.equal((await d.run.exit(60000)).code, 70);
    assert.ok(d.run.logs().some((l) => (l as { code?: string }).code === 'E_RECOVERY_LOOP'));
    assert.deepEqual(cgroupDirs(dir), [], 'no cgroup directory left');
  });

  it(
    'Aeterna (PID 1) killed with SIGKILL leaves its empty cgroup directories; the next Aeterna started in the same cgroup removes them',
    { skip: pidNamespaceUnavailable() ?? false },
    async () => {
      // A cgroup of the test's own: Aeternas of other test files running at the same time start in the runner's
      // cgroup and would sweep the dead one's directories there before the second Aeterna here could. (0: the
      // writer itself, since pids are resolved in the cgroup file's namespace, not the new PID namespace.)
      const own = privateCgroup();
      if (own === null) return; // no writable cgroup v2 here
      const inOwnCgroup = (d: Daemon): Daemon => {
        d.run = runAeterna(['start', '-c', d.configFile], {
          pid1: true,
          prefix: ['sh', '-c', 'echo 0 > "$0/cgroup.procs" && exec "$@"', own],
        });
        return d;
      };
      const port = await freePort();
      const first = inOwnCgroup(new Daemon({ command: SLEEPER, port, stopTimeout: '5s' }));
      daemons.push(first);
      await first.waitStatus((s) => s.state === 'Running', 60000);
      const dir = cgroupDirOf(first);
      if (dir === null) return;
      process.kill(await first.run.aeternaPid(), 'SIGKILL'); // its namespace, the app with it, goes down
      await first.run.exit(60000);
      const empty = await settle(
        () => fs.existsSync(dir) && /^populated 0$/m.test(fs.readFileSync(path.join(dir, 'cgroup.events'), 'utf8')),
        (ok) => ok,
        20000,
      );
      assert.equal(empty, true, 'left behind, empty: nothing could remove it');
      assert.equal(cgroupDirs(dir).length, 2);

      const second = inOwnCgroup(new Daemon({ command: SLEEPER, port, stopTimeout: '5s' }));
      daemons.push(second);
      await second.waitStatus((s) => s.state === 'Running', 60000);
      assert.deepEqual(cgroupDirs(dir), [], "the dead Aeterna's directories were removed");
      const removed = second.run
        .logs()
        .find((l) => /^removed \d+ empty cgroup director(y|ies) left by an Aeterna that died/.test(l.msg)) as
        { removed?: string[] } | undefined;
      assert.ok(removed?.removed?.includes(dir), 'and the start says which');
      assert.equal(cgroupDirs(cgroupDirOf(second)!).length, 2, 'its own are there');
      await second.stop();
      assert.deepEqual(cgroupDirs(cgroupDirOf(second)!), [], 'and removed at its exit');
      await settle(
        () => fs.readFileSync(path.join(own, 'cgroup.procs'), 'utf8').trim() === '',
        (empty) => empty,
        20000,
      );
      fs.rmdirSync(own);
    },
  );
});

describe('spawn errors', { timeout: 120000 }, () => {
  it('service.cwd missing: the start fails with exit 127 and one line that says the spawn error once', async () => {
    const missing = '/nonexistent/aeterna-cwd';
    const d = new Daemon({ command: ['sleep', '1000'], extraService: `  cwd: "${missing}"\n` }).start();
    daemons.push(d);
    assert.equal((await d.run.exit(60000)).code, 127);
    const expected = `spawn "sleep" (cwd "${missing}"): chdir: No such file or directory (ENOENT)`;
    const lines = d.run.logs().filter((l) => (l as { code?: string }).code === 'E_SPAWN_FAILED');
    assert.equal(lines.length, 1, d.run.stderr.slice(-2000));
    const line = lines[0] as { msg: string; err?: { message: string } };
    assert.equal(line.msg, expected);
    assert.equal(line.err?.message, expected, 'the error as logged says it once too');
  });
});

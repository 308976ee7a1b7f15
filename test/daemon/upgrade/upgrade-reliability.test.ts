// What an upgrade or a recovery must never cost: the container. It goes on with the config the
// daemon runs with (never a file no reload accepted), a target that cannot start comes back to
// the previous program, `status` shows the listeners Aeterna holds, and a stop signal that
// arrives while the new program loads is not lost.
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { CLI, descendantsOf, fixture, freePort, pidNamespaceUnavailable, runAeterna } from '../../helpers/aeterna';
import { Daemon, socketOf, statusOf } from '../../helpers/daemon';
import { call } from '../../../src/control/client';
import { getJson } from '../../helpers/load';

const skip = pidNamespaceUnavailable();
const APP = [process.execPath, fixture('faults', 'app.js')];

/** Make the daemon's config file invalid (an empty command), leaving control.socket_path for the CLI. */
function breakConfig(d: Daemon): void {
  fs.writeFileSync(d.configFile, fs.readFileSync(d.configFile, 'utf8').replace(/command: .*/, 'command: []'));
}

/** Whether something accepts connections on the port. */
function accepts(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1');
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

/** Whether the process has exec'd with a handover: its initial environment (what /proc shows) names one. */
function execedWithHandover(pid: number): boolean {
  try {
    return fs
      .readFileSync(`/proc/${pid}/environ`, 'utf8')
      .split('\0')
      .some((e) => e.startsWith('AETERNA_HANDOVER_FD='));
  } catch {
    return false;
  }
}

/** Wait until `pid` has exec'd the new program (it is starting: the runtime, then Aeterna's code). */
async function newProgramStarting(pid: number): Promise<void> {
  const deadline = Date.now() + 30000;
  while (!execedWithHandover(pid)) {
    if (Date.now() > deadline) throw new Error('no exec seen');
    await new Promise((r) => setImmediate(r));
  }
}

describe('upgrade and recovery reliability', { skip: skip ?? false, timeout: 300000 }, () => {
  const daemons: Daemon[] = [];
  after(async () => {
    for (const d of daemons) await d.run.killAll();
  });

  /** A daemon with the test app, as PID 1 of a new PID namespace, Running. */
  async function started(env: NodeJS.ProcessEnv = {}): Promise<{ d: Daemon; port: number }> {
    const port = await freePort();
    const d = new Daemon({ command: APP, port, stopTimeout: '5s' });
    d.run = runAeterna(['start', '-c', d.configFile], { pid1: true, env });
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Running');
    return { d, port };
  }

  it('an upgrade with an invalid config file on disk goes on with the config the daemon runs with: the app and its pid stay; the next reload refuses the file', async () => {
    const { d, port } = await started();
    const before = await statusOf(d);
    breakConfig(d);
    const r = await d.cli('upgrade');
    assert.equal(r.code, 0, r.stderr);
    const after = await statusOf(d);
    assert.equal(after.reexecs, 1);
    assert.equal(after.daemon_pid, before.daemon_pid);
    assert.equal(after.pid, before.pid, 'the same app process');
    assert.equal(after.state, 'Running');
    assert.equal(after.config_file?.state, 'invalid');
    assert.equal((await getJson<{ pid: number }>(port)).pid, before.pid);
    const reload = await d.cli('reload');
    assert.equal(reload.code, 1, 'the file is still refused by a reload');
    assert.match(reload.stdout + reload.stderr, /E_CONFIG_INVALID/);
    assert.equal((await statusOf(d)).pid, before.pid);
  });

  it('a SIGSEGV of Aeterna with an invalid config file on disk recovers with the config it held (prepared in advance)', async () => {
    const { d, port } = await started();
    const before = await statusOf(d);
    breakConfig(d);
    await d.run.signal('SIGSEGV');
    const after = await d.waitStatus((s) => ((s as { reexecs?: number }).reexecs ?? 0) >= 1);
    assert.equal(after.pid, before.pid, 'the same app process');
    assert.equal(after.state, 'Running');
    assert.equal((await getJson<{ pid: number }>(port)).pid, before.pid);
  });

  it('after an upgrade with another listener port in the file, status shows the listener Aeterna holds and says the file changed; the next reload applies it', async () => {
    const { d, port } = await started();
    const other = await freePort();
    d.write({ ...d.options, port: other });
    assert.equal((await d.cli('upgrade')).code, 0);
    const after = await statusOf(d);
    assert.deepEqual(
      after.listeners.map((l) => l.address),
      [`tcp://127.0.0.1:${port}`],
      'the listener that serves',
    );
    assert.equal(after.config_file?.state, 'changed');
    assert.equal(await accepts(other), false, 'the port only in the file is not bound');
    assert.equal((await getJson<{ pid: number }>(port)).pid, after.pid);
    const human = await d.cli('status');
    assert.match(human.stdout, /config:\s+\S+ \(changed since it was applied: the next reload applies it\)/);
    assert.equal((await d.cli('reload')).code, 0);
    const reloaded = await statusOf(d);
    assert.deepEqual(
      reloaded.listeners.map((l) => l.address),
      [`tcp://127.0.0.1:${other}`],
    );
    assert.equal(reloaded.config_file?.state, 'applied');
  });

  it('an upgrade target that answers --check-handover but exits 1 at start is refused by its dry run: the daemon, the app and its pid stay', async () => {
    const { d, port } = await started();
    const before = await statusOf(d);
    const shim = path.join(d.dir, 'fake-aeterna');
    fs.writeFileSync(
      shim,
      '#!/bin/sh\nif [ "$2" = "--check-handover" ]; then echo "aeterna reads handover version $3"; exit 0; fi\nexit 1\n',
      { mode: 0o755 },
    );
    const r = await d.cli('upgrade', '--exec', shim);
    assert.equal(r.code, 1, r.stderr);
    assert.match(
      r.stderr,
      /exited 1 in its dry run: it cannot take over handover version 3; nothing changed \(E_UPGRADE_REFUSED\)/,
    );
    const after = await statusOf(d);
    assert.equal(after.reexecs, 0);
    assert.equal(after.daemon_pid, before.daemon_pid);
    assert.equal(after.pid, before.pid);
    assert.equal((await getJson<{ pid: number }>(port)).pid, before.pid);
  });

  it('an upgrade target that passes its dry run and then fails during its start comes back to the previous program: the app and its pid stay, the CLI says so', async () => {
    const { d, port } = await started();
    const before = await statusOf(d);
    // A real Aeterna with a fault thrown during its start, before it takes over (the dry run does not start a daemon).
    const target = path.join(d.dir, 'failing-aeterna');
    fs.writeFileSync(
      target,
      `#!/bin/sh\nAETERNA_TEST_FAULT=throw-before-takeover exec ${JSON.stringify(process.execPath)} ${JSON.stringify(CLI)} "$@"\n`,
      { mode: 0o755 },
    );
    const r = await d.cli('upgrade', '--exec', target);
    assert.equal(r.code, 1, r.stdout + r.stderr);
    assert.match(
      r.stderr,
      /could not take over \(AETERNA_TEST_FAULT=throw-before-takeover: a fault injected before the takeover\); aeterna \S+ took over again/,
    );
    const after = await statusOf(d);
    assert.equal(after.state, 'Running');
    assert.equal(after.daemon_pid, before.daemon_pid);
    assert.equal(after.pid, before.pid, 'the same app process');
    assert.equal((await getJson<{ pid: number }>(port)).pid, before.pid);
    assert.ok(d.run.logs().some((l) => /failed before it took over .*: aeterna \S+ takes over again/.test(l.msg)));
    assert.equal((await d.cli('reload')).code, 0, 'a reload afterwards promotes');
  });

  // Sent after a delay (the exec, the runtime's start, Aeterna loading: the whole window), or as soon as the exec is seen.
  const MOMENTS = [0, 10, 30, 60, 100, 150, 250, 'exec'] as const;
  for (const how of ['upgrade', 'SIGSEGV'] as const) {
    it(`a SIGTERM around the exec of ${how === 'upgrade' ? 'an upgrade' : 'a SIGSEGV recovery'} is never lost: Aeterna stops every time (${MOMENTS.length} moments), exit code 0`, async () => {
      const lost: string[] = [];
      for (const moment of MOMENTS) {
        const { d } = await started();
        const pid = await d.run.aeternaPid();
        assert.ok(!execedWithHandover(pid), 'a fresh start has no handover');
        if (how === 'upgrade') {
          const r = await call(socketOf(d), { cmd: 'upgrade' });
          assert.ok('upgrade' in r);
        } else {
          process.kill(pid, 'SIGSEGV');
        }
        if (moment === 'exec') await newProgramStarting(pid);
        else await new Promise((r) => setTimeout(r, moment));
        process.kill(pid, 'SIGTERM');
        // A lost SIGTERM leaves Aeterna running: killed after the wait (not code 0).
        const exit = await d.run.exit(30000);
        // With Aeterna's last log lines: how far the re-executed one got before the wait ended.
        if (exit.code !== 0 || exit.signal !== null)
          lost.push(
            `${moment === 'exec' ? 'at the exec' : `${moment} ms`}: ${JSON.stringify(exit)}\n${d.run.stderr.split('\n').slice(-12).join('\n')}`,
          );
        await d.run.killAll();
      }
      assert.deepEqual(lost, [], `SIGTERMs lost (of ${MOMENTS.length})`);
    });
  }

  it('the app never inherits the signal hold of the exec: after an upgrade, a reloaded generation has neither LD_PRELOAD nor AETERNA_HOLD_SIGNALS', async () => {
    const { d } = await started();
    assert.equal((await d.cli('upgrade')).code, 0);
    assert.equal((await d.cli('reload')).code, 0);
    await d.untilRetired(); // the reload answers at promotion: the old generation may still be exiting
    const pid = await d.run.aeternaPid();
    // Every process of the app (host pids: Aeterna's descendants).
    const apps = descendantsOf(pid);
    assert.ok(apps.length > 0);
    let read = 0;
    for (const app of apps) {
      let environ: string[];
      try {
        environ = fs.readFileSync(`/proc/${app}/environ`, 'utf8').split('\0');
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue; // a short-lived process that has exited
        throw err;
      }
      read++;
      assert.deepEqual(
        environ.filter((e) => e.startsWith('LD_PRELOAD=') || e.startsWith('AETERNA_HOLD_SIGNALS=')),
        [],
      );
    }
    assert.ok(read > 0, "the serving generation's environment was read");
    const aeterna = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    assert.equal(
      parseInt(aeterna.match(/^SigBlk:\s+(\S+)/m)![1], 16) & ((1 << 14) | (1 << 1) | (1 << 0)),
      0,
      'SIGTERM, SIGINT and SIGHUP are no longer blocked in Aeterna',
    );
  });

  it('as PID 1, a SIGSEGV sent during a canary soak is ignored (nothing prepared: PID 1 drops it): the reload goes on and promotes, Aeterna is the same process', async () => {
    const port = await freePort();
    const d = new Daemon({ command: APP, port, stopTimeout: '5s', strategy: 'canary', soak: '3s' });
    d.run = runAeterna(['start', '-c', d.configFile], { pid1: true });
    daemons.push(d);
    const before = await d.waitStatus((s) => s.state === 'Running');
    const reload = d.cli('reload');
    await d.waitStatus((s) => s.state === 'Soaking');
    await d.run.signal('SIGSEGV');
    const r = await reload;
    assert.equal(r.code, 0, r.stdout + r.stderr);
    const after = await statusOf(d);
    assert.equal(after.state, 'Running');
    assert.equal(after.generation, before.generation + 1);
    assert.equal(after.reexecs, 0, 'no recovery: the signal was ignored');
    await d.untilRetired(); // the reload answers at promotion: until its SIGTERM is handled, the old one may accept
    assert.equal((await getJson<{ pid: number }>(port)).pid, after.pid);
  });
});

// Clients that hold what Aeterna has only so much of (connections, file
// descriptors) must never lock the operator out: /healthz, /readyz, status and
// stop keep answering, and running out of fds is reported as what it is.
// A real daemon, real sockets, a real fd limit (prlimit); counts and states only.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import net from 'node:net';
import path from 'node:path';
import { fdCount, fdCountAtRest, settle } from '../../../bench/soak';
import { call } from '../../../src/control/client';
import { ROOT, fixture, freePort, pidNamespaceUnavailable, runAeterna } from '../../helpers/aeterna';
import { Daemon, socketOf } from '../../helpers/daemon';
import { getText } from '../../helpers/load';

const APP = [process.execPath, fixture('faults', 'app.js')];
const daemons: Daemon[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
});

/** Open `count` connections that send nothing and keep them until release() (those the daemon cuts stay closed). */
async function holdConnections(count: number, connectTo: () => net.Socket): Promise<{ release: () => void }> {
  const sockets = await Promise.all(
    Array.from(
      { length: count },
      () =>
        new Promise<net.Socket>((resolve) => {
          const socket = connectTo();
          socket.on('error', () => undefined);
          socket.on('data', () => undefined);
          // Connected, or refused/cut before that: either way this client did what it could.
          socket.once('connect', () => resolve(socket));
          socket.once('close', () => resolve(socket));
        }),
    ),
  );
  return { release: () => sockets.forEach((s) => s.destroy()) };
}

const pidns = pidNamespaceUnavailable();
const prlimit =
  spawnSync('prlimit', ['--nofile=64:64', 'true']).status === 0 ? null : 'prlimit cannot set RLIMIT_NOFILE here';

/** A daemon as PID 1 with a hard fd limit of 64 (and a metrics endpoint), Running its first generation. */
async function startedWithFdLimit64(): Promise<{ d: Daemon; metricsPort: number }> {
  const port = await freePort();
  const metricsPort = await freePort();
  const d = new Daemon({ command: APP, port, metricsPort });
  d.run = runAeterna(['start', '-c', d.configFile], { pid1: true, prefix: ['prlimit', '--nofile=64:64'] });
  daemons.push(d);
  await d.waitStatus((s) => s.state === 'Running' && s.generation === 1);
  return { d, metricsPort };
}

describe('clients holding connections and fds never lock the operator out', { timeout: 180000 }, () => {
  it(
    'PID 1 with a hard fd limit of 64 and clients holding every control and health connection they can: a SIGHUP reload is promoted (never E_CONFIG_INVALID), /healthz, /readyz, status and stop answer',
    { skip: pidns ?? prlimit ?? false },
    async () => {
      const { d, metricsPort } = await startedWithFdLimit64();

      const control = await holdConnections(200, () => net.createConnection({ path: socketOf(d) }));
      const health = await holdConnections(200, () => net.createConnection({ port: metricsPort, host: '127.0.0.1' }));
      try {
        console.log(`# fd limit 64, 400 connections held: ${fdCount(await d.run.aeternaPid())} fds open in Aeterna`);

        await d.run.signal('SIGHUP');
        const reloaded = await d.waitStatus(
          (s) => s.last_reload !== null && s.last_reload.outcome !== 'in_progress',
          60000,
        );
        assert.equal(reloaded.last_reload?.trigger, 'sighup');
        assert.notEqual(reloaded.last_reload?.code, 'E_CONFIG_INVALID', JSON.stringify(reloaded.last_reload));
        assert.equal(reloaded.last_reload?.outcome, 'promoted', JSON.stringify(reloaded.last_reload));
        assert.equal(reloaded.generation, 2);

        assert.equal((await getText(metricsPort, '/healthz')).status, 200);
        assert.equal((await getText(metricsPort, '/readyz')).status, 200);
        const status = await d.cli('status', '--json');
        assert.equal(status.code, 0, status.stderr);
        const stop = await d.cli('stop');
        assert.equal(stop.code, 0, stop.stderr);
      } finally {
        control.release();
        health.release();
      }
      assert.equal((await d.run.exit()).code, 0);
      assert.equal(d.run.logs().filter((l) => /EMFILE|ENFILE/.test(l.msg)).length, 0, 'no fd exhaustion anywhere');
    },
  );

  it(
    'PID 1 with a hard fd limit of 64: a burst of connections queued while Aeterna could not accept (SIGSTOP) is taken in without ever running out of fds, and a SIGHUP reload sent in the same burst is promoted',
    { skip: pidns ?? prlimit ?? false },
    async () => {
      const { d, metricsPort } = await startedWithFdLimit64();
      const aeterna = await d.run.aeternaPid();
      // Every connection Aeterna holds is taken first, so that each one of the burst displaces one.
      const held = await holdConnections(100, () => net.createConnection({ path: socketOf(d) }));
      const heldHealth = await holdConnections(100, () =>
        net.createConnection({ port: metricsPort, host: '127.0.0.1' }),
      );
      // Stopped, Aeterna accepts nothing: the burst waits in the listen backlogs (the kernel completes the connects).
      process.kill(aeterna, 'SIGSTOP');
      let burst: { release: () => void } | null = null;
      let burstHealth: { release: () => void } | null = null;
      try {
        burst = await holdConnections(64, () => net.createConnection({ path: socketOf(d) }));
        burstHealth = await holdConnections(64, () => net.createConnection({ port: metricsPort, host: '127.0.0.1' }));
        process.kill(aeterna, 'SIGHUP'); // pending until it runs again: it arrives with the burst
      } finally {
        process.kill(aeterna, 'SIGCONT');
      }
      try {
        const reloaded = await d.waitStatus(
          (s) => s.last_reload !== null && s.last_reload.outcome !== 'in_progress',
          60000,
        );
        assert.equal(reloaded.last_reload?.trigger, 'sighup');
        assert.equal(reloaded.last_reload?.outcome, 'promoted', JSON.stringify(reloaded.last_reload));
        const status = await d.cli('status', '--json');
        assert.equal(status.code, 0, status.stderr);
        assert.equal((await d.cli('stop')).code, 0);
      } finally {
        for (const h of [held, heldHealth, burst, burstHealth]) h?.release();
      }
      assert.equal((await d.run.exit()).code, 0);
      const exhausted = d.run.stderr.split('\n').filter((l) => /EMFILE|ENFILE/.test(l));
      assert.deepEqual(exhausted, [], 'Aeterna never ran out of fds (an accept, the config read, a spawn)');
    },
  );

  it('64 idle control connections (the most the daemon holds at the default fd limit) do not lock the operator out: a status request makes room (one idle client is told why it was cut) and answers, and so does aeterna status', async () => {
    const d = new Daemon({ command: APP, port: await freePort() }).start();
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Running');
    const pid = d.run.child.pid!;
    // Aeterna cuts a connection that sends no request within 2 s, so the pool is full only for a while after the
    // last idle one is accepted: a loaded machine can outlast that. Each attempt fills the pool, asks for the status
    // at once, and counts the idle clients told they were cut to make room; an attempt the 2 s overtook (no room
    // was needed) is made again.
    const tried: string[] = [];
    for (let attempt = 1; attempt <= 5; attempt++) {
      const baseline = await fdCountAtRest(pid);
      let madeRoom = 0;
      const idle = await Promise.all(
        Array.from(
          { length: 64 },
          () =>
            new Promise<net.Socket>((resolve) => {
              const s = net.createConnection({ path: socketOf(d) }, () => resolve(s));
              s.on('error', () => undefined);
              s.setEncoding('utf8').on('data', (text: string) => {
                if (text.includes('closed to make room')) madeRoom++;
              });
            }),
        ),
      );
      try {
        // Every idle connection is accepted (holds an fd in the daemon) before the operator comes.
        const held = await settle(
          () => fdCount(pid),
          (n) => n >= baseline + 64,
        );
        if (held < baseline + 64) {
          tried.push(`attempt ${attempt}: ${held - baseline} more fds`);
          continue;
        }
        const reply = await call(socketOf(d), { cmd: 'status' });
        assert.ok('status' in reply && reply.status.state === 'Running', JSON.stringify(reply));
        await settle(
          () => madeRoom,
          (n) => n >= 1,
        );
        if (madeRoom === 0) {
          tried.push(`attempt ${attempt}: the status answered without making room`);
          continue;
        }
        assert.equal(madeRoom, 1, 'one idle client was cut for the one status request');
        const status = await d.cli('status', '--json');
        assert.equal(status.code, 0, status.stderr);
        assert.equal((JSON.parse(status.stdout) as { state: string }).state, 'Running');
        assert.equal(await d.stopServing(), 0);
        return;
      } finally {
        idle.forEach((s) => s.destroy());
      }
    }
    assert.fail(`the 64 idle connections never filled the pool when the status was asked:\n${tried.join('\n')}`);
  });
});

describe('running out of fds is reported as such', () => {
  it(
    'reading the config at the fd limit is E_RESOURCE_EXHAUSTED naming EMFILE, not a config error',
    { skip: prlimit ?? false },
    async () => {
      const d = new Daemon({ command: APP });
      const script = `
      const fs = require('node:fs');
      const { loadConfigFile } = require(${JSON.stringify(path.join(ROOT, 'dist', 'src', 'config', 'load.js'))});
      try { for (;;) fs.openSync('/dev/null', 'r'); } catch (e) { if (e.code !== 'EMFILE') throw e; }
      try { loadConfigFile(${JSON.stringify(d.configFile)}); console.log('loaded'); } catch (e) { console.log(JSON.stringify({ code: e.code, message: e.message })); }`;
      const r = spawnSync('prlimit', ['--nofile=64:64', process.execPath, '-e', script], { encoding: 'utf8' });
      assert.equal(r.status, 0, r.stderr);
      const err = JSON.parse(r.stdout) as { code: string; message: string };
      assert.equal(err.code, 'E_RESOURCE_EXHAUSTED');
      assert.match(err.message, /out of file descriptors \(EMFILE\)/);
      assert.ok(err.message.includes(d.configFile), err.message);
    },
  );
});

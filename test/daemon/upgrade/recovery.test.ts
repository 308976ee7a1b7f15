// Recovery from Aeterna's own crash: a fatal signal (SIGSEGV, SIGABRT) or an exception
// thrown inside the daemon re-executes it in place with the handover; the app never
// notices. More than 5 recoveries within a minute: Aeterna gives up (E_RECOVERY_LOOP).
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fixture, freePort, pidNamespaceUnavailable, runAeterna } from '../../helpers/aeterna';
import { Daemon, assertServedInPlace, statusOf } from '../../helpers/daemon';
import { getJson, getText, metricSample, startLoad } from '../../helpers/load';
import { settle, zombies } from '../../../bench/soak';

const skip = pidNamespaceUnavailable();

/** How many handover memfds Aeterna holds (the one a fatal signal would exec with). */
function handoverMemfds(pid: number): number {
  return fs.readdirSync(`/proc/${pid}/fd`).filter((fd) => {
    try {
      return fs.readlinkSync(`/proc/${pid}/fd/${fd}`).startsWith('/memfd:aeterna-handover');
    } catch {
      return false; // closed meanwhile
    }
  }).length;
}
const APP = [process.execPath, fixture('faults', 'app.js')];

describe('recovery from Aeterna crashing', { skip: skip ?? false, timeout: 240000 }, () => {
  const daemons: Daemon[] = [];
  after(async () => {
    for (const d of daemons) await d.run.killAll();
  });

  /** A daemon with the test app (as PID 1 of a new PID namespace when pid1), Running. */
  async function started(options: {
    pid1: boolean;
    env?: NodeJS.ProcessEnv;
    metricsPort?: number;
  }): Promise<{ d: Daemon; port: number }> {
    const port = await freePort();
    const d = new Daemon({ command: APP, port, stopTimeout: '5s', metricsPort: options.metricsPort });
    d.run = runAeterna(['start', '-c', d.configFile], { pid1: options.pid1, env: options.env });
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Running');
    return { d, port };
  }

  /** Wait until the daemon answers having re-executed `count` times. */
  async function reexecuted(d: Daemon, count: number): Promise<void> {
    await d.waitStatus((s) => ((s as { reexecs?: number }).reexecs ?? 0) >= count);
  }

  it('the fatal-signal handover is ready when status first says Running, and stays one memfd through reloads (promoted, failed) and a restart', async () => {
    const port = await freePort();
    const d = new Daemon({ command: APP, port, stopTimeout: '5s' });
    d.run = runAeterna(['start', '-c', d.configFile], { pid1: false });
    daemons.push(d);
    const aeterna = d.run.child.pid!;
    // Straight from the socket, as fast as it answers: the first Running seen is the moment of the transition.
    while ((await statusOf(d).catch(() => null))?.state !== 'Running') await new Promise((r) => setTimeout(r, 5));
    assert.equal(handoverMemfds(aeterna), 1, 'prepared when status first says Running');
    assert.equal((await d.cli('reload')).code, 0);
    assert.equal(handoverMemfds(aeterna), 1, 'after a promoted reload');
    const base = d.options;
    d.write({ ...base, env: ['CRASH_AFTER_MS=50'], readiness: '{ mode: "notify", timeout: "1m" }' });
    assert.equal((await d.cli('reload')).code, 1, 'the next generation crashes before it is ready: rolled back');
    assert.equal(handoverMemfds(aeterna), 1, 'after a rolled-back reload');
    d.write(base);
    const serving = (await statusOf(d)).pid!;
    process.kill(serving, 'SIGKILL');
    const restarted = await d.waitStatus((s) => s.state === 'Running' && s.pid !== serving && s.pid !== null);
    assert.equal(handoverMemfds(aeterna), 1, 'after a restart');
    // And it describes the restarted app: a fatal signal now keeps that one.
    await d.run.signal('SIGSEGV');
    await reexecuted(d, 1);
    assert.equal((await statusOf(d)).pid, restarted.pid);
    assert.equal(handoverMemfds(aeterna), 1, 'after the recovery');
  });

  it('as PID 1, SIGSEGV then SIGABRT under HTTP load: zero failed requests, Aeterna answers again, the same app pid and generation', async () => {
    const metricsPort = await freePort();
    const { d, port } = await started({ pid1: true, metricsPort });
    const before = await statusOf(d);
    const load = startLoad(port, { concurrency: 4 });
    try {
      await d.run.signal('SIGSEGV');
      await reexecuted(d, 1);
      await d.run.signal('SIGABRT');
      await reexecuted(d, 2);
    } finally {
      await load.stop(); // also when Aeterna did not come back: the load must not outlive the test
    }
    const stats = await load.stop();
    const after = await statusOf(d);
    assertServedInPlace(stats, before, after, 2);
    const lines = d.run.logs().filter((l) => /re-executed as .* \(signal\): took over generation/.test(l.msg));
    assert.equal(lines.length, 2, 'one log line per recovery, with its reason');
    const metrics = (await getText(metricsPort, '/metrics')).body;
    assert.equal(metricSample(metrics, 'aeterna_reexecs_total{reason="signal"}'), 2);
    assert.equal((await d.cli('reload')).code, 0, 'a reload after the recoveries promotes');
    assert.equal((await statusOf(d)).generation, before.generation + 1);
  });

  it('an exception thrown inside the daemon (AETERNA_TEST_FAULT=throw-on-status): logged as fatal with its stack, re-executed, the app untouched', async () => {
    const { d, port } = await started({ pid1: false, env: { AETERNA_TEST_FAULT: 'throw-on-status' } });
    // The first status answer above injected the fault: the daemon throws right after it.
    await reexecuted(d, 1);
    const after = await statusOf(d);
    assert.equal(after.reexecs, 1);
    assert.equal(after.state, 'Running');
    assert.equal(after.daemon_pid, d.run.child.pid, 'the same process');
    assert.equal((await getJson<{ pid: number }>(port)).pid, after.pid, 'the app serves');
    const fatal = d.run.logs().find((l) => l.level === 'fatal');
    assert.ok(fatal, 'a fatal log line');
    assert.match(fatal.msg, /internal error \(uncaught exception\): AETERNA_TEST_FAULT=throw-on-status/);
    assert.match(JSON.stringify(fatal), /at injectFault|recovery\.js/, 'with its stack');
    assert.ok(d.run.logs().some((l) => /re-executed as .* \(exception\): took over generation 1/.test(l.msg)));
  });

  it('an unhandled rejection inside the daemon (AETERNA_TEST_FAULT=reject-on-status) recovers the same way', async () => {
    const { d, port } = await started({ pid1: false, env: { AETERNA_TEST_FAULT: 'reject-on-status' } });
    const first = (await getJson<{ pid: number }>(port)).pid;
    await reexecuted(d, 1);
    assert.equal((await getJson<{ pid: number }>(port)).pid, first);
    assert.ok(d.run.logs().some((l) => /internal error \(unhandled rejection\)/.test(l.msg)));
  });

  it('as PID 1, an orphan that exits while Aeterna re-executes is reaped by the recovered Aeterna', async () => {
    const metricsPort = await freePort();
    const { d } = await started({ pid1: true, metricsPort });
    const ready = path.join(d.dir, 'orphan-ready');
    // An orphan inside the namespace (its parent sh exits, so PID 1 adopts it) that exits when its connection to
    // the metrics endpoint closes: at the exec, which closes every fd Aeterna does not hand over.
    const orphan = `require('net').connect(${metricsPort}, '127.0.0.1', function () { this.write('GET /metrics HTTP/1.1\\r\\n'); require('fs').writeFileSync(${JSON.stringify(ready)}, String(process.pid)); }).on('close', () => process.exit(0)).on('error', () => process.exit(1))`;
    const host = await d.run.aeternaPid();
    const r = spawnSync('nsenter', [
      '-t',
      String(host),
      '-p',
      '--',
      'sh',
      '-c',
      `${JSON.stringify(process.execPath)} -e ${JSON.stringify(orphan)} </dev/null >/dev/null 2>&1 &`,
    ]);
    assert.equal(r.status, 0, String(r.stderr));
    while (!fs.existsSync(ready) || fs.readFileSync(ready, 'utf8') === '')
      await new Promise((res) => setTimeout(res, 20));
    const orphanPid = Number(fs.readFileSync(ready, 'utf8'));
    const logged = d.run.logs().length;
    await d.run.signal('SIGSEGV');
    await reexecuted(d, 1);
    await d.run.waitFor(new RegExp(`"orphan":${orphanPid}\\b`));
    const reaped = d.run
      .logs()
      .findIndex((l) => l.msg === 'reaped orphan' && (l as { orphan?: number }).orphan === orphanPid);
    // The orphan exits only when the exec closes its connection: the Aeterna that reaped it is the recovered one.
    assert.ok(reaped >= logged, 'reaped after the signal');
    assert.equal((await statusOf(d)).reexecs, 1);
  });

  it('as PID 1, orphans that exit while Aeterna re-executes (upgrades, a SIGSEGV) are all reaped afterwards: no zombie left in the namespace', async () => {
    const { d } = await started({ pid1: true });
    const host = await d.run.aeternaPid();
    const stop = path.join(d.dir, 'stop-orphans');
    // Inside the namespace, one short-lived orphan after another (its subshell exits at once, so PID 1 adopts it):
    // some of them exit while Aeterna is between two programs. The loop prints how many it made.
    const loop = `n=0; while [ ! -e ${JSON.stringify(stop)} ]; do (sleep 0.02 &); n=$((n+1)); sleep 0.005; done; echo $n`;
    const maker = spawn('nsenter', ['-t', String(host), '-p', '--', 'sh', '-c', loop], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    let made = '';
    maker.stdout.setEncoding('utf8').on('data', (c: string) => (made += c));
    const makerExited = new Promise<number | null>((res) => maker.on('exit', (code) => res(code)));
    try {
      for (let i = 1; i <= 3; i++) {
        const r = await d.cli('upgrade');
        assert.equal(r.code, 0, `upgrade ${i}: ${r.stderr}`);
      }
      await d.run.signal('SIGSEGV');
      await reexecuted(d, 4);
    } finally {
      fs.writeFileSync(stop, '');
    }
    assert.equal(await makerExited, 0);
    const orphans = Number(made.trim());
    assert.ok(orphans > 0, 'orphans were made');
    const left = await settle(
      () => zombies(host, true),
      (z) => z.length === 0,
    );
    assert.deepEqual(left, [], 'no zombie in the namespace');
    const reaped = (): number =>
      new Set(
        d.run
          .logs()
          .filter((l) => l.msg === 'reaped orphan')
          .map((l) => (l as { orphan?: number }).orphan),
      ).size;
    // Every orphan is reaped (no zombie, above); each is logged, except that the SIGSEGV's execve may land between
    // a reap and its log line (a fatal signal can strike anywhere): at most one such line is lost.
    const logged = await settle(reaped, (n) => n >= orphans);
    assert.ok(
      logged <= orphans && logged >= orphans - 1,
      `every orphan reaped by an Aeterna was logged (${logged} of ${orphans}; at most one lost to the SIGSEGV)`,
    );
    // Those the re-executed Aeterna found already exited (during the exec) are reaped by its first sweep, before it logs having taken over.
    let execing = false;
    let inExecWindow = 0;
    for (const { msg } of d.run.logs()) {
      if (/^upgrade: re-executing/.test(msg)) execing = true;
      else if (/re-executed as/.test(msg)) execing = false;
      else if (execing && msg === 'reaped orphan') inExecWindow++;
    }
    assert.ok(inExecWindow > 0, 'some orphans exited while Aeterna re-executed and were reaped at its first sweep');
    assert.equal((await statusOf(d)).reexecs, 4);
  });

  it('the 6th recovery within a minute gives up: E_RECOVERY_LOOP, the app ended, exit 70', async () => {
    const { d } = await started({ pid1: false });
    const app = (await statusOf(d)).pid!;
    for (let i = 1; i <= 5; i++) {
      await d.run.signal('SIGSEGV');
      await reexecuted(d, i);
    }
    await d.run.signal('SIGSEGV');
    const exit = await d.run.exit();
    assert.equal(exit.code, 70);
    const giveUp = d.run.logs().find((l) => (l as { code?: string }).code === 'E_RECOVERY_LOOP');
    assert.ok(
      giveUp,
      `an E_RECOVERY_LOOP log line: ${JSON.stringify(exit)} ${d.run.stderr
        .split('\n')
        .filter((l) => !l.includes('control request'))
        .slice(-12)
        .join('\n')}`,
    );
    assert.match(giveUp.msg, /recovered from its own crash 6 times within 60s \(at most 5\): giving up/);
    // The app was ended: gone, or a zombie left to whoever adopted it (the test's timeout guards the wait).
    const ended = (): boolean => {
      try {
        return /^State:\s+Z/m.test(fs.readFileSync(`/proc/${app}/status`, 'utf8'));
      } catch {
        return true;
      }
    };
    while (!ended()) await new Promise((r) => setTimeout(r, 50));
  });
});

// Recovery from Aeterna's own crash: a fatal signal (SIGSEGV, SIGABRT) or an exception
// thrown inside the daemon re-executes it in place with the handover; the app never
// notices. More than 5 recoveries within a minute: Aeterna gives up (E_RECOVERY_LOOP).
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fixture, freePort, pidNamespaceUnavailable, runAeterna } from './helpers/aeterna';
import { Daemon, statusOf } from './helpers/daemon';
import { getJson, getText, metricSample, startLoad } from './helpers/load';

const skip = pidNamespaceUnavailable();
const APP = [process.execPath, fixture('faults', 'app.js')];

describe('recovery from Aeterna crashing', { skip: skip ?? false, timeout: 240000 }, () => {
  const daemons: Daemon[] = [];
  after(async () => {
    for (const d of daemons) await d.run.killAll();
  });

  /** A daemon with the test app (as PID 1 of a new PID namespace when pid1), Running. */
  async function started(options: { pid1: boolean; env?: NodeJS.ProcessEnv; metricsPort?: number }): Promise<{ d: Daemon; port: number }> {
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
    assert.equal(stats.failed, 0, `zero failed requests: ${JSON.stringify(stats.failures)}`);
    assert.ok(stats.ok > 0);
    assert.deepEqual(stats.pids, [before.pid], 'one app process answered every request');
    assert.equal(after.reexecs, 2);
    assert.equal(after.daemon_pid, before.daemon_pid, 'Aeterna re-executed in place (PID 1)');
    assert.equal(after.pid, before.pid);
    assert.equal(after.generation, before.generation);
    assert.equal(after.state, 'Running');
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
    const r = spawnSync('nsenter', ['-t', String(host), '-p', '--', 'sh', '-c', `${JSON.stringify(process.execPath)} -e ${JSON.stringify(orphan)} </dev/null >/dev/null 2>&1 &`]);
    assert.equal(r.status, 0, String(r.stderr));
    while (!fs.existsSync(ready) || fs.readFileSync(ready, 'utf8') === '') await new Promise((res) => setTimeout(res, 20));
    const orphanPid = Number(fs.readFileSync(ready, 'utf8'));
    const logged = d.run.logs().length;
    await d.run.signal('SIGSEGV');
    await reexecuted(d, 1);
    await d.run.waitFor(new RegExp(`"orphan":${orphanPid}\\b`));
    const reaped = d.run.logs().findIndex((l) => l.msg === 'reaped orphan' && (l as { orphan?: number }).orphan === orphanPid);
    // The orphan exits only when the exec closes its connection: the Aeterna that reaped it is the recovered one.
    assert.ok(reaped >= logged, 'reaped after the signal');
    assert.equal((await statusOf(d)).reexecs, 1);
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
    assert.ok(giveUp, `an E_RECOVERY_LOOP log line: ${JSON.stringify(exit)} ${d.run.stderr.split('\n').filter((l) => !l.includes('control request')).slice(-12).join('\n')}`);
    assert.match(giveUp.msg, /recovered from its own crash 6 times within 60s \(at most 5\): giving up/);
    // The app was ended: gone, or a zombie left to whoever adopted it (the test's timeout guards the wait).
    const ended = (): boolean => { try { return /^State:\s+Z/m.test(fs.readFileSync(`/proc/${app}/status`, 'utf8')); } catch { return true; } };
    while (!ended()) await new Promise((r) => setTimeout(r, 50));
  });
});

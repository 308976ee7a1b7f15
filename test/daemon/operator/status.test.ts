// What `aeterna status` tells an operator beyond the state: the soak time left during a canary, each live
// generation's memory and CPU (from its cgroup, or /proc), the last crash (when, how, why), and the same figures as
// Prometheus series labelled by generation.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import { fixture, freePort } from '../../helpers/aeterna';
import { Daemon } from '../../helpers/daemon';
import { getText } from '../../helpers/load';
import type { StatusReport } from '../../../src/orchestrator/types';

const APP = [process.execPath, fixture('apps', 'reload_app.js')];
const daemons: Daemon[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
});

async function report(d: Daemon): Promise<StatusReport> {
  const r = await d.cli('status', '--json');
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout) as StatusReport;
}

describe('status for an operator', { timeout: 180000 }, () => {
  it('shows the soak time left, each generation memory and CPU, the last crash, and the app metrics', async () => {
    const metricsPort = await freePort();
    const d = new Daemon({
      command: APP,
      port: await freePort(),
      strategy: 'canary',
      soak: '600s',
      metricsPort,
      restart: '{ policy: "on-failure" }',
    }).start(); // not in a pid namespace: the pids status reports are the ones this test reads and kills
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Running', 60000);
    assert.equal((await d.cli('reload', '--no-wait')).code, 0);
    await d.waitStatus((s) => s.state === 'Soaking', 60000);

    const first = await report(d);
    assert.equal(typeof first.soak_remaining_ms, 'number');
    assert.ok(first.soak_remaining_ms! > 0 && first.soak_remaining_ms! <= 600000, String(first.soak_remaining_ms));
    const second = await report(d);
    assert.ok(second.soak_remaining_ms! <= first.soak_remaining_ms!, 'the soak time left only goes down');
    const roles = second.generations!.map((g) => [g.generation, g.role]).sort();
    assert.deepEqual(roles, [
      [1, 'serving'],
      [2, 'candidate'],
    ]);
    for (const g of second.generations!) {
      assert.ok(g.memory_bytes! > 1024 * 1024, `generation ${g.generation} memory ${g.memory_bytes}`);
      assert.ok(g.memory_peak_bytes! >= g.memory_bytes! || g.memory_from === 'cgroup');
      assert.ok(g.cpu_seconds! > 0, `generation ${g.generation} cpu ${g.cpu_seconds}`);
      assert.ok(g.processes! >= 1);
    }
    const text = (await d.cli('status')).stdout;
    assert.match(text, /soak left: +\d/);
    assert.match(text, /resources: +generation 1 \(serving, pid \d+\): [\d.]+ MiB now/);
    assert.match(text, /\n +generation 2 \(candidate, pid \d+\): [\d.]+ MiB now/);

    // The same figures as metrics, one series per live generation.
    const metrics = (await getText(metricsPort, '/metrics')).body;
    for (const name of ['aeterna_app_memory_bytes', 'aeterna_app_memory_peak_bytes', 'aeterna_app_cpu_seconds'])
      for (const gen of [1, 2]) assert.match(metrics, new RegExp(`^${name}\\{generation="${gen}"\\} [\\d.e+]+$`, 'm'));

    // Promote, then crash the serving generation: status says when, how and why, and restarts it.
    assert.equal((await d.cli('promote')).code, 0);
    const promoted = await d.waitStatus((s) => s.state === 'Running' && s.last_reload?.outcome === 'promoted');
    await d.untilRetired();
    process.kill(promoted.pid!, 'SIGKILL');
    const after = await d.waitStatus((s) => s.state === 'Running' && s.generation === promoted.generation + 1);
    const crashed = await report(d);
    assert.equal(crashed.last_crash?.generation, promoted.generation);
    assert.equal(crashed.last_crash?.pid, promoted.pid);
    assert.deepEqual(crashed.last_crash?.exit, { code: null, signal: 'SIGKILL' });
    assert.equal(crashed.last_crash?.reason, 'crashed');
    assert.equal(crashed.soak_remaining_ms, null);
    assert.deepEqual(
      crashed.generations!.map((g) => [g.generation, g.role]),
      [[after.generation, 'serving']],
    );
    assert.match((await d.cli('status')).stdout, /last crash: +generation 2 \(pid \d+\) killed by SIGKILL \(crashed\)/);
    // The exited generations' series are gone.
    const later = (await getText(metricsPort, '/metrics')).body;
    assert.doesNotMatch(later, /aeterna_app_memory_bytes\{generation="1"\}/);
    assert.match(later, new RegExp(`aeterna_app_memory_bytes\\{generation="${after.generation}"\\}`));
  });
});

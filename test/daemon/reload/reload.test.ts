// Reloads end to end: a real daemon, a real app, real HTTP load from the test,
// and the real CLI. Assert counts and states, never timings.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fixture, freePort } from '../../helpers/aeterna';
import { Daemon, cli, statusOf, type ConfigOptions } from '../../helpers/daemon';
import type { StatusReport } from '../../../src/orchestrator/types';
import { getJson, startLoad } from '../../helpers/load';

const APP = [process.execPath, fixture('apps', 'reload_app.js')];
const daemons: Daemon[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
});

async function started(options: Omit<ConfigOptions, 'port'> & { port?: number }): Promise<{ d: Daemon; port: number }> {
  const port = options.port ?? (await freePort());
  const d = new Daemon({ ...options, port }).start();
  daemons.push(d);
  await d.waitStatus((s) => s.state === 'Running');
  return { d, port };
}

describe('reloads', { timeout: 120000 }, () => {
  it('20 back-to-back immediate reloads under continuous load: zero failed requests, each exits 0, the pid changes each time', async () => {
    const { d, port } = await started({ command: APP });
    const load = startLoad(port, { concurrency: 8 });
    let pid = (await d.status()).pid;
    const seen = new Set([pid]);
    for (let i = 1; i <= 20; i++) {
      const r = await d.cli('reload');
      assert.equal(r.code, 0, `reload ${i}: ${r.stderr}`);
      const s = await d.status();
      assert.equal(s.state, 'Running');
      assert.equal(s.generation, i + 1);
      assert.notEqual(s.pid, pid, `reload ${i} changed the serving pid`);
      assert.equal(s.last_reload?.outcome, 'promoted');
      pid = s.pid;
      seen.add(pid);
    }
    const stats = await load.stop();
    assert.equal(seen.size, 21);
    assert.deepEqual(stats.failures, {}, 'no request failed');
    assert.equal(stats.failed, 0);
    assert.ok(stats.ok > 20, `requests were served (${stats.ok})`);
    assert.equal(await d.stopServing(), 0);
  });

  it('canary whose new version exits during soak: rolled back, old pid still serving, zero failed requests, reload exits 1 with the reason', async () => {
    const { d, port } = await started({ command: APP, strategy: 'canary', soak: '30s' });
    const before = await d.status();
    const load = startLoad(port, { concurrency: 4 });
    d.write({ ...d.options, env: ['CRASH_AFTER_MS=600'] });
    const r = await d.cli('reload');
    const stats = await load.stop();
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /exited with code 3 during soak/);
    const s = await d.status();
    assert.equal(s.state, 'Running');
    assert.equal(s.pid, before.pid, 'the old generation still serves');
    assert.equal(s.last_reload?.outcome, 'rolled_back');
    assert.equal(s.last_reload?.code, 'E_CHILD_EXITED');
    assert.equal((await getJson<{ pid: number }>(port)).pid, before.pid);
    assert.equal(stats.failed, 0, JSON.stringify(stats.failures));
    assert.equal(await d.stopServing(), 0);
  });

  it('a new version that never becomes ready is rolled back after the timeout, never promoted', async () => {
    const { d, port } = await started({ command: APP });
    const before = await d.status();
    // The fixture never sends READY=1: under notify readiness it can only time out.
    d.write({ ...d.options, readiness: '{ mode: "notify", timeout: "1s" }' });
    const r = await d.cli('reload');
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /not ready within 1s/);
    assert.match(r.stderr, /set orchestration\.readiness\.mode/, 'the reason says what to do');
    const s = await d.status();
    assert.equal(s.pid, before.pid);
    assert.equal(s.generation, before.generation);
    assert.equal(s.last_reload?.outcome, 'rolled_back');
    assert.equal(s.last_reload?.code, 'E_READY_TIMEOUT');
    assert.equal((await getJson<{ pid: number }>(port)).pid, before.pid);
    assert.ok(!d.run.logs().some((l) => /promoted/.test(l.msg)), 'never promoted');
    assert.equal(await d.stopServing(), 0);
  });

  it('aeterna promote ends a soak early; a second reload meanwhile is refused as busy (exit 4)', async () => {
    const { d } = await started({ command: APP, strategy: 'canary', soak: '10m' });
    const before = await d.status();
    const reload = d.cli('reload');
    await d.waitStatus((s) => s.state === 'Soaking');
    const second = await d.cli('reload');
    assert.equal(second.code, 4, second.stderr);
    assert.match(second.stderr, /E_RELOAD_BUSY/);
    assert.equal((await d.cli('promote')).code, 0);
    const r = await reload;
    assert.equal(r.code, 0, r.stderr);
    const s = await d.status();
    assert.equal(s.state, 'Running');
    assert.equal(s.generation, before.generation + 1);
    assert.notEqual(s.pid, before.pid);
    assert.equal(await d.stopServing(), 0);
  });

  it('aeterna rollback ends a soak early: the old generation keeps serving, reload exits 1 (operator rollback)', async () => {
    const { d, port } = await started({ command: APP, strategy: 'canary', soak: '10m' });
    const before = await d.status();
    const reload = d.cli('reload');
    await d.waitStatus((s) => s.state === 'Soaking');
    assert.equal((await d.cli('rollback')).code, 0);
    const r = await reload;
    assert.equal(r.code, 1);
    assert.match(r.stderr, /operator rollback/);
    const s = await d.status();
    assert.equal(s.pid, before.pid);
    assert.equal(s.last_reload?.code, 'E_OPERATOR_ROLLBACK');
    assert.equal((await getJson<{ pid: number }>(port)).pid, before.pid);
    assert.equal((await d.cli('promote')).code, 1, 'promote outside a soak is refused');
    assert.equal(await d.stopServing(), 0);
  });

  it('an invalid config at reload is refused and nothing changes', async () => {
    const { d } = await started({ command: APP });
    const before = await d.status();
    fs.writeFileSync(
      d.configFile,
      fs.readFileSync(d.configFile, 'utf8').replace('strategy: "immediate"', 'strategy: "canry"'),
    );
    // --socket reaches the daemon without reading the config at all (-c works too: test/daemon/cli/cli.test.ts).
    const socket = ['--socket', path.join(d.dir, 'control.sock')];
    const r = await cli(['reload', ...socket]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /orchestration\.strategy: must be one of immediate, canary \(got "canry"\)/);
    const s = JSON.parse((await cli(['status', '--json', ...socket])).stdout) as {
      pid: number;
      last_reload: { outcome: string; code: string };
    };
    assert.equal(s.pid, before.pid);
    assert.equal(s.last_reload.outcome, 'failed');
    assert.equal(s.last_reload.code, 'E_CONFIG_INVALID');
    assert.equal(await d.stopServing(), 0);
  });

  it('an unmodified sd_notify app (Python, LISTEN_FDS + READY=1) reloads with zero failed requests', async () => {
    const { d, port } = await started({
      command: ['python3', fixture('apps', 'notify_app.py')],
      readiness: '{ mode: "notify", timeout: "10s" }',
    });
    const load = startLoad(port, { concurrency: 4 });
    let pid = (await d.status()).pid;
    for (let i = 0; i < 5; i++) {
      const r = await d.cli('reload');
      assert.equal(r.code, 0, r.stderr);
      const s = await d.status();
      assert.notEqual(s.pid, pid);
      pid = s.pid;
    }
    const stats = await load.stop();
    assert.equal(stats.failed, 0, JSON.stringify(stats.failures));
    assert.ok(stats.ok > 0);
    assert.ok(
      d.run.logs().some((l) => l.msg === 'generation ready' && /READY=1/.test(String(l.source))),
      'readiness came from sd_notify',
    );
    assert.equal(await d.stopServing(), 0);
  });
});

describe('crash restarts', { timeout: 120000 }, () => {
  it('a crash between reloads is restarted with backoff and the app serves again', async () => {
    const d0 = new Daemon({ command: APP });
    const marker = path.join(d0.dir, 'crashed-once');
    // The first run crashes once (and leaves a marker); the restarted one stays up.
    const script = `if [ -e ${marker} ]; then exec ${process.execPath} ${fixture('apps', 'reload_app.js')}; else touch ${marker}; exit 3; fi`;
    const port = await freePort();
    d0.write({
      command: ['sh', '-c', script],
      port,
      restart: '{ policy: "on-failure", max_restarts: 3, window: "60s" }',
    });
    d0.start();
    daemons.push(d0);
    const s = await d0.waitStatus((st) => st.state === 'Running');
    assert.equal(s.restarts, 1);
    assert.equal(s.generation, 2);
    assert.equal((await getJson<{ pid: number }>(port)).pid, s.pid);
    const warn = d0.run.logs().filter((l) => /restarting in/.test(l.msg));
    assert.equal(warn.length, 1);
    assert.equal(await d0.stop(), 0);
  });

  it('more than max_restarts within the window is a crash loop: aeterna exits non-zero and says why', async () => {
    const d = new Daemon({
      command: ['sh', '-c', 'exit 3'],
      restart: '{ policy: "on-failure", max_restarts: 3, window: "60s" }',
    }).start();
    daemons.push(d);
    const exit = await d.run.exit();
    assert.equal(exit.code, 3);
    assert.equal(d.run.logs().filter((l) => /restarting in/.test(l.msg)).length, 3);
    const loop = d.run.logs().find((l) => l.code === 'E_CRASH_LOOP');
    assert.ok(loop, d.run.stderr);
    assert.match(loop.msg, /crash loop: app exited with code 3 after 3 restarts within 1m/);
  });

  it('policy "never": aeterna exits with the app\'s code; on-failure with exit 0: aeterna exits 0', async () => {
    const never = new Daemon({ command: ['sh', '-c', 'exit 5'], restart: '{ policy: "never" }' }).start();
    const clean = new Daemon({ command: ['sh', '-c', 'exit 0'], restart: '{ policy: "on-failure" }' }).start();
    daemons.push(never, clean);
    assert.equal((await never.run.exit()).code, 5);
    assert.equal((await clean.run.exit()).code, 0);
    assert.equal(never.run.logs().filter((l) => /restarting/.test(l.msg)).length, 0);
  });
});

describe('what logs and status say', { timeout: 120000 }, () => {
  it("an app that never sends READY=1 under the default notify readiness: the timeout's log line names readiness.mode and READY=1", async () => {
    const d = new Daemon({
      command: APP,
      port: await freePort(),
      readiness: '{ mode: "notify", timeout: "500ms" }',
      restart: '{ policy: "always" }',
    }).start();
    daemons.push(d);
    await d.run.waitFor(/"code":"E_READY_TIMEOUT"/);
    const line = d.run.logs().find((l) => l.code === 'E_READY_TIMEOUT');
    assert.ok(line, d.run.stderr);
    assert.match(line.msg, /not ready within 500ms/);
    assert.match(line.msg, /READY=1/, 'names what the app did not send');
    assert.match(line.msg, /set orchestration\.readiness\.mode to "delay" or "exec"/, 'names the key that fixes it');
    assert.equal((await d.status()).state, 'Starting', 'never taken as ready');
    await d.stop(); // its code is the app's, which may be stopped while it is still starting (143): not what this test is about
  });

  it('under the default on-failure policy, an app stopped for never becoming ready is restarted even though it exits 0', async () => {
    // The fixture exits 0 on SIGTERM: that exit is Aeterna's doing, the failure is the readiness timeout.
    const d = new Daemon({
      command: APP,
      port: await freePort(),
      readiness: '{ mode: "notify", timeout: "500ms" }',
    }).start();
    daemons.push(d);
    await d.run.waitFor(/"code":"E_READY_TIMEOUT"/);
    await d.run.waitFor(/restarting in/);
    // From the log, not by polling status: each generation lives half a second, which a busy machine's status
    // calls can miss (and the default policy's crash-loop limit ends the run after five).
    await d.run.waitFor(/"generation":2,"child":\d+,"code":"E_READY_TIMEOUT"/, 60000);
    assert.equal(d.run.child.exitCode, null, 'Aeterna did not exit: it restarted generation 1');
    assert.equal(
      d.run.logs().filter((l) => l.generation === 2 && l.to === 'Running').length,
      0,
      'restarted, and still not taken as ready',
    );
    await d.stop(); // as above: the restarted app may be stopped while still starting
  });

  it('an immediate reload goes Handover -> Draining: its log has no Soaking state and no soak-elapsed event', async () => {
    const { d } = await started({ command: APP });
    const r = await d.cli('reload');
    assert.equal(r.code, 0, r.stderr);
    const lines = d.run.stderr.split('\n').filter((l) => l.includes('"reload-1"'));
    assert.ok(lines.length > 0, d.run.stderr);
    assert.deepEqual(
      lines.filter((l) => /Soaking|soak-elapsed|soaking/.test(l)),
      [],
    );
    const transitions = d.run
      .logs()
      .filter((l) => l.reload === 'reload-1' && typeof l.event === 'string')
      .map((l) => `${String(l.from)}>${String(l.to)}:${String(l.event)}`);
    assert.deepEqual(transitions, [
      'Running>Handover:reload',
      'Handover>Draining:ready-immediate',
      'Draining>Running:retire', // the reload ends at promotion: the old generation drains on in the background
    ]);
    assert.equal(await d.stopServing(), 0);
  });

  it("status during the canary soak of a reload whose config changed the strategy shows that reload's strategy, text and --json", async () => {
    const { d } = await started({ command: APP }); // immediate
    assert.equal((await statusOf(d)).strategy, 'immediate');
    d.write({ ...d.options, strategy: 'canary', soak: '10m' });
    const reload = d.cli('reload');
    await d.waitStatus((s) => s.state === 'Soaking');
    const json = JSON.parse((await d.cli('status', '--json')).stdout) as StatusReport;
    assert.equal(json.strategy, 'canary');
    assert.equal(json.last_reload?.strategy, 'canary');
    const text = await d.cli('status');
    assert.equal(text.code, 0, text.stderr);
    assert.match(text.stdout, /\(strategy canary\)/);
    assert.match(text.stdout, /reload-1 in progress \(canary, soaking\)/);
    assert.equal((await d.cli('promote')).code, 0);
    assert.equal((await reload).code, 0);
    assert.equal((await statusOf(d)).strategy, 'canary', 'the promoted config runs now');
    assert.equal(await d.stopServing(), 0);
  });
});

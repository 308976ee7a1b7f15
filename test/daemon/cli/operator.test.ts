// The operator's interfaces against a real daemon: SIGHUP, the control socket
// commands, the metrics endpoint and the Kubernetes probes.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fixture, freePort, runAeterna } from '../../helpers/aeterna';
import { Daemon } from '../../helpers/daemon';
import { getText, metricSample } from '../../helpers/load';

const APP = [process.execPath, fixture('apps', 'reload_app.js')];
const daemons: Daemon[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
});

describe('operator interfaces', { timeout: 120000 }, () => {
  it('SIGHUP starts the same reload as `aeterna reload`, and its outcome is logged', async () => {
    const d = new Daemon({ command: APP, port: await freePort() }).start();
    daemons.push(d);
    const before = await d.waitStatus((s) => s.state === 'Running');
    await d.run.signal('SIGHUP');
    const s = await d.waitStatus((st) => st.last_reload?.outcome === 'promoted');
    assert.equal(s.generation, before.generation + 1);
    assert.equal(s.last_reload?.trigger, 'sighup');
    await d.run.waitFor(/SIGHUP reload promoted/);
    assert.equal(await d.stopServing(), 0);
  });

  it('a SIGHUP storm runs at most one reload at a time and never half-applies one', async () => {
    const d = new Daemon({ command: APP, port: await freePort(), strategy: 'canary', soak: '2s' }).start();
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Running');
    const pid = await d.run.aeternaPid();
    // 100 in a second (signals sent back to back would merge in the kernel into one or two).
    for (let i = 0; i < 100; i++) {
      process.kill(pid, 'SIGHUP');
      await new Promise((r) => setTimeout(r, 10));
    }
    const s = await d.waitStatus((st) => st.state === 'Running' && st.last_reload?.outcome === 'promoted');
    const records = d.run.logs().filter((l) => l.phase === 'accepted');
    const outcomes = d.run
      .logs()
      .filter((l) => typeof l.outcome === 'string' && /^reload-\d+ (promoted|rolled_back|failed)/.test(l.msg));
    assert.ok(records.length >= 1);
    assert.equal(outcomes.length, records.length, 'every accepted reload reached an outcome');
    assert.equal(s.generation, 1 + records.length);
    assert.ok(
      d.run.logs().some((l) => /SIGHUP ignored: a reload is already in progress/.test(l.msg)),
      'the storm was refused while busy',
    );
    assert.equal(await d.stopServing(), 0);
  });

  it('serves /metrics, /healthz and /readyz with the reload, state and generation series', async () => {
    const metricsPort = await freePort();
    const d = new Daemon({ command: APP, port: await freePort(), metricsPort }).start();
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Running');
    assert.equal((await d.cli('reload')).code, 0);
    d.write({ ...d.options, env: ['CRASH_AFTER_MS=300'], strategy: 'canary', soak: '30s' });
    assert.equal((await d.cli('reload')).code, 1);
    const health = await getText(metricsPort, '/healthz');
    assert.equal(health.status, 200);
    assert.equal((await getText(metricsPort, '/readyz')).status, 200);
    const { status, body } = await getText(metricsPort, '/metrics');
    assert.equal(status, 200);
    assert.equal(metricSample(body, 'aeterna_reloads_total{strategy="immediate",result="promoted"}'), 1);
    assert.equal(metricSample(body, 'aeterna_reloads_total{strategy="canary",result="rolled_back"}'), 1);
    assert.equal(metricSample(body, 'aeterna_reload_duration_seconds_count'), 2);
    assert.equal(metricSample(body, 'aeterna_generation'), 2);
    assert.equal(metricSample(body, 'aeterna_state{state="Running"}'), 1);
    assert.equal(metricSample(body, 'aeterna_state{state="Soaking"}'), 0);
    assert.equal(metricSample(body, 'aeterna_child_restarts_total'), null, 'no restart yet, no series');
    assert.ok(metricSample(body, 'aeterna_zombies_reaped_total') !== null);
    assert.ok(
      metricSample(body, 'aeterna_process_resident_memory_bytes')! > 0,
      'default process metrics carry the aeterna_ prefix',
    );
    for (const name of ['aeterna_state_handoff_bytes_total', 'aeterna_state_handoff_duration_seconds_count'])
      assert.ok(body.includes(name), name);
    assert.doesNotMatch(body, /CRASH_AFTER_MS|reload_app\.js/, 'no environment or command line in the metrics');
    assert.equal((await getText(metricsPort, '/nope')).status, 404);
    assert.equal(await d.stopServing(), 0);
  });

  it('/readyz is 503 while the first generation is not ready yet', async () => {
    const metricsPort = await freePort();
    const d = new Daemon({
      command: APP,
      port: await freePort(),
      metricsPort,
      readiness: '{ mode: "notify", timeout: "1m" }',
    }).start();
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Starting');
    await d.run.waitFor(/READY \d+/); // the app runs (and handles SIGTERM) but never says READY=1
    assert.equal((await getText(metricsPort, '/readyz')).status, 503);
    assert.equal((await getText(metricsPort, '/healthz')).status, 200);
    assert.equal(await d.stopServing(), 0);
  });

  it('status shows state, generation, pid, listeners and the last reload; stop stops the daemon gracefully', async () => {
    const port = await freePort();
    const d = new Daemon({ command: APP, port }).start();
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Running');
    assert.equal((await d.cli('reload')).code, 0);
    const text = await d.cli('status');
    assert.equal(text.code, 0);
    assert.match(text.stdout, /Running/);
    assert.match(text.stdout, new RegExp(`tcp://127.0.0.1:${port}`));
    assert.match(text.stdout, /reload-1/);
    assert.match(text.stdout, /promoted/);
    const r = await d.cli('stop');
    assert.equal(r.code, 0, r.stderr);
    assert.equal((await d.run.exit()).code, 0);
    assert.equal(fs.existsSync(path.join(d.dir, 'control.sock')), false, 'the control socket file is removed on exit');
  });

  it('start refuses when another daemon answers on the control socket, and replaces a stale socket file', async () => {
    // No listener: the app of the daemon killed below outlives it and must not hold a port.
    const d = new Daemon({ command: ['python3', fixture('apps', 'signals.py')] }).start();
    daemons.push(d);
    const first = await d.waitStatus((s) => s.state === 'Running');
    const second = runAeterna(['start', '-c', d.configFile]);
    assert.equal((await second.exit()).code, 70);
    assert.ok(
      second.logs().some((l) => l.code === 'E_DAEMON_RUNNING'),
      second.stderr,
    );
    assert.equal((await d.status()).state, 'Running', 'the first daemon is untouched');
    await d.run.signal('SIGKILL'); // a crashed daemon leaves its socket file behind
    await d.run.exit();
    process.kill(first.pid!, 'SIGKILL');
    assert.ok(fs.existsSync(path.join(d.dir, 'control.sock')));
    const replacement = runAeterna(['start', '-c', d.configFile]);
    await replacement.waitFor(/state Starting -> Running/);
    assert.ok(replacement.logs().some((l) => /stale control socket/.test(l.msg)));
    // The app exits 0 on SIGTERM once its handler is in: a SIGTERM before that kills it (143, propagated).
    await replacement.waitFor(/^READY \d+$/m);
    replacement.child.kill('SIGTERM');
    assert.equal((await replacement.exit()).code, 0);
  });

  it('the metrics port already taken at start: a clear error naming it, exit 69, nothing started', async () => {
    const blocker = net.createServer().listen(0, '127.0.0.1');
    await new Promise((r) => blocker.once('listening', r));
    const metricsPort = (blocker.address() as net.AddressInfo).port;
    try {
      const d = new Daemon({ command: APP, metricsPort }).start();
      daemons.push(d);
      assert.equal((await d.run.exit()).code, 69);
      const err = d.run.logs().find((l) => l.code === 'E_METRICS_FAILED');
      assert.ok(err, d.run.stderr);
      assert.match(err.msg, new RegExp(`metrics endpoint 127.0.0.1:${metricsPort}: address already in use`));
      assert.ok(!d.run.logs().some((l) => l.msg === 'generation started'));
    } finally {
      blocker.close();
    }
  });

  it('an invalid config exits 78 with every error and starts nothing', async () => {
    const d = new Daemon({ command: [] });
    fs.appendFileSync(d.configFile, 'bogus_key: 1\n');
    d.start();
    daemons.push(d);
    const exit = await d.run.exit();
    assert.equal(exit.code, 78);
    assert.match(d.run.stderr, /service\.command: .*empty/);
    assert.match(d.run.stderr, /bogus_key/);
  });
});

// systemd's fd store (service.fdstore_max) and watchdog (service.watchdog), end to end, with Aeterna as PID 1
// and an unmodified stdlib-only Python app (fixtures/apps/fdstore_app.py) that speaks sd_notify.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { fixture, freePort, pidNamespaceUnavailable, tempDir } from '../../helpers/aeterna';
import { Daemon, statusOf } from '../../helpers/daemon';
import { getText, metricSample } from '../../helpers/load';
import { NotifySocket } from '../../../src/resources/notify';
import { fdCountAtRest } from '../../../bench/soak';

const skip = pidNamespaceUnavailable();
if (skip) console.log(`# skipping fd store and watchdog tests: ${skip}`);

const APP = fixture('apps', 'fdstore_app.py');

interface GenReport {
  generation: string;
  pid: number;
  listen_fds: number;
  listen_fdnames: string;
  listen_pid_mine: boolean;
  fds: Record<string, string>;
  watchdog_usec: string | null;
  watchdog_pid_mine: boolean;
}

const daemons: Daemon[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
});

async function started(
  plan: Record<string, string[]>,
  service: string,
  metricsPort?: number,
  canary = false,
): Promise<Daemon> {
  const port = await freePort();
  const d = new Daemon({
    ...(canary ? { strategy: 'canary' as const, soak: '30s' } : {}),
    command: ['python3', APP],
    port,
    env: [`APP_PLAN=${JSON.stringify(plan)}`],
    readiness: '{ mode: "notify", timeout: "10s" }',
    stopTimeout: '2s',
    extraService: service,
    ...(metricsPort === undefined ? {} : { metricsPort }),
  });
  daemons.push(d);
  d.start(true);
  await d.waitStatus((s) => s.state === 'Running' && s.generation >= 1); // an app that triggers its watchdog at once may be past 1
  return d;
}

/** What generation `n` of the app reported at its start. */
async function report(d: Daemon, n: number): Promise<GenReport> {
  const m = await d.run.waitFor(new RegExp(`^GEN (\\{"generation": "${n}".*)$`, 'm'));
  return JSON.parse(m[1]) as GenReport;
}

async function aeternaFds(d: Daemon): Promise<number> {
  return fdCountAtRest(await d.run.aeternaPid());
}

const logged = (d: Daemon, pattern: RegExp): number => d.run.logs().filter((l) => pattern.test(l.msg)).length;

/** Wait until Aeterna has logged a line whose message matches (a hang guard, not a timing assertion). */
async function waitLogged(d: Daemon, pattern: RegExp, timeoutMs = 20000): Promise<void> {
  for (const deadline = Date.now() + timeoutMs; logged(d, pattern) === 0;) {
    if (Date.now() > deadline || d.run.child.exitCode !== null)
      throw new Error(`no log line matched ${pattern}\n${d.run.stderr.slice(-4000)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe('fd store (service.fdstore_max)', { skip: skip ?? false, timeout: 60000 }, () => {
  it('a memfd parked with FDSTORE=1 comes back with the same content after kill -9 and after a reload, after the listeners', async () => {
    const metricsPort = await freePort();
    const d = await started(
      { '1': ['store sessions hello-from-1', 'ready'], '*': ['ready'] },
      '  fdstore_max: 4\n',
      metricsPort,
    );
    await waitLogged(d, /^fd store: stored 1 fd\(s\) named "sessions"$/);
    const first = await report(d, 1);
    assert.equal(first.listen_fdnames, 'http');
    assert.deepEqual((await statusOf(d)).fdstore, ['sessions']);
    assert.equal(metricSample((await getText(metricsPort, '/metrics')).body, 'aeterna_fdstore_fds'), 1);

    process.kill(await d.hostPid(first.pid), 'SIGKILL');
    await d.waitStatus((s) => s.state === 'Running' && s.generation === 2);
    const second = await report(d, 2);
    assert.equal(second.listen_fds, 2);
    assert.equal(second.listen_fdnames, 'http:sessions');
    assert.equal(second.listen_pid_mine, true);
    assert.deepEqual(second.fds, { sessions: 'hello-from-1' });

    const reload = await d.cli('reload');
    assert.equal(reload.code, 0, reload.stdout + reload.stderr);
    const third = await report(d, 3);
    assert.equal(third.listen_fdnames, 'http:sessions');
    assert.deepEqual(third.fds, { sessions: 'hello-from-1' });
    assert.deepEqual((await statusOf(d)).fdstore, ['sessions']);
    assert.equal((await d.cli('status')).stdout.match(/^fd store: +1 fd\(s\): sessions$/m) !== null, true);
  });

  it('FDSTOREREMOVE=1 with FDNAME= closes the fds of that name: the next generation does not get them', async () => {
    const metricsPort = await freePort();
    const d = await started(
      { '1': ['store a first', 'store b second', 'store a third', 'remove a', 'ready'], '*': ['ready'] },
      '  fdstore_max: 4\n',
      metricsPort,
    );
    await waitLogged(d, /fd store: removed 2 fd\(s\) named "a"/);
    assert.deepEqual((await statusOf(d)).fdstore, ['b']);
    assert.equal(metricSample((await getText(metricsPort, '/metrics')).body, 'aeterna_fdstore_fds'), 1);
    process.kill(await d.hostPid((await report(d, 1)).pid), 'SIGKILL');
    const second = await report(d, 2);
    assert.equal(second.listen_fdnames, 'http:b');
    assert.deepEqual(second.fds, { b: 'second' });
  });

  it("over fdstore_max the datagram's fds are refused, logged and closed: Aeterna's fd count is back to its baseline plus the stored ones", async () => {
    const go = path.join(tempDir('aeterna-fdstore-'), 'go');
    const d = await started(
      { '1': ['ready', `waitfile ${go}`, 'storemany many 3', 'store extra x'] },
      '  fdstore_max: 2\n',
    );
    await d.run.waitFor(/DONE ready generation 1/);
    const baseline = await aeternaFds(d);
    fs.writeFileSync(go, '');
    await waitLogged(d, /refused 1 fd\(s\) named "extra".*the store is full/);
    assert.equal(
      logged(
        d,
        /refused 1 fd\(s\) named "many" from pid \d+: the store is full \(service\.fdstore_max 2\); they were closed/,
      ),
      1,
    );
    assert.deepEqual((await statusOf(d)).fdstore, ['many', 'many']);
    assert.equal(await aeternaFds(d), baseline + 2);
  });

  it('with fdstore_max 0 (the default) FDSTORE=1 is refused and its fds closed', async () => {
    const go = path.join(tempDir('aeterna-fdstore-'), 'go');
    const d = await started({ '1': ['ready', `waitfile ${go}`, 'storemany many 3'] }, '');
    await d.run.waitFor(/DONE ready generation 1/);
    const baseline = await aeternaFds(d);
    fs.writeFileSync(go, '');
    await waitLogged(d, /refused 3 fd\(s\) from pid \d+: service\.fdstore_max is 0/);
    assert.deepEqual((await statusOf(d)).fdstore, []);
    assert.equal(await aeternaFds(d), baseline);
  });

  it('a stored socket whose peer hangs up is dropped; one stored with FDPOLL=0 is kept', async () => {
    const go = path.join(tempDir('aeterna-fdstore-'), 'go');
    const metricsPort = await freePort();
    const d = await started(
      { '1': ['storesock watched', 'storesock kept nopoll', 'ready', `waitfile ${go}`, 'hangup'], '*': ['ready'] },
      '  fdstore_max: 4\n',
      metricsPort,
    );
    await d.run.waitFor(/DONE ready generation 1/);
    assert.deepEqual((await statusOf(d)).fdstore, ['watched', 'kept']);
    fs.writeFileSync(go, '');
    await waitLogged(d, /dropped a stored fd named "watched": its peer hung up/);
    assert.deepEqual((await statusOf(d)).fdstore, ['kept']);
    assert.equal(metricSample((await getText(metricsPort, '/metrics')).body, 'aeterna_fdstore_fds'), 1);
    process.kill(await d.hostPid((await report(d, 1)).pid), 'SIGKILL');
    const second = await report(d, 2);
    assert.equal(second.listen_fdnames, 'http:kept');
    assert.deepEqual(second.fds, { kept: 'socket' });
  });

  it("a stranger's FDSTORE=1 (a process of no generation) is refused and its fd closed", async () => {
    const d = await started({ '1': ['ready'] }, '  fdstore_max: 4\n');
    await d.run.waitFor(/DONE ready generation 1/);
    const baseline = await aeternaFds(d);
    const sender = `import os, socket
fd = os.memfd_create('stranger'); os.write(fd, b'mine')
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.connect(${JSON.stringify(NotifySocket.pathFor(path.join(d.dir, 'control.sock')))})
socket.send_fds(s, [b'FDSTORE=1\\nFDNAME=stranger'], [fd])`;
    const sent = spawnSync('python3', ['-c', sender], { encoding: 'utf8' });
    assert.equal(sent.status, 0, sent.stderr);
    await waitLogged(
      d,
      /fd store: ignored FDSTORE\/FDSTOREREMOVE from pid \d+, which is not a process of a running generation/,
    );
    assert.deepEqual((await statusOf(d)).fdstore, []);
    assert.equal(await aeternaFds(d), baseline);
  });
});

describe('watchdog (service.watchdog)', { skip: skip ?? false, timeout: 60000 }, () => {
  it('a hung app (it stops sending WATCHDOG=1) gets SIGABRT, counts as crashed and is restarted with its stored fds', async () => {
    const go = path.join(tempDir('aeterna-watchdog-'), 'go');
    const metricsPort = await freePort();
    const d = await started(
      {
        '1': ['store sessions kept-across-the-watchdog', 'ready', 'ping', `waitfile ${go}`, 'hang'],
        '*': ['ready', 'ping'],
      },
      '  fdstore_max: 1\n  watchdog: "1s"\n',
      metricsPort,
    );
    const first = await report(d, 1);
    assert.equal(first.watchdog_usec, '1000000');
    assert.equal(first.watchdog_pid_mine, true);
    await d.run.waitFor(/DONE ping generation 1/);
    fs.writeFileSync(go, '');
    await d.run.waitFor(/^SIGABRT generation 1$/m);
    await d.waitStatus((s) => s.state === 'Running' && s.generation === 2);
    assert.equal(
      logged(
        d,
        /^watchdog: generation 1 \(pid \d+\) timed out: no WATCHDOG=1 within 1s \(service\.watchdog\); sending SIGABRT/,
      ),
      1,
    );
    const second = await report(d, 2);
    assert.deepEqual(second.fds, { sessions: 'kept-across-the-watchdog' });
    const status = await statusOf(d);
    assert.equal(status.restarts, 1);
    const metrics = (await getText(metricsPort, '/metrics')).body;
    assert.equal(metricSample(metrics, 'aeterna_watchdog_timeouts_total'), 1);
    assert.equal(metricSample(metrics, 'aeterna_child_restarts_total{reason="watchdog"}'), 1);
  });

  it('WATCHDOG=trigger fires the watchdog at once', async () => {
    const d = await started({ '1': ['ready', 'trigger'], '*': ['ready', 'ping'] }, '  watchdog: "1h"\n');
    await d.run.waitFor(/^SIGABRT generation 1$/m);
    await d.waitStatus((s) => s.state === 'Running' && s.generation === 2);
    assert.equal(logged(d, /timed out: the app sent WATCHDOG=trigger/), 1);
  });

  it('WATCHDOG_USEC= changes the deadline: an app that shortens it from 1h and stops pinging is caught', async () => {
    const d = await started({ '1': ['ready', 'usec 200000'], '*': ['ready', 'ping'] }, '  watchdog: "1h"\n');
    await d.run.waitFor(/^SIGABRT generation 1$/m);
    await d.waitStatus((s) => s.state === 'Running' && s.generation === 2);
    assert.equal(logged(d, /timed out: no WATCHDOG=1 within 200ms/), 1);
  });

  it("a reload's new generation whose watchdog fires is rolled back with E_WATCHDOG; the old one serves on", async () => {
    const d = await started(
      { '1': ['ready', 'ping'], '2': ['ready', 'trigger'] },
      '  watchdog: "10s"\n',
      undefined,
      true,
    );
    const reload = await d.cli('reload');
    assert.notEqual(reload.code, 0);
    await d.run.waitFor(/^SIGABRT generation 2$/m);
    const status = await d.waitStatus((s) => s.state === 'Running' && s.last_reload !== null);
    assert.equal(status.last_reload!.outcome, 'rolled_back');
    assert.equal(status.last_reload!.code, 'E_WATCHDOG');
    assert.equal(status.generation, 1);
    assert.equal(status.restarts, 0);
  });

  it('an app that ignores SIGABRT gets SIGKILL after stop_timeout and is restarted', async () => {
    const d = await started({ '1': ['ignoreabrt', 'ready', 'trigger'], '*': ['ready', 'ping'] }, '  watchdog: "1h"\n');
    await d.waitStatus((s) => s.state === 'Running' && s.generation === 2);
    assert.equal(logged(d, /^generation 1 killed by SIGKILL$/), 1);
    assert.equal(logged(d, /timed out: the app sent WATCHDOG=trigger/), 1);
  });
});

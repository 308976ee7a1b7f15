// The fd store per instance (service.instances with service.fdstore_max), end to end, with Aeterna as PID 1 and
// an unmodified stdlib-only Python app that speaks sd_notify (fixtures/apps/fdstore_app.py): what instance i stores
// goes to the later processes of instance i only (restarted alone, the next generation, across an upgrade), and
// what an instance beyond a smaller service.instances stored is closed at the promotion. Also the per-instance
// metrics (pid, state, readiness, restarts).
import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';
import { fixture, freePort, pidNamespaceUnavailable } from '../../helpers/aeterna';
import { Daemon, statusOf, upgradeTimes } from '../../helpers/daemon';
import { getText, metricSample } from '../../helpers/load';
import type { StatusReport } from '../../../src/orchestrator/types';

const skip = pidNamespaceUnavailable();

const APP = fixture('apps', 'fdstore_app.py');

interface Report {
  generation: string;
  pid: number;
  instance: number;
  listen_fdnames: string;
  fds: Record<string, string>;
}

const daemons: Daemon[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
});

function configure(d: Daemon, port: number, metricsPort: number, instances: number): void {
  d.write({
    command: ['python3', APP],
    port,
    // Each instance parks a memfd holding its own number, unless it was passed one (a later process of its slot).
    env: [`APP_PLAN=${JSON.stringify({ '*': ['storenew cache c{i}', 'ready'] })}`],
    readiness: '{ mode: "notify", timeout: "30s" }',
    stopTimeout: '5s',
    restart: '{ policy: "always", max_restarts: 5, window: "60s" }',
    extraService: `  instances: ${instances}\n  fdstore_max: 2\n`,
    metricsPort,
  });
}

/** Every start report the app printed so far (one per process). */
function reports(d: Daemon): Report[] {
  return [...d.run.stdout.matchAll(/^GEN (\{.*\})$/gm)].map((m) => JSON.parse(m[1]) as Report);
}

/** The start report of the process of generation `generation`, instance `instance`, that `wanted` accepts. */
async function reportOf(
  d: Daemon,
  generation: number,
  instance: number,
  wanted: (r: Report) => boolean = () => true,
): Promise<Report> {
  for (const deadline = Date.now() + 60000; ;) {
    const r = reports(d).find((x) => x.generation === String(generation) && x.instance === instance && wanted(x));
    if (r !== undefined) return r;
    if (Date.now() > deadline) throw new Error(`no start report of generation ${generation} instance ${instance}`);
    await new Promise((res) => setTimeout(res, 50));
  }
}

const stored = (s: StatusReport): string[][] => (s.instances ?? []).map((i) => i.fdstore);

/** The full status report, once `predicate` accepts it (a hang guard, not a timing assertion). */
async function statusWhen(d: Daemon, predicate: (s: StatusReport) => boolean): Promise<StatusReport> {
  for (const deadline = Date.now() + 60000; ;) {
    const s = await statusOf(d).catch(() => null);
    if (s !== null && predicate(s)) return s;
    if (Date.now() > deadline)
      throw new Error(
        `status condition not met in time: ${JSON.stringify(s?.instances)}\n${d.run.stderr
          .split('\n')
          .filter((l) => l.includes('fd store'))
          .join('\n')}`,
      );
    await new Promise((res) => setTimeout(res, 100));
  }
}

describe('the fd store per instance (service.instances)', { skip: skip ?? false, timeout: 240000 }, () => {
  it('what instance i stores goes to instance i alone: restarted, reloaded, across an upgrade; a shrink closes the rest', async () => {
    const port = await freePort();
    const metricsPort = await freePort();
    const d = new Daemon({ command: ['python3', APP] });
    configure(d, port, metricsPort, 3);
    daemons.push(d);
    d.start(true);
    // Each instance stored one fd of its own.
    const first = await statusWhen(d, (s) => s.state === 'Running' && stored(s).every((n) => n.length === 1));
    assert.deepEqual(stored(first), [['cache'], ['cache'], ['cache']]);
    assert.deepEqual(first.fdstore, ['cache'], "status's fdstore is instance 0's");
    let metrics = (await getText(metricsPort, '/metrics')).body;
    assert.equal(metricSample(metrics, 'aeterna_fdstore_fds'), 3);
    for (const i of [0, 1, 2]) assert.equal(metricSample(metrics, `aeterna_instance_ready{instance="${i}"}`), 1);
    const pid1 = first.instances![1].pid!;
    assert.equal(
      metricSample(metrics, `aeterna_instance_info{instance="1",pid="${pid1}",state="ready"}`),
      1,
      'the info series names the pid and state',
    );

    // Instance 1 killed: its restarted process gets instance 1's fd only (not 0's or 2's), and stores nothing new.
    process.kill(await d.hostPid(pid1), 'SIGKILL');
    const restarted = await reportOf(d, 1, 1, (r) => r.pid !== pid1);
    assert.equal(restarted.listen_fdnames, 'http:cache');
    assert.deepEqual(restarted.fds, { cache: 'c1' });
    const afterKill = await statusWhen(d, (s) => s.instances?.[1].state === 'ready');
    assert.deepEqual(stored(afterKill), [['cache'], ['cache'], ['cache']]);
    metrics = (await getText(metricsPort, '/metrics')).body;
    assert.equal(metricSample(metrics, `aeterna_instance_restarts_total{instance="1"}`), 1);
    assert.equal(metricSample(metrics, `aeterna_instance_restarts_total{instance="0"}`), 0);

    // An upgrade carries each instance's fds as that instance's; the next generation's instance i gets c<i>.
    await upgradeTimes(d, 1);
    const upgraded = await statusOf(d);
    assert.deepEqual(stored(upgraded), [['cache'], ['cache'], ['cache']]);

    // A reload to two instances: new instances 0 and 1 each get their own; what instance 2 stored is closed.
    configure(d, port, metricsPort, 2);
    const r = await d.cli('reload');
    assert.equal(r.code, 0, r.stderr);
    for (const i of [0, 1]) {
      const next = await reportOf(d, 2, i);
      assert.equal(next.listen_fdnames, 'http:cache', `generation 2 instance ${i}`);
      assert.deepEqual(next.fds, { cache: `c${i}` }, `generation 2 instance ${i}`);
    }
    const shrunk = await statusWhen(d, (s) => s.state === 'Running' && s.generation === 2);
    assert.deepEqual(stored(shrunk), [['cache'], ['cache']]);
    metrics = (await getText(metricsPort, '/metrics')).body;
    assert.equal(metricSample(metrics, 'aeterna_fdstore_fds'), 2, "instance 2's fd was closed at the promotion");
    assert.equal(reports(d).filter((x) => x.generation === '2').length, 2, 'no third instance started');
  });
});

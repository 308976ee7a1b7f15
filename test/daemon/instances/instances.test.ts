// service.instances end to end: Aeterna as PID 1 running three instances of a real Node app on one shared
// listener, each with its AETERNA_INSTANCE and its own state relay connection. Reloads (all at once and rolling with
// max_surge), a rollback when one instance fails, a canary soak and its rollback, one instance killed, the number of
// instances changed across a reload, and an upgrade: each asserts which instance answers with which state, and the
// counts and states status reports, never how long anything took.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { fixture, freePort, pidNamespaceUnavailable } from '../../helpers/aeterna';
import { Daemon, statusOf, upgradeTimes } from '../../helpers/daemon';
import { getJson, getText, metricSample, requestJson } from '../../helpers/load';
import type { InstanceInfo, ReloadRecord, StatusReport } from '../../../src/orchestrator/types';

const APP = [process.execPath, fixture('apps', 'instances_app.js')];
const daemons: Daemon[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
});

type Reply = { pid: number; generation: string; instance: number; origin: string; source: string | null };

interface Options {
  instances?: number;
  env?: string[];
  strategy?: 'immediate' | 'canary';
  soak?: string;
  /** More keys of orchestration (e.g. max_surge), each a line of YAML. */
  orchestration?: string[];
  restart?: string;
  checkpoint?: boolean;
  metricsPort?: number;
  /** The flow-map text of orchestration.canary (a weighted split). */
  canary?: string;
  /** service.watchdog. */
  watchdog?: string;
  /** observability.app_output. */
  appOutput?: 'prefixed' | 'json';
}

function configure(d: Daemon, port: number, o: Options): void {
  const checkpoint = o.checkpoint ? ', checkpoint: { enabled: true }' : '';
  d.write({
    command: APP,
    port,
    env: o.env ?? [],
    strategy: o.strategy ?? 'immediate',
    soak: o.soak ?? '1s',
    readiness: '{ mode: "notify", timeout: "60s" }',
    stopTimeout: '10s',
    restart: o.restart ?? '{ policy: "always", max_restarts: 5, window: "60s" }',
    extraService: `  instances: ${o.instances ?? 3}\n${o.watchdog ? `  watchdog: "${o.watchdog}"\n` : ''}`,
    metricsPort: o.metricsPort,
    canary: o.canary,
    handoff:
      `{ enabled: true, socket_path: "${d.dir}/state.sock", timeout: "30s"${checkpoint} }` +
      (o.orchestration ?? []).map((l) => `\n  ${l}`).join(''),
  }); // observability is the config's last section: its key goes at the end.
  if (o.appOutput) fs.appendFileSync(d.configFile, `  app_output: "${o.appOutput}"\n`);
}

async function started(o: Options = {}): Promise<{ d: Daemon; port: number }> {
  const port = await freePort();
  const d = new Daemon({ command: APP });
  configure(d, port, o);
  d.start(true);
  daemons.push(d);
  await d.waitStatus((s) => s.state === 'Running', 60000);
  return { d, port };
}

/**
 * One answer from each instance 0..n-1 that `wanted` accepts, asking on a new connection each time (the kernel
 * picks the process that accepts it). A hang guard bounds the number of requests, not the time.
 */
async function byInstance(port: number, n: number, wanted: (r: Reply) => boolean): Promise<Reply[]> {
  const found = new Map<number, Reply>();
  for (let i = 0; i < 5000 && found.size < n; i++) {
    const r = await getJson<Reply>(port).catch(() => null);
    if (r !== null && wanted(r)) found.set(r.instance, r);
  }
  assert.equal(found.size, n, `answers from instances ${[...found.keys()].join(', ')} of ${n}`);
  return [...found.values()].sort((a, b) => a.instance - b.instance);
}

async function reload(d: Daemon): Promise<ReloadRecord> {
  const r = await d.cli('reload', '--json');
  const lines = r.stdout.trim().split('\n');
  const last = JSON.parse(lines[lines.length - 1]) as { record?: ReloadRecord } & ReloadRecord;
  return last.record ?? last;
}

const pidsOf = (s: StatusReport): Array<number | null> => (s.instances ?? []).map((i) => i.pid);
const statesOf = (s: StatusReport): string[] => (s.instances ?? []).map((i) => i.state);
const allReady = (s: { state: string }): boolean =>
  s.state === 'Running' &&
  ((s as StatusReport).instances ?? []).length > 0 &&
  ((s as StatusReport).instances ?? []).every((i: InstanceInfo) => i.state === 'ready');

describe(
  'service.instances: three processes per generation (Aeterna as PID 1)',
  { skip: pidNamespaceUnavailable() ?? false, timeout: 600_000 },
  () => {
    it('starts three instances, each with its AETERNA_INSTANCE, all ready before Running; status lists each', async () => {
      const { d, port } = await started();
      const s = await statusOf(d);
      assert.equal(s.state, 'Running');
      assert.deepEqual(statesOf(s), ['ready', 'ready', 'ready']);
      assert.deepEqual(
        s.instances!.map((i) => i.instance),
        [0, 1, 2],
      );
      assert.equal(new Set(pidsOf(s)).size, 3, 'three processes');
      const replies = await byInstance(port, 3, () => true);
      assert.deepEqual(
        replies.map((r) => [r.instance, r.generation, r.origin]),
        [
          [0, '1', 'g1-i0'],
          [1, '1', 'g1-i1'],
          [2, '1', 'g1-i2'],
        ],
      );
      assert.deepEqual(
        replies.map((r) => r.pid),
        pidsOf(s),
        'each instance answers from the pid status shows for it',
      );
      const text = await d.cli('status');
      assert.equal(text.code, 0);
      for (const pid of pidsOf(s)) assert.match(text.stdout, new RegExp(`\\b${pid}\\b`));
      assert.equal(await d.stop(), 0);
    });

    it('a reload relays the state of old instance i to new instance i, and replaces all three', async () => {
      const { d, port } = await started();
      const before = await statusOf(d);
      const record = await reload(d);
      assert.equal(record.outcome, 'promoted', JSON.stringify(record));
      const after = await d.waitStatus(allReady);
      assert.equal(after.generation, 2);
      const replies = await byInstance(port, 3, (r) => r.generation === '2');
      assert.deepEqual(
        replies.map((r) => [r.instance, r.origin, r.source]),
        [
          [0, 'g1-i0', 'relay'],
          [1, 'g1-i1', 'relay'],
          [2, 'g1-i2', 'relay'],
        ],
      );
      const now = await statusOf(d);
      for (const pid of pidsOf(now)) assert.ok(!pidsOf(before).includes(pid), 'every instance is a new process');
      await d.untilRetired();
      assert.equal(await d.stop(), 0);
    });

    it('max_surge 1: a rolling reload starts one instance at a time, relays each its state, and is promoted', async () => {
      const { d, port } = await started({ orchestration: ['max_surge: 1'] });
      configure(d, port, { orchestration: ['max_surge: 1'] });
      const record = await reload(d);
      assert.equal(record.outcome, 'promoted', JSON.stringify(record));
      const spawned = record.phases.filter((p) => p.phase === 'spawned');
      assert.deepEqual(
        spawned.map((p) => /instance (\d+)/.exec(p.detail ?? '')?.[1]),
        ['0', '1', '2'],
        'one instance per batch',
      );
      await d.waitStatus(allReady);
      const replies = await byInstance(port, 3, (r) => r.generation === '2');
      assert.deepEqual(
        replies.map((r) => r.origin),
        ['g1-i0', 'g1-i1', 'g1-i2'],
      );
      await d.untilRetired();
      assert.equal(await d.stop(), 0);
    });

    it('one instance that never becomes ready rolls the whole reload back; the old instances are untouched', async () => {
      const { d, port } = await started();
      const before = await statusOf(d);
      configure(d, port, { env: ['FAIL_INSTANCE=1'] });
      const record = await reload(d);
      assert.equal(record.outcome, 'rolled_back', JSON.stringify(record));
      assert.match(record.reason ?? '', /instance 1/);
      const after = await d.waitStatus((s) => s.state === 'Running' && (s as StatusReport).candidate === null);
      assert.equal(after.generation, before.generation);
      assert.deepEqual(pidsOf(after as StatusReport), pidsOf(before), 'the same three processes serve');
      const replies = await byInstance(port, 3, () => true);
      assert.deepEqual(
        replies.map((r) => r.generation),
        ['1', '1', '1'],
      );
      assert.equal(await d.stop(), 0);
    });

    it('a rolling reload that fails in its second batch is rolled back; the old instance it replaced starts again', async () => {
      const { d, port } = await started({ orchestration: ['max_surge: 1'] });
      configure(d, port, { env: ['FAIL_INSTANCE=1'], orchestration: ['max_surge: 1'] });
      const record = await reload(d);
      assert.equal(record.outcome, 'rolled_back', JSON.stringify(record));
      configure(d, port, { orchestration: ['max_surge: 1'] });
      const after = await d.waitStatus(allReady, 60000);
      assert.equal(after.generation, 1, 'generation 1 serves again');
      const replies = await byInstance(port, 3, () => true);
      assert.deepEqual(
        replies.map((r) => r.generation),
        ['1', '1', '1'],
      );
      assert.equal(await d.stop(), 0);
    });

    it('one instance killed is restarted alone, in its slot; the other two keep their processes', async () => {
      const { d, port } = await started();
      const before = await statusOf(d);
      const victim = await byInstance(port, 3, () => true);
      process.kill(await d.hostPid(victim[1].pid), 'SIGKILL');
      const after = await d.waitStatus(
        (s) => allReady(s) && (s as StatusReport).instances![1].pid !== before.instances![1].pid,
        60000,
      );
      const a = after as StatusReport;
      assert.equal(a.generation, before.generation, 'no new generation');
      assert.equal(a.instances![0].pid, before.instances![0].pid);
      assert.equal(a.instances![2].pid, before.instances![2].pid);
      assert.deepEqual(
        a.instances!.map((i) => i.restarts),
        [0, 1, 0],
      );
      assert.equal(a.restarts, 1);
      const replies = await byInstance(port, 3, () => true);
      assert.deepEqual(
        replies.map((r) => [r.instance, r.generation]),
        [
          [0, '1'],
          [1, '1'],
          [2, '1'],
        ],
      );
      assert.equal(await d.stop(), 0);
    });

    it('an instance restarted alone loads its own latest checkpoint', async () => {
      const { d, port } = await started({ checkpoint: true });
      const replies = await byInstance(port, 3, () => true);
      // Checkpoint from whichever instance answers: that instance's (checkpoints.test.ts covers the others').
      const stored = await requestJson<{ seq?: number; instance: number; origin: string }>(port, 'POST', '/checkpoint');
      assert.ok(stored.seq !== undefined, JSON.stringify(stored));
      const victim = replies.find((r) => r.instance === stored.instance)!;
      process.kill(await d.hostPid(victim.pid), 'SIGKILL');
      const fresh = await byInstance(port, 3, (r) => r.instance !== victim.instance || r.pid !== victim.pid);
      const restarted = fresh[victim.instance];
      assert.equal(restarted.source, 'checkpoint');
      assert.equal(restarted.origin, stored.origin);
      assert.equal(await d.stop(), 0);
    });

    it('an instance that keeps crashing is a crash loop counted for that instance: Aeterna exits with its code', async () => {
      const { d, port } = await started({ restart: '{ policy: "always", max_restarts: 2, window: "5m" }' });
      configure(d, port, { env: ['CRASH_INSTANCE=2'], restart: '{ policy: "always", max_restarts: 2, window: "5m" }' });
      // Restarts read the running config: a reload applies the one that crashes (its new instance 2 got its state
      // relayed, so it serves on); once killed, instance 2 is restarted alone and crashes each time it is ready.
      assert.equal((await reload(d)).outcome, 'promoted');
      const promoted = await statusOf(d);
      process.kill(await d.hostPid(promoted.instances![2].pid!), 'SIGKILL');
      const exit = await d.run.exit(120000);
      assert.equal(exit.code, 7, 'the crashing instance exit code');
      const loop = d.run.logs().filter((l) => (l as { code?: string }).code === 'E_CRASH_LOOP');
      assert.equal(loop.length, 1);
      assert.equal((loop[0] as { instance?: number }).instance, 2);
      const restarts = d.run.logs().filter((l) => /restarting it alone/.test(String((l as { msg?: string }).msg)));
      assert.ok(
        restarts.every((l) => (l as { instance?: number }).instance === 2),
        'only instance 2 was restarted',
      );
      assert.equal(restarts.length, 2);
    });

    it('the number of instances changes across reloads: 3 -> 4 (instance 3 starts without state), 4 -> 2', async () => {
      const { d, port } = await started();
      configure(d, port, { instances: 4 });
      assert.equal((await reload(d)).outcome, 'promoted');
      await d.waitStatus(allReady);
      const four = await byInstance(port, 4, (r) => r.generation === '2');
      assert.deepEqual(
        four.map((r) => [r.origin, r.source]),
        [
          ['g1-i0', 'relay'],
          ['g1-i1', 'relay'],
          ['g1-i2', 'relay'],
          ['g2-i3', null],
        ],
      );
      await d.untilRetired();
      configure(d, port, { instances: 2 });
      assert.equal((await reload(d)).outcome, 'promoted');
      const s = await d.waitStatus(allReady);
      assert.equal((s as StatusReport).instances!.length, 2);
      const two = await byInstance(port, 2, (r) => r.generation === '3');
      assert.deepEqual(
        two.map((r) => r.origin),
        ['g1-i0', 'g1-i1'],
      );
      await d.untilRetired();
      assert.equal(await d.stop(), 0);
    });

    it('a canary soaks with the whole new set; aeterna rollback restores the whole old set', async () => {
      const { d, port } = await started({ strategy: 'canary', soak: '10m', orchestration: ['max_surge: 1'] });
      const before = await statusOf(d);
      const done = reload(d);
      const soaking = await d.waitStatus((s) => s.state === 'Soaking', 60000);
      const candidate = (soaking as StatusReport).candidate!;
      assert.deepEqual(
        candidate.instances!.map((i) => i.state),
        ['ready', 'ready', 'ready'],
        'max_surge does not apply to a canary: the whole set soaks',
      );
      assert.equal((await d.cli('rollback')).code, 0);
      assert.equal((await done).outcome, 'rolled_back');
      const after = await d.waitStatus((s) => s.state === 'Running' && (s as StatusReport).candidate === null);
      assert.deepEqual(pidsOf(after as StatusReport), pidsOf(before));
      // And promoted: the whole new set serves, each with its predecessor's state.
      const promoted = reload(d);
      await d.waitStatus((s) => s.state === 'Soaking', 60000);
      assert.equal((await d.cli('promote')).code, 0);
      assert.equal((await promoted).outcome, 'promoted');
      const replies = await byInstance(port, 3, (r) => r.generation === '3');
      assert.deepEqual(
        replies.map((r) => r.origin),
        ['g1-i0', 'g1-i1', 'g1-i2'],
      );
      await d.untilRetired();
      assert.equal(await d.stop(), 0);
    });

    it('an old instance killed during a canary soak: the others serve on; after the rollback it is restarted alone', async () => {
      const { d } = await started({ strategy: 'canary', soak: '10m' });
      const before = await statusOf(d);
      const done = reload(d);
      await d.waitStatus((s) => s.state === 'Soaking', 60000);
      process.kill(await d.hostPid(before.instances![1].pid!), 'SIGKILL');
      await d.run.waitFor(/instance 1 exited during the reload/, 60000);
      assert.equal((await statusOf(d)).state, 'Soaking', 'the soak goes on with the two others');
      assert.equal((await d.cli('rollback')).code, 0);
      assert.equal((await done).outcome, 'rolled_back');
      const after = (await d.waitStatus(
        (s) => allReady(s) && (s as StatusReport).instances![1].pid !== before.instances![1].pid,
        60000,
      )) as StatusReport;
      assert.equal(after.generation, before.generation);
      assert.equal(after.instances![0].pid, before.instances![0].pid);
      assert.equal(after.instances![2].pid, before.instances![2].pid);
      assert.equal(await d.stop(), 0);
    });

    it('a weighted canary (weight 50) splits new connections between the whole old set and the whole new set', async () => {
      const { d, port } = await started({ strategy: 'canary', soak: '10m', canary: '{ weight: 50 }' });
      const done = reload(d);
      await d.waitStatus((s) => s.state === 'Soaking', 60000);
      // Every instance of both generations answers some of the fresh connections.
      const seen = new Set<string>();
      for (let i = 0; i < 5000 && seen.size < 6; i++) {
        const r = await getJson<Reply>(port).catch(() => null);
        if (r !== null) seen.add(`${r.generation}/${r.instance}`);
      }
      assert.deepEqual([...seen].sort(), ['1/0', '1/1', '1/2', '2/0', '2/1', '2/2']);
      assert.equal((await d.cli('promote')).code, 0);
      assert.equal((await done).outcome, 'promoted');
      const replies = await byInstance(port, 3, (r) => r.generation === '2');
      assert.deepEqual(
        replies.map((r) => r.origin),
        ['g1-i0', 'g1-i1', 'g1-i2'],
      );
      await d.untilRetired();
      assert.equal(await d.stop(), 0);
    });

    it('the watchdog is per instance: the one that stops pinging is restarted alone, the others keep their processes', async () => {
      const { d } = await started({
        watchdog: '2s',
        env: ['NO_PING_INSTANCE=1'],
        restart: '{ policy: "always", max_restarts: 50, window: "10m" }',
      });
      const before = await statusOf(d);
      const after = (await d.waitStatus(
        (s) => ((s as StatusReport).instances?.[1].restarts ?? 0) >= 2,
        60000,
      )) as StatusReport;
      assert.equal(after.instances![0].pid, before.instances![0].pid);
      assert.equal(after.instances![2].pid, before.instances![2].pid);
      assert.deepEqual([after.instances![0].restarts, after.instances![2].restarts], [0, 0]);
      const fired = d.run.logs().filter((l) => (l as { code?: string }).code === 'E_WATCHDOG');
      assert.ok(fired.length >= 2);
      assert.ok(
        fired.every((l) => (l as { instance?: number }).instance === 1),
        'only instance 1 timed out',
      );
      await d.stop();
    });

    it('/readyz, aeterna_instances and status count the instances: 3 ready, and again once a killed one is back', async () => {
      const metricsPort = await freePort();
      const { d } = await started({ metricsPort });
      const sample = async (state: string): Promise<number | null> =>
        metricSample((await getText(metricsPort, '/metrics')).body, `aeterna_instances{state="${state}"}`);
      assert.equal(await sample('ready'), 3);
      assert.equal((await getText(metricsPort, '/readyz')).status, 200);
      const before = await statusOf(d);
      process.kill(await d.hostPid(before.instances![2].pid!), 'SIGKILL');
      await d.waitStatus(
        (s) => (s as StatusReport).instances![2].pid !== before.instances![2].pid && allReady(s),
        60000,
      );
      assert.equal(await sample('ready'), 3);
      assert.equal((await getText(metricsPort, '/readyz')).status, 200);
      const text = await d.cli('status');
      assert.match(text.stdout, /^instances: +0: pid \d+, ready, 0 restarts$/m);
      assert.match(text.stdout, /^ +2: pid \d+, ready, 1 restart$/m);
      assert.equal(await d.stop(), 0);
    });

    it('as PID 1, Aeterna crashing (SIGSEGV) recovers and takes over all three instances; one killed afterwards is restarted alone', async () => {
      const { d, port } = await started();
      const before = await statusOf(d);
      await d.run.signal('SIGSEGV');
      const after = (await d.waitStatus(
        (s) => ((s as StatusReport).reexecs ?? 0) === 1 && allReady(s),
        60000,
      )) as StatusReport;
      assert.deepEqual(pidsOf(after), pidsOf(before), 'the same three processes, taken over');
      assert.equal(after.generation, before.generation);
      process.kill(await d.hostPid(after.instances![0].pid!), 'SIGKILL');
      const restarted = (await d.waitStatus(
        (s) => allReady(s) && (s as StatusReport).instances![0].pid !== after.instances![0].pid,
        60000,
      )) as StatusReport;
      assert.deepEqual(pidsOf(restarted).slice(1), pidsOf(after).slice(1));
      const replies = await byInstance(port, 3, () => true);
      assert.deepEqual(
        replies.map((r) => r.generation),
        ['1', '1', '1'],
      );
      assert.equal((await reload(d)).outcome, 'promoted');
      await d.untilRetired();
      assert.equal(await d.stop(), 0);
    });

    it('aeterna upgrade carries all three instances; a reload afterwards relays each its state', async () => {
      const { d, port } = await started();
      const before = await statusOf(d);
      await upgradeTimes(d, 1);
      const after = await d.waitStatus(allReady);
      assert.deepEqual(pidsOf(after as StatusReport), pidsOf(before), 'the same three processes, adopted');
      assert.equal((await reload(d)).outcome, 'promoted');
      const replies = await byInstance(port, 3, (r) => r.generation === '2');
      assert.deepEqual(
        replies.map((r) => [r.origin, r.source]),
        [
          ['g1-i0', 'relay'],
          ['g1-i1', 'relay'],
          ['g1-i2', 'relay'],
        ],
      );
      await d.untilRetired();
      assert.equal(await d.stop(), 0);
    });

    it(
      "app_output json with three instances: each line is tagged with its instance, and every instance's pipes cross an aeterna upgrade (none dies writing, none restarts)",
      { timeout: 180_000 },
      async () => {
        const { d, port } = await started({ env: ['PRINT_REQUESTS=1'], appOutput: 'json' });
        const before = await statusOf(d);
        await upgradeTimes(d, 1);
        await d.waitStatus(allReady);
        const replies = await byInstance(port, 3, () => true);
        const after = await statusOf(d);
        assert.deepEqual(pidsOf(after), pidsOf(before), 'the same three processes');
        assert.equal(after.restarts, 0, 'no instance died writing into a pipe the upgrade closed');
        for (const r of replies) {
          const line = `REQ ${r.pid} instance ${r.instance}`;
          await d.run.waitFor(new RegExp(`"instance":${r.instance},"pid":${r.pid},"stream":"stdout","line":"${line}"`));
        }
        await d.untilRetired();
        assert.equal(await d.stop(), 0);
      },
    );
  },
);

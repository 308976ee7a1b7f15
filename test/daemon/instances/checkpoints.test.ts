// Checkpoints per instance (service.instances), end to end: Aeterna as PID 1 running a real Node app as several
// instances, each storing its own state ("g<generation>-i<instance>") as a checkpoint. Each test asserts which
// instance gets which checkpoint back: restarted alone after SIGKILL, started beyond the old count by a reload,
// given by on_dump_failure: checkpoint, after a restart of Aeterna (durable files, one per instance), and after
// `aeterna upgrade` and a recovery from Aeterna's crash (memfds handed over).
// The last checkpoint stored is always instance 0's, so that one instance given another's would show.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fixture, freePort, pidNamespaceUnavailable } from '../../helpers/aeterna';
import { Daemon, statusOf, upgradeTimes } from '../../helpers/daemon';
import { getJson, requestJson } from '../../helpers/load';
import type { ReloadRecord, StatusReport } from '../../../src/orchestrator/types';

const APP = [process.execPath, fixture('apps', 'instances_app.js')];
const daemons: Daemon[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
});

type Reply = { pid: number; generation: string; instance: number; origin: string; source: string | null };
type Stored = { pid: number; generation: string; instance: number; origin: string; seq?: number; error?: string };

interface Options {
  instances: number;
  /** state_handoff.checkpoint.path (durable checkpoints), relative to the daemon's directory. */
  file?: string;
  /** The app's environment (see instances_app.js). */
  env?: string[];
  /** state_handoff.on_dump_failure: checkpoint. */
  fallBackToCheckpoint?: boolean;
}

function configure(d: Daemon, port: number, o: Options): void {
  const file = o.file ? `, path: "${path.join(d.dir, o.file)}"` : '';
  d.write({
    command: APP,
    port,
    readiness: '{ mode: "notify", timeout: "60s" }',
    stopTimeout: '10s',
    restart: '{ policy: "always", max_restarts: 5, window: "60s" }',
    env: o.env ?? [],
    extraService: `  instances: ${o.instances}\n`,
    handoff:
      `{ enabled: true, socket_path: "${d.dir}/state.sock", timeout: "30s", ` +
      `${o.fallBackToCheckpoint ? 'on_dump_failure: "checkpoint", ' : ''}checkpoint: { enabled: true${file} } }`,
  });
}

const allReady = (s: { state: string }): boolean =>
  s.state === 'Running' &&
  ((s as StatusReport).instances ?? []).length > 0 &&
  ((s as StatusReport).instances ?? []).every((i) => i.state === 'ready');

async function started(o: Options): Promise<{ d: Daemon; port: number }> {
  const port = await freePort();
  const d = new Daemon({ command: APP });
  configure(d, port, o);
  d.start(true);
  daemons.push(d);
  await d.waitStatus(allReady, 60000);
  return { d, port };
}

/**
 * One answer from each of `instances` that `wanted` accepts, asking on a new connection each time (the kernel
 * picks the process that accepts it). A hang guard bounds the number of requests, not the time.
 */
async function byInstance(port: number, instances: number[], wanted: (r: Reply) => boolean): Promise<Reply[]> {
  const found = new Map<number, Reply>();
  for (let i = 0; i < 5000 && found.size < instances.length; i++) {
    const r = await getJson<Reply>(port).catch(() => null);
    if (r !== null && instances.includes(r.instance) && wanted(r)) found.set(r.instance, r);
  }
  assert.equal(found.size, instances.length, `answers from instances ${[...found.keys()].join(', ')}`);
  return [...found.values()].sort((a, b) => a.instance - b.instance);
}

/**
 * Have each of `instances` store its state as a checkpoint (POST /checkpoint until each has answered with a seq),
 * then more until the last one stored is instance 0's; only processes of `generation` count. Returns each
 * instance's last stored checkpoint.
 */
async function checkpointEach(port: number, instances: number[], generation = '1'): Promise<Map<number, Stored>> {
  const stored = new Map<number, Stored>();
  let last: Stored | null = null;
  for (let i = 0; i < 5000 && (stored.size < instances.length || last?.instance !== 0); i++) {
    const r = await requestJson<Stored>(port, 'POST', '/checkpoint').catch(() => null);
    if (r === null || r.generation !== generation || !instances.includes(r.instance)) continue;
    assert.ok(r.seq !== undefined, `instance ${r.instance} checkpointed: ${JSON.stringify(r)}`);
    stored.set(r.instance, r);
    last = r;
  }
  assert.deepEqual([...stored.keys()].sort(), instances, 'each instance stored a checkpoint');
  assert.equal(last?.instance, 0, 'the last checkpoint stored is instance 0');
  return stored;
}

async function reload(d: Daemon): Promise<ReloadRecord> {
  const r = await d.cli('reload', '--json');
  const lines = r.stdout.trim().split('\n');
  const last = JSON.parse(lines[lines.length - 1]) as { record?: ReloadRecord } & ReloadRecord;
  return last.record ?? last;
}

/** SIGKILL instance `instance` and wait until its replacement, restarted alone, is ready. */
async function killInstance(d: Daemon, instance: number): Promise<StatusReport> {
  const before = await statusOf(d);
  const pid = before.instances![instance].pid!;
  process.kill(await d.hostPid(pid), 'SIGKILL');
  return (await d.waitStatus(
    (s) => allReady(s) && (s as StatusReport).instances![instance].pid !== pid,
    60000,
  )) as StatusReport;
}

const describeState = (r: Reply): [number, string, string | null] => [r.instance, r.origin, r.source];

describe(
  'checkpoints per instance: each instance loads its own (Aeterna as PID 1)',
  { skip: pidNamespaceUnavailable() ?? false, timeout: 600_000 },
  () => {
    it("instance 1 killed with SIGKILL is restarted with instance 1's checkpoint; instances 0 and 2 are untouched", async () => {
      const { d, port } = await started({ instances: 3 });
      const stored = await checkpointEach(port, [0, 1, 2]);
      const before = await statusOf(d);
      const killed = before.instances![1].pid;
      const after = await killInstance(d, 1);
      assert.equal(after.instances![0].pid, before.instances![0].pid, 'instance 0 still runs');
      assert.equal(after.instances![2].pid, before.instances![2].pid, 'instance 2 still runs');
      const replies = await byInstance(port, [0, 1, 2], (r) => r.pid !== killed);
      assert.deepEqual(replies.map(describeState), [
        [0, 'g1-i0', null],
        [1, 'g1-i1', 'checkpoint'],
        [2, 'g1-i2', null],
      ]);
      assert.deepEqual(
        (await statusOf(d)).instances!.map((i) => i.checkpoint?.seq),
        [0, 1, 2].map((i) => stored.get(i)!.seq),
        'status shows the seq each instance last stored',
      );
      const text = await d.cli('status');
      assert.match(text.stdout, new RegExp(`\\b1: pid \\d+, ready, 1 restart, checkpoint ${stored.get(1)!.seq} \\(`));
      assert.equal(await d.stop(), 0);
    });

    it("service.instances 2 -> 3 -> 2 -> 3: a new instance 2 starts without state, then gets back instance 2's checkpoint", async () => {
      const { d, port } = await started({ instances: 2 });
      await checkpointEach(port, [0, 1]);
      configure(d, port, { instances: 3 });
      assert.equal((await reload(d)).outcome, 'promoted');
      await d.waitStatus(allReady, 60000);
      const grown = await byInstance(port, [0, 1, 2], (r) => r.generation === '2');
      assert.deepEqual(
        grown.map(describeState),
        [
          [0, 'g1-i0', 'relay'],
          [1, 'g1-i1', 'relay'],
          [2, 'g2-i2', null],
        ],
        'instance 2 has no checkpoint of its own: it starts without state',
      );
      await d.untilRetired();
      await checkpointEach(port, [0, 2], '2');
      configure(d, port, { instances: 2 });
      assert.equal((await reload(d)).outcome, 'promoted');
      await d.untilRetired();
      configure(d, port, { instances: 3 });
      assert.equal((await reload(d)).outcome, 'promoted');
      await d.waitStatus(allReady, 60000);
      const regrown = await byInstance(port, [0, 1, 2], (r) => r.generation === '4');
      assert.deepEqual(
        regrown.map(describeState),
        [
          [0, 'g1-i0', 'relay'],
          [1, 'g1-i1', 'relay'],
          [2, 'g2-i2', 'checkpoint'],
        ],
        'the checkpoint of instance 2 was kept while it did not run, and only instance 2 gets it',
      );
      await d.untilRetired();
      assert.equal(await d.stop(), 0);
    });

    it("on_dump_failure checkpoint: when the old instances refuse their dump, new instance i loads instance i's checkpoint", async () => {
      const { d, port } = await started({ instances: 3, env: ['REFUSE_DUMP=1'], fallBackToCheckpoint: true });
      await checkpointEach(port, [0, 1, 2]);
      const record = await reload(d);
      assert.equal(record.outcome, 'promoted', JSON.stringify(record));
      await d.waitStatus(allReady, 60000);
      const replies = await byInstance(port, [0, 1, 2], (r) => r.generation === '2');
      assert.deepEqual(replies.map(describeState), [
        [0, 'g1-i0', 'checkpoint'],
        [1, 'g1-i1', 'checkpoint'],
        [2, 'g1-i2', 'checkpoint'],
      ]);
      await d.untilRetired();
      assert.equal(await d.stop(), 0);
    });

    it('durable checkpoints: each of three instances has its own file, and after a restart of Aeterna each loads its own', async () => {
      const { d, port } = await started({ instances: 3, file: 'checkpoint' });
      const stored = await checkpointEach(port, [0, 1, 2]);
      assert.equal(await d.stop(), 0);
      d.start(true);
      await d.waitStatus(allReady, 60000);
      const replies = await byInstance(port, [0, 1, 2], () => true);
      assert.deepEqual(replies.map(describeState), [
        [0, 'g1-i0', 'checkpoint'],
        [1, 'g1-i1', 'checkpoint'],
        [2, 'g1-i2', 'checkpoint'],
      ]);
      const files = ['checkpoint', 'checkpoint.1', 'checkpoint.2'].filter((f) => fs.existsSync(path.join(d.dir, f)));
      assert.deepEqual(files, ['checkpoint', 'checkpoint.1', 'checkpoint.2'], 'one file per instance');
      assert.deepEqual(
        (await statusOf(d)).instances!.map((i) => i.checkpoint?.seq),
        [0, 1, 2].map((i) => stored.get(i)!.seq),
        'each file loaded as its instance checkpoint',
      );
      assert.equal(await d.stop(), 0);
    });

    it("aeterna upgrade carries each instance's checkpoint: instance 2 killed afterwards loads instance 2's", async () => {
      const { d, port } = await started({ instances: 3 });
      const stored = await checkpointEach(port, [0, 1, 2]);
      await upgradeTimes(d, 1);
      const s = (await d.waitStatus(allReady, 60000)) as StatusReport;
      const killed = s.instances![2].pid;
      await killInstance(d, 2);
      const [restarted] = await byInstance(port, [2], (r) => r.pid !== killed);
      assert.deepEqual(describeState(restarted), [2, 'g1-i2', 'checkpoint']);
      assert.deepEqual(
        (await statusOf(d)).instances!.map((i) => i.checkpoint?.seq),
        [0, 1, 2].map((i) => stored.get(i)!.seq),
        'the new Aeterna holds every instance checkpoint',
      );
      assert.equal(await d.stop(), 0);
    });

    it("Aeterna crashing (SIGSEGV) recovers with each instance's checkpoint: instance 1 killed afterwards loads instance 1's", async () => {
      const { d, port } = await started({ instances: 3 });
      await checkpointEach(port, [0, 1, 2]);
      await d.run.signal('SIGSEGV');
      const s = (await d.waitStatus(
        (r) => ((r as StatusReport).reexecs ?? 0) === 1 && allReady(r),
        60000,
      )) as StatusReport;
      const killed = s.instances![1].pid;
      await killInstance(d, 1);
      const [restarted] = await byInstance(port, [1], (r) => r.pid !== killed);
      assert.deepEqual(describeState(restarted), [1, 'g1-i1', 'checkpoint']);
      assert.equal(await d.stop(), 0);
    });
  },
);

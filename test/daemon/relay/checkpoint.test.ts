// Checkpoints end to end: a real daemon, a real app on aeterna/client storing
// its state with relay.checkpoint(), and a real kill -9 of the app. The
// generation Aeterna restarts loads the latest complete checkpoint; a refused
// or cut-short checkpoint never replaces it.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import { descendantsOf, fixture, freePort, pidNamespaceUnavailable, processMemory } from '../../helpers/aeterna';
import { Daemon } from '../../helpers/daemon';
import { getText, metricSample, requestJson } from '../../helpers/load';

const APP = [process.execPath, fixture('apps', 'stateful_app.js')];
const PYTHON_APP = ['python3', fixture('python', 'stateful_app.py')];
const daemons: Daemon[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
});

type Reply = {
  pid: number;
  generation: string;
  history?: string[];
  size?: number;
  sha256?: string;
  seq?: number;
  error?: string;
  source: string | null;
  loaded_seq: number | null;
};
const request = (
  port: number,
  method: string,
  path: string,
  body?: string,
  agent: http.Agent | false = false,
): Promise<Reply> => requestJson<Reply>(port, method, path, body, agent);

/** `handoff`: more keys of state_handoff (its timeout among them). */
async function started(
  env: string[],
  checkpoint = '{ enabled: true }',
  pid1 = false,
  command = APP,
  metricsPort?: number,
  handoff = 'timeout: "60s"',
): Promise<{ d: Daemon; port: number }> {
  const port = await freePort();
  const d = new Daemon({
    command,
    port,
    metricsPort,
    env,
    readiness: '{ mode: "notify", timeout: "60s" }',
    stopTimeout: '5s',
    restart: '{ policy: "always", max_restarts: 10, window: "60s" }',
  });
  d.write({
    ...d.options,
    handoff: `{ enabled: true, socket_path: "${d.dir}/state.sock", ${handoff}, checkpoint: ${checkpoint} }`,
  });
  d.start(pid1);
  daemons.push(d);
  await d.waitStatus((s) => s.state === 'Running');
  return { d, port };
}

/** The pid of the serving app: Aeterna's only descendant (as PID 1, status shows pids of its namespace). */
async function appPid(d: Daemon): Promise<number> {
  const app = descendantsOf(await d.run.aeternaPid());
  assert.equal(app.length, 1);
  return app[0];
}

type ReloadRecord = {
  outcome: string;
  code: string | null;
  reason: string | null;
  phases: Array<{ phase: string; detail?: string }>;
};
const reloadRecord = async (d: Daemon): Promise<{ code: number | null; record: ReloadRecord }> => {
  const r = await d.cli('reload', '--json');
  const lines = r.stdout
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as { type: string; record?: ReloadRecord });
  return { code: r.code, record: lines.find((l) => l.type === 'outcome')!.record! };
};

/** kill -9 the serving app and wait until Aeterna serves with the generation it restarted. */
async function killApp(d: Daemon): Promise<void> {
  const before = await d.status();
  process.kill(await appPid(d), 'SIGKILL');
  await d.waitStatus((s) => s.state === 'Running' && s.generation > before.generation, 60000);
}

// A hang guard, not a timing: its 15 tests each start a daemon as PID 1, about 10 s each on a loaded machine.
describe('checkpoints', { timeout: 600000 }, () => {
  it(
    'kill -9 of the app (Aeterna as PID 1): the restarted generation loads the latest JSON checkpoint',
    { skip: pidNamespaceUnavailable() ?? false },
    async () => {
      const { d, port } = await started(['CHECKPOINT=1'], '{ enabled: true }', true);
      const messages = ['hello', 'what is a subreaper?', 'and SCM_RIGHTS?'];
      const seqs: Array<number | undefined> = [];
      for (const m of messages) seqs.push((await request(port, 'POST', '/sessions/s1/messages', m)).seq);
      assert.deepEqual(seqs, [1, 2, 3]);
      const first = await request(port, 'GET', '/sessions/s1');
      assert.equal(first.source, null, 'the first generation starts with no state');
      await killApp(d);
      const after = await request(port, 'GET', '/sessions/s1');
      assert.notEqual(after.pid, first.pid);
      assert.deepEqual(after.history, messages);
      assert.equal(after.source, 'checkpoint');
      assert.equal(after.loaded_seq, 3);
      assert.equal(await d.stop(), 0);
    },
  );

  it('kill -9 of a Python app: relay.checkpoint() in the Python SDK is restored the same way', async () => {
    const { d, port } = await started(['CHECKPOINT=1'], '{ enabled: true }', false, PYTHON_APP);
    assert.equal((await request(port, 'POST', '/sessions/p1/messages', 'one')).seq, 1);
    assert.equal((await request(port, 'POST', '/sessions/p1/messages', 'two')).seq, 2);
    await killApp(d);
    const after = await request(port, 'GET', '/sessions/p1');
    assert.deepEqual(after.history, ['one', 'two']);
    assert.equal(after.source, 'checkpoint');
    assert.equal(after.loaded_seq, 2);
    assert.equal(await d.stop(), 0);
  });

  it('kill -9 of the app: a 4 MiB binary checkpoint is restored byte-exact', async () => {
    const { d, port } = await started(['STATE_MODE=binary', `BLOB_BYTES=${4 << 20}`]);
    const before = await request(port, 'GET', '/blob');
    assert.equal((await request(port, 'POST', '/checkpoint')).seq, 1);
    await killApp(d);
    const after = await request(port, 'GET', '/blob');
    assert.notEqual(after.pid, before.pid);
    assert.equal(after.size, 4 << 20);
    assert.equal(after.sha256, before.sha256);
    assert.equal(after.source, 'checkpoint');
    assert.equal(await d.stop(), 0);
  });

  it('kill -9 of the app: a 256 MiB memfd checkpoint is kept as the fd itself (Aeterna does not copy it) and restored', async (t) => {
    const { d, port } = await started(['STATE_MODE=memfd', `BLOB_BYTES=${256 << 20}`]);
    const aeterna = await d.run.aeternaPid();
    const before = await request(port, 'GET', '/blob');
    const mem0 = processMemory(aeterna);
    assert.equal((await request(port, 'POST', '/checkpoint')).seq, 1);
    const grewMiB = (processMemory(aeterna).hwm - mem0.rss) / 1024;
    t.diagnostic(`Aeterna's peak RSS grew by ${grewMiB.toFixed(1)} MiB keeping a 256 MiB memfd checkpoint`);
    assert.ok(grewMiB < 16, `Aeterna's peak RSS grew by ${grewMiB.toFixed(0)} MiB keeping a 256 MiB memfd checkpoint`);
    await killApp(d);
    const after = await request(port, 'GET', '/blob');
    assert.equal(after.size, 256 << 20);
    assert.equal(after.sha256, before.sha256);
    assert.equal(after.source, 'checkpoint');
    assert.equal(await d.stop(), 0);
  });

  it('a checkpoint over max_size is refused with too_large and the previous one is kept; metrics and status say so', async () => {
    const metricsPort = await freePort();
    const { d, port } = await started(['CHECKPOINT=1'], '{ enabled: true, max_size: "1KiB" }', false, APP, metricsPort);
    assert.equal((await request(port, 'POST', '/sessions/s1/messages', 'small')).seq, 1);
    const big = await request(port, 'POST', '/sessions/s1/messages', 'x'.repeat(2048));
    assert.equal(big.seq, undefined);
    assert.equal(big.error, 'too_large');
    // Aeterna's log line travels its own pipe: wait for it (a hang guard), then check what it says.
    await d.run.waitFor(
      /"code":"too_large"[^\n]*"msg":"checkpoint refused|"msg":"checkpoint refused[^\n]*"code":"too_large"/,
    );
    assert.ok(d.run.logs().some((l) => String(l.msg).startsWith('checkpoint refused') && l.code === 'too_large'));
    const metrics = (await getText(metricsPort, '/metrics')).body;
    assert.equal(metricSample(metrics, 'aeterna_checkpoints_total{result="stored"}'), 1);
    assert.equal(metricSample(metrics, 'aeterna_checkpoints_total{result="too_large"}'), 1);
    assert.equal(
      metricSample(metrics, 'aeterna_checkpoint_bytes'),
      Buffer.byteLength(JSON.stringify({ s1: ['small'] })),
    );
    assert.ok((metricSample(metrics, 'aeterna_checkpoint_age_seconds') ?? -1) >= 0);
    const status = await d.cli('status', '--json');
    assert.equal((JSON.parse(status.stdout) as { checkpoint: { seq: number } }).checkpoint.seq, 1);
    assert.match((await d.cli('status')).stdout, /checkpoint:\s+seq 1, /);
    await killApp(d);
    const after = await request(port, 'GET', '/sessions/s1');
    assert.deepEqual(after.history, ['small']);
    assert.equal(after.loaded_seq, 1);
    assert.equal(await d.stop(), 0);
  });

  it('a checkpoint whose bytes do not match its sha256 is refused with checksum_mismatch and never stored', async () => {
    const { d, port } = await started(['CHECKPOINT=1', 'BAD_SHA=1']);
    const r = await request(port, 'POST', '/sessions/s1/messages', 'tampered');
    assert.equal(r.error, 'checksum_mismatch');
    assert.equal(r.seq, undefined);
    assert.equal((JSON.parse((await d.cli('status', '--json')).stdout) as { checkpoint: unknown }).checkpoint, null);
    await killApp(d);
    const after = await request(port, 'GET', '/sessions/s1');
    assert.equal(after.source, null);
    assert.deepEqual(after.history, []);
    assert.equal(await d.stop(), 0);
  });

  it('an app killed in the middle of a checkpoint stream: the restarted generation gets the previous checkpoint', async () => {
    const { d, port } = await started(['STATE_MODE=binary', `BLOB_BYTES=${64 << 20}`]);
    const before = await request(port, 'GET', '/blob');
    assert.equal((await request(port, 'POST', '/checkpoint')).seq, 1);
    const generation = (await d.status()).generation;
    void request(port, 'POST', '/checkpoint-and-die').catch(() => undefined);
    await d.waitStatus((s) => s.state === 'Running' && s.generation > generation, 60000);
    assert.ok(
      d.run.logs().some((l) => String(l.msg).startsWith('checkpoint cut short')),
      'Aeterna saw the checkpoint cut short',
    );
    const after = await request(port, 'GET', '/blob');
    assert.equal(after.source, 'checkpoint');
    assert.equal(after.loaded_seq, 1);
    assert.equal(after.sha256, before.sha256);
    assert.equal(await d.stop(), 0);
  });

  it('a durable checkpoint (path) survives SIGKILL of Aeterna and is loaded by a new aeterna start', async () => {
    const { d, port } = await started(['CHECKPOINT=1'], '{ enabled: true, path: "checkpoint.bin" }');
    assert.equal((await request(port, 'POST', '/sessions/s1/messages', 'kept')).seq, 1);
    assert.equal((await request(port, 'POST', '/sessions/s1/messages', 'on disk')).seq, 2);
    await d.run.killAll(); // SIGKILL: Aeterna and the app
    assert.ok(fs.existsSync(`${d.dir}/checkpoint.bin`));
    d.start();
    await d.waitStatus((s) => s.state === 'Running');
    const after = await request(port, 'GET', '/sessions/s1');
    assert.deepEqual(after.history, ['kept', 'on disk']);
    assert.equal(after.source, 'checkpoint');
    assert.equal(after.loaded_seq, 2);
    // Numbering goes on from the file's.
    assert.equal((await request(port, 'POST', '/sessions/s1/messages', 'next')).seq, 3);
    assert.equal(await d.stop(), 0);
  });

  it('a corrupt, truncated or wrong-version checkpoint file is logged (E_CHECKPOINT_CORRUPT), set aside, and the app starts without state', async () => {
    const { d, port } = await started(['CHECKPOINT=1'], '{ enabled: true, path: "checkpoint.bin" }');
    assert.equal((await request(port, 'POST', '/sessions/s1/messages', 'x')).seq, 1);
    assert.equal(await d.stop(), 0);
    const file = `${d.dir}/checkpoint.bin`;
    const good = fs.readFileSync(file);
    const flipped = Buffer.from(good);
    flipped[flipped.length - 2] ^= 0xff;
    const version = Buffer.from(good);
    version.writeUInt32BE(2, 8);
    const variants: Array<[string, Buffer]> = [
      ['corrupt', flipped],
      ['truncated', good.subarray(0, good.length - 3)],
      ['wrong version', version],
    ];
    for (const [what, bytes] of variants) {
      fs.writeFileSync(file, bytes);
      fs.rmSync(`${file}.corrupt`, { force: true });
      d.start();
      await d.waitStatus((s) => s.state === 'Running');
      const after = await request(port, 'GET', '/sessions/s1');
      assert.equal(after.source, null, `${what}: no state offered`);
      assert.deepEqual(after.history, [], what);
      assert.ok(
        d.run.logs().some((l) => l.code === 'E_CHECKPOINT_CORRUPT'),
        `${what}: logged`,
      );
      assert.ok(fs.existsSync(`${file}.corrupt`) && !fs.existsSync(file), `${what}: set aside`);
      assert.equal(await d.stop(), 0);
    }
  });

  it("Aeterna's RSS stays bounded while it stores a 256 MiB streamed checkpoint", async (t) => {
    const { d, port } = await started(['STATE_MODE=binary', `BLOB_BYTES=${256 << 20}`]);
    const aeterna = await d.run.aeternaPid();
    const mem0 = processMemory(aeterna);
    assert.equal((await request(port, 'POST', '/checkpoint')).seq, 1);
    const grewMiB = (processMemory(aeterna).hwm - mem0.rss) / 1024;
    t.diagnostic(`Aeterna's peak RSS grew by ${grewMiB.toFixed(1)} MiB storing a 256 MiB streamed checkpoint`);
    assert.ok(
      grewMiB < 64,
      `Aeterna's peak RSS grew by ${grewMiB.toFixed(0)} MiB storing a 256 MiB checkpoint (written to a memfd as it arrives)`,
    );
    assert.equal(await d.stop(), 0);
  });

  it('on_dump_failure: checkpoint: a reload whose old generation is SIGSTOPped goes on with the latest checkpoint', async () => {
    const { d, port } = await started(
      ['CHECKPOINT=1'],
      '{ enabled: true }',
      false,
      APP,
      undefined,
      'timeout: "2s", on_dump_failure: "checkpoint"',
    );
    assert.equal((await request(port, 'POST', '/sessions/s1/messages', 'one')).seq, 1);
    assert.equal((await request(port, 'POST', '/sessions/s1/messages', 'two')).seq, 2);
    const old = await appPid(d);
    process.kill(old, 'SIGSTOP'); // it can never answer the dump
    const { code, record } = await reloadRecord(d);
    assert.equal(code, 0);
    assert.equal(record.outcome, 'promoted');
    const relayed = record.phases.find((p) => p.phase === 'relayed');
    assert.match(relayed?.detail ?? '', /from checkpoint 2 \(/);
    assert.ok(
      record.phases.some(
        (p) => p.phase === 'relaying' && /checkpoint 2 .*generation 1 could not dump/.test(p.detail ?? ''),
      ),
    );
    assert.ok(
      d.run
        .logs()
        .some(
          (l) =>
            /generation 1 could not dump its state .*going on with checkpoint 2/.test(String(l.msg)) && l.seq === 2,
        ),
    );
    await d.untilRetired(); // the reload answers at promotion: until its SIGTERM is handled the old one may accept
    const after = await request(port, 'GET', '/sessions/s1');
    assert.equal(after.generation, '2');
    assert.deepEqual(after.history, ['one', 'two']);
    assert.equal(after.source, 'checkpoint');
    assert.equal(after.loaded_seq, 2);
    // The reload is answered at promotion; the stopped generation retires until its SIGKILL at stop_timeout.
    const aeterna = await d.run.aeternaPid();
    for (const deadline = Date.now() + 60_000; descendantsOf(aeterna).includes(old) && Date.now() < deadline;)
      await new Promise((r) => setTimeout(r, 100));
    assert.equal(descendantsOf(aeterna).includes(old), false, 'the stopped generation was killed');
    assert.equal(await d.stop(), 0);
  });

  for (const how of ['refuses the dump (ack ok:false)', 'is killed with SIGKILL while asked to dump'] as const) {
    it(`on_dump_failure: checkpoint: a reload whose old generation ${how} goes on with the latest checkpoint`, async () => {
      const env = ['CHECKPOINT=1', how.startsWith('refuses') ? 'FAIL_DUMP=1' : 'HANG_DUMP=1'];
      const { d, port } = await started(
        env,
        '{ enabled: true }',
        false,
        APP,
        undefined,
        'timeout: "60s", on_dump_failure: "checkpoint"',
      );
      assert.equal((await request(port, 'POST', '/sessions/s1/messages', 'one')).seq, 1);
      const old = await appPid(d);
      const reload = reloadRecord(d);
      if (how.startsWith('is killed')) {
        await d.run.waitFor(/relay: dump requested/);
        process.kill(old, 'SIGKILL');
      }
      const { code, record } = await reload;
      assert.equal(code, 0, record.reason ?? '');
      assert.equal(record.outcome, 'promoted');
      assert.match(record.phases.find((p) => p.phase === 'relayed')?.detail ?? '', /from checkpoint 1 \(/);
      await d.untilRetired(); // the reload answers at promotion: until its SIGTERM is handled the old one may accept
      const after = await request(port, 'GET', '/sessions/s1');
      assert.equal(after.generation, '2');
      assert.deepEqual(after.history, ['one']);
      assert.equal(after.source, 'checkpoint');
      assert.equal(after.loaded_seq, 1);
      assert.equal(await d.stop(), 0);
    });
  }

  it('on_dump_failure: checkpoint with no checkpoint stored: the reload rolls back and the old generation serves on untouched (and its late answer is dropped)', async () => {
    const { d, port } = await started(
      [],
      '{ enabled: true }',
      false,
      APP,
      undefined,
      'timeout: "2s", on_dump_failure: "checkpoint"',
    );
    await request(port, 'POST', '/sessions/s1/messages', 'kept');
    const old = await appPid(d);
    process.kill(old, 'SIGSTOP');
    const { code, record } = await reloadRecord(d);
    assert.equal(code, 1);
    assert.equal(record.outcome, 'rolled_back');
    assert.equal(record.code, 'E_RELAY_FAILED');
    assert.match(record.reason ?? '', /timed out after 2s; no checkpoint is stored/);
    process.kill(old, 'SIGCONT'); // it answers the abandoned dump now: Aeterna drops it
    await d.run.waitFor(/a state arrived after its dump was abandoned; dropped/);
    const after = await request(port, 'GET', '/sessions/s1');
    assert.equal(after.pid, old);
    assert.equal(after.generation, '1');
    assert.deepEqual(after.history, ['kept']);
    // Its connection is usable again: the next reload relays its live state.
    const next = await reloadRecord(d);
    assert.equal(next.record.outcome, 'promoted');
    await d.untilRetired(); // the reload answers at promotion: until its SIGTERM is handled the old one may accept
    const relayed = await request(port, 'GET', '/sessions/s1');
    assert.equal(relayed.generation, '3'); // 2 was the one rolled back
    assert.deepEqual(relayed.history, ['kept']);
    assert.equal(relayed.source, 'relay');
    assert.equal(await d.stop(), 0);
  });

  it('an "fds": false client (as the Java SDK) is streamed the stored memfd checkpoint as data frames with its sha256', async () => {
    const { d, port } = await started(
      ['STATE_MODE=memfd', `BLOB_BYTES=${3 << 20}`],
      '{ enabled: true }',
      false,
      APP,
      undefined,
      'timeout: "2s", on_dump_failure: "checkpoint"',
    );
    const before = await request(port, 'GET', '/blob');
    assert.equal((await request(port, 'POST', '/checkpoint')).seq, 1);
    // The next generation is a client that cannot take a memfd; the old one cannot dump, so it gets the checkpoint.
    process.kill(await appPid(d), 'SIGSTOP');
    d.write({
      ...d.options,
      command: [process.execPath, fixture('apps', 'srp_peer.js'), 'nofds'],
      readiness: '{ mode: "delay", delay: "100ms", timeout: "60s" }',
    });
    const { record } = await reloadRecord(d);
    assert.equal(record.outcome, 'promoted', record.reason ?? '');
    const header = JSON.parse((await d.run.waitFor(/^GOT (\{"op":"load".*)$/m))[1]) as {
      size: number;
      sha256?: string;
      transport?: string;
      source: string;
      seq: number;
    };
    assert.equal(header.transport, undefined, 'streamed, not a memfd');
    assert.equal(header.sha256, before.sha256, 'announced with its sha256 up front');
    const loaded = JSON.parse((await d.run.waitFor(/^LOADED (.*)$/m))[1]) as {
      size: number;
      sha256: string;
      verified: boolean;
      source: string;
      seq: number;
    };
    assert.deepEqual(loaded, { size: 3 << 20, sha256: before.sha256, verified: true, source: 'checkpoint', seq: 1 });
    await d.stop(); // the peer has no SIGTERM handler: its exit code is not the point here
  });
});

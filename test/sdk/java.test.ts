// Java apps under Aeterna: examples/java-hello (a plain JDK HTTP server on
// System.inheritedChannel(), i.e. service.stdin_listener) reloading under load,
// the Java SDK (clients/java), its conformance runner and its checkpoint() tests, and a Java app killed with
// SIGKILL after a checkpoint. Compiled with javac into a temp dir; skipped
// with a message when the JDK is absent (.ci/run installs it).
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT, descendantsOf, freePort, pidNamespaceUnavailable, tempDir } from '../helpers/aeterna';
import { Daemon } from '../helpers/daemon';
import { startLoad } from '../helpers/load';

function javacUnavailable(): string | null {
  const r = spawnSync('javac', ['-version'], { encoding: 'utf8' });
  return r.error
    ? `javac is not available (${r.error.message}); install a JDK 17+ (default-jdk-headless) to run the Java tests`
    : null;
}
const noJavac = javacUnavailable();
const noJava = noJavac ?? pidNamespaceUnavailable();

/** javac the given sources (paths relative to the repo) into a fresh directory; returns it. */
function compile(...sources: string[]): string {
  const out = tempDir('aeterna-java-');
  const r = spawnSync('javac', ['-Xlint:all', '-Werror', '-d', out, ...sources.map((s) => path.join(ROOT, s))], {
    encoding: 'utf8',
  });
  assert.equal(r.status, 0, `javac failed:\n${r.stdout}${r.stderr}`);
  return out;
}

describe(
  'Java SDK conformance (clients/java/ConformanceTest.java)',
  { skip: noJavac ?? false, timeout: 120000 },
  () => {
    it('passes every case of frames.json and exchanges.json, the digest trailer and checkpoint cases included, except the memfd exchanges (a client without fds never gets them) and what requires direct or crc32 (it declares neither)', () => {
      const out = compile('clients/java/Aeterna.java', 'clients/java/ConformanceTest.java');
      const r = spawnSync('java', ['-cp', out, 'dev.aeterna.ConformanceTest', path.join(ROOT, 'test', 'conformance')], {
        encoding: 'utf8',
        timeout: 100000,
      });
      assert.equal(r.status, 0, `${r.stdout}${r.stderr}`);
      type Suite = Record<string, { name: string; requires?: string[]; steps?: Record<string, unknown>[] }[]>;
      const suite = (name: string): Suite =>
        JSON.parse(fs.readFileSync(path.join(ROOT, 'test', 'conformance', name), 'utf8')) as Suite;
      const frames = suite('frames.json');
      const cases = suite('exchanges.json').cases as Array<{
        name: string;
        requires?: string[];
        steps?: Record<string, unknown>[];
      }>;
      const memfd = cases.filter((c) => c.steps!.some((step) => 'memfd' in step)).map((c) => c.name);
      const undeclared = (v: { requires?: string[] }): boolean =>
        (v.requires ?? []).some((r) => r === 'direct' || r === 'crc32');
      const skippedVectors = frames.decode.filter(undeclared).map((v) => `decode: ${v.name}`);
      const skippedCases = cases.filter((c) => undeclared(c) || memfd.includes(c.name)).map((c) => c.name);
      assert.ok(
        cases.some((c) => c.requires?.includes('trailer')),
        'the suite has trailer cases, and they run',
      );
      assert.ok(
        cases.some((c) => c.requires?.includes('checkpoint') && !memfd.includes(c.name)),
        'the suite has checkpoint cases without a memfd, and they run',
      );
      const lines = r.stdout.split('\n');
      assert.deepEqual(
        lines
          .filter((l) => l.startsWith('skip ') && !l.startsWith('skip listeners.json'))
          .map((l) => l.replace(/^skip (.*) \(.*\)$/, '$1')),
        [...skippedVectors, ...skippedCases],
      );
      assert.equal(
        lines.filter((l) => l.startsWith('ok ')).length,
        frames.decode.length - skippedVectors.length + frames.encode.length + cases.length - skippedCases.length,
      );
      assert.equal(lines.filter((l) => l.startsWith('FAIL ')).length, 0);
    });
  },
);

describe(
  'Java SDK checkpoint() (clients/java/CheckpointTest.java)',
  { skip: noJavac ?? false, timeout: 120000 },
  () => {
    it('answers in order, fails with closed when the connection ends, refuses use before load() and from a callback, and is a no-op outside Aeterna', () => {
      const out = compile(
        'clients/java/Aeterna.java',
        'clients/java/ConformanceTest.java',
        'clients/java/CheckpointTest.java',
      );
      const r = spawnSync('java', ['-cp', out, 'dev.aeterna.CheckpointTest'], { encoding: 'utf8', timeout: 100000 });
      assert.equal(r.status, 0, `${r.stdout}${r.stderr}`);
      const lines = r.stdout.split('\n');
      assert.equal(lines.filter((l) => l.startsWith('ok ')).length, 5, r.stdout);
      assert.equal(lines.filter((l) => l.startsWith('FAIL ')).length, 0, r.stdout);
    });
  },
);

const daemons: Daemon[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
});

describe('examples/java-hello (service.stdin_listener)', { skip: noJava ?? false, timeout: 180000 }, () => {
  it('serves on System.inheritedChannel() and reloads 5 times under keep-alive load with zero failed requests', async () => {
    const out = compile('clients/java/Aeterna.java', 'examples/java-hello/Hello.java');
    const port = await freePort();
    const d = new Daemon({
      command: ['java', '-cp', out, 'Hello'],
      port,
      extraService: '  stdin_listener: "http"\n',
      readiness: '{ mode: "delay", delay: "2s", timeout: "30s" }',
      stopTimeout: '15s',
    }).start(true);
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Running');
    const load = startLoad(port, { concurrency: 8 });
    const pids = [(await d.status()).pid];
    for (let i = 1; i <= 5; i++) {
      const r = await d.cli('reload');
      assert.equal(r.code, 0, `reload ${i}: ${r.stderr}`);
      const s = await d.status();
      assert.equal(s.last_reload?.outcome, 'promoted');
      assert.equal(s.generation, i + 1);
      pids.push(s.pid);
    }
    const stats = await load.stop();
    assert.deepEqual(stats.failures, {}, `failed requests: ${JSON.stringify(stats.failures)}`);
    assert.equal(stats.failed, 0);
    assert.ok(stats.ok > 0);
    // Every generation answered (pids in the namespace; the app reports its own pid, as status does).
    assert.deepEqual(
      pids.filter((pid) => stats.pids.includes(pid!)),
      pids,
    );
    assert.equal(await d.stop(), 0);
  });
});

describe('Java SDK (clients/java) under the real daemon', { skip: noJava ?? false, timeout: 120000 }, () => {
  it('a Java app keeps its state across two reloads: loaded, counted, ready over the relay, handed over', async () => {
    const out = compile('clients/java/Aeterna.java', 'test/fixtures/java/Counter.java');
    const d = new Daemon({
      command: ['java', '-cp', out, 'Counter'],
      handoff: true,
      readiness: '{ mode: "notify", timeout: "30s" }',
    }).start(true);
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Running');
    await d.run.waitFor(/^COUNT 1 1 none$/m);
    for (const generation of [2, 3]) {
      const r = await d.cli('reload');
      assert.equal(r.code, 0, r.stderr);
      assert.equal((await d.status()).last_reload?.outcome, 'promoted');
      await d.run.waitFor(new RegExp(`^COUNT ${generation} ${generation} json$`, 'm'));
    }
    assert.equal(d.run.stdout.match(/^HANDED true$/gm)?.length, 2, 'both old generations saw their final sync acked');
    assert.equal(await d.stop(), 0);
  });

  it('kill -9 of a Java app: checkpoint() returns the seq Aeterna stored, and the generation Aeterna restarts loads it, streamed to a client without fds', async () => {
    const out = compile('clients/java/Aeterna.java', 'test/fixtures/java/Counter.java');
    const d = new Daemon({ command: ['java', '-cp', out, 'Counter'], readiness: '{ mode: "notify", timeout: "30s" }' });
    d.write({
      ...d.options,
      handoff: `{ enabled: true, socket_path: "${d.dir}/state.sock", timeout: "10s", checkpoint: { enabled: true } }`,
    });
    d.start(true);
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Running');
    await d.run.waitFor(/^CHECKPOINTED 1 1$/m);
    const status = JSON.parse((await d.cli('status', '--json')).stdout) as { checkpoint: { seq: number } | null };
    assert.equal(status.checkpoint?.seq, 1, 'Aeterna holds the checkpoint the Java app stored');
    const app = descendantsOf(await d.run.aeternaPid());
    assert.equal(app.length, 1);
    process.kill(app[0], 'SIGKILL');
    await d.waitStatus((s) => s.state === 'Running' && s.generation === 2, 60000);
    const restarted = (await d.run.waitFor(/^COUNT 2 (\d+) (\w+)$/m)).slice(1);
    // A client whose hello said "fds": false is streamed the stored checkpoint as data frames (docs/srp.md).
    assert.deepEqual(restarted, ['2', 'json'], 'the restarted generation loaded the count from the checkpoint');
    await d.run.waitFor(/^LOADED checkpoint 1$/m);
    await d.run.waitFor(/^CHECKPOINTED 2 \d+$/m); // the restarted generation stores checkpoints too
    assert.equal(await d.stop(), 0);
  });
});

// The Go SDK's drain (clients/go/drain.go) under the real daemon: examples/go-counter, which stops with
// client.Drain, reloaded several times under keep-alive load. Server.Shutdown alone closes idle keep-alive
// connections at once and cuts the requests clients are writing on them at that moment; with Drain no request
// fails, and the counter (handed over by the State Relay, final sync included) counted every one of them.
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT, freePort, tempDir } from '../helpers/aeterna';
import { Daemon } from '../helpers/daemon';
import { getJson, startLoad } from '../helpers/load';

function goUnavailable(): string | null {
  const r = spawnSync('go', ['version'], { encoding: 'utf8' });
  if (r.error) return `go is not available (${r.error.message}); install golang-go (Go 1.19+) to run this test`;
  return null;
}
const noGo = goUnavailable();

const daemons: Daemon[] = [];
const dirs: string[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
  for (const dir of dirs) fs.rmSync(dir, { recursive: true, force: true });
});

/** Builds examples/go-counter into a temp dir; returns the binary. */
function buildCounter(): string {
  const dir = tempDir('aeterna-go-drain-');
  dirs.push(dir);
  const bin = path.join(dir, 'go-counter');
  const r = spawnSync('go', ['build', '-o', bin, '.'], {
    cwd: path.join(ROOT, 'examples', 'go-counter'),
    encoding: 'utf8',
  });
  assert.equal(r.status, 0, `go build of examples/go-counter failed:\n${r.stdout}${r.stderr}`);
  return bin;
}

interface Visit {
  count: number;
  pid: number;
  generation: string;
}

describe('Go SDK drain (examples/go-counter)', { skip: noGo ?? false, timeout: 300000 }, () => {
  it('go-counter reloaded 6 times under keep-alive load (16 connections): zero failed requests, and the counter counted every request served', async () => {
    const bin = buildCounter();
    const port = await freePort();
    const d = new Daemon({
      command: [bin],
      port,
      handoff: true,
      readiness: '{ mode: "notify", timeout: "30s" }',
      stopTimeout: '15s',
    }).start(true);
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Running', 60000);
    const load = startLoad(port, { concurrency: 16 });
    const servedBy = async (pid: number | null): Promise<void> => {
      // Poll until the load has reached this generation (a hang guard, not a timing assertion).
      const deadline = Date.now() + 60000;
      while (pid === null || !load.stats.pids.includes(pid)) {
        if (Date.now() > deadline) throw new Error(`no request answered by pid ${pid}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    };
    const pids = [(await d.status()).pid];
    await servedBy(pids[0]);
    for (let i = 1; i <= 6; i++) {
      const old = pids[pids.length - 1];
      const r = await d.cli('reload');
      assert.equal(r.code, 0, `reload ${i}: ${r.stderr}`);
      const s = await d.status();
      assert.equal(s.last_reload?.outcome, 'promoted');
      assert.equal(s.generation, i + 1);
      pids.push(s.pid);
      // The old generation drained under load, then handed its final count over and got the ack.
      await d.run.waitFor(new RegExp(`^SHUTDOWN ${old} count=\\d+ handed_over=true$`, 'm'), 60000);
      await servedBy(s.pid);
    }
    const stats = await load.stop();
    assert.deepEqual(stats.failures, {}, `failed requests: ${JSON.stringify(stats.failures)}`);
    assert.equal(stats.failed, 0);
    assert.deepEqual(
      pids.filter((pid) => stats.pids.includes(pid!)),
      pids,
      'every generation answered',
    );
    // Every request served was counted once, across 6 handovers (the dump while serving, then the final sync).
    const last = await getJson<Visit>(port);
    assert.equal(last.generation, '7');
    assert.equal(last.count, stats.ok + 1, `count ${last.count} after ${stats.ok} requests served, plus this one`);
    assert.equal(await d.stop(), 0);
  });
});

// The Python SDK's drain (clients/python/aeterna_client.py: track_connections,
// drain) end to end: examples/python-counter, a stdlib HTTP/1.1 keep-alive
// server, under keep-alive load across reloads of a real daemon. Every request
// must be answered, and the count must survive (the final sync counts every
// request the old generation answered while it drained).
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT, freePort } from '../helpers/aeterna';
import { Daemon } from '../helpers/daemon';
import { getJson, startLoad } from '../helpers/load';

const PYTHON = 'python3';
const COUNTER = path.join(ROOT, 'examples', 'python-counter', 'counter.py');
const RELOADS = 5;

function pythonUnavailable(): string | null {
  const r = spawnSync(PYTHON, ['-c', 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 3)']);
  if (r.error) return `python3 is not available (${r.error.message})`;
  return r.status === 0 ? null : 'python3 is older than 3.9';
}
const daemonSide = fs.existsSync(path.join(ROOT, 'dist', 'src', 'srp', 'coordinator.js'));
const skip = pythonUnavailable() ?? (daemonSide ? false : 'the SRP coordinator (dist/src/srp/) is not built');

interface Visit {
  count: number;
  pid: number;
  generation: string;
  checkpoint: number;
}

async function until(what: string, predicate: () => boolean, timeoutMs = 60000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`${what}: not reached in time`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe('Python SDK drain: examples/python-counter under keep-alive load', { skip, timeout: 300000 }, () => {
  const daemons: Daemon[] = [];
  after(async () => {
    for (const d of daemons) if (d.run) await d.run.killAll();
  });

  it(`${RELOADS} reloads under keep-alive load: 0 failed requests, and the count holds every answered request`, async () => {
    const port = await freePort();
    const d = new Daemon({
      command: [PYTHON, COUNTER],
      port,
      readiness: '{ mode: "notify", timeout: "30s" }',
      stopTimeout: '20s',
      handoff: '{ enabled: true, socket_path: "STATE", timeout: "10s", checkpoint: { enabled: true } }',
    });
    d.write({
      ...d.options,
      handoff: (d.options.handoff as string).replace('STATE', path.join(d.dir, 'state.sock')),
    });
    daemons.push(d.start());
    await d.waitStatus((s) => s.state === 'Running', 60000);
    const first = await getJson<Visit>(port);
    assert.equal(first.count, 1);
    assert.ok(first.checkpoint > 0, 'each visit is stored as a checkpoint');

    const load = startLoad(port, { concurrency: 8, keepAlive: true });
    await until('the load is served', () => load.stats.ok >= 50);
    for (let i = 0; i < RELOADS; i++) {
      const r = await d.cli('reload');
      assert.equal(r.code, 0, r.stderr);
      // The reload answers at promotion; the old generation drains on. Once it is gone, the load's keep-alive
      // connections have moved to the new one, which must answer them before the next reload.
      await d.untilRetired();
      const served = load.stats.ok;
      await until(`requests after reload ${i + 1}`, () => load.stats.ok >= served + 50);
    }
    const stats = await load.stop();
    assert.deepEqual(stats.failures, {}, `failed requests by kind: ${JSON.stringify(stats.failures)}`);
    assert.equal(stats.failed, 0);
    assert.ok(stats.pids.length >= RELOADS + 1, `every generation served the load (${stats.pids.length} pids)`);

    // Every old generation drained, handed its final count over, and it was acked. They all retired above, so
    // their lines are all out by now.
    const shutdowns = d.run.stdout.split('\n').filter((l) => l.includes('SHUTDOWN'));
    assert.equal(
      shutdowns.filter((l) => /^SHUTDOWN \d+ count=\d+ handed_over=True$/.test(l)).length,
      RELOADS,
      `every old generation handed its final count over:\n${shutdowns.join('\n')}\n` +
        d.run.stderr
          .split('\n')
          .filter((l) => /final state sync|relay|error/i.test(l))
          .slice(-20)
          .join('\n'),
    );
    const last = await getJson<Visit>(port);
    // One visit per answered request: the first probe, the load, this probe.
    assert.equal(last.count, 1 + stats.ok + 1, `count ${last.count} for ${stats.ok} answered requests`);
    assert.equal(last.generation, String(RELOADS + 1));
    assert.equal(await d.stop(), 0);
  });
});

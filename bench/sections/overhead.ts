// Section 2: what Aeterna itself adds to a reload.
//
// The app is test/fixtures/apps/notify_app.py (Python's standard library: a Node
// app cannot send sd_notify's unix datagram without an addon), readiness
// "notify", strategy immediate, no load. Per reload:
//   total    = draining - accepted        (the reload record: request to promotion)
//   app      = ready_at - spawned         (ready_at: the wall-clock time the app
//                                          stamped as it sent READY=1; spawned:
//                                          Aeterna's mark once exec succeeded)
//   overhead = total - app = (spawned - accepted) + (draining - ready_at)
// i.e. re-reading the config, applying listeners and fork/exec before the app
// runs, and receiving READY=1 and promoting after it is ready. The app's own
// start-up (interpreter included) is not Aeterna's. The record's marks have
// 1 ms resolution, so each sample is good to about +-1 ms.
import fs from 'node:fs';
import path from 'node:path';
import { BenchDaemon, phaseAt } from '../aeterna';
import { ROOT, freePort, percentile, progress, python, tempDir } from '../common';

export interface OverheadSample {
  totalMs: number;
  appMs: number;
  overheadMs: number;
  beforeSpawnMs: number;
  afterReadyMs: number;
  /** From Aeterna's spawned mark to the script's first line (interpreter start-up). */
  interpreterMs: number;
}

export interface Summary {
  median: number;
  p95: number;
}

export type OverheadSection =
  | { skipped: string }
  | {
      reloads: number;
      python: string;
      samples: OverheadSample[];
      failures: string[];
      total: Summary;
      app: Summary;
      overhead: Summary;
      beforeSpawn: Summary;
      afterReady: Summary;
      interpreter: Summary;
    };

const summary = (values: number[]): Summary => ({ median: percentile(values, 50), p95: percentile(values, 95) });

interface Stamp {
  pid: number;
  generation: string;
  script_at: number;
  ready_at: number;
}

export async function overheadSection(reloads: number): Promise<OverheadSection> {
  const py = python();
  if (!py) return { skipped: 'python3 not installed' };
  const dir = tempDir('aeterna-bench-overhead-');
  const stamps = path.join(dir, 'stamps.jsonl');
  const d = new BenchDaemon({
    command: [py, path.join(ROOT, 'test', 'fixtures', 'apps', 'notify_app.py')], // the sd_notify test app, stamping with BENCH_STAMPS
    env: [`BENCH_STAMPS=${stamps}`],
    port: await freePort(),
    strategy: 'immediate',
    readiness: '{ mode: "notify", timeout: "10s" }',
    stopTimeout: '5s',
    logLevel: 'info',
  }).start();
  const samples: OverheadSample[] = [];
  const failures: string[] = [];
  try {
    await d.running();
    for (let k = 1; k <= reloads; k++) {
      const record = await d.reload();
      if (record.outcome !== 'promoted') {
        failures.push(`${record.id} ${record.outcome}: ${record.reason ?? ''}`);
        continue;
      }
      const stamp = fs
        .readFileSync(stamps, 'utf8')
        .split('\n')
        .filter((l) => l.trim() !== '')
        .map((l) => JSON.parse(l) as Stamp)
        .find((s) => s.pid === record.new_pid);
      if (!stamp) {
        failures.push(`${record.id}: no stamp from pid ${record.new_pid}`);
        continue;
      }
      const accepted = phaseAt(record, 'accepted');
      const spawned = phaseAt(record, 'spawned');
      const draining = phaseAt(record, 'draining');
      const total = draining - accepted;
      const app = stamp.ready_at - spawned;
      samples.push({
        totalMs: total,
        appMs: app,
        overheadMs: total - app,
        beforeSpawnMs: spawned - accepted,
        afterReadyMs: draining - stamp.ready_at,
        interpreterMs: stamp.script_at - spawned,
      });
      if (k % 10 === 0 || k === reloads) progress(`  overhead: ${k}/${reloads} reloads`);
    }
  } finally {
    await d.stop();
  }
  const pick = (f: (s: OverheadSample) => number): Summary => summary(samples.map(f));
  return {
    reloads,
    python: py,
    samples,
    failures,
    total: pick((s) => s.totalMs),
    app: pick((s) => s.appMs),
    overhead: pick((s) => s.overheadMs),
    beforeSpawn: pick((s) => s.beforeSpawnMs),
    afterReady: pick((s) => s.afterReadyMs),
    interpreter: pick((s) => s.interpreterMs),
  };
}

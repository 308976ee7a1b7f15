// Section 7: `aeterna upgrade` (Aeterna re-executing itself in place).
//   answer time: from running `aeterna upgrade` (the CLI, the path users take) to its exit, which is when the
//        re-executed Aeterna answered on the control socket. Its peer in the same run: `aeterna status`, the same
//        CLI start-up and control round trip without the upgrade; the ratio is what the upgrade itself adds.
//   failed requests: N upgrades in a row, each through the CLI, while autocannon loads the app.
import { BenchDaemon } from '../aeterna';
import { CLI, fixture, freePort, median, percentile, progress, run, sleep } from '../common';
import { AutocannonLoad } from '../load';

export interface UpgradeTiming {
  ms: number[];
  median: number;
  p95: number;
}

export interface UpgradeSection {
  /** Timed pairs (status, then upgrade), without load. */
  reps: number;
  upgrade: UpgradeTiming;
  status: UpgradeTiming;
  /** Upgrades under load and what the load saw. */
  underLoad: {
    upgrades: number;
    connections: number;
    ok: number;
    failed: number;
    failures: Record<string, number>;
    /** The CLI's answer time during the loaded upgrades. */
    upgrade: UpgradeTiming;
    /** After them: Aeterna's re-exec count, and whether its pid and the app's stayed the same. */
    reexecs: number;
    sameDaemonPid: boolean;
    sameAppPid: boolean;
  };
}

function timing(ms: number[]): UpgradeTiming {
  return { ms, median: median(ms), p95: percentile(ms, 95) };
}

/** One CLI command against the daemon, timed from spawn to exit; throws unless it exits 0. */
async function timedCli(d: BenchDaemon, args: string[]): Promise<number> {
  const t0 = performance.now();
  const r = await run([process.execPath, CLI, ...args, '-c', d.configFile], { timeoutMs: 120000 });
  const ms = performance.now() - t0;
  if (r.code !== 0) throw new Error(`aeterna ${args.join(' ')} exited ${r.code}: ${r.stderr.slice(-500)}`);
  return ms;
}

export async function upgradeSection(reps: number, upgrades: number, connections: number): Promise<UpgradeSection> {
  const port = await freePort();
  const d = new BenchDaemon({ command: [process.execPath, fixture('http_app.js')], port, logLevel: 'warn' }).start();
  try {
    const before = await d.running();
    progress(`  upgrade: ${reps} timed upgrades, each beside an \`aeterna status\``);
    const status: number[] = [];
    const upgrade: number[] = [];
    for (let i = 0; i < reps; i++) {
      status.push(await timedCli(d, ['status']));
      upgrade.push(await timedCli(d, ['upgrade']));
    }
    progress(`  upgrade: ${upgrades} upgrades under load (${connections} connections)`);
    const load = new AutocannonLoad(port, connections);
    await sleep(500); // warm-up: connections open before counting
    load.begin();
    const loaded: number[] = [];
    let capture;
    try {
      for (let i = 0; i < upgrades; i++) loaded.push(await timedCli(d, ['upgrade']));
      await sleep(500); // requests in flight at the last exec complete
    } finally {
      capture = await load.stop();
    }
    const after = await d.status();
    return {
      reps,
      upgrade: timing(upgrade),
      status: timing(status),
      underLoad: {
        upgrades,
        connections,
        ok: capture.ok,
        failed: capture.failed,
        failures: capture.failures,
        upgrade: timing(loaded),
        reexecs: after.reexecs ?? 0,
        sameDaemonPid: after.daemon_pid === before.daemon_pid,
        sameAppPid: after.pid === before.pid,
      },
    };
  } finally {
    await d.stop();
  }
}

// Section 7: `aeterna upgrade` (Aeterna re-executing itself in place).
//   answer time: from running `aeterna upgrade` (the CLI, the path users take) to its exit, which is when the
//        re-executed Aeterna answered on the control socket. Its peer in the same run: `aeterna status`, the same
//        CLI start-up and control round trip without the upgrade; the ratio is what the upgrade itself adds.
//   failed requests: N upgrades in a row, each through the CLI, while autocannon loads the app.
//   carrying the relay: upgrades of a daemon whose app (TypeScript SDK) holds its state relay connection and has
//        stored an in-memory checkpoint, both carried over; peer: upgrades of the plain daemon, alternating.
import path from 'node:path';
import { BenchDaemon } from '../aeterna';
import { CLI, ROOT, fixture, freePort, median, percentile, progress, run, sleep, tempDir } from '../common';
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
  /** Upgrades that carry a relay connection and a checkpoint, beside plain ones (alternating, no load). */
  carrying: {
    checkpointBytes: number;
    upgrade: UpgradeTiming;
    plain: UpgradeTiming;
    /** After them: the same app process (its connection carried), and the checkpoint's seq unchanged. */
    sameAppPid: boolean;
    checkpointKept: boolean;
  };
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

/** The checkpoint the relay-holding app stores before it says ready. */
const CARRIED_CHECKPOINT_BYTES = 64 << 20;

/** `reps` upgrades of a daemon whose app holds a relay connection and a checkpoint, each beside one of `plain`. */
async function carryingUpgrades(plain: BenchDaemon, reps: number): Promise<UpgradeSection['carrying']> {
  const app = [process.execPath, path.join(ROOT, 'test', 'fixtures', 'apps', 'plain_state_app.js')];
  const d = new BenchDaemon({
    command: app,
    env: [`STATE_BYTES=${CARRIED_CHECKPOINT_BYTES}`, `STAMP_DIR=${tempDir('aeterna-bench-upgrade-')}`, 'CHECKPOINTS=1'],
    readiness: '{ mode: "notify", timeout: "5m" }',
    handoffTimeout: '5m',
    checkpoint: '{ enabled: true, max_size: "1GiB" }',
    logLevel: 'warn',
  }).start();
  try {
    const before = await d.running(300000);
    progress(
      `  upgrade: ${reps} upgrades carrying a relay connection and a ${CARRIED_CHECKPOINT_BYTES >> 20} MiB checkpoint, each beside a plain one`,
    );
    const carried: number[] = [];
    const peer: number[] = [];
    for (let i = 0; i < reps; i++) {
      peer.push(await timedCli(plain, ['upgrade']));
      carried.push(await timedCli(d, ['upgrade']));
    }
    const after = await d.status();
    return {
      checkpointBytes: CARRIED_CHECKPOINT_BYTES,
      upgrade: timing(carried),
      plain: timing(peer),
      sameAppPid: after.pid === before.pid,
      checkpointKept: after.checkpoint?.seq === before.checkpoint?.seq && after.checkpoint?.seq !== undefined,
    };
  } finally {
    await d.stop();
  }
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
    const carrying = await carryingUpgrades(d, reps);
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
      carrying,
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

// Several processes of one app through reloads: the bench's Node HTTP app (bench/fixtures/http_app.js) as
// `service.instances: 2` under Aeterna with `orchestration.max_surge: 1`, and beside it in the same run as
// `pm2 start -i 2` (cluster mode) with `pm2 reload` (bench/fixtures/pm2-instances.config.js). Each is kept under
// wrk keep-alive load (1 thread, --connections) through --reloads reloads, one after the other (Aeterna's next
// reload once the old instances have exited, as pm2 reload returns once its old workers are gone). Measured:
// throughput and failed requests (wrk's socket errors and non-2xx), the RSS of all app processes (the supervisor
// excluded) sampled every 20 ms: its median at steady state before the reloads, and its peak during them.
//
// --rounds N repeats both, alternating which goes first, and reports the medians (a busy machine is noisy).
//
// --max-surge all runs Aeterna without max_surge (the whole new set at once), --only one contender.
//
//   node dist/bench/instances.js [--reloads 10] [--instances 2] [--connections 32] [--rounds 1] [--max-surge 1|all]
//                                [--only aeterna|pm2] [--out bench/results]
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { call } from '../src/control/client';
import type { ReloadRecord, StatusReport } from '../src/orchestrator/types';
import {
  CLI,
  Proc,
  ROOT,
  childrenOf,
  fixture,
  freePort,
  median,
  memoryOf,
  onExit,
  progress,
  run,
  sleep,
  tempDir,
  versionOf,
  waitForPort,
  which,
} from './common';
import { WrkLoad, type WrkResult } from './load';

interface Options {
  reloads: number;
  instances: number;
  connections: number;
  outDir: string;
  steadyMs: number;
  /** Rounds of both contenders, the first one alternating (a busy machine's noise shows as their spread). */
  rounds: number;
  /** Aeterna's orchestration.max_surge; null: absent (the whole new set at once). */
  maxSurge: number | null;
  /** One contender only, or both. */
  only: 'aeterna' | 'pm2' | null;
}

export interface InstancesRun {
  contender: 'aeterna' | 'pm2';
  round: number;
  how: string;
  instances: number;
  reloads: number;
  reloadsFailed: number;
  wrk: WrkResult;
  /** Sum of the app processes' RSS (MiB): median at steady state, peak during the reloads. */
  steadyRssMiB: number;
  peakRssMiB: number;
  /** Most app processes seen at once during the reloads. */
  peakProcesses: number;
}

/** What serves the app and reloads it. */
interface Contender {
  start(port: number): Promise<void>;
  /** One reload, done when the old processes are gone; an error message, or null. */
  reload(): Promise<string | null>;
  /** The app's processes now (the supervisor excluded). */
  appPids(): number[];
  stop(): Promise<void>;
}

function descendants(root: number): number[] {
  const found: number[] = [];
  for (let queue = [root]; queue.length > 0;) {
    const next = childrenOf(queue.shift()!);
    found.push(...next);
    queue.push(...next);
  }
  return found;
}

function aeterna(o: Options): Contender {
  const dir = tempDir('aeterna-bench-instances-');
  const socket = path.join(dir, 'control.sock');
  let proc: Proc | null = null;
  const status = async (): Promise<StatusReport> => {
    const r = await call(socket, { cmd: 'status' }, undefined, { idleTimeoutMs: 30000 });
    if (!('status' in r)) throw new Error('status without a report');
    return r.status;
  };
  return {
    async start(port) {
      const config = `version: "v1"
service:
  name: "bench-instances"
  command: ${JSON.stringify([process.execPath, fixture('http_app.js')])}
  env: ["DRAIN_IDLE_MS=500"]
  listeners:
    - name: "http"
      address: "tcp://127.0.0.1:${port}"
  instances: ${o.instances}
  stop_timeout: "10s"
orchestration:
  strategy: "immediate"
${o.maxSurge === null ? '' : `  max_surge: ${o.maxSurge}\n`}  readiness: { mode: "delay", delay: "300ms", timeout: "10s" }
control:
  socket_path: "${socket}"
observability:
  log_level: "warn"
`;
      fs.writeFileSync(path.join(dir, 'aeterna.yaml'), config);
      proc = new Proc([process.execPath, CLI, 'start', '-c', path.join(dir, 'aeterna.yaml')]);
      for (;;) {
        if (!proc.alive) throw new Error(`aeterna exited while starting\n${proc.stderr.slice(-2000)}`);
        const s = await status().catch(() => null);
        if (s?.state === 'Running') break;
        await sleep(50);
      }
      await waitForPort(port);
    },
    async reload() {
      const r = await call(socket, { cmd: 'reload', wait: true }, undefined, { idleTimeoutMs: 60000 });
      if (!('record' in r)) return 'reload answered without a record';
      const record: ReloadRecord = r.record;
      if (record.outcome !== 'promoted') return `${record.outcome}: ${record.reason}`;
      // The old instances drain on after the promotion: the next reload waits until they are gone.
      for (;;) {
        const s = await status();
        if (s.retiring.length === 0) return null;
        await sleep(20);
      }
    },
    appPids() {
      return proc ? descendants(proc.pid) : [];
    },
    async stop() {
      if (!proc?.alive) return;
      await call(socket, { cmd: 'stop' }, undefined, { idleTimeoutMs: 5000 }).catch(() => undefined);
      await proc.stop(null, 20000);
    },
  };
}

function pm2(o: Options): Contender {
  let bin = '';
  let home = '';
  let env: NodeJS.ProcessEnv | null = null;
  const pm2Cmd = (...args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> =>
    run([process.execPath, bin, ...args], { env: env!, timeoutMs: 120000 });
  const god = (): number | null => {
    const pid = Number(fs.readFileSync(path.join(home, 'pm2.pid'), 'utf8').trim());
    return Number.isFinite(pid) ? pid : null;
  };
  return {
    async start(port) {
      bin = require.resolve('pm2/bin/pm2');
      home = tempDir('aeterna-bench-pm2-');
      const privateEnv = {
        ...process.env,
        PM2_HOME: home,
        PORT: String(port),
        INSTANCES: String(o.instances),
        DRAIN_IDLE_MS: '500',
      };
      env = privateEnv;
      onExit(() => {
        spawnSync(process.execPath, [bin, 'kill'], {
          env: privateEnv,
          stdio: 'ignore',
          timeout: 30000,
        });
      });
      const r = await pm2Cmd('start', fixture('pm2-instances.config.js'));
      if (r.code !== 0) throw new Error(`pm2 start failed (${r.code}): ${r.stderr.slice(-1000)}`);
      await waitForPort(port);
      // Every worker listening (pm2 start returns before they are).
      for (let i = 0; i < 600 && this.appPids().length < o.instances; i++) await sleep(50);
    },
    async reload() {
      const r = await pm2Cmd('reload', 'aeterna-bench-instances');
      return r.code === 0 ? null : `pm2 reload exited ${r.code}: ${r.stderr.trim().slice(-300)}`;
    },
    appPids() {
      const pid = god();
      return pid === null ? [] : descendants(pid);
    },
    async stop() {
      if (env === null) return;
      await pm2Cmd('kill');
      env = null;
    },
  };
}

/** Sum of the RSS of `pids`, MiB. */
function rssMiB(pids: number[]): number {
  let kb = 0;
  for (const pid of pids) {
    const rss = memoryOf(pid)?.rssKb ?? 0;
    if (Number.isFinite(rss)) kb += rss; // a process exiting (a zombie) has none
  }
  return kb / 1024;
}

/** Sample the app processes' RSS every 20 ms until stop(): the samples and the most processes seen. */
function sampler(c: Contender): { stop: () => Promise<{ rss: number[]; processes: number }> } {
  const rss: number[] = [];
  let processes = 0;
  let running = true;
  const loop = (async () => {
    while (running) {
      const pids = c.appPids();
      processes = Math.max(processes, pids.length);
      rss.push(rssMiB(pids));
      await sleep(20);
    }
  })();
  return {
    async stop() {
      running = false;
      await loop;
      return { rss, processes };
    },
  };
}

async function measure(
  name: 'aeterna' | 'pm2',
  c: Contender,
  wrkBin: string,
  o: Options,
  round: number,
): Promise<InstancesRun> {
  const port = await freePort();
  progress(`${name}: starting ${o.instances} instances`);
  await c.start(port);
  try {
    const load = new WrkLoad(wrkBin, port, o.connections);
    await sleep(1000); // wrk connected and the app warmed up
    const steady = sampler(c);
    await sleep(o.steadyMs);
    const steadySamples = await steady.stop();
    const during = sampler(c);
    let failed = 0;
    for (let i = 1; i <= o.reloads; i++) {
      const err = await c.reload();
      if (err !== null) {
        failed++;
        progress(`${name}: reload ${i} failed: ${err}`);
      }
      await sleep(500); // load between reloads
    }
    const duringSamples = await during.stop();
    const wrk = await load.stop();
    const run: InstancesRun = {
      contender: name,
      round,
      how:
        name === 'aeterna'
          ? `service.instances: ${o.instances}, orchestration.max_surge: ${o.maxSurge ?? 'absent (all at once)'}, aeterna reload`
          : `pm2 start -i ${o.instances} (cluster mode), pm2 reload`,
      instances: o.instances,
      reloads: o.reloads,
      reloadsFailed: failed,
      wrk,
      steadyRssMiB: median(steadySamples.rss),
      peakRssMiB: Math.max(...duringSamples.rss),
      peakProcesses: duringSamples.processes,
    };
    progress(
      `${name}: ${Math.round(wrk.rps)} req/s, ${wrk.failed} failed, RSS steady ${run.steadyRssMiB.toFixed(1)} MiB, ` +
        `peak ${run.peakRssMiB.toFixed(1)} MiB (${(run.peakRssMiB / run.steadyRssMiB).toFixed(2)}x), ` +
        `${run.peakProcesses} processes at most`,
    );
    return run;
  } finally {
    await c.stop();
  }
}

function report(runs: InstancesRun[], o: Options, versions: Record<string, string | null>): string {
  const out = [
    `# Instances through reloads: Aeterna (service.instances, max_surge ${o.maxSurge ?? 'absent'}) and pm2 cluster reload`,
    '',
    `${new Date().toISOString()}, ${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? 'unknown'}), Linux ${os.release()}; ` +
      Object.entries(versions)
        .map(([k, v]) => `${k} ${v ?? 'n/a'}`)
        .join(', ') +
      '.',
    '',
    `The bench's Node HTTP app (bench/fixtures/http_app.js), ${o.instances} processes, under wrk keep-alive load ` +
      `(1 thread, ${o.connections} connections) through ${o.reloads} reloads in a row (the next once the old ` +
      `processes have exited), 500 ms apart. RSS: the sum over the app's processes (the supervisor excluded), ` +
      `sampled every 20 ms: median over ${o.steadyMs / 1000} s before the reloads, peak during them. ` +
      "Goals for Aeterna: throughput at least pm2's, 0 failed requests, peak RSS at most 1.6x steady state.",
    '',
    `${o.rounds} round(s), each running both contenders one after the other (the first alternating); the medians ` +
      'come first, then every round.',
    '',
    '| contender | how | req/s (median) | failed requests (total) | peak / steady RSS (median) | processes at most |',
    '| --- | --- | ---: | ---: | ---: | ---: |',
  ];
  for (const name of ['aeterna', 'pm2'] as const) {
    const mine = runs.filter((r) => r.contender === name);
    if (mine.length === 0) continue;
    out.push(
      `| ${name} | ${mine[0].how} | ${Math.round(median(mine.map((r) => r.wrk.rps)))} | ` +
        `${mine.reduce((a, r) => a + r.wrk.failed, 0)} | ` +
        `${median(mine.map((r) => r.peakRssMiB / r.steadyRssMiB)).toFixed(2)}x | ` +
        `${Math.max(...mine.map((r) => r.peakProcesses))} |`,
    );
  }
  out.push(
    '',
    '| round | contender | req/s | failed requests | reloads failed | p99 ms | RSS steady MiB | RSS peak MiB | peak / steady | processes at most |',
    '| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
  );
  for (const r of runs)
    out.push(
      `| ${r.round} | ${r.contender} | ${Math.round(r.wrk.rps)} | ${r.wrk.failed}${r.wrk.failed ? ` (${JSON.stringify(r.wrk.failures)})` : ''} | ` +
        `${r.reloadsFailed} | ${r.wrk.p99Ms.toFixed(2)} | ${r.steadyRssMiB.toFixed(1)} | ${r.peakRssMiB.toFixed(1)} | ` +
        `${(r.peakRssMiB / r.steadyRssMiB).toFixed(2)}x | ${r.peakProcesses} |`,
    );
  out.push('');
  return out.join('\n');
}

function parseArgs(argv: string[]): Options {
  const o: Options = {
    reloads: 10,
    instances: 2,
    connections: 32,
    outDir: path.join(ROOT, 'bench', 'results'),
    steadyMs: 3000,
    rounds: 1,
    maxSurge: 1,
    only: null,
  };
  for (let i = 0; i < argv.length; i++) {
    const v = argv[i + 1];
    const n = Number(v);
    switch (argv[i]) {
      case '--reloads':
        o.reloads = n;
        break;
      case '--instances':
        o.instances = n;
        break;
      case '--max-surge':
        o.maxSurge = v === 'all' ? null : n;
        if (v === 'all') {
          i++;
          continue;
        }
        break;
      case '--only':
        if (v !== 'aeterna' && v !== 'pm2') throw new Error('--only: aeterna or pm2');
        o.only = v;
        i++;
        continue;
      case '--rounds':
        o.rounds = n;
        break;
      case '--connections':
        o.connections = n;
        break;
      case '--out':
        o.outDir = path.resolve(v);
        break;
      default:
        throw new Error(
          `unknown option ${argv[i]}\nusage: node dist/bench/instances.js [--reloads 10] [--instances 2] [--connections 32] [--rounds 1] [--max-surge 1|all] [--only aeterna|pm2] [--out DIR]`,
        );
    }
    if (argv[i] !== '--out' && (!Number.isInteger(n) || n < 1)) throw new Error(`${argv[i]}: a whole number >= 1`);
    i++;
  }
  return o;
}

async function main(): Promise<void> {
  const o = parseArgs(process.argv.slice(2));
  const wrkBin = which('wrk');
  if (wrkBin === null) throw new Error('wrk is not installed: the instances benchmark needs it');
  const runs: InstancesRun[] = [];
  for (let round = 1; round <= o.rounds; round++) {
    const order = round % 2 === 1 ? (['aeterna', 'pm2'] as const) : (['pm2', 'aeterna'] as const);
    for (const name of order.filter((x) => o.only === null || x === o.only))
      runs.push(await measure(name, name === 'aeterna' ? aeterna(o) : pm2(o), wrkBin, o, round));
  }
  const versions = {
    node: process.version,
    // From its package: `pm2 --version` would start a pm2 daemon.
    pm2: (JSON.parse(fs.readFileSync(require.resolve('pm2/package.json'), 'utf8')) as { version: string }).version,
    wrk: versionOf([wrkBin, '--version'])?.split(' ').slice(0, 2).join(' ') ?? null,
  };
  fs.mkdirSync(o.outDir, { recursive: true });
  const stamp = new Date().toISOString().slice(0, 10);
  const variant = `${o.maxSurge === null ? '-surge-all' : o.maxSurge !== 1 ? `-surge-${o.maxSurge}` : ''}${o.only ? `-${o.only}` : ''}`;
  const base = path.join(o.outDir, `instances-${stamp}${variant}`);
  fs.writeFileSync(`${base}.json`, JSON.stringify({ options: o, versions, runs }, null, 2) + '\n');
  fs.writeFileSync(`${base}.md`, report(runs, o, versions));
  progress(`wrote ${base}.md and ${base}.json`);
}

if (require.main === module) {
  main().catch((err: Error) => {
    console.error(err.stack ?? err.message);
    process.exit(1);
  });
}

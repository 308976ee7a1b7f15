// Section 1: failed requests across reloads. The same keep-alive app
// (bench/fixtures/http_app.js), the same load, the same number of reloads for
// each contender, one contender at a time:
//   - Aeterna, strategy immediate;
//   - Aeterna, strategy canary with a short soak;
//   - a naive restart: SIGTERM, wait for the exit, start again on the same port;
//   - pm2 in cluster mode with `pm2 reload` (private PM2_HOME, `pm2 kill` at the end).
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { BenchDaemon } from '../aeterna';
import { AutocannonLoad, WrkLoad, type Capture, type WrkResult } from '../load';
import {
  Proc,
  fixture,
  freePort,
  memoryOf,
  onExit,
  percentile,
  progress,
  run,
  sleep,
  tempDir,
  waitForPort,
} from '../common';

export interface ReloadParams {
  reloads: number;
  connections: number;
  /** Load before recording starts (JIT warm-up of app and generator). */
  warmupMs: number;
  /** Recorded steady state before the first reload. */
  steadyMs: number;
  /** Pause after each reload completes, before the next one. */
  gapMs: number;
  /** Recorded steady state after the last reload. */
  tailMs: number;
  bucketMs: number;
  /** Latency statistics count this long after each reload's end as part of the reload (the new process is still cold). */
  settleMs: number;
  /** Aeterna canary soak, e.g. "1s". */
  soak: string;
  /** Aeterna readiness delay for the Node app, e.g. "100ms". */
  readinessDelay: string;
  drainIdleMs: number;
  /** wrk's path, or null when not installed. */
  wrk: string | null;
  wrkReloads: number;
  /** Contender ids to run (default: all). */
  only?: string[];
}

export interface LatencyStats {
  /** 2xx responses per second. */
  rps: number;
  p50: number;
  p99: number;
  /** 2xx responses in this slice. */
  count: number;
}

export interface ContenderResult {
  id: string;
  label: string;
  how: string;
  error: string | null;
  /** Reloads the tool reported as failed (rolled back, non-zero exit, ...). */
  toolFailures: string[];
  reloadsDone: number;
  ok: number;
  failed: number;
  failures: Record<string, number>;
  durationMs: number;
  rps: number;
  steady: LatencyStats;
  during: LatencyStats;
  /** Failures from each reload's start to the next one's start. */
  failuresPerReload: number[];
  /** Failures before the first reload. */
  failuresBefore: number;
  /** Per reload: ms from its first failure to its last (0 when none). */
  failureSpanMs: number[];
  /** Per reload: how long the reload took, request to "done" as the tool reports it. */
  reloadMs: number[];
  /** Reload windows, ms since the recording began. */
  windows: Array<[number, number]>;
  timeline: { bucketMs: number; okPerS: number[]; failedPerS: number[] };
  /** The supervisor's own memory after the run, where it has a process of its own. */
  supervisorMemory: { what: string; rssKb: number; hwmKb: number } | null;
  wrk: (WrkResult & { reloads: number; toolFailures: number }) | { skipped: string } | { error: string };
}

export interface ReloadSection {
  params: ReloadParams;
  contenders: ContenderResult[];
}

/** What the runner needs from a reload tool. */
interface Contender {
  id: string;
  label: string;
  how: string;
  /** Serve on port; resolves once it serves. */
  start(port: number): Promise<void>;
  /** One reload; resolves when the tool says it is done; a string is the tool's failure. */
  reload(): Promise<string | null>;
  memory(): Promise<{ what: string; rssKb: number; hwmKb: number } | null>;
  stop(): Promise<void>;
}

// ---- contenders --------------------------------------------------------------------------------

function aeterna(strategy: 'immediate' | 'canary', p: ReloadParams): Contender {
  let d: BenchDaemon | null = null;
  return {
    id: `aeterna-${strategy}`,
    label: `Aeterna ${strategy}`,
    how:
      strategy === 'immediate'
        ? `\`aeterna reload\` (control socket), strategy immediate, readiness delay ${p.readinessDelay}`
        : `\`aeterna reload\` (control socket), strategy canary, soak ${p.soak}, readiness delay ${p.readinessDelay}`,
    async start(port) {
      d = new BenchDaemon({
        command: [process.execPath, fixture('http_app.js')],
        env: [`DRAIN_IDLE_MS=${p.drainIdleMs}`],
        port,
        strategy,
        soak: p.soak,
        readiness: `{ mode: "delay", delay: "${p.readinessDelay}", timeout: "10s" }`,
        stopTimeout: '10s',
        logLevel: 'info',
      }).start();
      await d.running();
      await waitForPort(port);
    },
    async reload() {
      const record = await d!.reload();
      return record.outcome === 'promoted' ? null : `${record.id} ${record.outcome}: ${record.reason ?? ''}`;
    },
    async memory() {
      const m = memoryOf(d!.proc.pid);
      return m ? { what: 'aeterna (the daemon process)', ...m } : null;
    },
    async stop() {
      await d?.stop();
    },
  };
}

function naive(p: ReloadParams): Contender {
  let app: Proc | null = null;
  let port = 0;
  const startApp = async (): Promise<void> => {
    app = new Proc([process.execPath, fixture('http_app.js')], {
      env: { ...process.env, PORT: String(port), DRAIN_IDLE_MS: String(p.drainIdleMs) },
    });
    await app.waitFor(/^READY /m);
  };
  return {
    id: 'naive',
    label: 'naive restart',
    how: 'SIGTERM to the app (it drains), wait for its exit, start it again on the same port',
    async start(portNumber) {
      port = portNumber;
      await startApp();
    },
    async reload() {
      const { code, signal } = await app!.stop('SIGTERM', 15000);
      await startApp();
      return code === 0 ? null : `the old app exited with ${signal ?? code}`;
    },
    async memory() {
      return null; // no supervisor process
    },
    async stop() {
      await app?.stop('SIGTERM', 15000);
    },
  };
}

function pm2(p: ReloadParams): Contender {
  let bin = '';
  let home = '';
  let env: NodeJS.ProcessEnv | null = null; // set once started: never run pm2 without our private PM2_HOME
  let unregister: (() => void) | null = null;
  const pm2Cmd = (...args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> =>
    run([process.execPath, bin, ...args], { env: env!, timeoutMs: 60000 });
  return {
    id: 'pm2',
    label: 'pm2 cluster reload',
    how: '`pm2 reload` of the same app in cluster mode, 1 instance (bench/fixtures/pm2.config.js)',
    async start(port) {
      try {
        bin = require.resolve('pm2/bin/pm2');
      } catch {
        throw new Error('pm2 is not installed (it is a devDependency: run npm ci)');
      }
      home = tempDir('aeterna-bench-pm2-');
      const privateEnv = { ...process.env, PM2_HOME: home, PORT: String(port), DRAIN_IDLE_MS: String(p.drainIdleMs) };
      env = privateEnv;
      // Never leave pm2's daemon behind, however the bench ends.
      unregister = onExit(() => {
        spawnSync(process.execPath, [bin, 'kill'], { env: privateEnv, stdio: 'ignore', timeout: 30000 });
      });
      const r = await pm2Cmd('start', fixture('pm2.config.js'));
      if (r.code !== 0) throw new Error(`pm2 start failed (${r.code}): ${r.stderr.slice(-1000)}`);
      await waitForPort(port);
    },
    async reload() {
      const r = await pm2Cmd('reload', 'aeterna-bench');
      return r.code === 0 ? null : `pm2 reload exited ${r.code}: ${r.stderr.trim().slice(-300)}`;
    },
    async memory() {
      const pid = Number(fs.readFileSync(path.join(home, 'pm2.pid'), 'utf8').trim());
      const m = Number.isFinite(pid) ? memoryOf(pid) : null;
      return m ? { what: "pm2's daemon (God)", ...m } : null;
    },
    async stop() {
      if (env === null) return;
      await pm2Cmd('kill');
      unregister?.();
      env = null;
    },
  };
}

export function contenders(p: ReloadParams): Contender[] {
  const all = [aeterna('immediate', p), aeterna('canary', p), naive(p), pm2(p)];
  return p.only ? all.filter((c) => p.only!.includes(c.id)) : all;
}

// ---- statistics --------------------------------------------------------------------------------

/** Latency and rate of the 2xx responses inside the reload windows and outside them (okAt is in time order). */
function splitStats(
  capture: Capture,
  windows: Array<[number, number]>,
): { steady: LatencyStats; during: LatencyStats } {
  const n = capture.okAt.length;
  const inside = new Float32Array(n);
  const outside = new Float32Array(n);
  let ni = 0;
  let no = 0;
  let w = 0;
  for (let i = 0; i < n; i++) {
    const t = capture.okAt[i];
    while (w < windows.length && windows[w][1] < t) w++;
    if (w < windows.length && t >= windows[w][0]) inside[ni++] = capture.latency[i];
    else outside[no++] = capture.latency[i];
  }
  const windowMs = windows.reduce((sum, [a, b]) => sum + (b - a), 0);
  const stats = (lat: Float32Array, spanMs: number): LatencyStats => ({
    rps: spanMs > 0 ? lat.length / (spanMs / 1000) : NaN,
    p50: percentile(lat, 50),
    p99: percentile(lat, 99),
    count: lat.length,
  });
  return {
    steady: stats(outside.subarray(0, no), capture.durationMs - windowMs),
    during: stats(inside.subarray(0, ni), windowMs),
  };
}

export function summarise(
  capture: Capture,
  windows: Array<[number, number]>,
  bucketMs: number,
  settleMs = 0,
): Pick<
  ContenderResult,
  | 'ok'
  | 'failed'
  | 'failures'
  | 'durationMs'
  | 'rps'
  | 'steady'
  | 'during'
  | 'failuresPerReload'
  | 'failuresBefore'
  | 'failureSpanMs'
  | 'timeline'
> {
  // For latency: each window extended by settleMs (never into the next reload).
  const extended = windows.map(([a, b], i): [number, number] => [
    a,
    Math.min(b + settleMs, windows[i + 1]?.[0] ?? Infinity),
  ]);
  const { steady, during } = splitStats(capture, extended);
  // Failures per reload: from its start to the next reload's start.
  const failuresPerReload = windows.map(() => 0);
  const first = windows.map(() => Infinity);
  const last = windows.map(() => -Infinity);
  let failuresBefore = 0;
  let k = -1; // the last reload that started at or before t (failedAt is in time order)
  for (const t of capture.failedAt) {
    while (k + 1 < windows.length && windows[k + 1][0] <= t) k++;
    if (k < 0) {
      failuresBefore++;
      continue;
    }
    failuresPerReload[k]++;
    first[k] = Math.min(first[k], t);
    last[k] = Math.max(last[k], t);
  }
  const n = Math.max(1, Math.ceil(capture.durationMs / bucketMs));
  const ok = new Array<number>(n).fill(0);
  const failed = new Array<number>(n).fill(0);
  for (const t of capture.okAt) ok[Math.min(n - 1, Math.floor(t / bucketMs))]++;
  for (const t of capture.failedAt) failed[Math.min(n - 1, Math.floor(t / bucketMs))]++;
  const perS = (v: number): number => Math.round((v * 1000) / bucketMs);
  return {
    ok: capture.ok,
    failed: capture.failed,
    failures: capture.failures,
    durationMs: capture.durationMs,
    rps: capture.ok / (capture.durationMs / 1000),
    steady,
    during,
    failuresPerReload,
    failuresBefore,
    failureSpanMs: windows.map((_, k) => (failuresPerReload[k] > 0 ? last[k] - first[k] : 0)),
    timeline: { bucketMs, okPerS: ok.map(perS), failedPerS: failed.map(perS) },
  };
}

// ---- runner ------------------------------------------------------------------------------------

async function runOne(c: Contender, p: ReloadParams): Promise<ContenderResult> {
  const result: ContenderResult = {
    id: c.id,
    label: c.label,
    how: c.how,
    error: null,
    toolFailures: [],
    reloadsDone: 0,
    ok: 0,
    failed: 0,
    failures: {},
    durationMs: 0,
    rps: NaN,
    steady: { rps: NaN, p50: NaN, p99: NaN, count: 0 },
    during: { rps: NaN, p50: NaN, p99: NaN, count: 0 },
    failuresPerReload: [],
    failuresBefore: 0,
    failureSpanMs: [],
    reloadMs: [],
    windows: [],
    timeline: { bucketMs: p.bucketMs, okPerS: [], failedPerS: [] },
    supervisorMemory: null,
    wrk: p.wrk ? { skipped: 'not run' } : { skipped: 'wrk not installed' },
  };
  let load: AutocannonLoad | null = null;
  try {
    const port = await freePort();
    await c.start(port);
    load = new AutocannonLoad(port, p.connections);
    await sleep(p.warmupMs);
    load.begin();
    await sleep(p.steadyMs);
    for (let k = 1; k <= p.reloads; k++) {
      const start = load.now();
      let failure: string | null;
      try {
        failure = await c.reload();
      } catch (err) {
        failure = (err as Error).message;
      }
      const end = load.now();
      result.windows.push([start, end]);
      result.reloadMs.push(end - start);
      if (failure) result.toolFailures.push(`reload ${k}: ${failure}`);
      result.reloadsDone = k;
      progress(
        `  ${c.label}: reload ${k}/${p.reloads} in ${Math.round(end - start)} ms${failure ? ` (FAILED: ${failure.slice(0, 200)})` : ''}`,
      );
      await sleep(p.gapMs);
    }
    await sleep(p.tailMs);
    const capture = await load.stop();
    load = null;
    Object.assign(result, summarise(capture, result.windows, p.bucketMs, p.settleMs));
    result.supervisorMemory = await c.memory().catch(() => null);
    if (p.wrk) result.wrk = await wrkPass(c, p, p.wrk, port);
  } catch (err) {
    result.error = (err as Error).message.slice(0, 2000);
    progress(`  ${c.label}: ERROR ${result.error}`);
    if (load) await load.stop().catch(() => undefined);
  } finally {
    await c.stop().catch((err: Error) => progress(`  ${c.label}: stop failed: ${err.message}`));
  }
  return result;
}

/** The cross-check: the same contender, already serving, reloaded under wrk's load. */
async function wrkPass(
  c: Contender,
  p: ReloadParams,
  wrk: string,
  port: number,
): Promise<(WrkResult & { reloads: number; toolFailures: number }) | { error: string }> {
  const load = new WrkLoad(wrk, port, p.connections);
  try {
    await sleep(Math.min(p.steadyMs, 1000));
    let toolFailures = 0;
    for (let k = 1; k <= p.wrkReloads; k++) {
      if ((await c.reload().catch((err: Error) => err.message)) !== null) toolFailures++;
      await sleep(Math.min(p.gapMs, 250));
    }
    await sleep(Math.min(p.tailMs, 500));
    const r = await load.stop();
    progress(`  ${c.label}: wrk cross-check, ${p.wrkReloads} reloads: ${r.failed} failed of ${r.requests}`);
    return { ...r, reloads: p.wrkReloads, toolFailures };
  } catch (err) {
    await load.stop().catch(() => undefined);
    return { error: (err as Error).message.slice(0, 500) };
  }
}

export async function reloadSection(p: ReloadParams): Promise<ReloadSection> {
  const out: ContenderResult[] = [];
  for (const c of contenders(p)) {
    progress(`reloads: ${c.label} (${p.reloads} reloads, ${p.connections} connections)`);
    out.push(await runOne(c, p));
  }
  return { params: p, contenders: out };
}

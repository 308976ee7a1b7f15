// Section 6: the state relay through the SDKs users actually use (issue 14).
//
// For each state size, in one run:
//   (a) the peer: a plain one-hop copy of the size over a unix socket between
//       two processes (bench/fixtures/helper.c, as in section 3);
//   (b) the size streamed old generation -> Aeterna -> new generation through
//       the real daemon with the TypeScript SDK: test/fixtures/apps/plain_state_app.js,
//       whose dump returns plain bytes and whose load verifies them, timed by the
//       reload record's `relaying -> relayed` marks (what `aeterna reload` prints),
//       and the promotion's final sync by `draining -> done`;
//   (c) the same with the Python SDK (plain_state_app.py);
//   (d) the memfd transport at the same size (section 3's measureRelay);
// with Aeterna's peak RSS growth while it relays in (b) and (c), and beside them
// SHA-256's own speed in Node and Python and the cost of a fresh process's first
// write of the size (page faults: the new generation pays them, the peer not). The apps stamp each step (dump,
// hashing, writing, receiving, verifying, loading), so the report can say where
// the time goes without a profiler.
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { BenchDaemon, phaseAt } from '../aeterna';
import { ROOT, memoryOf, percentile, progress, python, run, tempDir } from '../common';
import { measureRelay, rawC, type Measurement } from './relay';

export type Sdk = 'typescript' | 'python';

/** min / median / max of a few samples: the spread matters on a shared machine. */
export interface Spread {
  min: number;
  median: number;
  max: number;
}

/** Where one relay's time went, from the apps' stamps (ms); null where a stamp is missing. */
export interface Steps {
  /** The reload's `relaying` mark to the old generation's dump callback: the new generation's start-up and hello. */
  startToDump: number | null;
  /** The old generation's dump callback to its first data frame: hashing (the SDK needs the digest first). */
  senderPrep: number | null;
  senderHash: number | null;
  /** The first data frame queued to the last one written to the socket. */
  senderWrite: number | null;
  /** The load header at the new generation to the SDK's verdict (reading, copying, hashing). */
  receive: number | null;
  receiverHash: number | null;
  /** The verdict to the app having the state (its own checks). */
  appLoad: number | null;
  /** The old generation's dump callback to the new one having the state. */
  dumpToLoaded: number | null;
}

export interface SdkReload {
  /** The record's relaying -> relayed. */
  relayMs: number;
  /** The record's draining -> done: the final sync and the old generation's exit. */
  finalMs: number;
  steps: Steps;
  finalSteps: Steps;
  /** Who ran it, to attribute a system-wide profile (`perf record -a`) of the run. */
  pids: { aeterna: number; old: number | null; new: number | null };
}

export type SdkPath =
  | { skipped: string }
  | { error: string }
  | {
      reloads: SdkReload[];
      relay: Spread;
      final: Spread;
      /** Aeterna's VmRSS before the first reload, and its peak growth over the reloads (sampled and VmHWM), KiB. */
      rssBeforeKb: number;
      peakGrowthKb: number;
    };

export interface RelaySdkRow {
  bytes: number;
  /** (a) the one-hop unix socket copy. */
  socket: Measurement;
  typescript: SdkPath;
  python: SdkPath;
  /** (d) the memfd transport (the TypeScript SDK, a sealed memfd). */
  memfd: Measurement;
  /** SHA-256 of this size in each language, ms (for scale: the SDKs hash every byte on each side). */
  sha256: { node: number | null; python: number | null };
  /**
   * A fresh Node process writing this size into a newly allocated buffer, 1 MiB at a time, ms: the
   * page faults any new generation pays to hold a streamed state, which the one-hop copy (one reused
   * 1 MiB buffer) never does.
   */
  firstTouch: number | null;
}

export interface RelaySdkSection {
  reps: number;
  rows: RelaySdkRow[];
}

const APPS = path.join(ROOT, 'test', 'fixtures', 'apps');
const MiB = 1024 * 1024;
/** Hash at most this much to time SHA-256 (scaled to the size): enough for a stable rate. */
const HASH_SAMPLE = 256 * MiB;
/** How often Aeterna's RSS is sampled during a reload. */
const RSS_EVERY_MS = 10;

export function spread(values: number[]): Spread {
  return { min: Math.min(...values), median: percentile(values, 50), max: Math.max(...values) };
}

// ---- the apps' stamps ------------------------------------------------------------------------

export interface Stamp {
  ev: string;
  at: number;
  final: boolean;
  ms?: number;
  start?: number;
}

/** One dump (sender) or load (receiver) of a generation: its anchor stamp and what followed it. */
interface Activity {
  at: number;
  final: boolean;
  hashMs: number | null;
  first: Stamp[];
}

/** The stamps generation `generation` of a plain-state app wrote to `dir` (none yet: empty). */
export function readStamps(dir: string, generation: number | null): Stamp[] {
  try {
    return fs
      .readFileSync(path.join(dir, `gen-${generation}.jsonl`), 'utf8')
      .split('\n')
      .filter((l) => l !== '')
      .map((l) => JSON.parse(l) as Stamp);
  } catch {
    return [];
  }
}

/** The last activity anchored by `anchor` (dump or load-header) with this `final`, up to the next anchor. */
function activity(stamps: Stamp[], anchor: string, final: boolean): Activity | null {
  let start = -1;
  stamps.forEach((s, i) => {
    if (s.ev === anchor && s.final === final) start = i;
  });
  if (start < 0) return null;
  const rest: Stamp[] = [];
  for (const s of stamps.slice(start + 1)) {
    if (s.ev === 'dump' || s.ev === 'load-header') break;
    rest.push(s);
  }
  const hashes = rest.filter((s) => s.ev === 'hash');
  return {
    at: stamps[start].at,
    final,
    hashMs: hashes.length > 0 ? hashes.reduce((a, s) => a + (s.ms ?? 0), 0) : null,
    first: rest,
  };
}

const at = (a: Activity | null, ev: string): number | null => a?.first.find((s) => s.ev === ev)?.at ?? null;
const diff = (later: number | null, earlier: number | null): number | null =>
  later === null || earlier === null ? null : later - earlier;

function steps(oldStamps: Stamp[], newStamps: Stamp[], final: boolean, relayingAt: number): Steps {
  const dump = activity(oldStamps, 'dump', final);
  const load = activity(newStamps, 'load-header', final);
  return {
    startToDump: final ? null : diff(dump?.at ?? null, relayingAt),
    senderPrep: diff(at(dump, 'write-start'), dump?.at ?? null),
    senderHash: dump?.hashMs ?? null,
    senderWrite: diff(at(dump, 'write-end'), at(dump, 'write-start')),
    receive: diff(at(load, 'verified'), load?.at ?? null),
    receiverHash: load?.hashMs ?? null,
    appLoad: diff(at(load, 'loaded'), at(load, 'verified')),
    dumpToLoaded: diff(at(load, 'loaded'), dump?.at ?? null),
  };
}

// ---- the measurements ------------------------------------------------------------------------

function appCommand(sdk: Sdk): string[] | { skipped: string } {
  if (sdk === 'typescript') return [process.execPath, path.join(APPS, 'plain_state_app.js')];
  const py = python();
  return py ? [py, path.join(APPS, 'plain_state_app.py')] : { skipped: 'python3 not installed' };
}

/** (b) and (c): `reps` reloads of the plain-bytes app through the real daemon, with Aeterna's RSS sampled. */
async function sdkPath(sdk: Sdk, bytes: number, reps: number): Promise<SdkPath> {
  const command = appCommand(sdk);
  if (!Array.isArray(command)) return command;
  const stamps = tempDir('aeterna-bench-sdk-stamps-');
  const daemon = new BenchDaemon({
    command,
    env: [`STATE_BYTES=${bytes}`, `STAMP_DIR=${stamps}`],
    readiness: '{ mode: "notify", timeout: "5m" }',
    handoffTimeout: '5m',
    stopTimeout: '6m', // above the handoff timeout, so a large final sync is never cut by the stop
  }).start();
  try {
    await daemon.running(300000);
    const pid = await daemon.aeternaPid();
    const before = memoryOf(pid);
    if (!before) return { error: 'aeterna exited before the first reload' };
    let peakKb = before.rssKb;
    const sampler = setInterval(() => {
      const m = memoryOf(pid);
      if (m) peakKb = Math.max(peakKb, m.rssKb);
    }, RSS_EVERY_MS);
    const reloads: SdkReload[] = [];
    try {
      for (let i = 0; i < reps; i++) {
        const old = (await daemon.status()).pid;
        const record = await daemon.reload();
        if (record.outcome !== 'promoted') return { error: `reload ${record.outcome}: ${record.reason}` };
        const relaying = phaseAt(record, 'relaying');
        const oldStamps = readStamps(stamps, record.from_generation);
        const newStamps = readStamps(stamps, record.to_generation);
        reloads.push({
          relayMs: phaseAt(record, 'relayed') - relaying,
          finalMs: phaseAt(record, 'done') - phaseAt(record, 'draining'),
          steps: steps(oldStamps, newStamps, false, relaying),
          finalSteps: steps(oldStamps, newStamps, true, relaying),
          pids: { aeterna: pid, old, new: record.new_pid },
        });
      }
    } finally {
      clearInterval(sampler);
    }
    const after = memoryOf(pid);
    // VmHWM covers what 10 ms sampling can miss, once the peak is above the start-up's own.
    if (after && after.hwmKb > before.hwmKb) peakKb = Math.max(peakKb, after.hwmKb);
    return {
      reloads,
      relay: spread(reloads.map((r) => r.relayMs)),
      final: spread(reloads.map((r) => r.finalMs)),
      rssBeforeKb: before.rssKb,
      peakGrowthKb: peakKb - before.rssKb,
    };
  } catch (err) {
    return { error: (err as Error).message.slice(0, 1500) };
  } finally {
    await daemon.stop();
  }
}

/** SHA-256 of `bytes` in Node (this process) and in Python, in ms, timed on min(bytes, 256 MiB) and scaled. */
async function sha256Speed(bytes: number): Promise<RelaySdkRow['sha256']> {
  const sample = Math.min(bytes, HASH_SAMPLE);
  const data = Buffer.alloc(sample, 0x61);
  const t0 = performance.now();
  crypto.createHash('sha256').update(data).digest('hex');
  const node = ((performance.now() - t0) * bytes) / sample;
  const py = python();
  let pythonMs: number | null = null;
  if (py) {
    const script = `import hashlib, time\nd = bytearray(b"a") * ${sample}\nt = time.perf_counter()\nhashlib.sha256(d).hexdigest()\nprint((time.perf_counter() - t) * 1000)`;
    const r = await run([py, '-c', script], { timeoutMs: 120000 });
    const ms = Number(r.stdout.trim());
    if (r.code === 0 && Number.isFinite(ms)) pythonMs = (ms * bytes) / sample;
  }
  return { node, python: pythonMs };
}

async function firstTouch(bytes: number): Promise<number | null> {
  const script = `const src = Buffer.alloc(1 << 20, 1); const t = performance.now(); const b = Buffer.allocUnsafe(${bytes});
    for (let o = 0; o < b.length; o += src.length) src.copy(b, o); console.log(performance.now() - t);`;
  const r = await run([process.execPath, '-e', script], { timeoutMs: 120000 });
  const ms = Number(r.stdout.trim());
  return r.code === 0 && Number.isFinite(ms) ? ms : null;
}

export async function relaySdkSection(sizes: number[], reps: number): Promise<RelaySdkSection> {
  const rows: RelaySdkRow[] = [];
  for (const bytes of sizes) {
    progress(`  relay through the SDKs: ${bytes / MiB} MiB, ${reps} reloads each`);
    rows.push({
      bytes,
      socket: await rawC(bytes),
      typescript: await sdkPath('typescript', bytes, reps),
      python: await sdkPath('python', bytes, reps),
      memfd: await measureRelay(bytes, 'memfd'),
      sha256: await sha256Speed(bytes),
      firstTouch: await firstTouch(bytes),
    });
  }
  return { reps, rows };
}

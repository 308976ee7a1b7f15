// Section 4: footprint.
//   RSS: the supervisor's own process while it supervises one app (the bench
//        HTTP app, idle), Aeterna beside tini where installed.
//   start-to-exec: from spawning the supervisor to the app's exec, where the
//        app is `date +%s%N` (it prints the wall clock the moment it runs, a
//        millisecond or less after its exec). Beside it: the same app spawned
//        directly (the floor: process creation from this harness), tini where
//        installed, and a bare `node -e 0` (spawn to exit: the Node start-up
//        every Node-based supervisor pays).
import { BenchDaemon } from '../aeterna';
import { Proc, fixture, freePort, median, memoryOf, progress, sleep, wallMs, waitForPort, which } from '../common';

export interface Memory {
  rssKb: number;
  hwmKb: number;
}

export type Timing = { ms: number[]; median: number; p95: number } | { skipped: string } | { error: string };

export interface FootprintSection {
  rss: {
    aeterna: Memory | { error: string };
    /** The app itself under Aeterna, for scale. */
    app: Memory | null;
    tini: Memory | { skipped: string } | { error: string };
    /** An idle `node` doing nothing, for scale: what any Node process costs. */
    nodeBaseline: Memory | { error: string };
  };
  startToExec: {
    direct: Timing;
    tini: Timing;
    nodeE0: Timing;
    aeterna: Timing;
  };
  reps: number;
}

function timing(ms: number[]): Timing {
  const sorted = [...ms].sort((a, b) => a - b);
  return { ms, median: median(ms), p95: sorted[Math.min(sorted.length - 1, Math.ceil(0.95 * sorted.length) - 1)] };
}

let settleMs = 1500;

/** Settle, then the largest RSS seen over a few samples. */
async function settledMemory(pid: number): Promise<Memory | null> {
  await sleep(settleMs);
  let best: Memory | null = null;
  for (let i = 0; i < 5; i++) {
    const m = memoryOf(pid);
    if (m && (!best || m.rssKb > best.rssKb)) best = m;
    await sleep(50);
  }
  return best;
}

async function aeternaRss(): Promise<{ aeterna: Memory | { error: string }; app: Memory | null }> {
  const d = new BenchDaemon({
    command: [process.execPath, fixture('http_app.js')],
    port: await freePort(),
    logLevel: 'info',
  }).start();
  try {
    const s = await d.running();
    const aeterna = await settledMemory(d.proc.pid);
    const app = s.pid ? memoryOf(s.pid) : null;
    return { aeterna: aeterna ?? { error: 'aeterna exited' }, app };
  } catch (err) {
    return { aeterna: { error: (err as Error).message.slice(0, 500) }, app: null };
  } finally {
    await d.stop();
  }
}

async function tiniRss(tini: string | null): Promise<Memory | { skipped: string } | { error: string }> {
  if (!tini) return { skipped: 'tini not installed' };
  const port = await freePort();
  const p = new Proc([tini, '-s', '--', process.execPath, fixture('http_app.js')], {
    env: { ...process.env, PORT: String(port) },
  });
  try {
    await waitForPort(port);
    return (await settledMemory(p.pid)) ?? { error: 'tini exited' };
  } catch (err) {
    return { error: (err as Error).message.slice(0, 500) };
  } finally {
    await p.stop('SIGTERM');
  }
}

async function nodeBaseline(): Promise<Memory | { error: string }> {
  const p = new Proc([process.execPath, '-e', 'setTimeout(() => {}, 60000)']);
  try {
    return (await settledMemory(p.pid)) ?? { error: 'node exited' };
  } finally {
    await p.stop('SIGKILL');
  }
}

/** Spawn argv, whose app prints `date +%s%N`; ms from the spawn to that stamp. */
async function toExec(argv: string[]): Promise<number> {
  const p = new Proc(argv);
  const { code } = await p.exited;
  const m = p.stdout.match(/^(\d{19})$/m);
  if (!m) throw new Error(`no date stamp from ${argv.join(' ')} (exit ${code})\n${p.tail(500)}`);
  return Number(BigInt(m[1]) / 1000n) / 1000 - p.spawnedAt;
}

async function repeat(reps: number, once: () => Promise<number>): Promise<Timing> {
  const ms: number[] = [];
  try {
    for (let i = 0; i < reps; i++) ms.push(await once());
  } catch (err) {
    return { error: (err as Error).message.slice(0, 500) };
  }
  return timing(ms);
}

/** reps: start-to-exec runs per row; settle: ms to let a process settle before its RSS is read. */
export async function footprintSection(reps: number, settle = 1500): Promise<FootprintSection> {
  settleMs = settle;
  const tini = which('tini');
  const date = which('date') ?? '/bin/date';
  progress('  footprint: RSS');
  const { aeterna, app } = await aeternaRss();
  const tiniMem = await tiniRss(tini);
  const baseline = await nodeBaseline();

  progress('  footprint: start to exec');
  const direct = await repeat(reps, () => toExec([date, '+%s%N']));
  const tiniExec = tini
    ? await repeat(reps, () => toExec([tini, '-s', '--', date, '+%s%N']))
    : { skipped: 'tini not installed' };
  const nodeE0 = await repeat(reps, async () => {
    const t0 = wallMs();
    const p = new Proc([process.execPath, '-e', '0']);
    await p.exited;
    return wallMs() - t0;
  });
  const aeternaExec = await repeat(reps, async () => {
    const d = new BenchDaemon({ command: [date, '+%s%N'], restart: 'never', logLevel: 'info' });
    d.start();
    const { code } = await d.proc.exited;
    const m = d.proc.stdout.match(/^(\d{19})$/m);
    if (!m) throw new Error(`no date stamp from the app under aeterna (exit ${code})\n${d.proc.tail(1000)}`);
    return Number(BigInt(m[1]) / 1000n) / 1000 - d.proc.spawnedAt;
  });
  return {
    rss: { aeterna, app, tini: tiniMem, nodeBaseline: baseline },
    startToExec: { direct, tini: tiniExec, nodeE0, aeterna: aeternaExec },
    reps,
  };
}

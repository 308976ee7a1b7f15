// Section 7: checkpoints (issue 13), through the SDKs users actually use.
//
// For each state size, in one run:
//   (a) the cost of one relay.checkpoint() of the size, as the app sees it (from the call to Aeterna's
//       `checkpointed`), with the TypeScript SDK (test/fixtures/apps/plain_state_app.js) and the Python SDK
//       (plain_state_app.py): in memory, and durable (`path`: written and fsynced before the answer); and with
//       the TypeScript SDK as a sealed memfd (made beforehand: no bytes through the socket);
//   beside its peers measured in the same run: the one-hop unix socket copy of the size between two
//   processes (section 3's helper), and writing the size to a file in the same directory plus its fsync
//   (what a durable checkpoint cannot do without);
//   (b) the time from kill -9 of the app to the generation Aeterna restarted saying ready with its state loaded
//       from the checkpoint, beside the same restart of the same app without checkpoints (it makes its bytes
//       again, the cheapest possible rebuild): both pay the same restart back-off, so the report also gives
//       the new process's own part (its first stamp to ready).
import fs from 'node:fs';
import path from 'node:path';
import { BenchDaemon } from '../aeterna';
import { ROOT, progress, python, sleep, tempDir, wallMs } from '../common';
import { rawC, type Measurement } from './relay';
import { readStamps, spread, type Sdk, type Spread, type Stamp } from './relay-sdk';

const APPS = path.join(ROOT, 'test', 'fixtures', 'apps');
const MiB = 1024 * 1024;

export type Timed = Spread | { skipped: string } | { error: string };

export interface CheckpointCostRow {
  bytes: number;
  /** Peer: the one-hop unix socket copy of the size. */
  socket: Measurement;
  /** Peer of the durable checkpoint: write the size to a file and fsync it, ms. */
  fsync: Spread;
  /** relay.checkpoint() of the size, ms, per SDK: in memory and with `path` (TypeScript: and as a memfd). */
  typescript: { memory: Timed; durable: Timed; memfd: Timed };
  python: { memory: Timed; durable: Timed };
}

export interface RecoveryRow {
  bytes: number;
  /** kill -9 to the restarted generation ready with the checkpoint loaded, ms. */
  checkpoint: Timed;
  /** kill -9 to the restarted generation ready, without checkpoints. */
  plain: Timed;
  /** The same two, from the restarted process's first stamp (its start-up: back-off and spawn left out). */
  checkpointProcess: Timed;
  plainProcess: Timed;
}

export interface CheckpointSection {
  reps: number;
  kills: number;
  cost: CheckpointCostRow[];
  recovery: RecoveryRow[];
}

/** Wait until generation `generation` stamped `ev` (the apps stamp ready once they said so). */
async function stampOf(dir: string, generation: number, ev: string, timeoutMs: number): Promise<Stamp[]> {
  const deadline = wallMs() + timeoutMs;
  for (;;) {
    const stamps = readStamps(dir, generation);
    if (stamps.some((s) => s.ev === ev)) return stamps;
    if (wallMs() > deadline) throw new Error(`generation ${generation} did not stamp "${ev}" within ${timeoutMs} ms`);
    await sleep(2);
  }
}

function appCommand(sdk: Sdk): string[] | null {
  if (sdk === 'typescript') return [process.execPath, path.join(APPS, 'plain_state_app.js')];
  const py = python();
  return py ? [py, path.join(APPS, 'plain_state_app.py')] : null;
}

/** A daemon running the plain-bytes app of `sdk` with checkpoints on (`durable`: with a file) or off. */
function daemonFor(
  command: string[],
  bytes: number,
  stamps: string,
  checkpoints: number,
  checkpoint: string,
  memfd = false,
): BenchDaemon {
  return new BenchDaemon({
    command,
    env: [
      `STATE_BYTES=${bytes}`,
      `STAMP_DIR=${stamps}`,
      `CHECKPOINTS=${checkpoints}`,
      ...(memfd ? ['CHECKPOINT_MEMFD=1'] : []),
    ],
    readiness: '{ mode: "notify", timeout: "5m" }',
    handoffTimeout: '5m',
    checkpoint,
    stopTimeout: '30s',
  }).start();
}

/** (a) `reps` checkpoints of `bytes` taken by generation 1 of `sdk`'s app, ms each (`memfd`: as a sealed memfd). */
async function checkpointCost(sdk: Sdk, bytes: number, reps: number, durable: boolean, memfd = false): Promise<Timed> {
  const command = appCommand(sdk);
  if (!command) return { skipped: 'python3 not installed' };
  const stamps = tempDir('aeterna-bench-ckpt-');
  const daemon = daemonFor(
    command,
    bytes,
    stamps,
    reps,
    durable ? '{ enabled: true, path: "checkpoint.bin", max_size: "2GiB" }' : '{ enabled: true, max_size: "2GiB" }',
    memfd,
  );
  try {
    await daemon.running(300000);
    const ms = readStamps(stamps, 1)
      .filter((s) => s.ev === 'checkpoint')
      .map((s) => s.ms ?? NaN);
    if (ms.length !== reps) return { error: `${ms.length} of ${reps} checkpoints stamped` };
    return spread(ms);
  } catch (err) {
    return { error: (err as Error).message.slice(0, 1500) };
  } finally {
    await daemon.stop();
  }
}

/** The peer of a durable checkpoint: write `bytes` to a file in a fresh directory and fsync it, `reps` times. */
function fsyncPeer(bytes: number, reps: number): Spread {
  const dir = tempDir('aeterna-bench-fsync-');
  const data = Buffer.alloc(bytes, 0x61);
  const ms: number[] = [];
  for (let i = 0; i < reps; i++) {
    const t = performance.now();
    const fd = fs.openSync(path.join(dir, `copy-${i}`), 'w');
    for (let off = 0; off < bytes;) off += fs.writeSync(fd, data, off, bytes - off);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    ms.push(performance.now() - t);
  }
  fs.rmSync(dir, { recursive: true, force: true });
  return spread(ms);
}

/** (b) `kills` times: kill -9 the serving app, and time until the generation Aeterna restarted stamps ready. */
async function recovery(
  bytes: number,
  kills: number,
  withCheckpoint: boolean,
): Promise<{ total: Timed; process: Timed }> {
  const stamps = tempDir('aeterna-bench-recovery-');
  const daemon = daemonFor(
    appCommand('typescript')!,
    bytes,
    stamps,
    withCheckpoint ? 1 : 0,
    withCheckpoint ? '{ enabled: true, max_size: "2GiB" }' : '{ enabled: false }',
  );
  try {
    await daemon.running(300000);
    const total: number[] = [];
    const own: number[] = [];
    for (let i = 0; i < kills; i++) {
      const s = await daemon.status();
      await stampOf(stamps, s.generation, 'ready', 60000);
      const killedAt = wallMs();
      process.kill(s.pid!, 'SIGKILL');
      const next = await stampOf(stamps, s.generation + 1, 'ready', 120000);
      if (withCheckpoint && !next.some((x) => x.ev === 'loaded'))
        throw new Error(`generation ${s.generation + 1} did not load the checkpoint`);
      const readyAt = next.find((x) => x.ev === 'ready')!.at;
      total.push(readyAt - killedAt);
      own.push(readyAt - next[0].at);
      await daemon.running(60000);
    }
    return { total: spread(total), process: spread(own) };
  } catch (err) {
    const error = { error: (err as Error).message.slice(0, 1500) };
    return { total: error, process: error };
  } finally {
    await daemon.stop();
  }
}

export async function checkpointSection(sizes: number[], reps: number, kills: number): Promise<CheckpointSection> {
  const cost: CheckpointCostRow[] = [];
  const rows: RecoveryRow[] = [];
  for (const bytes of sizes) {
    progress(`  checkpoints: ${bytes / MiB} MiB, ${reps} per SDK and mode, ${kills} kill -9 each way`);
    cost.push({
      bytes,
      socket: await rawC(bytes),
      fsync: fsyncPeer(bytes, reps),
      typescript: {
        memory: await checkpointCost('typescript', bytes, reps, false),
        durable: await checkpointCost('typescript', bytes, reps, true),
        memfd: await checkpointCost('typescript', bytes, reps, false, true),
      },
      python: {
        memory: await checkpointCost('python', bytes, reps, false),
        durable: await checkpointCost('python', bytes, reps, true),
      },
    });
    const withCheckpoint = await recovery(bytes, kills, true);
    const plain = await recovery(bytes, kills, false);
    rows.push({
      bytes,
      checkpoint: withCheckpoint.total,
      plain: plain.total,
      checkpointProcess: withCheckpoint.process,
      plainProcess: plain.process,
    });
  }
  return { reps, kills, cost, recovery: rows };
}

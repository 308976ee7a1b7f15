// Section 3: state relay throughput, beside the machine's own limit.
//
// The limit: one hop over a unix stream socket between two processes, measured
// in the same run, twice: in C (bench/fixtures/helper.c, 1 MiB read/write
// buffers: what the kernel can do) and in Node (net.Socket: what a Node
// process can do). The relay rows are measured by measureRelay() and shown as
// a fraction of the C figure (the Node one when no C compiler is installed).
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { Proc, ROOT, fixture, median, nativeHelper, parseResult, progress, run, tempDir } from '../common';
import { BenchDaemon } from '../aeterna';

export type Transport = 'stream' | 'memfd';

export type Measurement =
  { ms: number[]; median: number; gbps: number } | { pending: string } | { skipped: string } | { error: string };

export interface RelayRow {
  bytes: number;
  rawC: Measurement;
  rawNode: Measurement;
  stream: Measurement;
  memfd: Measurement;
}

export interface RelaySection {
  rows: RelayRow[];
  /** What measureRelay() said about the relay's availability. */
  relayStatus: string;
}

const MiB = 1024 * 1024;

function measured(bytes: number, ms: number[]): Measurement {
  const m = median(ms);
  return { ms, median: m, gbps: bytes / 1e9 / (m / 1000) };
}

/** How many timed repetitions for a size (more for small sizes, where one run is a fraction of a millisecond). */
export function repsFor(bytes: number): number {
  if (bytes <= 4 * MiB) return 20;
  if (bytes <= 128 * MiB) return 5;
  return 3;
}

/** One hop in C: socketpair between two processes, 1 MiB writes and reads. */
export async function rawC(bytes: number): Promise<Measurement> {
  const helper = nativeHelper();
  if ('error' in helper) return { skipped: helper.error };
  const r = await run([helper.path, 'unix', String(bytes), String(repsFor(bytes))], { timeoutMs: 300000 });
  const res = parseResult<{ ms: number[] }>(r.stdout);
  if (r.code !== 0 || !res) return { error: `helper exited ${r.code}: ${r.stderr.slice(-300)}` };
  return measured(bytes, res.ms);
}

/** One hop in Node: a writer process connects to this process's unix socket and writes 1 MiB chunks. */
async function rawNode(bytes: number): Promise<Measurement> {
  const dir = tempDir('aeterna-bench-unix-');
  const sock = path.join(dir, 'hop.sock');
  const writer = `
    const net = require('node:net');
    const total = Number(process.argv[2]);
    const chunk = Buffer.alloc(1 << 20, 0x5a);
    const s = net.connect(process.argv[1]);
    s.once('data', function go() {
      let left = total;
      const pump = () => {
        while (left > 0) {
          const n = Math.min(left, chunk.length);
          left -= n;
          if (!s.write(n === chunk.length ? chunk : chunk.subarray(0, n))) return s.once('drain', pump);
        }
        s.end();
      };
      pump();
    });
    s.on('close', () => process.exit(0));
  `;
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(sock, resolve));
  const ms: number[] = [];
  try {
    for (let i = 0; i < repsFor(bytes); i++) {
      const accepted = new Promise<net.Socket>((resolve) => server.once('connection', resolve));
      const child = new Proc([process.execPath, '-e', writer, sock, String(bytes)]);
      const conn = await accepted;
      const elapsed = await new Promise<number>((resolve, reject) => {
        let got = 0;
        const t0 = performance.now();
        conn.on('data', (d: Buffer) => {
          got += d.length;
          if (got >= bytes) resolve(performance.now() - t0);
        });
        conn.on('error', reject);
        conn.on('close', () => (got < bytes ? reject(new Error(`short read: ${got} of ${bytes}`)) : undefined));
        conn.write('g');
      });
      conn.destroy();
      await child.exited;
      ms.push(elapsed);
    }
  } catch (err) {
    return { error: (err as Error).message };
  } finally {
    server.close();
  }
  return measured(bytes, ms);
}

/** The State Relay's client SDK, once the relay has landed (compiled to dist/src/client/index.js). */
export const RELAY_CLIENT = path.join(ROOT, 'dist', 'src', 'client', 'index.js');

/**
 * The relay rows: reloads of bench/fixtures/relay_app.js holding `sizeBytes`
 * of state, timed from the app's side: from the old generation starting its
 * dump to the new generation having the state in hand (right before its ack).
 *   stream: the state streams through Aeterna as data frames (MB/s end to end;
 *           the app passes the sha256 it already knows; the receiving SDK
 *           hashes as the bytes arrive);
 *   memfd:  the state lives in a sealed memfd handed over with SCM_RIGHTS:
 *           the handoff's time, expected flat in the size.
 */
export async function measureRelay(sizeBytes: number, transport: Transport): Promise<Measurement> {
  if (!fs.existsSync(RELAY_CLIENT)) return { pending: 'pending: State Relay not available' };
  const stamps = tempDir('aeterna-bench-stamps-');
  const daemon = new BenchDaemon({
    command: [process.execPath, fixture('relay_app.js')],
    env: [`STATE_BYTES=${sizeBytes}`, `TRANSPORT=${transport}`, `STAMP_DIR=${stamps}`],
    readiness: '{ mode: "notify", timeout: "5m" }',
    handoffTimeout: '5m',
    stopTimeout: '30s',
  }).start();
  try {
    await daemon.running(300000);
    const ms: number[] = [];
    for (let i = 0; i < repsFor(sizeBytes); i++) {
      const record = await daemon.reload();
      if (record.outcome !== 'promoted') return { error: `reload ${record.outcome}: ${record.reason}` };
      const dumped = Number(fs.readFileSync(path.join(stamps, `dump-${record.from_generation}`), 'utf8'));
      const acked = Number(fs.readFileSync(path.join(stamps, `ack-${record.to_generation}`), 'utf8'));
      ms.push(acked - dumped);
    }
    return measured(sizeBytes, ms);
  } catch (err) {
    return { error: (err as Error).message };
  } finally {
    await daemon.stop();
  }
}

export async function relaySection(sizes: number[]): Promise<RelaySection> {
  const rows: RelayRow[] = [];
  for (const bytes of sizes) {
    progress(`  relay: ${bytes / MiB} MiB`);
    rows.push({
      bytes,
      rawC: await rawC(bytes),
      rawNode: await rawNode(bytes),
      stream: await measureRelay(bytes, 'stream'),
      memfd: await measureRelay(bytes, 'memfd'),
    });
  }
  const probe = await measureRelay(sizes[0] ?? MiB, 'stream');
  return { rows, relayStatus: 'pending' in probe ? probe.pending : 'measured' };
}

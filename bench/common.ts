// Shared plumbing for the benchmark sections: paths, clocks, statistics,
// processes, and cleanup that runs even when the bench is interrupted.
import { spawn, spawnSync, type ChildProcess, type SpawnOptions } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

/** The repository root (this file runs from dist/bench/). */
export const ROOT = path.resolve(__dirname, '..', '..');
export const CLI = path.join(ROOT, 'bin', 'aeterna.js');
export const FIXTURES = path.join(ROOT, 'bench', 'fixtures');

export function fixture(name: string): string {
  return path.join(FIXTURES, name);
}

/** Wall-clock time in ms with sub-ms resolution (CLOCK_REALTIME, comparable with other processes' clocks). */
export function wallMs(): number {
  return performance.timeOrigin + performance.now();
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export function progress(message: string): void {
  process.stderr.write(`bench: ${message}\n`);
}

// ---- statistics -------------------------------------------------------------------------------

/** The p-th percentile (0..100) by nearest rank; NaN for no samples. */
export function percentile(values: ArrayLike<number>, p: number): number {
  if (values.length === 0) return NaN;
  const sorted = Float64Array.from(values).sort();
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length - 1, Math.max(0, rank - 1))];
}

export const median = (values: ArrayLike<number>): number => percentile(values, 50);

// ---- cleanup ----------------------------------------------------------------------------------

const cleanups = new Set<() => void>();
let cleanupInstalled = false;

/** Run fn (synchronously) when the bench exits, however it exits. Returns a function that unregisters it. */
export function onExit(fn: () => void): () => void {
  if (!cleanupInstalled) {
    cleanupInstalled = true;
    const runAll = (): void => {
      for (const f of [...cleanups].reverse()) {
        try {
          f();
        } catch {
          // best effort
        }
      }
      cleanups.clear();
    };
    process.on('exit', runAll);
    for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
      process.once(sig, () => {
        runAll();
        process.exit(130);
      });
    }
  }
  cleanups.add(fn);
  return () => cleanups.delete(fn);
}

export function tempDir(prefix = 'aeterna-bench-'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  onExit(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

// ---- processes --------------------------------------------------------------------------------

/** A child process whose output is collected, with waitFor(pattern). Killed (SIGKILL) if still alive at exit. */
export class Proc {
  readonly child: ChildProcess;
  stdout = '';
  stderr = '';
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  readonly spawnedAt = wallMs();
  private waiters: Array<() => void> = [];
  private readonly unregister: () => void;

  constructor(
    readonly argv: string[],
    options: SpawnOptions = {},
  ) {
    this.child = spawn(argv[0], argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'], ...options });
    this.child.stdout?.setEncoding('utf8').on('data', (d: string) => this.append('stdout', d));
    this.child.stderr?.setEncoding('utf8').on('data', (d: string) => this.append('stderr', d));
    this.exited = new Promise((resolve) => {
      this.child.on('error', (err) => {
        this.stderr += `spawn failed: ${err.message}\n`;
        resolve({ code: 127, signal: null });
      });
      this.child.on('exit', (code, signal) => {
        this.notify();
        resolve({ code, signal });
      });
    });
    const pid = this.child.pid;
    this.unregister = onExit(() => {
      if (pid !== undefined && this.alive) process.kill(pid, 'SIGKILL');
    });
    void this.exited.then(() => this.unregister());
  }

  get alive(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null && this.child.pid !== undefined;
  }

  get pid(): number {
    return this.child.pid ?? -1;
  }

  private append(which: 'stdout' | 'stderr', d: string): void {
    // Keep memory bounded for chatty processes: the tail is what matters.
    const next = this[which] + d;
    this[which] = next.length > 1_000_000 ? next.slice(-500_000) : next;
    this.notify();
  }

  private notify(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  /** Wait until stdout+stderr match pattern (searched from `from` in stdout); throws on exit or timeout. */
  async waitFor(pattern: RegExp, timeoutMs = 30000, from = 0): Promise<RegExpMatchArray> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = this.stdout.slice(from).match(pattern) ?? this.stderr.match(pattern);
      if (m) return m;
      if (!this.alive)
        throw new Error(
          `${path.basename(this.argv[1] ?? this.argv[0])} exited before ${pattern} appeared\n${this.tail()}`,
        );
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${pattern}\n${this.tail()}`);
      await new Promise<void>((r) => {
        const t = setTimeout(r, 100);
        this.waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
  }

  tail(chars = 3000): string {
    return `stdout: ${this.stdout.slice(-chars)}\nstderr: ${this.stderr.slice(-chars)}`;
  }

  /** Signal it (unless signal is null) and wait for the exit; SIGKILL after graceMs. */
  async stop(
    signal: NodeJS.Signals | null = 'SIGTERM',
    graceMs = 15000,
  ): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    if (signal !== null && this.alive) this.child.kill(signal);
    const t = setTimeout(() => this.alive && this.child.kill('SIGKILL'), graceMs);
    try {
      return await this.exited;
    } finally {
      clearTimeout(t);
    }
  }
}

/** Run a command to completion (async, so the event loop keeps serving load); kill it after timeoutMs. */
export async function run(
  argv: string[],
  options: SpawnOptions & { timeoutMs?: number } = {},
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const p = new Proc(argv, options);
  const t = setTimeout(() => p.alive && p.child.kill('SIGKILL'), options.timeoutMs ?? 120000);
  const { code } = await p.exited;
  clearTimeout(t);
  return { code, stdout: p.stdout, stderr: p.stderr };
}

/** The path of an executable in PATH, or null. */
export function which(name: string): string | null {
  for (const dir of (process.env.PATH ?? '').split(':')) {
    if (!dir) continue;
    const file = path.join(dir, name);
    try {
      fs.accessSync(file, fs.constants.X_OK);
      if (fs.statSync(file).isFile()) return file;
    } catch {
      // not here
    }
  }
  return null;
}

/** First line of `cmd args` (stdout or stderr), or null when it cannot run. */
export function versionOf(argv: string[]): string | null {
  const r = spawnSync(argv[0], argv.slice(1), { encoding: 'utf8', timeout: 10000 });
  if (r.error || r.status === null) return null;
  const line = `${r.stdout}\n${r.stderr}`.split('\n').find((l) => l.trim() !== '');
  return line?.trim() ?? null;
}

/** A free TCP port on 127.0.0.1 (bound and released). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

/** Resolve when something accepts TCP connections on 127.0.0.1:port. */
export async function waitForPort(port: number, timeoutMs = 30000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect(port, '127.0.0.1');
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`nothing listens on 127.0.0.1:${port} after ${timeoutMs} ms`);
    await sleep(50);
  }
}

/** VmRSS and VmHWM of a process, in KiB; null when it is gone. */
export function memoryOf(pid: number): { rssKb: number; hwmKb: number } | null {
  try {
    const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    const field = (name: string): number => Number(status.match(new RegExp(`^${name}:\\s+(\\d+) kB`, 'm'))?.[1] ?? NaN);
    return { rssKb: field('VmRSS'), hwmKb: field('VmHWM') };
  } catch {
    return null;
  }
}

/** The pids whose parent is ppid. */
export function childrenOf(ppid: number): number[] {
  const out: number[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${entry}/stat`, 'utf8');
      if (Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]) === ppid) out.push(Number(entry));
    } catch {
      // raced with an exit
    }
  }
  return out;
}

let unshareChecked: string | null | undefined;
/** Why a process cannot be PID 1 of a new PID namespace here, or null when it can. */
export function pidNamespaceUnavailable(): string | null {
  if (unshareChecked === undefined) {
    const r = spawnSync('unshare', ['--pid', '--fork', '--mount-proc', 'true'], { stdio: 'ignore' });
    unshareChecked =
      r.status === 0
        ? null
        : `unshare --pid --fork --mount-proc failed (${r.error?.message ?? `exit ${r.status}`}; needs root)`;
  }
  return unshareChecked;
}

export const UNSHARE = ['unshare', '--pid', '--fork', '--mount-proc'];

/** The real python3 executable (not a pyenv/asdf shim script, whose own start-up would blur the app's). */
export function python(): string | null {
  const r = spawnSync('python3', ['-c', 'import sys; print(sys.executable)'], { encoding: 'utf8', timeout: 10000 });
  if (r.status !== 0) return null;
  const exe = r.stdout.trim();
  return exe !== '' ? exe : 'python3';
}

/** The native helper (bench/fixtures/helper.c), compiled once per run; {error} when no C compiler works. */
let helperBuilt: { path: string } | { error: string } | undefined;
export function nativeHelper(): { path: string } | { error: string } {
  if (helperBuilt) return helperBuilt;
  const cc = which('cc') ?? which('gcc') ?? which('clang');
  if (!cc) return (helperBuilt = { error: 'no C compiler (cc) installed' });
  const out = path.join(tempDir('aeterna-bench-helper-'), 'helper');
  const r = spawnSync(cc, ['-O2', '-o', out, fixture('helper.c')], { encoding: 'utf8', timeout: 60000 });
  if (r.status !== 0)
    return (helperBuilt = { error: `cc failed: ${(r.stderr || r.error?.message || '').trim().slice(0, 300)}` });
  return (helperBuilt = { path: out });
}

/** Parse the first "RESULT <json>" line of a helper's output. */
export function parseResult<T>(stdout: string): T | null {
  const m = stdout.match(/^RESULT (.*)$/m);
  if (!m) return null;
  try {
    return JSON.parse(m[1]) as T;
  } catch {
    return null;
  }
}

/** Formatting for the report. */
export function fmt(n: number | null | undefined, digits = 1): string {
  if (n === null || n === undefined || !Number.isFinite(n)) return 'n/a';
  return n.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

export function fmtInt(n: number | null | undefined): string {
  if (n === null || n === undefined || !Number.isFinite(n)) return 'n/a';
  return Math.round(n).toLocaleString('en-US');
}

// Test harness: runs the real `aeterna` CLI as a child of the test, optionally
// as PID 1 of a fresh PID namespace (unshare --pid --fork --mount-proc).
// Tests may use child_process: the ban on it applies to the supervisor only.
import { spawn, type ChildProcess } from 'node:child_process';
import { after } from 'node:test';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { procStat } from '../../src/supervisor/proctree';

export const ROOT = path.resolve(__dirname, '..', '..', '..');

/** Whether .dockerignore keeps `p` (a path relative to the repository) out of the image build context. */
export function dockerIgnored(): (p: string) => boolean {
  const patterns = fs
    .readFileSync(path.join(ROOT, '.dockerignore'), 'utf8')
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '' && !l.startsWith('#'));
  return (p) =>
    patterns.some((pattern) =>
      pattern.startsWith('*.') ? p.endsWith(pattern.slice(1)) : p === pattern || p.startsWith(pattern + '/'),
    );
}
export const CLI = path.join(ROOT, 'bin', 'aeterna.js');

export function fixture(...parts: string[]): string {
  return path.join(ROOT, 'test', 'fixtures', ...parts);
}

// Why PID-namespace tests cannot run here, or null when they can: the benches ask the same.
export { pidNamespaceUnavailable } from '../../bench/common';

/** Every directory tempDir made in this process: removed when a test file ends (see `runs` below). */
const dirs: string[] = [];
/** A fresh directory under the system's temp directory. */
export function tempDir(prefix = 'aeterna-test-'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  dirs.push(dir);
  return dir;
}

/** Write an aeterna.yaml into dir (control socket kept inside dir) and return its path. */
export function writeConfig(dir: string, body: string): string {
  const file = path.join(dir, 'aeterna.yaml');
  fs.writeFileSync(file, body);
  return file;
}

/** A free TCP port on 127.0.0.1 (bound and released; good enough for tests on one machine). */
/** A process's RSS and peak RSS (VmHWM) in KiB. */
export function processMemory(pid: number): { rss: number; hwm: number } {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (key: string): number => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(status)![1]);
  return { rss: kb('VmRSS'), hwm: kb('VmHWM') };
}

export async function freePort(): Promise<number> {
  const net = await import('node:net');
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface LogLine {
  level: string;
  msg: string;
  [key: string]: unknown;
}

/** Every Aeterna a test file started, so that one a failed test left running is killed when the file ends. */
const runs = new Set<AeternaRun>();
// In a test file's own process only: a run left alive would keep it, and so the whole suite, waiting on its pipes
// forever. Not in a bench a test starts (it imports this file too, and inherits the runner's NODE_TEST_CONTEXT): a
// hook there would make it a test file, writing the runner's protocol into the output the test reads.
if (process.env.NODE_TEST_CONTEXT !== undefined && /\.test\.js$/.test(process.argv[1] ?? ''))
  after(async () => {
    for (const run of runs) await run.killAll();
    // Thousands of runs of the suite must not fill /tmp. A directory a test still holds (a mount) stays.
    for (const dir of dirs)
      try {
        fs.rmSync(dir, { recursive: true, force: true, maxRetries: 3 });
      } catch {
        // still mounted, or held: it stays, as every directory did before
      }
  });

export class AeternaRun {
  stdout = '';
  stderr = '';
  readonly exited: Promise<Exit>;
  private readonly waiters: Array<() => void> = [];

  constructor(
    readonly child: ChildProcess,
    readonly pid1: boolean,
  ) {
    runs.add(this);
    child.once('close', () => runs.delete(this));
    child.stdout!.setEncoding('utf8').on('data', (d: string) => {
      this.stdout += d;
      this.notify();
    });
    child.stderr!.setEncoding('utf8').on('data', (d: string) => {
      this.stderr += d;
      this.notify();
    });
    // 'exit' can come before the last of stdout and stderr has been read (a loaded machine shows it): resolve once
    // both are closed too, or after a bound where a process that outlived Aeterna (not as PID 1) keeps them open.
    this.exited = new Promise((resolve) =>
      child.on('exit', (code, signal) => {
        const done = (): void => {
          clearTimeout(bound);
          this.notify();
          resolve({ code, signal });
        };
        const bound = setTimeout(done, 10000);
        child.once('close', done);
      }),
    );
  }

  private notify(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  /** Wait until stdout+stderr match, or fail after timeoutMs (a guard against hangs, not a timing assertion). */
  async waitFor(pattern: RegExp, timeoutMs = 20000): Promise<RegExpMatchArray> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = (this.stdout + '\n' + this.stderr).match(pattern);
      if (m) return m;
      if (this.child.exitCode !== null || this.child.signalCode !== null) {
        throw new Error(`aeterna exited before ${pattern} appeared\nstdout:\n${this.stdout}\nstderr:\n${this.stderr}`);
      }
      if (Date.now() > deadline)
        throw new Error(`timed out waiting for ${pattern}\nstdout:\n${this.stdout}\nstderr:\n${this.stderr}`);
      await new Promise<void>((r) => {
        const t = setTimeout(r, 200);
        this.waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
  }

  /** The first "RESULT <json>" line the app printed. */
  async result<T = Record<string, unknown>>(): Promise<T> {
    const m = await this.waitFor(/^RESULT (.*)$/m);
    return JSON.parse(m[1]) as T;
  }

  /** Aeterna's own JSON log lines. */
  logs(): LogLine[] {
    return this.stderr
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => {
        try {
          return JSON.parse(l) as LogLine & { name?: string };
        } catch {
          return null;
        }
      })
      .filter((l): l is LogLine & { name?: string } => l !== null && l.name === 'aeterna');
  }

  /** The host pid of the Aeterna process (inside the namespace it is PID 1). */
  async aeternaPid(): Promise<number> {
    if (!this.pid1) return this.child.pid!;
    const parent = this.child.pid!;
    for (let i = 0; i < 200; i++) {
      for (const entry of fs.readdirSync('/proc')) {
        if (!/^\d+$/.test(entry)) continue;
        try {
          const stat = fs.readFileSync(`/proc/${entry}/stat`, 'utf8');
          const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
          if (ppid === parent) return Number(entry);
        } catch {
          // raced with an exit
        }
      }
      await new Promise((r) => setTimeout(r, 25));
    }
    throw new Error('could not find the aeterna process under unshare');
  }

  /**
   * Cleanup after a failed test: SIGKILL every process under the daemon (its
   * generations, and the orphans it adopted as subreaper), then the daemon, and
   * stop reading its pipes, which orphaned apps would otherwise hold open (and
   * keep the test file from ever exiting).
   */
  async killAll(): Promise<void> {
    if (this.child.exitCode === null && this.child.signalCode === null) {
      let pid: number | null = null;
      try {
        pid = await this.aeternaPid();
      } catch {
        // it is already gone
      }
      if (pid !== null) {
        for (const descendant of descendantsOf(pid)) {
          try {
            process.kill(descendant, 'SIGKILL');
          } catch {
            // gone already
          }
        }
        // As PID 1 the daemon is not this.child (unshare is): kill it itself, which takes its namespace down.
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // already gone
        }
      }
      this.child.kill('SIGKILL');
    }
    this.child.stdout?.destroy();
    this.child.stderr?.destroy();
  }

  async signal(signal: NodeJS.Signals): Promise<void> {
    process.kill(await this.aeternaPid(), signal);
  }

  /** Wait for exit, killing everything if it takes longer than timeoutMs (a hang guard). */
  async exit(timeoutMs = 30000): Promise<Exit> {
    // killAll, not the child alone: as PID 1 the child is unshare, and killing it leaves Aeterna and the app running.
    const t = setTimeout(() => void this.killAll(), timeoutMs);
    try {
      return await this.exited;
    } finally {
      clearTimeout(t);
    }
  }
}

/** Every process below `root` (children, their children, ...), from /proc. */
export function descendantsOf(root: number): number[] {
  const children = new Map<number, number[]>();
  for (const entry of fs.readdirSync('/proc')) {
    const stat = /^\d+$/.test(entry) ? procStat(Number(entry)) : null;
    if (stat) children.set(stat.ppid, [...(children.get(stat.ppid) ?? []), stat.pid]);
  }
  const found: number[] = [];
  for (let queue = [root]; queue.length > 0;) {
    const next = children.get(queue.shift()!) ?? [];
    found.push(...next);
    queue.push(...next);
  }
  return found;
}

/** Run `aeterna <args>`; with pid1, as PID 1 of a new PID namespace. */
export function runAeterna(
  args: string[],
  options: { pid1?: boolean; env?: NodeJS.ProcessEnv; cwd?: string; prefix?: string[] } = {},
): AeternaRun {
  const pid1 = options.pid1 ?? false;
  const cmd = [...(options.prefix ?? []), process.execPath, CLI, ...args];
  const argv = pid1 ? ['unshare', '--pid', '--fork', '--mount-proc', ...cmd] : cmd;
  const child = spawn(argv[0], argv.slice(1), {
    cwd: options.cwd ?? ROOT,
    env: { ...process.env, ...options.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  return new AeternaRun(child, pid1);
}

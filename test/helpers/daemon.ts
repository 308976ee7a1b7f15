// A real Aeterna daemon for end-to-end tests, with its config in a temp dir
// and the CLI run against it as a separate process.
import { spawn } from 'node:child_process';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { CLI, ROOT, descendantsOf, freePort, runAeterna, tempDir, type AeternaRun } from './aeterna';
import { call } from '../../src/control/client';
import type { StatusReport } from '../../src/orchestrator/types';
import type { LoadStats } from './load';

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/**
 * Run `aeterna <args>` to completion without blocking the test's event loop (load keeps flowing).
 * `prefix` runs it through another command (e.g. setpriv, to run it as another user).
 */
export function cli(
  args: string[],
  env: NodeJS.ProcessEnv = {},
  cwd = ROOT,
  prefix: string[] = [],
): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const argv = [...prefix, process.execPath, CLI, ...args];
    const child = spawn(argv[0], argv.slice(1), {
      cwd,
      env: { ...process.env, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

export interface ConfigOptions {
  command: string[];
  port?: number;
  strategy?: 'immediate' | 'canary';
  soak?: string;
  readiness?: string;
  env?: string[];
  restart?: string;
  stopTimeout?: string;
  metricsPort?: number;
  extraService?: string;
  /** Enable the state relay: true for defaults (socket in the temp dir, 10s), or the flow-map text of state_handoff. */
  handoff?: boolean | string;
  /** The flow-map text of orchestration.watch. */
  watch?: string;
  /** The flow-map text of orchestration.canary. */
  canary?: string;
}

export function configYaml(dir: string, o: ConfigOptions): string {
  return `version: "v1"
service:
  name: "e2e"
  command: ${JSON.stringify(o.command)}
  env: ${JSON.stringify(o.env ?? [])}
${o.port ? `  listeners:\n    - name: "http"\n      address: "tcp://127.0.0.1:${o.port}"\n` : ''}  stop_timeout: "${o.stopTimeout ?? '10s'}"
${o.restart ? `  restart: ${o.restart}\n` : ''}${o.extraService ?? ''}orchestration:
  strategy: "${o.strategy ?? 'immediate'}"
  soak_time: "${o.soak ?? '1s'}"
  readiness: ${o.readiness ?? '{ mode: "delay", delay: "200ms", timeout: "10s" }'}
${o.handoff ? `  state_handoff: ${o.handoff === true ? `{ enabled: true, socket_path: "${path.join(dir, 'state.sock')}", timeout: "10s" }` : o.handoff}\n` : ''}${o.watch ? `  watch: ${o.watch}\n` : ''}${o.canary ? `  canary: ${o.canary}\n` : ''}control:
  socket_path: "${path.join(dir, 'control.sock')}"
observability:
  log_level: "debug"
${o.metricsPort ? `  metrics_port: "127.0.0.1:${o.metricsPort}"\n` : ''}`;
}

export class Daemon {
  readonly dir = tempDir('aeterna-e2e-');
  readonly configFile = path.join(this.dir, 'aeterna.yaml');
  run!: AeternaRun;

  constructor(public options: ConfigOptions) {
    this.write(options);
  }

  /** Rewrite aeterna.yaml (the next reload reads it). */
  write(options: ConfigOptions): void {
    this.options = options;
    fs.writeFileSync(this.configFile, configYaml(this.dir, options));
  }

  start(pid1 = false): this {
    this.run = runAeterna(['start', '-c', this.configFile], { pid1 });
    return this;
  }

  cli(...args: string[]): Promise<CliResult> {
    return cli([...args, '-c', this.configFile]);
  }

  async status(): Promise<{
    state: string;
    generation: number;
    pid: number | null;
    restarts: number;
    last_reload: { id: string; outcome: string; reason: string | null; code: string | null; trigger: string } | null;
  }> {
    const r = await this.cli('status', '--json');
    if (r.code !== 0) throw new Error(`status failed (${r.code}): ${r.stderr}`);
    return JSON.parse(r.stdout) as Awaited<ReturnType<Daemon['status']>>;
  }

  /** Poll status until predicate holds (a hang guard, not a timing assertion). */
  /**
   * A daemon as PID 1 running `command` with the state relay on, readiness through the relay, and a long
   * stop_timeout (an old generation that waited for its connections would still be alive when they end), started
   * and Running. The connection handoff tests' daemon.
   */
  static async withHandoff(command: string[], options: Partial<ConfigOptions> = {}): Promise<Daemon> {
    const d = new Daemon({
      command,
      port: await freePort(),
      readiness: '{ mode: "notify", timeout: "60s" }',
      stopTimeout: '120s',
      ...options,
    });
    d.write({ ...d.options, handoff: `{ enabled: true, socket_path: "${d.dir}/state.sock", timeout: "30s" }` });
    d.start(true);
    return d;
  }

  /** Wait until no old generation retires any more (a reload answers at promotion; the old one drains on). */
  /** The host pid of an app process whose pid in Aeterna's PID namespace is `nsPid` (/proc/<pid>/status NSpid). */
  async hostPid(nsPid: number): Promise<number> {
    for (const pid of descendantsOf(await this.run.aeternaPid())) {
      let status: string;
      try {
        status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
      } catch {
        continue; // exited meanwhile
      }
      const ns = /^NSpid:\s+(.*)$/m.exec(status)?.[1].trim().split(/\s+/);
      if (ns !== undefined && Number(ns[ns.length - 1]) === nsPid) return pid;
    }
    throw new Error(`no app process with pid ${nsPid} in Aeterna's namespace`);
  }

  async untilRetired(timeoutMs = 60000): Promise<void> {
    await this.waitStatus((s) => ((s as { retiring?: unknown[] }).retiring ?? []).length === 0, timeoutMs);
  }

  async waitStatus(
    predicate: (s: Awaited<ReturnType<Daemon['status']>>) => boolean,
    timeoutMs = 20000,
  ): Promise<Awaited<ReturnType<Daemon['status']>>> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const s = await this.status();
        if (predicate(s)) return s;
      } catch {
        // the daemon may not answer yet
      }
      if (Date.now() > deadline) throw new Error(`status condition not met in time\n${this.run.stderr.slice(-4000)}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  async stop(): Promise<number | null> {
    if (this.run.child.exitCode === null) await this.run.signal('SIGTERM');
    return (await this.run.exit()).code;
  }

  /**
   * Stop once the serving generation has printed `READY <pid>` (the fixtures that print it do so after installing
   * their SIGTERM handler). Under delay readiness Aeterna takes an app as ready after the delay whether or not its
   * runtime has finished loading; a SIGTERM before the handler exists kills it (143), which is the app's exit code,
   * not what a test of a clean stop is about.
   */
  async stopServing(): Promise<number | null> {
    const { pid } = await this.status();
    if (pid !== null) await this.run.waitFor(new RegExp(`READY ${pid}\\b`), 60000);
    return this.stop();
  }
}

/** The daemon's control socket. */
export function socketOf(d: Daemon): string {
  return path.join(d.dir, 'control.sock');
}

/** The full status report, straight from the control socket (no CLI process). */
export async function statusOf(d: Daemon): Promise<StatusReport> {
  const r = await call(socketOf(d), { cmd: 'status' });
  if (!('status' in r)) throw new Error('status answered without a report');
  return r.status;
}

/**
 * `count` upgrades through the control request itself (the path the CLI takes, without starting a CLI process
 * each time), each awaited until the re-executed Aeterna answers with the re-exec count it reached.
 */
export async function upgradeTimes(d: Daemon, count: number): Promise<void> {
  const first = (await statusOf(d)).reexecs ?? 0;
  for (let i = first + 1; i <= first + count; i++) {
    // A failure names the upgrade and ends with Aeterna's last log lines: which of the two programs cut the request.
    const r = await call(socketOf(d), { cmd: 'upgrade' }).catch((err: unknown) => {
      throw new Error(`upgrade ${i}: ${String(err)}\n${d.run.stderr.split('\n').slice(-12).join('\n')}`, {
        cause: err,
      });
    });
    if (!('upgrade' in r)) throw new Error(`upgrade ${i} not accepted`);
    // The control socket is handed over: this waits in its backlog until the re-executed Aeterna answers.
    // A status the old Aeterna accepted just before its exec is cut: ask again.
    while ((await statusOf(d).catch(() => null))?.reexecs !== i) await new Promise((res) => setTimeout(res, 20));
  }
}

/**
 * After re-execs under load (upgrades, recoveries): no request failed, one app process answered them all, and
 * Aeterna (same pid), the app and its generation are the ones from `before`, running, after `reexecs` re-execs.
 */
export function assertServedInPlace(
  stats: LoadStats,
  before: StatusReport,
  after: StatusReport,
  reexecs: number,
): void {
  assert.equal(stats.failed, 0, `zero failed requests: ${JSON.stringify(stats.failures)}`);
  assert.ok(stats.ok > 0);
  assert.deepEqual(stats.pids, [before.pid], 'one app process answered every request');
  assert.equal(after.reexecs, reexecs);
  assert.equal(after.daemon_pid, before.daemon_pid, 'Aeterna re-executed in place');
  assert.equal(after.pid, before.pid);
  assert.equal(after.generation, before.generation);
  assert.equal(after.state, 'Running');
}

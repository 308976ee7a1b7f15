// An Aeterna daemon under the benchmark: its aeterna.yaml in a temp dir, the
// real CLI (`aeterna start`) as the process, and the control socket spoken to
// directly with the CLI's own client (no extra Node start-up per command).
import fs from 'node:fs';
import path from 'node:path';
import { call } from '../src/control/client';
import type { ReloadRecord, StatusReport } from '../src/orchestrator/types';
import { CLI, Proc, UNSHARE, childrenOf, sleep, tempDir } from './common';

export interface DaemonConfig {
  command: string[];
  env?: string[];
  /** tcp port of the one listener, or none. */
  port?: number;
  strategy?: 'immediate' | 'canary';
  soak?: string;
  /** The readiness block, as YAML flow text. */
  readiness?: string;
  restart?: 'always' | 'on-failure' | 'never';
  stopTimeout?: string;
  logLevel?: string;
  /** Enable the state relay with this timeout (its socket lives in the daemon's temp dir). */
  handoffTimeout?: string;
  /** With the relay: state_handoff.checkpoint, as YAML flow text. */
  checkpoint?: string;
}

export function configYaml(dir: string, c: DaemonConfig): string {
  return `version: "v1"
service:
  name: "bench"
  command: ${JSON.stringify(c.command)}
  env: ${JSON.stringify(c.env ?? [])}
${c.port ? `  listeners:\n    - name: "http"\n      address: "tcp://127.0.0.1:${c.port}"\n` : ''}  stop_timeout: "${c.stopTimeout ?? '10s'}"
  restart:
    policy: "${c.restart ?? 'on-failure'}"
orchestration:
  strategy: "${c.strategy ?? 'immediate'}"
  soak_time: "${c.soak ?? '1s'}"
  readiness: ${c.readiness ?? '{ mode: "delay", delay: "100ms", timeout: "10s" }'}
${c.handoffTimeout ? `  state_handoff: { enabled: true, socket_path: "${path.join(dir, 'state.sock')}", timeout: "${c.handoffTimeout}"${c.checkpoint ? `, checkpoint: ${c.checkpoint}` : ''} }\n` : ''}control:
  socket_path: "${path.join(dir, 'control.sock')}"
observability:
  log_level: "${c.logLevel ?? 'warn'}"
`;
}

export class BenchDaemon {
  readonly dir = tempDir('aeterna-bench-daemon-');
  readonly configFile = path.join(this.dir, 'aeterna.yaml');
  readonly socket = path.join(this.dir, 'control.sock');
  proc!: Proc;

  constructor(readonly config: DaemonConfig) {
    fs.writeFileSync(this.configFile, configYaml(this.dir, config));
  }

  /** `aeterna start`; with pid1, as PID 1 of a new PID namespace (unshare). */
  start(options: { pid1?: boolean; env?: NodeJS.ProcessEnv } = {}): this {
    const argv = [process.execPath, CLI, 'start', '-c', this.configFile];
    this.proc = new Proc(options.pid1 ? [...UNSHARE, ...argv] : argv, { env: { ...process.env, ...options.env } });
    this.pid1 = options.pid1 ?? false;
    return this;
  }

  private pid1 = false;

  /** Aeterna's own pid on the host (under unshare: the child of unshare). */
  async aeternaPid(): Promise<number> {
    if (!this.pid1) return this.proc.pid;
    for (let i = 0; i < 200; i++) {
      const [pid] = childrenOf(this.proc.pid);
      if (pid !== undefined) return pid;
      await sleep(25);
    }
    throw new Error('could not find the aeterna process under unshare');
  }

  async status(): Promise<StatusReport> {
    const r = await call(this.socket, { cmd: 'status' }, undefined, { idleTimeoutMs: 30000 });
    if (!('status' in r)) throw new Error('status without a report');
    return r.status;
  }

  /** Wait until the daemon serves (state Running). */
  async running(timeoutMs = 30000): Promise<StatusReport> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (!this.proc.alive) throw new Error(`aeterna exited while starting\n${this.proc.tail()}`);
      try {
        const s = await this.status();
        if (s.state === 'Running') return s;
      } catch {
        // not answering yet
      }
      if (Date.now() > deadline) throw new Error(`aeterna not Running after ${timeoutMs} ms\n${this.proc.tail()}`);
      await sleep(50);
    }
  }

  /** One reload, waited for: the final record. (A reload sends progress events; a minute without one is a hang.) */
  async reload(): Promise<ReloadRecord> {
    const r = await call(this.socket, { cmd: 'reload', wait: true }, undefined, { idleTimeoutMs: 60000 });
    if (!('record' in r)) throw new Error('reload answered without a record');
    return r.record;
  }

  /** Graceful stop over the control socket (SIGTERM when it does not answer); SIGKILL after 20 s. */
  async stop(): Promise<void> {
    if (!this.proc.alive) return;
    try {
      await call(this.socket, { cmd: 'stop' }, undefined, { idleTimeoutMs: 5000 });
      await this.proc.stop(null, 20000);
    } catch {
      await this.proc.stop('SIGTERM', 20000);
    }
  }
}

/** A phase's time in epoch ms, or NaN. */
export function phaseAt(record: ReloadRecord, phase: string): number {
  const mark = record.phases.find((p) => p.phase === phase);
  return mark ? Date.parse(mark.at) : NaN;
}

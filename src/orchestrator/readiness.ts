// When is a generation ready? The mode says, and only the mode: in "notify"
// mode when it says so on a readiness source (sd_notify READY=1, the state
// relay's ready op); in "delay" mode when it is still running after the delay;
// in "exec" mode when the probe exits 0. A READY=1 in delay or exec mode is
// logged but changes nothing: apps such as gunicorn send it before their
// workers serve, which is why such an app is given a delay or a probe. A readiness timeout is never
// "ready": the watch rejects, and the orchestrator rolls the reload back. A
// health probe over the shared listener is deliberately not offered: both
// generations accept on the same socket, so such a probe cannot tell which one answered.
import { AeternaError } from '../errors';
import { formatDuration } from '../config/duration';
import type { ReadinessConfig } from '../config/types';
import type { Logger } from '../log';
import type { Generation } from '../supervisor/generation';
import type { Reaper } from '../supervisor/reaper';
import { runCommand } from '../supervisor/command';
import { belongsTo } from '../supervisor/proctree';
import { LogThrottle } from '../log-throttle';
import type { NotifyMessage, NotifySocket } from '../resources/notify';

/** A channel on which a generation can say it is ready. */
export interface ReadinessSource {
  /**
   * Call `ready(how)` when `gen` says it is ready here, and `extend(ms, how)` when it asks for `ms` more from now
   * (sd_notify's EXTEND_TIMEOUT_USEC=); returns what stops watching.
   */
  watchReady(gen: Generation, ready: (how: string) => void, extend?: (ms: number, how: string) => void): () => void;
}

/** The longest EXTEND_TIMEOUT_USEC= counted: 24 hours (a longer one is ignored, with a warning). */
export const MAX_EXTEND_USEC = 24 * 3600 * 1_000_000;

/** EXTEND_TIMEOUT_USEC='s value in whole milliseconds (rounded up), or null when it is not 0 to MAX_EXTEND_USEC. */
export function parseExtendUsec(value: string): number | null {
  if (!/^[0-9]{1,11}$/.test(value)) return null; // 11 digits hold MAX_EXTEND_USEC; longer is out of range anyway
  const usec = Number(value);
  return usec <= MAX_EXTEND_USEC ? Math.ceil(usec / 1000) : null;
}

/**
 * sd_notify as a readiness source: READY=1 from a process of the generation, and EXTEND_TIMEOUT_USEC= from one
 * (STATUS=, STOPPING=1 and the rest: app-notices.ts).
 */
export class NotifyReadiness implements ReadinessSource {
  /** Invalid EXTEND_TIMEOUT_USEC= lines: an app may send them as often as it likes. */
  private readonly throttle: LogThrottle;

  constructor(
    private readonly notify: NotifySocket,
    log: Logger,
  ) {
    this.throttle = new LogThrottle(log);
  }

  watchReady(gen: Generation, ready: (how: string) => void, extend?: (ms: number, how: string) => void): () => void {
    const onMessage = (m: NotifyMessage): void => {
      const extendBy = m.fields.get('EXTEND_TIMEOUT_USEC');
      // The fields first: telling who sent a message reads /proc, and most messages are not about readiness.
      if ((extendBy === undefined && m.fields.get('READY') !== '1') || !belongsTo(m.pid, gen.pid)) return;
      if (extendBy !== undefined) {
        const ms = parseExtendUsec(extendBy);
        if (ms === null)
          this.throttle.warn(
            'app-extend-invalid',
            { generation: gen.number, sender: m.pid, value: extendBy.slice(0, 32) },
            `ignored EXTEND_TIMEOUT_USEC=: not a number of microseconds from 0 to ${MAX_EXTEND_USEC}`,
          );
        else extend?.(ms, `sd_notify EXTEND_TIMEOUT_USEC=${extendBy} from pid ${m.pid}`);
      }
      if (m.fields.get('READY') === '1') ready(`sd_notify READY=1 from pid ${m.pid}`);
    };
    this.notify.on('message', onMessage);
    return () => this.notify.off('message', onMessage);
  }
}

export interface ReadinessDeps {
  /** Every channel on which a generation may say it is ready; they count in mode "notify" only. */
  sources: readonly ReadinessSource[];
  reaper: Reaper;
  log: Logger;
}

/** Run the exec probe once for a generation: true when it exits 0. */
export async function probeOnce(gen: Generation, cfg: ReadinessConfig, reaper: Reaper): Promise<boolean> {
  const env = { AETERNA_PID: String(gen.pid), AETERNA_GENERATION: String(gen.number) };
  const exit = await runCommand(cfg.command, env, reaper, Math.max(cfg.intervalMs, 1000) * 10);
  return exit.code === 0;
}

/** Why a generation was not found ready, and what the operator can change: the timeout's message says it. */
function whatToDo(cfg: ReadinessConfig): string {
  switch (cfg.mode) {
    case 'notify':
      // The default mode: an app that knows nothing of sd_notify lands here and would be killed every timeout.
      return (
        'no READY=1 arrived (readiness.mode "notify", the default); have the app send READY=1 to $NOTIFY_SOCKET ' +
        '(sd_notify, or ready() of an Aeterna SDK), or set orchestration.readiness.mode to "delay" or "exec"'
      );
    case 'exec':
      return `the probe ${JSON.stringify(cfg.command)} never exited 0 (readiness.mode "exec"); fix the probe, or raise orchestration.readiness.timeout`;
    case 'delay':
      return `it did not stay up for ${formatDuration(cfg.delayMs)} (readiness.mode "delay"); raise orchestration.readiness.timeout above the delay`;
  }
}

/** Waits for one generation to become ready, by the configured mode. */
export class ReadinessWatch {
  /** Resolves when ready; rejects with E_READY_TIMEOUT (or E_SPAWN_FAILED when the probe cannot run). */
  readonly ready: Promise<void>;
  private settled = false;
  private toldNotCounted = false;
  private resolve!: () => void;
  private reject!: (err: Error) => void;
  private readonly timers: NodeJS.Timeout[] = [];
  private readonly unwatch: Array<() => void>;
  /** When the readiness timeout fires (epoch ms): readiness.timeout after the start, or later by EXTEND_TIMEOUT_USEC=. */
  private deadline: number;
  private timeoutTimer: NodeJS.Timeout | null = null;
  /** How many EXTEND_TIMEOUT_USEC= moved the deadline (the timeout's message says so). */
  private extensions = 0;
  /** Lines the app causes at will (each extension). */
  private readonly throttle: LogThrottle;

  constructor(
    private readonly gen: Generation,
    private readonly cfg: ReadinessConfig,
    private readonly deps: ReadinessDeps,
  ) {
    this.ready = new Promise((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
    this.ready.catch(() => undefined); // the orchestrator handles it; never an unhandled rejection
    this.throttle = new LogThrottle(deps.log);
    this.deadline = Date.now() + cfg.timeoutMs;
    this.armTimeout(cfg.timeoutMs);
    // What the app says on a source counts in notify mode only: in delay and exec mode the delay or the probe decides.
    const says =
      cfg.mode === 'notify' ? (how: string): void => this.markReady(how) : (how: string): void => this.notCounted(how);
    // An extension counts in every mode: the timeout is the same.
    const extend = (ms: number, how: string): void => this.extend(ms, how);
    this.unwatch = deps.sources.map((source) => source.watchReady(gen, says, extend));
    if (cfg.mode === 'delay') {
      this.timers.push(setTimeout(() => gen.alive && this.markReady('delay elapsed'), cfg.delayMs));
    } else if (cfg.mode === 'exec') {
      void this.probeLoop();
    }
  }

  private armTimeout(ms: number): void {
    if (this.timeoutTimer) clearTimeout(this.timeoutTimer);
    this.timeoutTimer = setTimeout(() => {
      const extended =
        this.extensions === 0
          ? ''
          : ` nor within the last EXTEND_TIMEOUT_USEC= (${this.extensions} extension(s) of it)`;
      this.fail(
        new AeternaError(
          'E_READY_TIMEOUT',
          `not ready within ${formatDuration(this.cfg.timeoutMs)}${extended}: ${whatToDo(this.cfg)}`,
        ),
      );
    }, ms);
  }

  /**
   * EXTEND_TIMEOUT_USEC=, as systemd reads it: the deadline becomes now + `ms`, when that is later than it is now
   * (an extension never shortens readiness.timeout, nor an earlier extension). It can be sent again and again.
   */
  private extend(ms: number, how: string): void {
    if (this.settled) return;
    const until = Date.now() + ms;
    if (until <= this.deadline) return;
    this.deadline = until;
    this.extensions++;
    this.armTimeout(ms);
    this.throttle.info(
      'readiness-extended',
      { generation: this.gen.number, child: this.gen.pid, source: how, extend_ms: ms },
      `generation ${this.gen.number} asked for more time to become ready: readiness deadline ${formatDuration(ms)} from now`,
    );
  }

  private markReady(source: string): void {
    if (this.settled) return;
    this.deps.log.info({ generation: this.gen.number, child: this.gen.pid, source }, 'generation ready');
    this.settled = true;
    this.cleanup();
    this.resolve();
  }

  /** A readiness signal in delay or exec mode: logged once, it does not make the generation ready. */
  private notCounted(how: string): void {
    if (this.settled || this.toldNotCounted) return;
    this.toldNotCounted = true;
    const waitsFor =
      this.cfg.mode === 'delay'
        ? `the delay (${formatDuration(this.cfg.delayMs)})`
        : `the probe ${JSON.stringify(this.cfg.command)}`;
    this.deps.log.info(
      { generation: this.gen.number, child: this.gen.pid, source: how, mode: this.cfg.mode },
      `generation ${this.gen.number} says it is ready (${how}); readiness.mode "${this.cfg.mode}" waits for ${waitsFor}`,
    );
  }

  cancel(): void {
    this.settled = true;
    this.cleanup();
  }

  private fail(err: Error): void {
    if (this.settled) return;
    this.settled = true;
    this.cleanup();
    this.reject(err);
  }

  private async probeLoop(): Promise<void> {
    while (!this.settled && this.gen.alive) {
      let ok = false;
      try {
        ok = await probeOnce(this.gen, this.cfg, this.deps.reaper);
      } catch (err) {
        this.fail(new AeternaError('E_SPAWN_FAILED', `readiness probe: ${(err as Error).message}`, { cause: err }));
        return;
      }
      if (ok) {
        this.markReady(`probe ${JSON.stringify(this.cfg.command)} exited 0`);
        return;
      }
      await new Promise((r) => this.timers.push(setTimeout(r, this.cfg.intervalMs)));
    }
  }

  private cleanup(): void {
    if (this.timeoutTimer) clearTimeout(this.timeoutTimer);
    for (const t of this.timers) clearTimeout(t);
    for (const stop of this.unwatch) stop();
  }
}

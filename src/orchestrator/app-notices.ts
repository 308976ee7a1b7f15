// What an app tells Aeterna over sd_notify besides READY=1 (readiness.ts),
// WATCHDOG (watchdog.ts) and the fd store (fd-store.ts): its STATUS= text, kept
// per generation for `aeterna status`; STOPPING=1, RELOADING=1 and MAINPID=,
// logged at debug level and otherwise ignored (docs/operations.md says why); and
// EXTEND_TIMEOUT_USEC= while a generation stops, which pushes its SIGKILL back.
// Each counts only from a process of a live generation (the kernel names the
// sender), and only for that generation.
import { parseExtendUsec } from './readiness';
import type { Logger } from '../log';
import { LogThrottle } from '../log-throttle';
import type { NotifyMessage, NotifySocket } from '../resources/notify';
import type { Generation } from '../supervisor/generation';
import { belongsTo } from '../supervisor/proctree';

/** The longest STATUS= text kept (characters); the rest is cut. A datagram is at most 4096 bytes anyway. */
export const MAX_STATUS_CHARS = 512;

/** The fields this module reads: a datagram with none of them costs no look-up of its sender. */
const FIELDS = ['STATUS', 'STOPPING', 'RELOADING', 'MAINPID', 'EXTEND_TIMEOUT_USEC'];

export class AppNotices {
  /** The latest STATUS= text of each generation (gone with it). */
  private readonly texts = new WeakMap<Generation, string>();
  /** Lines an app may cause as often as it likes. */
  private readonly throttle: LogThrottle;

  constructor(
    notify: NotifySocket,
    log: Logger,
    /** The generations alive now, whose processes may speak. */
    private readonly generations: () => Generation[],
    /** `gen` is stopping and asked for `ms` more from now (EXTEND_TIMEOUT_USEC=): returns whether that extended it. */
    private readonly extendStop: (gen: Generation, ms: number) => boolean,
  ) {
    this.throttle = new LogThrottle(log);
    notify.on('message', (m) => this.onMessage(m));
  }

  /** The latest STATUS= text of `gen`, or null when it sent none. */
  statusOf(gen: Generation | null): string | null {
    return gen === null ? null : (this.texts.get(gen) ?? null);
  }

  private onMessage(m: NotifyMessage): void {
    if (!FIELDS.some((f) => m.fields.has(f))) return;
    const gen = this.generations().find((g) => belongsTo(m.pid, g.pid));
    const status = m.fields.get('STATUS');
    if (gen === undefined) {
      this.throttle.debug('notice-stranger', { sender: m.pid }, 'sd_notify from a process of no generation: ignored');
      return;
    }
    const about = { generation: gen.number, sender: m.pid };
    if (status !== undefined) {
      // Control characters (a terminal's escape sequences) are not passed on to the operator's terminal.
      const shown = status.replace(/[\u0000-\u001f\u007f-\u009f]/g, '?');
      const text = shown.length > MAX_STATUS_CHARS ? shown.slice(0, MAX_STATUS_CHARS) + '…' : shown;
      this.texts.set(gen, text);
      this.throttle.info('app-status', { ...about, status: text }, 'app status');
    }
    if (m.fields.get('STOPPING') === '1')
      this.throttle.debug('app-stopping', about, 'app says it is stopping (STOPPING=1): noted, nothing changes');
    if (m.fields.get('RELOADING') === '1')
      this.throttle.debug(
        'app-reloading',
        { ...about, monotonic_usec: m.fields.get('MONOTONIC_USEC') ?? null },
        'app says it reloads its own configuration (RELOADING=1): ignored, only `aeterna reload` replaces a generation',
      );
    const mainpid = m.fields.get('MAINPID');
    if (mainpid !== undefined)
      this.throttle.debug(
        'app-mainpid',
        { ...about, mainpid: mainpid.slice(0, 32) },
        `MAINPID= ignored: Aeterna follows generation ${gen.number}'s root process (pid ${gen.pid}) and its process group`,
      );
    const extend = m.fields.get('EXTEND_TIMEOUT_USEC');
    if (extend !== undefined) {
      const ms = parseExtendUsec(extend);
      if (ms !== null && this.extendStop(gen, ms))
        this.throttle.info(
          'app-extend-stop',
          { ...about, extend_ms: ms },
          `generation ${gen.number} asked for more time to stop (EXTEND_TIMEOUT_USEC=): SIGKILL no earlier than ${ms} ms from now`,
        );
    }
  }
}

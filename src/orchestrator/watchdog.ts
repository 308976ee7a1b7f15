// systemd's service watchdog (WatchdogSec=) for one generation: once started
// (when the generation is ready) it must send WATCHDOG=1 over sd_notify within
// the interval, or the watchdog fires. WATCHDOG=trigger fires at once, and
// WATCHDOG_USEC=n changes the interval for this generation (0 turns it off),
// from the spawn on: an app may send them with READY=1 in the same breath. What firing does (SIGABRT, a crash) is the
// orchestrator's decision; this module only keeps the deadline.
import { formatDuration } from '../config/duration';
import type { Logger } from '../log';
import type { NotifyMessage, NotifySocket } from '../resources/notify';
import type { Generation } from '../supervisor/generation';
import { belongsTo } from '../supervisor/proctree';
import { LogThrottle } from '../log-throttle';

/** The longest interval WATCHDOG_USEC= may set: service.watchdog's own maximum (24h). */
const MAX_USEC = 24 * 3600 * 1_000_000;

export class Watchdog {
  private timer: NodeJS.Timeout | null = null;
  /** Deadlines count from start() on (the generation is ready). */
  private started = false;
  private stopped = false;
  private readonly onMessage = (m: NotifyMessage): void => this.message(m);
  /** WATCHDOG_USEC= lines: the app may send it as often as it likes. */
  private readonly throttle: LogThrottle;

  constructor(
    private readonly gen: Generation,
    private intervalMs: number,
    private readonly notify: NotifySocket,
    log: Logger,
    /** Called once, when the deadline passes or the app sends WATCHDOG=trigger; `why` says which. */
    private readonly fire: (why: string) => void,
  ) {
    this.throttle = new LogThrottle(log);
    notify.on('message', this.onMessage);
  }

  /** The generation is ready: the first deadline runs from now. */
  start(): void {
    if (this.stopped || this.started) return;
    this.started = true;
    this.arm();
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.notify.off('message', this.onMessage);
  }

  private arm(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    if (!this.started || this.intervalMs === 0) return; // WATCHDOG_USEC=0: off for this generation
    this.timer = setTimeout(
      () => this.expire(`no WATCHDOG=1 within ${formatDuration(this.intervalMs)} (service.watchdog)`),
      this.intervalMs,
    );
  }

  private expire(why: string): void {
    if (this.stopped) return;
    this.stop();
    this.fire(why);
  }

  private message(m: NotifyMessage): void {
    const usec = m.fields.get('WATCHDOG_USEC');
    const ping = m.fields.get('WATCHDOG');
    // The fields first: telling who sent a message reads /proc, and most messages are not for the watchdog.
    if (this.stopped || (usec === undefined && ping === undefined) || !belongsTo(m.pid, this.gen.pid)) return;
    if (usec !== undefined) {
      if (/^\d+$/.test(usec) && Number(usec) <= MAX_USEC) {
        this.intervalMs = Math.ceil(Number(usec) / 1000);
        this.throttle.info(
          'watchdog-usec',
          { generation: this.gen.number, sender: m.pid, watchdog_usec: Number(usec) },
          `watchdog: generation ${this.gen.number} set its interval to ${this.intervalMs === 0 ? 'off' : formatDuration(this.intervalMs)}`,
        );
        this.arm();
      } else {
        this.throttle.warn(
          'watchdog-usec-invalid',
          { generation: this.gen.number, sender: m.pid, value: usec },
          `watchdog: ignored WATCHDOG_USEC=${JSON.stringify(usec)}: not a number of microseconds from 0 to ${MAX_USEC}`,
        );
      }
    }
    if (ping === 'trigger') return this.expire(`the app sent WATCHDOG=trigger (pid ${m.pid})`);
    if (ping === '1') this.arm();
  }
}

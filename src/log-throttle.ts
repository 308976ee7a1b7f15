// Rate-limited log lines, for events a peer can repeat at will (an app's
// datagrams, a client's connections): Aeterna logs synchronously to stderr, so
// a flood of events must not become a flood of PID 1's log lines. Per kind of
// event (a key the code chooses, never text a peer sent: the keys must stay few),
// the first `burst` lines of an interval are logged; the rest are counted, and
// one line per interval says how many more like it were not logged.
import type { Logger } from './log';

type Level = 'debug' | 'info' | 'warn' | 'error';

export interface ThrottleOptions {
  /** Lines logged per interval and key before the rest are only counted (default 10). */
  burst?: number;
  /** The interval (default 60 s). */
  intervalMs?: number;
}

interface Window {
  startedAt: number;
  logged: number;
  suppressed: number;
  level: Level;
  /** What the summary line says the suppressed lines were about (the last one's message). */
  about: string;
  timer: NodeJS.Timeout | null;
}

export class LogThrottle {
  private readonly windows = new Map<string, Window>();
  private readonly burst: number;
  private readonly intervalMs: number;

  constructor(
    private readonly log: Logger,
    options: ThrottleOptions = {},
  ) {
    this.burst = options.burst ?? 10;
    this.intervalMs = options.intervalMs ?? 60_000;
  }

  debug(key: string, fields: Record<string, unknown>, message: string): void {
    this.write('debug', key, fields, message);
  }

  info(key: string, fields: Record<string, unknown>, message: string): void {
    this.write('info', key, fields, message);
  }

  warn(key: string, fields: Record<string, unknown>, message: string): void {
    this.write('warn', key, fields, message);
  }

  error(key: string, fields: Record<string, unknown>, message: string): void {
    this.write('error', key, fields, message);
  }

  /** Lines counted but not logged so far, for `key` (tests, and a summary on demand). */
  suppressed(key: string): number {
    return this.windows.get(key)?.suppressed ?? 0;
  }

  /** Log the pending summaries now and stop the timers (at shutdown). */
  flush(): void {
    for (const [key, window] of this.windows) {
      this.summarize(key, window);
      this.windows.delete(key);
    }
  }

  private write(level: Level, key: string, fields: Record<string, unknown>, message: string): void {
    const now = Date.now();
    let window = this.windows.get(key);
    if (window === undefined || now - window.startedAt >= this.intervalMs) {
      if (window !== undefined) this.summarize(key, window);
      window = { startedAt: now, logged: 0, suppressed: 0, level, about: message, timer: null };
      this.windows.set(key, window);
    }
    if (window.logged < this.burst) {
      window.logged++;
      this.log[level](fields, message);
      return;
    }
    window.suppressed++;
    window.level = level;
    window.about = message;
    // The summary comes at the end of the interval even if the events stop: the count is never lost.
    if (window.timer === null) {
      const w = window;
      w.timer = setTimeout(
        () => {
          w.timer = null;
          this.summarize(key, w);
          if (this.windows.get(key) === w) this.windows.delete(key);
        },
        Math.max(0, w.startedAt + this.intervalMs - now),
      );
      w.timer.unref();
    }
  }

  private summarize(key: string, window: Window): void {
    if (window.timer !== null) clearTimeout(window.timer);
    window.timer = null;
    if (window.suppressed === 0) return;
    const count = window.suppressed;
    window.suppressed = 0;
    this.log[window.level](
      { suppressed: count, throttle: key, interval_ms: this.intervalMs },
      `${count} more like this suppressed (at most ${this.burst} a ${describeInterval(this.intervalMs)}): ${window.about}`,
    );
  }
}

function describeInterval(ms: number): string {
  if (ms === 60_000) return 'minute';
  if (ms % 1000 === 0) return `${ms / 1000} s`;
  return `${ms} ms`;
}

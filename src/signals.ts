// The daemon's signal handlers. As PID 1, Aeterna gets no default action from the
// kernel for any signal: a stop (SIGTERM, SIGINT) stops it only through a handler.
// SIGHUP reloads; the signals an app may use for itself are passed on to the
// serving generation as they are.
import type { AeternaError } from './errors';
import type { Logger } from './log';
import { takeEarlySignals } from './upgrade/early-signals';

/** Signals passed on to the serving generation's root process as they are. */
const FORWARDED_SIGNALS: NodeJS.Signals[] = ['SIGQUIT', 'SIGUSR1', 'SIGUSR2', 'SIGWINCH'];
const STOP_SIGNALS: NodeJS.Signals[] = ['SIGTERM', 'SIGINT'];

/** What each signal does. */
export interface SignalActions {
  stop(signal: NodeJS.Signals): void;
  forward(signal: NodeJS.Signals): void;
  /** A reload; throws when none can start now (logged: the signal is ignored). */
  reload(): void;
}

/** Install the handlers; returns what removes them again. */
export function installSignalHandlers(actions: SignalActions, log: Logger): () => void {
  const handlers = new Map<NodeJS.Signals, () => void>();
  const on = (signal: NodeJS.Signals, handler: () => void): void => {
    handlers.set(signal, handler);
    process.on(signal, handler);
  };
  for (const signal of STOP_SIGNALS) on(signal, () => actions.stop(signal));
  for (const signal of FORWARDED_SIGNALS) on(signal, () => actions.forward(signal));
  on('SIGHUP', () => {
    try {
      actions.reload();
    } catch (err) {
      log.warn({ code: (err as AeternaError).code }, `SIGHUP ignored: ${(err as Error).message}`);
    }
  });
  // What arrived while Aeterna loaded (early-signals.ts), now that these handlers are in place: a stop is kept
  // until there is something to stop; a reload has nothing to reload yet.
  for (const signal of takeEarlySignals()) {
    if (STOP_SIGNALS.includes(signal)) actions.stop(signal);
    else log.warn({ signal }, `${signal} while starting ignored: nothing to reload yet`);
  }
  return () => {
    for (const [signal, handler] of handlers) process.off(signal, handler);
    handlers.clear();
  };
}

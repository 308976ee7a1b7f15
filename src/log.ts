// Aeterna's logger: pino, JSON, one line per event, written synchronously to
// stderr so that nothing is lost when PID 1 exits right after logging. The
// app's own stdout/stderr do not pass through here: the app inherits fds 1 and 2.
import pino from 'pino';
import type { LogLevel } from './config/types';

export type Logger = pino.Logger;

export function createLogger(level: LogLevel = 'info'): Logger {
  return pino(
    {
      name: 'aeterna',
      level,
      base: { pid: process.pid },
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
      serializers: { err: serializeError },
    },
    pino.destination({ fd: 2, sync: true }),
  );
}

/** pino's error serializer, with each cause's message said once (see messageOnce). */
function serializeError(err: unknown): unknown {
  const out = pino.stdSerializers.err(err as Error) as unknown;
  if (err instanceof Error && typeof out === 'object' && out !== null)
    (out as { message: string }).message = messageOnce(err);
  return out;
}

/**
 * The error's message followed by those of its causes, as pino says it, except a cause whose message the error's
 * already includes: Aeterna's errors mostly say their cause themselves (`spawn "x" (cwd "/y"): chdir: ...`), which
 * pino would repeat (`...: spawn "x" (cwd "/y"): chdir: ...`).
 */
export function messageOnce(err: Error): string {
  let message = err.message;
  const seen = new Set<unknown>([err]);
  for (let cause = err.cause; cause instanceof Error && !seen.has(cause); cause = cause.cause) {
    seen.add(cause);
    if (!message.includes(cause.message)) message += `: ${cause.message}`;
  }
  return message;
}

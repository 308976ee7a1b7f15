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
    },
    pino.destination({ fd: 2, sync: true }),
  );
}

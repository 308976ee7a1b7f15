// How a process ended, in the words an operator reads and the numbers a shell reports.
import os from 'node:os';
import type { ExitInfo } from '../native/binding';

export function signalNumber(signal: NodeJS.Signals | number): number {
  return typeof signal === 'number' ? signal : os.constants.signals[signal];
}

export function signalName(signal: number): string {
  const entry = Object.entries(os.constants.signals).find(([, n]) => n === signal);
  return entry ? entry[0] : `signal ${signal}`;
}

/** The exit code a shell would report for this exit: the code, or 128 + signal. */
export function exitCodeOf(info: ExitInfo): number {
  return info.code ?? 128 + (info.signal ?? 0);
}

export function describeExit(info: ExitInfo): string {
  return info.signal !== null ? `killed by ${signalName(info.signal)}` : `exited with code ${info.code}`;
}

/** The exit as the control protocol carries it: the code, or the signal's name. */
export function exitRecord(info: ExitInfo): { code: number | null; signal: string | null } {
  return {
    code: info.signal === null ? info.code : null,
    signal: info.signal === null ? null : signalName(info.signal),
  };
}

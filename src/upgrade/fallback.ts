// Coming back to the previous program. After execve the old program image is gone, and PID 1
// exiting would take the container with it: so a re-executed Aeterna that fails during its
// start, before it has taken over the serving generation, execs the program that handed over
// to it (the handover names its argv) with that same handover. The previous program takes over
// as after an upgrade; the app never notices. Only an `aeterna upgrade` falls back (a recovery
// runs the same program again), only once, and only from a version 3 handover.
import { reexec } from './reexec';
import type { Handover } from './handover';

/** The previous program's argv, when `handover` allows coming back to it; null otherwise. */
export function fallbackArgv(handover: Handover | null): string[] | null {
  if (!handover || handover.dry_run === true || handover.reason !== 'upgrade' || handover.fell_back) return null;
  const argv = handover.from.argv;
  return Array.isArray(argv) && argv.length > 0 && argv.every((a) => typeof a === 'string') ? argv : null;
}

/** The handover the previous program gets back: the same, saying which program failed and why. */
export function fallbackHandover(handover: Handover, version: string, error: unknown): Handover {
  const message = error instanceof Error ? error.message : String(error);
  return { ...handover, fell_back: { from: version, error: message.slice(0, 1000) } };
}

/**
 * Exec the previous program with `handover`, when allowed. Returns (false) when it is not allowed; throws when
 * execve fails (the caller then ends as it would have without a fallback).
 */
export function fallBack(handover: Handover | null, version: string, error: unknown): false {
  const argv = fallbackArgv(handover);
  if (argv === null || handover === null) return false;
  reexec(argv, fallbackHandover(handover, version, error));
  return false; // not reached: reexec returns only by throwing
}

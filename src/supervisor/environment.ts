// The environment a generation's processes start with.
import type { Listener } from '../resources/listeners';

/**
 * Environment variables Aeterna sets for the app itself (socket activation, readiness, state
 * relay, generation number): a value from service.env would be overwritten, so it is refused.
 * The supervisor strips inherited values of these from the app's environment too.
 */
export const RESERVED_ENV = [
  'LISTEN_FDS',
  'LISTEN_PID',
  'LISTEN_FDNAMES',
  'NOTIFY_SOCKET',
  'WATCHDOG_USEC',
  'WATCHDOG_PID',
  'LIVERELAY_STATE_SOCK',
  'AETERNA_GENERATION',
] as const;

/** An fd a generation gets at 3, 4, ...: a listener, or an fd from the fd store; its name goes into LISTEN_FDNAMES. */
export type PassedFd = Pick<Listener, 'name' | 'fd'>;

/** The child's environment: Aeterna's own, then service.env, then the socket-activation variables. */
export function childEnvironment(
  base: NodeJS.ProcessEnv,
  serviceEnv: readonly string[],
  listeners: readonly PassedFd[],
  extra: Record<string, string>,
): string[] {
  const vars = new Map<string, string>();
  for (const [k, v] of Object.entries(base)) {
    // Variables Aeterna sets itself: inherited values are never passed on.
    if (v !== undefined && !(RESERVED_ENV as readonly string[]).includes(k)) vars.set(k, v);
  }
  for (const entry of serviceEnv) {
    const eq = entry.indexOf('=');
    vars.set(entry.slice(0, eq), entry.slice(eq + 1));
  }
  if (listeners.length > 0) {
    vars.set('LISTEN_FDS', String(listeners.length));
    vars.set('LISTEN_FDNAMES', listeners.map((l) => l.name).join(':'));
  }
  for (const [k, v] of Object.entries(extra)) vars.set(k, v);
  // LISTEN_PID is appended by the addon after fork: only the child knows its pid.
  return [...vars].map(([k, v]) => `${k}=${v}`);
}

// The environment a generation's processes start with.
import { RESERVED_ENV, type PassedFd } from '../app-env';

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

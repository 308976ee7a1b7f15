// What Aeterna promises the app it starts: the environment variables it sets
// itself, and the fds it passes at 3, 4, ... . The config refuses these names
// in service.env, the supervisor writes them, the fd store hands out such fds:
// the promise sits at the ground so each of them can read it.

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
  'AETERNA_INSTANCE',
] as const;

/** An fd a generation gets at 3, 4, ...: a listener, or an fd from the fd store; its name goes into LISTEN_FDNAMES. */
export interface PassedFd {
  readonly name: string;
  readonly fd: number;
}

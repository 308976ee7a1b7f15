// A start that fails before the app runs: Aeterna's exit code for it, and one line
// an operator can act on (the message with its fix). Opening the notify socket and
// the state relay's socket turns their errors into E_LISTEN_FAILED with the fix.
import { AeternaError, ExitCodes } from './errors';
import type { Config } from './config/types';
import type { Logger } from './log';
import { NotifySocket } from './resources/notify';
import { SrpCoordinator } from './srp/coordinator';
import type { resolveIdentity } from './supervisor/identity';

/** Aeterna's exit code for a start that failed before the app ran. */
export function startFailureCode(err: unknown): number {
  if (err instanceof AeternaError) {
    if (err.code === 'E_DAEMON_RUNNING') return ExitCodes.SOFTWARE;
    if (err.code === 'E_CONFIG_INVALID') return ExitCodes.CONFIG;
    if (
      err.code === 'E_LISTEN_ADDR_IN_USE' ||
      err.code === 'E_LISTEN_FAILED' ||
      err.code === 'E_METRICS_FAILED' ||
      err.code === 'E_CANARY_UNSUPPORTED'
    )
      return ExitCodes.UNAVAILABLE;
  }
  return ExitCodes.SOFTWARE;
}

/** What to do about a failed start, for errors whose message does not say it already (after a ';'). */
const STARTUP_FIXES: Partial<Record<string, string>> = {
  E_LISTEN_ADDR_IN_USE: 'stop what listens there, or change the address in service.listeners',
  E_LISTEN_FAILED:
    'the path must be in a directory this user can create or write, the host must resolve; or change it in aeterna.yaml',
  E_METRICS_FAILED: 'free the port, or change observability.metrics_port',
  E_CANARY_UNSUPPORTED: 'remove orchestration.canary (a weighted split needs Linux 4.5 or later)',
  E_INTERNAL: 'a bug in Aeterna: please report it (observability.log_level "debug" logs the stack)',
};

/** A failed start as one line: the message with its fix, and the code (the stack only at debug level). */
export function describeStartFailure(err: unknown): { code: string; message: string } {
  const code = err instanceof AeternaError ? err.code : 'E_INTERNAL';
  const message = err instanceof Error ? err.message : String(err);
  const fix = STARTUP_FIXES[code];
  return { code, message: fix === undefined || message.includes('; ') ? message : `${message}; ${fix}` };
}

/** The sd_notify socket, beside the control socket; a path that cannot be used is E_LISTEN_FAILED with its fix. */
export function openNotifySocket(socketPath: string, log: Logger): NotifySocket {
  try {
    return NotifySocket.open(socketPath, log);
  } catch (err) {
    throw new AeternaError(
      'E_LISTEN_FAILED',
      `cannot create the notify socket ${socketPath}: ${(err as Error).message}; it goes beside control.socket_path, whose directory must be writable`,
      { cause: err },
    );
  }
}

/** The state relay's socket; a path that cannot be used is E_LISTEN_FAILED with its fix, not an internal error. */
export function openStateRelay(
  handoff: Config['orchestration']['stateHandoff'],
  identity: ReturnType<typeof resolveIdentity>,
  log: Logger,
  instances = 1,
): SrpCoordinator {
  try {
    return SrpCoordinator.open(handoff, identity, log, instances);
  } catch (err) {
    if (err instanceof AeternaError) throw err;
    throw new AeternaError(
      'E_LISTEN_FAILED',
      `cannot create the state relay socket ${handoff.socketPath}: ${(err as Error).message}; ` +
        `set orchestration.state_handoff.socket_path to a path in a directory this user can write`,
      { cause: err },
    );
  }
}

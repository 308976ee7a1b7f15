// Stable error codes, defined in one place. They appear in logs, in the CLI's
// --json output and in a reload's reason, so scripts and alerts can match on them.
// docs/operations.md lists them; a test checks that every code here is documented.

export const ErrorCodes = {
  E_CONFIG_INVALID: 'the configuration file is missing, malformed or invalid',
  E_LISTEN_ADDR_IN_USE: 'a listener address is already in use by another socket',
  E_LISTEN_FAILED: 'a listener could not be created (permission, bad path, unknown host)',
  E_SPAWN_FAILED: 'the app could not be started (missing binary, not executable, bad cwd or user)',
  E_CHILD_EXITED: 'the app exited',
  E_CRASH_LOOP: 'the app crashed more often than service.restart allows',
  E_WATCHDOG: 'the app sent no WATCHDOG=1 within service.watchdog (or sent WATCHDOG=trigger)',
  E_READY_TIMEOUT: 'the new generation did not become ready in time',
  E_PROBE_FAILED: 'the exec readiness probe failed during a canary soak',
  E_CANARY_UNSUPPORTED:
    'orchestration.canary cannot split a listener (kernel without SO_ATTACH_REUSEPORT_CBPF, or a socket outside a reuseport group)',
  E_RELAY_FAILED: 'the state relay between generations failed',
  E_CHECKPOINT_CORRUPT:
    'the checkpoint file (state_handoff.checkpoint.path) is corrupt, truncated or of another version: set aside, not loaded',
  E_CHECKPOINT_REFUSED:
    'the app could not load the checkpoint it was offered (it refused it, or died before it was ready) twice: set aside, never offered again',
  E_RELOAD_BUSY: 'a reload is already in progress',
  E_ILLEGAL_TRANSITION: 'the request is not valid in the current state',
  E_CONTROL_UNAVAILABLE: 'no daemon answers on the control socket',
  E_CONTROL_FORBIDDEN: 'the peer is not allowed to use the control socket',
  E_CONTROL_BAD_REQUEST: 'a control request was malformed or too large',
  E_DAEMON_RUNNING: 'another Aeterna daemon already answers on the control socket',
  E_METRICS_FAILED: 'the metrics endpoint could not be started',
  E_OPERATOR_ROLLBACK: 'the operator rolled the reload back',
  E_RESOURCE_EXHAUSTED: 'Aeterna ran out of file descriptors (EMFILE/ENFILE): raise the fd limit',
  E_STOPPED: 'Aeterna was stopped while the operation was in progress',
  E_UPGRADE_REFUSED: 'the upgrade target failed its handover check; nothing changed',
  E_HANDOVER_INVALID: 'the handover passed to a re-executed Aeterna cannot be read',
  E_RECOVERY_LOOP: 'Aeterna recovered from its own crash more often than it allows (5 per minute) and gave up',
  E_ADDON_UNAVAILABLE:
    'the native addon (aeterna.node) is missing or cannot be loaded: rebuild it, or install the prebuilt package or the self-contained build',
  E_INTERNAL: 'an internal error in Aeterna (a bug: please report it with the log)',
} as const;

export type ErrorCode = keyof typeof ErrorCodes;

/** An error that carries one of Aeterna's stable codes. */
export class AeternaError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'AeternaError';
    this.code = code;
  }
}

/** Whether an error means the process or the system ran out of file descriptors (errno EMFILE or ENFILE: E_RESOURCE_EXHAUSTED). */
export function isFdExhaustion(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException | null)?.code;
  return code === 'EMFILE' || code === 'ENFILE';
}

/** Exit codes Aeterna itself uses (the app's own code is passed through otherwise). */
export const ExitCodes = {
  OK: 0,
  FAILURE: 1,
  /** sysexits.h EX_CONFIG */
  CONFIG: 78,
  /** sysexits.h EX_SOFTWARE: an internal failure or a refused start */
  SOFTWARE: 70,
  /** sysexits.h EX_UNAVAILABLE: a required resource (listener, metrics port) could not be had */
  UNAVAILABLE: 69,
} as const;

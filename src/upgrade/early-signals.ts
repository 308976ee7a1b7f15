// Stop signals that arrive while `aeterna start` loads. As PID 1, a signal with no handler is
// dropped by the kernel: a container runtime's one SIGTERM, sent while a re-executed Aeterna
// (an upgrade, a recovery) loads its code and takes over, would be lost and the container would
// go on running. So the very first module `aeterna start` loads records them; the daemon takes
// them over once its own handlers are installed. Imported for its effect: it loads nothing else, except the addon when signals are held.

/** The signals recorded: a stop (SIGTERM, SIGINT) or a reload (SIGHUP). */
const RECORDED: NodeJS.Signals[] = ['SIGTERM', 'SIGINT', 'SIGHUP'];
const received: NodeJS.Signals[] = [];
const record = (signal: NodeJS.Signals): void => {
  received.push(signal);
};

// Only the daemon: the client commands keep their own handling (Ctrl-C detaches `aeterna reload`).
if (process.argv[2] === 'start') {
  for (const signal of RECORDED) process.on(signal, record);
  // Aeterna exec'd itself holding them (native/hold.cc): they are pending until now. Its children must not inherit
  // the preload, so the variables go first.
  if (process.env['AETERNA_HOLD_SIGNALS'] === '1') {
    delete process.env['AETERNA_HOLD_SIGNALS'];
    // The exec put the addon first in LD_PRELOAD (upgrade/reexec.ts); what follows was there before.
    const preload = process.env['LD_PRELOAD'] ?? '';
    const colon = preload.indexOf(':');
    if (colon >= 0) process.env['LD_PRELOAD'] = preload.slice(colon + 1);
    else delete process.env['LD_PRELOAD'];
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    (require('../native/binding') as typeof import('../native/binding')).native.releaseHeldSignals();
  }
}

/** The signals received so far, oldest first; recording stops (the caller's handlers must be installed already). */
export function takeEarlySignals(): NodeJS.Signals[] {
  for (const signal of RECORDED) process.off(signal, record);
  return received.splice(0);
}

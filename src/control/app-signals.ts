// Which signals `aeterna signal` passes to the app's process group, and why the
// others are refused. Allowed: signals that mean nothing to Aeterna's lifecycle
// and that apps commonly give a meaning of their own (reopen logs, reload their
// own config, dump threads, add or remove workers). Refused: the ones that would
// stop, freeze or crash the app behind Aeterna's back, whose exit would then look
// like a crash, or that the kernel and libraries use for themselves.
// A process without a handler gets the signal's default action: HUP, USR1, USR2
// end it (then service.restart applies), QUIT ends it with a core dump, TTIN and
// TTOU stop it. So the signal goes where the operator says: the whole process
// group (as a terminal does to a job), or with `--main` the root process only
// (a master whose workers do not handle it, as gunicorn's and unicorn's).

/** The signals an operator may send the serving generation, as the CLI spells them. */
export const APP_SIGNALS = ['HUP', 'USR1', 'USR2', 'QUIT', 'WINCH', 'TTIN', 'TTOU'] as const;
export type AppSignal = (typeof APP_SIGNALS)[number];

/** Why each commonly asked-for signal outside APP_SIGNALS is refused; anything else gets the generic reason. */
const REFUSED: Readonly<Record<string, string>> = {
  TERM: "stopping the app is Aeterna's: use `aeterna stop` (or `aeterna reload` to replace it)",
  INT: "stopping the app is Aeterna's: use `aeterna stop` (or `aeterna reload` to replace it)",
  KILL: "stopping the app is Aeterna's: use `aeterna stop`, which kills after service.stop_timeout",
  STOP: 'a frozen app serves nothing while Aeterna and /readyz still count it as serving',
  TSTP: 'a frozen app serves nothing while Aeterna and /readyz still count it as serving',
  CONT: 'Aeterna never freezes the app, so there is nothing to continue',
  ABRT: 'a fault signal: it kills the app with a core dump (the watchdog sends it on a hang)',
  SEGV: 'a fault signal: it kills the app with a core dump',
  BUS: 'a fault signal: it kills the app with a core dump',
  ILL: 'a fault signal: it kills the app with a core dump',
  FPE: 'a fault signal: it kills the app with a core dump',
  TRAP: 'a fault signal: it kills the app with a core dump',
  SYS: 'a fault signal: it kills the app with a core dump',
  ALRM: "the app's own timers use it",
  PIPE: 'the kernel sends it on a write to a closed pipe or socket',
  CHLD: 'the kernel sends it when a child exits',
};

/**
 * The signal named by `name` ("HUP", "SIGHUP", "hup"), when it is one the app may get; else an Error saying why
 * not and which ones are allowed.
 */
export function parseAppSignal(name: string): AppSignal | Error {
  const bare = name.toUpperCase().replace(/^SIG/, '');
  if ((APP_SIGNALS as readonly string[]).includes(bare)) return bare as AppSignal;
  const shown = JSON.stringify(name.length > 32 ? name.slice(0, 32) + '...' : name);
  const reason = Object.hasOwn(REFUSED, bare) ? REFUSED[bare] : 'not one an app uses for itself';
  return new Error(`signal ${shown} refused: ${reason} (allowed: ${APP_SIGNALS.join(', ')})`);
}

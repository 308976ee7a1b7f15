// The exit codes of the commands that talk to the daemon, and of validate, in
// one place: scripts branch on them, and `aeterna reload --help` prints this table.

export const CliExit = {
  OK: 0,
  FAILED: 1,
  USAGE: 2,
  NO_DAEMON: 3,
  BUSY: 4,
  /** sysexits.h EX_CONFIG, as `aeterna start` uses for a bad config. */
  CONFIG_INVALID: 78,
} as const;

export type CliExitCode = (typeof CliExit)[keyof typeof CliExit];

const MEANINGS: { readonly [K in keyof typeof CliExit]: string } = {
  OK: 'done: the new generation was promoted (reload --no-wait: the reload was accepted)',
  FAILED: 'the reload was rolled back or failed, or the daemon refused the request (reason and code on stderr)',
  USAGE: 'usage error, or the config needed to find the control socket is missing or invalid',
  NO_DAEMON: 'no daemon answers on the control socket',
  BUSY: 'a reload is already in progress',
  CONFIG_INVALID: 'validate: the config has issues (each printed on stderr)',
};

/** The table as help text. */
export function exitCodeHelp(): string {
  const rows = (Object.keys(CliExit) as Array<keyof typeof CliExit>).map((key) => `  ${String(CliExit[key]).padEnd(4)}${MEANINGS[key]}`);
  return `\nExit codes:\n${rows.join('\n')}\n`;
}

// The exit codes of the commands that talk to the daemon, and of validate, in
// one place: scripts branch on them, and `aeterna reload --help` prints this table.

export const CliExit = {
  OK: 0,
  FAILED: 1,
  USAGE: 2,
  NO_DAEMON: 3,
  BUSY: 4,
  /** stop --wait --timeout: Aeterna had not exited in time (the code timeout(1) uses). */
  TIMED_OUT: 124,
  /** sysexits.h EX_CONFIG, as `aeterna start` uses for a bad config. */
  CONFIG_INVALID: 78,
} as const;

export type CliExitCode = (typeof CliExit)[keyof typeof CliExit];

const MEANINGS: { readonly [K in keyof typeof CliExit]: string } = {
  OK: 'done: the new generation was promoted (reload --no-wait: the reload was accepted)',
  FAILED:
    'the reload was rolled back or failed (an invalid config: E_CONFIG_INVALID and every issue), or the daemon refused the request (reason and code on stderr)',
  USAGE:
    'usage error (signal: a signal it refuses), or the config cannot be read or parsed, or its control.socket_path is invalid',
  NO_DAEMON: 'no daemon answers on the control socket',
  BUSY: 'a reload is already in progress (upgrade: or an old generation still drains after its reload)',
  TIMED_OUT: 'stop --wait --timeout: Aeterna had not exited when the timeout passed (it goes on stopping)',
  CONFIG_INVALID: 'validate: the config has issues (each printed on stderr)',
};

/** The table as help text. */
export function exitCodeHelp(): string {
  const rows = (Object.keys(CliExit) as Array<keyof typeof CliExit>).map(
    (key) => `  ${String(CliExit[key]).padEnd(4)}${MEANINGS[key]}`,
  );
  return `\nExit codes:\n${rows.join('\n')}\n`;
}

/**
 * A reader of stdout or stderr that went away (`aeterna status | head -1`)
 * is not an error of ours: stop writing to that stream, do not crash. Called
 * once at start, before anything is written.
 */
export function tolerateClosedOutput(): void {
  for (const stream of [process.stdout, process.stderr]) {
    stream.on('error', (err: NodeJS.ErrnoException) => {
      if (err.code !== 'EPIPE') throw err;
    });
  }
}

/**
 * Exit with `code` once everything written to stdout and stderr has reached
 * the kernel. process.exit() alone drops what is still queued for a pipe whose
 * reader is slower than us: `aeterna status --json | jq` would get only the
 * first 64 KiB (the pipe's buffer). A reader that went away (EPIPE) ends the wait too.
 */
export function exitWhenFlushed(code: number): void {
  process.exitCode = code;
  const streams = [process.stdout, process.stderr];
  let pending = streams.length;
  const flushed = (): void => {
    if (--pending === 0) process.exit(code);
  };
  for (const stream of streams) {
    if (stream.destroyed || stream.writableEnded) {
      flushed();
      continue;
    }
    let settled = false;
    const settle = (): void => {
      if (settled) return;
      settled = true;
      flushed();
    };
    stream.once('error', settle);
    // Writes complete in order: the callback of this empty write runs once all before it are out.
    stream.write('', () => settle());
  }
}

// The operator's commands: reload, status, promote, rollback, stop, upgrade and
// signal talk to the running daemon over its control socket; validate checks a config file.
// Each action sets process.exitCode from CliExit and never throws.
import path from 'node:path';
import type { Command } from 'commander';
import { call, request } from '../control/client';
import { AeternaError } from '../errors';
import type { ControlRequest } from '../control/protocol';
import { ConfigError, loadConfigFile, loadControlSocketPath, resolveConfigPath } from '../config/load';
import { DURATION_FORM, parseDuration } from '../config/duration';
import type { OperatorEvent, ReloadRecord, StatusReport } from '../orchestrator/types';
import { APP_SIGNALS, parseAppSignal } from '../control/app-signals';
import { CliExit, exitCodeHelp, exitWhenFlushed } from './exit-codes';
import {
  LiveLine,
  describeOperatorEvent,
  describeOutcome,
  describeRetiring,
  formatStatus,
  plainEventLine,
} from './render';

interface DaemonOptions {
  config?: string;
  socket?: string;
  json?: boolean;
}

const CONFIG_HELP =
  'config file, to find the control socket (default: $AETERNA_CONFIG, ./aeterna.yaml, /etc/aeterna/aeterna.yaml)';
const SOCKET_HELP = 'control socket path (then no config is read)';
/** A daemon that accepted the connection answers status/promote/rollback/stop at once; this only guards against a wedged one. */
const QUICK_REPLY_TIMEOUT_MS = 30_000;

export function registerControlCommands(program: Command): void {
  daemonCommand(
    program,
    'reload',
    'reload the app: start a new generation beside the serving one, hand over, then promote or roll back',
  )
    .option('--no-wait', 'return as soon as the daemon has accepted the reload')
    .addHelpText('after', exitCodeHelp())
    .action((options: DaemonOptions & { wait: boolean }) => run(options, () => reload(options)));

  daemonCommand(program, 'status', 'show the state, the serving generation, the listeners and the last reload').action(
    (options: DaemonOptions) => run(options, () => status(options)),
  );

  daemonCommand(
    program,
    'events',
    'follow every reload (its phases and outcome, whoever started it), crash, restart and upgrade as it happens, until interrupted',
  ).action((options: DaemonOptions) => run(options, () => followEvents(options)));

  daemonCommand(program, 'promote', "end a canary's soak now and promote the new generation").action(
    (options: DaemonOptions) => run(options, () => simple(options, { cmd: 'promote' }, 'promotion requested')),
  );

  daemonCommand(program, 'rollback', "end a canary's soak now and roll back to the old generation").action(
    (options: DaemonOptions) => run(options, () => simple(options, { cmd: 'rollback' }, 'rollback requested')),
  );

  daemonCommand(program, 'stop', 'stop the daemon and the app gracefully, as SIGTERM does')
    .option('--wait', "return once Aeterna and the app are gone, exiting with Aeterna's exit code (the app's)")
    .option('--timeout <duration>', 'with --wait: give up waiting after this long (e.g. "30s"), exit code 124')
    .addHelpText('after', STOP_HELP)
    .action((options: StopOptions) =>
      run(options, () => {
        if (options.wait === true) return stopAndWait(options);
        if (options.timeout !== undefined) {
          process.stderr.write('aeterna: stop --timeout bounds --wait: add --wait\n');
          return Promise.resolve(CliExit.USAGE);
        }
        return simple(options, { cmd: 'stop' }, 'stop requested');
      }),
    );

  daemonCommand(
    program,
    'signal',
    "pass a signal to the serving app's process group (not to Aeterna): " +
      `one of ${APP_SIGNALS.join(', ')}, with or without SIG; SIGHUP to the app does not reload`,
  )
    .argument('<signal>', `the signal: ${APP_SIGNALS.join(', ')}`)
    .option('--main', "to the generation's root process only, not its whole process group")
    .addHelpText('after', SIGNAL_HELP)
    .action((name: string, options: DaemonOptions & { main?: boolean }) => run(options, () => signal(name, options)));

  daemonCommand(
    program,
    'upgrade',
    'upgrade Aeterna in place: re-execute the installed aeterna (same pid), keeping the app, its sockets and its memory',
  )
    .option('--exec <path>', 'the aeterna program to execute (default: the entry the daemon was started from)')
    .addHelpText('after', exitCodeHelp())
    .action((options: DaemonOptions & { exec?: string }) => run(options, () => upgrade(options)));

  program
    .command('validate')
    .description('check a config file without starting anything')
    .option('-c, --config <file>', 'config file (default: $AETERNA_CONFIG, ./aeterna.yaml, /etc/aeterna/aeterna.yaml)')
    .action((options: { config?: string }) => {
      process.exitCode = validate(options);
    });
}

function daemonCommand(program: Command, name: string, description: string): Command {
  return program
    .command(name)
    .description(description)
    .option('-c, --config <file>', CONFIG_HELP)
    .option('-s, --socket <path>', SOCKET_HELP)
    .option('--json', 'machine-readable output: one JSON object per line on stdout');
}

async function run(options: DaemonOptions, body: () => Promise<number>): Promise<void> {
  try {
    process.exitCode = await body();
  } catch (err) {
    process.exitCode = reportError(err, options.json === true);
  }
}

/** The control socket: --socket, else control.socket_path of the config (the only key read; the daemon judges the rest). */
function controlSocket(options: DaemonOptions): string {
  if (options.socket !== undefined && options.socket !== '') return options.socket;
  return loadControlSocketPath(resolveConfigPath(options.config));
}

/** After an `upgrade` event, how long the stream is taken up again on a cut (the re-executed daemon answers). */
const FOLLOW_UPGRADE_MS = 60_000;

/**
 * `aeterna events`: one line per event (text, or --json), until Ctrl-C (exit 0) or Aeterna exits (exit 0). Across
 * an upgrade the stream goes on: the connection the exec cuts is opened again on the same socket.
 */
async function followEvents(options: DaemonOptions): Promise<number> {
  const socketPath = controlSocket(options);
  const json = options.json === true;
  process.once('SIGINT', () => exitWhenFlushed(CliExit.OK));
  let reconnectUntil = 0;
  for (;;) {
    try {
      for await (const message of request(socketPath, { cmd: 'events' })) {
        if (message.type === 'event') {
          const event = message.event as OperatorEvent;
          if (event.type === 'upgrade') reconnectUntil = Date.now() + FOLLOW_UPGRADE_MS;
          if (json) writeJson(event);
          else {
            const line = describeOperatorEvent(event);
            if (line !== null) process.stdout.write(line + '\n');
          }
        } else if (message.type === 'result') {
          if (!json && 'ended' in message) process.stdout.write(`${new Date().toISOString()} ${message.ended}\n`);
          return CliExit.OK;
        } else throw Object.assign(new Error(message.message), { code: message.code });
      }
    } catch (err) {
      if (Date.now() > reconnectUntil || (err as { code?: string }).code !== 'E_CONTROL_UNAVAILABLE') throw err;
      await new Promise((r) => setTimeout(r, 100)); // the daemon is re-executing: its socket answers again soon
    }
  }
}

async function reload(options: DaemonOptions & { wait: boolean }): Promise<number> {
  const socketPath = controlSocket(options);
  const json = options.json === true;
  const live = !json && process.stdout.isTTY ? new LiveLine(process.stdout) : null;
  // Ctrl-C only detaches this client; the daemon carries on with the reload.
  const onInterrupt = (): void => {
    live?.end();
    process.stderr.write('aeterna: detached; the reload goes on in the daemon (see aeterna status)\n');
    exitWhenFlushed(130);
  };
  process.once('SIGINT', onInterrupt);
  let result;
  try {
    result = await call(socketPath, { cmd: 'reload', wait: options.wait }, (event) => {
      if (json) writeJson(event);
      else if (live) live.event(event);
      else {
        const line = plainEventLine(event);
        if (line !== null) process.stdout.write(line + '\n');
      }
    });
  } finally {
    live?.end();
    process.off('SIGINT', onInterrupt);
  }
  if ('accepted' in result) {
    if (!json) process.stdout.write(`${result.accepted} accepted; follow it with aeterna status\n`);
    return CliExit.OK;
  }
  if (!('record' in result)) throw new Error('the daemon answered the reload without a record');
  return reportOutcome(result.record, json);
}

function reportOutcome(record: ReloadRecord, json: boolean): number {
  const { ok, text } = describeOutcome(record);
  if (json) writeJson(record);
  if (ok) {
    // A promoted reload is answered before its old generation has exited: say which ones still drain.
    if (!json)
      process.stdout.write(
        [text, ...(record.retiring ?? []).map((r) => `still ${describeRetiring(r)}`)].join('\n') + '\n',
      );
    return CliExit.OK;
  }
  process.stderr.write(`aeterna: ${text}\n`);
  return CliExit.FAILED;
}

async function status(options: DaemonOptions): Promise<number> {
  const result = await call(controlSocket(options), { cmd: 'status' }, undefined, {
    idleTimeoutMs: QUICK_REPLY_TIMEOUT_MS,
  });
  if (!('status' in result)) throw new Error('the daemon answered status without a report');
  const report: StatusReport = result.status;
  process.stdout.write(options.json ? JSON.stringify(report) + '\n' : formatStatus(report));
  return CliExit.OK;
}

/** How long the re-executed daemon gets to answer on the control socket. */
const UPGRADE_ANSWER_TIMEOUT_MS = 60_000;

async function upgrade(options: DaemonOptions & { exec?: string }): Promise<number> {
  const socketPath = controlSocket(options);
  const exec = options.exec === undefined ? undefined : path.resolve(options.exec);
  const result = await call(socketPath, exec === undefined ? { cmd: 'upgrade' } : { cmd: 'upgrade', exec }, undefined, {
    idleTimeoutMs: UPGRADE_ANSWER_TIMEOUT_MS,
  });
  if (!('upgrade' in result)) throw new Error('the daemon answered the upgrade without saying it execs');
  const { from, reexecs } = result.upgrade;
  // Done once the new daemon answers: its count of re-executions went up.
  const deadline = Date.now() + UPGRADE_ANSWER_TIMEOUT_MS;
  for (;;) {
    try {
      const answer = await call(socketPath, { cmd: 'status' }, undefined, { idleTimeoutMs: QUICK_REPLY_TIMEOUT_MS });
      if ('status' in answer && (answer.status.reexecs ?? 0) > reexecs) {
        const failed = answer.status.upgrade_fell_back;
        if (failed) {
          // The new program could not start and exec'd this one again: the app was never touched.
          throw new AeternaError(
            'E_UPGRADE_REFUSED',
            `aeterna ${failed.from} could not take over (${failed.error}); ` +
              `aeterna ${answer.status.version ?? from} took over again (pid ${answer.status.daemon_pid}, generation ${answer.status.generation} kept)`,
          );
        }
        const to = answer.status.version ?? 'unknown';
        if (options.json)
          writeJson({ ok: true, from, to, reexecs: answer.status.reexecs, daemon_pid: answer.status.daemon_pid });
        else
          process.stdout.write(
            `upgraded: aeterna ${from} -> ${to} (pid ${answer.status.daemon_pid}, generation ${answer.status.generation} kept)\n`,
          );
        return CliExit.OK;
      }
    } catch (err) {
      if ((err as { code?: unknown }).code !== 'E_CONTROL_UNAVAILABLE' || Date.now() > deadline) throw err;
    }
    if (Date.now() > deadline)
      throw new Error(
        `the daemon accepted the upgrade but no re-executed daemon answered within ${UPGRADE_ANSWER_TIMEOUT_MS / 1000} s`,
      );
    await new Promise((r) => setTimeout(r, 50));
  }
}

interface StopOptions extends DaemonOptions {
  wait?: boolean;
  timeout?: string;
}

const STOP_HELP = `
With --wait, the exit code is Aeterna's own, as \`aeterna start\` exits: the app's exit code, 128 + the signal
number when it died of one (137: SIGKILL after service.stop_timeout). Before the stop was accepted, the usual
codes apply (3: no daemon); ${CliExit.TIMED_OUT}: --timeout passed first (Aeterna goes on stopping).
`;

/** `aeterna stop --wait`: the daemon answers with its exit code, then its exit closes the connection. */
async function stopAndWait(options: StopOptions): Promise<number> {
  let timeoutMs: number | null = null;
  if (options.timeout !== undefined) {
    timeoutMs = parseDuration(options.timeout);
    if (timeoutMs === null) {
      process.stderr.write(`aeterna: --timeout ${JSON.stringify(options.timeout)}: expected ${DURATION_FORM}\n`);
      return CliExit.USAGE;
    }
  }
  const exited = call(controlSocket(options), { cmd: 'stop', wait: true }, undefined, { untilClosed: true });
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<null>((resolve) => {
    if (timeoutMs !== null) timer = setTimeout(() => resolve(null), timeoutMs);
  });
  let result;
  try {
    result = await Promise.race([exited, timedOut]);
  } finally {
    clearTimeout(timer);
  }
  if (result === null) {
    const message = `Aeterna has not exited after ${options.timeout}; it goes on stopping (see aeterna status)`;
    if (options.json) writeJson({ ok: false, timed_out: true, message });
    process.stderr.write(`aeterna: ${message}\n`);
    return CliExit.TIMED_OUT;
  }
  if (!('exited' in result)) throw new Error('the daemon answered stop --wait without its exit code');
  const { code } = result.exited;
  if (options.json) writeJson({ ok: true, exit_code: code });
  else process.stdout.write(`stopped: Aeterna exited with code ${code}\n`);
  return code;
}

const SIGNAL_HELP = `
Refused: TERM, INT, KILL (stopping the app is Aeterna's: aeterna stop), STOP, TSTP, CONT (a frozen app would
still count as serving), fault signals (ABRT, SEGV, ...), and signals the kernel or the app's runtime use (ALRM,
PIPE, CHLD): exit code ${CliExit.USAGE}. Nothing serving (starting, restarting, stopping): exit code ${CliExit.FAILED}.
A process without a handler gets the default action (HUP, USR1, USR2 end it; TTIN, TTOU stop it): use --main for a
master whose workers do not handle the signal.
`;

async function signal(name: string, options: DaemonOptions & { main?: boolean }): Promise<number> {
  const parsed = parseAppSignal(name);
  if (parsed instanceof Error) {
    if (options.json) writeJson({ error: { code: 'E_CONTROL_BAD_REQUEST', message: parsed.message } });
    process.stderr.write(`aeterna: ${parsed.message}\n`);
    return CliExit.USAGE;
  }
  const result = await call(
    controlSocket(options),
    { cmd: 'signal', signal: parsed, main: options.main === true },
    undefined,
    { idleTimeoutMs: QUICK_REPLY_TIMEOUT_MS },
  );
  if (!('signalled' in result)) throw new Error('the daemon answered the signal request without saying what it did');
  const s = result.signalled;
  if (options.json) writeJson({ ok: true, ...s });
  else
    process.stdout.write(
      `${s.signal} sent to generation ${s.generation} (${s.to === 'main' ? `pid ${s.pid}` : `process group ${s.pid}`})\n`,
    );
  return CliExit.OK;
}

async function simple(options: DaemonOptions, req: ControlRequest, done: string): Promise<number> {
  await call(controlSocket(options), req, undefined, { idleTimeoutMs: QUICK_REPLY_TIMEOUT_MS });
  if (options.json) writeJson({ ok: true });
  else process.stdout.write(`${done}\n`);
  return CliExit.OK;
}

function validate(options: { config?: string }): number {
  const file = resolveConfigPath(options.config);
  try {
    loadConfigFile(file);
  } catch (err) {
    if (!(err instanceof ConfigError)) return reportError(err, false);
    const count = err.issues.length;
    process.stderr.write(
      `aeterna: ${file}: invalid configuration, ${count} issue${count === 1 ? '' : 's'} (E_CONFIG_INVALID)\n${err.message}\n`,
    );
    return CliExit.CONFIG_INVALID;
  }
  process.stdout.write(`${file}: ok\n`);
  return CliExit.OK;
}

/** Print an error (`aeterna: <message> (<CODE>)`, plus a JSON object on stdout with --json) and pick the exit code. */
function reportError(err: unknown, json: boolean): number {
  const rawCode = (err as { code?: unknown } | null)?.code;
  const code = typeof rawCode === 'string' && rawCode.startsWith('E_') ? rawCode : 'E_INTERNAL';
  const message = err instanceof Error ? err.message : String(err);
  if (json) writeJson({ error: { code, message } });
  if (err instanceof ConfigError) {
    process.stderr.write(
      `aeterna: cannot find the control socket in the config (${code}); pass --socket PATH to reach the daemon without it\n${message}\n`,
    );
  } else {
    process.stderr.write(`aeterna: ${message} (${code})\n`);
  }
  switch (code) {
    case 'E_CONTROL_UNAVAILABLE':
      return CliExit.NO_DAEMON;
    case 'E_RELOAD_BUSY':
      return CliExit.BUSY;
    case 'E_CONFIG_INVALID':
      return CliExit.USAGE;
    default:
      return CliExit.FAILED;
  }
}

function writeJson(value: unknown): void {
  process.stdout.write(JSON.stringify(value) + '\n');
}

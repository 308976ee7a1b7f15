// The `aeterna` command line (commander).
// First: a stop signal that arrives while the rest loads is recorded, not lost (see upgrade/early-signals.ts).
import '../upgrade/early-signals';
import { packageVersion } from '../version';
import { Command, CommanderError } from 'commander';
import { registerControlCommands } from './commands';
import { CliExit, exitWhenFlushed, tolerateClosedOutput } from './exit-codes';
import { AeternaError, ExitCodes } from '../errors';

export function buildProgram(): Command {
  const program = new Command('aeterna')
    .description(
      "Zero-downtime process supervisor: PID 1 that owns the sockets and relays the app's memory across reloads",
    )
    .version(packageVersion(), '-V, --version');
  program
    .command('start')
    .description('run the configured app as generation 1 and supervise it (as PID 1 in a container)')
    .option('-c, --config <file>', 'config file (default: $AETERNA_CONFIG, ./aeterna.yaml, /etc/aeterna/aeterna.yaml)')
    .option(
      '--check-handover <version>',
      'only say whether this Aeterna can take over that handover version (aeterna upgrade asks), and exit',
    )
    .action(async (options: { config?: string; checkHandover?: string }) => {
      // Loaded only here: the daemon is most of Aeterna's code, and `aeterna status` or `reload` runs without it.
      const { runStart } = await import('./start');
      process.exitCode = await runStart(options);
    });
  registerControlCommands(program);
  for (const command of [program, ...program.commands]) {
    // Throw instead of exiting, so that main() maps usage errors to exit code 2.
    command.exitOverride();
    command.configureOutput({ outputError: (text, write) => write(`aeterna: ${text}`) });
    command.showHelpAfterError(`(see aeterna ${command === program ? '' : `${command.name()} `}--help)`);
  }
  return program;
}

export async function main(argv: string[]): Promise<void> {
  tolerateClosedOutput();
  try {
    await buildProgram().parseAsync(argv);
  } catch (err) {
    if (err instanceof AeternaError && err.code === 'E_ADDON_UNAVAILABLE') {
      // Whichever command reached for the addon: what failed and the fix, not a stack trace.
      process.stderr.write(`aeterna: ${err.message}\n(${err.code})\n`);
      process.exitCode = ExitCodes.UNAVAILABLE;
      exitWhenFlushed(ExitCodes.UNAVAILABLE);
      return;
    }
    if (!(err instanceof CommanderError)) throw err;
    // --help and --version end with 0; any other commander exit is a usage error.
    process.exitCode = err.exitCode === 0 ? CliExit.OK : CliExit.USAGE;
  }
  // Exit explicitly: listeners and timers must not keep PID 1 alive after the app is gone;
  // but only once stdout and stderr are flushed, or a pipe reader gets a cut output.
  exitWhenFlushed(typeof process.exitCode === 'number' ? process.exitCode : 0);
}

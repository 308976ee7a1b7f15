// `aeterna start`: load the config, then run the daemon until it exits.
import { Daemon } from '../daemon';
import { createLogger } from '../log';
import { ConfigError, loadConfigFile, resolveConfigPath } from '../config/load';
import { type AeternaError, ExitCodes } from '../errors';
import { canReadHandover, readHandover, readableVersions } from '../upgrade/handover';
import { checkAnswer } from '../upgrade/reexec';
import { exitWhenFlushed } from './exit-codes';

export async function runStart(options: { config?: string; checkHandover?: string }): Promise<number> {
  if (options.checkHandover !== undefined) {
    // `aeterna upgrade` asks the target this before exec'ing it: it loaded, and reads that handover version?
    if (!canReadHandover(options.checkHandover)) {
      process.stderr.write(`aeterna: cannot read handover version ${options.checkHandover} (this Aeterna reads ${readableVersions()})\n`);
      return ExitCodes.SOFTWARE;
    }
    process.stdout.write(`${checkAnswer(options.checkHandover)}\n`);
    return ExitCodes.OK;
  }
  let handover;
  try {
    handover = readHandover(process.env);
  } catch (err) {
    process.stderr.write(`aeterna: ${(err as Error).message} (${(err as AeternaError).code})\n`);
    return ExitCodes.SOFTWARE;
  }
  let config;
  try {
    config = loadConfigFile(resolveConfigPath(options.config));
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`aeterna: invalid configuration\n${err.message}\n`);
      return ExitCodes.CONFIG;
    }
    throw err;
  }
  const log = createLogger(config.observability.logLevel);
  const daemon = new Daemon(config, log, handover);
  // PID 1 must not die of a bug, nor without a word: log it with its stack and re-execute in place with the
  // handover (the app keeps running); only if that is impossible, take the app with it and exit with EX_SOFTWARE.
  const crashed = (err: unknown, what: string): void => {
    log.fatal({ err, reason: 'exception' }, `internal error (${what}): ${(err as Error)?.message ?? String(err)}`);
    daemon.recoverFromCrash();
    daemon.killEverything();
    exitWhenFlushed(ExitCodes.SOFTWARE);
  };
  process.on('uncaughtException', (err) => crashed(err, 'uncaught exception'));
  process.on('unhandledRejection', (err) => crashed(err, 'unhandled rejection'));
  return daemon.run();
}

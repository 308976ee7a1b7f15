// `aeterna start`: load the config, then run the daemon until it exits.
import { Daemon } from '../daemon';
import { createLogger } from '../log';
import { ConfigError, loadConfigFile, resolveConfigPath } from '../config/load';
import type { Config } from '../config/types';
import { AeternaError, ExitCodes } from '../errors';
import { loadAddon } from '../native/binding';
import { HANDOVER_VERSION, canReadHandover, readHandover, readableVersions, type Handover } from '../upgrade/handover';
import { checkAnswer, dryRunAnswer } from '../upgrade/reexec';
import { fallBack } from '../upgrade/fallback';
import { packageVersion } from '../version';
import { exitWhenFlushed } from './exit-codes';

export async function runStart(options: { config?: string; checkHandover?: string }): Promise<number> {
  if (options.checkHandover !== undefined) {
    // An older `aeterna upgrade` asks the target this before exec'ing it: it loaded, and reads that handover version?
    if (!canReadHandover(options.checkHandover)) {
      process.stderr.write(
        `aeterna: cannot read handover version ${options.checkHandover} (this Aeterna reads ${readableVersions()})\n`,
      );
      return ExitCodes.SOFTWARE;
    }
    process.stdout.write(`${checkAnswer(options.checkHandover)}\n`);
    return ExitCodes.OK;
  }
  let handover: Handover | null;
  try {
    handover = readHandover(process.env);
  } catch (err) {
    process.stderr.write(`aeterna: ${(err as Error).message} (${(err as AeternaError).code})\n`);
    return ExitCodes.SOFTWARE;
  }
  let config: Config;
  try {
    // A re-executed Aeterna goes on with the config the previous one ran with: the file may hold an edit no reload
    // accepted (the next reload applies or refuses it, as always). Only a handover before version 3 lacks it.
    config = handover?.config ?? loadConfigFile(resolveConfigPath(options.config));
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`aeterna: invalid configuration\n${err.message}\n`);
      if (handover?.dry_run !== true) cameBackOr(handover, err);
      return ExitCodes.CONFIG;
    }
    throw err;
  }
  // Everything from here on needs the addon: load it now, so that a missing one is one clear message (and an
  // `aeterna upgrade` target without it fails its dry run).
  try {
    loadAddon();
  } catch (err) {
    if (!(err instanceof AeternaError)) throw err;
    process.stderr.write(`aeterna: ${err.message}\n(${err.code})\n`);
    if (handover?.dry_run !== true) cameBackOr(handover, err);
    return ExitCodes.UNAVAILABLE;
  }
  if (handover?.dry_run === true) {
    // `aeterna upgrade` checking this program: its code and the addon are loaded, the handover and its config read.
    process.stdout.write(`${dryRunAnswer(HANDOVER_VERSION)}\n`);
    return ExitCodes.OK;
  }
  const log = createLogger(config.observability.logLevel);
  const daemon = new Daemon(config, log, handover);
  // PID 1 must not die of a bug, nor without a word: log it with its stack and re-execute in place with the
  // handover (the app keeps running); only if that is impossible, take the app with it and exit with EX_SOFTWARE.
  const crashed = (err: unknown, what: string): void => {
    log.fatal({ err, reason: 'exception' }, `internal error (${what}): ${(err as Error)?.message ?? String(err)}`);
    daemon.recoverFromCrash(err);
    daemon.killEverything();
    exitWhenFlushed(ExitCodes.SOFTWARE);
  };
  process.on('uncaughtException', (err) => crashed(err, 'uncaught exception'));
  process.on('unhandledRejection', (err) => crashed(err, 'unhandled rejection'));
  return daemon.run();
}

/** This program cannot start: exec the one that handed over to it, when there is one (fallback.ts). */
function cameBackOr(handover: Handover | null, err: unknown): void {
  try {
    fallBack(handover, packageVersion(), err);
  } catch (execErr) {
    process.stderr.write(`aeterna: cannot come back to the previous program: ${(execErr as Error).message}\n`);
  }
}

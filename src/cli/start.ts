// `aeterna start`: load the config, then run the daemon until it exits.
import { Daemon } from '../daemon';
import { createLogger } from '../log';
import { ConfigError, loadConfigFile, resolveConfigPath } from '../config/load';
import { ExitCodes } from '../errors';
import { exitWhenFlushed } from './exit-codes';

export async function runStart(options: { config?: string }): Promise<number> {
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
  const daemon = new Daemon(config, log);
  // PID 1 must not die of a bug without a word: log it, take the app with it and exit with EX_SOFTWARE.
  process.on('uncaughtException', (err) => {
    log.fatal({ err }, 'internal error');
    daemon.killEverything();
    exitWhenFlushed(ExitCodes.SOFTWARE);
  });
  return daemon.run();
}

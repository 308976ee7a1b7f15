// The config Aeterna runs with, which is not always the file: an edit takes effect only when a
// reload accepts it, and an upgrade or a recovery goes on with the config the daemon held (it is
// carried in the handover). `aeterna status` says how the file compares, so an operator sees that
// the next reload would apply an edit (or refuse it) instead of reading the file as the truth.
import fs from 'node:fs';
import { ConfigError, loadConfigFile } from '../config/load';
import type { Config } from '../config/types';

/**
 * How the file compares to the config Aeterna runs with: `applied` (the same config), `changed` (valid and
 * different: the next reload applies it), `invalid` (the next reload refuses it), `unreadable` (missing, not a
 * regular file, or cannot be read).
 */
export type ConfigFileState = 'applied' | 'changed' | 'invalid' | 'unreadable';

export class HeldConfig {
  /** The file's identity and times when it was last compared, and what the comparison said. */
  private compared: { key: string; state: ConfigFileState } | null = null;

  constructor(private config: Config) {}

  get current(): Config {
    return this.config;
  }

  /** A reload settled: from now on Aeterna runs with `config`. */
  set(config: Config): void {
    this.config = config;
    this.compared = null;
  }

  /** Compare the file to the held config. The file is parsed again only when its inode, size or times changed. */
  fileState(): ConfigFileState {
    const file = this.config.file;
    let stat: fs.Stats;
    try {
      stat = fs.statSync(file);
    } catch {
      return 'unreadable';
    }
    if (!stat.isFile()) return 'unreadable'; // a FIFO or a device is never opened here
    const key = `${stat.dev}:${stat.ino}:${stat.size}:${stat.mtimeMs}:${stat.ctimeMs}`;
    if (this.compared?.key === key) return this.compared.state;
    let state: ConfigFileState;
    try {
      state = JSON.stringify(loadConfigFile(file)) === JSON.stringify(this.config) ? 'applied' : 'changed';
    } catch (err) {
      state = err instanceof ConfigError ? 'invalid' : 'unreadable';
    }
    this.compared = { key, state };
    return state;
  }
}

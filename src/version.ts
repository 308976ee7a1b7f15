// Aeterna's own version, from package.json (the CLI's --version, status and `aeterna upgrade`).
import fs from 'node:fs';
import path from 'node:path';

let version: string | undefined;

/** Read once: the CLI and the daemon both ask for it on the way to the app's exec. */
export function packageVersion(): string {
  version ??= (
    JSON.parse(fs.readFileSync(path.join(__dirname, '..', '..', 'package.json'), 'utf8')) as { version: string }
  ).version;
  return version;
}

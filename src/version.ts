// Aeterna's own version, from package.json (the CLI's --version, status and `aeterna upgrade`).
import fs from 'node:fs';
import path from 'node:path';

export function packageVersion(): string {
  const pkg = JSON.parse(fs.readFileSync(path.join(__dirname, '..', '..', 'package.json'), 'utf8')) as { version: string };
  return pkg.version;
}

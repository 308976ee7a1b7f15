// An install without the native addon (its install script did not run) or with a broken one: the commands that do
// not need it (--help, --version, validate) work, and `aeterna start` ends with E_ADDON_UNAVAILABLE, what failed and
// the fix, never a stack trace. The install is a copy of the built package (bin/, dist/src/, package.json) beside
// the repo's node_modules, with no build/ and no prebuilds/.
import assert from 'node:assert/strict';
import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { ROOT, tempDir } from '../helpers/aeterna';

/** A copy of the package as an install whose scripts did not run would leave it; the caller may add build/. */
function installWithoutAddon(): string {
  const dir = tempDir('aeterna-noaddon-');
  fs.cpSync(path.join(ROOT, 'bin'), path.join(dir, 'bin'), { recursive: true });
  fs.cpSync(path.join(ROOT, 'dist', 'src'), path.join(dir, 'dist', 'src'), { recursive: true });
  fs.copyFileSync(path.join(ROOT, 'package.json'), path.join(dir, 'package.json'));
  fs.symlinkSync(path.join(ROOT, 'node_modules'), path.join(dir, 'node_modules'));
  return dir;
}

function aeterna(install: string, ...args: string[]): SpawnSyncReturns<string> {
  const r = spawnSync(process.execPath, [path.join(install, 'bin', 'aeterna.js'), ...args], {
    cwd: install,
    encoding: 'utf8',
    timeout: 60_000,
  });
  if (r.error) throw r.error;
  return r;
}

function config(dir: string): string {
  const file = path.join(dir, 'aeterna.yaml');
  fs.writeFileSync(
    file,
    `version: "v1"
service:
  name: "no-addon"
  command: ["sleep", "60"]
  listeners:
    - name: "http"
      address: "unix://app.sock"
control:
  socket_path: "${path.join(dir, 'control.sock')}"
`,
  );
  return file;
}

/** A JavaScript stack frame in the output ("    at fn (file:line:col)"). */
const STACK_FRAME = /^\s+at .+:\d+:\d+\)?$/m;

describe('without the native addon', () => {
  const install = installWithoutAddon();
  const file = config(install);
  after(() => fs.rmSync(install, { recursive: true, force: true }));

  test('aeterna --help prints the usage and exits 0', () => {
    const r = aeterna(install, '--help');
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /^Usage: aeterna/m);
    assert.doesNotMatch(r.stderr, STACK_FRAME);
  });

  test('aeterna --version prints the version and exits 0', () => {
    const { version } = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string };
    const r = aeterna(install, '--version');
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout.trim(), version);
  });

  test('aeterna validate checks a config and exits 0', () => {
    const r = aeterna(install, 'validate', '-c', file);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /: ok$/m);
  });

  test('aeterna start exits 69 with E_ADDON_UNAVAILABLE and the fix, no stack trace', () => {
    const r = aeterna(install, 'start', '-c', file);
    assert.equal(r.status, 69, `stdout:\n${r.stdout}\nstderr:\n${r.stderr}`);
    assert.match(r.stderr, /cannot load Aeterna's native addon \(aeterna\.node\): No native build was found/);
    assert.match(r.stderr, /npm rebuild aeterna/);
    assert.match(r.stderr, /npx node-gyp rebuild/);
    assert.match(r.stderr, /make standalone/);
    assert.match(r.stderr, /\(E_ADDON_UNAVAILABLE\)/);
    assert.doesNotMatch(r.stderr, STACK_FRAME);
  });
});

describe('with a broken native addon', () => {
  const install = installWithoutAddon();
  const file = config(install);
  // Not a shared object: what a truncated download or a copy from another platform looks like to dlopen.
  fs.mkdirSync(path.join(install, 'build', 'Release'), { recursive: true });
  fs.writeFileSync(path.join(install, 'build', 'Release', 'aeterna.node'), 'not an ELF file\n'.repeat(64));
  after(() => fs.rmSync(install, { recursive: true, force: true }));

  test('aeterna start exits 69 with what dlopen said and the fix, no stack trace', () => {
    const r = aeterna(install, 'start', '-c', file);
    assert.equal(r.status, 69, `stdout:\n${r.stdout}\nstderr:\n${r.stderr}`);
    assert.match(r.stderr, /cannot load Aeterna's native addon \(aeterna\.node\): .*aeterna\.node: invalid ELF header/);
    assert.match(r.stderr, /npm rebuild aeterna/);
    assert.doesNotMatch(r.stderr, STACK_FRAME);
  });

  test('aeterna validate still works', () => {
    const r = aeterna(install, 'validate', '-c', file);
    assert.equal(r.status, 0, r.stderr);
  });
});

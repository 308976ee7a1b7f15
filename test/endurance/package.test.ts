// The npm package as its users get it: `npm pack` ships what is needed and nothing else; the tarball installs
// into an empty directory (dependencies from the registry), `npx aeterna --version` prints the version, and
// `aeterna start` runs a tiny app with Aeterna's socket. The prebuilt addon is loaded without compiling; without
// one the install script builds it from source; a glibc prebuild is never taken on musl. Needs the npm registry
// (skipped with a message when it is unreachable). Runs after `make build`: dist/ must be built.
import assert from 'node:assert/strict';
import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ROOT, freePort, tempDir } from '../helpers/aeterna';

const PKG = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as {
  name: string;
  version: string;
  main: string;
  bin: Record<string, string>;
  exports: Record<string, string>;
};
const PREBUILD = path.join('prebuilds', 'linux-x64', `${PKG.name}.glibc.node`);

/** Node's own headers, when installed next to it (Debian's nodejs-dev, official tarballs): node-gyp then needs no download. */
function nodeHeadersEnv(): Record<string, string> {
  const prefix = path.resolve(path.dirname(process.execPath), '..');
  return fs.existsSync(path.join(prefix, 'include', 'node', 'node_api.h')) ? { npm_config_nodedir: prefix } : {};
}

const ENV: NodeJS.ProcessEnv = {
  ...process.env,
  ...nodeHeadersEnv(),
  npm_config_audit: 'false',
  npm_config_fund: 'false',
  npm_config_update_notifier: 'false',
};

function run(
  cmd: string,
  args: string[],
  cwd: string,
  env: NodeJS.ProcessEnv = ENV,
  timeout = 180_000,
): SpawnSyncReturns<string> {
  const r = spawnSync(cmd, args, { cwd, env, encoding: 'utf8', timeout, maxBuffer: 64 * 1024 * 1024 });
  if (r.error) throw r.error;
  return r;
}

function ok(r: SpawnSyncReturns<string>, what: string): string {
  assert.equal(r.status, 0, `${what} exited with ${r.status ?? r.signal}\nstdout:\n${r.stdout}\nstderr:\n${r.stderr}`);
  return r.stdout;
}

function registryUnreachable(): string | null {
  const r = spawnSync('npm', ['ping'], { env: ENV, encoding: 'utf8', timeout: 30_000 });
  return r.status === 0
    ? null
    : `the npm registry is unreachable (npm ping: ${r.error?.message ?? (r.stderr.trim().split('\n').pop() || `exit ${r.status}`)})`;
}

interface PackedFile {
  path: string;
  mode: number;
}

/** `npm pack --json` of dir (no lifecycle scripts: dist/ is already built), into dest when given. */
function pack(dir: string, dest?: string): { filename: string; files: PackedFile[] } {
  const args = ['pack', '--json', '--ignore-scripts', ...(dest ? ['--pack-destination', dest] : ['--dry-run'])];
  const out = ok(run('npm', args, dir), 'npm pack');
  const [result] = JSON.parse(out) as Array<{ filename: string; files: PackedFile[] }>;
  return result;
}

/** Every file under dir, relative to it. */
function walk(dir: string, base = dir): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const full = path.join(dir, e.name);
    return e.isDirectory() ? walk(full, base) : [path.relative(base, full)];
  });
}

const skip = registryUnreachable();
if (skip) console.log(`# skipping the npm package tests: ${skip}`);

describe('npm pack', () => {
  const { files } = pack(ROOT);
  const paths = files.map((f) => f.path);

  test('ships the CLI, the compiled JavaScript with its typings, the addon sources and the configs', () => {
    for (const required of [
      'package.json',
      'README.md',
      'bin/aeterna.js',
      'binding.gyp',
      'native/aeterna.cc',
      'configs/aeterna.yaml',
      'configs/aeterna.schema.json',
      'dist/src/cli/main.js',
      'dist/src/cli/main.d.ts',
      'dist/src/native/binding.js',
    ]) {
      assert.ok(paths.includes(required), `${required} is in the tarball`);
    }
    // Every compiled module and typing of src/ that the build produced.
    const built = walk(path.join(ROOT, 'dist', 'src'))
      .filter((f) => /\.(js|d\.ts)$/.test(f))
      .map((f) => `dist/src/${f}`);
    assert.ok(built.length > 20, `${built.length} compiled files (is dist/ built?)`);
    assert.deepEqual(
      built.filter((f) => !paths.includes(f)),
      [],
    );
    const bin = files.find((f) => f.path === PKG.bin.aeterna);
    assert.ok(bin && (bin.mode & 0o111) !== 0, 'the bin is executable');
  });

  test('ships nothing else: no tests, benchmarks, TypeScript sources, source maps or build output', () => {
    const allowed =
      /^(package\.json|README\.md|LICENSE|binding\.gyp|bin\/[^/]+\.js|dist\/src\/.+\.(js|d\.ts)|native\/.+|prebuilds\/linux-x64\/[^/]+\.node|configs\/[^/]+)$/;
    assert.deepEqual(
      paths.filter((p) => !allowed.test(p)),
      [],
    );
    assert.deepEqual(
      paths.filter((p) => /^dist\/(test|bench|examples)\/|\.map$|^build\/|node_modules/.test(p)),
      [],
    );
  });

  test('the entry points that exist are shipped; prebuilds are shipped when they were built', () => {
    for (const target of [PKG.main, ...Object.values(PKG.exports)]) {
      const rel = path.normalize(target).replace(/^\.\//, '');
      if (fs.existsSync(path.join(ROOT, rel))) assert.ok(paths.includes(rel), `${target} is in the tarball`);
    }
    const prebuilds = fs.existsSync(path.join(ROOT, 'prebuilds'))
      ? walk(path.join(ROOT, 'prebuilds')).filter((f) => f.endsWith('.node'))
      : [];
    for (const p of prebuilds) assert.ok(paths.includes(`prebuilds/${p}`), `prebuilds/${p} is in the tarball`);
  });
});

describe('the packaged tarball, installed into an empty directory', { skip: skip ?? false, timeout: 300_000 }, () => {
  let tmp = '';
  /** node_modules/aeterna of the install. */
  let installed = '';
  let app = '';

  before(() => {
    tmp = tempDir('aeterna-package-');
    // 1. The tarball exactly as `npm pack` makes it from the repo.
    const repoTarball = path.join(tmp, pack(ROOT, tmp).filename);
    // 2. With a prebuilt addon built from the tarball's own sources by the same script as `make prebuild`
    //    (any prebuilds/ in the work tree may be stale, so they are not used), then packed again.
    const stage = path.join(tmp, 'stage');
    fs.mkdirSync(stage);
    ok(run('tar', ['xzf', repoTarball, '-C', stage], tmp), 'tar');
    const pkgDir = path.join(stage, 'package');
    fs.rmSync(path.join(pkgDir, 'prebuilds'), { recursive: true, force: true });
    fs.symlinkSync(path.join(ROOT, 'node_modules'), path.join(pkgDir, 'node_modules'));
    ok(run('npm', ['run', 'build:prebuilds'], pkgDir), 'npm run build:prebuilds');
    fs.rmSync(path.join(pkgDir, 'node_modules'));
    fs.rmSync(path.join(pkgDir, 'build'), { recursive: true, force: true });
    assert.ok(fs.existsSync(path.join(pkgDir, PREBUILD)), `${PREBUILD} was built`);
    const tarball = path.join(stage, pack(pkgDir, stage).filename);
    // 3. An empty project that installs it, dependencies from the registry.
    app = path.join(tmp, 'app');
    fs.mkdirSync(app);
    fs.writeFileSync(
      path.join(app, 'package.json'),
      JSON.stringify({ name: 'aeterna-package-test', private: true, version: '1.0.0' }),
    );
    ok(run('npm', ['install', '--no-audit', '--no-fund', '--prefer-offline', tarball], app), 'npm install <tarball>');
    installed = path.join(app, 'node_modules', PKG.name);
  });

  after(() => {
    if (tmp !== '') fs.rmSync(tmp, { recursive: true, force: true });
  });

  /** Where node-gyp-build finds the addon of the installed package. */
  function addonPath(env: NodeJS.ProcessEnv = ENV): SpawnSyncReturns<string> {
    return run(
      process.execPath,
      ['-e', `process.stdout.write(require('node-gyp-build').path(${JSON.stringify(installed)}))`],
      app,
      env,
    );
  }

  /** `npx aeterna start` of a tiny app that prints what Aeterna handed it and exits with code 3. */
  async function startTinyApp(): Promise<SpawnSyncReturns<string>> {
    const port = await freePort();
    const script =
      "console.log('TINY LISTEN_FDS=' + process.env.LISTEN_FDS + ' LISTEN_FDNAMES=' + process.env.LISTEN_FDNAMES + ' GENERATION=' + process.env.AETERNA_GENERATION); process.exit(3)";
    const config = path.join(app, 'aeterna.yaml');
    fs.writeFileSync(
      config,
      [
        'version: "v1"',
        'service:',
        '  name: "tiny"',
        `  command: ${JSON.stringify([process.execPath, '-e', script])}`,
        '  listeners:',
        '    - name: "http"',
        `      address: "tcp://127.0.0.1:${port}"`,
        '  restart: { policy: "never" }',
        'control:',
        `  socket_path: ${JSON.stringify(path.join(app, 'control.sock'))}`,
        '',
      ].join('\n'),
    );
    return run('npx', ['--no', '--', 'aeterna', 'start', '-c', config], app, ENV, 60_000);
  }

  test('installs without compiling: the prebuilt addon is what gets loaded', () => {
    assert.ok(fs.existsSync(path.join(installed, PREBUILD)));
    assert.ok(!fs.existsSync(path.join(installed, 'build')), 'no source build happened');
    assert.equal(ok(addonPath(), 'node-gyp-build'), path.join(installed, PREBUILD));
    assert.ok(!fs.existsSync(path.join(installed, 'test')) && !fs.existsSync(path.join(installed, 'src')));
  });

  test("npx aeterna --version prints package.json's version", () => {
    assert.equal(
      ok(run('npx', ['--no', '--', 'aeterna', '--version'], app), 'npx aeterna --version').trim(),
      PKG.version,
    );
  });

  test('aeterna start runs a tiny app with its socket at fd 3 and exits with its code', async () => {
    const r = await startTinyApp();
    assert.equal(r.status, 3, r.stderr);
    assert.match(r.stdout, /^TINY LISTEN_FDS=1 LISTEN_FDNAMES=http GENERATION=1$/m);
    assert.match(r.stderr, /"msg":"aeterna exiting"/);
  });

  test('the glibc prebuild is never chosen on musl (Alpine then builds from source)', () => {
    const musl = addonPath({ ...ENV, LIBC: 'musl', PREBUILDS_ONLY: '1' });
    assert.notEqual(musl.status, 0);
    assert.match(musl.stderr, /No native build was found for .*libc=musl/);
    assert.equal(
      ok(addonPath({ ...ENV, LIBC: 'glibc', PREBUILDS_ONLY: '1' }), 'glibc'),
      path.join(installed, PREBUILD),
    );
  });

  test('without a matching prebuild, the install script builds the addon from source', async () => {
    fs.rmSync(path.join(installed, 'prebuilds'), { recursive: true, force: true });
    ok(run('npm', ['rebuild', PKG.name, '--foreground-scripts'], app), 'npm rebuild');
    const built = path.join(installed, 'build', 'Release', `${PKG.name}.node`);
    assert.ok(fs.existsSync(built), 'build/Release/aeterna.node');
    assert.equal(ok(addonPath(), 'node-gyp-build'), built);
    const r = await startTinyApp();
    assert.equal(r.status, 3, r.stderr);
    assert.match(r.stdout, /^TINY LISTEN_FDS=1 LISTEN_FDNAMES=http GENERATION=1$/m);
  });
});

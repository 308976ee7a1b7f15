// The Python SDK as a package: `pip install clients/python` into a fresh virtual environment with no package index
// (--no-index: the build backend is in the tree, stdlib only), then the SDK's own tests, copied away from the
// source, import it from site-packages and pass. Its version is Aeterna's, its license Apache-2.0.
import assert from 'node:assert/strict';
import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ROOT, tempDir } from '../helpers/aeterna';

const PKG = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string };
const SDK = path.join(ROOT, 'clients', 'python');

/** Why a fresh venv with pip cannot be made here (python3 missing or too old, or no venv/ensurepip), or null. */
function venvUnavailable(dir: string): string | null {
  const v = spawnSync('python3', ['-c', 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 3)']);
  if (v.error) return `python3 is not available (${v.error.message})`;
  if (v.status !== 0) return 'python3 is older than 3.9';
  const r = spawnSync('python3', ['-m', 'venv', dir], { encoding: 'utf8', timeout: 120_000 });
  if (r.status !== 0) return `python3 -m venv fails here (Debian: apt-get install python3-venv): ${r.stderr.trim()}`;
  return null;
}

describe('the Python SDK package (clients/python)', () => {
  const dir = tempDir('aeterna-pip-');
  const venv = path.join(dir, 'venv');
  const python = path.join(venv, 'bin', 'python');
  let why: string | null = null;
  before(() => {
    why = venvUnavailable(venv);
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  const py = (args: string[], cwd = dir): SpawnSyncReturns<string> =>
    spawnSync(python, args, {
      cwd,
      encoding: 'utf8',
      timeout: 300_000,
      env: { ...process.env, PIP_NO_INDEX: '1', PIP_DISABLE_PIP_VERSION_CHECK: '1', PYTHONNOUSERSITE: '1' },
    });

  test('pip installs it into a fresh venv with no package index', (t) => {
    if (why !== null) return t.skip(why);
    const r = py(['-m', 'pip', 'install', '--no-index', '--no-cache-dir', SDK]);
    assert.equal(r.status, 0, r.stdout + r.stderr);
    const show = py(['-m', 'pip', 'show', 'aeterna-client']);
    assert.equal(show.status, 0, show.stderr);
    assert.match(show.stdout, new RegExp(`^Version: ${PKG.version.replace(/\./g, '\\.')}$`, 'm'));
    assert.match(show.stdout, /^License: Apache-2\.0$/m);
    const where = py([
      '-c',
      'import aeterna_client, sys; print(aeterna_client.__file__); print(aeterna_client.__version__)',
    ]);
    assert.equal(where.status, 0, where.stderr);
    const [file, version] = where.stdout.trim().split('\n');
    assert.ok(file.startsWith(path.join(venv, 'lib')), `imported from ${file}`);
    assert.equal(version, PKG.version);
    // Building it left nothing behind in the source tree.
    assert.deepEqual(
      fs.readdirSync(SDK).filter((f) => /^(build|dist)$|\.egg-info$/.test(f)),
      [],
    );
  });

  test("the SDK's tests pass against the installed package, away from its source", (t) => {
    if (why !== null) return t.skip(why);
    // Laid out as in the repo (test_conformance.py reads ../../test/conformance), without aeterna_client.py.
    const tests = path.join(dir, 'copy', 'clients', 'python');
    fs.mkdirSync(tests, { recursive: true });
    for (const f of fs.readdirSync(SDK).filter((f) => /^test_.*\.py$/.test(f)))
      fs.copyFileSync(path.join(SDK, f), path.join(tests, f));
    fs.cpSync(path.join(ROOT, 'test', 'conformance'), path.join(dir, 'copy', 'test', 'conformance'), {
      recursive: true,
    });
    assert.ok(!fs.existsSync(path.join(tests, 'aeterna_client.py')));
    const r = py(['-m', 'unittest', '-v'], tests);
    assert.equal(r.status, 0, r.stdout + r.stderr);
    assert.match(r.stderr, /^Ran \d+ tests? in/m);
    assert.match(r.stderr, /^OK/m);
    assert.match(r.stderr, /test_conformance/);
  });

  test('a wheel and an sdist build offline, and the wheel says its license', (t) => {
    if (why !== null) return t.skip(why);
    const out = path.join(dir, 'wheels');
    const r = py(['-m', 'pip', 'wheel', '--no-index', '--no-deps', '--no-cache-dir', '-w', out, SDK]);
    assert.equal(r.status, 0, r.stdout + r.stderr);
    const wheel = `aeterna_client-${PKG.version}-py3-none-any.whl`;
    assert.deepEqual(fs.readdirSync(out), [wheel]);
    const list = py([
      '-c',
      `import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); print("\\n".join(sorted(z.namelist())))`,
      path.join(out, wheel),
    ]);
    assert.equal(list.status, 0, list.stderr);
    const info = `aeterna_client-${PKG.version}.dist-info`;
    assert.deepEqual(list.stdout.trim().split('\n'), [
      `${info}/METADATA`,
      `${info}/RECORD`,
      `${info}/WHEEL`,
      `${info}/licenses/LICENSE`,
      'aeterna_client.py',
    ]);
    const sdist = py(
      [
        '-c',
        'import sys; sys.path.insert(0, "build_backend"); import aeterna_build; print(aeterna_build.build_sdist(sys.argv[1]))',
        out,
      ],
      SDK,
    );
    assert.equal(sdist.status, 0, sdist.stderr);
    assert.equal(sdist.stdout.trim(), `aeterna_client-${PKG.version}.tar.gz`);
  });

  test("pyproject.toml's and the module's version are Aeterna's; the license is the repo's", () => {
    const pyproject = fs.readFileSync(path.join(SDK, 'pyproject.toml'), 'utf8');
    assert.match(pyproject, new RegExp(`^version = "${PKG.version.replace(/\./g, '\\.')}"$`, 'm'));
    assert.match(pyproject, /^license = "Apache-2\.0"$/m);
    assert.match(
      fs.readFileSync(path.join(SDK, 'aeterna_client.py'), 'utf8'),
      new RegExp(`^__version__ = "${PKG.version.replace(/\./g, '\\.')}"$`, 'm'),
    );
    assert.equal(
      fs.readFileSync(path.join(SDK, 'LICENSE'), 'utf8'),
      fs.readFileSync(path.join(ROOT, 'LICENSE'), 'utf8'),
    );
  });
});

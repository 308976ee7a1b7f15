// The self-contained Aeterna (`make standalone`: build/standalone/aeterna) runs where there is no Node: PID 1 of a
// fresh PID namespace with PATH holding python3 alone, it runs examples/python-counter, a reload is promoted with
// the count relayed, `aeterna upgrade` re-executes it in place, and it stops with the app's exit code. Its addon is
// inside and written to a private directory only; it links nothing beyond glibc and libstdc++.
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { AeternaRun, ROOT, freePort, pidNamespaceUnavailable, tempDir } from '../helpers/aeterna';
import { onlyOnPath, python3, standalone, which } from '../helpers/standalone';
import { getJson } from '../helpers/load';

/** The shared libraries a glibc system has in every image with a package manager (apt and dnf need libstdc++). */
const BASE_LIBRARIES = /^(linux-vdso|libdl|libstdc\+\+|libm|libgcc_s|libpthread|libc|ld-linux-[\w-]+)\.so/;

/** The example app's JSON answer to GET /. */
const get = (port: number): Promise<{ count: number; pid: number; generation: string }> =>
  getJson<{ count: number; pid: number; generation: string }>(port);

describe('the self-contained aeterna', () => {
  let exe = '';
  before(() => {
    exe = standalone();
  });

  test('links only glibc, libstdc++ and libgcc: nothing from Node or npm', () => {
    const r = spawnSync('ldd', [exe], { encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    const libraries = r.stdout
      .split('\n')
      .map((l) => l.trim().split(/\s+/)[0])
      .filter((l) => l !== '')
      .map((l) => path.basename(l));
    assert.ok(libraries.includes('libc.so.6'), r.stdout);
    assert.deepEqual(
      libraries.filter((l) => !BASE_LIBRARIES.test(l)),
      [],
    );
  });

  test('--version, --help and validate run with an empty PATH', () => {
    const { version } = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string };
    const env = { PATH: '/nonexistent' };
    const v = spawnSync(exe, ['--version'], { env, encoding: 'utf8' });
    assert.equal(v.status, 0, v.stderr);
    assert.equal(v.stdout.trim(), version);
    const h = spawnSync(exe, ['--help'], { env, encoding: 'utf8' });
    assert.equal(h.status, 0, h.stderr);
    assert.match(h.stdout, /^Usage: aeterna/m);
    const c = spawnSync(exe, ['validate', '-c', path.join(ROOT, 'examples', 'python-counter', 'aeterna.yaml')], {
      env,
      encoding: 'utf8',
    });
    assert.equal(c.status, 0, c.stderr);
  });

  describe('runs python-counter as PID 1 with no node on PATH', () => {
    const dir = tempDir('aeterna-standalone-');
    const addonDir = path.join(dir, 'addon');
    let run: AeternaRun | undefined;
    let port = 0;
    let env: NodeJS.ProcessEnv = {};
    let config = '';
    after(async () => {
      await run?.killAll();
      fs.rmSync(dir, { recursive: true, force: true });
    });

    const cli = (...args: string[]): { status: number | null; stdout: string; stderr: string } => {
      const r = spawnSync(exe, [...args, '-c', config], { env, encoding: 'utf8', timeout: 120_000 });
      return { status: r.status, stdout: r.stdout, stderr: r.stderr };
    };

    async function until<T>(what: string, probe: () => Promise<T>, timeoutMs = 60_000): Promise<T> {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        try {
          return await probe();
        } catch (err) {
          if (Date.now() > deadline) throw new Error(`${what}: ${(err as Error).message}\n${run?.stderr ?? ''}`);
        }
        await new Promise((r) => setTimeout(r, 100));
      }
    }

    test('a reload is promoted and the count relayed; upgrade re-executes it in place; stop exits 0', async (t) => {
      const why = pidNamespaceUnavailable();
      const python = python3();
      if (why !== null || python === null) {
        t.skip(why ?? 'python3 is not installed');
        return;
      }
      // The app and the SDK it imports, laid out as in the repo (counter.py finds ../../clients/python).
      fs.cpSync(path.join(ROOT, 'examples', 'python-counter'), path.join(dir, 'examples', 'python-counter'), {
        recursive: true,
      });
      fs.cpSync(path.join(ROOT, 'clients', 'python'), path.join(dir, 'clients', 'python'), { recursive: true });
      port = await freePort();
      config = path.join(dir, 'examples', 'python-counter', 'aeterna.yaml');
      const original = fs.readFileSync(config, 'utf8');
      fs.writeFileSync(
        config,
        original
          .replace('tcp://127.0.0.1:8082', `tcp://127.0.0.1:${port}`)
          .replace(/\/tmp\/aeterna-python-counter-state\.sock/, path.join(dir, 'state.sock'))
          .replace(/\/tmp\/aeterna-python-counter\.sock/, path.join(dir, 'control.sock')),
      );
      const bin = onlyOnPath(dir, { python3: python });
      env = { PATH: bin, AETERNA_ADDON_DIR: addonDir, PYTHONUNBUFFERED: '1' };
      assert.deepEqual(fs.readdirSync(bin), ['python3']);
      assert.notEqual(
        spawnSync('/bin/sh', ['-c', 'command -v node'], { env: { PATH: bin } }).status,
        0,
        'node on PATH',
      );

      const unshare = which('unshare');
      assert.ok(unshare, 'unshare');
      const child = spawn(unshare, ['--pid', '--fork', '--mount-proc', exe, 'start', '-c', config], {
        env,
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      run = new AeternaRun(child, true);
      const first = await until('the counter answers', () => get(port));
      assert.equal(first.count, 1);
      assert.equal(first.generation, '1');

      const reload = cli('reload');
      assert.equal(reload.status, 0, `${reload.stdout}\n${reload.stderr}`);
      assert.match(reload.stdout, /promoted/);
      await run.waitFor(/SHUTDOWN \d+ count=1 handed_over=True/, 60_000);
      const second = await get(port);
      assert.equal(second.generation, '2');
      assert.equal(second.count, 2, 'the count was relayed to generation 2');

      const upgrade = cli('upgrade');
      assert.equal(upgrade.status, 0, `${upgrade.stdout}\n${upgrade.stderr}`);
      assert.match(upgrade.stdout, /generation 2 kept/);
      const third = await get(port);
      assert.equal(third.pid, second.pid, 'the app was not restarted by the upgrade');
      assert.equal(third.count, 3);

      // The addon went to the private directory only: one file, the directory 0700.
      assert.equal(fs.statSync(addonDir).mode & 0o777, 0o700);
      assert.deepEqual(
        fs.readdirSync(addonDir).filter((f) => !/^aeterna-[0-9a-f]{32}\.node$/.test(f)),
        [],
      );
      assert.equal(fs.readdirSync(addonDir).length, 1);

      const stop = cli('stop');
      assert.equal(stop.status, 0, stop.stderr);
      assert.deepEqual(await run.exit(60_000), { code: 0, signal: null });
    });
  });

  test('refuses an addon directory that others can write, with E_ADDON_UNAVAILABLE and the fix', () => {
    const dir = tempDir('aeterna-standalone-open-');
    try {
      const open = path.join(dir, 'open');
      fs.mkdirSync(open);
      fs.chmodSync(open, 0o777);
      const config = path.join(dir, 'aeterna.yaml');
      fs.writeFileSync(
        config,
        `version: "v1"\nservice:\n  name: "x"\n  command: ["true"]\ncontrol:\n  socket_path: "${path.join(dir, 'c.sock')}"\n`,
      );
      const r = spawnSync(exe, ['start', '-c', config], {
        env: { PATH: '/nonexistent', AETERNA_ADDON_DIR: open },
        encoding: 'utf8',
        timeout: 60_000,
      });
      assert.equal(r.status, 69, r.stderr);
      assert.match(r.stderr, /is not a private directory/);
      assert.match(r.stderr, /AETERNA_ADDON_DIR/);
      assert.match(r.stderr, /\(E_ADDON_UNAVAILABLE\)/);
      assert.deepEqual(fs.readdirSync(open), [], 'nothing was written there');
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

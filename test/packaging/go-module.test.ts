// The Go SDK as a module an app outside this repository uses, the way clients/go/README.md says: the module copied
// into the app's tree, `go mod edit -require -replace` pointing at it, then `go build` with no network
// (GOPROXY=off), and `go mod vendor` + `go build -mod=vendor`; the module's own tests pass from the copy. The app is
// a copy of examples/go-counter without its in-repo replace.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { ROOT, tempDir } from '../helpers/aeterna';

function goUnavailable(): string | null {
  const r = spawnSync('go', ['version'], { encoding: 'utf8' });
  return r.error ? `go is not installed (${r.error.message}); Debian 12's golang-go is enough` : null;
}

describe('the Go module aeterna.dev/client, used offline from a copy', { skip: goUnavailable() ?? false }, () => {
  const dir = tempDir('aeterna-go-module-');
  const app = path.join(dir, 'app');
  const sdk = path.join(app, 'third_party', 'aeterna-client');
  // Offline, and with caches of its own so that nothing already downloaded or built on this machine helps.
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    GOPROXY: 'off',
    GOFLAGS: '',
    GOPATH: path.join(dir, 'gopath'),
    GOCACHE: path.join(dir, 'gocache'),
    GOWORK: 'off',
  };
  after(() => {
    // The module cache is read-only by design: make it removable first.
    spawnSync('chmod', ['-R', 'u+w', dir]);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const go = (cwd: string, ...args: string[]): string => {
    const r = spawnSync('go', args, { cwd, env, encoding: 'utf8', timeout: 300_000 });
    assert.equal(r.status, 0, `go ${args.join(' ')} (in ${cwd}):\n${r.stdout}${r.stderr}`);
    return r.stdout;
  };

  test('go-counter builds against the copied module with a replace, with no network', () => {
    fs.mkdirSync(app, { recursive: true });
    for (const f of ['main.go', 'go.mod'])
      fs.copyFileSync(path.join(ROOT, 'examples', 'go-counter', f), path.join(app, f));
    go(app, 'mod', 'edit', '-dropreplace=aeterna.dev/client');
    fs.cpSync(path.join(ROOT, 'clients', 'go'), sdk, { recursive: true });
    go(
      app,
      'mod',
      'edit',
      '-require=aeterna.dev/client@v0.1.0',
      '-replace=aeterna.dev/client=./third_party/aeterna-client',
    );
    go(app, 'build', '-o', 'go-counter', '.');
    assert.ok(fs.statSync(path.join(app, 'go-counter')).mode & 0o100, 'an executable');
  });

  test('go mod vendor, then go build -mod=vendor', () => {
    go(app, 'mod', 'vendor');
    assert.ok(fs.existsSync(path.join(app, 'vendor', 'aeterna.dev', 'client', 'relay.go')));
    fs.rmSync(path.join(app, 'go-counter'));
    go(app, 'build', '-mod=vendor', '-o', 'go-counter', '.');
    assert.ok(fs.existsSync(path.join(app, 'go-counter')));
  });

  test("the module's own tests pass from the copy (conformance suite included)", () => {
    const out = spawnSync('go', ['test', '-count=1', '-v', './...'], {
      cwd: sdk,
      env: { ...env, AETERNA_CONFORMANCE_DIR: path.join(ROOT, 'test', 'conformance') },
      encoding: 'utf8',
      timeout: 300_000,
    });
    assert.equal(out.status, 0, out.stdout + out.stderr);
    assert.match(out.stdout, /^ok\s+aeterna\.dev\/client/m);
    assert.match(out.stdout, /--- PASS: TestConformanceExchanges/);
  });

  test("its version and license are Aeterna's", () => {
    const { version } = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string };
    assert.match(
      fs.readFileSync(path.join(ROOT, 'examples', 'go-counter', 'go.mod'), 'utf8'),
      new RegExp(`require aeterna\\.dev/client v${version.replace(/\./g, '\\.')}\\b`),
    );
    assert.equal(
      fs.readFileSync(path.join(ROOT, 'clients', 'go', 'LICENSE'), 'utf8'),
      fs.readFileSync(path.join(ROOT, 'LICENSE'), 'utf8'),
    );
  });
});

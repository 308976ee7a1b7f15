// Reloads on file change (orchestration.watch), end to end: a real daemon, real files changed the ways operators
// and Kubernetes change them, real inotify. Counts are asserted (reload ids, generations, triggers), never timings:
// "once" is checked with a barrier reload from the CLI, whose id says how many reloads came before it.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fixture, freePort } from '../../helpers/aeterna';
import { Daemon, configYaml, type ConfigOptions } from '../../helpers/daemon';
import { getJson } from '../../helpers/load';
import { FileWatch } from '../../../src/orchestrator/file-watch';
import { createLogger } from '../../../src/log';
import { tempDir } from '../../helpers/aeterna';

const APP = [process.execPath, fixture('apps', 'reload_app.js')];
const daemons: Daemon[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
});

/** A running daemon; `prepare` lays out its directory before it starts. */
async function started(
  options: ConfigOptions,
  prepare: (d: Daemon) => void = () => undefined,
  pid1 = false,
): Promise<Daemon> {
  const d = new Daemon(options);
  prepare(d);
  d.start(pid1);
  daemons.push(d);
  await d.waitStatus((s) => s.state === 'Running');
  return d;
}

/** A file the daemon watches, beside its config. */
function watched(d: Daemon, name = 'app.conf'): string {
  const file = path.join(d.dir, name);
  fs.writeFileSync(file, 'v1\n');
  return file;
}

/** Reload records logged with their outcome, by trigger. */
function settledReloads(d: Daemon, trigger: string): Array<{ reload: string; outcome: string }> {
  return d.run.logs().filter((l) => l['trigger'] === trigger && typeof l['outcome'] === 'string') as unknown as Array<{
    reload: string;
    outcome: string;
  }>;
}

/** A reload from the CLI after everything else: its id counts the reloads before it. */
async function barrierReload(d: Daemon): Promise<string> {
  const r = await d.cli('reload');
  assert.equal(r.code, 0, r.stderr);
  const s = await d.status();
  assert.equal(s.last_reload?.trigger, 'control');
  return s.last_reload.id;
}

describe('orchestration.watch', { timeout: 120000 }, () => {
  it('writing a watched file reloads once, with trigger "watch"', async () => {
    const port = await freePort();
    let file = '';
    const d = await started(
      { command: APP, port, watch: '{ paths: ["app.conf"], debounce: "100ms" }' },
      (dd) => (file = watched(dd)),
    );
    fs.writeFileSync(file, 'v2\n');
    const s = await d.waitStatus((st) => st.last_reload?.outcome === 'promoted');
    assert.equal(s.last_reload?.id, 'reload-1');
    assert.equal(s.last_reload?.trigger, 'watch');
    assert.equal(s.generation, 2);
    assert.equal(await barrierReload(d), 'reload-2', 'no second reload came from the one write');
    assert.equal(await d.stopServing(), 0);
    assert.deepEqual(
      settledReloads(d, 'watch').map((r) => [r.reload, r.outcome]),
      [['reload-1', 'promoted']],
    );
  });

  it('changes that never pause for the debounce still reload (after ten debounces, 5 s at least), while they go on', async () => {
    const port = await freePort();
    let file = '';
    const d = await started(
      { command: APP, port, watch: '{ paths: ["app.conf"], debounce: "1s" }' },
      (dd) => (file = watched(dd)),
    );
    // A write every 50 ms never leaves a second of quiet: without a bound on the wait, no reload would start.
    let reloadedWhileWriting = false;
    for (let i = 0; i < 300 && !reloadedWhileWriting; i++) {
      fs.writeFileSync(file, `v${i}\n`);
      await new Promise((r) => setTimeout(r, 50));
      if (i % 10 === 9) reloadedWhileWriting = (await d.status()).last_reload?.trigger === 'watch';
    }
    assert.ok(reloadedWhileWriting, 'a reload started while the writes went on');
    await d.stop();
  });

  it('a burst of 20 writes (and renames over the file) within the debounce reloads once', async () => {
    const port = await freePort();
    let file = '';
    const d = await started(
      { command: APP, port, watch: '{ paths: ["app.conf"], debounce: "1s" }' },
      (dd) => (file = watched(dd)),
    );
    for (let i = 0; i < 20; i++) {
      if (i % 2 === 0) {
        fs.writeFileSync(file, `v${i}\n`);
      } else {
        fs.writeFileSync(`${file}.tmp`, `v${i}\n`);
        fs.renameSync(`${file}.tmp`, file); // the atomic save of editors and config tools
      }
    }
    const s = await d.waitStatus((st) => st.last_reload?.outcome === 'promoted');
    assert.equal(s.last_reload?.id, 'reload-1');
    assert.equal(s.generation, 2);
    assert.equal(await barrierReload(d), 'reload-2', 'the burst made one reload');
    assert.equal(await d.stopServing(), 0);
    assert.equal(settledReloads(d, 'watch').length, 1);
  });

  it('the ConfigMap-style ..data symlink swap of the watched config reloads, and the new generation runs the new config', async () => {
    const port = await freePort();
    const options: ConfigOptions = {
      command: APP,
      port,
      env: ['VERSION=one'],
      watch: '{ paths: ["aeterna.yaml"], debounce: "100ms" }',
    };
    // The kubelet's layout: aeterna.yaml -> ..data/aeterna.yaml, ..data -> ..<timestamp> (a directory).
    const project = (d: Daemon, stamp: string, o: ConfigOptions): void => {
      fs.mkdirSync(path.join(d.dir, stamp));
      fs.writeFileSync(path.join(d.dir, stamp, 'aeterna.yaml'), configYaml(d.dir, o));
    };
    const d = await started(options, (dd) => {
      fs.rmSync(dd.configFile);
      project(dd, '..2024_01_01_00_00_00.1', options);
      fs.symlinkSync('..2024_01_01_00_00_00.1', path.join(dd.dir, '..data'));
      fs.symlinkSync('..data/aeterna.yaml', dd.configFile);
    });
    assert.equal((await getJson<{ version: string }>(port)).version, 'one');

    // The update: a new timestamped directory, ..data_tmp pointed at it, renamed over ..data.
    project(d, '..2024_01_01_00_01_00.2', { ...options, env: ['VERSION=two'] });
    fs.symlinkSync('..2024_01_01_00_01_00.2', path.join(d.dir, '..data_tmp'));
    fs.renameSync(path.join(d.dir, '..data_tmp'), path.join(d.dir, '..data'));
    // (The kubelet then removes the old directory; it stays here, so the swap alone must be seen.)

    const s = await d.waitStatus((st) => st.last_reload?.outcome === 'promoted');
    assert.equal(s.last_reload?.trigger, 'watch');
    assert.equal(s.generation, 2);
    assert.equal((await getJson<{ version: string }>(port)).version, 'two');
    assert.equal(await barrierReload(d), 'reload-2');
    assert.equal(await d.stopServing(), 0);
  });

  it('changes during a reload queue exactly one more reload: not dropped, not one per change', async () => {
    const port = await freePort();
    // A canary reload soaks until `aeterna promote`: the reload is in progress for as long as the test needs.
    const options: ConfigOptions = {
      command: APP,
      port,
      strategy: 'canary',
      soak: '1h',
      watch: '{ paths: ["app.conf"], debounce: "50ms" }',
    };
    let file = '';
    const d = await started(options, (dd) => (file = watched(dd)));
    const operator = d.cli('reload');
    await d.waitStatus((s) => s.state === 'Soaking');
    // Three separate bursts, each settled (logged) before the next: three reload requests while reload-1 runs.
    for (let burst = 1; burst <= 3; burst++) {
      fs.writeFileSync(file, `burst ${burst}\n`);
      await d.run.waitFor(
        new RegExp(`(watched change \\(${file.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}\\): reloading[^]*){${burst}}`),
      );
    }
    assert.equal(d.run.logs().filter((l) => /one more reload queued/.test(l.msg)).length, 1);
    d.write({ ...options, strategy: 'immediate' }); // the queued reload reads this (aeterna.yaml is not watched)
    assert.equal((await d.cli('promote')).code, 0);
    assert.equal((await operator).code, 0);
    const s = await d.waitStatus((st) => st.last_reload?.id === 'reload-2' && st.last_reload.outcome === 'promoted');
    assert.equal(s.last_reload?.trigger, 'watch');
    assert.equal(s.generation, 3);
    assert.equal(await barrierReload(d), 'reload-3', 'exactly one reload was queued');
    assert.equal(await d.stopServing(), 0);
    assert.deepEqual(
      settledReloads(d, 'watch').map((r) => r.reload),
      ['reload-2'],
    );
  });

  it('a watched config that is invalid fails the reload with E_CONFIG_INVALID and its line:col; the serving generation stays', async () => {
    const port = await freePort();
    const options: ConfigOptions = { command: APP, port, watch: '{ paths: ["aeterna.yaml"], debounce: "100ms" }' };
    const d = await started(options);
    const before = await d.status();
    const text = fs.readFileSync(d.configFile, 'utf8');
    const line = text.split('\n').findIndex((l) => l.includes('strategy:')) + 1;
    fs.writeFileSync(d.configFile, text.replace('strategy: "immediate"', 'strategy: "canry"'));
    const s = await d.waitStatus((st) => st.last_reload?.outcome === 'failed');
    assert.equal(s.last_reload?.trigger, 'watch');
    assert.equal(s.last_reload?.code, 'E_CONFIG_INVALID');
    assert.match(
      s.last_reload?.reason ?? '',
      new RegExp(`aeterna\\.yaml:${line}:\\d+ orchestration\\.strategy: must be one of immediate, canary`),
    );
    assert.equal(s.generation, before.generation);
    assert.equal(s.pid, before.pid, 'the serving generation is untouched');
    const logged = d.run.logs().find((l) => l['code'] === 'E_CONFIG_INVALID' && l['trigger'] === 'watch');
    assert.match(logged?.msg ?? '', /watch reload failed/);
    assert.match(String(logged?.['reason']), new RegExp(`:${line}:\\d+ `));
    // Still watching: the fixed file reloads.
    fs.writeFileSync(d.configFile, text);
    const fixed = await d.waitStatus((st) => st.last_reload?.outcome === 'promoted');
    assert.equal(fixed.last_reload?.id, 'reload-2');
    assert.equal(fixed.generation, before.generation + 1);
    assert.equal(await d.stopServing(), 0);
  });

  it('a watched path that does not exist is logged and watched for: its creation reloads', async () => {
    const port = await freePort();
    const d = await started({ command: APP, port, watch: '{ paths: ["later/app.conf"], debounce: "100ms" }' });
    await d.run.waitFor(/watched path \S+later\/app\.conf does not exist/);
    fs.mkdirSync(path.join(d.dir, 'later'));
    fs.writeFileSync(path.join(d.dir, 'later', 'app.conf'), 'v1\n');
    const s = await d.waitStatus((st) => st.last_reload?.outcome === 'promoted');
    assert.equal(s.last_reload?.trigger, 'watch');
    assert.equal(s.generation, 2);
    await d.run.waitFor(/watched path \S+later\/app\.conf appeared/);
    assert.equal(await d.stopServing(), 0);
  });

  it('as PID 1, a stop with a change pending closes every watch and timer: Aeterna exits 0 without reloading', async () => {
    const port = await freePort();
    let file = '';
    const d = await started(
      { command: APP, port, watch: '{ paths: ["app.conf", "."], debounce: "1h" }' },
      (dd) => (file = watched(dd)),
      true,
    );
    await d.run.waitFor(/watching 2 path\(s\) for changes/);
    fs.writeFileSync(file, 'v2\n'); // its reload waits an hour of quiet: the timer is pending at stop
    await d.run.signal('SIGTERM');
    // A watch or timer left open would keep PID 1's event loop alive: the hang guard would kill it (code null).
    const exit = await d.run.exit(15000);
    assert.deepEqual(exit, { code: 0, signal: null });
    assert.equal(
      d.run.logs().filter((l) => typeof l['reload'] === 'string' && /reload-/.test(String(l['reload']))).length,
      0,
      'no reload ran',
    );
  });
});

describe('FileWatch ownership', () => {
  /** This process's open handles by type (FSEventWrap: an inotify watch; Timeout: a timer), once closes have run. */
  async function handles(): Promise<Record<string, number>> {
    await new Promise((r) => setImmediate(() => setImmediate(r)));
    const counts: Record<string, number> = {};
    for (const kind of process.getActiveResourcesInfo()) counts[kind] = (counts[kind] ?? 0) + 1;
    return counts;
  }

  it('close() with a change pending ends every inotify watch and timer it opened, and no reload starts', async () => {
    const dir = tempDir('aeterna-watch-');
    const file = path.join(dir, 'app.conf');
    fs.writeFileSync(file, 'v1\n');
    fs.mkdirSync(path.join(dir, 'code'));
    const before = await handles();
    let reloads = 0;
    const watch = new FileWatch(() => void reloads++, createLogger('silent'));
    watch.apply({ paths: [file, path.join(dir, 'code'), path.join(dir, 'missing', 'x')], debounceMs: 3_600_000 });
    fs.writeFileSync(file, 'v2\n');
    // Wait for the event to arm the debounce timer: one more Timeout than before.
    for (let i = 0; i < 200 && ((await handles())['Timeout'] ?? 0) <= (before['Timeout'] ?? 0); i++)
      await new Promise((r) => setTimeout(r, 10));
    const during = await handles();
    assert.equal(
      during['FSEventWrap'] ?? 0,
      (before['FSEventWrap'] ?? 0) + 2,
      `one watch per directory (dir, code) open: ${JSON.stringify(during)}`,
    );
    assert.equal(during['Timeout'], (before['Timeout'] ?? 0) + 1, 'the debounce timer is pending');
    watch.close();
    assert.deepEqual(await handles(), before);
    assert.equal(reloads, 0);
    watch.apply({ paths: [file], debounceMs: 10 }); // closed for good: a late settle opens nothing
    assert.deepEqual(await handles(), before);
  });
});

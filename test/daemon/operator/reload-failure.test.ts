// Why a reload failed: the record (`reload --json`, `status --json`) and the CLI's failure line carry how the new
// generation ended and the last lines it wrote to stderr.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { fixture, freePort } from '../../helpers/aeterna';
import { Daemon } from '../../helpers/daemon';
import type { ReloadRecord } from '../../../src/orchestrator/types';

const APP = [process.execPath, fixture('apps', 'reload_app.js')];
/** A new version that cannot start: node prints "Error: Cannot find module 'x'" (and its stack) and exits 1. */
const BROKEN = [process.execPath, '-e', "require('x')"];
const daemons: Daemon[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
});

async function daemonWith(appOutput: string | null): Promise<Daemon> {
  const d = new Daemon({ command: APP, port: await freePort() });
  if (appOutput !== null) fs.appendFileSync(d.configFile, `  app_output: "${appOutput}"\n`);
  d.start();
  daemons.push(d);
  await d.waitStatus((s) => s.state === 'Running', 60000);
  // The next reload reads a config whose command fails at once, long before its readiness delay is over.
  const text = fs
    .readFileSync(d.configFile, 'utf8')
    .replace(JSON.stringify(APP), JSON.stringify(BROKEN))
    .replace('delay: "200ms", timeout: "10s"', 'delay: "120s", timeout: "150s"');
  fs.writeFileSync(d.configFile, text);
  return d;
}

/** The record of `reload --json` (its last line). */
function lastRecord(stdout: string): ReloadRecord {
  const lines = stdout.trim().split('\n');
  return JSON.parse(lines[lines.length - 1]) as ReloadRecord;
}

describe('why a reload failed', { timeout: 180000 }, () => {
  it("a reload whose app prints `Cannot find module 'x'` and exits 1 shows that line and the exit code", async () => {
    const d = await daemonWith('prefixed');
    const text = await d.cli('reload');
    assert.equal(text.code, 1, text.stderr);
    assert.match(text.stderr, /rolled back .*exited with code 1 before becoming ready/);
    assert.match(text.stderr, /generation 2's last stderr lines:/);
    assert.match(text.stderr, /\n {2}\| Error: Cannot find module 'x'\n/);

    const json = await d.cli('reload', '--json');
    assert.equal(json.code, 1, json.stderr);
    const record = lastRecord(json.stdout);
    assert.equal(record.outcome, 'rolled_back');
    assert.deepEqual(record.exit, { code: 1, signal: null });
    assert.ok(record.stderr_tail!.includes("Error: Cannot find module 'x'"), JSON.stringify(record.stderr_tail));
    assert.ok(record.stderr_tail!.length <= 20);

    const status = JSON.parse((await d.cli('status', '--json')).stdout) as { last_reload: ReloadRecord };
    assert.deepEqual(status.last_reload.stderr_tail, record.stderr_tail);
    assert.deepEqual(status.last_reload.exit, { code: 1, signal: null });
    // The serving generation was never touched.
    assert.equal((await d.status()).generation, 1);
  });

  it('in raw mode the record still says how the generation ended, and where its stderr went', async () => {
    const d = await daemonWith(null);
    const json = await d.cli('reload', '--json');
    const record = lastRecord(json.stdout);
    assert.deepEqual(record.exit, { code: 1, signal: null });
    assert.equal(record.stderr_tail, null);
    const text = await d.cli('reload');
    assert.match(text.stderr, /its stderr went straight to Aeterna's/);
    // The app's own stderr is Aeterna's, as it always was.
    await d.run.waitFor(/Cannot find module 'x'/);
  });
});

// The Java SDK as a jar: `make java-sdk` builds build/java/aeterna-client.jar (its version and license inside); the
// SDK's conformance runner passes against the jar alone, and examples/java-hello, compiled and run with only the
// jar on its classpath, serves under Aeterna and keeps its count of served requests across a reload.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { ROOT, freePort, pidNamespaceUnavailable, tempDir } from '../helpers/aeterna';
import { Daemon } from '../helpers/daemon';
import { getJson } from '../helpers/load';

const PKG = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string };
const JAR = path.join(ROOT, 'build', 'java', 'aeterna-client.jar');

function jdkUnavailable(): string | null {
  for (const tool of ['javac', 'jar', 'java']) {
    const r = spawnSync(tool, ['--version'], { encoding: 'utf8' });
    if (r.error) return `${tool} is not available (${r.error.message}); install a JDK 17+ (default-jdk-headless)`;
  }
  return null;
}

/** The example app's JSON answer to GET /. */
const get = (port: number): Promise<{ pid: number; generation: string; served: number }> =>
  getJson<{ pid: number; generation: string; served: number }>(port);

describe('the Java SDK jar (make java-sdk)', { skip: jdkUnavailable() ?? false, timeout: 300_000 }, () => {
  const dir = tempDir('aeterna-jar-');
  const daemons: Daemon[] = [];
  after(async () => {
    for (const d of daemons) await d.run.killAll();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const javac = (out: string, ...sources: string[]): void => {
    const r = spawnSync('javac', ['-Xlint:all', '-Werror', '-cp', JAR, '-d', out, ...sources], { encoding: 'utf8' });
    assert.equal(r.status, 0, `javac:\n${r.stdout}${r.stderr}`);
  };

  test('builds the jar with the SDK, its version and the license', () => {
    const r = spawnSync('make', ['-s', 'java-sdk'], { cwd: ROOT, encoding: 'utf8', timeout: 180_000 });
    assert.equal(r.status, 0, r.stdout + r.stderr);
    const list = spawnSync('jar', ['--list', '--file', JAR], { encoding: 'utf8' });
    assert.equal(list.status, 0, list.stderr);
    const entries = list.stdout.trim().split('\n');
    assert.ok(entries.includes('dev/aeterna/Aeterna.class'), list.stdout);
    assert.ok(entries.includes('dev/aeterna/Aeterna$Relay.class'), list.stdout);
    assert.ok(entries.includes('META-INF/LICENSE'), list.stdout);
    assert.deepEqual(
      entries.filter((e) => e.endsWith('.java') || /Test/.test(e)),
      [],
      'sources and tests stay out',
    );
    const manifest = spawnSync('unzip', ['-p', JAR, 'META-INF/MANIFEST.MF'], { encoding: 'utf8' });
    if (!manifest.error) {
      assert.match(
        manifest.stdout,
        new RegExp(`^Implementation-Version: ${PKG.version.replace(/\./g, '\\.')}\\r?$`, 'm'),
      );
      assert.match(manifest.stdout, /^Automatic-Module-Name: dev\.aeterna\r?$/m);
    }
    const license = spawnSync('unzip', ['-p', JAR, 'META-INF/LICENSE'], { encoding: 'utf8' });
    if (!license.error) assert.equal(license.stdout, fs.readFileSync(path.join(ROOT, 'LICENSE'), 'utf8'));
  });

  test('the conformance runner passes against the jar alone', () => {
    const out = path.join(dir, 'conformance');
    javac(out, path.join(ROOT, 'clients', 'java', 'ConformanceTest.java'));
    assert.ok(!fs.existsSync(path.join(out, 'dev', 'aeterna', 'Aeterna.class')), 'the SDK comes from the jar');
    const r = spawnSync(
      'java',
      ['-cp', `${out}:${JAR}`, 'dev.aeterna.ConformanceTest', path.join(ROOT, 'test', 'conformance')],
      { encoding: 'utf8', timeout: 120_000 },
    );
    assert.equal(r.status, 0, r.stdout + r.stderr);
  });

  test('examples/java-hello on the jar: serves under Aeterna and keeps its served count across a reload', async (t) => {
    const why = pidNamespaceUnavailable();
    if (why !== null) return t.skip(why);
    const out = path.join(dir, 'hello');
    javac(out, path.join(ROOT, 'examples', 'java-hello', 'Hello.java'));
    const port = await freePort();
    const d = new Daemon({
      command: ['java', '-cp', `${out}:${JAR}`, 'Hello'],
      port,
      extraService: '  stdin_listener: "http"\n',
      readiness: '{ mode: "delay", delay: "2s", timeout: "60s" }',
      stopTimeout: '15s',
      handoff: true,
    }).start(true);
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Running', 60_000);
    const first = await get(port);
    const second = await get(port);
    assert.equal(second.served, first.served + 1);
    const r = await d.cli('reload');
    assert.equal(r.code, 0, r.stderr);
    await d.untilRetired();
    const third = await get(port);
    assert.equal(third.generation, '2');
    assert.notEqual(third.pid, second.pid);
    assert.equal(third.served, second.served + 1, 'the count went on in generation 2');
    assert.equal(await d.stop(), 0);
  });
});

// observability.app_output: the app's stdout and stderr read by Aeterna and written out again whole, line by line,
// prefixed or as JSON records, beside Aeterna's own log lines on the same pipe. The app writes each line in many
// small writes from two processes at once (one per stream), while two generations run side by side (a canary soak)
// and Aeterna logs its own lines.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { fixture, freePort, pidNamespaceUnavailable, processMemory, runAeterna } from '../../helpers/aeterna';
import { Daemon } from '../../helpers/daemon';
import { MAX_LINE_BYTES } from '../../../src/monitor/app-output';

const COUNT = 30;
const daemons: Daemon[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
});

/** A daemon whose stdout and stderr are one pipe (as a container runtime's log often is), running line_writer.js. */
async function start(mode: 'prefixed' | 'json', maxLine: number): Promise<Daemon> {
  const d = new Daemon({
    command: [process.execPath, fixture('apps', 'line_writer.js'), String(COUNT), String(maxLine)],
    port: await freePort(),
    strategy: 'canary',
    soak: '300s',
  });
  fs.appendFileSync(d.configFile, `  app_output: "${mode}"\n`);
  d.run = runAeterna(['start', '-c', d.configFile], { pid1: true, prefix: ['sh', '-c', 'exec "$@" 2>&1', 'sh'] });
  daemons.push(d);
  return d;
}

/** Both generations' writers are done: each wrote its DONE line on each stream. */
async function allDone(d: Daemon, mode: 'prefixed' | 'json'): Promise<void> {
  for (const gen of [1, 2])
    for (const s of ['out', 'err'])
      await d.run.waitFor(new RegExp(mode === 'json' ? `"line":"DONE ${gen} ${s}"` : `DONE ${gen} ${s}\\n`), 120000);
}

/** Generation 2 runs beside generation 1 (canary soak), both writing; Aeterna logs meanwhile (status requests). */
async function twoGenerationsWriting(d: Daemon, mode: 'prefixed' | 'json'): Promise<void> {
  await d.waitStatus((s) => s.state === 'Running', 60000);
  const reload = d.cli('reload', '--no-wait');
  assert.equal((await reload).code, 0);
  let done = false;
  const finished = allDone(d, mode).finally(() => (done = true));
  while (!done) {
    await d.status(); // a control request: Aeterna's own debug lines between the app's
    await new Promise((r) => setTimeout(r, 20));
  }
  await finished;
}

const LINE = /^L (\d+) (out|err) (\d+) x+ E(\d+)$/;

/** Every line index of each generation's stream seen exactly once, whole. */
function assertComplete(seen: Map<string, number[]>): void {
  for (const gen of [1, 2])
    for (const s of ['out', 'err']) {
      const got = (seen.get(`${gen} ${s}`) ?? []).sort((a, b) => a - b);
      assert.deepEqual(
        got,
        Array.from({ length: COUNT }, (_, i) => i),
        `generation ${gen} ${s}: every line once`,
      );
    }
}

describe('the app output through Aeterna', { skip: pidNamespaceUnavailable() ?? false, timeout: 300000 }, () => {
  it('prefixed: every line of two writers and two generations arrives whole, prefixed, between whole Aeterna lines', async () => {
    const d = await start('prefixed', MAX_LINE_BYTES - 100);
    await twoGenerationsWriting(d, 'prefixed');
    const pids = new Map<number, number>();
    const seen = new Map<string, number[]>();
    const broken: string[] = [];
    let aeternaLines = 0;
    for (const line of d.run.stdout.split('\n')) {
      if (line === '') continue;
      if (line.startsWith('{')) {
        try {
          if ((JSON.parse(line) as { name?: string }).name === 'aeterna') aeternaLines++;
          continue;
        } catch {
          broken.push(line.slice(0, 200));
          continue;
        }
      }
      const m = /^\[generation (\d+) pid (\d+)\] (.*)$/.exec(line);
      if (m === null) {
        broken.push(line.slice(0, 200));
        continue;
      }
      const [gen, pid, text] = [Number(m[1]), Number(m[2]), m[3]];
      if (pids.has(gen)) assert.equal(pids.get(gen), pid, `one pid per generation in the prefix`);
      pids.set(gen, pid);
      if (/^DONE \d+ (out|err)$/.test(text)) continue;
      const l = LINE.exec(text);
      if (l === null || l[3] !== l[4] || Number(l[1]) !== gen) {
        broken.push(line.slice(0, 200));
        continue;
      }
      const key = `${l[1]} ${l[2]}`;
      seen.set(key, [...(seen.get(key) ?? []), Number(l[3])]);
    }
    assert.deepEqual(broken, [], 'no line cut or mixed with another');
    assert.ok(aeternaLines > 10, `Aeterna's own lines on the same pipe (${aeternaLines})`);
    assertComplete(seen);
    await d.cli('promote');
    await d.waitStatus((s) => s.state === 'Running' && s.last_reload?.outcome === 'promoted', 60000);
  });

  it('an upgrade carries the pipes: the same generation goes on writing, its lines read by the new Aeterna', async () => {
    const d = new Daemon({
      command: ['sh', '-c', 'i=0; while true; do echo "tick $i"; echo "etick $i" >&2; i=$((i+1)); sleep 0.05; done'],
      port: await freePort(),
    });
    fs.appendFileSync(d.configFile, '  app_output: "prefixed"\n');
    d.start(true);
    daemons.push(d);
    const before = await d.waitStatus((s) => s.state === 'Running', 60000);
    await d.run.waitFor(/\] tick 3\n/, 60000);
    const r = await d.cli('upgrade');
    assert.equal(r.code, 0, r.stderr);
    const after = await d.waitStatus((s) => (s as { reexecs?: number }).reexecs === 1, 60000);
    const last = (): number => Math.max(...[...d.run.stdout.matchAll(/\] tick (\d+)\n/g)].map((m) => Number(m[1])));
    const upgradedAt = last();
    await d.run.waitFor(new RegExp(`\\] tick ${upgradedAt + 20}\\n`), 60000);
    await d.run.waitFor(new RegExp(`\\] etick ${upgradedAt + 20}\\n`), 60000);
    const now = await d.status();
    assert.equal(now.generation, before.generation, 'no restart: the app never wrote into a closed pipe');
    assert.equal(now.pid, after.pid);
    assert.equal(now.restarts, 0);
    // Every tick once, in order, with the generation's prefix, across the exec.
    const ticks = [...d.run.stdout.matchAll(/^\[generation 1 pid \d+\] tick (\d+)$/gm)].map((m) => Number(m[1]));
    assert.deepEqual(
      ticks.slice(0, upgradedAt + 20),
      Array.from({ length: upgradedAt + 20 }, (_, i) => i),
    );
  });

  it('a flood of output is bounded: Aeterna answers, reloads and stays within its memory while the app floods', async () => {
    // Lines of 1,000 bytes as fast as the app can write them, and a line of 1 MiB without a newline every round.
    const flood = `${'x'.repeat(1000)}`;
    const d = new Daemon({
      command: [
        'sh',
        '-c',
        `while true; do yes ${flood} | head -n 20000; head -c 1048576 /dev/zero | tr '\\0' y; done`,
      ],
      port: await freePort(),
    });
    fs.appendFileSync(d.configFile, '  app_output: "prefixed"\n');
    // Aeterna's stdout (where the app's lines go) to /dev/null: what is measured is Aeterna, not this test's buffer.
    d.run = runAeterna(['start', '-c', d.configFile], { prefix: ['sh', '-c', 'exec "$@" >/dev/null', 'sh'] });
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Running', 60000);
    const pid = await d.run.aeternaPid();
    let peakKb = 0;
    for (let i = 0; i < 10; i++) {
      const r = await d.cli('status', '--json'); // answered while the app floods
      assert.equal(r.code, 0, r.stderr);
      peakKb = Math.max(peakKb, processMemory(pid).rss);
    }
    const reload = await d.cli('reload');
    assert.equal(reload.code, 0, `a reload while both generations flood: ${reload.stderr}`);
    for (let i = 0; i < 10; i++) {
      assert.equal((await d.cli('status')).code, 0);
      peakKb = Math.max(peakKb, processMemory(pid).rss);
    }
    assert.ok(peakKb < 250 * 1024, `Aeterna's RSS stayed bounded: ${peakKb} kB`);
  });

  it('json: each line (a long one in marked pieces) is one record with generation, instance, pid and stream', async () => {
    const d = await start('json', 3 * MAX_LINE_BYTES);
    await twoGenerationsWriting(d, 'json');
    const seen = new Map<string, number[]>();
    const broken: string[] = [];
    /** The pieces of a line cut for being longer than the cap, by generation and stream, until its last piece. */
    const open = new Map<string, string>();
    let pieces = 0;
    for (const line of d.run.stdout.split('\n')) {
      if (line === '') continue;
      let rec: Record<string, unknown>;
      try {
        rec = JSON.parse(line) as Record<string, unknown>;
      } catch {
        broken.push(line.slice(0, 200));
        continue;
      }
      if (rec.name === 'aeterna') continue;
      assert.equal(rec.name, 'app');
      assert.equal(rec.instance, 0);
      assert.equal(typeof rec.pid, 'number');
      assert.ok(rec.stream === 'stdout' || rec.stream === 'stderr');
      const key = `${String(rec.generation)} ${rec.stream === 'stdout' ? 'out' : 'err'}`;
      const text = (open.get(key) ?? '') + (rec.line as string);
      if (rec.continues === true) {
        assert.ok(Buffer.byteLength(rec.line as string) <= MAX_LINE_BYTES);
        pieces++;
        open.set(key, text);
        continue;
      }
      open.delete(key);
      if (/^DONE \d+ (out|err)$/.test(text)) continue;
      const l = LINE.exec(text);
      if (l === null || l[3] !== l[4] || `${l[1]} ${l[2]}` !== key) {
        broken.push(text.slice(0, 200));
        continue;
      }
      seen.set(key, [...(seen.get(key) ?? []), Number(l[3])]);
    }
    assert.deepEqual(broken, [], 'no record cut or mixed with another');
    assert.ok(pieces > 0, 'lines longer than the cap came in pieces');
    assertComplete(seen);
  });
});

// Reloads whose old generation drains for long: a real daemon as PID 1, an app that holds HTTP streams open and
// exits only once they end. The reload is answered at promotion; the old generation retires in the background,
// listed by status; further reloads go through meanwhile; orchestration.max_generations kills the oldest retiring
// one. Assert counts and states, never timings.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import { fixture, freePort, pidNamespaceUnavailable } from '../../helpers/aeterna';
import { Daemon, statusOf } from '../../helpers/daemon';
import { getText, metricSample } from '../../helpers/load';
import type { ReloadRecord, StatusReport } from '../../../src/orchestrator/types';

const APP = [process.execPath, fixture('apps', 'streaming_app.js')];
/** Long enough that no retiring generation here reaches its SIGKILL deadline: each exits or is killed to make room. */
const STOP_TIMEOUT = '10m';
/** A guard against a hang (a reload that waits for its old generation), not a timing assertion. */
const GUARD_MS = 90_000;

const daemons: Daemon[] = [];
const streams: Stream[] = [];
after(async () => {
  for (const s of streams) s.close();
  for (const d of daemons) await d.run.killAll();
});

async function started(
  maxGenerations: number | null,
  metricsPort?: number,
  stopTimeout = STOP_TIMEOUT,
): Promise<{ d: Daemon; port: number }> {
  const port = await freePort();
  const d = new Daemon({ command: APP, port, stopTimeout, metricsPort });
  if (maxGenerations !== null) {
    const yaml = fs.readFileSync(d.configFile, 'utf8');
    fs.writeFileSync(
      d.configFile,
      yaml.replace('orchestration:\n', `orchestration:\n  max_generations: ${maxGenerations}\n`),
    );
  }
  d.start(true);
  daemons.push(d);
  await d.waitStatus((s) => s.state === 'Running');
  return { d, port };
}

/** An open GET /stream: which process serves it, how many ticks arrived, and whether it has ended. */
interface Stream {
  pid: number;
  generation: number;
  ticks: () => number;
  ended: () => boolean;
  /** Resolves when the response ends or the connection breaks. */
  end: Promise<void>;
  close(): void;
}

function openStream(port: number): Promise<Stream> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port, path: '/stream', agent: false }, (res) => {
      let ticks = 0;
      let ended = false;
      const end = new Promise<void>((done) => {
        const finish = (): void => {
          ended = true;
          done();
        };
        res.once('close', finish);
        res.once('error', finish);
        req.once('error', finish);
      });
      res.setEncoding('utf8').on('data', (chunk: string) => (ticks += chunk.split('\n').length - 1));
      const stream: Stream = {
        pid: Number(res.headers['x-pid']),
        generation: Number(res.headers['x-generation']),
        ticks: () => ticks,
        ended: () => ended,
        end,
        close: () => req.destroy(),
      };
      streams.push(stream);
      resolve(stream);
    });
    req.once('error', reject);
  });
}

/** A stream served by generation `generation` (a connection the previous one accepted before it stopped is closed). */
async function streamTo(port: number, generation: number): Promise<Stream> {
  for (let attempt = 0; attempt < 50; attempt++) {
    const s = await openStream(port);
    if (s.generation === generation) return s;
    s.close();
  }
  throw new Error(`no stream reached generation ${generation}`);
}

async function until(what: string, check: () => boolean | Promise<boolean>, timeoutMs = GUARD_MS): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** `aeterna reload --json`, answered (or the guard fails the test): its exit code, the record and the text lines. */
async function reload(d: Daemon): Promise<{ code: number | null; record: ReloadRecord; stderr: string }> {
  let timer: NodeJS.Timeout | undefined;
  const guard = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error('the reload was not answered while the old generation drains')),
      GUARD_MS,
    );
  });
  try {
    const r = await Promise.race([d.cli('reload', '--json'), guard]);
    const lines = r.stdout.trim().split('\n');
    return { code: r.code, record: JSON.parse(lines[lines.length - 1]) as ReloadRecord, stderr: r.stderr };
  } finally {
    clearTimeout(timer);
  }
}

const retiringOf = (s: StatusReport): number[] => s.retiring.map((r) => r.generation);

describe('reloads whose old generation drains for long', { timeout: 300_000 }, () => {
  const skip = pidNamespaceUnavailable();

  it(
    'the reload is answered while the old generation still streams; status lists it as retiring; it exits once its stream ends, restarting nothing',
    { skip: skip ?? false },
    async () => {
      const { d, port } = await started(null);
      const a = await streamTo(port, 1);
      await until('the stream flows', () => a.ticks() >= 2);

      const r = await reload(d);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.record.outcome, 'promoted');
      assert.equal(r.record.to_generation, 2);
      assert.equal(typeof r.record.serving_since, 'string', 'the answer says since when the new generation serves');
      assert.deepEqual(
        r.record.retiring?.map((g) => [g.generation, g.pid]),
        [[1, a.pid]],
        'and which old generation still drains',
      );
      assert.equal(a.ended(), false, 'the old generation still streams');
      await d.run.waitFor(new RegExp(`TERM ${a.pid} generation 1 streams 1`));

      const text = await d.cli('reload');
      assert.equal(text.code, 0, text.stderr);
      assert.match(text.stdout, /^reload-2 promoted in .*: generation 3 \(pid \d+\) is serving since \S+$/m);
      assert.match(
        text.stdout,
        new RegExp(`^still generation 1 \\(pid ${a.pid}\\) draining since \\S+, SIGKILL at \\S+`, 'm'),
      );

      const s = await statusOf(d);
      assert.equal(s.state, 'Running');
      assert.equal(s.generation, 3);
      assert.ok(retiringOf(s).includes(1), `generation 1 is retiring: ${JSON.stringify(s.retiring)}`);
      const one = s.retiring.find((g) => g.generation === 1)!;
      assert.equal(one.pid, a.pid);
      assert.equal(
        Date.parse(one.kill_deadline) - Date.parse(one.draining_since),
        10 * 60_000,
        'SIGKILL at stop_timeout',
      );
      const human = await d.cli('status');
      assert.match(human.stdout, new RegExp(`^retiring: +generation 1 \\(pid ${a.pid}\\) draining since `, 'm'));

      const ticks = a.ticks();
      await until('the old generation streams on after the reloads', () => a.ticks() > ticks + 2);
      a.close();
      await d.run.waitFor(new RegExp(`EXIT ${a.pid} generation 1`), GUARD_MS);
      await until('generation 1 is no longer retiring', async () => !retiringOf(await statusOf(d)).includes(1));
      const after = await statusOf(d);
      assert.equal(after.state, 'Running');
      assert.equal(after.generation, 3, 'the serving generation is the same');
      assert.equal(after.restarts, 0, "a retiring generation's exit is no crash");
      await d.run.waitFor(/"msg":"generation 1 exited with code 0"/); // Aeterna's log and the CLI's answer race
      const exit = d.run.logs().find((l) => l.msg === 'generation 1 exited with code 0');
      assert.ok(exit, 'its exit is logged');
      assert.equal(exit.retiring, true);
      assert.equal(await d.stop(), 0);
    },
  );

  it(
    'an aeterna upgrade and then a fatal signal (SIGSEGV) while an old generation drains: each carries it, it streams on, listed with the same SIGKILL deadline, and its exit is a retiring one',
    { skip: skip ?? false },
    async () => {
      const { d, port } = await started(null);
      const a = await streamTo(port, 1);
      await until('the stream flows', () => a.ticks() >= 2);
      const r = await reload(d);
      assert.equal(r.code, 0, r.stderr);
      const before = (await statusOf(d)).retiring.find((g) => g.generation === 1);
      assert.ok(before, 'generation 1 retires');

      const upgrade = await d.cli('upgrade');
      assert.equal(upgrade.code, 0, upgrade.stderr);
      await d.waitStatus((s) => ((s as { reexecs?: number }).reexecs ?? 0) >= 1, GUARD_MS);
      await d.run.signal('SIGSEGV');
      await d.waitStatus((s) => ((s as { reexecs?: number }).reexecs ?? 0) >= 2, GUARD_MS);

      const s = await statusOf(d);
      assert.equal(s.reexecs, 2, 'an upgrade, then a recovery');
      assert.equal(s.state, 'Running');
      assert.equal(s.generation, 2);
      assert.deepEqual(s.retiring, [before], 'the same generation, pid, SIGTERM time and SIGKILL deadline');
      assert.equal(
        d.run
          .logs()
          .filter((l) => /took over generation 2 \(pid \d+\) and 1 retiring generation\(s\) still draining/.test(l.msg))
          .length,
        2,
      );
      const ticks = a.ticks();
      await until('the old generation streams on after both re-execs', () => a.ticks() > ticks + 2);
      assert.equal(a.ended(), false);

      a.close();
      await d.run.waitFor(new RegExp(`EXIT ${a.pid} generation 1`), GUARD_MS);
      await until('generation 1 is no longer retiring', async () => (await statusOf(d)).retiring.length === 0);
      await d.run.waitFor(/"msg":"generation 1 exited with code 0"/);
      const exit = d.run.logs().find((l) => l.msg === 'generation 1 exited with code 0');
      assert.equal(exit?.retiring, true, 'logged as a retiring generation by the re-executed Aeterna');
      const after = await statusOf(d);
      assert.equal(after.restarts, 0, "a retiring generation's exit is no crash");
      assert.equal(after.generation, 2);
      assert.equal(await d.stop(), 0);
    },
  );

  it(
    'a retiring generation carried across an aeterna upgrade is SIGKILLed at the deadline the previous Aeterna set',
    { skip: skip ?? false },
    async () => {
      const { d, port } = await started(null, undefined, '12s');
      const a = await streamTo(port, 1);
      await until('the stream flows', () => a.ticks() >= 2);
      const r = await reload(d);
      assert.equal(r.code, 0, r.stderr);
      const upgrade = await d.cli('upgrade');
      assert.equal(upgrade.code, 0, upgrade.stderr);
      await d.waitStatus((s) => ((s as { reexecs?: number }).reexecs ?? 0) >= 1, GUARD_MS);
      // The stream never ends on its own: only the SIGKILL at its stop_timeout ends generation 1.
      await d.run.waitFor(/"msg":"generation 1 killed by SIGKILL"/, GUARD_MS);
      const logs = d.run.logs();
      const tookOver = logs.findIndex((l) => /re-executed as .* and 1 retiring generation/.test(l.msg));
      const killedAt = logs.findIndex((l) => l.msg === 'generation 1 killed by SIGKILL');
      assert.ok(tookOver >= 0 && killedAt > tookOver, 'killed by the re-executed Aeterna, which carried it');
      assert.equal(logs[killedAt].retiring, true);
      await a.end;
      assert.equal((await statusOf(d)).retiring.length, 0);
      assert.equal((await statusOf(d)).restarts, 0);
      assert.equal(await d.stop(), 0);
    },
  );

  it(
    'reloads go through while old generations drain; max_generations 3 kills the oldest retiring one with a warning; no reload fails',
    { skip: skip ?? false },
    async () => {
      const metricsPort = await freePort();
      const { d, port } = await started(3, metricsPort);
      const held: Stream[] = [];
      for (let gen = 1; gen <= 3; gen++) {
        // Each generation holds a stream when it is replaced, so none of them exits on its own.
        const s = await streamTo(port, gen);
        held.push(s);
        await until(`generation ${gen} streams`, () => s.ticks() >= 1);
        const r = await reload(d);
        assert.equal(r.code, 0, `reload ${gen}: ${r.stderr}`);
        assert.equal(r.record.outcome, 'promoted');
        await d.run.waitFor(new RegExp(`TERM ${s.pid} generation ${gen} streams 1`));
      }
      // Before the third reload: serving 3, retiring 1 and 2, and a new one would make 4.
      await d.run.waitFor(/"msg":"killing retiring generation/);
      await d.run.waitFor(/"msg":"reload-3 promoted/);
      const warnings = d.run.logs().filter((l) => /^killing retiring generation/.test(l.msg));
      assert.equal(warnings.length, 1, warnings.map((l) => l.msg).join('\n'));
      assert.equal(warnings[0].level, 'warn');
      assert.match(
        warnings[0].msg,
        new RegExp(
          `^killing retiring generation 1 \\(pid ${held[0].pid}\\) after \\S+ of draining: orchestration\\.max_generations is 3`,
        ),
      );
      assert.equal(typeof warnings[0].drained_ms, 'number');
      await until('generation 1 is killed', () => d.run.logs().some((l) => l.msg === 'generation 1 killed by SIGKILL'));
      await until('its stream is cut', () => held[0].ended());
      assert.equal(held[1].ended(), false, 'generation 2 drains on');
      assert.equal(held[2].ended(), false, 'generation 3 drains on');

      const s = await statusOf(d);
      assert.equal(s.state, 'Running');
      assert.equal(s.generation, 4);
      assert.deepEqual(retiringOf(s), [2, 3]);
      assert.equal(s.restarts, 0);
      const metrics = (await getText(metricsPort, '/metrics')).body;
      assert.equal(metricSample(metrics, 'aeterna_retiring_generations'), 2);
      assert.equal(metricSample(metrics, 'aeterna_retiring_killed_total'), 1);
      const outcomes = d.run.logs().filter((l) => /^reload-\d+ (promoted|rolled_back|failed)/.test(l.msg));
      assert.deepEqual(
        outcomes.map((l) => l.msg.split(' ').slice(0, 2).join(' ')),
        ['reload-1 promoted', 'reload-2 promoted', 'reload-3 promoted'],
        'no reload failed',
      );

      for (const st of held) st.close();
      await until('no generation retires any more', async () => (await statusOf(d)).retiring.length === 0);
      assert.equal((await statusOf(d)).restarts, 0);
      assert.equal(await d.stop(), 0);
    },
  );
});

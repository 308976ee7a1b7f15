// The state relay after things went wrong: a dump that hung past the timeout or a
// state cut short must not block every later reload; state_handoff.enabled: false
// at a reload is honoured; a reload right after a promotion waits for the final
// sync still in flight; and strangers flooding the state socket cost Aeterna no
// memory of their own. Real daemons, real app processes, real sockets.
import { describe, it, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fixture, freePort } from '../../helpers/aeterna';
import { Daemon, type CliResult } from '../../helpers/daemon';
import { getJson, requestJson } from '../../helpers/load';
import { encodeFrame } from '../../../src/srp/codec';

const APP = fixture('apps', 'relay_quirks_app.js');

interface Answer {
  generation: string;
  notes: string[];
  source: string | null;
}

function handoff(d: Daemon, timeout: string, enabled = true): string {
  return `{ enabled: ${enabled}, socket_path: "${path.join(d.dir, 'state.sock')}", timeout: "${timeout}" }`;
}

/** Daemons a test started: stopped after it, whatever it asserted. */
const running: Daemon[] = [];

async function started(env: string[], timeout: string): Promise<{ d: Daemon; port: number }> {
  const port = await freePort();
  const d = new Daemon({
    command: [process.execPath, APP],
    port,
    env,
    handoff: true,
    readiness: '{ mode: "notify", timeout: "30s" }',
  });
  d.write({ ...d.options, handoff: handoff(d, timeout) });
  running.push(d.start());
  await d.waitStatus((s) => s.state === 'Running');
  return { d, port };
}

const messages = (d: Daemon, pattern: RegExp): string[] =>
  d.run
    .logs()
    .map((l) => String(l.msg))
    .filter((m) => pattern.test(m));

/** A reload, and what happens first: it ends (the CLI exits), or `pattern` shows in the daemon's output. */
async function reloadUntil(
  d: Daemon,
  pattern: RegExp,
): Promise<{ reload: Promise<CliResult>; first: 'ended' | 'seen' }> {
  const reload = d.cli('reload');
  const first = await Promise.race([
    reload.then(() => 'ended' as const),
    d.run.waitFor(pattern, 60000).then(() => 'seen' as const),
  ]);
  return { reload, first };
}

describe('state relay reliability', { timeout: 240000 }, () => {
  afterEach(async () => {
    for (const d of running.splice(0)) {
      if (d.run.child.exitCode === null) await d.stop();
      if (process.env.RELAY_TEST_LOGS)
        fs.writeFileSync(
          path.join(process.env.RELAY_TEST_LOGS, `${path.basename(d.dir)}.log`),
          d.run.stdout + d.run.stderr,
        );
    }
  });

  it('a dump that hung past the timeout does not block the next reload: its late answer is dropped and the dump asked again', async () => {
    const { d, port } = await started([], '1s');
    const gateFile = path.join(d.dir, 'release-dump');
    // Generation 1 was started without the gate; generation 2 (the first reload's) gets it, and hangs its first dump.
    d.write({ ...d.options, env: [`DUMP_GATE=${gateFile}`] });
    assert.equal((await d.cli('reload')).code, 0);
    await requestJson(port, 'POST', '/notes', 'kept');
    const r1 = await d.cli('reload');
    assert.notEqual(r1.code, 0, 'the hung dump rolls the reload back');
    assert.match((await d.status()).last_reload!.reason!, /timed out/);
    // The operator raises the timeout; the app's first dump is still hanging.
    d.write({ ...d.options, handoff: handoff(d, '60s') });
    const { reload, first } = await reloadUntil(
      d,
      /generation 2 is busy with an earlier relay \(dump-requested.*; the reload waits for it/,
    );
    if (first !== 'seen')
      assert.fail(`the reload failed instead of waiting for the earlier relay: ${(await reload).stderr}`);
    fs.writeFileSync(gateFile, ''); // the hung dump answers now, long after it was abandoned
    const r2 = await reload;
    assert.equal(r2.code, 0, r2.stderr);
    assert.equal(
      messages(
        d,
        /^relay: generation 2's dump was abandoned \(.*timed out.*\); its answer to the dump will be read and dropped/,
      ).length,
      1,
      'a warning names the generation and what was abandoned',
    );
    assert.equal(
      messages(d, /^relay: a state arrived after its dump was abandoned; dropped$/).length,
      1,
      'the late answer was dropped',
    );
    const after = await getJson<Answer>(port, '/');
    assert.equal(after.source, 'relay');
    assert.deepEqual(after.notes, ['kept'], 'the state of the generation whose dump hung reached its successor');
    // And the next one too.
    assert.equal((await d.cli('reload')).code, 0);
    assert.deepEqual((await getJson<Answer>(port, '/')).notes, ['kept']);
    assert.equal(await d.stop(), 0);
  });

  it('a state cut short (50,000 of 100,000 announced bytes) does not block the next reload: the connection is closed and the reload goes on', async () => {
    const { d } = await started(['SHORT_STATE=1'], '1s');
    const r1 = await d.cli('reload');
    assert.notEqual(r1.code, 0, 'the state that never completes rolls the reload back');
    d.write({ ...d.options, env: [], handoff: handoff(d, '60s') });
    const r2 = await d.cli('reload');
    assert.equal(r2.code, 0, `the next reload is promoted: ${r2.stderr}`);
    assert.equal(
      messages(
        d,
        /^relay: generation 1's dump was abandoned .*the rest of its state \(50000 of 100000 bytes arrived\) will be read and dropped/,
      ).length,
      1,
    );
    assert.equal(
      messages(
        d,
        /^relay: generation 1: 50000 bytes of its announced state did not arrive within \d+ ms after its relay was abandoned/,
      ).length,
      1,
      'a warning says the connection was closed, and why',
    );
    assert.equal(
      messages(
        d,
        /^relay: generation 1 has no state relay connection since \S+ \(50000 bytes of its announced state did not arrive/,
      ).length,
      1,
      'the reload says its state could not be relayed',
    );
    assert.equal((await d.status()).generation, 3);
    assert.equal(await d.stop(), 0);
  });

  it('state_handoff.enabled: false at a reload relays nothing; turned on again, the next reload relays', async () => {
    const { d, port } = await started([], '10s');
    await requestJson(port, 'POST', '/notes', 'from generation 1');
    d.write({ ...d.options, handoff: handoff(d, '10s', false) });
    const r = await d.cli('reload');
    assert.equal(r.code, 0, r.stderr);
    await d.untilRetired(); // the reload answers at promotion: until its SIGTERM is handled the old one may accept
    const off = await getJson<Answer>(port, '/');
    assert.equal(off.generation, '2');
    assert.equal(off.source, null, 'no state was relayed');
    assert.deepEqual(off.notes, []);
    assert.equal(messages(d, /^relay: dump requested$/).length, 0, 'no dump was asked');
    assert.equal(
      messages(
        d,
        /^orchestration.state_handoff.enabled is off in .*: no state is relayed; generation 2 starts without state$/,
      ).length,
      1,
    );
    await requestJson(port, 'POST', '/notes', 'from generation 2');
    d.write({ ...d.options, handoff: handoff(d, '10s') });
    assert.equal((await d.cli('reload')).code, 0);
    const on = await getJson<Answer>(port, '/');
    assert.equal(on.source, 'relay');
    assert.deepEqual(on.notes, ['from generation 2']);
    assert.equal(await d.stop(), 0);
  });

  it('a reload right after a promotion whose final sync is still being applied waits for it, then relays', async () => {
    const gate = (d: Daemon): string => path.join(d.dir, 'release-load');
    const port = await freePort();
    const d = new Daemon({
      command: [process.execPath, APP],
      port,
      handoff: true,
      readiness: '{ mode: "notify", timeout: "30s" }',
    });
    d.write({ ...d.options, env: [`LOAD_GATE=${gate(d)}`], handoff: handoff(d, '2s') });
    running.push(d.start());
    await d.waitStatus((s) => s.state === 'Running');
    await requestJson(port, 'POST', '/notes', 'first');
    // Generation 2 applies its final sync only once the gate opens: the promotion answers before it acks.
    const r1 = await d.cli('reload');
    assert.equal(r1.code, 0, r1.stderr);
    assert.equal((await d.status()).last_reload!.outcome, 'promoted');
    d.write({ ...d.options, handoff: handoff(d, '60s') });
    const { reload, first } = await reloadUntil(
      d,
      /generation 2 is busy with an earlier relay \(load-sent\); the reload waits for it/,
    );
    if (first !== 'seen')
      assert.fail(`the reload failed instead of waiting for the final sync: ${(await reload).stderr}`);
    fs.writeFileSync(gate(d), '');
    const r2 = await reload;
    assert.equal(r2.code, 0, r2.stderr);
    await d.run.waitFor(/FINAL LOAD APPLIED 2/);
    await d.untilRetired(); // the reload answers at promotion: until its SIGTERM is handled the old one may accept
    const after = await getJson<Answer>(port, '/');
    assert.equal(after.generation, '3');
    assert.deepEqual(after.notes, ['first']);
    assert.equal(await d.stop(), 0);
  });

  it('300 strangers each sending a 1 MiB hello at once: all refused, and Aeterna allocates nothing per stranger (peak RSS < +40 MiB)', async (t) => {
    const { d } = await started([], '10s');
    const aeterna = await d.run.aeternaPid();
    const sock = path.join(d.dir, 'state.sock');
    const hello = encodeFrame(Buffer.alloc(1 << 20, 0x20));
    const memory = (): { rss: number; hwm: number } => {
      const status = fs.readFileSync(`/proc/${aeterna}/status`, 'utf8');
      const kb = (key: string): number => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(status)![1]);
      return { rss: kb('VmRSS'), hwm: kb('VmHWM') };
    };
    const round = async (): Promise<{ answered: number; cut: number }> => {
      let answered = 0;
      let cut = 0;
      await Promise.all(
        Array.from(
          { length: 300 },
          () =>
            new Promise<void>((resolve) => {
              const socket = net.connect(sock);
              let got = '';
              socket.on('data', (c: Buffer) => (got += c.toString('latin1')));
              socket.on('error', () => undefined); // a reset or a broken pipe: counted below by what arrived
              socket.on('close', () => {
                if (got.includes('"code":"forbidden"')) answered++;
                else cut++;
                resolve();
              });
              socket.on('connect', () => socket.write(hello));
            }),
        ),
      );
      return { answered, cut };
    };
    fs.writeFileSync(`/proc/${aeterna}/clear_refs`, '5'); // VmHWM := VmRSS: from here it records the peak
    const before = memory();
    for (let i = 0; i < 3; i++) {
      const { answered, cut } = await round();
      assert.equal(answered + cut, 300);
      assert.ok(answered > 0, 'strangers are told why');
    }
    const peak = memory().hwm - before.rss;
    t.diagnostic(
      `Aeterna's RSS ${Math.round(before.rss / 1024)} MiB before, peak +${Math.round(peak / 1024)} MiB during 3 x 300 strangers`,
    );
    assert.ok(
      peak < 40 * 1024,
      `Aeterna's peak RSS grew ${Math.round(peak / 1024)} MiB during 900 strangers (< 40 MiB)`,
    );
    assert.equal((await d.status()).state, 'Running');
    assert.equal((await d.cli('reload')).code, 0, 'the relay still works');
    assert.equal(await d.stop(), 0);
  });
});

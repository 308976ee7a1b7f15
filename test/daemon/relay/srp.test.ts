// The State Relay end to end: a real daemon, a real app using aeterna/client,
// real reloads. The app's memory survives; every failure rolls back with the
// old generation serving and its state intact.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { spawn } from 'node:child_process';
import { fixture, freePort, processMemory as memory } from '../../helpers/aeterna';
import { Daemon, type ConfigOptions } from '../../helpers/daemon';
import { requestJson } from '../../helpers/load';

const APP = [process.execPath, fixture('apps', 'stateful_app.js')];
const daemons: Daemon[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
});

type Reply = { pid: number; generation: string; history?: string[]; size?: number; sha256?: string };
const request = (
  port: number,
  method: string,
  path: string,
  body?: string,
  agent: http.Agent | false = false,
): Promise<Reply> => requestJson<Reply>(port, method, path, body, agent);

async function started(options: Partial<ConfigOptions> = {}): Promise<{ d: Daemon; port: number }> {
  const port = options.port ?? (await freePort());
  const d = new Daemon({
    command: APP,
    port,
    handoff: true,
    readiness: '{ mode: "notify", timeout: "90s" }',
    stopTimeout: '5s',
    ...options,
  });
  if (options.handoff === 'LONG')
    d.write({ ...d.options, handoff: `{ enabled: true, socket_path: "${d.dir}/state.sock", timeout: "90s" }` });
  d.start();
  daemons.push(d);
  await d.waitStatus((s) => s.state === 'Running');
  return { d, port };
}

async function seed(port: number): Promise<string[]> {
  const messages = ['hello', 'what is a subreaper?', 'and SCM_RIGHTS?'];
  for (const m of messages) await request(port, 'POST', '/sessions/s1/messages', m);
  return messages;
}

describe('state relay', { timeout: 180000 }, () => {
  it('a JSON state survives an immediate reload byte-exact, served by the new pid', async () => {
    const { d, port } = await started();
    const messages = await seed(port);
    const before = await request(port, 'GET', '/sessions/s1');
    const r = await d.cli('reload');
    assert.equal(r.code, 0, r.stderr);
    await d.untilRetired(); // the reload answers at promotion: until its SIGTERM is handled the old one may accept
    const after = await request(port, 'GET', '/sessions/s1');
    assert.notEqual(after.pid, before.pid);
    assert.equal(after.generation, '2');
    assert.deepEqual(after.history, messages);
    const s = await d.status();
    assert.ok(
      s.last_reload &&
        (s.last_reload as unknown as { phases: Array<{ phase: string }> }).phases.some((p) => p.phase === 'relayed'),
    );
    assert.equal(await d.stop(), 0);
  });

  it('a binary state of 4 MiB is relayed byte-exact', async () => {
    const { d, port } = await started({ env: ['STATE_MODE=binary', `BLOB_BYTES=${4 << 20}`] });
    const before = await request(port, 'GET', '/blob');
    assert.equal(before.size, 4 << 20);
    assert.equal((await d.cli('reload')).code, 0);
    const after = await request(port, 'GET', '/blob');
    assert.notEqual(after.pid, before.pid);
    assert.equal(after.sha256, before.sha256);
    assert.equal(await d.stop(), 0);
  });

  it('a 256 MiB state streams through Aeterna with its memory bounded', async () => {
    const { d, port } = await started({ env: ['STATE_MODE=binary', `BLOB_BYTES=${256 << 20}`] });
    const aeterna = await d.run.aeternaPid();
    const before = await request(port, 'GET', '/blob');
    const mem0 = memory(aeterna);
    const r = await d.cli('reload');
    assert.equal(r.code, 0, r.stderr);
    const after = await request(port, 'GET', '/blob');
    assert.equal(after.sha256, before.sha256);
    const mem1 = memory(aeterna);
    const grewMiB = (mem1.hwm - Math.max(mem0.rss, 0)) / 1024;
    assert.ok(
      grewMiB < 96,
      `Aeterna's peak RSS grew by ${grewMiB.toFixed(0)} MiB relaying 256 MiB (window-bounded, not the whole state)`,
    );
    assert.equal(await d.stop(), 0);
  });

  it('a 1 GiB memfd state is handed over without passing through Aeterna', async () => {
    // Generous relay timeout: the new generation reads and hashes the whole GiB before it acks.
    const { d, port } = await started({
      env: ['STATE_MODE=memfd', `BLOB_BYTES=${1 << 30}`],
      stopTimeout: '20s',
      handoff: 'LONG',
    });
    const aeterna = await d.run.aeternaPid();
    const before = await request(port, 'GET', '/blob');
    assert.equal(before.size, 1 << 30);
    const mem0 = memory(aeterna);
    const r = await d.cli('reload');
    assert.equal(r.code, 0, r.stderr);
    const after = await request(port, 'GET', '/blob');
    assert.equal(after.size, 1 << 30);
    assert.equal(after.sha256, before.sha256);
    assert.ok((memory(aeterna).hwm - mem0.rss) / 1024 < 64, 'the memfd was not read by Aeterna');
    assert.ok(
      d.run.logs().some((l) => l.msg === 'relay: state announced' && l.transport === 'memfd' && l.size === 1 << 30),
    );
    assert.equal(await d.stop(), 0);
  });

  it('a live TCP connection is handed from the old generation to the new one and still answers', async () => {
    const { d, port } = await started({ env: ['HANDOFF_CONNS=1'] });
    const socket = net.connect(port, '127.0.0.1');
    await new Promise((r) => socket.once('connect', r));
    const localPort = socket.localPort;
    const ask = (): Promise<{ pid: number; generation: string }> =>
      new Promise((resolve) => {
        let buf = '';
        const onData = (chunk: Buffer): void => {
          buf += chunk.toString();
          const end = buf.indexOf('\r\n\r\n');
          if (end < 0) return;
          const length = Number(/content-length: (\d+)/i.exec(buf)![1]);
          if (buf.length < end + 4 + length) return;
          socket.off('data', onData);
          resolve(JSON.parse(buf.slice(end + 4, end + 4 + length)) as { pid: number; generation: string });
        };
        socket.on('data', onData);
        socket.write('GET / HTTP/1.1\r\nHost: x\r\n\r\n');
      });
    const first = await ask();
    assert.equal(first.generation, '1');
    assert.equal((await d.cli('reload')).code, 0);
    const second = await ask();
    assert.equal(second.generation, '2', 'the same connection is now answered by the new generation');
    assert.notEqual(second.pid, first.pid);
    assert.equal(socket.localPort, localPort);
    socket.destroy();
    assert.equal(await d.stop(), 0);
  });

  it('the final sync carries a change made after the first dump to the new generation', async () => {
    const { d, port } = await started({ strategy: 'canary', soak: '10m' });
    await seed(port);
    // A keep-alive connection opened now is served by the old generation for as long as it lives.
    const oldAgent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    const viaOld = await request(port, 'POST', '/sessions/s1/messages', 'before the reload', oldAgent);
    const reload = d.cli('reload');
    await d.waitStatus((s) => s.state === 'Soaking');
    const late = await request(
      port,
      'POST',
      '/sessions/s1/messages',
      'during the soak, on the old generation',
      oldAgent,
    );
    assert.equal(late.pid, viaOld.pid, 'the change was made on the old generation, after its first dump');
    oldAgent.destroy();
    assert.equal((await d.cli('promote')).code, 0);
    assert.equal((await reload).code, 0);
    await d.run.waitFor(/"final":true,"msg":"relay: state announced"/);
    await d.run.waitFor(/final state sync relayed/);
    // Both dumps tell the old generation how long Aeterna waits (state_handoff.timeout): its SDK waits as long.
    const dumps = d.run
      .logs()
      .filter((l) => l.msg === 'relay: dump requested')
      .map((l) => [l.final, l.timeout_ms]);
    assert.deepEqual(dumps, [
      [false, 10000],
      [true, 10000],
    ]);
    await d.untilRetired(); // the reload answers at promotion: until its SIGTERM is handled the old one may accept
    const after = await request(port, 'GET', '/sessions/s1');
    assert.equal(after.generation, '2');
    assert.ok(after.history!.includes('during the soak, on the old generation'), JSON.stringify(after.history));
    assert.equal(await d.stop(), 0);
  });
});

describe('state relay: what it exposes', { timeout: 60000 }, () => {
  it('the state socket is mode 0600; the metrics count relayed bytes but never show the state', async () => {
    const metricsPort = await freePort();
    const { d, port } = await started({ metricsPort });
    assert.equal(fs.statSync(`${d.dir}/state.sock`).mode & 0o777, 0o600);
    await request(port, 'POST', '/sessions/s1/messages', 'top-secret-session-content');
    assert.equal((await d.cli('reload')).code, 0);
    const metrics = await new Promise<string>((resolve, reject) =>
      http
        .get({ host: '127.0.0.1', port: metricsPort, path: '/metrics' }, (res) => {
          let body = '';
          res.on('data', (c: Buffer) => (body += c.toString()));
          res.on('end', () => resolve(body));
        })
        .on('error', reject),
    );
    assert.match(metrics, /^aeterna_state_handoff_bytes_total [1-9]\d*$/m);
    assert.match(metrics, /^aeterna_state_handoff_duration_seconds_count 1$/m);
    assert.doesNotMatch(metrics, /top-secret-session-content/);
    assert.equal(await d.stop(), 0);
  });
});

describe('a final sync cut short', { timeout: 120000 }, () => {
  it('the serving generation refuses the rest and keeps its relay connection for the next reload', async () => {
    const { d, port } = await started({ env: ['STATE_MODE=binary', `BLOB_BYTES=${64 << 20}`, 'FINAL_DIE_MID=1'] });
    const original = await request(port, 'GET', '/blob');
    d.write({ ...d.options, env: ['STATE_MODE=binary'] });
    assert.equal((await d.cli('reload')).code, 0, 'the promotion stands');
    await d.run.waitFor(/final sync cut short/);
    await d.run.waitFor(/final state sync lost/);
    await d.untilRetired(); // the reload answers at promotion: until its SIGTERM is handled the old one may accept
    const second = await request(port, 'GET', '/blob');
    assert.equal(second.generation, '2');
    assert.equal(
      second.sha256,
      original.sha256,
      'the first dump arrived whole; the cut final one was refused, not applied',
    );
    // Generation 2's relay connection is still in step: the next reload carries its state.
    assert.equal((await d.cli('reload')).code, 0);
    await d.untilRetired(); // the reload answers at promotion: until its SIGTERM is handled the old one may accept
    const third = await request(port, 'GET', '/blob');
    assert.equal(third.generation, '3');
    assert.equal(third.sha256, original.sha256);
    assert.equal(await d.stop(), 0);
  });
});

describe('state relay failures roll back; the old generation keeps serving with its state', { timeout: 180000 }, () => {
  async function expectRollback(change: Partial<ConfigOptions>, reason: RegExp): Promise<Daemon> {
    const { d, port } = await started();
    if (typeof change.handoff === 'string')
      change = { ...change, handoff: change.handoff.replace('STATE_SOCK', `${d.dir}/state.sock`) };
    const messages = await seed(port);
    const before = await request(port, 'GET', '/sessions/s1');
    const original = d.options;
    d.write({ ...original, ...change });
    const r = await d.cli('reload');
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, reason);
    const after = await request(port, 'GET', '/sessions/s1');
    assert.equal(after.pid, before.pid, 'the old generation still serves');
    assert.deepEqual(after.history, messages, 'its state is intact');
    const s = await d.status();
    assert.equal(s.state, 'Running');
    assert.equal(s.last_reload?.outcome, 'rolled_back');
    // and the next reload, with a sane version, still relays the state: the old generation's relay connection survived
    d.write(original);
    assert.equal((await d.cli('reload')).code, 0);
    assert.deepEqual((await request(port, 'GET', '/sessions/s1')).history, messages);
    assert.equal(await d.stop(), 0);
    return d;
  }

  it('nack: the new version refuses the state', async () =>
    void (await expectRollback(
      { env: ['NACK=1'] },
      /state relay failed: generation 2 refused the state: load_failed: the app could not load the state: this version refuses every state/,
    )));

  it('checksum mismatch: the new generation detects it and refuses', async () => {
    // The old generation announces a wrong sha256 (BAD_SHA applies to the generation that dumps).
    const { d, port } = await started({ env: ['BAD_SHA=1'] });
    const messages = await seed(port);
    const before = await request(port, 'GET', '/sessions/s1');
    const r = await d.cli('reload');
    assert.equal(r.code, 1);
    assert.match(r.stderr, /checksum_mismatch/);
    const after = await request(port, 'GET', '/sessions/s1');
    assert.equal(after.pid, before.pid);
    assert.deepEqual(after.history, messages);
    assert.equal(await d.stop(), 0);
  });

  it('relay timeout: a new generation that hangs in its state load', async () =>
    void (await expectRollback(
      { env: ['HANG_LOAD=1'], handoff: `{ enabled: true, socket_path: "STATE_SOCK", timeout: "1s" }` },
      /state relay failed: timed out after 1s/,
    )));

  // The peer exits once Aeterna closes on it, so the rollback may be reported as its exit or as the relay failing.
  const GONE =
    /state relay failed|exited with code 0 (before becoming ready|during the state relay)|before it connected to the relay/;

  it('garbage bytes from the new generation: error, closed, rolled back', async () => {
    const d = await expectRollback({ command: [process.execPath, fixture('apps', 'srp_peer.js'), 'garbage'] }, GONE);
    assert.ok(
      d.run
        .logs()
        .some(
          (l) =>
            /^relay connection closed: /.test(l.msg) && ['bad_frame', 'too_large', 'bad_json'].includes(String(l.code)),
        ),
      'the garbage was answered with a protocol error',
    );
  });

  it('an oversized frame from the new generation: error, closed, rolled back', async () => {
    const d = await expectRollback({ command: [process.execPath, fixture('apps', 'srp_peer.js'), 'oversized'] }, GONE);
    assert.ok(d.run.logs().some((l) => l.code === 'too_large' && /above the limit of 16777216 bytes/.test(l.msg)));
  });

  it('the new process killed before its ack', async () => {
    const { d, port } = await started();
    const messages = await seed(port);
    const before = await request(port, 'GET', '/sessions/s1');
    d.write({ ...d.options, env: ['HANG_LOAD=1'] });
    const reload = d.cli('reload');
    await d.run.waitFor(/relay: state announced/); // the state is on its way: the new process holds it unacked
    const s = await d.waitStatus(
      (st) => st.state === 'Handover' && (st as unknown as { candidate: { pid: number } | null }).candidate !== null,
    );
    process.kill((s as unknown as { candidate: { pid: number } }).candidate.pid, 'SIGKILL');
    const r = await reload;
    assert.equal(r.code, 1);
    assert.match(
      r.stderr,
      /killed by SIGKILL during the state relay|generation 2 \(new\) died during the relay \(killed by SIGKILL\)/,
    );
    const after = await request(port, 'GET', '/sessions/s1');
    assert.equal(after.pid, before.pid);
    assert.deepEqual(after.history, messages);
    assert.equal(await d.stop(), 0);
  });

  it('the old process killed mid-dump: rolled back, never promoted; the app is restarted', async () => {
    const { d, port } = await started({ env: ['HANG_DUMP=1'] });
    await seed(port);
    const before = await d.status();
    d.write({ ...d.options, env: [] });
    const reload = d.cli('reload');
    await d.run.waitFor(/relay: dump requested/);
    process.kill(before.pid!, 'SIGKILL');
    const r = await reload;
    assert.equal(r.code, 1);
    assert.match(r.stderr, /state relay failed: generation 1 \(old\) died during the relay \(killed by SIGKILL\)/);
    const s = await d.waitStatus((st) => st.state === 'Running' && st.pid !== null);
    assert.notEqual(s.pid, before.pid);
    assert.ok(!d.run.logs().some((l) => /promoted/.test(l.msg)));
    assert.equal(await d.stop(), 0);
  });

  it('a receiver that does not say "trailer" in its hello (an older client) gets the sha256 up front, never a trailer', async () => {
    // srp_peer says {"op":"hello","v":1}, as clients before the digest trailer do, and prints what it receives.
    const { d, port } = await started({ env: ['STATE_MODE=binary', `BLOB_BYTES=${4 << 20}`] });
    const before = await request(port, 'GET', '/blob');
    d.write({
      ...d.options,
      command: [process.execPath, fixture('apps', 'srp_peer.js'), 'hang'],
      handoff: `{ enabled: true, socket_path: "${d.dir}/state.sock", timeout: "2s" }`,
    });
    const reload = d.cli('reload');
    const load = await d.run.waitFor(/GOT (\{[^\n]*"op":"load"[^\n]*\})/);
    await d.run.waitFor(/GOT <\d+ bytes>/); // its data frames follow
    const r = await reload;
    assert.equal(r.code, 1, 'the peer never acks: rolled back');
    const dump = d.run.logs().find((l) => l.msg === 'relay: dump requested');
    assert.equal(dump?.trailer, false, 'no trailer offered to the old generation');
    const header = JSON.parse(load[1]) as { sha256?: string; trailer?: boolean; size: number };
    assert.equal(header.sha256, before.sha256, 'the digest up front');
    assert.equal(header.trailer, undefined);
    assert.doesNotMatch(d.run.stdout + d.run.stderr, /"op":"trailer"/);
    assert.equal(await d.stop(), 0);
  });

  it('the new process killed while the state streams to it: the reason says it died during the relay', async () => {
    // The new generation stops reading once welcomed, so the state waits unread in its socket when it dies:
    // the kernel resets Aeterna's end (a POLLERR), which must be reported as the death it is.
    const { d, port } = await started({ env: ['STATE_MODE=binary', `BLOB_BYTES=${16 << 20}`] });
    const before = await request(port, 'GET', '/blob');
    d.write({ ...d.options, command: [process.execPath, fixture('apps', 'srp_peer.js'), 'stall'] });
    const reload = d.cli('reload');
    await d.run.waitFor(/relay: state announced/);
    const s = await d.status();
    process.kill((s as unknown as { candidate: { pid: number } }).candidate.pid, 'SIGKILL');
    const r = await reload;
    assert.equal(r.code, 1);
    assert.match(
      r.stderr,
      /killed by SIGKILL during the state relay|generation 2 \(new\) died during the relay \(killed by SIGKILL\)/,
    );
    assert.doesNotMatch(r.stderr, /poll error|errno/);
    const after = await request(port, 'GET', '/blob');
    assert.equal(after.pid, before.pid);
    assert.equal(after.sha256, before.sha256);
    assert.equal(await d.stop(), 0);
  });

  it('a memfd state for a new generation that cannot receive fds ("fds": false): rolled back saying so, old serves with its state', async () => {
    const { d, port } = await started({ env: ['STATE_MODE=memfd', `BLOB_BYTES=${1 << 20}`] });
    const before = await request(port, 'GET', '/blob');
    d.write({ ...d.options, command: [process.execPath, fixture('apps', 'srp_peer.js'), 'nofds'] });
    const r = await d.cli('reload');
    assert.equal(r.code, 1);
    assert.match(
      r.stderr,
      /generation 2 cannot receive fds \(its hello said "fds": false\), but generation 1 sent a memfd state/,
    );
    const after = await request(port, 'GET', '/blob');
    assert.equal(after.pid, before.pid);
    assert.equal(after.sha256, before.sha256);
    assert.equal(await d.stop(), 0);
  });

  it('an old generation whose relay connection closed while it lives: the reload starts the new one without state and says why, naming when it closed', async () => {
    const warnings = (d: Daemon): string[] =>
      d.run
        .logs()
        .map((l) => String(l.msg))
        .filter((m) => /^relay: generation \d+ has no state relay connection since /.test(m));
    // Generation 1 never connects (a fresh start does not wait for it): nothing to warn about at the next reload.
    const { d } = await started({
      command: ['sleep', '60'],
      readiness: '{ mode: "delay", delay: "100ms", timeout: "20s" }',
    });
    d.write({ ...d.options, command: [process.execPath, fixture('apps', 'srp_peer.js'), 'hangup'] });
    assert.equal((await d.cli('reload')).code, 0);
    assert.deepEqual(warnings(d), [], 'an app that never connected is not warned about');
    // Generation 2 takes its load, says ready, then closes its relay connection and lives on.
    await d.run.waitFor(/^HUNG UP$/m);
    const r = await d.cli('reload');
    assert.equal(r.code, 0, r.stderr); // as docs/srp.md says: no relay connection, an empty load
    assert.equal(warnings(d).length, 1, 'the reload says the old generation lost its relay connection');
    assert.match(
      warnings(d)[0],
      /^relay: generation 2 has no state relay connection since \S+ \(the app closed it\): generation 3 starts without its state$/,
    );
    await d.stop();
  });

  it('idle connections of strangers cannot block reloads: each is refused at accept, before any read', async () => {
    const { d, port } = await started();
    const messages = await seed(port);
    // Far more than the relay's connection table holds, none of them ever says hello.
    const idle = await Promise.all(
      Array.from(
        { length: 100 },
        () =>
          new Promise<{ socket: net.Socket; answer: Promise<string> }>((resolve, reject) => {
            const socket = net.connect(`${d.dir}/state.sock`);
            socket.once('error', reject);
            socket.once('connect', () => {
              let got = '';
              const answer = new Promise<string>((done) => {
                socket.on('data', (c: Buffer) => (got += c.toString('latin1')));
                socket.once('close', () => done(got));
              });
              resolve({ socket, answer });
            });
          }),
      ),
    );
    const answers = await Promise.all(idle.map((c) => c.answer));
    assert.equal(
      answers.filter((a) => a.includes('"code":"forbidden"')).length,
      100,
      'every stranger got forbidden and was closed',
    );
    const r = await d.cli('reload');
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual((await request(port, 'GET', '/sessions/s1')).history, messages);
    assert.equal(await d.stop(), 0);
  });

  it('a process that is not a managed generation is refused (forbidden)', async () => {
    const { d } = await started();
    const child = spawn(process.execPath, [fixture('apps', 'srp_peer.js'), 'stranger', `${d.dir}/state.sock`], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (c: string) => (out += c));
    await new Promise((r) => child.on('exit', r));
    assert.match(
      out,
      /GOT \{"op":"error","code":"forbidden","message":"pid \d+ is not a process of a generation Aeterna runs"\}/,
    );
    assert.equal((await d.status()).state, 'Running');
    assert.equal(await d.stop(), 0);
  });
});

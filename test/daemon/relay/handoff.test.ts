// Connection handoff (docs/srp.md, "Connection handoff") end to end: the demo agent streams answers over SSE,
// and a reload in the middle hands every stream to the new generation on its own TCP connection. Real daemons
// (PID 1), real sockets, real signals; the clients are plain node:http clients that count what they receive.
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import path from 'node:path';
import { ROOT, descendantsOf, pidNamespaceUnavailable } from '../../helpers/aeterna';
import { Daemon } from '../../helpers/daemon';
import { requestJson } from '../../helpers/load';
import { openStream, type StreamSeen } from '../../helpers/sse';
import { fdCountAtRest, settle } from '../../../bench/soak';

const AGENT = [process.execPath, path.join(ROOT, 'examples', 'llm-agent', 'agent.js')];
const skip = pidNamespaceUnavailable();

const range = (n: number): number[] => Array.from({ length: n }, (_, i) => i);

describe('connection handoff: streams that a reload does not cut', { skip: skip ?? false, timeout: 300000 }, () => {
  const daemons: Daemon[] = [];
  after(async () => {
    for (const d of daemons) await d.run.killAll();
  });

  async function started(): Promise<{ d: Daemon; port: number; session: string }> {
    const d = await Daemon.withHandoff(AGENT, { restart: '{ policy: "always", max_restarts: 10, window: "60s" }' });
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Running', 60000);
    const port = d.options.port!;
    const { id } = await requestJson<{ id: string }>(port, 'POST', '/sessions');
    await requestJson(port, 'POST', `/sessions/${id}/messages`, 'a story about sockets that never close');
    return { d, port, session: id };
  }

  /** Wait until every stream has received at least `n` events. */
  async function eachHas(streams: StreamSeen[], n: number): Promise<void> {
    const ok = await settle(
      () => streams.every((s) => s.indices.length >= n),
      (v) => v,
      60000,
    );
    assert.ok(ok, `every stream reached ${n} events`);
  }

  it('a reload in the middle of 50 SSE streams (PID 1): every stream gets every event once, in order, on one connection; the old generation leaves before them; Aeterna holds none of the connections', async () => {
    const { d, port, session } = await started();
    const aeterna = await d.run.aeternaPid();
    const [oldApp] = descendantsOf(aeterna); // generation 1, as this test's PID namespace sees it
    const fdsBefore = await fdCountAtRest(aeterna);
    const tokens = 80;
    const streams = range(50).map(() => openStream(port, session, tokens));
    await eachHas(streams, 5);
    const r = await d.cli('reload');
    assert.equal(r.code, 0, r.stderr);
    const ends = await Promise.all(streams.map((s) => s.ended));
    // The old generation was gone before the streams ended: it did not wait for them (stop_timeout is 120 s).
    assert.equal(processAlive(oldApp), false, 'the old generation exited');
    assert.equal(descendantsOf(aeterna).length, 1, 'only generation 2 runs');
    for (const [i, s] of streams.entries()) {
      assert.equal(ends[i], 'complete', `stream ${i} ended cleanly`);
      assert.deepEqual(s.indices, range(tokens), `stream ${i}: every index once, in order`);
      assert.equal(s.ports.size, 1, `stream ${i}: one connection`);
      assert.equal(s.generations[0], '1');
      assert.equal(s.generations.at(-1), '2', `stream ${i}: continued by generation 2`);
    }
    assert.match(d.run.stdout + d.run.stderr, /handed 50 stream\(s\) over/);
    const s = await d.status();
    assert.equal(s.generation, 2);
    assert.equal(s.last_reload?.outcome, 'promoted');
    assert.equal(await fdCountAtRest(aeterna), fdsBefore, "Aeterna's fds: as many as before the streams moved");
  });

  it('a stream handed over keeps its connection alive for the next request, served by the new generation', async () => {
    const { d, port, session } = await started();
    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    const stream = openStream(port, session, 30, agent);
    await eachHas([stream], 5);
    assert.equal((await d.cli('reload')).code, 0);
    assert.equal(await stream.ended, 'complete');
    assert.deepEqual(stream.indices, range(30));
    const next = openStream(port, session, 3, agent); // the same keep-alive connection, if it is still open
    assert.equal(await next.ended, 'complete');
    assert.deepEqual(next.generations, ['2', '2', '2']);
    assert.deepEqual([...next.ports], [...stream.ports], 'the same TCP connection served the next request');
    agent.destroy();
  });

  it('a reload that rolls back hands nothing over: the streams finish on the old generation', async () => {
    const { d, port, session } = await started();
    const streams = range(10).map(() => openStream(port, session, 40));
    await eachHas(streams, 5);
    d.write({ ...d.options, command: [process.execPath, '-e', 'process.exit(3)'] });
    const r = await d.cli('reload');
    assert.notEqual(r.code, 0, 'the reload failed');
    assert.equal((await d.status()).last_reload?.outcome, 'rolled_back');
    for (const s of streams) {
      assert.equal(await s.ended, 'complete');
      assert.deepEqual(s.indices, range(40));
      assert.deepEqual(new Set(s.generations), new Set(['1']));
    }
  });

  it('a new generation that dies holding adopted connections: their clients see the stream end, nothing repeated, and Aeterna restarts the app', async () => {
    const { d, port, session } = await started();
    const streams = range(10).map(() => openStream(port, session, 1000));
    await eachHas(streams, 5);
    assert.equal((await d.cli('reload')).code, 0);
    await settle(
      () => streams.every((s) => s.generations.includes('2')),
      (v) => v,
      60000,
    );
    const promoted = await d.status();
    const aeterna = await d.run.aeternaPid();
    await settle(
      () => descendantsOf(aeterna).length,
      (n) => n === 1,
      60000,
    );
    const [app] = descendantsOf(aeterna); // generation 2: the old one has left
    process.kill(app, 'SIGKILL');
    for (const s of streams) {
      assert.equal(await s.ended, 'cut', 'the connection ended with the generation that held it');
      assert.deepEqual(s.indices, range(s.indices.length), 'no index missing or repeated up to the cut');
    }
    const restarted = await d.waitStatus((s) => s.state === 'Running' && s.pid !== promoted.pid, 60000);
    assert.equal(restarted.restarts, 1);
  });
});

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

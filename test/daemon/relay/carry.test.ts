// What `aeterna upgrade` and crash recovery carry over for the state relay: the
// generations' idle relay connections (the SDKs keep theirs open for the app's
// whole life) and the in-memory checkpoint. Real daemons, real SDK apps, real
// signals; as PID 1 where it matters.
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { descendantsOf, fixture, freePort, pidNamespaceUnavailable } from '../../helpers/aeterna';
import { Daemon, socketOf, statusOf, upgradeTimes } from '../../helpers/daemon';
import { encodeMessage } from '../../../src/control/protocol';
import { requestJson } from '../../helpers/load';
import { fdCountAtRest } from '../../../bench/soak';

const TS_APP = [process.execPath, fixture('apps', 'stateful_app.js')];
const PYTHON_APP = ['python3', fixture('python', 'stateful_app.py')];
const skip = pidNamespaceUnavailable();

type Reply = {
  pid: number;
  generation: string;
  history?: string[];
  seq?: number;
  error?: string;
  source: string | null;
  loaded_seq: number | null;
};
const request = (port: number, method: string, path: string, body?: string): Promise<Reply> =>
  requestJson<Reply>(port, method, path, body);

describe('relay connections and checkpoints carried across re-execs', { skip: skip ?? false, timeout: 240000 }, () => {
  const daemons: Daemon[] = [];
  after(async () => {
    for (const d of daemons) await d.run.killAll();
  });

  /** A daemon whose app speaks the state relay (checkpoints on), Running and past its initial load. */
  async function started(
    options: { command?: string[]; env?: string[]; pid1?: boolean; handoff?: string } = {},
  ): Promise<{ d: Daemon; port: number }> {
    const port = await freePort();
    const d = new Daemon({
      command: options.command ?? TS_APP,
      port,
      env: options.env ?? [],
      readiness: '{ mode: "notify", timeout: "60s" }',
      stopTimeout: '5s',
      restart: '{ policy: "always", max_restarts: 10, window: "60s" }',
    });
    d.write({
      ...d.options,
      handoff: `{ enabled: true, socket_path: "${d.dir}/state.sock", ${options.handoff ?? 'timeout: "30s"'}, checkpoint: { enabled: true } }`,
    });
    d.start(options.pid1 ?? false);
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Running');
    return { d, port };
  }

  /** `aeterna upgrade` through the CLI: exit 0 and the re-exec count it reached. */
  async function upgrade(d: Daemon, expectReexecs: number): Promise<void> {
    const r = await d.cli('upgrade');
    assert.equal(r.code, 0, `upgrade ${expectReexecs}: ${r.stderr}`);
    assert.equal((await statusOf(d)).reexecs, expectReexecs);
  }

  it('TypeScript SDK app, as PID 1: 3 upgrades keep its relay connection (same pid); a checkpoint() after them works and a reload relays its state', async () => {
    const { d, port } = await started({ pid1: true });
    await request(port, 'POST', '/sessions/s1/messages', 'remember me');
    const before = await statusOf(d);
    for (let i = 1; i <= 3; i++) await upgrade(d, i);
    const after = await statusOf(d);
    assert.equal(after.pid, before.pid, 'the same app process');
    assert.equal(after.generation, before.generation);
    assert.equal(d.run.logs().filter((l) => /took over 1 state relay connection/.test(String(l.msg))).length, 3);
    assert.equal(
      (await request(port, 'POST', '/checkpoint')).seq,
      1,
      'relay.checkpoint() on the carried connection is answered',
    );
    assert.equal((await d.cli('reload')).code, 0);
    const reloaded = await request(port, 'GET', '/sessions/s1');
    assert.notEqual(reloaded.pid, before.pid);
    assert.deepEqual(reloaded.history, ['remember me'], 'the state reached the next generation');
    assert.equal(reloaded.source, 'relay');
  });

  it('Python SDK app: an upgrade keeps its relay connection and the next reload relays its state', async () => {
    const { d, port } = await started({ command: PYTHON_APP });
    await request(port, 'POST', '/sessions/p1/messages', 'one');
    const before = await statusOf(d);
    await upgrade(d, 1);
    assert.equal((await statusOf(d)).pid, before.pid);
    assert.equal((await d.cli('reload')).code, 0);
    const reloaded = await request(port, 'GET', '/sessions/p1');
    assert.deepEqual(reloaded.history, ['one']);
    assert.equal(reloaded.source, 'relay');
  });

  it('an in-memory checkpoint survives an upgrade (status shows the same seq), and kill -9 of the app afterwards restores it', async () => {
    const { d, port } = await started({ env: ['CHECKPOINT=1'], pid1: true });
    await request(port, 'POST', '/sessions/c1/messages', 'a');
    assert.equal((await request(port, 'POST', '/sessions/c1/messages', 'b')).seq, 2);
    const before = await statusOf(d);
    assert.equal(before.checkpoint?.seq, 2);
    await upgrade(d, 1);
    const after = await statusOf(d);
    assert.equal(after.checkpoint?.seq, 2, 'the same checkpoint after the upgrade');
    assert.equal(after.checkpoint?.size, before.checkpoint?.size);
    const app = descendantsOf(await d.run.aeternaPid());
    assert.equal(app.length, 1);
    process.kill(app[0], 'SIGKILL');
    await d.waitStatus((s) => s.state === 'Running' && s.generation > before.generation, 60000);
    const restored = await request(port, 'GET', '/sessions/c1');
    assert.deepEqual(restored.history, ['a', 'b']);
    assert.equal(restored.source, 'checkpoint');
    assert.equal(restored.loaded_seq, 2);
  });

  it('as PID 1, a SIGSEGV recovery keeps an idle relay connection: the next reload relays the state', async () => {
    const { d, port } = await started({ pid1: true });
    await request(port, 'POST', '/sessions/s2/messages', 'kept through a crash');
    const before = await statusOf(d);
    await d.run.signal('SIGSEGV');
    await d.waitStatus((s) => ((s as { reexecs?: number }).reexecs ?? 0) >= 1);
    assert.equal((await statusOf(d)).pid, before.pid);
    assert.equal(d.run.logs().filter((l) => /took over 1 state relay connection/.test(String(l.msg))).length, 1);
    assert.equal((await d.cli('reload')).code, 0);
    const reloaded = await request(port, 'GET', '/sessions/s2');
    assert.deepEqual(reloaded.history, ['kept through a crash']);
    assert.equal(reloaded.source, 'relay');
  });

  it('an upgrade while a checkpoint is streaming waits for it, then succeeds: the checkpoint is stored and answered, the connection carried', async () => {
    const { d } = await started({ command: [process.execPath, fixture('apps', 'srp_peer.js'), 'slowcheckpoint'] });
    await d.run.waitFor(/HALF SENT/);
    const peer = (await statusOf(d)).pid!;
    const upgrading = d.cli('upgrade');
    await d.run.waitFor(/upgrade: waiting until generation 1 is done with a checkpoint being received/);
    assert.equal((await statusOf(d)).reexecs, 0, 'not re-executed while the checkpoint is in flight');
    process.kill(peer, 'SIGUSR1');
    const r = await upgrading;
    assert.equal(r.code, 0, r.stderr);
    await d.run.waitFor(/GOT \{"op":"checkpointed","seq":1\}/);
    const after = await statusOf(d);
    assert.equal(after.reexecs, 1);
    assert.equal(after.pid, peer, 'the peer exits when its connection closes: it was carried');
    assert.equal(after.checkpoint?.seq, 1);
    assert.equal(after.checkpoint?.size, 4 << 20);
  });

  it('an upgrade while a checkpoint stays in flight past state_handoff.timeout is refused (E_UPGRADE_REFUSED naming why) and changes nothing', async () => {
    const { d } = await started({
      command: [process.execPath, fixture('apps', 'srp_peer.js'), 'slowcheckpoint'],
      handoff: 'timeout: "1s"',
    });
    await d.run.waitFor(/HALF SENT/);
    const peer = (await statusOf(d)).pid!;
    const r = await d.cli('upgrade');
    assert.equal(r.code, 1, r.stderr);
    assert.match(
      r.stderr,
      /generation 1 is busy with a checkpoint being received after 1s \(orchestration.state_handoff.timeout\).*nothing changed \(E_UPGRADE_REFUSED\)/,
    );
    assert.equal((await statusOf(d)).reexecs, 0);
    // The checkpoint goes on where it was: finished, stored and answered.
    process.kill(peer, 'SIGUSR1');
    await d.run.waitFor(/GOT \{"op":"checkpointed","seq":1\}/);
    assert.equal((await statusOf(d)).pid, peer);
  });

  it('an upgrade whose client goes away while it waits for a checkpoint still happens once the checkpoint is stored: the relay is never left frozen', async () => {
    const { d } = await started({ command: [process.execPath, fixture('apps', 'srp_peer.js'), 'slowcheckpoint'] });
    await d.run.waitFor(/HALF SENT/);
    const peer = (await statusOf(d)).pid!;
    const client = net.connect(socketOf(d));
    client.on('error', () => undefined);
    client.write(encodeMessage({ cmd: 'upgrade' }));
    await d.run.waitFor(/upgrade: waiting until generation 1/);
    client.destroy();
    await new Promise((res) => client.once('close', res));
    process.kill(peer, 'SIGUSR1');
    await d.run.waitFor(/GOT \{"op":"checkpointed","seq":1\}/);
    const after = await d.waitStatus((s) => ((s as { reexecs?: number }).reexecs ?? 0) === 1);
    assert.equal(after.pid, peer, 'the connection was carried');
    assert.equal((await statusOf(d)).checkpoint?.seq, 1);
  });

  it('a SIGSEGV while a checkpoint is streaming: that connection is not carried (the new Aeterna never reads half a frame), Aeterna recovers, the partial checkpoint is never stored', async () => {
    const { d } = await started({
      command: [process.execPath, fixture('apps', 'srp_peer.js'), 'slowcheckpoint'],
      pid1: true,
    });
    await d.run.waitFor(/HALF SENT/);
    const peer = descendantsOf(await d.run.aeternaPid());
    assert.equal(peer.length, 1);
    await d.run.signal('SIGSEGV');
    await d.waitStatus((s) => ((s as { reexecs?: number }).reexecs ?? 0) >= 1);
    // The peer exits when its connection closes (a real SDK's checkpoint() call fails instead); it was not carried.
    await d.waitStatus((s) => s.generation > 1 && s.state === 'Running', 60000);
    assert.ok(!descendantsOf(await d.run.aeternaPid()).includes(peer[0]), 'the busy connection closed at the exec');
    assert.equal(d.run.logs().filter((l) => /took over \d+ state relay connection/.test(String(l.msg))).length, 0);
    assert.equal((await statusOf(d)).checkpoint ?? null, null, 'half a checkpoint is never stored');
  });

  it("Aeterna's fd count is the same after 20 upgrades with a relay connection and a checkpoint", async () => {
    const { d, port } = await started({ env: ['CHECKPOINT=1'] });
    assert.equal((await request(port, 'POST', '/sessions/f1/messages', 'x')).seq, 1);
    const aeterna = d.run.child.pid!;
    const before = await statusOf(d);
    const fds = await fdCountAtRest(aeterna);
    await upgradeTimes(d, 20);
    const after = await statusOf(d);
    assert.equal(after.pid, before.pid);
    assert.equal(after.checkpoint?.seq, 1);
    assert.equal(await fdCountAtRest(aeterna), fds, "Aeterna's fd count after 20 upgrades");
    // and the connection still works: a checkpoint over it is stored as the next one
    assert.equal((await request(port, 'POST', '/sessions/f1/messages', 'y')).seq, 2);
  });
});

// The direct transport of the State Relay (docs/srp.md, "Direct transport"): the old generation writes its
// state on a socket pair Aeterna made for the relay, the new one reads it there; Aeterna relays only the
// header, the digest trailer and the verdicts. Every failure of the pair rolls the reload back with the old
// generation serving and its relay connection in step; clients without "direct" keep the frames.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { fixture, freePort, tempDir } from '../../helpers/aeterna';
import { Daemon, type ConfigOptions } from '../../helpers/daemon';
import { requestJson } from '../../helpers/load';
import { fdCountAtRest } from '../../../bench/soak';

const TS_APP = [process.execPath, fixture('apps', 'stateful_app.js')];
const SENDER = [process.execPath, fixture('apps', 'direct_sender.js')];
const PY_APP = ['python3', fixture('apps', 'plain_state_app.py')];
const SIZE = 8 << 20;
const daemons: Daemon[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
});

/** The bytes direct_sender.js holds: byte i is i % 251. */
function senderDigest(size: number): string {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i++) b[i] = i % 251;
  return crypto.createHash('sha256').update(b).digest('hex');
}

async function started(options: Partial<ConfigOptions>): Promise<{ d: Daemon; port: number }> {
  const port = await freePort();
  const d = new Daemon({
    command: TS_APP,
    port,
    handoff: true,
    readiness: '{ mode: "notify", timeout: "60s" }',
    stopTimeout: '5s',
    ...options,
  });
  d.start();
  daemons.push(d);
  await d.waitStatus((s) => s.state === 'Running');
  return { d, port };
}

/** What the relay did, from Aeterna's log: was the pair offered, which transport did the state take, with which check. */
function relays(d: Daemon): Array<{ direct: unknown; transport: unknown; checksum: unknown }> {
  const logs = d.run.logs();
  const offered = logs.filter((l) => l.msg === 'relay: dump requested' && l.final === false).map((l) => l.direct);
  const taken = logs.filter((l) => l.msg === 'relay: state announced' && l.final === false);
  return offered.map((direct, i) => ({ direct, transport: taken[i]?.transport, checksum: taken[i]?.checksum }));
}

const DIRECT_CRC = { direct: true, transport: 'direct', checksum: 'crc32' };
const DIRECT_SHA = { direct: true, transport: 'direct', checksum: 'sha256' };

const blob = (port: number): Promise<{ pid: number; size: number; sha256: string }> =>
  requestJson(port, 'GET', '/blob');

describe('the direct transport', { timeout: 240000 }, () => {
  it('two TypeScript SDK generations relay a binary state on a socket pair, byte-exact', async () => {
    const { d, port } = await started({ env: ['STATE_MODE=binary', `BLOB_BYTES=${SIZE}`] });
    const before = await blob(port);
    const r = await d.cli('reload');
    assert.equal(r.code, 0, r.stderr);
    const after = await blob(port);
    assert.notEqual(after.pid, before.pid);
    assert.equal(after.size, SIZE);
    assert.equal(after.sha256, before.sha256);
    assert.deepEqual(relays(d), [DIRECT_CRC]);
    assert.equal(await d.stop(), 0);
  });

  it('two Python SDK generations relay a state on a socket pair, verified by the new one', async () => {
    const stamps = tempDir('aeterna-direct-py-');
    const { d } = await started({
      command: PY_APP,
      env: [`STATE_BYTES=${SIZE}`, `STAMP_DIR=${stamps}`],
      port: undefined,
    });
    const r = await d.cli('reload');
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(relays(d), [DIRECT_CRC]);
    assert.equal(await d.stop(), 0);
  });

  it('a Python SDK sender and a TypeScript SDK receiver meet on the pair', async () => {
    const stamps = tempDir('aeterna-direct-mixed-');
    const { d, port } = await started({
      command: PY_APP,
      env: [`STATE_BYTES=${SIZE}`, `STAMP_DIR=${stamps}`, 'STATE_MODE=binary'],
    });
    d.write({ ...d.options, command: TS_APP });
    const r = await d.cli('reload');
    assert.equal(r.code, 0, r.stderr);
    assert.equal((await blob(port)).size, SIZE);
    assert.deepEqual(relays(d), [DIRECT_CRC]);
    assert.equal(await d.stop(), 0);
  });
});

describe(
  'the direct transport fails safe: rolled back, the old generation serves, its next relay works',
  { timeout: 300000 },
  () => {
    /** A direct_sender with `fault` on its first dump, reloaded into a TypeScript SDK app: rolled back with `reason`, then a clean reload. */
    async function faultyThenClean(fault: string, reason: RegExp, handoffTimeout = '10s'): Promise<Daemon> {
      const port = await freePort();
      const { d } = await started({ command: SENDER, port, env: [`DIRECT_FAULT=${fault}`, `STATE_BYTES=${SIZE}`] });
      d.write({
        ...d.options,
        handoff: `{ enabled: true, socket_path: "${d.dir}/state.sock", timeout: "${handoffTimeout}" }`,
      });
      const old = (await d.status()).pid;
      d.write({ ...d.options, command: TS_APP, env: ['STATE_MODE=binary'] });
      const r = await d.cli('reload');
      assert.equal(r.code, 1, r.stderr);
      assert.match(r.stderr, reason);
      const s = await d.status();
      assert.equal(s.state, 'Running');
      assert.equal(s.pid, old, 'the old generation still serves');
      assert.equal(s.last_reload?.outcome, 'rolled_back');
      // Its relay connection is in step: the next dump (answered correctly) reaches a new generation whole.
      const again = await d.cli('reload');
      assert.equal(again.code, 0, again.stderr);
      const got = await blob(port);
      assert.equal(got.size, SIZE);
      assert.equal(got.sha256, senderDigest(SIZE));
      assert.equal(await d.stop(), 0);
      return d;
    }

    it('truncation: the sender closes the pair after half the bytes; the receiver refuses it (bad_state)', async () => {
      const d = await faultyThenClean(
        'truncate',
        /refused the state: bad_state: received 4194304 bytes on the direct socket pair before its end of file, 8388608 announced/,
      );
      assert.deepEqual(relays(d), [DIRECT_SHA, DIRECT_SHA]);
    });

    it('extra bytes: more than announced on the pair; the receiver refuses it (bad_state)', async () =>
      void (await faultyThenClean(
        'extra',
        /refused the state: bad_state: received 8388708 bytes on the direct socket pair before its end of file, 8388608 announced/,
      )));

    it('checksum mismatch: a trailer that matches nothing; the receiver refuses it (checksum_mismatch)', async () =>
      void (await faultyThenClean('badsum', /refused the state: checksum_mismatch/)));

    it('CRC-32 mismatch: a crc32 trailer that matches nothing; the receiver refuses it (checksum_mismatch)', async () => {
      const d = await faultyThenClean(
        'badcrc',
        /refused the state: checksum_mismatch: crc32 of the 8388608 bytes received is not 00000000/,
      );
      assert.deepEqual(relays(d), [DIRECT_CRC, DIRECT_SHA]);
    });

    it('a stalled transfer times out and rolls back; the sender gets its end of file and stays in step', async () =>
      void (await faultyThenClean('stall', /state relay failed: timed out after 2s/, '2s')));

    for (const [fault, reason] of [
      ['truncate', /refused the state: bad_state: the direct socket pair ended after 4194304 of 8388608 bytes/],
      ['extra', /refused the state: bad_state: more bytes than the 8388608 announced on the direct socket pair/],
      ['badsum', /refused the state: checksum_mismatch: announced sha256 0{64}/],
    ] as const) {
      it(`a Python SDK receiver refuses a direct state with the fault "${fault}"`, async () => {
        const port = await freePort();
        const stamps = tempDir('aeterna-direct-pyrx-');
        const { d } = await started({
          command: SENDER,
          port,
          env: [`DIRECT_FAULT=${fault}`, `STATE_BYTES=${SIZE}`, `STAMP_DIR=${stamps}`],
        });
        const old = (await d.status()).pid;
        d.write({ ...d.options, command: PY_APP });
        const r = await d.cli('reload');
        assert.equal(r.code, 1, r.stderr);
        assert.match(r.stderr, reason);
        assert.equal((await d.status()).pid, old, 'the old generation still serves');
        assert.deepEqual(relays(d), [DIRECT_SHA]);
        assert.equal(await d.stop(), 0);
      });
    }

    it('nack: a receiver that refuses a direct state rolls the reload back', async () => {
      const { d, port } = await started({ env: ['STATE_MODE=binary', `BLOB_BYTES=${SIZE}`] });
      const before = await blob(port);
      d.write({ ...d.options, env: ['STATE_MODE=binary', 'NACK=1'] });
      const r = await d.cli('reload');
      assert.equal(r.code, 1);
      assert.match(r.stderr, /refused the state: load_failed: .*NACK=1/);
      const after = await blob(port);
      assert.equal(after.pid, before.pid);
      assert.equal(after.sha256, before.sha256, 'its state is intact');
      assert.deepEqual(relays(d), [DIRECT_CRC]);
      assert.equal(await d.stop(), 0);
    });
  },
);

describe('an SDK sender whose receiver never reads', { timeout: 180000 }, () => {
  // The new generation says it takes the pair, then reads nothing: the pair's end rides unread in its socket.
  // The sender fills the pair and blocks; Aeterna times out and stops the new generation, which closes that end;
  // the SDK's write fails, it still sends its trailer, and its next relay goes through whole.
  for (const sdk of ['typescript', 'python'] as const) {
    it(`${sdk}: rolled back after the timeout; the sender stays in step and the next reload relays the state`, async () => {
      const stamps = tempDir('aeterna-direct-stall-');
      const app = sdk === 'typescript' ? TS_APP : PY_APP;
      const env =
        sdk === 'typescript'
          ? ['STATE_MODE=binary', `BLOB_BYTES=${32 << 20}`]
          : [`STATE_BYTES=${32 << 20}`, `STAMP_DIR=${stamps}`];
      const { d } = await started({ command: app, env });
      const old = (await d.status()).pid;
      d.write({
        ...d.options,
        command: [process.execPath, fixture('apps', 'srp_peer.js'), 'stalldirect'],
        handoff: `{ enabled: true, socket_path: "${d.dir}/state.sock", timeout: "2s" }`,
      });
      const r = await d.cli('reload');
      assert.equal(r.code, 1, r.stderr);
      assert.match(r.stderr, /state relay failed: timed out after 2s/);
      assert.equal((await d.status()).pid, old, 'the old generation still serves');
      d.write({ ...d.options, command: app, handoff: true });
      const again = await d.cli('reload');
      assert.equal(again.code, 0, again.stderr);
      assert.deepEqual(relays(d), [DIRECT_CRC, DIRECT_CRC]);
      assert.equal(await d.stop(), 0);
    });
  }
});

describe('mixed clients keep the frames', { timeout: 180000 }, () => {
  /** A direct_sender with `fault`, reloaded into a TypeScript SDK app: relayed whole, as `relay` says. */
  async function framesReachReceiver(
    fault: string,
    relay: { direct: boolean; transport: string; checksum: string },
  ): Promise<void> {
    const port = await freePort();
    const { d } = await started({ command: SENDER, port, env: [`DIRECT_FAULT=${fault}`, `STATE_BYTES=${SIZE}`] });
    d.write({ ...d.options, command: TS_APP, env: ['STATE_MODE=binary'] });
    assert.equal((await d.cli('reload')).code, 0);
    assert.equal((await blob(port)).sha256, senderDigest(SIZE));
    assert.deepEqual(relays(d), [relay]);
    assert.equal(await d.stop(), 0);
  }

  it('a sender whose hello has no "direct" is offered no pair; its frames reach a direct-capable receiver', async () =>
    framesReachReceiver('nodirect', { direct: false, transport: 'stream', checksum: 'sha256' }));

  it('a receiver whose hello has no "direct" gets data frames; the sender is offered no pair', async () => {
    const { d } = await started({ env: ['STATE_MODE=binary', `BLOB_BYTES=${SIZE}`] });
    d.write({
      ...d.options,
      command: [process.execPath, fixture('apps', 'srp_peer.js'), 'hang'],
      handoff: `{ enabled: true, socket_path: "${d.dir}/state.sock", timeout: "2s" }`,
    });
    const reload = d.cli('reload');
    await d.run.waitFor(/GOT <\d+ bytes>/); // data frames, not a pair
    assert.equal((await reload).code, 1, 'the peer never acks: rolled back');
    assert.deepEqual(relays(d), [{ direct: false, transport: 'stream', checksum: 'sha256' }]);
    assert.equal(await d.stop(), 0);
  });

  it('a sender that declines the offered pair sends frames; Aeterna closes the unused end', async () =>
    framesReachReceiver('decline', { direct: true, transport: 'stream', checksum: 'sha256' }));
});

describe('no leaked pair ends', { timeout: 240000 }, () => {
  it("Aeterna's fd count is the same after 12 direct relays (4 of them failing) as before", async () => {
    const { d, port } = await started({ env: ['STATE_MODE=binary', `BLOB_BYTES=${1 << 20}`] });
    const aeterna = await d.run.aeternaPid();
    assert.equal((await d.cli('reload')).code, 0); // the first reload opens what stays open (e.g. the control client's paths)
    await d.untilRetired(); // the old generation's relay connection goes with it
    const before = await fdCountAtRest(aeterna);
    for (let i = 0; i < 12; i++) {
      const nack = i % 3 === 2;
      d.write({ ...d.options, env: ['STATE_MODE=binary', ...(nack ? ['NACK=1'] : [])] });
      assert.equal((await d.cli('reload')).code, nack ? 1 : 0);
    }
    assert.equal((await blob(port)).size, 1 << 20);
    await d.untilRetired();
    assert.equal(await fdCountAtRest(aeterna), before, "Aeterna's fd count");
    assert.equal(
      relays(d).filter((r) => r.direct === true && r.transport === 'direct' && r.checksum === 'crc32').length,
      13,
    );
    assert.equal(await d.stop(), 0);
  });
});

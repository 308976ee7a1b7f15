// The weighted canary (orchestration.canary): real sockets, a real daemon, real
// connections. Shares and counts are asserted, never timings.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import { fdCountAtRest } from '../../../bench/soak';
import { freshConnections, generationOf, startFreshLoad } from '../../../bench/sections/canary';
import { fixture, freePort, pidNamespaceUnavailable, runAeterna } from '../../helpers/aeterna';
import { Daemon, statusOf, type ConfigOptions } from '../../helpers/daemon';
import { getText, metricSample, startLoad, type LoadStats } from '../../helpers/load';

const APP = [process.execPath, fixture('apps', 'reload_app.js')];
const MIGRATE_SYSCTL = '/proc/sys/net/ipv4/tcp_migrate_req';
/** Whether the kernel will migrate a closing listener's queued connections (Linux 5.14+): on, or Aeterna can turn it on. */
function migrationUnavailable(): string | false {
  try {
    if (fs.readFileSync(MIGRATE_SYSCTL, 'utf8').trim() !== '1') fs.accessSync(MIGRATE_SYSCTL, fs.constants.W_OK);
    return false;
  } catch (err) {
    return `net.ipv4.tcp_migrate_req is absent (before Linux 5.14) or off and read-only here (${(err as NodeJS.ErrnoException).code}): a dead canary's queued connections are reset, as docs/operations.md says`;
  }
}
const noMigration = migrationUnavailable();
const daemons: Daemon[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
});

async function started(
  options: Omit<ConfigOptions, 'port' | 'command'> & { command?: string[] },
): Promise<{ d: Daemon; port: number }> {
  const port = await freePort();
  const d = new Daemon({ command: APP, strategy: 'canary', soak: '10m', ...options, port }).start();
  daemons.push(d);
  await d.waitStatus((s) => s.state === 'Running');
  return { d, port };
}

/** `count` fresh connections, 16 at a time, none failing: how many reached each generation. */
async function fresh(port: number, count: number): Promise<Map<number, number>> {
  const { byGeneration, failures } = await freshConnections(port, count);
  assert.deepEqual(failures, [], `every one of ${count} fresh connections answered`);
  return byGeneration;
}

/**
 * The side (the serving generation, or the candidate) that client_ip affinity picks for `address` at `weight`, as
 * docs/configuration.md describes it: the IPv4 source (also for a v4 client of an IPv6 socket, whose packets are
 * IPv4), or the XOR of the four 32-bit words of an IPv6 source, times 2654435761 (mod 2^32), below weight% of 2^32.
 */
function expectedSide(address: string, weight: number): 'old' | 'new' {
  let word: number;
  if (net.isIPv4(address)) {
    word = address.split('.').reduce((w, octet) => ((w << 8) | Number(octet)) >>> 0, 0);
  } else {
    const groups = address.split('::');
    const head = groups[0] ? groups[0].split(':') : [];
    const tail = groups[1] ? groups[1].split(':') : [];
    const all = [...head, ...Array<string>(8 - head.length - tail.length).fill('0'), ...tail].map((g) =>
      parseInt(g, 16),
    );
    word = 0;
    for (let i = 0; i < 8; i += 2) word = (word ^ ((all[i] << 16) | all[i + 1])) >>> 0;
  }
  const hash = Math.imul(word, 2654435761) >>> 0;
  return hash < Math.floor((weight / 100) * 2 ** 32) ? 'new' : 'old';
}

/** The TCP listening sockets on `port` in `pid`'s network namespace: inode to accept queue length. */
function listenersOn(pid: number, port: number): Map<string, number> {
  const found = new Map<string, number>();
  for (const table of ['tcp', 'tcp6']) {
    for (const line of fs.readFileSync(`/proc/${pid}/net/${table}`, 'utf8').split('\n').slice(1)) {
      const f = line.trim().split(/\s+/);
      // local_address is ADDR:PORT in hex; st 0A is LISTEN; for a listener rx_queue is its accept queue.
      if (f.length > 9 && f[3] === '0A' && parseInt(f[1].split(':')[1], 16) === port)
        found.set(f[9], parseInt(f[4].split(':')[1], 16));
    }
  }
  return found;
}

/** The inode of the socket at `pid`'s fd 3 when it is a TCP listener on `port`, else null. */
function listenerAtFd3(pid: number, port: number): string | null {
  const inode = /^socket:\[(\d+)\]$/.exec(fs.readlinkSync(`/proc/${pid}/fd/3`))?.[1];
  return inode !== undefined && listenersOn(pid, port).has(inode) ? inode : null;
}

/** Start a weighted reload and wait until it soaks; resolves with the pending `aeterna reload`. */
async function soaking(d: Daemon): Promise<{ reload: ReturnType<Daemon['cli']> }> {
  const reload = d.cli('reload');
  await d.waitStatus((s) => s.state === 'Soaking');
  return { reload }; // wrapped: an async function would wait for the reload itself
}

describe('weighted canary', { timeout: 600000 }, () => {
  for (const weight of [10, 50]) {
    it(`weight ${weight}: of 2,000 fresh connections during the soak the new generation gets ${weight}% (±4 points); aeterna status (text and JSON) and aeterna_canary_weight show the weight during the soak, not after`, async () => {
      const metricsPort = await freePort();
      const { d, port } = await started({ canary: `{ weight: ${weight} }`, metricsPort });
      const weightMetric = async (): Promise<number | null> =>
        metricSample((await getText(metricsPort, '/metrics')).body, 'aeterna_canary_weight');
      assert.equal(await weightMetric(), 0, 'the gauge is 0 before any soak');
      const { reload } = await soaking(d);
      const status = await statusOf(d);
      assert.equal(status.canary_weight, weight);
      assert.match(
        (await d.cli('status')).stdout,
        new RegExp(`^canary weight: +${weight}% of new connections to the candidate$`, 'm'),
      );
      assert.equal(await weightMetric(), weight);
      assert.match(
        d.run.stderr,
        new RegExp(`soaking: 10m, ${weight}% of new connections to generation 2`),
        'the soak phase names the weight',
      );
      const seen = await fresh(port, 2000);
      assert.deepEqual([...seen.keys()].sort(), [1, 2], `both generations answered: ${JSON.stringify([...seen])}`);
      const share = ((seen.get(2) ?? 0) / 2000) * 100;
      assert.ok(Math.abs(share - weight) <= 4, `new generation's share ${share.toFixed(1)}% against weight ${weight}`);
      assert.equal((await d.cli('promote')).code, 0);
      assert.equal((await reload).code, 0);
      assert.equal((await statusOf(d)).canary_weight, null, 'no weight outside a soak');
      assert.doesNotMatch((await d.cli('status')).stdout, /canary weight/);
      assert.equal(await weightMetric(), 0, 'the gauge is 0 after the soak');
      assert.equal(await d.stopServing(), 0);
    });
  }

  it('client_ip affinity: 20 connections from each of 8 addresses 127.0.0.2-9 land on one generation per address', async () => {
    const { d, port } = await started({ canary: '{ weight: 50, affinity: "client_ip" }' });
    const { reload } = await soaking(d);
    const byAddress = new Map<string, Set<number>>();
    for (let i = 2; i <= 9; i++) {
      const address = `127.0.0.${i}`;
      const gens = new Set<number>();
      for (let n = 0; n < 20; n++) gens.add(await generationOf(port, address));
      byAddress.set(address, gens);
    }
    for (const [address, gens] of byAddress)
      assert.equal(gens.size, 1, `${address} reached generations ${[...gens].join(',')}`);
    assert.equal((await d.cli('rollback')).code, 0);
    assert.equal((await reload).code, 1);
    assert.equal(await d.stopServing(), 0);
  });

  for (const { listen, clients, weights } of [
    {
      listen: '[::]',
      clients: ['127.0.0.2', '127.0.0.3', '127.0.0.4', '127.0.0.5', '127.0.0.6', '127.0.0.7', '127.0.0.8', '127.0.0.9'],
      weights: [70],
    },
    // ::1 hashes to 0.618 of the range: the old generation's at weight 50, the candidate's at 70. A program that
    // read an IPv6 packet as IPv4 would hash 0 (the candidate's at both); one that failed would pick the old one at both.
    { listen: '[::1]', clients: ['::1'], weights: [50, 70] },
  ]) {
    it(`client_ip affinity on an IPv6 listener tcp://${listen}, weight ${weights.join(' then ')}: 20 connections from each of ${clients.join(', ')} land on the generation the documented address hash picks`, async () => {
      const port = await freePort();
      const listener = `  listeners:\n    - name: "http"\n      address: "tcp://${listen}:${port}"\n`;
      // The canary is set from the start: a listener bound without it has no reuseport group to split.
      const d = new Daemon({
        command: APP,
        strategy: 'canary',
        soak: '10m',
        extraService: listener,
        canary: `{ weight: ${weights[0]} }`,
      }).start();
      daemons.push(d);
      await d.waitStatus((s) => s.state === 'Running');
      const host = listen === '[::1]' ? '::1' : '127.0.0.1';
      for (const weight of weights) {
        d.write({ ...d.options, canary: `{ weight: ${weight}, affinity: "client_ip" }` });
        const { reload } = await soaking(d);
        const candidate = (await statusOf(d)).candidate!.generation;
        for (const client of clients) {
          const gens = new Set<number>();
          for (let n = 0; n < 20; n++) gens.add(await generationOf(port, client, host));
          const expected = expectedSide(client, weight) === 'new' ? candidate : candidate - 1;
          assert.deepEqual(
            [...gens],
            [expected],
            `${client} (IPv${client.includes(':') ? 6 : '4 on an IPv6 socket, v4-mapped'}) at weight ${weight}`,
          );
        }
        assert.equal((await d.cli('rollback')).code, 0);
        assert.equal((await reload).code, 1);
      }
      assert.equal(await d.stopServing(), 0);
    });
  }

  for (const ending of ['promote', 'rollback'] as const) {
    it(`${ending} under keep-alive and fresh-connection load at weight 50: zero failed requests, then every new connection reaches the ${ending === 'promote' ? 'new' : 'old'} generation`, async () => {
      const { d, port } = await started({ canary: '{ weight: 50 }' });
      const { reload } = await soaking(d);
      const keepAlive = startLoad(port, { concurrency: 8 });
      const freshLoad = startFreshLoad(port, 4);
      await fresh(port, 200); // both generations serve meanwhile
      assert.equal((await d.cli(ending)).code, 0);
      const r = await reload;
      assert.equal(r.code, ending === 'promote' ? 0 : 1, r.stderr);
      const s = await d.waitStatus((st) => st.state === 'Running');
      await freshLoad.stop();
      const stats = await keepAlive.stop();
      assert.deepEqual(stats.failures, {}, 'no keep-alive request failed');
      assert.deepEqual(freshLoad.failures, [], 'no fresh connection failed');
      assert.ok(stats.ok > 0 && freshLoad.answeredBy.size > 0);
      const winner = ending === 'promote' ? 2 : 1;
      assert.equal(s.generation, winner);
      assert.deepEqual([...(await fresh(port, 200))], [[winner, 200]], 'every new connection reaches the winner');
      assert.equal(await d.stopServing(), 0);
    });
  }

  it("50 weighted reloads in a row: Aeterna's fd count flat and the app finds its listener at fd 3", async () => {
    const { d, port } = await started({ canary: '{ weight: 50 }' });
    const aeterna = await d.run.aeternaPid();
    const first = await statusOf(d);
    const serving = listenerAtFd3(first.pid!, port);
    assert.ok(serving, 'generation 1 has its listener at fd 3');
    const fdsBefore = await fdCountAtRest(aeterna);
    for (let i = 1; i <= 50; i++) {
      const { reload } = await soaking(d);
      const soak = await statusOf(d);
      const candidate = listenerAtFd3(soak.candidate!.pid, port);
      // The candidate's fd 3 is its own socket of the listener's reuseport group, not the serving one.
      assert.ok(
        candidate !== null && candidate !== listenerAtFd3(soak.pid!, port),
        `reload ${i}: the candidate's fd 3 is its own listener on the port`,
      );
      assert.equal((await d.cli('promote')).code, 0);
      assert.equal((await reload).code, 0, `reload ${i}`);
      const s = await statusOf(d);
      assert.equal(s.generation, i + 1);
      assert.equal(
        listenerAtFd3(s.pid!, port),
        candidate,
        `reload ${i}: the promoted generation keeps serving on its fd 3`,
      );
      assert.deepEqual(
        [...(await fresh(port, 8))],
        [[i + 1, 8]],
        `reload ${i}: the promoted generation answers every new connection`,
      );
    }
    assert.equal(await fdCountAtRest(aeterna), fdsBefore, "Aeterna's fd count after 50 weighted reloads");
    assert.equal(await d.stopServing(), 0);
  });

  it(
    'without tcp_migrate_req (off, and read-only as in many containers) a weighted reload still soaks, and Aeterna warns that a canary dying mid-soak loses the connections queued on its socket',
    { skip: pidNamespaceUnavailable() ?? undefined },
    async () => {
      const port = await freePort();
      const d = new Daemon({ command: APP, strategy: 'canary', soak: '10m', canary: '{ weight: 50 }', port });
      // Its own network namespace (where the sysctl starts at 0), with the sysctl's file mounted read-only over itself.
      const setup = `ip link set lo up && mount --bind ${MIGRATE_SYSCTL} ${MIGRATE_SYSCTL} && mount -o remount,bind,ro ${MIGRATE_SYSCTL} && exec "$@"`;
      d.run = runAeterna(['start', '-c', d.configFile], {
        pid1: true,
        prefix: ['unshare', '--net', 'sh', '-c', setup, 'sh'],
      });
      daemons.push(d);
      await d.waitStatus((s) => s.state === 'Running');
      const { reload } = await soaking(d);
      assert.equal((await statusOf(d)).canary_weight, 50);
      const warning = d.run.logs().find((l) => l.level === 'warn' && /tcp_migrate_req/.test(l.msg));
      assert.match(
        warning?.msg ?? '',
        /^orchestration\.canary: net\.ipv4\.tcp_migrate_req is 0 and Aeterna cannot set it \(EROFS\); if the new generation dies during the soak, the connections waiting in its socket's accept queue are reset$/,
      );
      assert.equal((await d.cli('rollback')).code, 0);
      assert.equal((await reload).code, 1);
      assert.equal(await d.stopServing(), 0);
    },
  );

  it(
    'a canary killed with 4 connections queued on its socket (it never accepts): the rollback hands all 4 to the old generation, none fails',
    { skip: noMigration },
    async () => {
      const { d, port } = await started({ canary: '{ weight: 50 }' });
      // The candidate holds its listener at fd 3 and never accepts: whatever is steered to it waits in its queue.
      d.write({ ...d.options, command: [process.execPath, '-e', 'setInterval(() => {}, 1000)'] });
      const { reload } = await soaking(d);
      const soak = await statusOf(d);
      const queue = listenerAtFd3(soak.candidate!.pid, port)!;
      const freshLoad = startFreshLoad(port, 4);
      const { failures, answeredBy } = freshLoad;
      // Each loop ends up waiting on a connection in the candidate's queue (a hang guard, not a timing assertion).
      for (const deadline = Date.now() + 20000; listenersOn(soak.candidate!.pid, port).get(queue) !== 4;) {
        assert.ok(
          Date.now() < deadline,
          `the candidate's accept queue: ${listenersOn(soak.candidate!.pid, port).get(queue)}`,
        );
        await new Promise((r) => setTimeout(r, 20));
      }
      const servedBefore = answeredBy.get(1) ?? 0;
      process.kill(soak.candidate!.pid, 'SIGKILL');
      const r = await reload;
      assert.equal(r.code, 1, r.stderr);
      await fresh(port, 8); // the old generation serves again
      await freshLoad.stop();
      assert.deepEqual(failures, [], 'no queued connection was refused or reset');
      assert.deepEqual([...answeredBy.keys()], [1], 'the candidate answered nothing');
      assert.ok(answeredBy.get(1)! >= servedBefore + 4, 'the 4 queued requests were answered by generation 1');
      assert.equal((await d.status()).last_reload?.outcome, 'rolled_back');
      assert.equal(await d.stopServing(), 0);
    },
  );

  /**
   * A canary soak at weight 50 under keep-alive load (on generation 1, opened before the reload) and 4 loops of
   * fresh connections, with the new generation set to crash by `crashEnv`: the reload's result, the failures of
   * each load, and how many accepted connections the crashing process held when it exited (it says so).
   */
  async function crashDuringSoak(crashEnv: string): Promise<{
    d: Daemon;
    port: number;
    keepAlive: LoadStats;
    failures: string[];
    answeredBy: Map<number, number>;
    held: number;
  }> {
    const { d, port } = await started({ canary: '{ weight: 50 }' });
    d.write({ ...d.options, env: [crashEnv] });
    const load = startLoad(port, { concurrency: 8 });
    const freshLoad = startFreshLoad(port, 4);
    const { failures, answeredBy } = freshLoad;
    const r = await d.cli('reload');
    assert.equal(r.code, 1, r.stderr);
    await freshLoad.stop();
    const keepAlive = await load.stop();
    const held = Number((await d.run.waitFor(/^CRASH \d+ holding (\d+) connections$/m))[1]);
    const s = await d.status();
    assert.equal(s.last_reload?.outcome, 'rolled_back');
    assert.equal(s.last_reload?.code, 'E_CHILD_EXITED');
    assert.equal(s.generation, 1);
    assert.deepEqual([...(await fresh(port, 100))], [[1, 100]], 'every new connection reaches the old generation');
    return { d, port, keepAlive, failures, answeredBy, held };
  }

  it(
    'a canary that crashes between requests during a weighted soak (it holds no connection; new ones keep arriving on its socket) is rolled back with zero failed requests: what was queued on its socket is served by the old generation',
    { skip: noMigration },
    async () => {
      const { d, keepAlive, failures, answeredBy, held } = await crashDuringSoak('CRASH_WHEN_IDLE_AFTER_MS=1500');
      assert.equal(held, 0, 'the canary held no accepted connection when it exited');
      assert.ok(
        (answeredBy.get(2) ?? 0) > 0,
        `the canary served part of the load before it crashed: ${JSON.stringify([...answeredBy])}`,
      );
      assert.deepEqual(failures, [], 'no fresh connection failed');
      assert.deepEqual(keepAlive.failures, {}, 'no keep-alive request failed');
      assert.ok(keepAlive.ok > 0);
      assert.equal(await d.stopServing(), 0);
    },
  );

  it("a canary that crashes holding accepted connections during a weighted soak is rolled back: the only failed requests are on connections the crashing process itself held (the app's loss, which no supervisor can serve), none on keep-alive", async () => {
    const { d, keepAlive, failures, held } = await crashDuringSoak('CRASH_AFTER_MS=1500');
    // The 4 fresh-connection loops have at most 4 connections open; keep-alive is on generation 1. A connection the
    // canary had accepted dies with it; every one still queued on its socket is moved to the old socket (the test
    // above), so the failures are at most the connections it held, and each is a reset or a hang-up.
    assert.ok(held <= 4, `the canary held ${held} connections`);
    assert.ok(
      failures.length <= held,
      `fresh-connection failures ${failures.length} (${failures.join(', ')}) against ${held} connections the canary held`,
    );
    for (const f of failures) assert.match(f, /^(ECONNRESET|Error: socket hang up)$/);
    assert.deepEqual(keepAlive.failures, {}, 'no keep-alive request failed');
    assert.equal(await d.stopServing(), 0);
  });
});

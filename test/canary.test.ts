// The weighted canary (orchestration.canary): real sockets, a real daemon, real
// connections. Shares and counts are asserted, never timings.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import { fixture, freePort } from './helpers/aeterna';
import { Daemon, statusOf, type ConfigOptions } from './helpers/daemon';
import { getText, startLoad } from './helpers/load';

const APP = [process.execPath, fixture('apps', 'reload_app.js')];
const daemons: Daemon[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
});

async function started(options: Omit<ConfigOptions, 'port' | 'command'> & { command?: string[] }): Promise<{ d: Daemon; port: number }> {
  const port = await freePort();
  const d = new Daemon({ command: APP, strategy: 'canary', soak: '10m', ...options, port }).start();
  daemons.push(d);
  await d.waitStatus((s) => s.state === 'Running');
  return { d, port };
}

/** The generation that answers one request on a fresh connection. */
async function generationOf(port: number, localAddress?: string): Promise<number> {
  const r = await getText(port, '/', '127.0.0.1', localAddress);
  return Number((JSON.parse(r.body) as { generation: string }).generation);
}

/** `count` fresh connections, 16 at a time: how many reached each generation. */
async function fresh(port: number, count: number): Promise<Map<number, number>> {
  const seen = new Map<number, number>();
  let left = count;
  await Promise.all(
    Array.from({ length: 16 }, async () => {
      while (left-- > 0) {
        const g = await generationOf(port);
        seen.set(g, (seen.get(g) ?? 0) + 1);
      }
    }),
  );
  return seen;
}

/** Start a weighted reload and wait until it soaks; resolves with the pending `aeterna reload`. */
async function soaking(d: Daemon): Promise<{ reload: ReturnType<Daemon['cli']> }> {
  const reload = d.cli('reload');
  await d.waitStatus((s) => s.state === 'Soaking');
  return { reload }; // wrapped: an async function would wait for the reload itself
}

describe('weighted canary', { timeout: 300000 }, () => {
  for (const weight of [10, 50]) {
    it(`weight ${weight}: of 2,000 fresh connections during the soak the new generation gets ${weight}% (±4 points); status and the soak phase show the weight`, async () => {
      const { d, port } = await started({ canary: `{ weight: ${weight} }` });
      const { reload } = await soaking(d);
      const status = await statusOf(d);
      assert.equal(status.canary_weight, weight);
      const seen = await fresh(port, 2000);
      assert.deepEqual([...seen.keys()].sort(), [1, 2], `both generations answered: ${JSON.stringify([...seen])}`);
      const share = ((seen.get(2) ?? 0) / 2000) * 100;
      assert.ok(Math.abs(share - weight) <= 4, `new generation's share ${share.toFixed(1)}% against weight ${weight}`);
      assert.equal((await d.cli('promote')).code, 0);
      assert.equal((await reload).code, 0);
      assert.equal((await statusOf(d)).canary_weight, null, 'no weight outside a soak');
      assert.equal(await d.stop(), 0);
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
    for (const [address, gens] of byAddress) assert.equal(gens.size, 1, `${address} reached generations ${[...gens]}`);
    assert.equal((await d.cli('rollback')).code, 0);
    assert.equal((await reload).code, 1);
    assert.equal(await d.stop(), 0);
  });

  for (const ending of ['promote', 'rollback'] as const) {
    it(`${ending} under keep-alive and fresh-connection load at weight 50: zero failed requests, then every new connection reaches the ${ending === 'promote' ? 'new' : 'old'} generation`, async () => {
      const { d, port } = await started({ canary: '{ weight: 50 }' });
      const { reload } = await soaking(d);
      const keepAlive = startLoad(port, { concurrency: 8 });
      let running = true;
      const freshFailures: string[] = [];
      let freshOk = 0;
      const freshLoad = Promise.all(
        Array.from({ length: 4 }, async () => {
          while (running) {
            try {
              await generationOf(port);
              freshOk++;
            } catch (err) {
              freshFailures.push((err as NodeJS.ErrnoException).code ?? String(err));
            }
          }
        }),
      );
      await fresh(port, 200); // both generations serve meanwhile
      assert.equal((await d.cli(ending)).code, 0);
      const r = await reload;
      assert.equal(r.code, ending === 'promote' ? 0 : 1, r.stderr);
      const s = await d.waitStatus((st) => st.state === 'Running');
      running = false;
      await freshLoad;
      const stats = await keepAlive.stop();
      assert.deepEqual(stats.failures, {}, 'no keep-alive request failed');
      assert.deepEqual(freshFailures, [], 'no fresh connection failed');
      assert.ok(stats.ok > 0 && freshOk > 0);
      const winner = ending === 'promote' ? 2 : 1;
      assert.equal(s.generation, winner);
      assert.deepEqual([...(await fresh(port, 200))], [[winner, 200]], 'every new connection reaches the winner');
      assert.equal(await d.stop(), 0);
    });
  }

  it('a canary that crashes during a weighted soak is rolled back: zero failed keep-alive requests, fresh connections lose at most the requests the crashing process held; new connections then reach the old generation', async () => {
    const { d, port } = await started({ canary: '{ weight: 50 }' });
    d.write({ ...d.options, env: ['CRASH_AFTER_MS=1500'] });
    const load = startLoad(port, { concurrency: 8 });
    let running = true;
    const failures: string[] = [];
    const freshLoad = Promise.all(
      Array.from({ length: 4 }, async () => {
        while (running) await generationOf(port).catch((err: NodeJS.ErrnoException) => failures.push(err.code ?? String(err)));
      }),
    );
    const r = await d.cli('reload');
    assert.equal(r.code, 1, r.stderr);
    running = false;
    await freshLoad;
    const stats = await load.stop();
    assert.deepEqual(stats.failures, {});
    // Each of the 4 fresh-connection loops has at most one request in flight; one the canary had accepted when it
    // exited is the app's loss, not the switch's. Queued, never accepted ones are moved to the old socket.
    assert.ok(failures.length <= 4, `fresh-connection failures: ${failures.join(', ')}`);
    const s = await d.status();
    assert.equal(s.last_reload?.outcome, 'rolled_back');
    assert.equal(s.generation, 1);
    assert.deepEqual([...(await fresh(port, 100))], [[1, 100]]);
    assert.equal(await d.stop(), 0);
  });
});

// The fault matrix (docs/reliability.md): inject a fault into a real daemon
// running a real app under real HTTP load, then assert that the app still
// serves, that nothing leaked (processes, zombies, Aeterna's fds) and what the
// operator is told. Counts and states only; timeouts are hang guards.
//
// Aeterna runs as a subreaper here (not in a PID namespace), so that a process
// it failed to stop would outlive it and be seen: as PID 1 the kernel would
// kill the namespace's leftovers for it and hide the bug.
import { describe, it, after, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import type { StatusReport } from '../../../src/orchestrator/types';
import { fdCount, fdCountAtRest, generationProcesses, isGone, settle, zombies } from '../../../bench/soak';
import { fixture, freePort } from '../../helpers/aeterna';
import { Daemon, cli, type ConfigOptions, socketOf, statusOf } from '../../helpers/daemon';
import { getJson, startLoad } from '../../helpers/load';

const APP = [process.execPath, fixture('faults', 'app.js')];
const daemons: Daemon[] = [];
after(async () => {
  // A daemon left by a failed test: kill it with every generation it started (see AeternaRun.killAll).
  for (const d of daemons) await d.run.killAll();
});

function killGroup(pgrp: number): void {
  try {
    process.kill(-pgrp, 'SIGKILL');
  } catch {
    // already gone
  }
}

async function waitState(d: Daemon, state: string, timeoutMs = 20000): Promise<StatusReport> {
  await d.waitStatus((s) => s.state === state, timeoutMs);
  return statusOf(d);
}

async function started(
  options: Omit<ConfigOptions, 'port' | 'command'> & { command?: string[] },
): Promise<{ d: Daemon; port: number; aeterna: number }> {
  const port = await freePort();
  const d = new Daemon({ command: APP, ...options, port }).start();
  daemons.push(d);
  await d.waitStatus((s) => s.state === 'Running');
  return { d, port, aeterna: d.run.child.pid! };
}

/** The pids printed by the fixture on a line "<WORD> <pid> <pid>... generation <n>". */
function printedPids(d: Daemon, word: string, generation: number): number[] {
  const m = d.run.stdout.match(new RegExp(`^${word} ([\\d ]+) generation ${generation}$`, 'm'));
  return m ? m[1].trim().split(' ').map(Number) : [];
}

/** Nothing leaked: Aeterna's fd count is back to its baseline, the given processes are gone, no zombie child. */
async function assertNothingLeaked(aeterna: number, baselineFds: number, gone: number[]): Promise<void> {
  // Back to the baseline exactly: a count seen for a moment below it (a socket being replaced) is not the end state.
  const fds = await settle(
    () => fdCount(aeterna),
    (n) => n === baselineFds,
  );
  assert.equal(fds, baselineFds, `Aeterna's fd count is back to ${baselineFds}`);
  const left = await settle(
    () => gone.filter((pid) => !isGone(pid)),
    (l) => l.length === 0,
  );
  assert.deepEqual(left, [], 'every process of the failed generation is gone');
  const z = await settle(
    () => zombies(aeterna, false),
    (l) => l.length === 0,
  );
  assert.deepEqual(z, [], 'no zombie is left');
}

describe('fault matrix: the new generation fails', { timeout: 180000 }, () => {
  let d: Daemon;
  let port: number;
  let aeterna: number;
  let baselineFds: number;
  let base: ConfigOptions;

  before(async () => {
    ({ d, port, aeterna } = await started({
      stopTimeout: '5s',
      readiness: '{ mode: "delay", delay: "200ms", timeout: "10s" }',
    }));
    base = { ...d.options };
    // One good reload first: anything Aeterna opens lazily is open before the baseline.
    assert.equal((await d.cli('reload')).code, 0);
    baselineFds = await settle(
      () => fdCount(aeterna),
      () => false,
      300,
    );
  });

  /** Run one failing reload under load; returns the CLI result, the status after, and the load totals. */
  async function failingReload(options: Partial<ConfigOptions>, during?: () => Promise<void>) {
    const before = await statusOf(d);
    const load = startLoad(port, { concurrency: 4 });
    d.write({ ...base, ...options });
    const reload = d.cli('reload');
    if (during) await during();
    const r = await reload;
    const stats = await load.stop();
    const after = await statusOf(d);
    assert.equal(r.code, 1, `the reload fails with exit 1: ${r.stderr}`);
    assert.equal(after.state, 'Running');
    assert.equal(after.pid, before.pid, 'the old generation still serves');
    assert.equal(after.generation, before.generation);
    assert.equal((await getJson<{ pid: number }>(port)).pid, before.pid, 'and answers requests');
    assert.equal(stats.failed, 0, `zero failed requests: ${JSON.stringify(stats.failures)}`);
    assert.ok(stats.ok > 0);
    d.write(base);
    return { r, record: after.last_reload!, stats };
  }

  it('exits during start (before it is ready): rolled back, E_CHILD_EXITED, nothing leaked', async () => {
    const trigger = path.join(d.dir, 'crash-now');
    const { r, record } = await failingReload(
      { env: [`CRASH_ON_FILE=${trigger}`], readiness: '{ mode: "notify", timeout: "1m" }' },
      async () => {
        await waitState(d, 'Handover');
        fs.writeFileSync(trigger, '');
      },
    );
    fs.rmSync(trigger);
    assert.match(r.stderr, /exited with code 3 before becoming ready/);
    assert.equal(record.outcome, 'rolled_back');
    assert.equal(record.code, 'E_CHILD_EXITED');
    await assertNothingLeaked(aeterna, baselineFds, [record.new_pid!]);
  });

  it('cannot be started at all (exec fails): the reload fails with E_SPAWN_FAILED naming the command, nothing leaked', async () => {
    const { r, record } = await failingReload({ command: ['/no/such/app', '--serve'] });
    assert.match(r.stderr, /\/no\/such\/app/);
    assert.match(r.stderr, /ENOENT/);
    assert.equal(record.outcome, 'failed');
    assert.equal(record.code, 'E_SPAWN_FAILED');
    assert.equal(record.new_pid, null);
    await assertNothingLeaked(aeterna, baselineFds, []);
  });

  it('exits during the canary soak: rolled back, E_CHILD_EXITED, nothing leaked', async () => {
    const trigger = path.join(d.dir, 'crash-in-soak');
    const { r, record } = await failingReload(
      { env: [`CRASH_ON_FILE=${trigger}`], strategy: 'canary', soak: '10m' },
      async () => {
        await waitState(d, 'Soaking');
        fs.writeFileSync(trigger, '');
      },
    );
    fs.rmSync(trigger);
    assert.match(r.stderr, /exited with code 3 during soak/);
    assert.equal(record.outcome, 'rolled_back');
    assert.equal(record.code, 'E_CHILD_EXITED');
    await assertNothingLeaked(aeterna, baselineFds, [record.new_pid!]);
  });

  it('never becomes ready (its exec probe always fails): rolled back after the timeout, E_READY_TIMEOUT, no probe left behind', async () => {
    const { r, record } = await failingReload({
      readiness: '{ mode: "exec", command: ["false"], interval: "50ms", timeout: "1s" }',
    });
    assert.match(r.stderr, /not ready within 1s/);
    assert.equal(record.outcome, 'rolled_back');
    assert.equal(record.code, 'E_READY_TIMEOUT');
    await assertNothingLeaked(aeterna, baselineFds, [record.new_pid!]);
  });

  it('forks orphans and exits: rolled back, every orphan killed and reaped, nothing leaked', async () => {
    const { r, record } = await failingReload({ env: ['ORPHANS=5'], readiness: '{ mode: "notify", timeout: "1m" }' });
    assert.match(r.stderr, /exited with code 3 before becoming ready/);
    assert.equal(record.code, 'E_CHILD_EXITED');
    const orphans = printedPids(d, 'ORPHANS', record.to_generation!);
    assert.equal(
      orphans.length,
      5,
      `the fixture reported its orphans (generation ${record.to_generation})\n${d.run.stdout}`,
    );
    await assertNothingLeaked(aeterna, baselineFds, [record.new_pid!, ...orphans]);
  });

  it('forks orphans that leave its session (setsid, as a daemonizing program does) and exits: every orphan killed', async () => {
    const { record } = await failingReload({
      env: ['ORPHANS=3', 'ORPHANS_SETSID=1'],
      readiness: '{ mode: "notify", timeout: "1m" }',
    });
    const orphans = printedPids(d, 'ORPHANS', record.to_generation!);
    try {
      assert.equal(orphans.length, 3);
      assert.equal(record.code, 'E_CHILD_EXITED');
      const left = await settle(
        () => orphans.filter((pid) => !isGone(pid)),
        (l) => l.length === 0,
      );
      assert.deepEqual(left, [], 'every orphan of the failed generation is gone');
    } finally {
      for (const pid of orphans) killGroup(pid);
    }
  });

  after(async () => {
    if (d) assert.equal(await d.stopServing(), 0);
  });
});

describe('fault matrix: the old generation misbehaves', { timeout: 120000 }, () => {
  it('ignores SIGTERM while draining: SIGKILLed after its stop_timeout, the new generation serves, nothing leaked', async () => {
    const { d, port, aeterna } = await started({ env: ['IGNORE_TERM=1'], stopTimeout: '1s' });
    const baselineFds = await fdCountAtRest(aeterna); // not a snapshot: a status connection may still be closing
    const old = await statusOf(d);
    const oldProcesses = generationProcesses(old.pid!);
    d.write({ ...d.options, env: [] });
    const r = await d.cli('reload');
    assert.equal(r.code, 0, r.stderr);
    const s = await statusOf(d);
    assert.equal(s.state, 'Running');
    assert.equal(s.generation, 2);
    assert.notEqual(s.pid, old.pid);
    // The reload is answered at promotion; the old generation drains on until its stop_timeout (and, ignoring
    // SIGTERM, may accept on the shared socket until then).
    await d.run.waitFor(new RegExp(`IGNORED SIGTERM ${old.pid} `)); // the old generation got SIGTERM and ignored it
    await d.run.waitFor(/"msg":"generation 1 killed by SIGKILL"/); // and was killed by SIGKILL
    assert.equal(
      d.run.logs().filter((l) => l.msg === 'generation 1 killed by SIGKILL').length,
      1,
      'and was killed by SIGKILL',
    );
    assert.equal((await getJson<{ pid: number }>(port)).pid, s.pid);
    assert.equal(s.last_reload?.outcome, 'promoted');
    await assertNothingLeaked(aeterna, baselineFds, oldProcesses);
    assert.equal(await d.stopServing(), 0);
  });

  it("dies during the new one's soak: the new generation becomes the serving one (promoted), nothing leaked", async () => {
    const { d, port, aeterna } = await started({ strategy: 'canary', soak: '10m' });
    const baselineFds = await fdCountAtRest(aeterna); // not a snapshot: a status connection may still be closing
    const reload = d.cli('reload');
    const soaking = await waitState(d, 'Soaking');
    const oldPid = soaking.previous!.pid;
    const newPid = soaking.candidate!.pid;
    process.kill(oldPid, 'SIGKILL');
    const r = await reload;
    assert.equal(r.code, 0, r.stderr);
    const s = await statusOf(d);
    assert.equal(s.state, 'Running');
    assert.equal(s.pid, newPid);
    assert.equal(s.generation, 2);
    assert.equal(s.last_reload?.outcome, 'promoted');
    assert.equal(s.restarts, 0, 'no restart: the new generation took over');
    assert.equal((await getJson<{ pid: number }>(port)).pid, newPid);
    // Under load afterwards: the new generation serves alone.
    const load = startLoad(port, { concurrency: 4 });
    while (load.stats.ok < 200) await new Promise((r2) => setTimeout(r2, 20));
    const stats = await load.stop();
    assert.equal(stats.failed, 0);
    assert.deepEqual(stats.pids, [newPid]);
    await assertNothingLeaked(aeterna, baselineFds, [oldPid]);
    assert.equal(await d.stopServing(), 0);
  });

  it('dies during the handover: the reload goes on and promotes the new generation once it is ready', async () => {
    const { d, aeterna } = await started({});
    const baselineFds = await fdCountAtRest(aeterna); // not a snapshot: a status connection may still be closing
    const readyFile = path.join(d.dir, 'ready');
    d.write({
      ...d.options,
      readiness: `{ mode: "exec", command: ["test", "-e", "${readyFile}"], interval: "50ms", timeout: "1m" }`,
    });
    const reload = d.cli('reload');
    const handover = await waitState(d, 'Handover');
    const oldPid = handover.previous!.pid;
    process.kill(oldPid, 'SIGKILL');
    await settle(
      () => isGone(oldPid),
      (g) => g,
    );
    // The exec probe says ready whatever the app does: let the app finish starting first (its SIGTERM handler
    // included), so that the stop below is the app's drain and not a kill mid-start.
    await d.run.waitFor(new RegExp(`^READY ${handover.candidate!.pid} generation`, 'm'));
    fs.writeFileSync(readyFile, '');
    const r = await reload;
    assert.equal(r.code, 0, r.stderr);
    const s = await statusOf(d);
    assert.equal(s.state, 'Running');
    assert.equal(s.pid, handover.candidate!.pid);
    assert.equal(s.last_reload?.outcome, 'promoted');
    assert.equal(s.restarts, 0);
    await assertNothingLeaked(aeterna, baselineFds, [oldPid]);
    assert.equal(await d.stopServing(), 0);
  });
});

describe('fault matrix: SIGTERM to Aeterna in each state', { timeout: 240000 }, () => {
  interface Case {
    state: string;
    options: Omit<ConfigOptions, 'port' | 'command'>;
    /** Drive the running daemon into the state; returns a pending CLI command whose answer the test checks. */
    drive?: (d: Daemon) => Promise<{ pending: ReturnType<typeof cli> }>;
    /** What the pending command (if any) is told. */
    told?: RegExp;
    /** The reload was promoted and its old generation drains on (retiring) when the SIGTERM comes. */
    retiring?: boolean;
    exitCode: number;
    todo?: string;
  }
  const reloadWith = (change: Partial<ConfigOptions>) => async (d: Daemon) => {
    const env = (change.env ?? d.options.env ?? []).filter((e) => !e.startsWith('WORKERS='));
    d.write({ ...d.options, ...change, env: [...env, 'WORKERS=2'] });
    return { pending: d.cli('reload') };
  };
  const cases: Case[] = [
    // The first generation never says READY=1: Starting until the readiness timeout.
    { state: 'Starting', options: { readiness: '{ mode: "notify", timeout: "1m" }' }, exitCode: 0 },
    { state: 'Running', options: {}, exitCode: 0 },
    // The new generation is slow to become ready.
    {
      state: 'Handover',
      options: {},
      drive: reloadWith({ readiness: '{ mode: "delay", delay: "50s", timeout: "1m" }' }),
      told: /Aeterna was stopped during the reload/,
      exitCode: 0,
    },
    {
      state: 'Soaking',
      options: {},
      drive: reloadWith({ strategy: 'canary', soak: '10m' }),
      told: /Aeterna was stopped during the reload/,
      exitCode: 0,
    },
    // The old generation drains slowly (serves 5 s more after SIGTERM, then exits 0): the reload was promoted,
    // the old generation retires in the background.
    {
      state: 'Running',
      retiring: true,
      options: { env: ['DRAIN_MS=5000'], stopTimeout: '30s' },
      drive: reloadWith({ env: [] }),
      exitCode: 0,
    },
    // The new generation ignores SIGTERM: its rollback lasts until its stop_timeout.
    {
      state: 'RollingBack',
      options: {},
      drive: async (d) => {
        d.write({
          ...d.options,
          strategy: 'canary',
          soak: '10m',
          env: ['IGNORE_TERM=1', 'WORKERS=2'],
          stopTimeout: '5s',
        });
        const pending = d.cli('reload');
        await waitState(d, 'Soaking');
        assert.equal((await d.cli('rollback')).code, 0);
        return { pending };
      },
      told: /operator rollback|Aeterna was stopped/,
      exitCode: 0,
    },
    // The old generation ignores SIGTERM (it retires until its stop_timeout) while the new one, already serving,
    // exits 0 on SIGTERM: Aeterna's exit code should be the serving (new) generation's, not the killed old one's 137.
    {
      state: 'Running',
      retiring: true,
      options: { env: ['IGNORE_TERM=1'], stopTimeout: '3s' },
      drive: reloadWith({ env: [] }),
      exitCode: 0,
    },
  ];

  for (const c of cases) {
    const when = c.retiring ? `${c.state} while the old generation retires` : c.state;
    const title = `SIGTERM during ${when}${c.options.env?.length ? ` (${c.options.env.join(' ')})` : ''}: every process of both generations is gone, Aeterna exits ${c.exitCode}`;
    it(title, { todo: c.todo ?? false }, async () => {
      const port = await freePort();
      const d = new Daemon({ command: APP, port, ...c.options, env: [...(c.options.env ?? []), 'WORKERS=2'] }).start();
      daemons.push(d);
      if (c.state === 'Starting') {
        await waitState(d, 'Starting');
        await d.run.waitFor(/READY \d+ generation 1/);
      } else {
        await d.waitStatus((s) => s.state === 'Running');
      }
      const pending = c.drive ? (await c.drive(d)).pending : null;
      if (c.retiring) {
        const r = await pending!;
        assert.equal(r.code, 0, `the reload was promoted: ${r.stderr}`);
      }
      const s = await waitState(d, c.state);
      const roots = [
        ...new Set(
          [s.pid, s.previous?.pid, s.candidate?.pid, ...s.retiring.map((g) => g.pid)].filter(
            (p): p is number => typeof p === 'number',
          ),
        ),
      ];
      assert.equal(
        roots.length,
        ['Starting', 'Running'].includes(c.state) && !c.retiring ? 1 : 2,
        `generations alive: ${JSON.stringify(s)}`,
      );
      // Every generation has finished starting: its workers spawned and its SIGTERM handler installed (it prints READY
      // after both). Delay readiness takes an app as ready whether or not its runtime has loaded: before READY its
      // workers may not exist yet, and a SIGTERM would kill it with 143, the app's doing, not what this test is about.
      for (const root of roots) await d.run.waitFor(new RegExp(`^READY ${root} generation`, 'm'), 60000);
      const processes = [...new Set(roots.flatMap((root) => generationProcesses(root)))];
      // Each generation's root and its 2 workers (a generation already told to stop may have lost its workers).
      assert.ok(processes.length > roots.length, `the generations' processes were found: ${processes.join(' ')}`);
      await d.run.signal('SIGTERM');
      const exit = await d.run.exit(60000);
      assert.equal(exit.code, c.exitCode, d.run.stderr.slice(-3000));
      assert.ok(
        d.run.logs().some((l) => /^stopping: SIGTERM/.test(l.msg)),
        'the stop is logged',
      );
      const left = await settle(
        () => processes.filter((pid) => !isGone(pid)),
        (l) => l.length === 0,
      );
      assert.deepEqual(left, [], 'no process of either generation outlived Aeterna');
      if (pending && c.told) {
        const r = await pending;
        assert.equal(r.code, 1, r.stderr);
        assert.match(r.stderr, c.told);
      }
      assert.equal(fs.existsSync(socketOf(d)), false, 'the control socket file is removed');
    });
  }
});

describe("fault matrix: Aeterna's own resources", { timeout: 120000 }, () => {
  it('the control socket file deleted (or replaced) while running: re-created, `aeterna reload` works again, no fd leaked', async () => {
    const { d, aeterna } = await started({});
    const socket = socketOf(d);
    const baselineFds = await fdCountAtRest(aeterna); // not a snapshot: a status connection may still be closing
    for (let i = 1; i <= 2; i++) {
      const inode = fs.statSync(socket).ino;
      fs.rmSync(socket);
      // Straight from this process, not through a CLI process: Aeterna re-creates the file within 2 s, which a
      // CLI's start on a loaded machine can outlast.
      const refused = await new Promise<string>((resolve) => {
        const c = net.connect(socket, () => {
          c.destroy();
          resolve('connected');
        });
        c.on('error', (e: NodeJS.ErrnoException) => resolve(e.code ?? e.message));
      });
      assert.equal(refused, 'ENOENT', 'unreachable while the file is gone (no daemon answers)');
      await settle(
        () => fs.existsSync(socket) && fs.statSync(socket).ino !== inode,
        (ok) => ok,
        15000,
      );
      const st = fs.statSync(socket);
      assert.ok(st.isSocket());
      assert.equal(st.mode & 0o777, 0o600, 'the new socket has mode 0600');
      const r = await d.cli('reload');
      assert.equal(r.code, 0, `aeterna reload works again: ${r.stderr}`);
      assert.equal((await statusOf(d)).generation, 1 + i);
      assert.equal(
        d.run.logs().filter((l) => l.level === 'warn' && /was deleted while the daemon ran; re-created it/.test(l.msg))
          .length,
        i,
      );
    }
    await d.untilRetired(); // the old generations of the two reloads have gone
    const fds = await settle(
      () => fdCount(aeterna),
      (n) => n === baselineFds,
    );
    assert.equal(fds, baselineFds, 'each replaced listening socket was closed');

    // A regular file put in its place is never clobbered: an error, and the daemon waits.
    fs.rmSync(socket);
    fs.writeFileSync(socket, 'precious');
    await d.run.waitFor(/cannot be re-created: .*exists and is not a socket/, 15000);
    assert.equal(fs.readFileSync(socket, 'utf8'), 'precious');
    assert.equal(d.run.logs().filter((l) => /cannot be re-created/.test(l.msg)).length, 1, 'said once, not every 2 s');
    fs.rmSync(socket);
    await settle(
      () => fs.existsSync(socket),
      (ok) => ok,
      15000,
    );
    assert.equal((await d.cli('status')).code, 0);
    assert.equal(await d.stopServing(), 0);
    assert.equal(fs.existsSync(socket), false, 'removed at exit');
  });

  it('a config that cannot be applied (broken YAML, then a listener address in use) changes nothing; the next good reload works', async () => {
    const { d, port } = await started({});
    const before = await statusOf(d);
    const socket = ['--socket', socketOf(d)];
    const good = fs.readFileSync(d.configFile, 'utf8');

    fs.writeFileSync(d.configFile, good.replace('service:', 'service: [unclosed'));
    const broken = await cli(['reload', ...socket]);
    assert.equal(broken.code, 1);
    assert.match(broken.stderr, /invalid YAML/);
    assert.equal((await statusOf(d)).last_reload?.code, 'E_CONFIG_INVALID');

    const blocker = net.createServer().listen(0, '127.0.0.1');
    await new Promise((r) => blocker.once('listening', r));
    const taken = (blocker.address() as net.AddressInfo).port;
    const withListener = (p: number): string =>
      good.replace(
        `      address: "tcp://127.0.0.1:${port}"\n`,
        `      address: "tcp://127.0.0.1:${port}"\n    - name: "extra"\n      address: "tcp://127.0.0.1:${p}"\n`,
      );
    try {
      fs.writeFileSync(d.configFile, withListener(taken));
      const inUse = await cli(['reload', ...socket]);
      assert.equal(inUse.code, 1);
      assert.match(
        inUse.stderr,
        new RegExp(`listener "extra" \\(tcp://127\\.0\\.0\\.1:${taken}\\): address already in use`),
      );
      const s = await statusOf(d);
      assert.equal(s.last_reload?.code, 'E_LISTEN_ADDR_IN_USE');
      assert.deepEqual(
        s.listeners.map((l) => l.name),
        ['http'],
        'the listener set is unchanged',
      );
      assert.equal(s.pid, before.pid);
    } finally {
      blocker.close();
    }

    const extra = await freePort();
    fs.writeFileSync(d.configFile, withListener(extra));
    const ok = await cli(['reload', ...socket]);
    assert.equal(ok.code, 0, ok.stderr);
    const s = await statusOf(d);
    assert.deepEqual(
      s.listeners.map((l) => l.name),
      ['http', 'extra'],
    );
    assert.equal(s.generation, before.generation + 1);
    assert.equal(await d.stopServing(), 0);
  });
});

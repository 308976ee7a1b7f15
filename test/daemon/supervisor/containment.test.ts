// A generation's processes end with it, even the ones that try hardest not to:
// a daemon that double-forks, setsid()s and execs with an empty environment
// (test/fixtures/faults/daemonize.py), so that neither its process group, nor
// its session, nor AETERNA_GENERATION leads back to its generation. Counts of
// processes from /proc; timeouts are hang guards.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { settle } from '../../../bench/soak';
import { Cgroups } from '../../../src/supervisor/cgroup';
import { fixture, pidNamespaceUnavailable } from '../../helpers/aeterna';
import { Daemon } from '../../helpers/daemon';

const noPidNamespace = pidNamespaceUnavailable();
const noCgroups = ((): string | null => {
  try {
    void Cgroups.open(() => undefined).close();
    return null;
  } catch (err) {
    return `cgroups are not usable here: ${(err as Error).message}`;
  }
})();

const daemons: Array<{ d: Daemon; marker: string }> = [];
after(async () => {
  // A failed test's daemon and whatever of its app escaped it (with an empty environment, killAll cannot find those).
  for (const { d, marker } of daemons) {
    await d.run.killAll();
    for (const pid of withMarker(marker)) process.kill(pid, 'SIGKILL');
  }
});

/** A daemon whose generations each leave a daemonized escapee; `marker` is on the command line of the app and the escapee. */
function start(cgroups: boolean, pid1: boolean): { d: Daemon; marker: string } {
  const d = new Daemon({ command: [], stopTimeout: '5s', extraService: `  cgroups: ${cgroups}\n` });
  const marker = path.join(d.dir, 'term.log');
  d.write({ ...d.options, command: ['python3', fixture('faults', 'daemonize.py'), marker] });
  d.start(pid1);
  daemons.push({ d, marker });
  return { d, marker };
}

/** Host pids of the processes whose command line names `marker`: the app and the escapees it left. */
function withMarker(marker: string, role: 'app' | 'escapee' | 'any' = 'any'): number[] {
  const found: number[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    let argv: string[];
    try {
      argv = fs.readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0');
    } catch {
      continue;
    }
    if (!argv.includes(marker)) continue;
    const escapee = argv.includes('--daemon');
    if (role === 'any' || (role === 'escapee') === escapee) found.push(Number(entry));
  }
  return found;
}

/** The escapee that generation n reported (its pid as Aeterna sees it). */
async function escapeeOf(d: Daemon, n: number): Promise<number> {
  return Number((await d.run.waitFor(new RegExp(`^ESCAPEE (\\d+) generation ${n}$`, 'm')))[1]);
}

/** "TERM <pid>" lines: escapees that were sent SIGTERM (by Aeterna) rather than killed outright. */
function terminated(marker: string): number {
  return fs.existsSync(marker) ? fs.readFileSync(marker, 'utf8').split('\n').filter(Boolean).length : 0;
}

describe('a daemonized descendant (double fork, setsid, empty environment)', { timeout: 120000 }, () => {
  it(
    "cgroup mode, as PID 1: after each of 3 reloads the old generation's escapee is gone and the process count stays at 2; nothing is left after stop",
    { skip: noPidNamespace ?? noCgroups ?? false },
    async () => {
      const { d, marker } = start(true, true);
      await d.waitStatus((s) => s.state === 'Running');
      await escapeeOf(d, 1);
      assert.ok(
        d.run.logs().some((l) => l.cgroups === true),
        'Aeterna uses one cgroup per generation',
      );
      assert.equal(withMarker(marker).length, 2, 'the app and its escapee');
      for (let n = 2; n <= 4; n++) {
        const r = await d.cli('reload');
        assert.equal(r.code, 0, r.stderr);
        await escapeeOf(d, n);
        const escapees = await settle(
          () => withMarker(marker, 'escapee'),
          (l) => l.length === 1,
        );
        assert.equal(escapees.length, 1, `after reload ${n - 1} only generation ${n}'s escapee is left`);
        assert.equal(withMarker(marker).length, 2, 'the app and its escapee, not one more per reload');
      }
      assert.equal(await d.stop(), 0);
      assert.deepEqual(withMarker(marker), [], 'nothing of the app is left');
    },
  );

  it(
    'cgroup mode, as PID 1: after aeterna upgrade the serving generation keeps its cgroup: the next reload ends its escapee, the re-executed Aeterna keeps one directory and removes it at stop',
    { skip: noPidNamespace ?? noCgroups ?? false },
    async () => {
      const { d, marker } = start(true, true);
      await d.waitStatus((s) => s.state === 'Running');
      await escapeeOf(d, 1);
      const below = (): string[] =>
        d.run
          .logs()
          .filter((l) => l.cgroups === true)
          .map((l) => String(l.msg).replace(/^.* below (\S+).*$/, '$1'));
      const [dir] = below();
      assert.ok(fs.existsSync(path.join(dir, 'gen-1')), 'generation 1 runs in its cgroup');
      for (let i = 1; i <= 2; i++) assert.equal((await d.cli('upgrade')).code, 0);
      assert.deepEqual(
        below(),
        [dir, dir, dir],
        'each re-executed Aeterna took over the same directory, and made no other',
      );
      assert.equal((await d.cli('reload')).code, 0);
      await escapeeOf(d, 2);
      const escapees = await settle(
        () => withMarker(marker, 'escapee'),
        (l) => l.length === 1,
      );
      assert.equal(
        escapees.length,
        1,
        "generation 1's escapee ended with its cgroup, though generation 1 was adopted by a re-executed Aeterna",
      );
      assert.equal(
        await settle(
          () => fs.existsSync(path.join(dir, 'gen-1')),
          (e) => !e,
        ),
        false,
        "generation 1's cgroup was removed",
      );
      assert.equal(await d.stop(), 0);
      assert.equal(fs.existsSync(dir), false, "Aeterna's directory is removed at stop");
      assert.deepEqual(withMarker(marker), []);
    },
  );

  it(
    'fallback mode (service.cgroups: false), as PID 1: escapees outlive reloads (the documented limit), and at stop Aeterna ends every one of them with SIGTERM before it exits',
    { skip: noPidNamespace ?? false },
    async () => {
      const { d, marker } = start(false, true);
      await d.waitStatus((s) => s.state === 'Running');
      await escapeeOf(d, 1);
      assert.ok(
        d.run.logs().some((l) => l.cgroups === false && /service\.cgroups is false/.test(l.msg)),
        'Aeterna says which attribution it uses',
      );
      for (let n = 2; n <= 3; n++) {
        assert.equal((await d.cli('reload')).code, 0);
        await escapeeOf(d, n);
      }
      assert.equal(withMarker(marker, 'escapee').length, 3, 'one escapee per generation survived the reloads');
      assert.equal(await d.stop(), 0);
      // As PID 1 the kernel would SIGKILL them anyway once Aeterna exits; a TERM line means Aeterna ended each one first.
      assert.equal(terminated(marker), 3, 'each escapee got SIGTERM from Aeterna');
      const ended = d.run.logs().find((l) => /^ended \d+ leftover process/.test(l.msg));
      assert.ok(ended, d.run.stderr);
      assert.equal((ended.pids as number[]).length, 3);
      assert.deepEqual(withMarker(marker), []);
    },
  );

  for (const cgroups of [true, false]) {
    it(
      `${cgroups ? 'cgroup' : 'fallback'} mode, Aeterna a subreaper (not PID 1, so the kernel cleans nothing up): after a reload and aeterna stop no process of the app is left`,
      { skip: cgroups ? (noCgroups ?? false) : false },
      async () => {
        const { d, marker } = start(cgroups, false);
        await d.waitStatus((s) => s.state === 'Running');
        await escapeeOf(d, 1);
        assert.equal((await d.cli('reload')).code, 0);
        await escapeeOf(d, 2);
        const escapees = await settle(
          () => withMarker(marker, 'escapee'),
          (l) => l.length === (cgroups ? 1 : 2),
        );
        assert.equal(
          escapees.length,
          cgroups ? 1 : 2,
          cgroups ? 'the old escapee went with its generation' : 'the old escapee survived the reload (fallback)',
        );
        assert.equal((await d.cli('stop')).code, 0);
        assert.equal((await d.run.exit()).code, 0);
        const left = await settle(
          () => withMarker(marker),
          (l) => l.length === 0,
        );
        assert.deepEqual(left, [], 'no process of the app outlives Aeterna');
      },
    );
  }
});

// `aeterna signal` and `aeterna stop --wait`, against a real Aeterna as PID 1 of
// its own PID namespace, with an app that records every signal it gets.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { descendantsOf, pidNamespaceUnavailable } from '../../helpers/aeterna';
import { Daemon, socketOf } from '../../helpers/daemon';
import { call } from '../../../src/control/client';

const skip = pidNamespaceUnavailable();
if (skip) console.log(`# skipping PID-1 tests: ${skip}`);

/**
 * The app: a root process and one worker in its process group (as a master and its worker). Each prints
 * `GOT <root|worker> <SIGNAME>` for HUP, USR1, USR2; on SIGTERM the root ends its worker and exits with the code
 * given as its first argument (with `ignore-term` as its second, the root ignores SIGTERM).
 */
const RECORDER = `
import os, signal, sys, time
code = int(sys.argv[1]) if len(sys.argv) > 1 else 0
role = 'root'
def report(sig, _frame):
    # One write per line: root and worker share stdout, and print's separate newline write can land between the other's.
    os.write(1, f'GOT {role} {signal.Signals(sig).name}\\n'.encode())
for s in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, report)
worker = os.fork()
if worker == 0:
    role = 'worker'
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    print(f'WORKER {os.getpid()} group {os.getpgid(0)}', flush=True)
    while True:
        time.sleep(3600)
def term(_sig, _frame):
    os.kill(worker, signal.SIGTERM)
    os.waitpid(worker, 0)
    print('ROOT exits', code, flush=True)
    os._exit(code)
signal.signal(signal.SIGTERM, signal.SIG_IGN if sys.argv[2:] == ['ignore-term'] else term)
print(f'ROOT {os.getpid()} group {os.getpgid(0)}', flush=True)
while True:
    time.sleep(3600)
`;

function recorder(d: Daemon, code = 0, ignoreTerm = false): string[] {
  const file = path.join(d.dir, 'recorder.py');
  fs.writeFileSync(file, RECORDER);
  return ['python3', file, String(code), ...(ignoreTerm ? ['ignore-term'] : [])];
}

/** A daemon as PID 1 running the recorder, once it serves (both processes started). */
async function serving(code = 0, ignoreTerm = false, stopTimeout = '10s'): Promise<Daemon> {
  const d = new Daemon({ command: [] });
  d.write({ command: recorder(d, code, ignoreTerm), stopTimeout });
  d.start(true);
  daemons.push(d);
  await d.run.waitFor(/ROOT \d+ group \d+/);
  await d.run.waitFor(/WORKER \d+ group \d+/);
  await d.waitStatus((s) => s.state === 'Running');
  return d;
}

const daemons: Daemon[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
});

const count = (text: string, line: string): number => text.split('\n').filter((l) => l === line).length;

describe('aeterna signal SIG (as PID 1)', { skip: skip ?? false, timeout: 120000 }, () => {
  it('USR1 and HUP reach every process of the serving generation, and HUP reloads nothing', async () => {
    const d = await serving();
    const usr1 = await d.cli('signal', 'USR1');
    assert.equal(usr1.code, 0, usr1.stderr);
    assert.match(usr1.stdout, /^SIGUSR1 sent to generation 1 \(process group \d+\)$/m);
    const hup = await d.cli('signal', 'sighup', '--json');
    assert.equal(hup.code, 0, hup.stderr);
    const answer = JSON.parse(hup.stdout) as { ok: boolean; signal: string; generation: number; to: string };
    assert.deepEqual([answer.ok, answer.signal, answer.generation, answer.to], [true, 'SIGHUP', 1, 'group']);
    for (const line of ['GOT root SIGUSR1', 'GOT worker SIGUSR1', 'GOT root SIGHUP', 'GOT worker SIGHUP'])
      await d.run.waitFor(new RegExp(`^${line}$`, 'm'));
    const status = await d.status();
    assert.equal(status.generation, 1, 'no new generation');
    assert.equal(status.last_reload, null, 'no reload');
    assert.equal(count(d.run.stdout, 'GOT root SIGHUP'), 1);
    assert.equal(count(d.run.stdout, 'GOT worker SIGHUP'), 1);
    assert.equal(await d.stop(), 0);
  });

  it('--main: only the root process gets it', async () => {
    const d = await serving();
    const usr2 = await d.cli('signal', 'USR2', '--main');
    assert.equal(usr2.code, 0, usr2.stderr);
    assert.match(usr2.stdout, /^SIGUSR2 sent to generation 1 \(pid \d+\)$/m);
    // Then one the whole group gets: once the worker has it, it would have had USR2 already had it been sent to it.
    assert.equal((await d.cli('signal', 'USR1')).code, 0);
    await d.run.waitFor(/^GOT root SIGUSR2$/m);
    await d.run.waitFor(/^GOT worker SIGUSR1$/m);
    assert.equal(count(d.run.stdout, 'GOT worker SIGUSR2'), 0);
    assert.equal(await d.stop(), 0);
  });

  it('a refused signal (TERM, KILL, STOP) is refused with exit code 2 and the reason; the app is untouched', async () => {
    const d = await serving();
    const term = await d.cli('signal', 'TERM');
    assert.equal(term.code, 2);
    assert.match(term.stderr, /signal "TERM" refused: stopping the app is Aeterna's: use `aeterna stop`/);
    assert.match(term.stderr, /allowed: HUP, USR1, USR2, QUIT, WINCH, TTIN, TTOU/);
    for (const name of ['KILL', 'SIGSTOP', '9', 'RTMIN']) {
      const r = await d.cli('signal', name);
      assert.equal(r.code, 2, `${name}: ${r.stderr}`);
      assert.match(r.stderr, /refused/);
    }
    // The daemon refuses it too, whatever client asks.
    await assert.rejects(call(socketOf(d), { cmd: 'signal', signal: 'KILL' as 'HUP', main: false }), {
      code: 'E_CONTROL_BAD_REQUEST',
    });
    const status = await d.status();
    assert.equal(status.state, 'Running');
    assert.equal(status.generation, 1);
    assert.equal(await d.stop(), 0, 'the app got its first SIGTERM from aeterna stop');
    assert.equal(count(d.run.stdout, 'ROOT exits 0'), 1);
  });

  it('nothing serves (the app is still starting): exit code 1, E_ILLEGAL_TRANSITION', async () => {
    const d = new Daemon({ command: [] });
    d.write({ command: recorder(d), readiness: '{ mode: "notify", timeout: "60s" }' });
    d.start(true);
    daemons.push(d);
    await d.run.waitFor(/WORKER \d+ group \d+/);
    await d.waitStatus((s) => s.state === 'Starting');
    const r = await d.cli('signal', 'HUP');
    assert.equal(r.code, 1);
    assert.match(r.stderr, /no generation serves \(state Starting\): nothing to signal \(E_ILLEGAL_TRANSITION\)/);
    assert.equal(count(d.run.stdout, 'GOT root SIGHUP'), 0);
    assert.equal(await d.stop(), 0);
  });
});

/** Whether a process has exited: gone from /proc, or a zombie its parent has not reaped yet. */
function exited(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z');
  } catch {
    return true;
  }
}

describe('aeterna stop --wait (as PID 1)', { skip: skip ?? false, timeout: 120000 }, () => {
  it("returns once Aeterna and the app are gone, with the app's exit code as Aeterna's", async () => {
    const d = await serving(3);
    const aeterna = await d.run.aeternaPid();
    const app = descendantsOf(aeterna);
    assert.equal(app.length, 2, 'the root and its worker');
    const r = await d.cli('stop', '--wait');
    assert.equal(r.code, 3, r.stderr);
    assert.match(r.stdout, /^stopped: Aeterna exited with code 3$/m);
    assert.deepEqual(
      [aeterna, ...app].filter((pid) => !exited(pid)),
      [],
      'Aeterna and every process of the app have exited when stop --wait returns',
    );
    assert.equal((await d.run.exit()).code, 3);
    assert.equal(count(d.run.stdout, 'ROOT exits 3'), 1);
  });

  it('--timeout bounds the wait (exit code 124); a second stop --wait kills the app and returns 137', async () => {
    const d = await serving(0, true, '60s');
    const aeterna = await d.run.aeternaPid();
    const first = await d.cli('stop', '--wait', '--timeout', '1s');
    assert.equal(first.code, 124, first.stderr);
    assert.match(first.stderr, /Aeterna has not exited after 1s; it goes on stopping/);
    assert.equal(exited(aeterna), false, 'Aeterna still stops the app (it ignores SIGTERM, stop_timeout 60s)');
    assert.equal((await d.status()).state, 'Stopping');
    const second = await d.cli('stop', '--wait', '--json');
    assert.equal(second.code, 137, second.stderr);
    assert.deepEqual(JSON.parse(second.stdout), { ok: true, exit_code: 137 });
    assert.equal(exited(aeterna), true);
    assert.equal((await d.run.exit()).code, 137);
  });
});

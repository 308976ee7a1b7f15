// sd_notify beyond READY=1, against a real Aeterna as PID 1: EXTEND_TIMEOUT_USEC= pushes the readiness deadline
// (and the stop deadline) back as systemd does, STATUS= shows in `aeterna status`.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { pidNamespaceUnavailable } from '../../helpers/aeterna';
import { Daemon } from '../../helpers/daemon';

const skip = pidNamespaceUnavailable();
if (skip) console.log(`# skipping PID-1 tests: ${skip}`);

/**
 * The app, by its first argument:
 * - `ready`: READY=1 and STATUS=serving at once.
 * - `extend S`: EXTEND_TIMEOUT_USEC= of 10 s every 0.2 s (STATUS=warming up) until it has run for S seconds by its
 *   own monotonic clock, then READY=1 and STATUS=serving.
 * - `extend-once`: one EXTEND_TIMEOUT_USEC= of 8 s, then silence: never ready.
 * - `slow-stop S`: ready at once; on SIGTERM it keeps extending (by 10 s every 0.2 s) for S seconds, then exits 0.
 */
const APP = `
import os, signal, socket, sys, time
def notify(text):
    address = os.environ['NOTIFY_SOCKET']
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(text.encode(), address)
mode = sys.argv[1]
start = time.monotonic()
if mode == 'extend':
    n = 0
    while time.monotonic() - start < float(sys.argv[2]):
        n += 1
        notify(f'EXTEND_TIMEOUT_USEC=10000000\\nSTATUS=warming up {n}')
        time.sleep(0.2)
    print(f'EXTENDED {n} times over {time.monotonic() - start:.1f}s', flush=True)
if mode == 'extend-once':
    notify('EXTEND_TIMEOUT_USEC=8000000\\nSTATUS=about to hang')
    while True:
        time.sleep(3600)
def stop(_sig, _frame):
    begin = time.monotonic()
    notify('STOPPING=1\\nSTATUS=finishing work')
    while time.monotonic() - begin < float(sys.argv[2]):
        notify('EXTEND_TIMEOUT_USEC=10000000')
        time.sleep(0.2)
    print('FINISHED', flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop if mode == 'slow-stop' else lambda *_: sys.exit(0))
notify(f'READY=1\\nSTATUS=serving as generation {os.environ["AETERNA_GENERATION"]}\\nMAINPID={os.getpid()}')
print('READY', os.getpid(), flush=True)
while True:
    time.sleep(3600)
`;

const daemons: Daemon[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
});

/**
 * A daemon as PID 1 whose app runs with `args` (readiness by sd_notify within `timeout`), once it runs; and what
 * rewrites the config so that the next reload starts the app with other arguments.
 */
async function running(
  args: string[],
  extra: { timeout?: string; stopTimeout?: string } = {},
): Promise<{ d: Daemon; reconfigure: (args: string[]) => void }> {
  const d = new Daemon({ command: [] });
  const file = path.join(d.dir, 'app.py');
  fs.writeFileSync(file, APP);
  const options = (a: string[]): ConstructorParameters<typeof Daemon>[0] => ({
    command: ['python3', file, ...a],
    readiness: `{ mode: "notify", timeout: "${extra.timeout ?? '5s'}" }`,
    stopTimeout: extra.stopTimeout ?? '10s',
  });
  d.write(options(args));
  d.start(true);
  daemons.push(d);
  await d.waitStatus((s) => s.state === 'Running', 60000);
  return { d, reconfigure: (a) => d.write(options(a)) };
}

describe('sd_notify EXTEND_TIMEOUT_USEC= and STATUS= (as PID 1)', { skip: skip ?? false, timeout: 180000 }, () => {
  it('an app that extends repeatedly and becomes ready after readiness.timeout is promoted, not rolled back', async () => {
    const { d, reconfigure } = await running(['ready']);
    // readiness.timeout is 5s; the new generation keeps extending for 8s by its own clock before READY=1.
    reconfigure(['extend', '8']);
    const r = await d.cli('reload', '--json');
    // Aeterna's output ends the message: the app's stderr (a traceback) goes there.
    assert.equal(r.code, 0, `${r.stdout}${r.stderr}\nAeterna's output:\n${d.run.stdout}${d.run.stderr.slice(-6000)}`);
    const record = JSON.parse(r.stdout.trim().split('\n').pop()!) as { outcome: string };
    assert.equal(record.outcome, 'promoted');
    const extended = /EXTENDED (\d+) times over ([\d.]+)s/.exec(d.run.stdout);
    assert.ok(extended, d.run.stdout);
    assert.ok(Number(extended[2]) >= 8, 'it became ready only after readiness.timeout (5s) had passed');
    assert.ok(d.run.logs().some((l) => l.msg.includes('asked for more time to become ready')));
    assert.equal((await d.status()).generation, 2);
    assert.equal(await d.stop(), 0);
  });

  it('an app that stops extending is rolled back (E_READY_TIMEOUT, after its extension)', async () => {
    const { d, reconfigure } = await running(['ready']);
    reconfigure(['extend-once']);
    const r = await d.cli('reload', '--json');
    assert.equal(r.code, 1, r.stdout + r.stderr);
    const record = JSON.parse(r.stdout.trim().split('\n').pop()!) as { outcome: string; code: string; reason: string };
    assert.equal(record.outcome, 'rolled_back');
    assert.equal(record.code, 'E_READY_TIMEOUT');
    assert.match(
      record.reason,
      /not ready within 5s nor within the last EXTEND_TIMEOUT_USEC= \(1 extension\(s\) of it\)/,
    );
    const s = await d.status();
    assert.equal(s.generation, 1, 'generation 1 still serves');
    assert.equal(await d.stop(), 0);
  });

  it('STATUS= of the serving generation shows in aeterna status (text and --json)', async () => {
    const { d, reconfigure } = await running(['ready']);
    const json = (await d.waitStatus((s) => (s as { app_status?: string | null }).app_status != null)) as {
      app_status?: string | null;
    };
    assert.equal(json.app_status, 'serving as generation 1');
    const text = await d.cli('status');
    assert.equal(text.code, 0, text.stderr);
    assert.match(text.stdout, /^app status: +serving as generation 1$/m);
    reconfigure(['ready']);
    assert.equal((await d.cli('reload')).code, 0);
    const after = (await d.waitStatus(
      (s) => (s as { app_status?: string | null }).app_status === 'serving as generation 2',
    )) as {
      generation: number;
    };
    assert.equal(after.generation, 2, 'the text is the serving generation’s own');
    assert.equal(await d.stop(), 0);
  });

  it('while stopping, EXTEND_TIMEOUT_USEC= pushes the SIGKILL back: the app finishes and exits 0', async () => {
    // stop_timeout is 4s; the app takes 8s by its own clock to finish, extending all along.
    const { d } = await running(['slow-stop', '8'], { stopTimeout: '4s' });
    assert.equal(await d.stop(), 0, 'not 137: no SIGKILL at stop_timeout');
    assert.match(d.run.stdout, /^FINISHED$/m);
  });
});

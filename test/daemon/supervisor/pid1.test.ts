// `aeterna start` as a real PID 1 in a fresh PID namespace: reaping, exit
// codes, signals, socket inheritance, the listen backlog, spawn errors.
import { describe, it, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fixture, freePort, pidNamespaceUnavailable, runAeterna, tempDir, writeConfig } from '../../helpers/aeterna';
import { Daemon } from '../../helpers/daemon';

const skip = pidNamespaceUnavailable();
if (skip) console.log(`# skipping PID-1 tests: ${skip}`);

function config(dir: string, command: string[], extra = ''): string {
  return writeConfig(
    dir,
    `version: "v1"
service:
  name: "fixture"
  command: ${JSON.stringify(command)}
  stop_timeout: "1s"
${extra}
control:
  socket_path: "${path.join(dir, 'control.sock')}"
observability:
  log_level: "debug"
`,
  );
}

function httpGet(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1');
    let data = '';
    socket.setEncoding('utf8');
    socket.on('connect', () => socket.write('GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'));
    socket.on('data', (d: string) => (data += d));
    socket.on('end', () => resolve(data.slice(data.indexOf('\r\n\r\n') + 4)));
    socket.on('error', reject);
  });
}

describe('aeterna start as PID 1', { skip: skip ?? false, timeout: 60000 }, () => {
  let dir: string;
  before(() => {
    dir = tempDir();
  });

  it('reaps 200 double-forked orphans: zero zombies left in the namespace', async () => {
    const run = runAeterna(['start', '-c', config(tempDir(), ['python3', fixture('apps', 'orphans.py'), '200'])], {
      pid1: true,
    });
    const result = await run.result<{ orphans: number; alive_or_zombie: number; zombies: number }>();
    const exit = await run.exit();
    assert.equal(result.orphans, 200);
    assert.equal(result.zombies, 0);
    assert.equal(result.alive_or_zombie, 0);
    assert.equal(run.logs().filter((l) => l.msg === 'reaped orphan').length, 200, 'Aeterna reaped each orphan itself');
    assert.equal(exit.code, 0);
  });

  it('propagates the exit code: app exits 7 -> aeterna exits 7', async () => {
    const run = runAeterna(['start', '-c', config(dir, ['sh', '-c', 'exit 7'])], { pid1: true });
    assert.equal((await run.exit()).code, 7);
  });

  it('propagates death by signal: app killed by SIGKILL -> aeterna exits 137', async () => {
    const run = runAeterna(['start', '-c', config(tempDir(), ['sh', '-c', 'kill -KILL $$'])], { pid1: true });
    assert.equal((await run.exit()).code, 137);
  });

  it('SIGTERM to aeterna reaches the app, which cleans up and exits 0', async () => {
    const run = runAeterna(['start', '-c', config(tempDir(), ['python3', fixture('apps', 'signals.py')])], {
      pid1: true,
    });
    await run.waitFor(/READY \d+/);
    await run.signal('SIGTERM');
    const exit = await run.exit();
    assert.match(run.stdout, /CLEANUP done/);
    assert.equal(exit.code, 0);
  });

  it('an app that ignores SIGTERM is killed after stop_timeout (exit 137)', async () => {
    const run = runAeterna(
      ['start', '-c', config(tempDir(), ['python3', fixture('apps', 'signals.py'), 'ignore-term'])],
      { pid1: true },
    );
    await run.waitFor(/READY \d+/);
    await run.signal('SIGTERM');
    const exit = await run.exit();
    assert.doesNotMatch(run.stdout, /CLEANUP/);
    assert.equal(exit.code, 137);
  });

  it('forwards SIGUSR1, SIGUSR2, SIGQUIT and SIGWINCH to the app', async () => {
    const run = runAeterna(['start', '-c', config(tempDir(), ['python3', fixture('apps', 'signals.py')])], {
      pid1: true,
    });
    await run.waitFor(/READY \d+/);
    for (const sig of ['SIGUSR1', 'SIGUSR2', 'SIGQUIT', 'SIGWINCH'] as const) {
      await run.signal(sig);
      await run.waitFor(new RegExp(`GOT ${sig}`));
    }
    await run.signal('SIGTERM');
    assert.equal((await run.exit()).code, 0);
  });

  it('the app sees LISTEN_FDS, LISTEN_PID (its own pid), LISTEN_FDNAMES, listening sockets at fd 3.. and no other fds', async () => {
    const d = tempDir();
    const [p1, p2] = [await freePort(), await freePort()];
    const run = runAeterna(
      [
        'start',
        '-c',
        config(
          d,
          ['python3', fixture('apps', 'report.py')],
          `  env: ["DEMO_VAR=hello"]
  listeners:
    - name: "http"
      address: "tcp://127.0.0.1:${p1}"
    - name: "admin"
      address: "tcp://127.0.0.1:${p2}"
    - name: "local"
      address: "unix://${path.join(d, 'app.sock')}"`,
        ),
      ],
      { pid1: true },
    );
    const r = await run.result<{
      pid: number;
      ppid: number;
      sid: number;
      LISTEN_FDS: string;
      LISTEN_PID: string;
      LISTEN_FDNAMES: string;
      AETERNA_GENERATION: string;
      DEMO_VAR: string;
      fds: number[];
      listening: Record<string, boolean>;
    }>();
    await run.exit();
    assert.equal(r.LISTEN_FDS, '3');
    assert.equal(r.LISTEN_PID, String(r.pid));
    assert.equal(r.LISTEN_FDNAMES, 'http:admin:local');
    assert.equal(r.AETERNA_GENERATION, '1');
    assert.equal(r.DEMO_VAR, 'hello');
    assert.equal(r.ppid, 1, 'Aeterna is PID 1 and the app its child');
    assert.equal(r.sid, r.pid, 'the app leads its own session');
    // 0,1,2, the three listeners, and the fd os.listdir itself had open while listing.
    assert.deepEqual(
      r.fds.filter((fd) => fd <= 5),
      [0, 1, 2, 3, 4, 5],
    );
    assert.equal(r.fds.length, 7, `only one extra fd (the directory listing's own): ${JSON.stringify(r.fds)}`);
    assert.deepEqual([r.listening['3'], r.listening['4'], r.listening['5']], [true, true, true]);
  });

  it('passes on sockets handed to aeterna by a socket activator (LISTEN_FDS to aeterna itself)', async () => {
    const port = await freePort();
    const run = runAeterna(['start', '-c', config(tempDir(), ['python3', fixture('apps', 'report.py')])], {
      pid1: true,
      prefix: ['python3', fixture('apps', 'activator.py'), String(port)],
    });
    const r = await run.result<{
      pid: number;
      LISTEN_FDS: string;
      LISTEN_PID: string;
      LISTEN_FDNAMES: string;
      listening: Record<string, boolean>;
      fds: number[];
    }>();
    await run.exit();
    assert.equal(r.LISTEN_FDS, '1');
    assert.equal(r.LISTEN_FDNAMES, 'activated');
    assert.equal(r.LISTEN_PID, String(r.pid));
    assert.equal(r.listening['3'], true);
    assert.equal(r.fds.length, 5, `0,1,2,3 and the listing's own fd: ${JSON.stringify(r.fds)}`);
  });

  it('a connection made while no app accepts is queued in the backlog and served by the app that comes next', async () => {
    const d = tempDir();
    const port = await freePort();
    const gateFile = path.join(d, 'open');
    const run = runAeterna(
      [
        'start',
        '-c',
        config(
          d,
          ['python3', fixture('apps', 'gate.py'), gateFile, process.execPath, fixture('apps', 'http_app.js')],
          `  listeners:
    - name: "http"
      address: "tcp://127.0.0.1:${port}"`,
        ),
      ],
      { pid1: true },
    );
    await run.waitFor(/GATE waiting/);
    // Nobody accepts yet: the kernel completes the handshake into the backlog.
    const pending = httpGet(port);
    await new Promise((r) => setTimeout(r, 200));
    fs.writeFileSync(gateFile, '');
    const body = JSON.parse(await pending) as { ppid: number; generation: string };
    assert.equal(body.ppid, 1);
    assert.equal(body.generation, '1');
    await run.signal('SIGTERM');
    assert.equal((await run.exit()).code, 0);
  });

  it('serves a real HTTP app as PID 1 on a socket aeterna owns', async () => {
    const port = await freePort();
    const run = runAeterna(
      [
        'start',
        '-c',
        config(
          tempDir(),
          [process.execPath, fixture('apps', 'http_app.js')],
          `  listeners:
    - name: "http"
      address: "tcp://127.0.0.1:${port}"`,
        ),
      ],
      { pid1: true },
    );
    await run.waitFor(/READY \d+/);
    const body = JSON.parse(await httpGet(port)) as { pid: number; ppid: number };
    assert.equal(body.ppid, 1);
    await run.signal('SIGTERM');
    assert.equal((await run.exit()).code, 0);
  });

  it('exec of a missing binary is a clear error naming the command and errno, and a non-zero exit', async () => {
    const run = runAeterna(['start', '-c', config(tempDir(), ['/no/such/binary', '--flag'])], { pid1: true });
    const exit = await run.exit();
    assert.equal(exit.code, 127);
    const err = run.logs().find((l) => l.level === 'error');
    assert.ok(err, run.stderr);
    assert.match(err.msg, /\/no\/such\/binary/);
    assert.match(err.msg, /ENOENT/);
    assert.equal(err.code, 'E_SPAWN_FAILED');
  });

  it(
    "a service.cwd the app's user cannot enter is E_SPAWN_FAILED at start (exit 126) naming the directory and errno",
    { skip: process.getuid?.() === 0 ? false : 'needs root to switch users' },
    async () => {
      const dir = tempDir();
      const closed = path.join(dir, 'root-only');
      fs.mkdirSync(closed, { mode: 0o700 }); // root's; nobody may not enter it
      fs.chmodSync(dir, 0o755);
      const run = runAeterna(['start', '-c', config(dir, ['true'], `  user: "nobody"\n  cwd: "${closed}"`)], {
        pid1: true,
      });
      const exit = await run.exit();
      assert.equal(exit.code, 126, run.stderr);
      const err = run.logs().find((l) => l.level === 'error');
      assert.ok(err, run.stderr);
      assert.equal(err.code, 'E_SPAWN_FAILED');
      assert.match(err.msg, new RegExp(`cwd "${closed}"\\): chdir: Permission denied \\(EACCES\\)`));
      assert.equal(run.logs().filter((l) => l.msg === 'generation started').length, 0, 'no generation ever ran');
    },
  );

  it(
    "a reload to a service.cwd the app's user cannot enter fails with E_SPAWN_FAILED naming it; the old generation serves on",
    { skip: process.getuid?.() === 0 ? false : 'needs root to switch users' },
    async () => {
      const d = new Daemon({ command: ['sleep', '1000'], extraService: '  user: "nobody"\n' }).start(true);
      try {
        const before = await d.waitStatus((s) => s.state === 'Running');
        const closed = path.join(d.dir, 'root-only');
        fs.mkdirSync(closed, { mode: 0o700 });
        d.write({ ...d.options, extraService: `  user: "nobody"\n  cwd: "${closed}"\n` });
        const r = await d.cli('reload');
        assert.equal(r.code, 1, r.stderr);
        assert.match(r.stderr, new RegExp(`cwd "${closed}"\\): chdir: Permission denied \\(EACCES\\)`));
        const after = await d.status();
        assert.equal(after.last_reload?.code, 'E_SPAWN_FAILED');
        assert.equal(after.state, 'Running');
        assert.equal(after.generation, before.generation, 'the old generation still serves');
        assert.equal(after.pid, before.pid);
        assert.equal(await d.stop(), 143, 'sleep ends by SIGTERM');
      } finally {
        await d.run.killAll();
      }
    },
  );

  it('a listener address already in use is a clear error naming it', async () => {
    const blocker = net.createServer().listen(0, '127.0.0.1');
    await new Promise((r) => blocker.once('listening', r));
    const port = (blocker.address() as net.AddressInfo).port;
    try {
      const run = runAeterna(
        [
          'start',
          '-c',
          config(
            tempDir(),
            ['true'],
            `  listeners:
    - name: "web"
      address: "tcp://127.0.0.1:${port}"`,
          ),
        ],
        { pid1: true },
      );
      const exit = await run.exit();
      assert.equal(exit.code, 69);
      const err = run.logs().find((l) => l.level === 'error');
      assert.ok(err, run.stderr);
      assert.equal(err.code, 'E_LISTEN_ADDR_IN_USE');
      assert.match(err.msg, new RegExp(`listener "web" \\(tcp://127.0.0.1:${port}\\): address already in use`));
    } finally {
      blocker.close();
    }
  });
});

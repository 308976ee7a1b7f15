// Hostile and malformed input against a real daemon (docs/reliability.md,
// docs/security.md): garbage on the control socket and the sd_notify socket,
// and the app running as another user. Each bad input must be answered with
// a clear error (or ignored, for datagrams), the daemon must keep serving,
// and its memory and fd count must stay flat. Counts and states only.
//
// The in-process classes (invalid JSON, unknown commands, wrong field types,
// a 100 KiB line, the connection limit, a peer running as `nobody`) are in
// test/unit/control.test.ts; here is what needs the whole daemon.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import { LineDecoder, type ServerMessage } from '../../../src/control/protocol';
import { fdCount, rssKiB, settle } from '../../../bench/soak';
import { fixture, freePort } from '../../helpers/aeterna';
import { Daemon, socketOf, statusOf } from '../../helpers/daemon';
import { getJson } from '../../helpers/load';

const APP = [process.execPath, fixture('faults', 'app.js')];
const MiB = 1024;
const daemons: Daemon[] = [];
after(async () => {
  // A daemon left by a failed test: kill it with every generation it started (see AeternaRun.killAll).
  for (const d of daemons) await d.run.killAll();
});

interface Exchange {
  messages: ServerMessage[];
  /** Lines that were not JSON (must never happen). */
  unparsed: string[];
  /** The connection could not be made (e.g. EAGAIN: the listen backlog was full). */
  connectError: string | null;
  closed: boolean;
}

/** Connect, send `data` (then half-close when `end`), collect every reply line until the daemon closes. */
function exchange(
  socketPath: string,
  data: Buffer | string | null,
  options: { end?: boolean; closeAtOnce?: boolean } = {},
): Promise<Exchange> {
  return new Promise((resolve) => {
    const socket = net.createConnection({ path: socketPath });
    const decoder = new LineDecoder(1 << 20);
    const result: Exchange = { messages: [], unparsed: [], connectError: null, closed: false };
    let connected = false;
    socket.on('connect', () => {
      connected = true;
      if (options.closeAtOnce) {
        socket.end();
        return;
      }
      if (data !== null) {
        if (options.end) socket.end(data);
        else socket.write(data);
      }
    });
    socket.on('data', (chunk: Buffer) => {
      for (const line of decoder.push(chunk)) {
        try {
          result.messages.push(JSON.parse(line.toString()) as ServerMessage);
        } catch {
          result.unparsed.push(line.toString());
        }
      }
    });
    socket.on('error', (err: NodeJS.ErrnoException) => {
      // EPIPE/ECONNRESET while still writing garbage after the daemon gave up is expected.
      if (!connected) result.connectError = err.code ?? err.message;
    });
    socket.on('close', () => {
      result.closed = true;
      resolve(result);
    });
  });
}

function assertOneError(r: Exchange, code: string, message?: RegExp): void {
  assert.equal(r.connectError, null);
  assert.deepEqual(r.unparsed, []);
  assert.equal(r.messages.length, 1, JSON.stringify(r.messages));
  const [m] = r.messages;
  assert.ok(m.type === 'error', JSON.stringify(m));
  assert.equal(m.code, code);
  if (message) assert.match(m.message, message);
  assert.ok(r.closed, 'the daemon closed the connection');
}

/** A 10 MiB stream without a newline, written as fast as the daemon takes it (it gives up at 64 KiB). */
function streamFlood(socketPath: string): Promise<Exchange & { written: number }> {
  return new Promise((resolve) => {
    const socket = net.createConnection({ path: socketPath });
    const decoder = new LineDecoder(1 << 20);
    const messages: ServerMessage[] = [];
    let written = 0;
    const chunk = Buffer.alloc(64 * 1024, 'x');
    const pump = (): void => {
      while (written < 10 * 1024 * 1024 && !socket.destroyed && !socket.writableEnded) {
        written += chunk.length;
        if (!socket.write(chunk)) return void socket.once('drain', pump);
      }
    };
    socket.on('connect', pump);
    socket.on('data', (c: Buffer) =>
      decoder.push(c).forEach((l) => messages.push(JSON.parse(l.toString()) as ServerMessage)),
    );
    socket.on('error', () => undefined);
    socket.on('close', () => resolve({ messages, unparsed: [], connectError: null, closed: true, written }));
  });
}

describe('hostile input on the control socket of a real daemon', { timeout: 120000 }, () => {
  let d: Daemon;
  let port: number;
  let aeterna: number;
  let socket: string;
  let baseline: { rss: number; fds: number };

  before(async () => {
    port = await freePort();
    d = new Daemon({ command: APP, port }).start();
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Running');
    aeterna = d.run.child.pid!;
    socket = socketOf(d);
    // Warm up (lazy allocations, JIT), then take the baseline.
    for (let i = 0; i < 500; i++) await exchange(socket, i % 2 ? '{"cmd":"nope"}\n' : Buffer.from([0xff, 0x0a]));
    baseline = {
      rss: rssKiB(aeterna),
      fds: await settle(
        () => fdCount(aeterna),
        () => false,
        300,
      ),
    };
  });

  const cases: Array<{ what: string; data: Buffer | string; end?: boolean; message: RegExp }> = [
    {
      what: 'length abuse: a line of 64 KiB + 1 byte',
      data: Buffer.concat([Buffer.alloc(64 * 1024 + 1, 'a'), Buffer.from('\n')]),
      message: /line longer than 65536 bytes/,
    },
    {
      what: 'length abuse: 1 MiB of newlines-free JSON',
      data: `{"cmd":"status","x":"${'y'.repeat(1024 * 1024)}"}\n`,
      message: /line longer than 65536 bytes/,
    },
    { what: 'truncated input: half a JSON object, then EOF', data: '{"cmd":"sta', end: true, message: /invalid JSON/ },
    {
      what: 'truncated input: a cut UTF-8 sequence, then EOF',
      data: Buffer.from([0x7b, 0x22, 0xe2, 0x82]),
      end: true,
      message: /not valid UTF-8 \(truncated sequence at the end of the line\)/,
    },
    {
      what: 'invalid UTF-8: an overlong encoding',
      data: Buffer.from([0x7b, 0xc0, 0xaf, 0x7d, 0x0a]),
      message: /not valid UTF-8 \(byte 0xc0 at offset 1\)/,
    },
    {
      what: 'invalid UTF-8: a lone surrogate',
      data: Buffer.from([0x22, 0xed, 0xa0, 0x80, 0x22, 0x0a]),
      message: /not valid UTF-8 \(byte 0xa0 at offset 2\)|byte 0xed at offset 1/,
    },
    { what: 'NUL bytes', data: Buffer.from('\0\0\0{"cmd":"status"}\n'), message: /invalid JSON/ },
    { what: 'an empty line', data: '\n', message: /empty line: expected a JSON object/ },
    {
      what: 'JSON nested 30,000 deep',
      data: '['.repeat(30000) + ']'.repeat(30000) + '\n',
      message: /expected a JSON object, got an array|invalid JSON/,
    },
    {
      what: 'a __proto__ key (no prototype pollution, no hidden command)',
      data: '{"cmd":"status","__proto__":{"cmd":"stop"}}\n',
      message: /request\.__proto__: unknown field/,
    },
    {
      what: 'an unknown op with a valid shape',
      data: '{"cmd":"exec","argv":["sh"]}\n',
      message: /unknown command "exec"/,
    },
  ];
  for (const c of cases) {
    it(`answers ${c.what} with E_CONTROL_BAD_REQUEST and closes; the daemon keeps serving`, async () => {
      assertOneError(await exchange(socket, c.data, { end: c.end }), 'E_CONTROL_BAD_REQUEST', c.message);
      assert.equal((await statusOf(d)).state, 'Running');
    });
  }

  it('length abuse: a 10 MiB stream is cut after 64 KiB with one error, not buffered', async () => {
    const r = await streamFlood(socket);
    assert.equal(r.messages.length, 1);
    assert.ok(r.messages[0].type === 'error' && r.messages[0].code === 'E_CONTROL_BAD_REQUEST');
    assert.ok(
      r.written < 10 * 1024 * 1024,
      `the daemon stopped reading long before the end (${r.written} bytes written)`,
    );
    assert.equal((await statusOf(d)).state, 'Running');
  });

  it('a client that connects and closes at once gets nothing and leaves nothing', async () => {
    const r = await exchange(socket, null, { closeAtOnce: true });
    assert.equal(r.connectError, null);
    assert.deepEqual(r.messages, []);
    assert.ok(r.closed);
  });

  it('1,000 connections at once, each with garbage: every one answered with an error and closed (or cut to make room, or refused by the kernel), none hangs', async () => {
    const garbage = [
      '{"cmd":"status"',
      '\u00ff\n',
      '{"cmd":"nope"}\n',
      'null\n',
      '{"cmd":"reload","wait":"x"}\n',
      '\n',
    ];
    const results = await Promise.all(
      Array.from({ length: 1000 }, (_, i) => exchange(socket, garbage[i % garbage.length], { end: i % 2 === 0 })),
    );
    const refused = results.filter((r) => r.connectError !== null);
    const answered = results.filter((r) => r.connectError === null);
    const codes: Record<string, number> = {};
    // At most 64 connections are held: beyond that the oldest without a request is cut (its error may be lost in the reset).
    const cut = answered.filter((r) => r.messages.length === 0);
    for (const r of answered.filter((a) => a.messages.length > 0)) {
      assert.deepEqual(r.unparsed, []);
      assert.equal(r.messages.length, 1, JSON.stringify(r.messages));
      assert.ok(r.messages[0].type === 'error');
      codes[r.messages[0].code] = (codes[r.messages[0].code] ?? 0) + 1;
      assert.ok(r.closed);
    }
    assert.ok(cut.every((r) => r.closed));
    console.log(
      `# 1,000 at once: ${answered.length - cut.length} answered ${JSON.stringify(codes)}, ${cut.length} cut to make room, ${refused.length} refused by the kernel (${[...new Set(refused.map((r) => r.connectError))].join(', ')})`,
    );
    assert.equal(answered.length + refused.length, 1000);
    assert.ok(
      refused.every((r) => r.connectError === 'EAGAIN' || r.connectError === 'ECONNREFUSED'),
      'the only refusal is a full listen backlog',
    );
    assert.ok(
      answered.length - cut.length >= 64,
      `at least a backlog's worth were answered (${answered.length - cut.length})`,
    );
    assert.deepEqual(
      Object.keys(codes).filter((c) => c !== 'E_CONTROL_BAD_REQUEST' && c !== 'E_CONTROL_UNAVAILABLE'),
      [],
    );
    assert.ok((codes.E_CONTROL_BAD_REQUEST ?? 0) > 0);
    assert.equal((await statusOf(d)).state, 'Running');
    assert.ok((await getJson<{ pid: number }>(port)).pid > 0, 'the app still serves');
  });

  it('a client that sends nothing is cut by the request timeout with an error', async () => {
    // Cut by the daemon's default 2 s request timeout.
    assertOneError(await exchange(socket, null), 'E_CONTROL_BAD_REQUEST', /no complete request line within 2000 ms/);
  });

  it("Aeterna's RSS stays flat (< +20 MiB) and its fd count returns to the baseline", async () => {
    const fds = await settle(
      () => fdCount(aeterna),
      (n) => n <= baseline.fds,
    );
    const rss = rssKiB(aeterna);
    console.log(`# control socket abuse: RSS ${baseline.rss} -> ${rss} KiB, fds ${baseline.fds} -> ${fds}`);
    assert.equal(fds, baseline.fds);
    assert.ok(rss - baseline.rss < 20 * MiB, `RSS grew ${rss - baseline.rss} KiB`);
    assert.equal(
      d.run.logs().filter((l) => l.level === 'fatal' || l.code === 'E_INTERNAL').length,
      0,
      'no internal error',
    );
    assert.equal(await d.stop(), 0);
  });
});

/** Run the notify sender (a process outside every generation); `prefix` runs it as another user (setpriv). */
function notifySend(
  address: string,
  kind: 'ready' | 'garbage' | 'flood' | 'burst' | 'probe',
  count: number,
  prefix: string[] = [],
): Promise<number> {
  return notifySendOutput(address, kind, count, prefix).then((out) => Number(/SENT (\d+)/.exec(out)?.[1] ?? 0));
}

function notifySendOutput(address: string, kind: string, count: number, prefix: string[] = []): Promise<string> {
  return new Promise((resolve, reject) => {
    // As another user, the system's python: one under root's home (pyenv) is not theirs to run.
    const argv = [
      ...prefix,
      prefix.length > 0 ? '/usr/bin/python3' : 'python3',
      fixture('faults', 'notify_send.py'),
      address,
      kind,
      String(count),
    ];
    const child = spawn(argv[0], argv.slice(1), { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (out += s));
    child.on('error', reject);
    child.on('exit', (code) => (code === 0 ? resolve(out) : reject(new Error(`notify_send exited ${code}`))));
  });
}

describe('NOTIFY_SOCKET: datagrams from outside the new generation', { timeout: 120000 }, () => {
  it('READY=1 from a stranger and from the old generation never makes the new one ready; garbage is ignored (and its warnings rate-limited)', async () => {
    // Generation 1 says READY=1 every 100 ms, for as long as it runs (from a helper process of its own).
    const d = new Daemon({
      command: APP,
      port: await freePort(),
      env: ['NOTIFY_SPAM=1'],
      readiness: '{ mode: "notify", timeout: "20s" }',
    }).start();
    daemons.push(d);
    const first = await d.waitStatus((s) => s.state === 'Running');
    const address = (await d.run.waitFor(/^ENV NOTIFY_SOCKET=(\S+) generation 1$/m))[1];
    const aeterna = d.run.child.pid!;

    // Generation 2 never notifies; the test (a stranger) keeps sending READY=1 and garbage while it waits.
    d.write({ ...d.options, env: [], readiness: '{ mode: "notify", timeout: "2s" }' });
    const reload = d.cli('reload');
    await d.waitStatus((s) => s.state === 'Handover');
    let strangerReady = 0;
    let garbage = 0;
    let done = false;
    void reload.then(() => (done = true));
    while (!done) {
      strangerReady += await notifySend(address, 'ready', 20);
      garbage += await notifySend(address, 'garbage', 5);
    }
    const r = await reload;
    assert.ok(
      strangerReady >= 20 && garbage >= 25,
      `datagrams were sent (${strangerReady} READY=1, ${garbage} garbage)`,
    );
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /not ready within 2s/);
    const s = await statusOf(d);
    assert.equal(s.pid, first.pid, 'the old generation still serves');
    assert.equal(s.last_reload?.code, 'E_READY_TIMEOUT');
    const ready = d.run.logs().filter((l) => l.msg === 'generation ready');
    assert.deepEqual([...new Set(ready.map((l) => l.generation))], [1], 'only generation 1 was ever ready');
    const warnings = d.run.logs().filter((l) => /^notify socket: ignored/.test(l.msg));
    assert.ok(
      warnings.length >= 1 && warnings.length <= 10,
      `garbage is logged, at most 10 times a minute (${warnings.length})`,
    );

    // A flood of garbage: the daemon keeps answering, logs no more, and its memory stays flat.
    const rss = rssKiB(aeterna);
    const flood = notifySend(address, 'flood', 2);
    let answered = 0;
    let flooding = true;
    void flood.then(() => (flooding = false));
    while (flooding) {
      // Paced: a tight loop of control connections would itself grow the heap and blur the RSS check.
      assert.equal((await statusOf(d)).state, 'Running');
      answered++;
      await new Promise((r) => setTimeout(r, 100));
    }
    const sent = await flood;
    assert.ok(sent > 1000, `a flood was sent (${sent})`);
    assert.ok(answered > 0, 'the control socket answered during the flood');
    assert.equal(
      d.run.logs().filter((l) => /^notify socket: ignored/.test(l.msg)).length,
      warnings.length,
      'no more warnings this minute',
    );
    const rssAfter = rssKiB(aeterna);
    console.log(
      `# notify flood: ${sent} datagrams, ${answered} status answers meanwhile, RSS ${rss} -> ${rssAfter} KiB`,
    );
    assert.ok(rssAfter - rss < 20 * MiB, `RSS ${rss} -> ${rssAfter} KiB`);

    // The positive control: a datagram from inside the new generation does count.
    d.write({ ...d.options, env: ['NOTIFY_SPAM=1'], readiness: '{ mode: "notify", timeout: "20s" }' });
    const ok = await d.cli('reload');
    assert.equal(ok.code, 0, ok.stderr);
    const after = await statusOf(d);
    assert.equal(after.last_reload?.outcome, 'promoted');
    assert.ok(
      d.run
        .logs()
        .some(
          (l) =>
            l.msg === 'generation ready' &&
            l.generation === after.generation &&
            /READY=1 from pid/.test(String(l.source)),
        ),
    );
    assert.equal(await d.stop(), 0);
  });
});

describe("NOTIFY_SOCKET: a path socket only the app's user can reach", { timeout: 120000 }, () => {
  const skip = process.getuid?.() === 0 ? false : 'needs root to switch users';
  const asNobody = ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups'];
  it(
    "mode 0600, owned by service.user: another uid gets EACCES, the app's READY=1 works, and a burst of 100,000 datagrams from the app's uid does not stop status from answering",
    { skip },
    async () => {
      const d = new Daemon({
        command: APP,
        port: await freePort(),
        env: ['NOTIFY_SPAM=1'],
        readiness: '{ mode: "notify", timeout: "20s" }',
        extraService: '  user: "nobody"\n',
      });
      fs.chmodSync(d.dir, 0o755); // the app's user must reach the directory; the socket's own mode is what keeps others out
      d.start();
      daemons.push(d);
      // Ready only by the app's own READY=1 (as nobody, through the socket).
      await d.waitStatus((s) => s.state === 'Running');
      const address = (await d.run.waitFor(/^ENV NOTIFY_SOCKET=(\S+) generation 1$/m))[1];
      const stat = fs.lstatSync(address);
      assert.ok(stat.isSocket(), `${address} is a socket file`);
      assert.equal(stat.mode & 0o777, 0o600);
      assert.equal(stat.uid, 65534);

      const stranger = await notifySendOutput(address, 'probe', 1, [
        'setpriv',
        '--reuid=12345',
        '--regid=12345',
        '--clear-groups',
      ]);
      assert.match(stranger, /^ERRNO EACCES$/m, 'another uid cannot send');

      const burst = notifySend(address, 'burst', 100_000, asNobody);
      let answered = 0;
      let bursting = true;
      void burst.then(
        () => (bursting = false),
        () => (bursting = false),
      );
      while (bursting) {
        assert.equal((await statusOf(d)).state, 'Running');
        answered++;
      }
      assert.equal(await burst, 100_000);
      assert.ok(answered > 0, 'the control socket answered during the burst');
      assert.equal((await statusOf(d)).state, 'Running');
      const warnings = d.run.logs().filter((l) => /^notify socket: ignored/.test(l.msg));
      assert.ok(warnings.length <= 10, `refused datagrams are logged at most 10 times a minute (${warnings.length})`);
      console.log(`# notify burst from the app's uid: 100000 datagrams, ${answered} status answers meanwhile`);
      assert.equal(await d.stop(), 0);
      assert.equal(fs.existsSync(address), false, 'the socket file is removed at exit');
    },
  );

  it(
    'a control socket directory service.user cannot enter: a warning names the directory and the fix',
    { skip },
    async () => {
      const d = new Daemon({
        command: APP,
        port: await freePort(),
        restart: '{ policy: "never" }',
        extraService: '  user: "nobody"\n',
      }).start(); // d.dir is 0700, root's
      daemons.push(d);
      await d.waitStatus((s) => s.state === 'Running');
      const warnings = d.run
        .logs()
        .filter((l) => /^notify socket: uid 65534 \(service\.user\) cannot enter/.test(l.msg));
      assert.equal(warnings.length, 1, d.run.stderr);
      assert.equal(warnings[0].directory, d.dir);
      assert.match(warnings[0].msg, /chmod o\+x\) or move control\.socket_path/);
      assert.equal(await d.stop(), 0);
    },
  );
});

describe('the app as another user (service.user / service.group)', { timeout: 120000 }, () => {
  const skip = process.getuid?.() === 0 ? false : 'needs root to switch users';
  interface Who {
    uid: number;
    euid: number;
    gid: number;
    egid: number;
    groups: number[];
    listener_fd3: boolean | string;
    control: string;
  }
  async function runAs(extraService: string): Promise<{ who: Who; d: Daemon }> {
    const port = await freePort();
    const d = new Daemon({ command: [], port, restart: '{ policy: "never" }', extraService });
    d.write({ ...d.options, command: ['python3', fixture('faults', 'whoami.py'), socketOf(d)] });
    // Let any user traverse the directory: what keeps the app out of the control socket must be the socket itself.
    fs.chmodSync(d.dir, 0o755);
    d.start();
    daemons.push(d);
    const who = await d.run.result<Who>();
    assert.equal((await d.run.exit()).code, 0, d.run.stderr);
    return { who, d };
  }

  const cases: Array<{ config: string; uid: number; gid: number; groups: number[] }> = [
    { config: '  user: "nobody"\n', uid: 65534, gid: 65534, groups: [65534] },
    { config: '  user: 65534\n  group: "nogroup"\n', uid: 65534, gid: 65534, groups: [65534] },
    { config: '  user: "12345"\n', uid: 12345, gid: 12345, groups: [12345] },
    { config: '  user: 12345\n  group: 23456\n', uid: 12345, gid: 23456, groups: [23456] },
  ];
  for (const c of cases) {
    it(
      `${c.config.trim().replace(/\n\s*/g, ', ')}: dropped before exec (uid ${c.uid}, gid ${c.gid}, groups ${c.groups.join(',')}), the listener still works, the control socket refuses it`,
      { skip },
      async () => {
        const { who } = await runAs(c.config);
        assert.equal(who.uid, c.uid);
        assert.equal(who.euid, c.uid);
        assert.equal(who.gid, c.gid);
        assert.equal(who.egid, c.gid);
        assert.deepEqual(who.groups, c.groups, 'no supplementary group of root is kept');
        assert.equal(who.listener_fd3, true, 'the inherited listener is usable');
        assert.match(who.control, /^errno 13 /, `the control socket (mode 0600) refuses the app: ${who.control}`);
      },
    );
  }

  it(
    'without service.user the app runs as root like Aeterna, and so may use the control socket (documented in docs/security.md)',
    { skip },
    async () => {
      const { who } = await runAs('');
      assert.equal(who.uid, 0);
      assert.match(who.control, /"type":"result"/);
    },
  );

  it('an unknown user name is a clear error (E_SPAWN_FAILED naming it) and nothing runs', { skip }, async () => {
    const d = new Daemon({
      command: ['python3', fixture('faults', 'whoami.py')],
      extraService: '  user: "no-such-user-aeterna"\n',
    }).start();
    daemons.push(d);
    const exit = await d.run.exit();
    assert.equal(exit.code, 127);
    const err = d.run.logs().find((l) => l.code === 'E_SPAWN_FAILED');
    assert.ok(err, d.run.stderr);
    assert.match(err.msg, /service\.user: unknown user "no-such-user-aeterna"/);
    assert.doesNotMatch(d.run.stdout, /RESULT/);
  });
});

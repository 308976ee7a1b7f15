// The control socket, in-process: the real server on a real Unix socket, a
// small fake ControlApi behind it, and real clients (node:net, the CLI's
// client module, and a process running as `nobody`).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { Writable } from 'node:stream';
import pino from 'pino';
import { AeternaError } from '../../src/errors';
import { native } from '../../src/native/binding';
import { startControlServer, type ControlServer, type ControlServerOptions } from '../../src/control/server';
import { call, request } from '../../src/control/client';
import { LineDecoder, parseRequest, type ServerMessage } from '../../src/control/protocol';
import { tempDir } from '../helpers/aeterna';
import type { ControlApi, ReloadEvent, ReloadOutcome, ReloadRecord, StatusReport } from '../../src/orchestrator/types';

/** The events the fake reload emits, in order (the 'outcome' event last). */
const FAKE_PHASES = ['accepted', 'spawned', 'ready', 'soaking', 'draining', 'done'] as const;
const FAKE_EVENT_COUNT = FAKE_PHASES.length + 2 /* soak, relay */ + 1; /* outcome */

class FakeApi implements ControlApi {
  readonly calls: string[] = [];
  outcome: ReloadOutcome = 'promoted';
  completed = 0;
  private running = false;
  private reloads = 0;
  private gate: Promise<void> | null = null;
  private openGate: (() => void) | null = null;
  private last: ReloadRecord | null = null;

  /** Make the next reloads pause after their first event until release(). */
  hold(): void {
    this.gate = new Promise((resolve) => (this.openGate = resolve));
  }

  release(): void {
    this.openGate?.();
    this.gate = null;
  }

  status(): StatusReport {
    this.calls.push('status');
    return {
      state: this.running ? 'Handover' : 'Running',
      service: 'fake',
      strategy: 'canary',
      generation: 1 + this.completed,
      pid: 4242,
      daemon_pid: process.pid,
      uptime_ms: 1234,
      started_at: new Date(0).toISOString(),
      listeners: [{ name: 'http', address: 'tcp://127.0.0.1:8080', fd: 3 }],
      previous: null,
      candidate: null,
      retiring: [],
      restarts: 0,
      fdstore: [],
      canary_weight: null,
      last_reload: this.last,
    };
  }

  async reload(trigger: 'control' | 'sighup', onEvent?: (event: ReloadEvent) => void): Promise<ReloadRecord> {
    if (this.running)
      throw new AeternaError('E_RELOAD_BUSY', `a reload is already in progress (reload-${this.reloads})`);
    this.running = true;
    this.calls.push('reload');
    const id = `reload-${++this.reloads}`;
    const t0 = Date.now();
    const record: ReloadRecord = {
      id,
      strategy: 'canary',
      trigger,
      started_at: new Date(t0).toISOString(),
      phases: [],
      outcome: 'in_progress',
      reason: null,
      code: null,
      duration_ms: null,
      from_generation: 1,
      to_generation: 2,
      new_pid: 5000 + this.reloads,
    };
    const tick = (): Promise<void> => new Promise((r) => setTimeout(r, 2));
    const phase = (p: (typeof FAKE_PHASES)[number], detail?: string): void => {
      const at = new Date().toISOString();
      record.phases.push({ phase: p, at });
      onEvent?.({
        type: 'phase',
        reload: id,
        phase: p,
        at,
        elapsed_ms: Date.now() - t0,
        ...(detail ? { detail } : {}),
      });
    };
    try {
      phase('accepted', `trigger ${trigger}`);
      if (this.gate) await this.gate;
      await tick();
      phase('spawned', `generation 2 (pid ${record.new_pid})`);
      onEvent?.({ type: 'relay', reload: id, bytes: 1024, total: 2048, rate_bps: 4096 });
      await tick();
      phase('ready');
      phase('soaking', '60s');
      onEvent?.({ type: 'soak', reload: id, elapsed_ms: 30000, soak_ms: 60000, total_ms: Date.now() - t0 });
      await tick();
      phase('draining');
      phase('done', this.outcome);
      record.outcome = this.outcome;
      if (this.outcome !== 'promoted') {
        record.reason = 'exited with code 3 during soak';
        record.code = 'E_CHILD_EXITED';
      }
      record.duration_ms = Date.now() - t0;
      onEvent?.({ type: 'outcome', reload: id, record });
      this.last = record;
      return record;
    } finally {
      this.running = false;
      this.completed++;
    }
  }

  promote(): void {
    this.calls.push('promote');
    throw new AeternaError('E_ILLEGAL_TRANSITION', 'promote is not valid in state Running: no canary is soaking');
  }

  rollback(): void {
    this.calls.push('rollback');
  }

  stop(reason: string): void {
    this.calls.push(`stop: ${reason}`);
  }
}

/** A pino logger whose lines land in an array. */
function memoryLogger(): { log: pino.Logger; lines: Array<{ level: number; msg: string; code?: string }> } {
  const lines: Array<{ level: number; msg: string; code?: string }> = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const l of chunk.toString().split('\n'))
        if (l) lines.push(JSON.parse(l) as { level: number; msg: string; code?: string });
      done();
    },
  });
  return { log: pino({ level: 'debug' }, sink), lines };
}

/** Write raw bytes, collect every reply line until the server closes the connection. */
function rawExchange(
  socketPath: string,
  data: Buffer | string | null,
): Promise<{ messages: ServerMessage[]; closed: boolean }> {
  return new Promise((resolve) => {
    const socket = net.createConnection({ path: socketPath });
    const decoder = new LineDecoder(1 << 20);
    const messages: ServerMessage[] = [];
    socket.on('connect', () => {
      if (data !== null) socket.write(data);
    });
    socket.on('data', (chunk: Buffer) => {
      for (const line of decoder.push(chunk)) messages.push(JSON.parse(line.toString()) as ServerMessage);
    });
    // EPIPE/ECONNRESET while we still write garbage after the server gave up is expected.
    socket.on('error', () => undefined);
    socket.on('close', () => resolve({ messages, closed: true }));
  });
}

async function collect(socketPath: string, req: Parameters<typeof request>[1]): Promise<ServerMessage[]> {
  const out: ServerMessage[] = [];
  for await (const m of request(socketPath, req)) out.push(m);
  return out;
}

function codeOf(err: unknown): string | undefined {
  return (err as { code?: string }).code;
}

describe('control socket', { timeout: 60000 }, () => {
  let dir: string;
  let socketPath: string;
  let api: FakeApi;
  let server: ControlServer;
  let logs: ReturnType<typeof memoryLogger>;

  async function start(options: ControlServerOptions = {}, at = socketPath, fake = api): Promise<ControlServer> {
    return startControlServer(at, fake, logs.log, options);
  }

  before(async () => {
    dir = tempDir('aeterna-control-');
    socketPath = path.join(dir, 'run', 'control.sock'); // run/ does not exist yet: the server creates it
    api = new FakeApi();
    logs = memoryLogger();
    server = await start({ requestTimeoutMs: 300 });
  });

  after(async () => {
    await server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('creates the socket with mode 0600 in a directory it creates', () => {
    const stat = fs.statSync(socketPath);
    assert.ok(stat.isSocket());
    assert.equal(stat.mode & 0o777, 0o600);
    assert.ok(fs.statSync(path.dirname(socketPath)).isDirectory());
  });

  it('answers status', async () => {
    const messages = await collect(socketPath, { cmd: 'status' });
    assert.equal(messages.length, 1);
    const [m] = messages;
    assert.ok(m.type === 'result' && 'status' in m);
    assert.equal(m.status.state, 'Running');
    assert.equal(m.status.pid, 4242);
    assert.ok(
      logs.lines.some((l) => l.level === 20 && l.msg === 'control request'),
      'each request is logged at debug',
    );
  });

  it('streams a reload: every event, the outcome event last, then the record', async () => {
    const messages = await collect(socketPath, { cmd: 'reload', wait: true });
    const events = messages.filter((m) => m.type === 'event');
    assert.equal(events.length, FAKE_EVENT_COUNT);
    assert.equal(messages.length, FAKE_EVENT_COUNT + 1);
    assert.deepEqual(
      events.flatMap((m) => (m.type === 'event' && m.event.type === 'phase' ? [m.event.phase] : [])),
      [...FAKE_PHASES],
    );
    const lastEvent = events[events.length - 1];
    assert.ok(lastEvent.type === 'event' && lastEvent.event.type === 'outcome');
    const result = messages[messages.length - 1];
    assert.ok(result.type === 'result' && 'record' in result);
    assert.equal(result.record.outcome, 'promoted');
    assert.equal(result.record.trigger, 'control');
  });

  it('with wait:false answers after the accepted event and the reload goes on', async () => {
    const before = api.completed;
    const messages = await collect(socketPath, { cmd: 'reload', wait: false });
    assert.equal(messages.length, 2);
    const [event, result] = messages;
    assert.ok(event.type === 'event' && event.event.type === 'phase' && event.event.phase === 'accepted');
    assert.ok(result.type === 'result' && 'accepted' in result);
    assert.equal(result.accepted, event.event.reload);
    while (api.completed === before) await new Promise((r) => setTimeout(r, 10));
    assert.equal(api.completed, before + 1);
  });

  it('refuses a second reload with E_RELOAD_BUSY while one runs', async () => {
    api.hold();
    const first = request(socketPath, { cmd: 'reload', wait: true });
    const accepted = await first.next();
    assert.ok(!accepted.done && accepted.value.type === 'event');
    await assert.rejects(call(socketPath, { cmd: 'reload', wait: true }), (err) => codeOf(err) === 'E_RELOAD_BUSY');
    assert.ok(
      logs.lines.some((l) => l.level === 40 && l.code === 'E_RELOAD_BUSY'),
      'the refusal is logged at warn',
    );
    api.release();
    const rest: ServerMessage[] = [];
    for await (const m of first) rest.push(m);
    const result = rest[rest.length - 1];
    assert.ok(result.type === 'result' && 'record' in result && result.record.outcome === 'promoted');
  });

  it('a client that disconnects mid-reload does not affect the reload', async () => {
    const before = api.completed;
    api.hold();
    const stream = request(socketPath, { cmd: 'reload', wait: true });
    const accepted = await stream.next();
    assert.ok(!accepted.done && accepted.value.type === 'event');
    await stream.return(undefined); // destroys the connection
    api.release();
    while (api.completed === before) await new Promise((r) => setTimeout(r, 10));
    const status = await call(socketPath, { cmd: 'status' });
    assert.ok('status' in status);
    assert.equal(status.status.last_reload?.outcome, 'promoted');
  });

  it('passes promote/rollback/stop to the api, and an api refusal back as an error', async () => {
    await assert.rejects(call(socketPath, { cmd: 'promote' }), (err) => codeOf(err) === 'E_ILLEGAL_TRANSITION');
    assert.deepEqual(await call(socketPath, { cmd: 'rollback' }), { type: 'result', ok: true });
    assert.deepEqual(await call(socketPath, { cmd: 'stop' }), { type: 'result', ok: true });
    assert.ok(api.calls.includes('promote'));
    assert.ok(api.calls.includes('rollback'));
    assert.ok(api.calls.some((c) => c.startsWith('stop: aeterna stop')));
  });

  const garbage: Array<[string, Buffer | string, RegExp]> = [
    ['invalid JSON', '{"cmd": status}\n', /invalid JSON/],
    ['a 100 KiB line without a newline', Buffer.alloc(100 * 1024, 'a'), /longer than 65536 bytes/],
    ['an unknown cmd', '{"cmd":"format-disk"}\n', /unknown command "format-disk"/],
    ['binary bytes', Buffer.from([0xff, 0xfe, 0x00, 0x80, 0xc3, 0x0a]), /not valid UTF-8 \(byte 0xff at offset 0\)/],
    ['a non-object', '[1,2,3]\n', /expected a JSON object, got an array/],
    ['a missing cmd', '{"wait":true}\n', /missing field "cmd"/],
    ['a wrong field type', '{"cmd":"reload","wait":"yes"}\n', /request\.wait: expected a boolean/],
    ['an unknown field', '{"cmd":"status","all":true}\n', /request\.all: unknown field/],
  ];
  for (const [what, bytes, message] of garbage) {
    it(`answers ${what} with E_CONTROL_BAD_REQUEST, closes, and keeps serving`, async () => {
      const { messages, closed } = await rawExchange(socketPath, bytes);
      assert.equal(messages.length, 1);
      const [m] = messages;
      assert.ok(m.type === 'error');
      assert.equal(m.code, 'E_CONTROL_BAD_REQUEST');
      assert.match(m.message, message);
      assert.ok(closed);
      const status = await call(socketPath, { cmd: 'status' });
      assert.equal(status.type, 'result');
    });
  }

  it('takes a last request line without a newline when the client half-closes', async () => {
    const result = await new Promise<ServerMessage[]>((resolve, reject) => {
      const socket = net.createConnection({ path: socketPath }, () => socket.end('{"cmd":"status"}'));
      const decoder = new LineDecoder(1 << 20);
      const out: ServerMessage[] = [];
      socket.on('data', (c: Buffer) =>
        decoder.push(c).forEach((l) => out.push(JSON.parse(l.toString()) as ServerMessage)),
      );
      socket.on('close', () => resolve(out));
      socket.on('error', reject);
    });
    assert.equal(result.length, 1);
    assert.ok(result[0].type === 'result' && 'status' in result[0]);
  });

  it('closes a client that sends nothing within the request timeout', async () => {
    const { messages, closed } = await rawExchange(socketPath, null);
    assert.ok(closed);
    assert.equal(messages.length, 1);
    assert.ok(messages[0].type === 'error' && messages[0].code === 'E_CONTROL_BAD_REQUEST');
    assert.match(messages[0].message, /no complete request line within 300 ms/);
  });

  it('close() ends open connections, removes the socket file, and the client sees the daemon gone', async () => {
    const at = path.join(dir, 'closing.sock');
    const fake = new FakeApi();
    const closing = await start({}, at, fake);
    fake.hold();
    const stream = request(at, { cmd: 'reload', wait: true });
    const accepted = await stream.next();
    assert.ok(!accepted.done && accepted.value.type === 'event');
    await closing.close();
    assert.equal(fs.existsSync(at), false);
    await assert.rejects(stream.next(), (err) => codeOf(err) === 'E_CONTROL_UNAVAILABLE');
    await assert.rejects(call(at, { cmd: 'status' }), (err) => codeOf(err) === 'E_CONTROL_UNAVAILABLE');
    fake.release();
  });

  it('when full, a new connection evicts the oldest one that sent no request, and is served', async () => {
    const at = path.join(dir, 'limited.sock');
    const limited = await start({ maxConnections: 2, requestTimeoutMs: 60_000 }, at, new FakeApi());
    const idle = [rawExchange(at, null), rawExchange(at, null)];
    const status = await call(at, { cmd: 'status' });
    assert.ok('status' in status);
    // The first idle connection was evicted with an error; the second is still held.
    const first = await idle[0];
    assert.equal(first.messages.length, 1);
    assert.ok(first.messages[0].type === 'error' && first.messages[0].code === 'E_CONTROL_UNAVAILABLE');
    await limited.close();
    assert.equal((await idle[1]).messages.length, 0);
  });

  it('when every connection is busy with a request, a new one is refused with E_CONTROL_UNAVAILABLE', async () => {
    const at = path.join(dir, 'busy.sock');
    const fake = new FakeApi();
    const limited = await start({ maxConnections: 1 }, at, fake);
    fake.hold();
    const reload = request(at, { cmd: 'reload', wait: true });
    const accepted = await reload.next();
    assert.ok(!accepted.done && accepted.value.type === 'event');
    const { messages } = await rawExchange(at, null);
    assert.equal(messages.length, 1);
    assert.ok(messages[0].type === 'error' && messages[0].code === 'E_CONTROL_UNAVAILABLE');
    assert.match(messages[0].message, /each busy with a request/);
    fake.release();
    for await (const m of reload) if (m.type !== 'event') break;
    await limited.close();
  });

  it('replaces a stale socket file left by a crashed daemon', async () => {
    const at = path.join(dir, 'stale.sock');
    native.close(native.listenUnix(at, 1, 0o600)); // bound, then closed without unlink: nobody answers
    assert.ok(fs.statSync(at).isSocket());
    const fresh = await start({}, at, new FakeApi());
    const status = await call(at, { cmd: 'status' });
    assert.equal(status.type, 'result');
    await fresh.close();
    assert.equal(fs.existsSync(at), false, 'close() removes the socket file');
  });

  it('refuses to start when a daemon answers on the path, and leaves that daemon alone', async () => {
    await assert.rejects(start({}, socketPath, new FakeApi()), (err) => {
      assert.equal(codeOf(err), 'E_DAEMON_RUNNING');
      assert.ok((err as Error).message.includes(socketPath));
      return true;
    });
    const status = await call(socketPath, { cmd: 'status' });
    assert.equal(status.type, 'result');
  });

  it('refuses a path that is not a socket and leaves the file alone', async () => {
    const at = path.join(dir, 'not-a-socket');
    fs.writeFileSync(at, 'precious');
    await assert.rejects(start({}, at, new FakeApi()), /exists and is not a socket/);
    assert.equal(fs.readFileSync(at, 'utf8'), 'precious');
  });

  it('client: no daemon -> E_CONTROL_UNAVAILABLE naming the path', async () => {
    const at = path.join(dir, 'nobody-here.sock');
    await assert.rejects(call(at, { cmd: 'status' }), (err) => {
      assert.equal(codeOf(err), 'E_CONTROL_UNAVAILABLE');
      assert.match((err as Error).message, new RegExp(`no daemon answers on ${at} \\(ENOENT\\)`));
      return true;
    });
  });

  const asNobody = process.getuid?.() === 0 ? null : 'needs root to run a client as nobody';
  it('refuses a peer with another uid (nobody) by its credentials', { skip: asNobody ?? false }, async () => {
    // Let the kernel admit nobody (directory traversable, socket writable): the
    // refusal under test is the peer-credential check, not the file mode.
    fs.chmodSync(dir, 0o755);
    fs.chmodSync(path.dirname(socketPath), 0o755);
    fs.chmodSync(socketPath, 0o666);
    const script = `
      const s = require('node:net').createConnection({ path: process.argv[1] }, () => s.write('{"cmd":"status"}\\n'));
      let out = ''; s.setEncoding('utf8').on('data', (d) => (out += d));
      s.on('close', () => { process.stdout.write(out); process.exit(0); });
      s.on('error', (e) => { console.error(e.message); process.exit(2); });`;
    try {
      const child = spawn(
        'setpriv',
        ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, '-e', script, socketPath],
        {
          stdio: ['ignore', 'pipe', 'pipe'],
          cwd: '/',
        },
      );
      let stdout = '';
      let stderr = '';
      child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
      child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
      const code = await new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
      assert.equal(code, 0, stderr);
      const lines = stdout
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l) as ServerMessage);
      assert.equal(lines.length, 1);
      assert.ok(lines[0].type === 'error');
      assert.equal(lines[0].code, 'E_CONTROL_FORBIDDEN');
      assert.match(lines[0].message, /uid 65534 is not allowed/);
      assert.ok(
        logs.lines.some((l) => l.level === 40 && l.code === 'E_CONTROL_FORBIDDEN'),
        'the refusal is logged at warn',
      );
    } finally {
      fs.chmodSync(socketPath, 0o600);
    }
  });
});

describe('control protocol', () => {
  it('accepts the documented requests', () => {
    assert.deepEqual(parseRequest(Buffer.from('{"cmd":"status"}')), { cmd: 'status' });
    assert.deepEqual(parseRequest(Buffer.from('{"cmd":"reload"}')), { cmd: 'reload', wait: true });
    assert.deepEqual(parseRequest(Buffer.from('{"cmd":"reload","wait":false}\r')), { cmd: 'reload', wait: false });
  });

  it('refuses an over-long line while buffering, before growing the buffer', () => {
    const decoder = new LineDecoder(10);
    assert.deepEqual(decoder.push(Buffer.from('12345')), []);
    assert.throws(() => decoder.push(Buffer.from('678901')), /longer than 10 bytes/);
    const ok = new LineDecoder(10);
    assert.deepEqual(ok.push(Buffer.from('12345')).length, 0);
    assert.deepEqual(ok.push(Buffer.from('67890\nab')).map(String), ['1234567890']);
    assert.equal(String(ok.flush()), 'ab');
  });
});

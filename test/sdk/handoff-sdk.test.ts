// Connection handoff (docs/srp.md, "Connection handoff") end to end with the Python and the Go SDK: a real
// Aeterna as PID 1, fixture apps that stream Server-Sent Events (test/fixtures/python/sse_handoff_app.py,
// test/fixtures/go/sse-handoff) or echo lines on a raw TCP listener (test/fixtures/python/line_echo_app.py,
// test/fixtures/go/line-echo), and reloads in the middle of the streams. Real sockets, real signals; the
// clients are plain node:http and node:net clients that count what they receive.
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { ROOT, descendantsOf, fixture, pidNamespaceUnavailable, tempDir } from '../helpers/aeterna';
import { Daemon } from '../helpers/daemon';
import { openSse, type StreamSeen } from '../helpers/sse';
import { fdCountAtRest, settle } from '../../bench/soak';

const PYTHON = 'python3';

function pythonUnavailable(): string | null {
  const r = spawnSync(PYTHON, ['-c', 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 3)']);
  if (r.error) return `python3 is not available (${r.error.message})`;
  return r.status === 0 ? null : 'python3 is older than 3.9';
}

function goUnavailable(): string | null {
  const r = spawnSync('go', ['version'], { encoding: 'utf8' });
  if (r.error) return `go is not available (${r.error.message}); install golang-go (Go 1.19+) to run this test`;
  return null;
}

const noPid1 = pidNamespaceUnavailable();

const daemons: Daemon[] = [];
const dirs: string[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
  for (const dir of dirs) fs.rmSync(dir, { recursive: true, force: true });
});

/** The fixture's stream of `events` events. */
const openStream = (port: number, events: number): StreamSeen => openSse(port, `/stream?events=${events}`);

const range = (n: number): number[] => Array.from({ length: n }, (_, i) => i);

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** A daemon (PID 1) running `command` with the state relay on and a long stop_timeout. */
async function started(command: string[]): Promise<{ d: Daemon; port: number }> {
  const d = await Daemon.withHandoff(command);
  daemons.push(d);
  await d.waitStatus((s) => s.state === 'Running', 60000);
  return { d, port: d.options.port! };
}

/** Wait until every stream has received at least `n` events. */
async function eachHas(streams: StreamSeen[], n: number): Promise<void> {
  const ok = await settle(
    () => streams.every((s) => s.indices.length >= n),
    (v) => v,
    60000,
  );
  assert.ok(ok, `every stream reached ${n} events`);
}

/**
 * `count` streams across `reloads` reloads: every index once and in order on one TCP connection, generation 1,
 * then 2, ...; each old generation gone before any stream ends (stop_timeout is 120 s); Aeterna's fds as before.
 * With two reloads, connections adopted by generation 2 move again to generation 3.
 */
async function streamsSurviveReloads(command: string[], count: number, reloads: number): Promise<void> {
  const { d, port } = await started(command);
  const aeterna = await d.run.aeternaPid();
  const fdsBefore = await fdCountAtRest(aeterna);
  const events = 50 + 100 * reloads;
  const streams = range(count).map(() => openStream(port, events));
  await eachHas(streams, 5);
  const generations = ['1'];
  for (let reload = 1; reload <= reloads; reload++) {
    const [oldApp] = descendantsOf(aeterna); // the generation serving, as this test's PID namespace sees it
    const r = await d.cli('reload');
    assert.equal(r.code, 0, r.stderr);
    generations.push(String(reload + 1));
    // The old generation leaves while the streams go on (stop_timeout is 120 s: it does not wait for them).
    const oldExited = await settle(
      () => !processAlive(oldApp),
      (v) => v,
      60000,
    );
    assert.ok(oldExited, `generation ${reload} exited`);
    assert.equal(streams.filter((s) => s.over).length, 0, `generation ${reload} exited before any stream ended`);
    const served = await settle(
      () => streams.every((s) => s.generations.includes(String(reload + 1))),
      (v) => v,
      60000,
    );
    assert.ok(served, `generation ${reload + 1} serves every stream`);
  }
  const ends = await Promise.all(streams.map((s) => s.ended));
  assert.equal(descendantsOf(aeterna).length, 1, `only generation ${reloads + 1} runs`);
  for (const [i, s] of streams.entries()) {
    assert.equal(ends[i], 'complete', `stream ${i} ended cleanly`);
    assert.deepEqual(s.indices, range(events), `stream ${i}: every index once, in order`);
    assert.equal(s.ports.size, 1, `stream ${i}: one connection`);
    assert.deepEqual([...new Set(s.generations)], generations, `stream ${i}: generations ${generations.join(', ')}`);
  }
  // Not anchored at a line start: the app's line is one small write, but Aeterna's own output on the same stdout
  // may be written around it.
  assert.deepEqual(
    [...d.run.stdout.matchAll(/HANDED (\d+)\n/g)].map((m) => Number(m[1])),
    generations.slice(1).map(() => count),
    'each old generation handed every stream over',
  );
  assert.equal(
    [...d.run.stdout.matchAll(/SHUTDOWN \d+ handed_over=(True|true)\n/g)].length,
    reloads,
    'each final dump was answered and acked',
  );
  const s = await d.status();
  assert.equal(s.generation, reloads + 1);
  assert.equal(s.last_reload?.outcome, 'promoted');
  assert.equal(await fdCountAtRest(aeterna), fdsBefore, "Aeterna's fds: as many as before the streams moved");
}

/** A reload whose new generation exits at once: nothing is handed over, the streams finish on generation 1. */
async function streamsFinishOnARolledBackOldGeneration(command: string[]): Promise<void> {
  const { d, port } = await started(command);
  const events = 40;
  const streams = range(10).map(() => openStream(port, events));
  await eachHas(streams, 5);
  d.write({ ...d.options, command: [process.execPath, '-e', 'process.exit(3)'] });
  const r = await d.cli('reload');
  assert.notEqual(r.code, 0, 'the reload failed');
  assert.equal((await d.status()).last_reload?.outcome, 'rolled_back');
  for (const [i, s] of streams.entries()) {
    assert.equal(await s.ended, 'complete', `stream ${i} ended cleanly`);
    assert.deepEqual(s.indices, range(events), `stream ${i}: every index once, in order`);
    assert.deepEqual(new Set(s.generations), new Set(['1']), `stream ${i}: generation 1 only`);
  }
  assert.doesNotMatch(d.run.stdout, /HANDED \d+\n/, 'nothing was handed over');
  const s = await d.status();
  assert.equal(s.generation, 1);
  assert.equal(s.state, 'Running');
}

const PYTHON_APP = [PYTHON, fixture('python', 'sse_handoff_app.py')];

describe(
  'connection handoff with the Python SDK (sse_handoff_app.py)',
  { skip: noPid1 ?? pythonUnavailable() ?? false, timeout: 300000 },
  () => {
    it('a reload in the middle of 20 SSE streams (PID 1): every event once, in order, on one connection; the old generation leaves before them; Aeterna holds none of the connections', async () => {
      await streamsSurviveReloads(PYTHON_APP, 20, 1);
    });

    it('10 SSE streams across two reloads (PID 1): the connections generation 2 adopted move again to generation 3, every event once, in order, on one connection', async () => {
      await streamsSurviveReloads(PYTHON_APP, 10, 2);
    });

    it('a reload that rolls back hands nothing over: the streams finish on the old generation, none cut', async () => {
      await streamsFinishOnARolledBackOldGeneration(PYTHON_APP);
    });
  },
);

/** What one line-echo client sent and saw back. */
interface EchoSeen {
  /** The lines it sent, in order. */
  sent: string[];
  /** The lines echoed back, without their generation. */
  echoed: string[];
  generations: string[];
  /** 'complete': the server closed after echoing (end of file, no error); 'cut': an error ended it. */
  ended: Promise<'complete' | 'cut'>;
}

/**
 * A line-echo client that writes while its connection moves: every write is the end of one line and the start of
 * the next, so the server always holds a partial line when it stops reading. It writes a line every few ms until
 * it has seen an echo from generation `until`, then `more` lines, and ends.
 */
function echoClient(port: number, until: string, more = 50): EchoSeen {
  const seen: EchoSeen = { sent: [], echoed: [], generations: [], ended: Promise.resolve('cut') };
  seen.ended = new Promise((resolve) => {
    const socket = net.connect({ port, host: '127.0.0.1' });
    socket.setNoDelay(true);
    const line = (i: number): string => `${i}:${'abcdefghijklmnopqrstuvwxyz'.slice(i % 26)}`;
    let pending = ''; // the end of the line whose start went out last
    let stopAt = Number.MAX_SAFE_INTEGER;
    const write = (): void => {
      const i = seen.sent.length;
      // A guard against a hang: a move that never happens ends the client (and the assertions say why).
      if (i >= Math.min(stopAt, 20000)) return void socket.end(pending + '\n');
      const text = line(i);
      seen.sent.push(text);
      socket.write((i === 0 ? '' : pending + '\n') + text.slice(0, 2));
      pending = text.slice(2);
      setTimeout(write, 3);
    };
    socket.on('connect', write);
    let buffered = '';
    socket.setEncoding('utf8');
    socket.on('data', (text: string) => {
      buffered += text;
      for (let end; (end = buffered.indexOf('\n')) >= 0;) {
        const [generation, echoed] = buffered.slice(0, end).split(' ');
        buffered = buffered.slice(end + 1);
        seen.generations.push(generation);
        seen.echoed.push(echoed);
        if (generation === until && stopAt === Number.MAX_SAFE_INTEGER) stopAt = seen.sent.length + more;
      }
    });
    socket.on('end', () => resolve('complete'));
    socket.on('error', () => resolve('cut'));
  });
  return seen;
}

/**
 * 10 line-echo clients writing continuously across a reload: no byte lost, every line echoed once and in order, by
 * generation 1 then 2; the partial lines went along as unread bytes.
 */
async function clientsWritingWhileTheirConnectionsMove(command: string[]): Promise<void> {
  const { d, port } = await started(command);
  const clients = range(10).map(() => echoClient(port, '2'));
  const ok = await settle(
    () => clients.every((c) => c.echoed.length >= 20),
    (v) => v,
    60000,
  );
  assert.ok(ok, 'every client got 20 echoes from generation 1');
  const r = await d.cli('reload');
  assert.equal(r.code, 0, r.stderr);
  for (const [i, c] of clients.entries()) {
    assert.equal(await c.ended, 'complete', `client ${i}: the server closed after its last line`);
    assert.deepEqual(c.echoed, c.sent, `client ${i}: every line echoed once, in order (${c.sent.length} lines)`);
    assert.deepEqual([...new Set(c.generations)], ['1', '2'], `client ${i}: generation 1, then 2`);
  }
  assert.match(d.run.stdout, /HANDED 10\n/);
  // Every write ended in the middle of a line: what generation 1 had read of the next line went along.
  const unread = [...d.run.stdout.matchAll(/^UNREAD \S+ (\d+)$/gm)].map((m) => Number(m[1]));
  assert.equal(unread.length, 10);
  assert.ok(
    unread.some((n) => n > 0),
    `some connection carried unread bytes: ${unread.join(' ')}`,
  );
  assert.match(d.run.stdout, /SHUTDOWN \d+ handed_over=(True|true)\n/, 'the final dump was answered and acked');
}

/**
 * A client in the middle of a 3 MiB line when its connection moves: the old generation holds at least 1 MiB of it
 * (it says so: PARTIAL) and sends that as unread bytes, more than one data frame's worth, on a socket pair whose
 * buffer it fills; the new generation echoes the whole line, byte for byte.
 */
async function aLongPartialLineMoves(command: string[]): Promise<void> {
  const { d, port } = await started(command);
  const socket = net.connect({ port, host: '127.0.0.1' });
  let received = '';
  socket.setEncoding('utf8');
  socket.on('data', (text: string) => (received += text));
  const ended = new Promise<'complete' | 'cut'>((resolve) => {
    socket.on('end', () => resolve('complete'));
    socket.on('error', () => resolve('cut'));
  });
  socket.write('first\n');
  assert.ok(
    (await settle(
      () => received,
      (r) => r === '1 first\n',
      60000,
    )) === '1 first\n',
    'generation 1 echoes',
  );
  const long = 'y'.repeat(3 * 1024 * 1024);
  socket.write(long);
  const [, id, partial] = await d.run.waitFor(/^PARTIAL (\S+) (\d+)$/m, 60000);
  const r = await d.cli('reload');
  assert.equal(r.code, 0, r.stderr);
  socket.end('\nlast\n');
  assert.equal(await ended, 'complete', 'the server closed after the last line');
  assert.ok(received === `1 first\n2 ${long}\n2 last\n`, 'the long line came back whole, echoed by generation 2');
  const unread = Number(new RegExp(`^UNREAD ${id} (\\d+)$`, 'm').exec(d.run.stdout)?.[1]);
  assert.ok(unread >= Number(partial), `the ${partial} bytes read of the line went as unread bytes (${unread})`);
}

describe(
  'connection handoff with the Python SDK: clients writing while their connections move (line_echo_app.py)',
  { skip: noPid1 ?? pythonUnavailable() ?? false, timeout: 300000 },
  () => {
    it('10 line-echo clients write continuously across a reload (PID 1): no byte lost, every line echoed once, in order, by generation 1 then 2; the partial lines went along as unread bytes', async () => {
      await clientsWritingWhileTheirConnectionsMove([PYTHON, fixture('python', 'line_echo_app.py')]);
    });

    it('a client in the middle of a 3 MiB line when its connection moves (PID 1): the part read goes as unread bytes (1 MiB or more, in data frames of up to 1 MiB), the line comes back whole', async () => {
      await aLongPartialLineMoves([PYTHON, fixture('python', 'line_echo_app.py')]);
    });
  },
);

/** Builds test/fixtures/go/<name> into a temp dir; returns the binary. */
function buildGoFixture(name: string): string {
  const dir = tempDir('aeterna-go-handoff-');
  dirs.push(dir);
  const bin = path.join(dir, name);
  const r = spawnSync('go', ['build', '-o', bin, '.'], {
    cwd: path.join(ROOT, 'test', 'fixtures', 'go', name),
    encoding: 'utf8',
  });
  assert.equal(r.status, 0, `go build of test/fixtures/go/${name} failed:\n${r.stdout}${r.stderr}`);
  return bin;
}

describe(
  'connection handoff with the Go SDK (test/fixtures/go/sse-handoff, test/fixtures/go/line-echo)',
  { skip: noPid1 ?? goUnavailable() ?? false, timeout: 300000 },
  () => {
    it('go vet and gofmt are clean in the Go fixtures', () => {
      for (const name of ['sse-handoff', 'line-echo']) {
        const cwd = path.join(ROOT, 'test', 'fixtures', 'go', name);
        const vet = spawnSync('go', ['vet', '.'], { cwd, encoding: 'utf8' });
        assert.equal(vet.status, 0, `go vet in test/fixtures/go/${name}:\n${vet.stdout}${vet.stderr}`);
        const fmt = spawnSync('gofmt', ['-l', '.'], { cwd, encoding: 'utf8' });
        assert.equal(fmt.stdout, '', `gofmt would change files in test/fixtures/go/${name}`);
      }
    });

    it('a reload in the middle of 20 SSE streams (PID 1): every event once, in order, on one connection; the old generation leaves before them; Aeterna holds none of the connections', async () => {
      await streamsSurviveReloads([buildGoFixture('sse-handoff')], 20, 1);
    });

    it('10 SSE streams across two reloads (PID 1): the connections generation 2 adopted move again to generation 3, every event once, in order, on one connection', async () => {
      await streamsSurviveReloads([buildGoFixture('sse-handoff')], 10, 2);
    });

    it('a reload that rolls back hands nothing over: the streams finish on the old generation, none cut', async () => {
      await streamsFinishOnARolledBackOldGeneration([buildGoFixture('sse-handoff')]);
    });

    it('10 line-echo clients write continuously across a reload (PID 1, test/fixtures/go/line-echo: a raw net.Listener): no byte lost, every line echoed once, in order, by generation 1 then 2; the partial lines went along as unread bytes', async () => {
      await clientsWritingWhileTheirConnectionsMove([buildGoFixture('line-echo')]);
    });

    it('a client in the middle of a 3 MiB line when its connection moves (PID 1, line-echo): the part read goes as unread bytes (1 MiB or more, in data frames of up to 1 MiB), the line comes back whole', async () => {
      await aLongPartialLineMoves([buildGoFixture('line-echo')]);
    });
  },
);

// WebSocket sessions (the `ws` package) that a reload does not cut (docs/srp.md, "Connection handoff"): the fixture
// hands every session to the next generation between two messages with handOverWebSocket, and the next one goes on
// with resumeWebSocket on the same TCP connection. Real daemons (PID 1), real sockets, real signals; the clients
// are ws clients that keep sending while their connections move, some of them a message in two fragments, some a
// frame in two writes, so that the old generation holds part of a message or of a frame when it lets go.
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import type net from 'node:net';
import path from 'node:path';
import WebSocket from 'ws';
import { ROOT, descendantsOf, freePort, pidNamespaceUnavailable } from '../../helpers/aeterna';
import { Daemon } from '../../helpers/daemon';
import { settle } from '../../../bench/soak';

const APP = [process.execPath, path.join(ROOT, 'test', 'fixtures', 'apps', 'ws_app.js')];
const skip = pidNamespaceUnavailable();
/** Between two messages of a client. */
const EVERY_MS = 50;
/** Between the two parts of a message sent in two (a fragment, a frame cut in two). */
const PART_MS = 20;

/** How a client sends: whole messages; each in two fragments; each as one frame written in two parts. */
type Kind = 'whole' | 'fragments' | 'split';

interface Reply {
  seq: number;
  n: number;
  generation: string;
  pid: number;
}

/** One client session: what it sent, what came back, whether it saw its connection close. */
class Client {
  readonly ws: WebSocket;
  readonly replies: Reply[] = [];
  readonly errors: string[] = [];
  closed: { code: number; reason: string } | null = null;
  sent = 0;
  private sending = false;
  /** Where this client cuts its frames, in turn (split clients): shifted by its start offset. */
  private shift = 0;
  private timer: NodeJS.Timeout | null = null;
  readonly opened: Promise<void>;

  constructor(
    port: number,
    readonly name: string,
    readonly kind: Kind,
    where = '/chat',
  ) {
    this.ws = new WebSocket(`ws://127.0.0.1:${port}${where}?session=${name}`);
    this.opened = new Promise((resolve, reject) => {
      this.ws.once('open', () => resolve());
      this.ws.once('error', reject);
    });
    this.ws.on('message', (data: Buffer) => this.replies.push(JSON.parse(data.toString()) as Reply));
    this.ws.on('close', (code, reason) => (this.closed = { code, reason: reason.toString() }));
    this.ws.on('error', (err) => this.errors.push(err.message));
  }

  /**
   * Send a message every EVERY_MS until stop(), without waiting for the replies; the first after `offsetMs`, so
   * that the clients are at different points of their messages when the reload comes.
   */
  start(offsetMs = 0): void {
    this.sending = true;
    this.shift = offsetMs;
    this.timer = setTimeout(() => this.next(), offsetMs);
  }

  /** Stop sending; resolves once the message under way, if any, is whole on the wire. */
  async stop(): Promise<void> {
    this.sending = false;
    await settle(
      () => this.timer,
      (t) => t === null,
      60000,
      10,
    );
  }

  get fromGeneration2(): number {
    return this.replies.filter((r) => r.generation === '2').length;
  }

  private next(): void {
    this.timer = null;
    if (!this.sending || this.closed) return;
    const seq = this.sent++;
    // A few hundred bytes: a 16-bit length in the frame header, so a cut can fall inside it.
    const text = JSON.stringify({ seq, text: `${this.name} says ${'la '.repeat(60 + (seq % 40))}` });
    if (this.kind === 'whole') {
      this.ws.send(text);
      this.timer = setTimeout(() => this.next(), EVERY_MS);
      return;
    }
    if (this.kind === 'fragments') {
      const half = Math.floor(text.length / 2);
      this.ws.send(text.slice(0, half), { fin: false });
      this.afterPart(() => this.ws.send(text.slice(half), { fin: true }));
    } else {
      const [first, second] = splitFrame(text, seq + this.shift);
      this.socket().write(first);
      this.afterPart(() => this.socket().write(second));
    }
  }

  /** The second part of a message PART_MS later, then the next message. */
  private afterPart(secondPart: () => void): void {
    this.timer = setTimeout(() => {
      secondPart();
      this.timer = setTimeout(() => this.next(), EVERY_MS - PART_MS);
    }, PART_MS);
  }

  /** The client's TCP connection: a frame cut in two is written there directly (ws's Sender writes it whole). */
  private socket(): net.Socket {
    return (this.ws as unknown as { _socket: net.Socket })._socket;
  }
}

/**
 * A text message as one masked frame (as a client sends it), cut in two: inside its first two bytes, its 16-bit
 * length, its mask, or its payload, in turn.
 */
function splitFrame(text: string, seq: number): [Buffer, Buffer] {
  const payload = Buffer.from(text);
  assert.ok(payload.length >= 126 && payload.length < 65536);
  const mask = crypto.randomBytes(4);
  const header = Buffer.from([0x81, 0x80 | 126, payload.length >> 8, payload.length & 0xff, ...mask]);
  const masked = Buffer.from(payload.map((b, i) => b ^ mask[i % 4]));
  const frame = Buffer.concat([header, masked]);
  const cut = [1, 3, 6, 8 + (seq % 100)][seq % 4];
  return [frame.subarray(0, cut), frame.subarray(cut)];
}

const range = (n: number): number[] => Array.from({ length: n }, (_, i) => i);

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

describe('WebSocket handoff: ws sessions that a reload does not cut', { skip: skip ?? false, timeout: 300000 }, () => {
  const daemons: Daemon[] = [];
  const clients: Client[] = [];
  after(async () => {
    for (const c of clients) c.ws.terminate();
    for (const d of daemons) await d.run.killAll();
  });

  async function started(): Promise<{ d: Daemon; port: number }> {
    const port = await freePort();
    const d = new Daemon({
      command: APP,
      port,
      readiness: '{ mode: "notify", timeout: "60s" }',
      // Long: an old generation that waited for its sessions would still be alive when the clients stop.
      stopTimeout: '120s',
    });
    d.write({ ...d.options, handoff: `{ enabled: true, socket_path: "${d.dir}/state.sock", timeout: "30s" }` });
    d.start(true);
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Running', 60000);
    return { d, port };
  }

  /** Wait (a hang guard, not a timing) until `check` holds for every client. */
  async function each(list: Client[], what: string, check: (c: Client) => boolean): Promise<void> {
    const ok = await settle(
      () => list.every(check),
      (v) => v,
      90000,
    );
    const failing = list.filter((c) => !check(c)).map((c) => `${c.name}: ${c.replies.length}/${c.sent}`);
    assert.ok(ok, `every client: ${what} (not yet: ${failing.join(', ')})`);
  }

  it('a reload in the middle of 50 ws sessions that keep sending (PID 1): no close, every message answered once and in order, the session counter goes on in generation 2, the old generation leaves first', async () => {
    const { d, port } = await started();
    const aeterna = await d.run.aeternaPid();
    const [oldApp] = descendantsOf(aeterna); // generation 1, as this test's PID namespace sees it
    const kinds: Kind[] = ['whole', 'fragments', 'split'];
    const list = range(50).map((i) => new Client(port, `s${i}`, kinds[i % 3]));
    clients.push(...list);
    await Promise.all(list.map((c) => c.opened));
    for (const [i, c] of list.entries()) c.start((i * 7) % EVERY_MS);
    await each(list, 'has 5 replies', (c) => c.replies.length >= 5);

    const r = await d.cli('reload');
    assert.equal(r.code, 0, r.stderr);
    await each(list, 'has 5 replies from generation 2', (c) => c.fromGeneration2 >= 5);
    // The old generation left while the clients still send: it did not wait for them (stop_timeout is 120 s).
    const gone = await settle(
      () => processAlive(oldApp),
      (alive) => !alive,
      60000,
    );
    assert.equal(gone, false, 'the old generation exited');
    assert.equal(descendantsOf(aeterna).length, 1, 'only generation 2 runs');
    await each(list, 'has 5 more replies after the old generation exited', (c) => c.fromGeneration2 >= 10);

    await Promise.all(list.map((c) => c.stop()));
    await each(list, 'has a reply to every message', (c) => c.replies.length >= c.sent);
    for (const c of list) {
      assert.equal(c.closed, null, `${c.name} (${c.kind}): no close`);
      assert.deepEqual(c.errors, [], `${c.name}: no error`);
      assert.deepEqual(
        c.replies.map((x) => x.seq),
        range(c.sent),
        `${c.name} (${c.kind}): one reply per message, in order`,
      );
      assert.deepEqual(
        c.replies.map((x) => x.n),
        range(c.sent).map((i) => i + 1),
        `${c.name}: the session's counter goes on across generations`,
      );
      const generations = c.replies.map((x) => x.generation);
      const switched = generations.indexOf('2');
      assert.ok(switched > 0, `${c.name}: generation 1 answered first`);
      assert.deepEqual(new Set(generations.slice(0, switched)), new Set(['1']), `${c.name}: generation 1, then 2`);
      assert.deepEqual(new Set(generations.slice(switched)), new Set(['2']), `${c.name}: generation 2 to the end`);
    }
    assert.match(d.run.stdout + d.run.stderr, /handed 50 session\(s\) over/);
    const s = await d.status();
    assert.equal(s.generation, 2);
    assert.equal(s.last_reload?.outcome, 'promoted');
    for (const c of list) c.ws.close(1000);
  });

  it('a session with permessage-deflate is not handed over: it is refused with the reason, closed with 1012, and the others move', async () => {
    const { d, port } = await started();
    const deflated = new Client(port, 'deflated', 'whole', '/deflate');
    const plain = new Client(port, 'plain', 'whole');
    clients.push(deflated, plain);
    await Promise.all([deflated.opened, plain.opened]);
    assert.match(deflated.ws.extensions, /permessage-deflate/);
    assert.equal(plain.ws.extensions, '');
    deflated.start();
    plain.start();
    await each([deflated, plain], 'has 3 replies', (c) => c.replies.length >= 3);
    assert.equal((await d.cli('reload')).code, 0);
    await each([plain], 'has 3 replies from generation 2', (c) => c.fromGeneration2 >= 3);
    const closed = await settle(
      () => deflated.closed,
      (c) => c !== null,
      60000,
    );
    assert.equal(closed?.code, 1012, 'the deflate session was closed as a service restart');
    assert.equal(deflated.fromGeneration2, 0);
    await plain.stop();
    await each([plain], 'has a reply to every message', (c) => c.replies.length >= c.sent);
    assert.equal(plain.closed, null);
    assert.deepEqual(
      plain.replies.map((x) => x.n),
      range(plain.sent).map((i) => i + 1),
    );
    assert.match(d.run.stdout + d.run.stderr, /session deflated not handed over: .*permessage-deflate.*cannot move/);
    assert.match(d.run.stdout + d.run.stderr, /handed 1 session\(s\) over/);
    plain.ws.close(1000);
  });
});

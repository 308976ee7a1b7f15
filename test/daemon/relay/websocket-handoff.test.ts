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
import WebSocket, { WebSocketServer } from 'ws';
import { Handoff, HandoffReceiver, type AdoptedConnection } from '../../../src/client/handoff';
import { handOverWebSocket, resumeWebSocket } from '../../../src/client/websocket';
import { native } from '../../../src/native/binding';
import { ROOT, descendantsOf, pidNamespaceUnavailable } from '../../helpers/aeterna';
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
    const d = await Daemon.withHandoff(APP);
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Running', 60000);
    return { d, port: d.options.port! };
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

/**
 * Each place ws's Receiver can be in when a session is handed over, one at a time and in one process: a ws client
 * writes part of a frame or message, the server-side session is handed over on a socket pair and resumed from its
 * other end, and the client writes the rest. The resumed session must answer the whole message.
 */
describe('handOverWebSocket and resumeWebSocket: what ws holds of a message goes along (one process)', () => {
  const closers: Array<() => void> = [];
  after(() => closers.forEach((close) => close()));

  /** A ws server with one session, its client, and a Handoff whose connections arrive as `adopted`. */
  async function session(options: { perMessageDeflate?: boolean } = {}): Promise<{
    server: WebSocket;
    client: WebSocket;
    replies: string[];
    handoff: Handoff;
    adopted: Promise<AdoptedConnection>;
  }> {
    const wss = new WebSocketServer({ port: 0, host: '127.0.0.1', ...options });
    await new Promise((resolve) => wss.once('listening', resolve));
    const accepted = new Promise<WebSocket>((resolve) => wss.once('connection', resolve));
    const { port } = wss.address() as net.AddressInfo;
    const client = new WebSocket(`ws://127.0.0.1:${port}`);
    await new Promise((resolve) => client.once('open', resolve));
    const server = await accepted;
    server.on('message', (data: Buffer) => server.send(`1:${data.toString()}`));
    const replies: string[] = [];
    client.on('message', (data: Buffer) => replies.push(data.toString()));
    const [ours, theirs] = native.relayPair(1 << 20); // as Aeterna makes the channel;
    const handoff = new Handoff(ours);
    const adopted = new Promise<AdoptedConnection>((resolve) => {
      new HandoffReceiver(theirs, 16 << 20, resolve, (message) => assert.fail(message));
    });
    closers.push(() => {
      void handoff.end(); // the channel's ends hold the event loop until closed
      client.terminate();
      wss.close();
    });
    return { server, client, replies, handoff, adopted };
  }

  /** What the server-side session holds of a message not yet whole (a hang guard until the bytes arrived). */
  async function held(
    server: WebSocket,
    what: (r: { _state: number; _bufferedBytes: number; _fragmented: number }) => boolean,
  ): Promise<void> {
    const receiver = (
      server as unknown as { _receiver: { _state: number; _bufferedBytes: number; _fragmented: number } }
    )._receiver;
    assert.ok(
      await settle(
        () => what(receiver),
        (v) => v,
        30000,
        5,
      ),
      'the bytes reached the server',
    );
  }

  const socketOf = (ws: WebSocket): net.Socket => (ws as unknown as { _socket: net.Socket })._socket;

  /** A masked text frame of `text`, as a client writes it. */
  function frame(text: string, opcode = 0x1, fin = true): Buffer {
    const payload = Buffer.from(text);
    const mask = crypto.randomBytes(4);
    const n = payload.length;
    const length =
      n < 126
        ? [0x80 | n]
        : n < 65536
          ? [0x80 | 126, n >> 8, n & 0xff]
          : [0x80 | 127, 0, 0, 0, 0, ...Buffer.from(new Uint32Array([n]).buffer).reverse()];
    return Buffer.concat([
      Buffer.from([(fin ? 0x80 : 0) | opcode, ...length, ...mask]),
      Buffer.from(payload.map((b, i) => b ^ mask[i % 4])),
    ]);
  }

  /** Hand the session over, resume it from the pair's other end, and answer there as generation 2. */
  async function moved(s: Awaited<ReturnType<typeof session>>): Promise<{ resumed: WebSocket; closeCode: number }> {
    const closed = new Promise<number>((resolve) => s.server.once('close', resolve));
    await handOverWebSocket(s.handoff, s.server, 'one', { count: 7 });
    assert.equal(await s.handoff.end(), 1);
    const c = await s.adopted;
    const r = resumeWebSocket<WebSocket>(c);
    assert.ok(r, 'the connection is a WebSocket session');
    assert.deepEqual(r.meta, { count: 7 });
    r.ws.on('message', (data: Buffer) => r.ws.send(`2:${data.toString()}`));
    return { resumed: r.ws, closeCode: await closed };
  }

  const cuts: Array<[string, string, number]> = [
    ['inside its first two bytes', 'x'.repeat(300), 1],
    ['inside its 16-bit length', 'x'.repeat(300), 3],
    ['inside its mask', 'x'.repeat(300), 6],
    ['inside its payload', 'x'.repeat(300), 100],
    ['inside its 64-bit length', 'y'.repeat(70000), 5],
    ['inside a 64-bit payload', 'y'.repeat(70000), 40000],
  ];
  for (const [where, text, cut] of cuts) {
    it(`a frame cut ${where}: the resumed session answers the whole message, the client sees no close`, async () => {
      const s = await session();
      const bytes = frame(text);
      socketOf(s.client).write(bytes.subarray(0, cut));
      await held(s.server, (r) => r._bufferedBytes > 0 || r._state !== 0);
      const { closeCode } = await moved(s);
      assert.equal(closeCode, 1012, 'the old WebSocket object closed here as handed over');
      socketOf(s.client).write(bytes.subarray(cut));
      s.client.send('after');
      assert.ok(
        await settle(
          () => s.replies.length,
          (n) => n >= 2,
          30000,
          5,
        ),
      );
      assert.deepEqual(s.replies, [`2:${text}`, '2:after']);
      assert.equal(s.client.readyState, WebSocket.OPEN);
    });
  }

  it('a message in fragments, cut between them and inside the next one: answered whole; a ping cut in two is answered', async () => {
    const s = await session();
    const second = frame('-middle-', 0x0, false);
    socketOf(s.client).write(Buffer.concat([frame('first', 0x1, false), second.subarray(0, 4)]));
    await held(s.server, (r) => r._fragmented !== 0 && r._state !== 0);
    await moved(s);
    const ping = frame('are you there', 0x9);
    const pong = new Promise<string>((resolve) => s.client.once('pong', (d: Buffer) => resolve(d.toString())));
    socketOf(s.client).write(Buffer.concat([second.subarray(4), ping.subarray(0, 3)]));
    socketOf(s.client).write(Buffer.concat([ping.subarray(3), frame('last', 0x0, true)]));
    assert.equal(await pong, 'are you there');
    assert.ok(
      await settle(
        () => s.replies.length,
        (n) => n >= 1,
        30000,
        5,
      ),
    );
    assert.deepEqual(s.replies, ['2:first-middle-last']);
  });

  it('a handoff that fails leaves the session open here, with what ws held of a frame', async () => {
    const s = await session();
    await s.handoff.end(); // the channel is closed: send() refuses
    const bytes = frame('still here');
    socketOf(s.client).write(bytes.subarray(0, 6));
    await held(s.server, (r) => r._state !== 0);
    await assert.rejects(handOverWebSocket(s.handoff, s.server, 'one'), /channel is closed/);
    assert.equal(s.server.readyState, WebSocket.OPEN);
    socketOf(s.client).write(bytes.subarray(6));
    assert.ok(
      await settle(
        () => s.replies.length,
        (n) => n >= 1,
        30000,
        5,
      ),
    );
    assert.deepEqual(s.replies, ['1:still here']);
  });

  it('a session with permessage-deflate is refused with the reason and stays open here', async () => {
    const s = await session({ perMessageDeflate: true });
    assert.match(s.server.extensions, /permessage-deflate/);
    await assert.rejects(handOverWebSocket(s.handoff, s.server, 'one'), /permessage-deflate.*cannot move/);
    s.client.send('hello');
    assert.ok(
      await settle(
        () => s.replies.length,
        (n) => n >= 1,
        30000,
        5,
      ),
    );
    assert.deepEqual(s.replies, ['1:hello']);
  });
});

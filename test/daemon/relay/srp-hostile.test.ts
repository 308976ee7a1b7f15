// Hostile and malformed input on the state socket: each answered with a clear
// error and a closed connection; the daemon keeps serving and its memory and
// fds stay flat. Connections are admitted by their peer's credentials before a
// byte is read, so the malformed frames are sent from inside the generation (the
// app fixture's /relay-probe); the test process itself is a stranger and is
// refused (forbidden) whatever it sends.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fixture, freePort } from '../../helpers/aeterna';
import { Daemon } from '../../helpers/daemon';
import { getJson, requestJson } from '../../helpers/load';
import { native } from '../../../src/native/binding';
import { encodeFrame } from '../../../src/srp/codec';

/** Send raw bytes (optionally with fds on them), then collect everything until the daemon closes. */
function exchange(socketPath: string, bytes: Buffer, fds: number[] = [], closeAfterSend = false): Promise<string> {
  return new Promise((resolve, reject) => {
    const fd = native.connectUnix(socketPath);
    native.sendmsg(fd, bytes, fds);
    const socket = new net.Socket({ fd, readable: true, writable: true });
    let got = Buffer.alloc(0);
    socket.on('data', (d) => (got = Buffer.concat([got, d])));
    socket.on('close', () => resolve(got.length >= 4 ? got.subarray(4).toString() : ''));
    socket.on('error', reject);
    if (closeAfterSend) socket.end();
  });
}

/** The same exchange, made by the app (a process of the serving generation). */
async function probe(port: number, bytes: Buffer, options: { fd?: boolean; end?: boolean } = {}): Promise<string> {
  const body = JSON.stringify({ bytes: bytes.toString('base64'), fd: options.fd ?? false, end: options.end ?? false });
  return (await requestJson<{ reply: string }>(port, 'POST', '/relay-probe', body)).reply;
}

const frame = (text: string): Buffer => encodeFrame(Buffer.from(text));
const header = (n: number): Buffer => {
  const h = Buffer.alloc(4);
  h.writeUInt32BE(n >>> 0);
  return h;
};

function rssKiB(pid: number): number {
  return Number(/^VmRSS:\s+(\d+)/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))![1]);
}

describe('state socket under hostile input', { timeout: 120000 }, () => {
  let d: Daemon;
  let port: number;
  let sock: string;
  let aeterna: number;
  before(async () => {
    port = await freePort();
    d = new Daemon({
      command: [process.execPath, fixture('apps', 'stateful_app.js')],
      port,
      handoff: true,
      readiness: '{ mode: "notify", timeout: "20s" }',
    }).start();
    await d.waitStatus((s) => s.state === 'Running');
    sock = path.join(d.dir, 'state.sock');
    aeterna = await d.run.aeternaPid();
  });
  after(async () => {
    assert.equal(await d.stop(), 0);
  });

  const cases: Array<[string, () => Promise<string>, RegExp]> = [
    ['a length header of 0', () => probe(port, header(0)), /"code":"bad_frame","message":"frame length 0"/],
    [
      'a length header of 16 MiB + 1',
      () => probe(port, header((16 << 20) + 1)),
      /"code":"too_large","message":"frame length 16777217 is above the limit of 16777216 bytes"/,
    ],
    ['a length header of 4 GiB', () => probe(port, header(0xffffffff)), /"code":"too_large"/],
    [
      'invalid UTF-8',
      () => probe(port, encodeFrame(Buffer.from([0x7b, 0xc3, 0x28, 0x7d]))),
      /"code":"bad_json","message":"control frame is not valid UTF-8"/,
    ],
    [
      'invalid JSON',
      () => probe(port, frame('{"op":"hello",')),
      /"code":"bad_json","message":"control frame is not JSON/,
    ],
    [
      'an unknown op',
      () => probe(port, frame('{"op":"format_disk"}')),
      /"code":"unexpected_op","message":"unknown op \\"format_disk\\""/,
    ],
    [
      'an op out of order (state before hello)',
      () => probe(port, frame('{"op":"state","size":0}')),
      /"code":"unexpected_op","message":"expected hello, got \\"state\\""/,
    ],
    ['a hello of another version', () => probe(port, frame('{"op":"hello","v":2}')), /"code":"unsupported_version"/],
    [
      'fds announced but none attached',
      () => probe(port, frame('{"op":"state","size":0,"fds":["conn:1"]}')),
      /"code":"bad_frame","message":"1 fds announced but none arrived with the frame"/,
    ],
    [
      'an fd attached where none is announced',
      () => probe(port, frame('{"op":"hello","v":1}'), { fd: true }),
      /"code":"bad_frame","message":"1 fds arrived where none were announced"/,
    ],
    [
      'a second relay connection of a generation that has one',
      () => probe(port, frame('{"op":"hello","v":1}')),
      /"code":"busy","message":"generation 1 already has a relay connection"/,
    ],
    [
      'a valid hello from a process that is not a managed generation',
      () => exchange(sock, frame('{"op":"hello","v":1}')),
      /"code":"forbidden"/,
    ],
    [
      'bytes of any kind from a process that is not a managed generation',
      () => exchange(sock, header(0xffffffff)),
      /"code":"forbidden"/,
    ],
  ];
  for (const [name, run, expected] of cases) {
    it(`${name}: a clear error, then closed`, async () => {
      assert.match(await run(), expected);
    });
  }

  it('a truncated frame (the peer closes mid-frame) leaves nothing behind', async () => {
    assert.equal(await probe(port, Buffer.concat([header(100), Buffer.from('only ten..')]), { end: true }), '');
  });

  it('a client that connects and sends nothing is cut after the hello timeout (timeout)', async () => {
    assert.match(await probe(port, Buffer.alloc(0)), /"code":"timeout","message":"no hello within 5000 ms"/);
  });

  it('1,000 connections of a stranger at once: each refused and closed (or refused by the kernel); memory and fds flat; the app still serves with its state', async () => {
    await getJson(port, '/sessions/x'); // warm
    const fdsBefore = fs.readdirSync(`/proc/${aeterna}/fd`).length;
    const rssBefore = rssKiB(aeterna);
    let answered = 0;
    let refused = 0;
    await Promise.all(
      Array.from({ length: 1000 }, async () => {
        try {
          const reply = await exchange(sock, frame('{"op":"hello","v":1}'));
          if (/"op":"error"/.test(reply)) answered++;
        } catch {
          refused++; // the listen backlog was full: the kernel said EAGAIN
        }
      }).map((p) => p.catch(() => refused++)),
    );
    assert.equal(answered + refused, 1000);
    assert.ok(answered > 0);
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(fs.readdirSync(`/proc/${aeterna}/fd`).length, fdsBefore, 'no fd leaked');
    assert.ok(rssKiB(aeterna) - rssBefore < 20 * 1024, 'RSS flat (< +20 MiB)');
    assert.equal((await d.status()).state, 'Running');
    // and a reload still relays the state: the app's own relay connection was never disturbed
    await fetchPost(port, '/sessions/x/messages', 'still here');
    assert.equal((await d.cli('reload')).code, 0);
    assert.deepEqual((await getJson<{ history: string[] }>(port, '/sessions/x')).history, ['still here']);
  });
});

function fetchPost(port: number, url: string, body: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1', () =>
      socket.end(
        `POST ${url} HTTP/1.1\r\nHost: x\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`,
      ),
    );
    socket.on('data', () => undefined);
    socket.on('close', () => resolve());
    socket.on('error', reject);
  });
}

// The connection handoff channel of the TypeScript SDK (src/client/handoff.ts) over a real socket pair, with real
// TCP connections moving through it: they keep working, bytes read but not processed come first, a client that
// writes while its connection moves loses nothing, a thousand connections move, and broken frames end the
// channel without leaking the fds they carried.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import { native } from '../../src/native/binding';
import { Handoff, HandoffReceiver, endUntakenChannel, type AdoptedConnection } from '../../src/client/handoff';
import { encodeFrame } from '../../src/srp/codec';

/** A listening server on 127.0.0.1 and a function that opens one connection to it: [client, the server's socket]. */
async function tcpPairs(): Promise<{ open: () => Promise<[net.Socket, net.Socket]>; close: () => void }> {
  const accepted: Array<(s: net.Socket) => void> = [];
  const server = net.createServer((s) => accepted.shift()!(s));
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as net.AddressInfo).port;
  return {
    open: async () => {
      const serverSide = new Promise<net.Socket>((r) => accepted.push(r));
      const client = net.connect(port, '127.0.0.1');
      await new Promise((r) => client.once('connect', r));
      return [client, await serverSide];
    },
    close: () => server.close(),
  };
}

function channel(onConnection: ((c: AdoptedConnection) => void) | null, warnings: string[] = []): Handoff {
  const [a, b] = native.relayPair(1 << 20);
  new HandoffReceiver(b, 16 << 20, onConnection, (m) => warnings.push(m));
  return new Handoff(a);
}

function readAll(socket: net.Socket, bytes: number): Promise<Buffer> {
  return new Promise((resolve) => {
    const parts: Buffer[] = [];
    let got = 0;
    const on = (d: Buffer): void => {
      parts.push(d);
      got += d.length;
      if (got >= bytes) {
        socket.off('data', on);
        resolve(Buffer.concat(parts));
      }
    };
    socket.on('data', on);
  });
}

const openFds = (): number => fs.readdirSync('/proc/self/fd').length;

describe('connection handoff channel', { timeout: 120000 }, () => {
  it('moves 1000 TCP connections; each answers on the adopted socket, and the counts match', async () => {
    const tcp = await tcpPairs();
    const adopted: AdoptedConnection[] = [];
    const handoff = channel((c) => adopted.push(c));
    const pairs: Array<[net.Socket, net.Socket]> = [];
    for (let i = 0; i < 1000; i++) pairs.push(await tcp.open());
    for (const [i, [, server]] of pairs.entries()) await handoff.send(server, `c${i}`, { n: i });
    assert.equal(await handoff.end(), 1000);
    while (adopted.length < 1000) await new Promise((r) => setTimeout(r, 10));
    for (const c of adopted)
      c.socket.on('data', (d) => c.socket.write(`${(c.meta as { n: number }).n}:${d.toString()}`));
    const answers = await Promise.all(
      pairs.map(async ([client], i) => {
        const reply = readAll(client, `${i}:ping`.length);
        client.write('ping');
        return (await reply).toString();
      }),
    );
    assert.deepEqual(
      answers,
      pairs.map((_, i) => `${i}:ping`),
    );
    assert.deepEqual(
      adopted.map((c) => c.id),
      pairs.map((_, i) => `c${i}`),
    );
    for (const [client] of pairs) client.destroy();
    for (const c of adopted) c.socket.destroy();
    tcp.close();
  });

  it('a client writing while its connection moves: the bytes read but not processed come first, then the rest, nothing lost', async () => {
    const tcp = await tcpPairs();
    const [client, server] = await tcp.open();
    const total = 2 << 20;
    const payload = Buffer.alloc(total);
    for (let i = 0; i < total; i++) payload[i] = i % 251;
    // The old generation reads part of it (Node buffers it unread), then hands the connection over mid-stream.
    server.pause();
    client.write(payload.subarray(0, 1 << 20));
    await new Promise((r) => setTimeout(r, 100));
    server.read(0); // let Node read (and buffer, unread) part of what arrived
    await new Promise((r) => setTimeout(r, 100));
    let adopted!: AdoptedConnection;
    const handoff = channel((c) => (adopted = c));
    const sending = handoff.send(server, 'writer', null);
    client.write(payload.subarray(1 << 20)); // still writing while it moves
    await sending;
    await handoff.end();
    while (!adopted) await new Promise((r) => setTimeout(r, 10));
    assert.ok(adopted.unreadBytes > 0, 'some bytes came as unread');
    const got = await readAll(adopted.socket, total);
    assert.equal(got.length, total);
    assert.ok(got.equals(payload), 'every byte, in order');
    client.destroy();
    adopted.socket.destroy();
    tcp.close();
  });

  it('a connection handed over with nobody to adopt it is closed, with a warning, and the client sees the end', async () => {
    const tcp = await tcpPairs();
    const [client, server] = await tcp.open();
    const warnings: string[] = [];
    const handoff = channel(null, warnings);
    await handoff.send(server, 'orphan', null);
    await handoff.end();
    await new Promise((r) => client.once('end', r));
    assert.ok(
      warnings.some((w) => /orphan .*no onConnection/.test(w)),
      warnings.join('\n'),
    );
    client.destroy();
    tcp.close();
  });

  it('a frame that breaks the rules (two fds, a bad id) ends the channel and closes the fds it carried', async () => {
    for (const bad of [
      { op: 'conn', id: 'x', unread: 0, fds: ['conn', 'conn'] },
      { op: 'conn', id: '', unread: 0, fds: ['conn'] },
      { op: 'conn', id: 'y', unread: -1, fds: ['conn'] },
    ]) {
      const baseline = openFds();
      const [a, b] = native.relayPair(1 << 20);
      const warnings: string[] = [];
      const adopted: AdoptedConnection[] = [];
      new HandoffReceiver(
        b,
        16 << 20,
        (c) => adopted.push(c),
        (m) => warnings.push(m),
      );
      const [x, y] = native.relayPair(4096);
      const fds = bad.fds.length === 2 ? [x, y] : [x];
      native.sendmsg(a, encodeFrame(Buffer.from(JSON.stringify(bad))), fds);
      native.close(x);
      native.close(y);
      while (warnings.length === 0) await new Promise((r) => setTimeout(r, 10));
      native.close(a);
      assert.equal(adopted.length, 0);
      assert.match(warnings[0], /ended early/);
      await new Promise((r) => setTimeout(r, 50));
      assert.equal(openFds(), baseline, `no fd left open (the channel's and the frame's) (${JSON.stringify(bad)})`);
    }
  });

  it('a channel the old generation never took says end with count 0: the new one adopts nothing and warns of nothing', async () => {
    const [a, b] = native.relayPair(1 << 20);
    const warnings: string[] = [];
    const receiver = new HandoffReceiver(
      b,
      16 << 20,
      () => assert.fail('nothing to adopt'),
      (m) => warnings.push(m),
    );
    endUntakenChannel(a);
    while (!(receiver as unknown as { done: boolean }).done) await new Promise((r) => setTimeout(r, 10));
    assert.equal(receiver.adopted, 0);
    assert.deepEqual(warnings, []);
  });

  it('end of file without `end` (the old generation died): what arrived whole is adopted', async () => {
    const tcp = await tcpPairs();
    const [client, server] = await tcp.open();
    const [a, b] = native.relayPair(1 << 20);
    const adopted: AdoptedConnection[] = [];
    const warnings: string[] = [];
    new HandoffReceiver(
      b,
      16 << 20,
      (c) => adopted.push(c),
      (m) => warnings.push(m),
    );
    // The old generation's side, by hand: one conn frame, then its end closes without `end`.
    const fd = (server as unknown as { _handle: { fd: number } })._handle.fd;
    const frame = { op: 'conn', id: 'survivor', meta: { ok: true }, unread: 0, fds: ['conn'] };
    native.sendmsg(a, encodeFrame(Buffer.from(JSON.stringify(frame))), [fd]);
    server.destroy();
    native.close(a);
    while (adopted.length === 0) await new Promise((r) => setTimeout(r, 10));
    assert.deepEqual(adopted[0].meta, { ok: true });
    while (warnings.length === 0) await new Promise((r) => setTimeout(r, 10));
    assert.match(warnings[0], /closed it without `end`/);
    const reply = readAll(client, 2);
    adopted[0].socket.write('hi');
    assert.equal((await reply).toString(), 'hi');
    client.destroy();
    adopted[0].socket.destroy();
    tcp.close();
  });
});

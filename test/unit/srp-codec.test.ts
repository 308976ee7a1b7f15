// The SRP codec and connection layer: framing across arbitrary read
// boundaries, limits checked before allocation, fds tied to the frame that
// names them, and a real socketpair round trip with fds and backpressure.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import fc from 'fast-check';
import { FrameDecoder, SrpError, encodeFrame, frameHeader } from '../../src/srp/codec';
import { parseMessage, type Message } from '../../src/srp/messages';
import { SrpConnection } from '../../src/srp/connection';
import { native } from '../../src/native/binding';
import { memfdState } from '../../src/client';

function decodeAll(decoder: FrameDecoder): Buffer[] {
  const out: Buffer[] = [];
  for (let f = decoder.next(); f !== null; f = decoder.next()) out.push(Buffer.from(f.payload));
  return out;
}

function srpCode(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    assert.ok(err instanceof SrpError, `expected an SrpError, got ${String(err)}`);
    return err.code;
  }
  return 'no error';
}

const openFds = (): number => fs.readdirSync('/proc/self/fd').length;

describe('SRP framing', () => {
  it('decodes a frame fed one byte at a time', () => {
    const d = new FrameDecoder(1024);
    const wire = Buffer.concat([encodeFrame(Buffer.from('hello')), encodeFrame(Buffer.from('world!'))]);
    const got: Buffer[] = [];
    for (const byte of wire) {
      d.push(Buffer.from([byte]));
      got.push(...decodeAll(d));
    }
    assert.deepEqual(got.map(String), ['hello', 'world!']);
  });

  it('decodes many frames from one read', () => {
    const d = new FrameDecoder(1024);
    d.push(Buffer.concat(['a', 'bb', 'ccc'].map((s) => encodeFrame(Buffer.from(s)))));
    assert.deepEqual(decodeAll(d).map(String), ['a', 'bb', 'ccc']);
  });

  it('accepts a frame of exactly the limit and refuses limit + 1 as soon as the header is in', () => {
    const d = new FrameDecoder(16);
    d.push(encodeFrame(Buffer.alloc(16, 7)));
    assert.equal(decodeAll(d)[0].length, 16);
    const big = new FrameDecoder(16 << 20);
    big.push(frameHeader((16 << 20) + 1)); // no body: refused before a byte of it is buffered
    assert.equal(
      srpCode(() => big.next()),
      'too_large',
    );
  });

  it('passes data frames through in the pieces they arrived in, never reassembled, checking each header', () => {
    const d = new FrameDecoder(1024);
    const first = crypto.randomBytes(600);
    const second = crypto.randomBytes(400);
    const wire = Buffer.concat([encodeFrame(first), encodeFrame(second), encodeFrame(Buffer.from('{"op":"ready"}'))]);
    const reads = [wire.subarray(0, 250), wire.subarray(250, 700), wire.subarray(700)];
    const headers: number[] = [];
    const pieces: Buffer[] = [];
    let announced = 1000;
    const readBuffer = Buffer.alloc(1024); // one buffer reused for every read, as FdStream does
    for (const r of reads) {
      r.copy(readBuffer);
      const view = readBuffer.subarray(0, r.length);
      d.push(view, [], true);
      for (
        let part = announced > 0 ? d.nextData(announced) : null;
        part !== null;
        part = announced > 0 ? d.nextData(announced) : null
      ) {
        if (part.frameLength !== null) headers.push(part.frameLength);
        else {
          assert.equal(part.payload.buffer, readBuffer.buffer, 'a view of the read, not a copy');
          pieces.push(Buffer.from(part.payload));
        }
        announced -= part.payload.length;
      }
      d.settle(); // the read buffer is reused next: what is left must have been copied
      readBuffer.fill(0);
    }
    assert.deepEqual(headers, [600, 400]);
    assert.ok(pieces.length > 2, `${pieces.length} pieces: as they arrived, not one per frame`);
    assert.deepEqual(Buffer.concat(pieces), Buffer.concat([first, second]));
    assert.equal(String(d.next()!.payload), '{"op":"ready"}', 'the control frame after the data, intact after settle');
  });

  it('refuses a data frame longer than what is left of the announced state, or above the limit, at its header', () => {
    const over = new FrameDecoder(1024);
    over.push(frameHeader(11));
    assert.equal(
      srpCode(() => over.nextData(10)),
      'bad_frame',
    );
    const big = new FrameDecoder(16);
    big.push(frameHeader(17));
    assert.equal(
      srpCode(() => big.nextData(100)),
      'too_large',
    );
    const zero = new FrameDecoder(16);
    zero.push(frameHeader(0));
    assert.equal(
      srpCode(() => zero.nextData(100)),
      'bad_frame',
    );
  });

  it('refuses a 4 GiB length header and a length of 0', () => {
    const d = new FrameDecoder(16 << 20);
    d.push(Buffer.from([0xff, 0xff, 0xff, 0xff]));
    assert.equal(
      srpCode(() => d.next()),
      'too_large',
    );
    const z = new FrameDecoder(16);
    z.push(Buffer.from([0, 0, 0, 0]));
    assert.equal(
      srpCode(() => z.next()),
      'bad_frame',
    );
  });

  it('property: any frames, split at any points, decode to the same payloads', () => {
    fc.assert(
      fc.property(
        fc.array(fc.uint8Array({ minLength: 1, maxLength: 300 }), { maxLength: 20 }),
        fc.array(fc.nat(400), { maxLength: 30 }),
        (payloads, cuts) => {
          const wire = Buffer.concat(payloads.map((p) => encodeFrame(Buffer.from(p))));
          const points = [...new Set(cuts.map((c) => c % (wire.length + 1)))].sort((a, b) => a - b);
          const d = new FrameDecoder(1024);
          const got: Buffer[] = [];
          let last = 0;
          for (const p of [...points, wire.length]) {
            d.push(wire.subarray(last, p));
            got.push(...decodeAll(d));
            last = p;
          }
          assert.deepEqual(
            got.map((b) => b.toString('hex')),
            payloads.map((p) => Buffer.from(p).toString('hex')),
          );
        },
      ),
      { numRuns: 300 },
    );
  });

  it('property: random byte streams either decode or fail with an SrpError, never anything else', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 2000 }), fc.nat(50), (bytes, step) => {
        const d = new FrameDecoder(512);
        const wire = Buffer.from(bytes);
        try {
          for (let off = 0; off < wire.length; off += step + 1) {
            d.push(wire.subarray(off, off + step + 1));
            for (let f = d.next(); f !== null; f = d.next()) {
              try {
                parseMessage(f.payload);
              } catch (err) {
                if (!(err instanceof SrpError)) throw err;
              }
            }
          }
        } catch (err) {
          if (!(err instanceof SrpError)) throw err;
        }
      }),
      { numRuns: 500 },
    );
  });
});

describe('SRP messages', () => {
  it('refuses invalid UTF-8, invalid JSON, non-objects and unknown ops with the right codes', () => {
    assert.equal(
      srpCode(() => parseMessage(Buffer.from([0xff, 0xfe]))),
      'bad_json',
    );
    assert.equal(
      srpCode(() => parseMessage(Buffer.from('{"op":'))),
      'bad_json',
    );
    assert.equal(
      srpCode(() => parseMessage(Buffer.from('[1,2]'))),
      'bad_json',
    );
    assert.equal(
      srpCode(() => parseMessage(Buffer.from('{"v":1}'))),
      'bad_json',
    );
    assert.equal(
      srpCode(() => parseMessage(Buffer.from('{"op":"teleport"}'))),
      'unexpected_op',
    );
  });

  it('checks state headers field by field', () => {
    assert.equal(
      srpCode(() => parseMessage(Buffer.from('{"op":"state","size":-1}'))),
      'bad_json',
    );
    assert.equal(
      srpCode(() => parseMessage(Buffer.from('{"op":"state","size":10,"encoding":"json"}'))),
      'bad_json',
      'sha256 required for a stream',
    );
    assert.equal(
      srpCode(() => parseMessage(Buffer.from('{"op":"state","size":10,"transport":"memfd"}'))),
      'bad_json',
      'memfd needs an fd named state',
    );
    assert.equal(
      srpCode(() => parseMessage(Buffer.from('{"op":"state","size":1,"sha256":"XYZ"}'))),
      'bad_json',
    );
    const ok = parseMessage(
      Buffer.from(`{"op":"state","size":3,"encoding":"json","sha256":"${'a'.repeat(64)}","future_field":1}`),
    );
    assert.deepEqual(ok, { op: 'state', size: 3, encoding: 'json', sha256: 'a'.repeat(64) });
  });

  it('checks the direct transport and the crc32 check field by field (docs/srp.md, "Direct transport", "Checksums")', () => {
    const bad = (text: string): string | null => srpCode(() => parseMessage(Buffer.from(text)));
    assert.equal(
      bad('{"op":"state","size":5,"transport":"direct","sha256":"' + 'a'.repeat(64) + '"}'),
      'bad_json',
      'direct needs a trailer',
    );
    assert.equal(
      bad('{"op":"state","size":0,"transport":"direct","trailer":true}'),
      'bad_json',
      'direct needs a byte at least',
    );
    assert.equal(
      bad('{"op":"state","size":5,"transport":"direct","trailer":true,"fds":["direct"]}'),
      'bad_json',
      'the name direct is reserved on a state',
    );
    assert.equal(
      bad('{"op":"load","size":5,"transport":"direct","trailer":true}'),
      'bad_json',
      'a direct load carries the pair end',
    );
    assert.equal(
      bad('{"op":"checkpoint","size":5,"trailer":true,"checksum":"crc32"}'),
      'bad_json',
      'no crc32 for checkpoints',
    );
    assert.equal(
      bad('{"op":"state","size":5,"sha256":"' + 'a'.repeat(64) + '","checksum":"crc32"}'),
      'bad_json',
      'checksum only with a trailer',
    );
    assert.equal(bad('{"op":"state","size":5,"trailer":true,"checksum":"md5"}'), 'bad_json');
    assert.equal(bad('{"op":"trailer","crc32":"ABCDEF01"}'), 'bad_json', 'lowercase hex');
    assert.equal(
      bad('{"op":"trailer","crc32":"abcdef01","sha256":"' + 'a'.repeat(64) + '"}'),
      'bad_json',
      'exactly one check',
    );
    assert.equal(
      bad('{"op":"dump","final":true,"trailer":true,"direct":true,"fds":["direct"]}'),
      'bad_json',
      'no pair on a final dump',
    );
    assert.equal(
      bad('{"op":"dump","final":false,"trailer":true,"fds":["direct"]}'),
      'bad_json',
      'fds only with direct',
    );
    assert.deepEqual(
      parseMessage(
        Buffer.from(
          '{"op":"load","size":5,"transport":"direct","trailer":true,"checksum":"crc32","fds":["conn:1","direct"]}',
        ),
      ),
      {
        op: 'load',
        size: 5,
        transport: 'direct',
        trailer: true,
        checksum: 'crc32',
        fds: ['conn:1', 'direct'],
      },
    );
    assert.deepEqual(
      parseMessage(Buffer.from('{"op":"hello","v":1,"direct":true,"checksums":["crc32","sha256","xxh3"]}')),
      { op: 'hello', v: 1, direct: true, checksums: ['crc32'] },
    );
    assert.deepEqual(parseMessage(Buffer.from('{"op":"trailer","crc32":"0a1b2c3d"}')), {
      op: 'trailer',
      crc32: '0a1b2c3d',
    });
  });

  it('connection handoff: the hello offer needs fds; the channel comes on a final dump or the handoff op only', () => {
    assert.deepEqual(parseMessage(Buffer.from('{"op":"hello","v":1,"handoff":true}')), {
      op: 'hello',
      v: 1,
      handoff: true,
    });
    assert.equal(
      srpCode(() => parseMessage(Buffer.from('{"op":"hello","v":1,"fds":false,"handoff":true}'))),
      'bad_json',
    );
    assert.equal(
      srpCode(() => parseMessage(Buffer.from('{"op":"hello","v":1,"handoff":1}'))),
      'bad_json',
    );
    assert.deepEqual(
      parseMessage(Buffer.from('{"op":"dump","final":true,"timeout_ms":5,"handoff":true,"fds":["handoff"]}')),
      { op: 'dump', final: true, timeout_ms: 5, handoff: true, fds: ['handoff'] },
    );
    for (const bad of [
      '{"op":"dump","final":false,"handoff":true,"fds":["handoff"]}',
      '{"op":"dump","final":true,"handoff":true}',
      '{"op":"dump","final":true,"handoff":true,"fds":["direct"]}',
      '{"op":"handoff","fds":[]}',
    ])
      assert.equal(
        srpCode(() => parseMessage(Buffer.from(bad))),
        'bad_json',
        bad,
      );
    assert.deepEqual(parseMessage(Buffer.from('{"op":"handoff","fds":["handoff"]}')), {
      op: 'handoff',
      fds: ['handoff'],
    });
  });
});

describe('SRP fds', () => {
  it('a frame claims the fds that arrived where it starts; a count mismatch is bad_frame', () => {
    const d = new FrameDecoder(1024);
    const frame = encodeFrame(Buffer.from('x'));
    d.push(frame, [100, 101]);
    const f = d.next()!;
    assert.equal(
      srpCode(() => d.claimFds(f, 1)),
      'bad_frame',
    );
    assert.deepEqual(d.claimFds(f, 2), [100, 101]);
  });

  it('fds on a frame that names none are bad_frame once that frame is handled', () => {
    const d = new FrameDecoder(1024);
    const [a, b] = native.test.socketpair();
    d.push(Buffer.concat([encodeFrame(Buffer.from('one')), encodeFrame(Buffer.from('two'))]), [a, b]);
    const first = d.next()!;
    d.checkUnclaimed(first); // the fds may still belong to the second frame, which starts in the same bytes
    const second = d.next()!;
    assert.equal(
      srpCode(() => d.checkUnclaimed(second)),
      'bad_frame',
    );
    d.closeUnclaimed();
  });
});

describe('SRP connection over a real socketpair', () => {
  function pair(): [SrpConnection, SrpConnection] {
    const [a, b] = native.test.socketpair();
    return [new SrpConnection(a, 1 << 20), new SrpConnection(b, 1 << 20)];
  }

  it('carries a state with a sealed memfd and a socket fd, names intact', async () => {
    const [x, y] = pair();
    const content = Buffer.from('the state of generation 1');
    const memfd = memfdState(content);
    const [s1, s2] = native.test.socketpair();
    const got = new Promise<{ m: Message; fds: number[] }>((resolve) =>
      y.once('message', (m, fds) => resolve({ m, fds })),
    );
    x.send(
      { op: 'state', size: content.length, encoding: 'text', transport: 'memfd', fds: ['state', 'conn:1'] },
      [memfd, s1],
      { closeFds: true },
    );
    const { m, fds } = await got;
    assert.equal(m.op, 'state');
    assert.equal(fds.length, 2);
    assert.equal(fs.readFileSync(`/proc/self/fd/${fds[0]}`).toString(), content.toString());
    fs.writeSync(fds[1], 'ping'); // the passed socket still reaches its peer
    const peer = Buffer.alloc(4);
    await new Promise((r) => setTimeout(r, 10));
    assert.equal(fs.readSync(s2, peer), 4);
    assert.equal(peer.toString(), 'ping');
    for (const fd of [...fds, s2]) native.close(fd);
    x.close();
    y.close();
  });

  it('streams 32 MiB of data frames byte-exact with backpressure, and leaks no fd', async () => {
    const before = openFds();
    const [x, y] = pair();
    const data = crypto.randomBytes(32 << 20);
    const digest = crypto.createHash('sha256');
    let received = 0;
    const done = new Promise<void>((resolve) =>
      y.on('data', (payload, _raw, remaining) => {
        digest.update(payload);
        received += payload.length;
        if (remaining === 0) resolve();
      }),
    );
    const sha = crypto.createHash('sha256').update(data).digest('hex');
    x.send({ op: 'state', size: data.length, encoding: 'binary', sha256: sha });
    x.sendData(data, 1 << 20);
    await done;
    assert.equal(received, data.length);
    assert.equal(digest.digest('hex'), sha);
    x.close();
    y.close();
    await new Promise((r) => setTimeout(r, 20));
    assert.equal(openFds(), before);
  });

  it('relays 32 MiB through a middle hop as Aeterna does (views of its read buffer, the spill ring under backpressure) byte-exact, frames intact', async () => {
    const [x, y] = pair();
    const [y2, z] = native.test.socketpair();
    const out = new SrpConnection(y2, 1 << 20, 2 << 20); // a small window: the spill ring fills, wraps and pauses the hop
    const sink = new SrpConnection(z, 1 << 20);
    const data = crypto.randomBytes(32 << 20);
    const digest = crypto.createHash('sha256');
    let headers = 0;
    let pauses = 0;
    const done = new Promise<void>((resolve) =>
      sink.on('data', (payload, frameLength, remaining) => {
        if (frameLength !== null) {
          headers++;
          if (headers % 4 === 0) {
            sink.pause(); // a slow reader now and then
            setTimeout(() => sink.resume(), 5);
          }
        }
        digest.update(payload);
        if (remaining === 0) resolve();
      }),
    );
    y.on('message', (m) => out.send(m)); // the state header
    y.on('data', (payload, frameLength) => {
      if (!out.forward(payload, frameLength)) {
        pauses++;
        y.pause();
        out.stream.once('drain', () => y.resume());
      }
    });
    const sha = crypto.createHash('sha256').update(data).digest('hex');
    x.send({ op: 'state', size: data.length, encoding: 'binary', sha256: sha });
    x.sendData(data, 1 << 20);
    await done;
    assert.equal(digest.digest('hex'), sha);
    assert.equal(headers, 32, "the sender's frames, passed on as they were");
    assert.ok(pauses > 0, 'the hop was paused by backpressure');
    for (const c of [x, y, out, sink]) c.close();
  });

  it('answers garbage with an error frame and closes', async () => {
    const [a, b] = native.test.socketpair();
    const server = new SrpConnection(a, 1024);
    const closed = new Promise<Error | null>((r) => server.on('close', r));
    native.sendmsg(b, Buffer.from([0, 0, 0, 3, 0x7b, 0xff, 0x7d]), []);
    const err = await closed;
    assert.ok(err instanceof SrpError && err.code === 'bad_json');
    const reply = Buffer.alloc(256);
    const n = fs.readSync(b, reply);
    assert.match(reply.subarray(4, n).toString(), /"op":"error","code":"bad_json"/);
    native.close(b);
  });
});

// aeterna/client (src/client) against a fake Aeterna on a real unix socket: the
// fake speaks docs/srp.md frame by frame, so the test controls when each
// answer comes. Assert what arrived and in which order, never timings.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { connect, type DumpResult } from '../../src/client';
import { FrameDecoder, encodeFrame } from '../../src/srp/codec';
import { tempDir } from '../helpers/aeterna';

const dirs: string[] = [];
after(() => {
  for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

/**
 * A fake Aeterna that welcomes one client, gives it no initial state, asks for
 * the final dump (with `dump` as its extra fields), reads the state and acks it
 * only `ackAfterMs` later: a final sync that outlasts the client's own timeout.
 * `events` records what happened, in order.
 */
function slowFinalSync(
  dump: Record<string, unknown>,
  ackAfterMs: number,
): { path: string; events: string[]; closed: Promise<void>; server: net.Server } {
  const dir = tempDir('aeterna-client-');
  dirs.push(dir);
  const socketPath = path.join(dir, 'state.sock');
  const events: string[] = [];
  let closedResolve!: () => void;
  const closed = new Promise<void>((r) => (closedResolve = r));
  const server = net.createServer((sock) => {
    const decoder = new FrameDecoder(1 << 30);
    const send = (m: Record<string, unknown>): boolean => sock.write(encodeFrame(Buffer.from(JSON.stringify(m))));
    let expecting = -1; // bytes of state still to come as data frames
    let received = 0;
    let timer: NodeJS.Timeout | undefined;
    sock.on('close', () => {
      clearTimeout(timer);
      events.push('client closed');
      closedResolve();
    });
    sock.on('data', (chunk) => {
      decoder.push(chunk);
      for (let f = decoder.next(); f !== null; f = decoder.next()) {
        if (expecting > 0) {
          received += f.payload.length;
          expecting -= f.payload.length;
          if (expecting === 0) {
            events.push(`state ${received} bytes`);
            timer = setTimeout(() => send({ op: 'ack', ok: true }) && events.push('ack sent'), ackAfterMs);
          }
          continue;
        }
        const m = JSON.parse(Buffer.from(f.payload).toString()) as { op: string; size?: number };
        if (m.op === 'hello') {
          send({ op: 'welcome', v: 1, generation: 1, max_frame: 16 << 20 });
          send({ op: 'load', size: 0 });
        } else if (m.op === 'ack') {
          send({ op: 'dump', final: true, ...dump });
        } else if (m.op === 'state') {
          expecting = m.size ?? 0;
        }
      }
    });
  });
  server.listen(socketPath);
  return { path: socketPath, events, closed, server };
}

describe('aeterna/client shutdown()', { timeout: 30000 }, () => {
  const state = crypto.randomBytes(4 << 20);
  const cases = [
    {
      name: "a final sync that outlasts shutdown()'s timeout waits as long as Aeterna said (the dump's timeout_ms) and gets its ack",
      dump: { timeout_ms: 30000 },
      events: [`state ${state.length} bytes`, 'ack sent', 'client closed'],
    },
    {
      name: "without timeout_ms (an older Aeterna), shutdown()'s timeout bounds the whole wait",
      dump: {},
      events: [`state ${state.length} bytes`, 'client closed'],
    },
  ];
  for (const c of cases) {
    it(c.name, async () => {
      const fake = slowFinalSync(c.dump, 1000);
      const client = await connect({ path: fake.path });
      await client.load();
      client.onDump(() => state);
      await client.shutdown(200);
      await fake.closed;
      fake.server.close();
      assert.deepEqual(fake.events, c.events);
    });
  }
});

// Type-level (checked by tsc): a mistyped memfd or data result is a type error, not silently sent as JSON.
// @ts-expect-error memfd must be a number (an fd from memfdState())
export const mistypedMemfd: DumpResult = { memfd: '3' };
// @ts-expect-error data must be a Buffer or a string
export const mistypedData: DumpResult = { data: 42 };
export const plainJson: DumpResult = { sessions: [42] };

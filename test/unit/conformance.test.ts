// The language-neutral conformance suite (test/conformance/*.json, format in its
// README.md) run against the TypeScript SDK, with Aeterna played by a scripted
// peer on a real unix socket (and a socketpair for the frame vectors).
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { connect, RelayError, type LoadedState, type DumpResult } from '../../src/client';
import { native } from '../../src/native/binding';
import { SrpConnection } from '../../src/srp/connection';
import { SrpError, encodeFrame } from '../../src/srp/codec';
import { encodeMessage, type Message } from '../../src/srp/messages';
import { ROOT, tempDir } from '../helpers/aeterna';

const SUITE = path.join(ROOT, 'test', 'conformance');
const suite = <T>(name: string): T => JSON.parse(fs.readFileSync(path.join(SUITE, name), 'utf8')) as T;

type Json = Record<string, unknown>;
type Part = { hex: string } | { text: string } | { frame: string };

/** A vector's "bytes": hex, raw text, or a whole frame (length header + UTF-8 text). */
function toBytes(parts: Part[]): Buffer {
  return Buffer.concat(
    parts.map((p) =>
      'hex' in p ? Buffer.from(p.hex, 'hex') : 'text' in p ? Buffer.from(p.text) : encodeFrame(Buffer.from(p.frame)),
    ),
  );
}

/** Every expected field is in actual; {"prefix": s} matches a string starting with s. */
function matches(expected: Json, actual: Json): boolean {
  return Object.entries(expected).every(([key, want]) => {
    const got = actual[key];
    if (want !== null && typeof want === 'object' && Object.keys(want).join() === 'prefix')
      return typeof got === 'string' && got.startsWith((want as { prefix: string }).prefix);
    return key in actual && JSON.stringify(got) === JSON.stringify(want);
  });
}

/** The optional capabilities this SDK declares in its hello (README.md, "Optional capabilities"): it runs every case. */
const CAPABILITIES = new Set(['trailer', 'checkpoint', 'direct', 'crc32']);
const unsupported = (requires: string[] = []): string | false => {
  const missing = requires.filter((r) => !CAPABILITIES.has(r));
  return missing.length > 0 && `this SDK does not declare ${missing.join(', ')}`;
};

const dirs: string[] = [];
after(() => dirs.forEach((d) => fs.rmSync(d, { recursive: true, force: true })));

describe('conformance: frames.json', () => {
  const vectors = suite<{
    decode: { name: string; requires?: string[]; bytes: Part[]; max_frame?: number; message?: Json; error?: string }[];
    encode: { name: string; message: Json; bytes: Part[] }[];
  }>('frames.json');
  for (const v of vectors.decode) {
    it(`decode: ${v.name}`, { skip: unsupported(v.requires) }, async () => {
      const [peer, mine] = native.test.socketpair();
      const conn = new SrpConnection(mine, v.max_frame ?? 16 << 20);
      const outcome = new Promise<{ message?: Message; error?: string }>((resolve) => {
        conn.on('message', (message) => resolve({ message }));
        conn.on('close', (err) => resolve({ error: err instanceof SrpError ? err.code : `closed: ${err?.message}` }));
      });
      native.sendmsg(peer, toBytes(v.bytes), []);
      native.close(peer);
      const got = await outcome;
      conn.close();
      if (v.error) assert.equal(got.error, v.error);
      else assert.ok(got.message && matches(v.message!, got.message as unknown as Json), JSON.stringify(got));
    });
  }
  for (const v of vectors.encode) {
    it(`encode: ${v.name}`, () => {
      assert.equal(encodeMessage(v.message as unknown as Message).toString('hex'), toBytes(v.bytes).toString('hex'));
    });
  }
});

interface Step {
  client_sends?: Json;
  client_sends_data?: string;
  client_sends_direct?: string;
  client_closes?: true;
  peer_sends?: Json;
  memfd?: { text: string; sealed: boolean };
  data?: string[];
  pair?: { text?: string };
}
interface Case {
  name: string;
  requires?: string[];
  app: {
    ready?: boolean;
    apply?: 'throws';
    on_load?: 'accepts' | 'throws';
    dump?: { json?: unknown; text?: string; none?: true; throws?: true };
    checkpoint?: { json: unknown };
  };
  steps: Step[];
  expect: {
    connect?: { error: string };
    load?: { state?: Json | null; error?: string; app_error?: true };
    load_source?: string;
    later_loads?: Json[];
    checkpoint?: { seq?: number; error?: string };
  };
}

const describeState = (s: LoadedState): Json => ({ encoding: s.encoding, text: s.text(), final: s.final });

/** Aeterna's side of one case: accepts the connection and plays the steps in order. */
async function playPeer(listenFd: number, steps: Step[]): Promise<void> {
  const conn = new SrpConnection(native.accept(listenFd), 16 << 20);
  type Got = { message: Json } | { data: Buffer } | { closed: true };
  const queue: Got[] = [];
  let wake: () => void = () => undefined;
  const push = (g: Got): void => {
    queue.push(g);
    wake();
  };
  conn.on('message', (m) => push({ message: m as unknown as Json }));
  conn.on('data', (payload) => push({ data: Buffer.from(payload) }));
  conn.on('close', () => push({ closed: true }));
  const next = async (): Promise<Got> => {
    while (queue.length === 0) await new Promise<void>((r) => (wake = r));
    return queue.shift()!;
  };
  let pair: number | null = null; // our end of a direct socket pair the client was given
  try {
    for (const step of steps) {
      if (step.client_sends) {
        const got = await next();
        assert.ok(
          'message' in got && matches(step.client_sends, got.message),
          `expected ${JSON.stringify(step.client_sends)}, got ${JSON.stringify(got)}`,
        );
      } else if (step.client_sends_data !== undefined) {
        let data = Buffer.alloc(0);
        while (data.length < Buffer.byteLength(step.client_sends_data)) {
          const got = await next();
          assert.ok('data' in got, `expected data, got ${JSON.stringify(got)}`);
          data = Buffer.concat([data, got.data]);
        }
        assert.equal(data.toString(), step.client_sends_data);
      } else if (step.client_sends_direct !== undefined) {
        assert.ok(pair !== null, 'client_sends_direct needs a peer_sends with "pair" before it');
        assert.equal((await readToEnd(pair)).toString(), step.client_sends_direct);
        native.close(pair);
        pair = null;
      } else if (step.client_closes) {
        let got = await next();
        while ('message' in got && got.message.op === 'error') got = await next(); // the error was asserted by the step before
        assert.ok('closed' in got, `expected the client to close, got ${JSON.stringify(got)}`);
      } else if (step.peer_sends) {
        const fds: number[] = [];
        if (step.memfd) {
          const fd = native.memfdCreate('conformance');
          fs.writeSync(fd, Buffer.from(step.memfd.text));
          if (step.memfd.sealed) native.sealMemfd(fd);
          fds.push(fd);
        }
        if (step.pair) {
          const [mine, theirs] = native.relayPair(1 << 16); // blocking, as Aeterna's pair is; read here with MSG_DONTWAIT
          fds.push(theirs);
          if (step.pair.text === undefined) pair = mine;
          else {
            native.sendmsg(mine, Buffer.from(step.pair.text), []); // a few bytes: the pair's buffer holds them
            native.close(mine); // the client's end of file
          }
        }
        conn.stream.write(encodeFrame(Buffer.from(JSON.stringify(step.peer_sends))), fds, { closeFds: true });
        for (const part of step.data ?? []) conn.stream.write(encodeFrame(Buffer.from(part)));
      }
    }
  } finally {
    if (pair !== null) native.close(pair);
    conn.close();
  }
}

/** Everything the client writes on its end of a direct pair, until it closes it (polled: the client runs in this event loop). */
async function readToEnd(fd: number): Promise<Buffer> {
  const parts: Buffer[] = [];
  for (;;) {
    const got = native.test.recvmsg(fd, 64 << 10, 0);
    if (got === null) await new Promise((r) => setTimeout(r, 5));
    else if (got.data.length === 0) return Buffer.concat(parts);
    else parts.push(got.data);
  }
}

describe('conformance: exchanges.json', () => {
  for (const c of suite<{ cases: Case[] }>('exchanges.json').cases) {
    it(c.name, { skip: unsupported(c.requires) }, async () => {
      const dir = tempDir('aeterna-conformance-');
      dirs.push(dir);
      const socketPath = path.join(dir, 'state.sock');
      const listenFd = native.listenUnix(socketPath, 4, 0o600);
      const connecting = connect({ path: socketPath, timeoutMs: 10_000 }); // queued in the backlog: accept below finds it
      const peer = playPeer(listenFd, c.steps);
      try {
        let client;
        try {
          client = await connecting;
        } catch (err) {
          assert.ok(err instanceof RelayError, String(err));
          assert.equal(err.code, c.expect.connect?.error, err.message);
          return;
        }
        assert.equal(c.expect.connect, undefined, 'connect should have failed');
        const later: Json[] = [];
        client.onDump((): DumpResult => {
          const d = c.app.dump ?? { none: true };
          if (d.throws) throw new Error('the app cannot dump');
          if (d.text !== undefined) return d.text;
          return (d.json ?? null) as DumpResult;
        });
        if (c.app.on_load) {
          client.onLoad((s) => {
            if (c.app.on_load === 'throws') throw new Error('the app cannot apply it');
            later.push(describeState(s));
          });
        }
        const want = c.expect.load!;
        try {
          const state = await client.load((s) => {
            if (c.app.apply === 'throws') throw new TypeError('the app cannot use it');
            if (c.expect.load_source !== undefined) assert.equal(s.source, c.expect.load_source);
            return describeState(s);
          });
          assert.deepEqual(state, want.state);
        } catch (err) {
          if (err instanceof RelayError) assert.equal(err.code, want.error, err.message);
          else assert.ok(want.app_error && err instanceof TypeError, String(err));
        }
        if (c.app.ready) client.ready();
        if (c.app.checkpoint) {
          const stored = await client.checkpoint(c.app.checkpoint.json as DumpResult).then(
            (seq) => ({ seq }),
            (err: unknown) => {
              assert.ok(err instanceof RelayError, String(err));
              return { error: err.code };
            },
          );
          assert.deepEqual(stored, c.expect.checkpoint);
        }
        await peer;
        assert.deepEqual(later, c.expect.later_loads ?? []);
        client.close();
      } finally {
        await peer.catch(() => undefined);
        native.close(listenFd);
      }
      await peer;
    });
  }
});

describe('conformance: listeners.json', () => {
  // The child places the case's fds at 3, 4, ... (as a process under Aeterna receives them), sets the env with
  // its own pid, and prints what listeners() found and whether each fd is now close-on-exec.
  const child = `
    const fs = require('node:fs');
    const { listeners } = require(${JSON.stringify(path.join(ROOT, 'dist', 'src', 'client'))});
    const c = JSON.parse(process.argv[1]);
    for (const [k, v] of Object.entries(c.env)) process.env[k] = v.replace('$PID', String(process.pid));
    const found = Object.fromEntries(listeners());
    const cloexec = (fd) => (parseInt(/^flags:\\s+(\\d+)/m.exec(fs.readFileSync('/proc/self/fdinfo/' + fd, 'utf8'))[1], 8) & 0o2000000) !== 0;
    console.log(JSON.stringify({ listeners: found, cloexec: Object.values(found).every(cloexec) }));`;
  for (const c of suite<{
    cases: { name: string; env: Record<string, string>; fds: ('socket' | 'file')[]; expect: Json }[];
  }>('listeners.json').cases) {
    it(c.name, () => {
      const fds = c.fds.map((kind) =>
        kind === 'socket' ? native.listenTcp('127.0.0.1', 0, 1).fd : fs.openSync('/dev/null', 'r'),
      );
      const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('LISTEN_')));
      const r = spawnSync(process.execPath, ['-e', child, JSON.stringify(c)], {
        env,
        stdio: ['ignore', 'pipe', 'pipe', ...fds],
        encoding: 'utf8',
      });
      fds.forEach((fd) => native.close(fd));
      assert.equal(r.status, 0, r.stderr);
      const got = JSON.parse(r.stdout) as { listeners: Json; cloexec: boolean };
      assert.deepEqual(got.listeners, c.expect);
      assert.ok(got.cloexec, 'listeners are close-on-exec');
    });
  }
});

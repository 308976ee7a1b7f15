// The Python SDK (clients/python/aeterna_client.py): its unit tests (stdlib
// unittest against a fake Aeterna), then end to end against the real daemon
// with a Python app (test/fixtures/python/stateful_app.py).
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { ROOT, fixture, freePort } from '../helpers/aeterna';
import { Daemon, type ConfigOptions } from '../helpers/daemon';

const PYTHON = 'python3';
const APP = [PYTHON, fixture('python', 'stateful_app.py')];

function pythonUnavailable(): string | null {
  const r = spawnSync(
    PYTHON,
    ['-c', 'import sys; print("%d.%d" % sys.version_info[:2]); sys.exit(0 if sys.version_info >= (3, 9) else 3)'],
    { encoding: 'utf8' },
  );
  if (r.error) return `python3 is not available (${r.error.message})`;
  if (r.status !== 0) return `python3 ${r.stdout.trim()} is older than 3.9 (socket.send_fds/recv_fds, os.memfd_create)`;
  return null;
}
const noPython = pythonUnavailable();

function run(cmd: string, args: string[]): Promise<{ code: number | null; output: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (output += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (output += d));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, output }));
  });
}

interface Session {
  pid: number;
  generation: number;
  history: string[];
}

function request(port: number, method: 'GET' | 'POST', urlPath: string, body?: string): Promise<Session> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        host: '127.0.0.1',
        port,
        method,
        path: urlPath,
        agent: false,
        timeout: 10000,
        headers: body === undefined ? {} : { 'content-length': Buffer.byteLength(body) },
      },
      (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (d: string) => (text += d));
        res.on('end', () => {
          if (res.statusCode !== 200)
            return reject(new Error(`${method} ${urlPath}: status ${res.statusCode}: ${text}`));
          try {
            resolve(JSON.parse(text) as Session);
          } catch (err) {
            reject(err);
          }
        });
        res.on('error', reject);
      },
    );
    req.on('timeout', () => req.destroy(new Error(`${method} ${urlPath}: timeout`)));
    req.on('error', reject);
    req.end(body);
  });
}

const post = (port: number, id: string, message: string): Promise<Session> =>
  request(port, 'POST', `/sessions/${id}/messages`, message);
const get = (port: number, id: string): Promise<Session> => request(port, 'GET', `/sessions/${id}`);

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

async function waitGone(pid: number, timeoutMs = 20000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (alive(pid)) {
    if (Date.now() > deadline) throw new Error(`pid ${pid} did not exit`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe('Python SDK: unit tests (python3 -m unittest)', { skip: noPython ?? false }, () => {
  it(
    'clients/python/test_aeterna_client.py and the conformance suite (test_conformance.py) pass',
    { timeout: 120000 },
    async () => {
      const r = await run(PYTHON, [
        '-m',
        'unittest',
        '-v',
        'clients/python/test_aeterna_client.py',
        'clients/python/test_conformance.py',
      ]);
      assert.equal(r.code, 0, r.output);
      assert.match(r.output, /^OK$/m, r.output);
    },
  );
});

const daemonSide = fs.existsSync(path.join(ROOT, 'dist', 'src', 'srp', 'coordinator.js'));
const e2eSkip = noPython ?? (daemonSide ? false : 'the SRP coordinator (dist/src/srp/) is not built');

describe('Python SDK against the real daemon', { skip: e2eSkip, timeout: 180000 }, () => {
  const daemons: Daemon[] = [];
  after(async () => {
    for (const d of daemons) if (d.run) await d.run.killAll();
  });

  async function started(extra: Partial<ConfigOptions> = {}): Promise<{ d: Daemon; port: number }> {
    const port = await freePort();
    const d = new Daemon({
      command: APP,
      port,
      handoff: true,
      readiness: '{ mode: "notify", timeout: "10s" }',
      ...extra,
    }).start();
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Running');
    return { d, port };
  }

  it('a reload carries the sessions to the new generation (relay ready counts as ready under notify)', async () => {
    const { d, port } = await started();
    const before = await get(port, 'alice');
    assert.equal(before.generation, 1);
    for (const m of ['hello', 'how are you?', 'bye']) await post(port, 'alice', m);
    const r = await d.cli('reload');
    assert.equal(r.code, 0, r.stderr);
    const after = await get(port, 'alice');
    assert.deepEqual(after.history, ['hello', 'how are you?', 'bye']);
    assert.notEqual(after.pid, before.pid);
    assert.equal(after.generation, 2);
    const s = await d.status();
    assert.equal(s.generation, 2);
    assert.equal(s.pid, after.pid);
    assert.equal(s.last_reload?.outcome, 'promoted');
    assert.equal(await d.stop(), 0);
  });

  it('messages posted while the reload runs all reach the new generation (the final sync runs, nothing lost)', async () => {
    const { d, port } = await started();
    const oldPid = (await get(port, 'bob')).pid;
    const sent: string[] = [];
    for (let i = 0; i < 5; i++) {
      const m = `before-${i}`;
      await post(port, 'bob', m);
      sent.push(m);
    }
    // The new generation waits 1.5 s before ready: the old one serves alone after its first dump,
    // so what is posted then reaches the new generation only through the final sync.
    d.write({ ...d.options, env: ['READY_DELAY_MS=1500'] });
    let running = true;
    const failures: string[] = [];
    const writer = (async () => {
      for (let i = 0; running; i++) {
        const m = `during-${i}`;
        try {
          await post(port, 'bob', m);
          sent.push(m);
        } catch (err) {
          failures.push(`${m}: ${(err as Error).message}`);
        }
      }
    })();
    const r = await d.cli('reload');
    running = false;
    await writer;
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(failures, [], 'no POST failed');
    // The old generation exits once its final state is acked (or Aeterna gives up on it).
    await waitGone(oldPid);
    const after = await get(port, 'bob');
    assert.notEqual(after.pid, oldPid);
    assert.equal(after.generation, 2);
    // Around the switch both generations serve, so the order of the last few messages may differ; none may be missing or doubled.
    assert.equal(after.history.length, sent.length, 'as many messages as were acknowledged');
    assert.deepEqual(
      [...after.history].sort(),
      [...sent].sort(),
      'every message acknowledged before `reload` returned is there, once',
    );
    await d.run.waitFor(/^FINAL_SYNC \d+$/m);
    await d.run.waitFor(new RegExp(`^SHUTDOWN ${oldPid} handed_over=True$`, 'm'));
    const first = Number((await d.run.waitFor(new RegExp(`^DUMP ${oldPid} final=False messages=(\\d+)$`, 'm')))[1]);
    const last = Number((await d.run.waitFor(new RegExp(`^DUMP ${oldPid} final=True messages=(\\d+)$`, 'm')))[1]);
    assert.ok(last > first, `the final dump carried messages posted after the first one (${first} -> ${last})`);
    assert.ok(sent.length >= last, `${sent.length} posted in all`);
    assert.equal(await d.stop(), 0);
  });

  it('the memfd transport through the daemon', async () => {
    const { d, port } = await started({ env: ['STATE_MODE=memfd'] });
    for (const m of ['one', 'two']) await post(port, 'carol', m);
    const r = await d.cli('reload');
    assert.equal(r.code, 0, r.stderr);
    const after = await get(port, 'carol');
    assert.deepEqual(after.history, ['one', 'two']);
    assert.equal(after.generation, 2);
    assert.equal(await d.stop(), 0);
  });

  it('a new version that refuses the state rolls back: reload exits 1, the old pid serves with its history', async () => {
    const { d, port } = await started();
    for (const m of ['a', 'b', 'c']) await post(port, 'dave', m);
    const before = await get(port, 'dave');
    d.write({ ...d.options, env: ['NACK=1'] });
    const r = await d.cli('reload');
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /state relay failed/);
    const s = await d.status();
    assert.equal(s.state, 'Running');
    assert.equal(s.pid, before.pid);
    assert.equal(s.generation, 1);
    assert.equal(s.last_reload?.outcome, 'rolled_back');
    const after = await get(port, 'dave');
    assert.equal(after.pid, before.pid);
    assert.deepEqual(after.history, ['a', 'b', 'c']);
    // The relay connection stays open: the next reload (without NACK) still carries the state.
    d.write({ ...d.options, env: [] });
    const again = await d.cli('reload');
    assert.equal(again.code, 0, again.stderr);
    const now = await get(port, 'dave');
    assert.notEqual(now.pid, before.pid);
    assert.deepEqual(now.history, ['a', 'b', 'c']);
    assert.equal(await d.stop(), 0);
  });
});

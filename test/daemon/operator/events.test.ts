// `aeterna events`: every reload (phases and outcome, whoever started it: SIGHUP, a watched file, another CLI), a
// crash and its restart, streamed to each subscriber as text or JSON lines until Aeterna exits; and the limits on
// subscribers (how many, and a subscriber that does not read).
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { CLI, ROOT, fixture, freePort, pidNamespaceUnavailable, tempDir } from '../../helpers/aeterna';
import { Daemon, socketOf } from '../../helpers/daemon';
import { EventHub, MAX_SUBSCRIBERS } from '../../../src/control/events';
import { startControlServer } from '../../../src/control/server';
import { call } from '../../../src/control/client';
import type { ServerMessage } from '../../../src/control/protocol';
import { createLogger } from '../../../src/log';
import type { ControlApi, EventSink, OperatorEvent, StatusReport } from '../../../src/orchestrator/types';

const APP = [process.execPath, fixture('apps', 'reload_app.js')];
const daemons: Daemon[] = [];
const followers: ChildProcess[] = [];
after(async () => {
  for (const f of followers) f.kill('SIGKILL');
  for (const d of daemons) await d.run.killAll();
});

/** `aeterna events [--json]` running beside the daemon, its output collected. */
class Follower {
  out = '';
  readonly exited: Promise<number | null>;
  readonly child: ChildProcess;

  constructor(d: Daemon, json: boolean) {
    const args = [CLI, 'events', '-c', d.configFile, ...(json ? ['--json'] : [])];
    this.child = spawn(process.execPath, args, { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    followers.push(this.child);
    this.child.stdout!.setEncoding('utf8').on('data', (s: string) => (this.out += s));
    this.child.stderr!.setEncoding('utf8').on('data', (s: string) => (this.out += s));
    this.exited = new Promise((resolve) => this.child.on('close', resolve));
  }

  events(): OperatorEvent[] {
    return this.out
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as OperatorEvent);
  }

  async until(predicate: () => boolean, what: string, timeoutMs = 60000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!predicate()) {
      if (Date.now() > deadline) throw new Error(`${what} not seen in time; output:\n${this.out}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

/** Wait until the daemon has `count` event subscribers (it logs each at debug level). */
async function subscribed(d: Daemon, count: number): Promise<void> {
  const deadline = Date.now() + 60000;
  while (d.run.logs().filter((l) => l.msg === 'event subscriber').length < count) {
    if (Date.now() > deadline) throw new Error(`${count} subscribers not seen in time`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Wait until `count` subscribers have gone away. */
async function gone(d: Daemon, count: number): Promise<void> {
  const deadline = Date.now() + 60000;
  while (d.run.logs().filter((l) => l.msg === 'event subscriber gone').length < count) {
    if (Date.now() > deadline) throw new Error(`${count} subscribers gone not seen in time`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function outcomes(f: Follower): Array<[string, string, string]> {
  return f
    .events()
    .filter((e): e is Extract<OperatorEvent, { type: 'outcome' }> => e.type === 'outcome')
    .map((e) => [e.reload, e.trigger, e.record.outcome]);
}

describe('aeterna events', { skip: pidNamespaceUnavailable() ?? false, timeout: 240000 }, () => {
  it('follows a SIGHUP reload, a watch reload, a CLI reload and a crash with its restart, as JSON and as text', async () => {
    const d = new Daemon({
      command: APP,
      port: await freePort(),
      watch: '{ paths: ["app.conf"], debounce: "100ms" }',
      restart: '{ policy: "on-failure" }',
    });
    const watched = path.join(d.dir, 'app.conf');
    fs.writeFileSync(watched, 'v1\n');
    d.start(); // not in a pid namespace: the pid status reports is the one this test kills
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Running', 60000);
    const json = new Follower(d, true);
    const text = new Follower(d, false);
    await subscribed(d, 2);

    await d.run.signal('SIGHUP');
    await json.until(() => outcomes(json).length === 1, 'the SIGHUP reload');
    fs.writeFileSync(watched, 'v2\n');
    await json.until(() => outcomes(json).length === 2, 'the watch reload');
    assert.equal((await d.cli('reload')).code, 0);
    await json.until(() => outcomes(json).length === 3, 'the CLI reload');
    assert.deepEqual(outcomes(json), [
      ['reload-1', 'sighup', 'promoted'],
      ['reload-2', 'watch', 'promoted'],
      ['reload-3', 'control', 'promoted'],
    ]);
    // Every phase of each reload, in order, before its outcome.
    for (const id of ['reload-1', 'reload-2', 'reload-3']) {
      const phases = json
        .events()
        .filter((e) => e.type === 'phase' && e.reload === id)
        .map((e) => (e as { phase: string }).phase);
      assert.deepEqual(phases, ['accepted', 'config', 'spawned', 'ready', 'draining', 'done'], id);
    }

    // A crash of the serving generation, and its restart.
    const serving = await d.waitStatus((s) => s.state === 'Running' && s.pid !== null);
    process.kill(serving.pid!, 'SIGKILL');
    await json.until(() => json.events().some((e) => e.type === 'restart'), 'the restart');
    const crash = json.events().find((e) => e.type === 'crash');
    assert.ok(crash && crash.type === 'crash');
    assert.equal(crash.generation, serving.generation);
    assert.equal(crash.pid, serving.pid);
    assert.deepEqual(crash.exit, { code: null, signal: 'SIGKILL' });
    assert.equal(crash.reason, 'crashed');
    assert.equal(typeof crash.restart_in_ms, 'number');
    const restart = json.events().find((e) => e.type === 'restart');
    assert.ok(restart && restart.type === 'restart');
    assert.equal(restart.generation, serving.generation + 1);

    // The same, as text lines.
    await text.until(() => /generation \d+ \(pid \d+\) started: restart 1/.test(text.out), 'the text restart');
    assert.match(text.out, /reload-1 \(sighup\) promoted in /);
    assert.match(text.out, /reload-2 \(watch\) promoted in /);
    assert.match(text.out, /reload-3 \(control\) spawned generation 4 \(pid \d+\)/);
    assert.match(text.out, /killed by SIGKILL \(crashed\): restarting in /);

    // Aeterna exits: each follower is told, and exits 0.
    await d.run.signal('SIGTERM');
    assert.equal(await json.exited, 0);
    assert.equal(await text.exited, 0);
    assert.match(text.out, /stopping: SIGTERM/);
    assert.match(text.out, /Aeterna exits\n$/);
  });

  it('goes on across an upgrade of Aeterna: the upgrade event, then the next reload', async () => {
    const d = new Daemon({ command: APP, port: await freePort() }).start(true);
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Running', 60000);
    const json = new Follower(d, true);
    await subscribed(d, 1);
    const r = await d.cli('upgrade');
    assert.equal(r.code, 0, r.stderr);
    await json.until(() => json.events().some((e) => e.type === 'upgrade'), 'the upgrade event');
    await d.waitStatus((s) => (s as { reexecs?: number }).reexecs === 1, 60000);
    // The follower connects again to the re-executed Aeterna (it logs the new subscriber), and sees the next reload.
    await subscribed(d, 2);
    assert.equal((await d.cli('reload')).code, 0);
    await json.until(() => outcomes(json).length === 1, 'the reload after the upgrade');
    assert.deepEqual(outcomes(json), [['reload-1', 'control', 'promoted']]);
    assert.equal(json.child.exitCode, null, 'still following');
  });

  it(`refuses subscriber ${MAX_SUBSCRIBERS + 1} while ${MAX_SUBSCRIBERS} follow, and still answers other requests`, async () => {
    const d = new Daemon({ command: APP, port: await freePort() }).start();
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Running', 60000);
    const sockets: net.Socket[] = [];
    for (let i = 0; i < MAX_SUBSCRIBERS; i++) {
      const s = net.createConnection(socketOf(d));
      s.write('{"cmd":"events"}\n');
      sockets.push(s);
    }
    await subscribed(d, MAX_SUBSCRIBERS);
    const extra = new Follower(d, false);
    assert.equal(await extra.exited, 3);
    assert.match(extra.out, /too many event subscribers \(limit 8\)/);
    assert.equal((await d.cli('status')).code, 0, 'other requests are answered');
    // One goes away: a new subscriber is taken.
    sockets.pop()!.destroy();
    await gone(d, 1);
    const next = new Follower(d, true);
    await subscribed(d, MAX_SUBSCRIBERS + 1);
    assert.equal((await d.cli('reload')).code, 0);
    await next.until(() => outcomes(next).length === 1, 'the reload');
    for (const s of sockets) s.destroy();
  });

  it('lets subscribers take at most half of the control connections, so a command still gets through', async () => {
    const dir = tempDir('aeterna-events-');
    const hub = new EventHub(createLogger('silent'));
    const api = {
      status: () => ({ state: 'Running' }) as unknown as StatusReport,
      subscribe: (sink: EventSink) => hub.subscribe(sink),
    } as unknown as ControlApi;
    const server = await startControlServer(path.join(dir, 'c.sock'), api, createLogger('silent'), {
      maxConnections: 4,
    });
    const open = (): Promise<ServerMessage> =>
      new Promise((resolve) => {
        const s = net.createConnection(server.socketPath, () => s.write('{"cmd":"events"}\n'));
        sockets.push(s);
        s.on('data', (d) => resolve(JSON.parse(d.toString().split('\n')[0]) as ServerMessage));
        s.on('error', () => undefined);
      });
    const sockets: net.Socket[] = [];
    try {
      void open();
      void open();
      while (hub.count < 2) await new Promise((r) => setTimeout(r, 20));
      const third = await open();
      assert.equal(third.type, 'error');
      assert.match(
        (third as { message: string }).message,
        /too many event subscribers \(limit 2: half of the control socket's 4 connections\)/,
      );
      const status = await call(server.socketPath, { cmd: 'status' });
      assert.ok('status' in status, 'a command still gets through');
      hub.publish({ type: 'stopping', at: new Date().toISOString(), reason: 'test' });
    } finally {
      for (const s of sockets) s.destroy();
      await server.close();
    }
  });

  it('drops a subscriber that does not read, with a last line saying why, and goes on with the others', () => {
    const hub = new EventHub(createLogger('silent'), 8, 1000);
    const sink = (): EventSink & { lines: string[]; closed: string | null; stalled: boolean } => {
      const s = {
        lines: [] as string[],
        closed: null as string | null,
        stalled: false,
        send: (line: string) => void s.lines.push(line),
        backlog: () => (s.stalled ? s.lines.join('').length : 0),
        close: (line: string) => void (s.closed = line),
      };
      return s;
    };
    const slow = sink();
    const fast = sink();
    slow.stalled = true; // nothing it is sent is ever taken
    hub.subscribe(slow);
    hub.subscribe(fast);
    const event: OperatorEvent = { type: 'stopping', at: new Date().toISOString(), reason: 'x'.repeat(100) };
    for (let i = 0; i < 50; i++) hub.publish(event);
    assert.ok(slow.lines.join('').length <= 1000, 'never more than its bound queued');
    assert.match(
      slow.closed!,
      /"code":"E_CONTROL_UNAVAILABLE".*dropped: more than 1000 bytes of events were left unread/,
    );
    assert.equal(fast.lines.length, 50, 'the reading subscriber got every event');
    assert.equal(hub.count, 1);
  });
});

// A listener an app breaks, by calling shutdown(2) on its inherited socket
// (which is Aeterna's socket too), is noticed and repaired (docs/reliability.md).
// First the kernel facts the repair relies on, then a real daemon as PID 1 with
// an app that shuts its listener down on SIGUSR1. Real sockets; states and counts.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import net from 'node:net';
import path from 'node:path';
import { native } from '../../../src/native/binding';
import { fixture, freePort, pidNamespaceUnavailable, tempDir } from '../../helpers/aeterna';
import { Daemon } from '../../helpers/daemon';
import { getText, metricSample } from '../../helpers/load';

const APP = ['python3', fixture('apps', 'shutdown_listener.py')];
const daemons: Daemon[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
});

type Answer = { pid: number; generation: string } | string;

/** Connect to a TCP port or a unix path and read the app's one line; or the connect error's code (e.g. ECONNREFUSED). */
function knock(target: number | string): Promise<Answer> {
  return new Promise((resolve) => {
    const socket = typeof target === 'number' ? net.connect(target, '127.0.0.1') : net.connect(target);
    let data = '';
    socket.setEncoding('utf8');
    socket.setTimeout(10000, () => socket.destroy(Object.assign(new Error('no answer'), { code: 'ETIMEDOUT' })));
    socket.on('data', (d: string) => {
      data += d;
      if (data.includes('\n')) {
        socket.destroy();
        resolve(JSON.parse(data) as Answer);
      }
    });
    socket.on('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? err.message));
  });
}

/** shutdown(fd, SHUT_RDWR) from another process holding the socket, as an app under Aeterna would. */
function shutDownElsewhere(fd: number): void {
  const r = spawnSync('python3', ['-c', 'import socket; socket.socket(fileno=3).shutdown(socket.SHUT_RDWR)'], {
    stdio: ['ignore', 'ignore', 'inherit', fd],
  });
  assert.equal(r.status, 0);
}

describe('native: what shutdown(2) does to a listener, and listen() again', () => {
  it('a TCP listener goes back to CLOSE on its port; listen() again on the same fd accepts on that port again', async () => {
    const port = await freePort();
    const { fd } = native.listenTcp('127.0.0.1', port, 16);
    try {
      shutDownElsewhere(fd);
      assert.equal(native.isListeningSocket(fd), false);
      assert.equal(await knock(port), 'ECONNREFUSED');
      native.listen(fd, 16);
      assert.equal(native.isListeningSocket(fd), true);
      assert.equal(native.isReadShutdown(fd), false);
      const client = net.connect(port, '127.0.0.1');
      await new Promise<void>((resolve, reject) => client.once('connect', resolve).once('error', reject));
      client.destroy();
    } finally {
      native.close(fd);
    }
  });

  it('a unix listener stays listening (SO_ACCEPTCONN) but is read-shut-down and refuses; listen() again does not revive it', async () => {
    const file = path.join(tempDir(), 'l.sock');
    const fd = native.listenUnix(file, 16, 0o600);
    try {
      assert.equal(native.isReadShutdown(fd), false);
      shutDownElsewhere(fd);
      assert.equal(native.isListeningSocket(fd), true);
      assert.equal(native.isReadShutdown(fd), true);
      assert.equal(await knock(file), 'ECONNREFUSED');
      native.listen(fd, 16);
      assert.equal(native.isReadShutdown(fd), true);
      assert.equal(await knock(file), 'ECONNREFUSED');
    } finally {
      native.close(fd);
    }
  });
});

describe(
  'a listener the app shuts down (shutdown(2) on its inherited socket)',
  { timeout: 120000, skip: pidNamespaceUnavailable() ?? false },
  () => {
    it('tcp: a reload after it is promoted and the port accepts again, served by the new generation', async () => {
      const port = await freePort();
      const d = new Daemon({ command: APP, port }).start(true);
      daemons.push(d);
      await d.waitStatus((s) => s.state === 'Running');
      assert.deepEqual(await knock(port), { pid: (await d.status()).pid, generation: '1' });
      await d.run.signal('SIGUSR1'); // forwarded to the app
      await d.run.waitFor(/SHUTDOWN \d+/);
      assert.equal((await d.cli('reload')).code, 0);
      const s = await d.status();
      assert.equal(s.last_reload?.outcome, 'promoted');
      assert.deepEqual(await knock(port), { pid: s.pid, generation: '2' });
      const repairs = d.run.logs().filter((l) => l.listener === 'http' && l.result !== undefined);
      assert.deepEqual(
        repairs.map((l) => [l.problem, l.result]),
        [['not-listening', 'relistened']],
      );
      assert.equal(await d.stop(), 0);
    });

    it('tcp: /healthz notices it and it is listened again on the same socket without a reload; the serving generation accepts again; counted once', async () => {
      const port = await freePort();
      const metricsPort = await freePort();
      const d = new Daemon({ command: APP, port, metricsPort }).start(true);
      daemons.push(d);
      await d.waitStatus((s) => s.state === 'Running');
      const before = await knock(port);
      assert.equal(typeof before, 'object');
      await d.run.signal('SIGUSR1');
      await d.run.waitFor(/SHUTDOWN \d+/);
      // The probe checks the listeners and repairs this one in place (unless the periodic check was first).
      assert.deepEqual(await getText(metricsPort, '/healthz'), { status: 200, body: 'ok\n' });
      assert.deepEqual(await knock(port), before, 'the same process of generation 1 answers: its socket listens again');
      const metrics = (await getText(metricsPort, '/metrics')).body;
      assert.equal(metricSample(metrics, 'aeterna_listener_repairs_total{listener="http",result="relistened"}'), 1);
      assert.equal(metricSample(metrics, 'aeterna_listener_repairs_total{listener="http",result="failed"}'), null);
      const s = await d.status();
      assert.equal(s.last_reload, null, 'no reload ran');
      assert.equal(s.generation, 1);
      assert.equal(await d.stop(), 0);
    });

    it('unix: /healthz and /readyz are 503 naming it while it refuses; a reload binds a new socket at the same path for the new generation; counted failed once, then rebound', async () => {
      const metricsPort = await freePort();
      const d = new Daemon({ command: APP, metricsPort });
      const file = path.join(d.dir, 'app.sock');
      d.write({ ...d.options, extraService: `  listeners:\n    - name: "sock"\n      address: "unix://${file}"\n` });
      d.start(true);
      daemons.push(d);
      await d.waitStatus((s) => s.state === 'Running');
      assert.deepEqual(await knock(file), { pid: (await d.status()).pid, generation: '1' });
      await d.run.signal('SIGUSR1');
      await d.run.waitFor(/SHUTDOWN \d+/);
      assert.equal(await knock(file), 'ECONNREFUSED');
      for (const probe of ['/healthz', '/readyz', '/healthz']) {
        const { status, body } = await getText(metricsPort, probe);
        assert.equal(status, 503, probe);
        assert.match(body, new RegExp(`^listener "sock" \\(unix://${file}\\): shut-down, not repaired: `, 'm'), probe);
      }
      assert.equal((await d.cli('reload')).code, 0);
      const s = await d.status();
      assert.deepEqual(await knock(file), { pid: s.pid, generation: '2' });
      assert.deepEqual(await getText(metricsPort, '/healthz'), { status: 200, body: 'ok\n' });
      assert.equal((await getText(metricsPort, '/readyz')).status, 200);
      const metrics = (await getText(metricsPort, '/metrics')).body;
      assert.equal(
        metricSample(metrics, 'aeterna_listener_repairs_total{listener="sock",result="failed"}'),
        1,
        'once, however often it was checked',
      );
      assert.equal(metricSample(metrics, 'aeterna_listener_repairs_total{listener="sock",result="rebound"}'), 1);
      assert.equal(await d.stop(), 0);
    });
  },
);

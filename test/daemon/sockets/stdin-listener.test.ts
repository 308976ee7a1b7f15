// service.stdin_listener: a listener also placed at the app's fd 0, as systemd's
// StandardInput=socket does for inetd-style programs (Java's System.inheritedChannel()).
// A real daemon as PID 1 and a python app that inspects fd 0 and fd 3 and serves on fd 0.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { fixture, freePort, pidNamespaceUnavailable } from '../../helpers/aeterna';
import { Daemon } from '../../helpers/daemon';

const daemons: Daemon[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
});

/** Connect and read the app's one line. */
function knock(port: number): Promise<{ pid: number; generation: string }> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1');
    let data = '';
    socket.setEncoding('utf8');
    socket.setTimeout(10000, () => socket.destroy(new Error('no answer')));
    socket.on('data', (d: string) => {
      data += d;
      if (data.includes('\n')) {
        socket.destroy();
        resolve(JSON.parse(data) as { pid: number; generation: string });
      }
    });
    socket.on('error', reject);
  });
}

describe('service.stdin_listener', { timeout: 60000, skip: pidNamespaceUnavailable() ?? false }, () => {
  it('the app finds the listening socket at fd 0 and the same socket at fd 3 with LISTEN_*; it accepts on fd 0, in each generation', async () => {
    const port = await freePort();
    const d = new Daemon({
      command: ['python3', fixture('apps', 'stdin_listener.py')],
      port,
      extraService: '  stdin_listener: "http"\n',
    }).start(true);
    daemons.push(d);
    await d.waitStatus((s) => s.state === 'Running');
    const report = JSON.parse((await d.run.waitFor(/^REPORT (.*)$/m))[1]) as unknown;
    assert.deepEqual(report, {
      fd0_family: 'AF_INET',
      fd0_listening: true,
      fd0_port: port,
      same_socket: true,
      listen_fds: '1',
      listen_fdnames: 'http',
    });
    assert.deepEqual(await knock(port), { pid: (await d.status()).pid, generation: '1' });
    assert.equal((await d.cli('reload')).code, 0);
    const s = await d.status();
    assert.equal(s.last_reload?.outcome, 'promoted');
    assert.equal(d.run.stdout.match(/^REPORT /gm)?.length, 2);
    assert.deepEqual(await knock(port), { pid: s.pid, generation: '2' });
    assert.equal(await d.stop(), 0);
  });
});

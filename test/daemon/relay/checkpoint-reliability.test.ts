// Checkpoints under abuse, end to end: a real daemon and a real app on the raw
// protocol (test/fixtures/apps/checkpoint_flood.js). Pipelined floods stay
// bounded in fds and memfds and lose nothing; a write that does not fit the
// disk never replaces the file; a checkpoint the app cannot load is set aside;
// a FIFO or a foreign file at the checkpoint path (or a FIFO as the config) is
// refused without blocking and never touched.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { CLI, ROOT, descendantsOf, fixture, tempDir } from '../../helpers/aeterna';
import { Daemon } from '../../helpers/daemon';
import { getText, metricSample } from '../../helpers/load';
import { freePort } from '../../helpers/aeterna';

const APP = [process.execPath, fixture('apps', 'checkpoint_flood.js')];
const daemons: Daemon[] = [];
const mounts: string[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
  for (const m of mounts) {
    try {
      execFileSync('umount', ['-l', m]);
    } catch {
      // already gone
    }
  }
});

/** A daemon running checkpoint_flood.js with `checkpoint` (flow map) and `env`; waits until it serves. */
async function started(
  env: string[],
  checkpoint: string,
  options: { metricsPort?: number; dir?: string } = {},
): Promise<Daemon> {
  const d = new Daemon({
    command: APP,
    env,
    metricsPort: options.metricsPort,
    readiness: '{ mode: "notify", timeout: "60s" }',
    stopTimeout: '5s',
    restart: '{ policy: "always", max_restarts: 10, window: "60s" }',
  });
  d.write({
    ...d.options,
    handoff: `{ enabled: true, socket_path: "${d.dir}/state.sock", timeout: "60s", checkpoint: ${checkpoint} }`,
  });
  d.start();
  daemons.push(d);
  await d.waitStatus((s) => s.state === 'Running', 60000);
  return d;
}

/** The serving app's pid (Aeterna's only descendant). */
function appPid(aeterna: number): number {
  const app = descendantsOf(aeterna);
  assert.equal(app.length, 1);
  return app[0];
}

type Answers = { count: number; seqs: number[]; stored: number; inOrder: boolean; codes: Record<string, number> };

/** Send one burst (SIGUSR1) and wait for the `nth` ANSWERS line the app prints. */
async function burst(d: Daemon, nth: number, timeoutMs = 240000): Promise<Answers> {
  process.kill(appPid(await d.run.aeternaPid()), 'SIGUSR1');
  const re = new RegExp(`(?:^ANSWERS .*$\\n?(?:[\\s\\S]*?)){${nth - 1}}^ANSWERS (.*)$`, 'm');
  const m = await d.run.waitFor(re, timeoutMs);
  return JSON.parse(m[1]) as Answers;
}

/** The fields of Aeterna's checkpoint file (src/srp/checkpoint-file.ts). */
function readFileHeader(file: string): { seq: number; size: number; number: number } {
  const b = fs.readFileSync(file);
  assert.equal(b.subarray(0, 8).toString(), 'AETCKPT\n');
  const encodingLength = b.readUInt16BE(68);
  const data = b.subarray(70 + encodingLength);
  assert.equal(data.length, Number(b.readBigUInt64BE(12)), 'the file holds the bytes its header announces');
  assert.ok(
    crypto.createHash('sha256').update(data).digest().equals(b.subarray(20, 52)),
    'the data matches its sha256',
  );
  return {
    seq: Number(b.readBigUInt64BE(52)),
    size: data.length,
    number: data.length >= 8 ? Number(data.readBigUInt64BE(0)) : -1,
  };
}

/** A checkpoint file as Aeterna writes it, with any header values (a valid sha256). */
function craftFile(file: string, o: { seq: bigint; encoding: string; data: Buffer }): void {
  const encoding = Buffer.from(o.encoding);
  const h = Buffer.alloc(70 + encoding.length);
  h.write('AETCKPT\n', 0);
  h.writeUInt32BE(1, 8);
  h.writeBigUInt64BE(BigInt(o.data.length), 12);
  crypto.createHash('sha256').update(o.data).digest().copy(h, 20);
  h.writeBigUInt64BE(o.seq, 52);
  h.writeBigUInt64BE(BigInt(Date.now()), 60);
  h.writeUInt16BE(encoding.length, 68);
  encoding.copy(h, 70);
  fs.writeFileSync(file, Buffer.concat([h, o.data]));
}

/** Fds Aeterna holds, and how many of them are checkpoint memfds. */
function fdsOf(pid: number): { fds: number; memfds: number } {
  let fds = 0;
  let memfds = 0;
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    fds++;
    try {
      if (fs.readlinkSync(`/proc/${pid}/fd/${fd}`).startsWith('/memfd:aeterna-checkpoint')) memfds++;
    } catch {
      // closed meanwhile
    }
  }
  return { fds, memfds };
}

/** Sample fdsOf(pid) until `until` settles; returns the peaks seen. */
async function sampling<T>(
  pid: number,
  until: Promise<T>,
): Promise<{ result: T; peakFds: number; peakMemfds: number }> {
  let done = false;
  let peakFds = 0;
  let peakMemfds = 0;
  const watcher = (async () => {
    while (!done) {
      try {
        const n = fdsOf(pid);
        peakFds = Math.max(peakFds, n.fds);
        peakMemfds = Math.max(peakMemfds, n.memfds);
      } catch {
        // the process went away: the test's own assertions say why
      }
      await new Promise((r) => setTimeout(r, 5));
    }
  })();
  try {
    return { result: await until, peakFds, peakMemfds };
  } finally {
    done = true;
    await watcher;
  }
}

/** Run `aeterna <args>`; null when it did not exit within `ms` (it is then killed). */
function cliWithin(
  args: string[],
  ms: number,
): Promise<{ code: number | null; stdout: string; stderr: string } | null> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CLI, ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
    child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      resolve(null);
    }, ms);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

/** Wait for the run to exit, or null after `ms`. */
async function exitWithin(d: Daemon, ms: number): Promise<number | null | 'running'> {
  let timer: NodeJS.Timeout | undefined;
  const r = await Promise.race([
    d.run.exit().then((e) => e.code),
    new Promise<'running'>((res) => (timer = setTimeout(() => res('running'), ms))),
  ]);
  clearTimeout(timer);
  return r;
}

describe('checkpoint reliability', { timeout: 600000 }, () => {
  it('10,000 pipelined durable checkpoints under a 256-fd limit: all answered in order, the file holds the last, Aeterna holds a bounded number of fds', async (t) => {
    const d = await started(['FLOOD_COUNT=10000', 'FLOOD_SIZE=64'], '{ enabled: true, path: "checkpoint.bin" }');
    const aeterna = await d.run.aeternaPid();
    const before = fdsOf(aeterna).fds;
    // A limit far below the checkpoints in flight: one fd per waiting checkpoint would run out.
    execFileSync('prlimit', ['--pid', String(aeterna), '--nofile=256:256']);
    const { result, peakFds, peakMemfds } = await sampling(aeterna, burst(d, 1));
    t.diagnostic(
      `Aeterna's fds: ${before} at rest, peak ${peakFds} (memfds ${peakMemfds}) during 10,000 pipelined durable checkpoints`,
    );
    assert.deepEqual(result, { count: 10000, codes: {}, inOrder: true, seqs: [1, 10000], stored: 10000 });
    assert.ok(!d.run.stdout.includes('RELAY CLOSED'), 'the relay connection stayed open');
    const file = readFileHeader(`${d.dir}/checkpoint.bin`);
    assert.equal(file.seq, 10000, 'the file holds the latest acknowledged checkpoint');
    assert.equal(file.number, 10000);
    assert.ok(peakFds < before + 40, `Aeterna's fds peaked at ${peakFds} (${before} at rest)`);
    assert.equal(await d.stop(), 0);
  });

  it('100 pipelined 4 MiB durable checkpoints: at most 3 checkpoint memfds held at once, all answered, the last one on disk', async (t) => {
    const d = await started(
      ['FLOOD_COUNT=100', `FLOOD_SIZE=${4 << 20}`],
      '{ enabled: true, path: "checkpoint.bin", max_size: "8MiB" }',
    );
    const aeterna = await d.run.aeternaPid();
    const { result, peakFds, peakMemfds } = await sampling(aeterna, burst(d, 1));
    t.diagnostic(
      `peak: ${peakFds} fds, ${peakMemfds} checkpoint memfds (${peakMemfds * 4} MiB of shared memory) during 100 pipelined 4 MiB checkpoints`,
    );
    assert.deepEqual(result, { count: 100, codes: {}, inOrder: true, seqs: [1, 100], stored: 100 });
    // The latest, the one being written, the one being received.
    assert.ok(peakMemfds <= 3, `Aeterna held ${peakMemfds} checkpoint memfds at once`);
    const file = readFileHeader(`${d.dir}/checkpoint.bin`);
    assert.deepEqual([file.seq, file.size, file.number], [100, 4 << 20, 100]);
    assert.equal(await d.stop(), 0);
  });

  it('a durable checkpoint that does not fit the disk (1 MiB tmpfs) is answered write_failed and never replaces the previous file', async (t) => {
    const disk = tempDir('aeterna-tmpfs-');
    try {
      execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', disk]);
    } catch (err) {
      t.skip(`cannot mount a tmpfs here: ${(err as Error).message}`);
      return;
    }
    mounts.push(disk);
    const file = path.join(disk, 'checkpoint.bin');
    const d = await started(['FLOOD_COUNT=1', 'FLOOD_SIZE=600000'], `{ enabled: true, path: "${file}" }`);
    assert.deepEqual(await burst(d, 1), { count: 1, codes: {}, inOrder: true, seqs: [1, 1], stored: 1 });
    const second = await burst(d, 2);
    assert.deepEqual(
      second,
      { count: 1, codes: { write_failed: 1 }, inOrder: true, seqs: [], stored: 0 },
      'the second does not fit: refused',
    );
    assert.deepEqual(fs.readdirSync(disk), ['checkpoint.bin'], 'no temporary file is left behind');
    assert.deepEqual(
      [readFileHeader(file).seq, readFileHeader(file).size, readFileHeader(file).number],
      [1, 600000, 1],
      'the file still holds checkpoint 1 whole',
    );
    assert.equal(await d.stop(), 0);
    // A new start loads it.
    d.start();
    await d.waitStatus((s) => s.state === 'Running', 60000);
    const load = JSON.parse((await d.run.waitFor(/^LOAD (.*)$/m))[1]) as {
      size: number;
      source?: string;
      seq?: number;
    };
    assert.deepEqual([load.size, load.source, load.seq], [600000, 'checkpoint', 1]);
    assert.equal(await d.stop(), 0);
    execFileSync('umount', [disk]);
    mounts.splice(mounts.indexOf(disk), 1);
  });

  for (const how of ['the app refuses (ack ok:false)', 'after which the app dies before it is ready'] as const) {
    it(`a checkpoint ${how} is set aside after 2 tries (E_CHECKPOINT_REFUSED, metric, <path>.refused) and the app starts fresh, also at the next start`, async () => {
      const metricsPort = await freePort();
      const env = [
        'FLOOD_COUNT=1',
        'FLOOD_SIZE=64',
        how.includes('refuses') ? 'REFUSE_CHECKPOINT=1' : 'CRASH_ON_CHECKPOINT=1',
      ];
      const d = await started(env, '{ enabled: true, path: "checkpoint.bin" }', { metricsPort });
      assert.equal((await burst(d, 1)).stored, 1);
      const aeterna = await d.run.aeternaPid();
      process.kill(appPid(aeterna), 'SIGKILL');
      // Generations 2 and 3 get checkpoint 1 and fail with it; generation 4 starts without it and serves.
      const s = await d.waitStatus((st) => st.state === 'Running' && st.generation >= 4, 120000);
      assert.equal(s.generation, 4);
      const offered = d.run.logs().filter((l) => l.msg === 'checkpoint: offered as the initial load');
      assert.equal(offered.length, 2, 'offered twice, then never again');
      const aside = d.run.logs().filter((l) => l.code === 'E_CHECKPOINT_REFUSED');
      assert.equal(aside.length, 1);
      assert.equal(aside[0].seq, 1);
      assert.ok(
        fs.existsSync(`${d.dir}/checkpoint.bin.refused`) && !fs.existsSync(`${d.dir}/checkpoint.bin`),
        'its file is set aside',
      );
      assert.equal((JSON.parse((await d.cli('status', '--json')).stdout) as { checkpoint: unknown }).checkpoint, null);
      const metrics = (await getText(metricsPort, '/metrics')).body;
      assert.equal(metricSample(metrics, 'aeterna_checkpoints_total{result="set_aside"}'), 1);
      assert.equal(await d.stop(), 0);
      // The next start offers nothing.
      d.start();
      await d.waitStatus((st) => st.state === 'Running', 60000);
      assert.equal(d.run.logs().filter((l) => l.msg === 'checkpoint: offered as the initial load').length, 0);
      const load = JSON.parse((await d.run.waitFor(/^LOAD (.*)$/m))[1]) as { size: number; source?: string };
      assert.deepEqual([load.size, load.source], [0, undefined]);
      // A new checkpoint is stored as usual.
      assert.deepEqual((await burst(d, 1)).stored, 1);
      assert.equal(await d.stop(), 0);
    });
  }

  it('a checkpoint file with a header the protocol forbids (300-character encoding, seq above 2^53), or above max_size, is not offered at start', async () => {
    const d = new Daemon({ command: APP, readiness: '{ mode: "notify", timeout: "60s" }', stopTimeout: '5s' });
    d.write({
      ...d.options,
      handoff: `{ enabled: true, socket_path: "${d.dir}/state.sock", timeout: "60s", checkpoint: { enabled: true, path: "checkpoint.bin", max_size: "1KiB" } }`,
    });
    daemons.push(d);
    const file = `${d.dir}/checkpoint.bin`;
    const variants: Array<[string, { seq: bigint; encoding: string; data: Buffer }]> = [
      ['a 300-character encoding', { seq: 1n, encoding: 'x'.repeat(300), data: Buffer.from('{}') }],
      ['seq 2^53 + 1', { seq: 2n ** 53n + 1n, encoding: 'json', data: Buffer.from('{}') }],
      ['2 KiB of data with max_size 1KiB', { seq: 1n, encoding: 'json', data: Buffer.alloc(2048, 0x20) }],
    ];
    for (const [what, header] of variants) {
      craftFile(file, header);
      fs.rmSync(`${file}.corrupt`, { force: true });
      d.start();
      await d.waitStatus((s) => s.state === 'Running', 60000);
      const load = JSON.parse((await d.run.waitFor(/^LOAD (.*)$/m))[1]) as { size: number; source?: string };
      assert.deepEqual([load.size, load.source], [0, undefined], `${what}: not offered`);
      assert.ok(
        d.run.logs().some((l) => l.code === 'E_CHECKPOINT_CORRUPT' && String(l.msg).includes(file)),
        `${what}: logged`,
      );
      assert.equal(await d.stop(), 0);
    }
  });

  it('a FIFO as the checkpoint path: aeterna start exits 78 at once naming it, the FIFO untouched', async () => {
    const d = new Daemon({ command: APP, readiness: '{ mode: "notify", timeout: "60s" }' });
    d.write({
      ...d.options,
      handoff: `{ enabled: true, socket_path: "${d.dir}/state.sock", checkpoint: { enabled: true, path: "checkpoint.fifo" } }`,
    });
    execFileSync('mkfifo', [`${d.dir}/checkpoint.fifo`]);
    d.start();
    daemons.push(d);
    assert.equal(await exitWithin(d, 60000), 78, 'aeterna start refused the FIFO (it did not block on it)');
    assert.match(d.run.stderr, /checkpoint\.fifo is a FIFO, not a regular file/);
    assert.ok(fs.statSync(`${d.dir}/checkpoint.fifo`).isFIFO());
  });

  it('SIGTERM during a 256 MiB durable write: Aeterna exits and leaves no temporary file', async () => {
    const d = await started(['FLOOD_COUNT=1', `FLOOD_SIZE=${256 << 20}`], '{ enabled: true, path: "checkpoint.bin" }');
    process.kill(appPid(await d.run.aeternaPid()), 'SIGUSR1');
    const temp = (): string[] => fs.readdirSync(d.dir).filter((f) => f.endsWith('.tmp'));
    const deadline = Date.now() + 120000;
    while (temp().length === 0) {
      assert.ok(Date.now() < deadline, 'the durable write started');
      await new Promise((r) => setImmediate(r));
    }
    await d.run.signal('SIGTERM');
    await d.run.exit();
    assert.deepEqual(temp(), [], 'no temporary file left');
  });

  it('temporary files left by an Aeterna killed mid-write are removed at the next start; a file of that name Aeterna did not write is left alone', async () => {
    const d = new Daemon({
      command: APP,
      env: ['FLOOD_COUNT=1', 'FLOOD_SIZE=64'],
      readiness: '{ mode: "notify", timeout: "60s" }',
      stopTimeout: '5s',
    });
    d.write({
      ...d.options,
      handoff: `{ enabled: true, socket_path: "${d.dir}/state.sock", timeout: "60s", checkpoint: { enabled: true, path: "checkpoint.bin" } }`,
    });
    daemons.push(d);
    fs.writeFileSync(`${d.dir}/.checkpoint.bin.1.1.tmp`, 'AETCKPT\n(cut short)');
    fs.writeFileSync(`${d.dir}/.checkpoint.bin.1.2.tmp`, '');
    fs.writeFileSync(`${d.dir}/.checkpoint.bin.1.3.tmp`, 'not a checkpoint');
    d.start();
    await d.waitStatus((s) => s.state === 'Running', 60000);
    assert.deepEqual(
      fs.readdirSync(d.dir).filter((f) => f.endsWith('.tmp')),
      ['.checkpoint.bin.1.3.tmp'],
    );
    assert.equal((await burst(d, 1)).stored, 1);
    assert.equal(readFileHeader(`${d.dir}/checkpoint.bin`).seq, 1);
    assert.equal(await d.stop(), 0);
  });

  it('checkpoint.path naming a file Aeterna did not write (the config itself): start refused (78) with the reason, the file untouched', async () => {
    const d = new Daemon({ command: APP, readiness: '{ mode: "notify", timeout: "60s" }' });
    d.write({
      ...d.options,
      handoff: `{ enabled: true, socket_path: "${d.dir}/state.sock", checkpoint: { enabled: true, path: "aeterna.yaml" } }`,
    });
    const config = fs.readFileSync(d.configFile);
    d.start();
    daemons.push(d);
    assert.equal(await exitWithin(d, 60000), 78);
    assert.match(
      d.run.stderr,
      /aeterna\.yaml is not a checkpoint file[^\n]*never renames or replaces a file it did not write/,
    );
    assert.ok(fs.readFileSync(d.configFile).equals(config), 'the config is untouched');
    assert.ok(!fs.existsSync(`${d.configFile}.corrupt`));
  });

  it('a file of someone else appearing at checkpoint.path while Aeterna runs is never replaced: the checkpoint is answered write_failed', async () => {
    const d = await started(['FLOOD_COUNT=1', 'FLOOD_SIZE=64'], '{ enabled: true, path: "checkpoint.bin" }');
    fs.writeFileSync(`${d.dir}/checkpoint.bin`, 'not yours\n');
    assert.deepEqual(await burst(d, 1), { count: 1, codes: { write_failed: 1 }, inOrder: true, seqs: [], stored: 0 });
    assert.equal(fs.readFileSync(`${d.dir}/checkpoint.bin`, 'utf8'), 'not yours\n');
    assert.deepEqual(
      fs.readdirSync(d.dir).filter((f) => f.endsWith('.tmp')),
      [],
    );
    assert.equal(await d.stop(), 0);
  });

  it('a FIFO as the config file: validate and status refuse it at once; a config replaced by a FIFO then SIGHUP leaves Aeterna answering and stoppable', async () => {
    const dir = tempDir('aeterna-fifo-');
    const fifo = path.join(dir, 'aeterna.yaml');
    execFileSync('mkfifo', [fifo]);
    for (const cmd of ['validate', 'status']) {
      const r = await cliWithin([cmd, '-c', fifo], 60000);
      assert.ok(r !== null, `aeterna ${cmd} did not block on the FIFO`);
      assert.notEqual(r.code, 0);
      assert.match(r.stderr + r.stdout, /a FIFO, not a regular file/, cmd);
    }
    const start = await cliWithin(['start', '-c', fifo], 60000);
    assert.ok(start !== null, 'aeterna start did not block on the FIFO');
    assert.equal(start.code, 78);

    const d = await started([], '{ enabled: true }');
    fs.rmSync(d.configFile);
    execFileSync('mkfifo', [d.configFile]);
    await d.run.signal('SIGHUP');
    await d.run.waitFor(/a FIFO, not a regular file/, 60000);
    const status = await statusWithin(d);
    assert.equal(status, 'Running', 'status answers after the SIGHUP');
    await d.run.signal('SIGTERM');
    assert.equal(await exitWithin(d, 60000), 0, 'SIGTERM stops it');
  });
});

/** The daemon's state, asked over its control socket path (the config is a FIFO now: the CLI is given the socket). */
async function statusWithin(d: Daemon): Promise<string | null> {
  const { call } = await import('../../../src/control/client');
  let timer: NodeJS.Timeout | undefined;
  const r = await Promise.race([
    call(path.join(d.dir, 'control.sock'), { cmd: 'status' }),
    new Promise<null>((res) => (timer = setTimeout(() => res(null), 60000))),
  ]);
  clearTimeout(timer); // else it keeps this test file's process alive for its minute
  return r && 'status' in r ? r.status.state : null;
}

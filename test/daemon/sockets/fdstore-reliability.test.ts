// The fd store and readiness under an app that pushes them: the fd store against Aeterna's own fd limit,
// distinct fds that share an inode, floods of datagrams (counted in log lines, never timed), and a READY=1
// that comes before the app serves under readiness modes delay and exec. Aeterna runs as PID 1, the app is
// fixtures/apps/fdstore_hostile_app.py (stdlib Python, sd_notify over one datagram socket).
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { fixture, freePort, pidNamespaceUnavailable, runAeterna, type LogLine, tempDir } from '../../helpers/aeterna';
import { Daemon, statusOf, type ConfigOptions } from '../../helpers/daemon';
import { getText } from '../../helpers/load';
import { NotifySocket } from '../../../src/resources/notify';
import { fdCountAtRest } from '../../../bench/soak';

const skip = pidNamespaceUnavailable();
if (skip) console.log(`# skipping fd store reliability tests: ${skip}`);

const APP = fixture('apps', 'fdstore_hostile_app.py');

const daemons: Daemon[] = [];
after(async () => {
  for (const d of daemons) await d.run.killAll();
});

interface Start {
  plan: Record<string, string[]>;
  service?: string;
  readiness?: string;
  metricsPort?: number;
  env?: string[];
  /** Run Aeterna with this soft and hard RLIMIT_NOFILE. */
  nofile?: number;
  /** Run Aeterna through this command (e.g. under a seccomp filter). */
  prefix?: string[];
  /** Wait for this state before returning (default Running). */
  state?: string | null;
}

async function started(o: Start): Promise<Daemon> {
  const options: ConfigOptions = {
    command: ['python3', APP],
    port: await freePort(),
    env: [`APP_PLAN=${JSON.stringify(o.plan)}`, ...(o.env ?? [])],
    // STATUS= is logged while Aeterna waits for readiness: the plans send theirs before READY=1.
    readiness: o.readiness ?? '{ mode: "notify", timeout: "150s" }',
    stopTimeout: '2s',
    extraService: o.service ?? '',
    ...(o.metricsPort === undefined ? {} : { metricsPort: o.metricsPort }),
  };
  const d = new Daemon(options);
  daemons.push(d);
  const prefix = [
    ...(o.nofile === undefined ? [] : ['prlimit', `--nofile=${o.nofile}:${o.nofile}`, '--']),
    ...(o.prefix ?? []),
  ];
  d.run = runAeterna(['start', '-c', d.configFile], { pid1: true, prefix });
  if (o.state !== null) await d.waitStatus((s) => s.state === (o.state ?? 'Running'), 180000);
  return d;
}

const lines = (d: Daemon, pattern: RegExp): LogLine[] => d.run.logs().filter((l) => pattern.test(l.msg));

/** Wait until Aeterna has logged a line whose message matches (a hang guard, not a timing assertion). */
async function waitLogged(d: Daemon, pattern: RegExp, timeoutMs = 60000): Promise<LogLine> {
  for (const deadline = Date.now() + timeoutMs; ;) {
    const found = lines(d, pattern);
    if (found.length > 0) return found[0];
    if (Date.now() > deadline || d.run.child.exitCode !== null)
      throw new Error(`no log line matched ${pattern}\n${d.run.stderr.slice(-4000)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Aeterna has read every datagram the app sent before STATUS=`text` (one socket: the kernel keeps their order). */
async function read(d: Daemon, text: string): Promise<void> {
  for (const deadline = Date.now() + 120000; !d.run.logs().some((l) => l.msg === 'app status' && l.status === text);) {
    if (Date.now() > deadline || d.run.child.exitCode !== null)
      throw new Error(`STATUS=${text} was not read\n${d.run.stderr.slice(-4000)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** CPU time Aeterna used since its start, in clock ticks (printed for comparison; never asserted). */
function cpuTicks(pid: number): number {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return Number(fields[11]) + Number(fields[12]);
}

describe('fd store within the fd limit', { skip: skip ?? false, timeout: 180000 }, () => {
  it('fdstore_max 4096 with RLIMIT_NOFILE 256: the store keeps what the fd budget allows, refuses the rest naming the limit, and status, /healthz and the control socket keep working', async () => {
    const metricsPort = await freePort();
    const d = await started({
      plan: { '1': ['store mem 230', 'status stored', 'ready'], '*': ['ready'] },
      service: '  fdstore_max: 4096\n',
      metricsPort,
      nofile: 256,
    });
    // Reported at start, naming both numbers.
    const warning = await waitLogged(
      d,
      /^fd store: service\.fdstore_max 4096 does not fit Aeterna's fd limit \(RLIMIT_NOFILE 256\)/,
    );
    const room = warning.effective_fdstore_max as number;
    assert.ok(room > 0 && room < 230, `room for ${room} stored fds`);
    await read(d, 'stored');
    const status = await statusOf(d);
    assert.equal(status.fdstore.length, room, 'the store holds what the budget allows');
    assert.ok(
      lines(
        d,
        new RegExp(
          `^fd store: refused 1 fd\\(s\\) named "mem" from pid \\d+: the fd limit leaves room for ${room} stored fd\\(s\\) \\(service\\.fdstore_max 4096, RLIMIT_NOFILE 256\\)`,
        ),
      ).length >= 1,
    );
    const health = await getText(metricsPort, '/healthz');
    assert.equal(health.status, 200);
    assert.equal((await d.cli('status')).code, 0);
    assert.equal(lines(d, /accept failed/).length, 0, 'Aeterna never ran out of fds');
    assert.equal(lines(d, /without fds|dropped the fds/).length, 0, 'no fds were lost to a full fd table');
    assert.ok((await fdCountAtRest(await d.run.aeternaPid())) < 256 - 16, 'fds stay free');
    // The stored ones come back to the next generation.
    const reload = await d.cli('reload');
    assert.equal(reload.code, 0, reload.stdout + reload.stderr);
    assert.equal((await statusOf(d)).fdstore.length, room);
  });
});

describe(
  'fd store identity (as systemd: one entry per open file description)',
  { skip: skip ?? false, timeout: 120000 },
  () => {
    const kernels: Array<[string, string[]]> = [
      ['', []],
      // A container's default seccomp profile refuses kcmp without CAP_SYS_PTRACE: the store groups by inode instead.
      [' (kcmp refused by seccomp)', ['python3', fixture('no_kcmp.py')]],
    ];
    for (const [where, prefix] of kernels)
      it(`distinct fds that share an inode are all kept (two eventfds, both pipe ends, two opens of one file); the same description sent twice is one entry${where}`, async () => {
        const d = await started({
          plan: { '1': ['distinct', 'status distinct', 'ready'], '*': ['ready'] },
          service: '  fdstore_max: 32\n',
          prefix,
        });
        await read(d, 'distinct');
        assert.deepEqual((await statusOf(d)).fdstore, [
          'eventfd1',
          'eventfd2',
          'piperead',
          'pipewrite',
          'open1',
          'open2',
          'memfdtwice',
        ]);
        assert.equal(
          lines(d, /\(1 already stored\)/).length,
          2,
          'the dup of eventfd1 and the memfd sent twice: told once each',
        );
      });
  },
);

describe('fd store floods are bounded in log lines', { skip: skip ?? false, timeout: 300000 }, () => {
  it('a full fd store and 10,000 more FDSTORE=1 datagrams: fewer than 50 log lines, the count of the rest in one summary, status answers', async () => {
    const d = await started({
      plan: { '1': ['storebatch full 300', 'flood 10000', 'status flooded', 'ready'] },
      service: '  fdstore_max: 300\n',
    });
    await read(d, 'flooded');
    const ticks = cpuTicks(await d.run.aeternaPid());
    assert.equal((await statusOf(d)).fdstore.length, 300);
    const fdStoreLines = lines(d, /^fd store:/).length;
    console.log(
      `# full store + 10,000 datagrams: ${fdStoreLines} fd store log lines, Aeterna used ${ticks} clock ticks of CPU since its start`,
    );
    assert.ok(fdStoreLines < 50, `${fdStoreLines} fd store log lines`);
    await d.stop(); // (its exit code is the app's: killed by SIGTERM)
    // The rest were counted: the summary (at the end of its minute, or at shutdown) says how many.
    const refused = lines(d, /^fd store: refused 1 fd\(s\) named "flood"/).length;
    const summary = lines(d, /more like this suppressed .*: fd store: refused 1 fd\(s\) named "flood"/);
    assert.equal(refused + summary.reduce((n, l) => n + (l.suppressed as number), 0), 10000);
  });

  it('20,000 FDSTOREREMOVE=1 of names nothing has: fewer than 50 log lines', async () => {
    const d = await started({
      plan: { '1': ['removeflood 20000', 'status removed', 'ready'] },
      service: '  fdstore_max: 4\n',
    });
    await read(d, 'removed');
    const count = lines(d, /^fd store:|FDSTOREREMOVE/).length;
    console.log(`# 20,000 FDSTOREREMOVE=1: ${count} log lines`);
    assert.ok(count < 50, `${count} log lines`);
  });
});

describe('other notify floods are bounded in log lines', { skip: skip ?? false, timeout: 300000 }, () => {
  it('10,000 invalid WATCHDOG_USEC= from the app and 5,000 FDSTORE=1 from a stranger: fewer than 50 log lines', async () => {
    const go = path.join(tempDir('aeterna-flood-'), 'go');
    const d = await started({
      plan: { '1': ['usecflood 10000', `waitfile ${go}`, 'status flooded', 'ready'] },
      service: '  fdstore_max: 4\n  watchdog: "1h"\n',
      state: 'Starting',
    });
    await d.run.waitFor(/DONE usecflood 10000 generation 1/, 120000);
    // A stranger (the test process) sends its own; the app's STATUS= after them is read after them (one receive queue).
    const senderCode = `import os, socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.connect(${JSON.stringify(NotifySocket.pathFor(path.join(d.dir, 'control.sock')))})
for i in range(5000):
    fd = os.memfd_create('stranger'); socket.send_fds(s, [b'FDSTORE=1\\nFDNAME=stranger'], [fd]); os.close(fd)`;
    // Not spawnSync: the test's event loop must keep reading Aeterna's stderr, or a daemon that logs every datagram blocks on it.
    const sender = spawn('python3', ['-c', senderCode], { stdio: 'ignore' });
    assert.equal(await new Promise((resolve) => sender.on('exit', resolve)), 0);
    fs.writeFileSync(go, '');
    await read(d, 'flooded');
    const usec = lines(d, /WATCHDOG_USEC/).length;
    const stranger = lines(d, /not a process of a running generation/).length;
    console.log(
      `# 10,000 WATCHDOG_USEC=garbage: ${usec} log lines; 5,000 FDSTORE=1 from a stranger: ${stranger} log lines`,
    );
    assert.ok(usec < 50, `${usec} WATCHDOG_USEC lines`);
    assert.ok(stranger < 50, `${stranger} stranger lines`);
    assert.deepEqual((await statusOf(d)).fdstore, []);
  });
});

describe('readiness modes mean what they say', { skip: skip ?? false, timeout: 120000 }, () => {
  for (const mode of ['delay', 'exec'] as const) {
    it(`mode ${mode}: an app that sends READY=1 at once but serves later is not ready before it serves`, async () => {
      const marker = path.join(tempDir('aeterna-ready-'), 'serving');
      const readiness =
        mode === 'delay'
          ? '{ mode: "delay", delay: "8s", timeout: "60s" }'
          : `{ mode: "exec", command: ["test", "-e", "${marker}"], interval: "100ms", timeout: "60s" }`;
      const d = await started({
        plan: { '*': ['readyserve 2'] },
        readiness,
        env: [`SERVING_MARKER=${marker}`],
        state: null,
      });
      await read(d, 'ready-sent'); // the READY=1 before it has been read too
      assert.equal((await d.status()).state, 'Starting', 'READY=1 alone does not make the generation ready');
      await d.waitStatus((s) => s.state === 'Running', 60000);
      assert.ok(fs.existsSync(marker), 'the app served before Aeterna called it ready');
      const ready = lines(d, /^generation ready$/);
      assert.equal(ready.length, 1);
      assert.match(String(ready[0].source), mode === 'delay' ? /^delay elapsed$/ : /^probe /);
      assert.equal(
        lines(
          d,
          new RegExp(`says it is ready \\(sd_notify READY=1 from pid \\d+\\); readiness\\.mode "${mode}" waits for`),
        ).length,
        1,
      );
    });
  }
});

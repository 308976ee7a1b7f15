// The real `aeterna` CLI (node bin/aeterna.js, a child process) against a fake
// daemon: the real control server in this process with a fake ControlApi; and,
// where the daemon's own config handling matters, against a real daemon.
// Asserts exit codes, counts and what is printed; never timings.
import { describe, it, before, after, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import pino from 'pino';
import { fixture, freePort, ROOT, tempDir } from '../../helpers/aeterna';
import { cli, Daemon, type CliResult } from '../../helpers/daemon';
import { AeternaError } from '../../../src/errors';
import { startControlServer, type ControlServer } from '../../../src/control/server';
import type {
  ControlApi,
  ReloadEvent,
  ReloadOutcome,
  ReloadPhase,
  ReloadRecord,
  StatusReport,
} from '../../../src/orchestrator/types';

const PHASES: ReloadPhase[] = ['accepted', 'config', 'spawned', 'ready', 'soaking', 'draining', 'done'];
/** Every phase, one soak and one relay event, and the outcome event. */
const EVENTS_PER_RELOAD = PHASES.length + 3;

class FakeApi implements ControlApi {
  calls: string[] = [];
  outcome: ReloadOutcome = 'promoted';
  busy = false;
  soaking = false;
  finished = 0;
  /** How many listeners status reports (many make a report larger than a pipe's buffer). */
  listenerCount = 1;
  private count = 0;
  private last: ReloadRecord | null = null;

  status(): StatusReport {
    this.calls.push('status');
    return {
      state: 'Running',
      service: 'fake',
      strategy: 'canary',
      generation: 3,
      pid: 4321,
      daemon_pid: process.pid,
      uptime_ms: 90_000,
      started_at: new Date(0).toISOString(),
      listeners: Array.from({ length: this.listenerCount }, (_, i) => ({
        name: i === 0 ? 'http' : `http-${i}`,
        address: `tcp://0.0.0.0:${8080 + i}`,
        fd: 3 + i,
      })),
      previous: { generation: 2, pid: 4000, started_at: new Date(0).toISOString(), ready: true },
      candidate: null,
      retiring: [],
      restarts: 0,
      fdstore: ['sessions', 'sessions', 'conn'],
      canary_weight: null,
      last_reload: this.last,
    };
  }

  async reload(trigger: 'control' | 'sighup', onEvent?: (event: ReloadEvent) => void): Promise<ReloadRecord> {
    if (this.busy) throw new AeternaError('E_RELOAD_BUSY', 'a reload is already in progress (reload-7, phase soaking)');
    this.calls.push('reload');
    const id = `reload-${++this.count}`;
    const record: ReloadRecord = {
      id,
      strategy: 'canary',
      trigger,
      started_at: new Date().toISOString(),
      phases: [],
      outcome: 'in_progress',
      reason: null,
      code: null,
      duration_ms: null,
      from_generation: 3,
      to_generation: 4,
      new_pid: 1234,
    };
    let elapsed = 0;
    for (const phase of PHASES) {
      await new Promise((r) => setTimeout(r, 2));
      elapsed += 50;
      const at = new Date().toISOString();
      record.phases.push({ phase, at });
      onEvent?.({
        type: 'phase',
        reload: id,
        phase,
        at,
        elapsed_ms: elapsed,
        ...(phase === 'spawned' ? { detail: 'generation 4 (pid 1234)' } : {}),
      });
      if (phase === 'spawned') onEvent?.({ type: 'relay', reload: id, bytes: 512, total: 1024, rate_bps: 2048 });
      if (phase === 'soaking')
        onEvent?.({ type: 'soak', reload: id, elapsed_ms: 12_000, soak_ms: 60_000, total_ms: elapsed });
    }
    record.outcome = this.outcome;
    record.duration_ms = elapsed;
    if (this.outcome !== 'promoted') {
      record.reason = 'exited with code 3 during soak';
      record.code = 'E_CHILD_EXITED';
    }
    onEvent?.({ type: 'outcome', reload: id, record });
    this.last = record;
    this.finished++;
    return record;
  }

  promote(): void {
    this.calls.push('promote');
    if (!this.soaking)
      throw new AeternaError('E_ILLEGAL_TRANSITION', 'promote is not valid in state Running (no canary is soaking)');
  }

  rollback(): void {
    this.calls.push('rollback');
  }

  stop(reason: string): void {
    this.calls.push(`stop: ${reason}`);
  }
}

/** Run the CLI asynchronously (the fake daemon lives in this process and must keep serving meanwhile), without $AETERNA_CONFIG. */
function aeterna(args: string[], env: NodeJS.ProcessEnv = {}, cwd = ROOT): Promise<CliResult> {
  return cli(args, { AETERNA_CONFIG: '', ...env }, cwd);
}

/**
 * Run `aeterna <args>` in a bash pipeline whose reader (by default) sleeps before
 * it reads: the CLI fills the pipe (64 KiB) and must wait for it. `redirect`
 * picks what goes into the pipe ('' for stdout; '2>&1 >/dev/null' for stderr).
 * Resolves with every byte the reader got, the CLI's exit code and what else it wrote on stderr.
 */
async function throughSlowPipe(
  args: string[],
  redirect = '',
  reader = '{ sleep 1; cat; }',
): Promise<{ code: number | null; received: string; stderr: string }> {
  // bash -c SCRIPT node cli.js ARGS...: "$0" "$@" is the CLI's command line.
  const script = `"$0" "$@" ${redirect} | ${reader}; exit \${PIPESTATUS[0]}`;
  const r = await cli(args, { AETERNA_CONFIG: '' }, ROOT, ['bash', '-c', script]);
  return { code: r.code, received: r.stdout, stderr: r.stderr };
}

function lines(text: string): string[] {
  return text.split('\n').filter((l) => l !== '');
}

describe('aeterna CLI', { timeout: 120000 }, () => {
  let dir: string;
  let socketPath: string;
  let configFile: string;
  let api: FakeApi;
  let server: ControlServer;

  before(async () => {
    dir = tempDir('aeterna-cli-');
    socketPath = path.join(dir, 'control.sock');
    configFile = path.join(dir, 'aeterna.yaml');
    fs.writeFileSync(
      configFile,
      `version: "v1"\nservice:\n  name: "fake"\n  command: ["sleep", "1000"]\ncontrol:\n  socket_path: "${socketPath}"\n`,
    );
    api = new FakeApi();
    server = await startControlServer(socketPath, api, pino({ level: 'silent' }));
  });

  after(async () => {
    await server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  beforeEach(() => {
    api.calls = [];
    api.outcome = 'promoted';
    api.busy = false;
    api.soaking = false;
  });

  it('reload: exits 0 when promoted, one plain line per phase and a summary', async () => {
    const r = await aeterna(['reload', '--socket', socketPath]);
    assert.equal(r.code, 0, r.stderr);
    const out = lines(r.stdout);
    assert.equal(out.length, PHASES.length + 1);
    assert.match(out[2], /^reload-\d+ spawned generation 4 \(pid 1234\) \+0\.15s$/);
    assert.match(out[out.length - 1], /^reload-\d+ promoted in .*: generation 4 \(pid 1234\) is serving$/);
    assert.equal(r.stderr, '');
    assert.deepEqual(api.calls, ['reload']);
  });

  it('reload: finds the socket from -c and from $AETERNA_CONFIG', async () => {
    assert.equal((await aeterna(['reload', '-c', configFile])).code, 0);
    assert.equal((await aeterna(['reload'], { AETERNA_CONFIG: configFile })).code, 0);
    assert.equal((await aeterna(['reload'], {}, dir)).code, 0, './aeterna.yaml in the working directory');
    assert.deepEqual(api.calls, ['reload', 'reload', 'reload']);
  });

  it('reload: exits 1 when rolled back, with the reason and code on stderr', async () => {
    api.outcome = 'rolled_back';
    const r = await aeterna(['reload', '-s', socketPath]);
    assert.equal(r.code, 1);
    assert.match(
      r.stderr,
      /^aeterna: reload-\d+ rolled back in .*: exited with code 3 during soak \(E_CHILD_EXITED\)\n$/,
    );
  });

  it('reload: exits 4 when a reload is already in progress', async () => {
    api.busy = true;
    const r = await aeterna(['reload', '-s', socketPath]);
    assert.equal(r.code, 4);
    assert.match(r.stderr, /a reload is already in progress.*\(E_RELOAD_BUSY\)/);
  });

  it('reload: exits 3 when no daemon answers', async () => {
    const missing = path.join(dir, 'missing.sock');
    const r = await aeterna(['reload', '-s', missing]);
    assert.equal(r.code, 3);
    assert.equal(r.stderr, `aeterna: no daemon answers on ${missing} (ENOENT) (E_CONTROL_UNAVAILABLE)\n`);
  });

  it('reload: exits 2 on a usage error and on a missing config', async () => {
    const usage = await aeterna(['reload', '--bogus']);
    assert.equal(usage.code, 2);
    assert.match(usage.stderr, /unknown option '--bogus'/);
    const noConfig = await aeterna(['reload', '-c', path.join(dir, 'nope.yaml')]);
    assert.equal(noConfig.code, 2);
    assert.match(noConfig.stderr, /E_CONFIG_INVALID/);
    assert.deepEqual(api.calls, []);
  });

  it('-c reads only control.socket_path: a file broken elsewhere still reaches the daemon; an unparseable file or a bad socket_path exits 2', async () => {
    const brokenElsewhere = path.join(dir, 'broken-elsewhere.yaml');
    fs.writeFileSync(brokenElsewhere, `version: "v9"\nservice: 42\ncontrol:\n  socket_path: "${socketPath}"\n`);
    assert.equal((await aeterna(['status', '-c', brokenElsewhere])).code, 0);
    assert.equal((await aeterna(['rollback', '-c', brokenElsewhere])).code, 0);
    const unparseable = path.join(dir, 'unparseable.yaml');
    fs.writeFileSync(unparseable, `control: { socket_path: "${socketPath}"\n`);
    const badSocket = path.join(dir, 'bad-socket.yaml');
    fs.writeFileSync(badSocket, `version: "v1"\ncontrol:\n  socket_path: ["${socketPath}"]\n`);
    for (const [file, issue] of [
      [unparseable, `${unparseable}:2:1 invalid YAML: `],
      [badSocket, `${badSocket}:3:16 control.socket_path: must be a unix socket path (got a list)`],
    ]) {
      const r = await aeterna(['stop', '-c', file]);
      assert.equal(r.code, 2, r.stderr);
      assert.match(
        r.stderr,
        /^aeterna: cannot find the control socket in the config \(E_CONFIG_INVALID\); pass --socket PATH/,
      );
      assert.ok(
        lines(r.stderr).some((l) => l.startsWith(issue)),
        r.stderr,
      );
    }
    assert.deepEqual(api.calls, ['status', 'rollback']);
  });

  it('reload --json: one parseable JSON object per line, the events then the record', async () => {
    const r = await aeterna(['reload', '--json', '-s', socketPath]);
    assert.equal(r.code, 0, r.stderr);
    const objects = lines(r.stdout).map((l) => JSON.parse(l) as Record<string, unknown>);
    assert.equal(objects.length, EVENTS_PER_RELOAD + 1);
    assert.equal(objects.filter((o) => o.type === 'phase').length, PHASES.length);
    assert.equal(objects[objects.length - 2].type, 'outcome');
    const record = objects[objects.length - 1] as unknown as ReloadRecord;
    assert.equal(record.outcome, 'promoted');
    assert.equal(record.trigger, 'control');
  });

  it('reload --json: errors are a JSON object on stdout too', async () => {
    api.busy = true;
    const r = await aeterna(['reload', '--json', '-s', socketPath]);
    assert.equal(r.code, 4);
    const out = lines(r.stdout).map((l) => JSON.parse(l) as { error?: { code: string; message: string } });
    assert.equal(out.length, 1);
    assert.equal(out[0].error?.code, 'E_RELOAD_BUSY');
  });

  it('reload --no-wait: exits 0 once accepted; the reload goes on in the daemon', async () => {
    const before = api.finished;
    const r = await aeterna(['reload', '--no-wait', '-s', socketPath]);
    assert.equal(r.code, 0, r.stderr);
    const out = lines(r.stdout);
    assert.equal(out.length, 2);
    assert.match(out[0], /^reload-\d+ accepted trigger|^reload-\d+ accepted/);
    assert.match(out[1], /^reload-\d+ accepted; follow it with aeterna status$/);
    while (api.finished === before) await new Promise((resolve) => setTimeout(resolve, 10));
    assert.equal(api.finished, before + 1);
  });

  it('status --json: the StatusReport', async () => {
    const r = await aeterna(['status', '--json', '-s', socketPath]);
    assert.equal(r.code, 0, r.stderr);
    const out = lines(r.stdout);
    assert.equal(out.length, 1);
    const status = JSON.parse(out[0]) as StatusReport;
    assert.equal(status.state, 'Running');
    assert.equal(status.generation, 3);
    assert.equal(status.pid, 4321);
    assert.ok('last_reload' in status);
    assert.equal(status.last_reload?.outcome, 'promoted');
  });

  it('status --json through a slowly read pipe: the whole report (far over 64 KiB) arrives', async () => {
    api.listenerCount = 5000;
    try {
      const r = await throughSlowPipe(['status', '--json', '-s', socketPath]);
      assert.equal(r.code, 0);
      assert.ok(r.received.length > 4 * 65536, `a report larger than the pipe buffer (${r.received.length} bytes)`);
      const out = lines(r.received);
      assert.equal(out.length, 1);
      const status = JSON.parse(out[0]) as StatusReport;
      assert.equal(status.listeners.length, 5000);
    } finally {
      api.listenerCount = 1;
    }
  });

  it('a reader that goes away at once (| true): the CLI exits with its own code, no EPIPE crash', async () => {
    for (const args of [['--help'], ['reload', '--help']]) {
      const r = await throughSlowPipe(args, '', 'true');
      assert.equal(r.code, 0, `${args.join(' ')}: ${r.stderr}`);
      assert.equal(r.stderr, '');
    }
  });

  it('stderr through a slowly read pipe: every line of a long error report (validate, over 64 KiB) arrives', async () => {
    const bad = path.join(dir, 'many-issues.yaml');
    const unknownKeys = Array.from({ length: 3000 }, (_, i) => `  unknown_key_number_${i}: "x"\n`).join('');
    fs.writeFileSync(bad, `version: "v1"\nservice:\n  name: "x"\n  command: ["true"]\n${unknownKeys}`);
    const r = await throughSlowPipe(['validate', '-c', bad], '2>&1 >/dev/null');
    assert.equal(r.code, 78);
    assert.ok(r.received.length > 65536, `an error report larger than the pipe buffer (${r.received.length} bytes)`);
    const issues = lines(r.received).filter((l) => l.startsWith(`${bad}:`));
    assert.equal(issues.length, 3000);
  });

  it('status: a readable summary', async () => {
    const r = await aeterna(['status', '-c', configFile]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^state: +Running$/m);
    assert.match(r.stdout, /^generation: +3 \(pid 4321\)$/m);
    assert.match(r.stdout, /^listeners: +http tcp:\/\/0\.0\.0\.0:8080 \(fd 3\)$/m);
    assert.match(r.stdout, /^previous: +generation 2 \(pid 4000\)/m);
    assert.match(r.stdout, /^fd store: +3 fd\(s\): sessions, sessions, conn$/m);
    assert.match(r.stdout, /^last reload: +reload-\d+ promoted/m);
  });

  it('status: exits 3 when no daemon answers', async () => {
    const r = await aeterna(['status', '-s', path.join(dir, 'missing.sock')]);
    assert.equal(r.code, 3);
  });

  it('promote/rollback/stop call the api; a refusal exits 1 with the code', async () => {
    const refused = await aeterna(['promote', '-s', socketPath]);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /^aeterna: promote is not valid in state Running .* \(E_ILLEGAL_TRANSITION\)\n$/);
    api.soaking = true;
    assert.equal((await aeterna(['promote', '-s', socketPath])).code, 0);
    assert.equal((await aeterna(['rollback', '-s', socketPath])).code, 0);
    const stop = await aeterna(['stop', '--json', '-s', socketPath]);
    assert.equal(stop.code, 0);
    assert.deepEqual(JSON.parse(stop.stdout), { ok: true });
    assert.equal(api.calls.length, 4);
    assert.deepEqual(api.calls.slice(0, 3), ['promote', 'promote', 'rollback']);
    assert.match(api.calls[3], /^stop: aeterna stop/);
    assert.equal((await aeterna(['rollback', '-s', path.join(dir, 'missing.sock')])).code, 3);
  });

  it('validate: ok for a valid config, 78 and every issue for an invalid one', async () => {
    const ok = await aeterna(['validate', '-c', configFile]);
    assert.equal(ok.code, 0, ok.stderr);
    assert.equal(ok.stdout, `${configFile}: ok\n`);
    const bad = path.join(dir, 'bad.yaml');
    fs.writeFileSync(bad, 'version: "v9"\nservice:\n  name: "x"\n  command: []\n');
    const r = await aeterna(['validate', '-c', bad]);
    assert.equal(r.code, 78);
    assert.equal(r.stdout, '');
    assert.match(r.stderr, /E_CONFIG_INVALID/);
    const issues = lines(r.stderr).filter((l) => l.startsWith(`${bad}:`));
    assert.ok(issues.length >= 2, `each issue on its own line:\n${r.stderr}`);
    assert.ok(issues.some((l) => l.includes('version')));
    assert.ok(issues.some((l) => l.includes('command')));
  });

  it('--version prints the package version', async () => {
    const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string };
    const r = await aeterna(['--version']);
    assert.equal(r.code, 0);
    assert.equal(r.stdout.trim(), pkg.version);
  });

  it('--help of every command exits 0; reload --help has the exit code table', async () => {
    for (const command of ['start', 'reload', 'status', 'promote', 'rollback', 'stop', 'validate']) {
      const r = await aeterna([command, '--help']);
      assert.equal(r.code, 0, `${command} --help`);
      assert.match(r.stdout, new RegExp(`^Usage: aeterna ${command}`));
    }
    const reload = await aeterna(['reload', '--help']);
    for (const code of [0, 1, 2, 3, 4]) assert.match(reload.stdout, new RegExp(`^  ${code} +\\S`, 'm'));
    assert.equal((await aeterna(['--help'])).code, 0);
  });
});

/** "line:column" of the value of the first `key: value` in `text`. */
function valuePosition(text: string, key: string): string {
  const rows = text.split('\n');
  const index = rows.findIndex((row) => row.includes(`${key}: `));
  assert.ok(index >= 0, `no ${key} in:\n${text}`);
  return `${index + 1}:${rows[index].indexOf(`${key}: `) + key.length + 3}`;
}

describe('aeterna CLI against a real daemon whose config file was broken after it started', { timeout: 120000 }, () => {
  let d: Daemon | undefined;
  after(async () => {
    await d?.run.killAll();
    if (d) fs.rmSync(d.dir, { recursive: true, force: true });
  });

  it('status -c and stop -c still reach it; reload -c exits 1 with E_CONFIG_INVALID and every issue at file:line:col, and the serving generation stays', async () => {
    d = new Daemon({ command: [process.execPath, fixture('apps', 'reload_app.js')], port: await freePort() }).start();
    const before = await d.waitStatus((s) => s.state === 'Running');
    const broken = fs
      .readFileSync(d.configFile, 'utf8')
      .replace('strategy: "immediate"', 'strategy: "canry"')
      .replace('soak_time: "1s"', 'soak_time: "1"');
    fs.writeFileSync(d.configFile, broken);

    const status = await d.cli('status', '--json');
    assert.equal(status.code, 0, status.stderr);
    assert.equal((JSON.parse(status.stdout) as StatusReport).pid, before.pid);

    const reload = await d.cli('reload');
    assert.equal(reload.code, 1, reload.stderr);
    const issues = lines(reload.stderr).filter((l) => l.startsWith(`${d!.configFile}:`));
    assert.deepEqual(issues, [
      `${d.configFile}:${valuePosition(broken, 'strategy')} orchestration.strategy: must be one of immediate, canary (got "canry")`,
      `${d.configFile}:${valuePosition(broken, 'soak_time')} orchestration.soak_time: must be a duration: whole numbers with units h, m, s or ms, largest first, e.g. "500ms", "10s", "1m30s", "2h" (got "1")`,
    ]);
    assert.match(reload.stderr, /^aeterna: reload-1 failed in \S+ \(E_CONFIG_INVALID\):$/m);

    const after = await d.status();
    assert.equal(after.state, 'Running');
    assert.equal(after.generation, before.generation);
    assert.equal(after.pid, before.pid);
    assert.equal(after.last_reload?.outcome, 'failed');
    assert.equal(after.last_reload?.code, 'E_CONFIG_INVALID');
    const plain = await d.cli('status');
    const rows = lines(plain.stdout);
    const last = rows.findIndex((row) => row.startsWith('last reload:'));
    assert.match(rows[last], /^last reload: +reload-1 failed in \S+ \(E_CONFIG_INVALID\) \(control, started [^)]+\):$/);
    assert.deepEqual(
      rows.slice(last + 1).map((row) => row.trim()),
      issues,
      'each issue on its own line under the last reload',
    );

    const stop = await d.cli('stop');
    assert.equal(stop.code, 0, stop.stderr);
    assert.equal(stop.stdout, 'stop requested\n');
    assert.equal((await d.run.exit()).code, 0);
  });
});

// `aeterna start` as a user other than root, with real processes: the default
// socket paths must work for that user (and the CLI must find them), and every
// failed start must be one line with the code and the fix, never a stack trace.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fixture, freePort, runAeterna, tempDir, type AeternaRun } from '../../helpers/aeterna';
import { cli, type CliResult } from '../../helpers/daemon';

/** A uid with no passwd entry, so that nothing else on the machine is this user. */
const UID = 40000 + (process.pid % 20000);
const AS_USER = ['setpriv', `--reuid=${UID}`, `--regid=${UID}`, '--clear-groups'];
/** Not set: the default runtime directory is then /tmp/aeterna-<uid>. */
const ENV = { XDG_RUNTIME_DIR: '', AETERNA_CONFIG: '' };
const RUNTIME_DIR = `/tmp/aeterna-${UID}`;
const skip =
  process.getuid?.() !== 0
    ? 'needs root to run as another user'
    : spawnSync('setpriv', [...AS_USER, 'true']).status === 0
      ? false
      : 'setpriv cannot switch users here';

const runs: AeternaRun[] = [];
let dir: string;

/** A config readable by the user, without any socket path (the state relay on, so that its socket is made too). */
function writeConfig(name: string, extra = ''): string {
  const file = path.join(dir, name);
  fs.writeFileSync(
    file,
    `version: "v1"
service:
  name: "nonroot"
  command: ${JSON.stringify([process.execPath, fixture('faults', 'app.js')])}
  stop_timeout: "5s"
${extra}orchestration:
  readiness: { mode: "delay", delay: "200ms", timeout: "10s" }
  state_handoff: { enabled: true }
`,
  );
  fs.chmodSync(file, 0o644);
  return file;
}

function asUser(args: string[]): Promise<CliResult> {
  return cli(args, ENV, dir, AS_USER);
}

/** Aeterna's stderr as lines, and the JSON ones parsed. */
function stderrLines(run: AeternaRun): { lines: string[]; json: Array<Record<string, unknown>> } {
  const lines = run.stderr.split('\n').filter((l) => l !== '');
  return { lines, json: lines.map((l) => JSON.parse(l) as Record<string, unknown>) };
}

describe('aeterna start as a non-root user', { skip, timeout: 120000 }, () => {
  before(() => {
    dir = tempDir('aeterna-nonroot-');
    fs.chmodSync(dir, 0o755);
    fs.rmSync(RUNTIME_DIR, { recursive: true, force: true });
  });

  after(async () => {
    for (const run of runs) await run.killAll();
    fs.rmSync(RUNTIME_DIR, { recursive: true, force: true });
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('with no socket path in the config: starts with its sockets in a private /tmp/aeterna-<uid> (0700), and status and stop find it', async () => {
    const port = await freePort();
    const config = writeConfig('ok.yaml', `  listeners: [{ name: "http", address: "tcp://127.0.0.1:${port}" }]\n`);
    const run = runAeterna(['start', '-c', config], { prefix: AS_USER, env: ENV, cwd: dir });
    runs.push(run);
    await run.waitFor(/READY \d+ generation 1/);
    let status: CliResult;
    for (;;) {
      status = await asUser(['status', '--json', '-c', config]);
      // The app prints READY before Aeterna's readiness check sees it: wait for Running, not only for an answer.
      if (
        (status.code === 0 && (JSON.parse(status.stdout) as { state: string }).state !== 'Starting') ||
        (status.code !== 0 && run.child.exitCode !== null)
      )
        break;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(status.code, 0, `${status.stderr}\n${run.stderr}`);
    assert.equal((JSON.parse(status.stdout) as { state: string }).state, 'Running');

    const stat = fs.lstatSync(RUNTIME_DIR);
    assert.ok(stat.isDirectory());
    assert.equal(stat.uid, UID);
    assert.equal(stat.mode & 0o777, 0o700);
    assert.ok(fs.lstatSync(path.join(RUNTIME_DIR, 'aeterna.sock')).isSocket(), 'the control socket');
    assert.ok(fs.lstatSync(path.join(RUNTIME_DIR, 'aeterna.sock.notify')).isSocket(), 'the notify socket beside it');
    assert.ok(fs.lstatSync(path.join(RUNTIME_DIR, 'aeterna-state.sock')).isSocket(), 'the state relay socket');

    const stop = await asUser(['stop', '-c', config]);
    assert.equal(stop.code, 0, stop.stderr);
    assert.equal((await run.exit()).code, 0, run.stderr);
  });

  it('every failed start is one line with the code and the fix, no stack trace: an unwritable control socket path, a listener address in use', async () => {
    const unwritable = writeConfig('unwritable.yaml');
    fs.appendFileSync(unwritable, 'control:\n  socket_path: "/var/lib/aeterna-nonroot-test/aeterna.sock"\n');
    const blocker = net.createServer().listen(0, '127.0.0.1');
    await new Promise((r) => blocker.once('listening', r));
    const taken = (blocker.address() as net.AddressInfo).port;
    const inUse = writeConfig('in-use.yaml', `  listeners: [{ name: "web", address: "tcp://127.0.0.1:${taken}" }]\n`);
    try {
      const cases = [
        {
          config: unwritable,
          code: 'E_LISTEN_FAILED',
          message:
            /cannot create the control socket's directory \/var\/lib\/aeterna-nonroot-test: .*EACCES.*; set control\.socket_path to a path in a directory this user can write/,
        },
        {
          config: inUse,
          code: 'E_LISTEN_ADDR_IN_USE',
          message: new RegExp(
            `listener "web" \\(tcp://127\\.0\\.0\\.1:${taken}\\): address already in use.*; stop what listens there, or change the address in service\\.listeners`,
          ),
        },
      ];
      for (const c of cases) {
        const run = runAeterna(['start', '-c', c.config], { prefix: AS_USER, env: ENV, cwd: dir });
        runs.push(run);
        const exit = await run.exit();
        assert.equal(exit.code, 69, run.stderr);
        const { lines, json } = stderrLines(run);
        assert.equal(lines.length, 1, `one line:\n${run.stderr}`);
        assert.equal(json[0].code, c.code);
        assert.match(String(json[0].msg), c.message);
        assert.ok(!('err' in json[0]) && !/\n\s+at /.test(run.stderr), `no stack trace: ${run.stderr}`);
        assert.equal(run.stdout, '', 'the app never ran');
      }
    } finally {
      blocker.close();
    }
  });
});

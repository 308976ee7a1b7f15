// Which servers reload cleanly under Aeterna, measured (`node dist/bench/compat.js`): unmodified servers as a new
// user would run them (gunicorn sync workers, uvicorn --fd 3, Node's http with and without the SDK's drain helper,
// Go's net/http with Server.Shutdown, the Java example), each under a real daemon as PID 1 of a new PID namespace,
// reloaded N times under keep-alive load and then N times under one-request-per-connection load. Counts failed
// requests (refused, reset, timed out, non-2xx) by kind and writes bench/results/compat-<date>.md. A server whose
// runtime is missing is skipped with a message saying what to install. test/endurance/compat.test.ts runs it with --quick.
//
//   node dist/bench/compat.js [--reloads 10] [--connections 8] [--servers LIST] [--quick] [--out DIR]
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { call } from '../src/control/client';
import {
  FIXTURES,
  ROOT,
  fixture,
  freePort,
  pidNamespaceUnavailable,
  python,
  sleep,
  tempDir,
  versionOf,
  which,
} from './common';
import { Daemon, socketOf } from '../test/helpers/daemon';
import { startLoad, type LoadStats } from '../test/helpers/load';

/** One row of the table: a server, run as configured here. */
interface Server {
  id: string;
  /** The server and what is configured, for the table. */
  label: string;
  /** Why it cannot run here (what to install), or null. */
  missing(): string | null;
  /** Build what it needs into work (a temp dir); returns the command. */
  command(work: string): string[];
  readiness: string;
  env?: string[];
  extraService?: string;
  version(): string;
}

/** A python3 that can import module: the one on PATH, else Debian's (apt-get installs python3-gunicorn there). */
function pythonWith(module: string): string | null {
  for (const py of [python(), '/usr/bin/python3']) {
    if (py && spawnSync(py, ['-c', `import ${module}`], { stdio: 'ignore' }).status === 0) return py;
  }
  return null;
}

const pyMissing = (module: string, pkg: string) => (): string | null =>
  pythonWith(module) ? null : `python3 cannot import ${module} (apt-get install -y ${pkg})`;
const pyVersion = (module: string) => (): string =>
  versionOf([pythonWith(module)!, '-c', `import ${module}; print("${module} " + ${module}.__version__)`]) ?? module;

function gunicorn(id: string, label: string, flags: string[]): Server {
  return {
    id,
    label,
    missing: pyMissing('gunicorn', 'python3-gunicorn'),
    command: () => [
      pythonWith('gunicorn')!,
      '-m',
      'gunicorn',
      '--workers',
      '1',
      '--chdir',
      FIXTURES,
      ...flags,
      'compat_app:wsgi',
    ],
    readiness: '{ mode: "delay", delay: "1s", timeout: "30s" }',
    version: pyVersion('gunicorn'),
  };
}

function uvicorn(id: string, label: string, flags: string[]): Server {
  return {
    id,
    label,
    missing: pyMissing('uvicorn', 'python3-uvicorn'),
    command: () => [
      pythonWith('uvicorn')!,
      '-m',
      'uvicorn',
      '--fd',
      '3',
      '--app-dir',
      FIXTURES,
      '--no-access-log',
      ...flags,
      'compat_app:asgi',
    ],
    readiness: '{ mode: "delay", delay: "1s", timeout: "30s" }',
    version: pyVersion('uvicorn'),
  };
}

function goServer(id: string, label: string, env: string[]): Server {
  return {
    id,
    label,
    missing: () => (which('go') ? null : 'go is not installed (apt-get install -y golang-go)'),
    command: (work) => {
      const out = path.join(work, 'compat_go');
      const r = spawnSync('go', ['build', '-o', out, fixture('compat_go.go')], {
        cwd: work,
        encoding: 'utf8',
        env: { ...process.env, GOFLAGS: '-mod=mod', GO111MODULE: 'auto' },
      });
      if (r.status !== 0) throw new Error(`go build failed:\n${r.stdout}${r.stderr}`);
      return [out];
    },
    readiness: '{ mode: "delay", delay: "300ms", timeout: "30s" }',
    env,
    version: () => versionOf(['go', 'version']) ?? 'go',
  };
}

// Go SDK drain: examples/go-counter, built as a user builds it (its go.mod points at clients/go), stops with
// client.TrackConnections/client.Drain. Without the state relay its relay calls do nothing; it serves on "http".
const goSdkDrain: Server = {
  id: 'go-sdk-drain',
  label: 'Go `net/http` + SDK drain (`client.Drain`, examples/go-counter)',
  missing: () => (which('go') ? null : 'go is not installed (apt-get install -y golang-go)'),
  command: (work) => {
    const out = path.join(work, 'go-counter');
    const r = spawnSync('go', ['build', '-o', out, '.'], {
      cwd: path.join(ROOT, 'examples', 'go-counter'),
      encoding: 'utf8',
    });
    if (r.status !== 0) throw new Error(`go build failed:\n${r.stdout}${r.stderr}`);
    return [out];
  },
  readiness: '{ mode: "delay", delay: "300ms", timeout: "30s" }',
  version: () => versionOf(['go', 'version']) ?? 'go',
};

const node = (id: string, label: string, app: string): Server => ({
  id,
  label,
  missing: () => null,
  command: () => [process.execPath, fixture(app)],
  readiness: '{ mode: "delay", delay: "300ms", timeout: "30s" }',
  version: () => `node ${process.version}`,
});

export const SERVERS: Server[] = [
  gunicorn('gunicorn', 'gunicorn, sync workers (defaults)', []),
  uvicorn('uvicorn', 'uvicorn --fd 3 (defaults)', []),
  node('node-plain', 'Node http, server.close() on SIGTERM', 'compat_node_plain.js'),
  node('node-drain', 'Node http + SDK drain (aeterna/client drain)', 'http_app.js'),
  goServer('go', 'Go net/http, Server.Shutdown', []),
  goServer('go-drain', 'Go net/http, `Connection: close` for 1 s, then Shutdown', ['COMPAT_GO_DRAIN=1']),
  goSdkDrain,
  {
    id: 'java',
    label: 'Java example (examples/java-hello)',
    missing: () =>
      which('javac') && which('java') ? null : 'javac is not installed (apt-get install -y default-jdk-headless)',
    command: (work) => {
      // java-hello uses the Java SDK (clients/java): compiled with it, as its README's jar would provide it.
      const sources = [
        path.join(ROOT, 'clients', 'java', 'Aeterna.java'),
        path.join(ROOT, 'examples', 'java-hello', 'Hello.java'),
      ];
      const r = spawnSync('javac', ['-d', work, ...sources], { encoding: 'utf8' });
      if (r.status !== 0) throw new Error(`javac failed:\n${r.stdout}${r.stderr}`);
      return ['java', '-cp', work, 'Hello'];
    },
    readiness: '{ mode: "delay", delay: "2s", timeout: "30s" }',
    extraService: '  stdin_listener: "http"\n',
    version: () => versionOf(['java', '-version']) ?? 'java',
  },
];

// Python: examples/python-counter, a stdlib HTTP/1.1 keep-alive server with the Python SDK's
// track_connections/drain (clients/python/aeterna_client.py). Run as a new user would, state relay off
// (readiness `delay`, like the other rows): this row measures the drain.
SERVERS.push({
  id: 'python-drain',
  label: 'Python `http.server` (HTTP/1.1) + SDK drain (examples/python-counter)',
  missing: () => (python() ? null : 'python3 is not installed (apt-get install -y python3)'),
  command: () => [python()!, path.join(ROOT, 'examples', 'python-counter', 'counter.py')],
  readiness: '{ mode: "delay", delay: "1s", timeout: "30s" }',
  version: () => versionOf([python()!, '--version']) ?? 'python3',
});

export type LoadMode = 'keepAlive' | 'perConnection';
export const MODES: LoadMode[] = ['keepAlive', 'perConnection'];

export interface Phase {
  reloads: number;
  /** Reloads whose record said promoted. */
  promoted: number;
  stats: Omit<LoadStats, 'pids'>;
}

export type Row = { id: string; label: string; version: string } & (
  { skipped: string } | { error: string } | Record<LoadMode, Phase>
);

export interface CompatOptions {
  reloads: number;
  connections: number;
  servers: string[];
  outDir: string;
  quick: boolean;
}

async function measure(d: Daemon, port: number, mode: LoadMode, reloads: number, connections: number): Promise<Phase> {
  const load = startLoad(port, { concurrency: connections, keepAlive: mode === 'keepAlive' });
  await sleep(1000); // every connection open and busy before the first reload
  let promoted = 0;
  for (let i = 0; i < reloads; i++) {
    const r = await call(socketOf(d), { cmd: 'reload', wait: true }, undefined, { idleTimeoutMs: 60000 });
    if ('record' in r && r.record.outcome === 'promoted') promoted++;
    await sleep(500);
  }
  await sleep(500);
  const { ok, failed, failures } = await load.stop();
  return { reloads, promoted, stats: { ok, failed, failures } };
}

async function runServer(s: Server, o: CompatOptions): Promise<Row> {
  const base = { id: s.id, label: s.label };
  const missing = s.missing();
  if (missing) return { ...base, version: '-', skipped: missing };
  const work = tempDir('aeterna-compat-');
  let d: Daemon | null = null;
  try {
    const port = await freePort();
    d = new Daemon({
      command: s.command(work),
      port,
      readiness: s.readiness,
      env: s.env,
      extraService: s.extraService,
      stopTimeout: '15s',
    }).start(true);
    await d.waitStatus((st) => st.state === 'Running', 60000);
    const row = { ...base, version: s.version() } as Row & Record<LoadMode, Phase>;
    for (const mode of MODES) {
      process.stderr.write(`compat: ${s.id}, ${mode}, ${o.reloads} reloads\n`);
      row[mode] = await measure(d, port, mode, o.reloads, o.connections);
    }
    return row;
  } catch (err) {
    return { ...base, version: '-', error: (err as Error).message.slice(0, 2000) };
  } finally {
    if (d) await Promise.race([d.stop(), sleep(30000).then(() => d!.run.killAll())]);
    fs.rmSync(work, { recursive: true, force: true });
  }
}

const kinds = (f: Record<string, number>): string =>
  Object.entries(f)
    .map(([k, n]) => `${n} ${k}`)
    .join(', ') || '-';

export function renderCompat(
  rows: Row[],
  o: CompatOptions,
  meta: { date: string; host: string; cpu: string; cores: number; kernel: string },
): string {
  const lines = [
    `# Which servers reload cleanly: ${meta.date}`,
    '',
    `${meta.host}: ${meta.cores} cores (${meta.cpu}), Linux ${meta.kernel}, Node ${process.version}. ` +
      `${o.reloads} reloads per server and load (${o.quick ? 'quick mode' : 'full run'}), ${o.connections} connections, ` +
      'Aeterna as PID 1 of a new PID namespace, strategy immediate, readiness `delay`. ' +
      'Keep-alive: each connection sends GETs back to back on one connection; per connection: each GET opens its own connection (`Connection: close`). ' +
      'A failure is a request without a 2xx response (refused, reset, timed out after 10 s, non-2xx). ' +
      'Produced by `node dist/bench/compat.js` (bench/compat.ts).',
    '',
    '| server | version | failed, keep-alive | failed, per connection | requests (keep-alive / per connection) | failures by kind |',
    '| --- | --- | --- | --- | --- | --- |',
  ];
  for (const r of rows) {
    if ('skipped' in r) lines.push(`| ${r.label} | - | skipped | skipped | - | ${r.skipped} |`);
    else if ('error' in r) lines.push(`| ${r.label} | - | error | error | - | ${r.error.split('\n')[0]} |`);
    else {
      const k = r.keepAlive;
      const p = r.perConnection;
      const notPromoted = MODES.some((m) => r[m].promoted !== r[m].reloads)
        ? ` (promoted ${k.promoted}+${p.promoted} of ${k.reloads}+${p.reloads})`
        : '';
      lines.push(
        `| ${r.label} | ${r.version} | ${k.stats.failed} | ${p.stats.failed} | ${k.stats.ok + k.stats.failed} / ${p.stats.ok + p.stats.failed} | keep-alive: ${kinds(k.stats.failures)}; per connection: ${kinds(p.stats.failures)}${notPromoted} |`,
      );
    }
  }
  const errors = rows.filter((r): r is Row & { error: string } => 'error' in r);
  for (const r of errors) lines.push('', `## ${r.label}: error`, '', '```', r.error, '```');
  return lines.join('\n') + '\n';
}

export function parseCompatArgs(argv: string[]): CompatOptions {
  const o: CompatOptions = {
    reloads: 10,
    connections: 8,
    servers: SERVERS.map((s) => s.id),
    outDir: path.join(ROOT, 'bench', 'results'),
    quick: false,
  };
  let reloads: number | null = null;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const v = (): string => {
      const x = argv[++i];
      if (x === undefined) throw new Error(`${a} needs a value`);
      return x;
    };
    const n = (x: string): number => {
      const k = Number(x);
      if (!Number.isInteger(k) || k < 1) throw new Error(`${a}: expected a whole number >= 1, got "${x}"`);
      return k;
    };
    if (a === '--reloads') reloads = n(v());
    else if (a === '--connections') o.connections = n(v());
    else if (a === '--out') o.outDir = path.resolve(v());
    else if (a === '--quick') o.quick = true;
    else if (a === '--servers') {
      o.servers = v().split(',');
      const unknown = o.servers.filter((id) => !SERVERS.some((s) => s.id === id));
      if (unknown.length)
        throw new Error(`--servers: unknown ${unknown.join(', ')} (known: ${SERVERS.map((s) => s.id).join(', ')})`);
    } else
      throw new Error(
        `unknown option ${a} (options: --reloads N, --connections N, --servers LIST, --quick, --out DIR)`,
      );
  }
  o.reloads = reloads ?? (o.quick ? 2 : 10);
  return o;
}

async function main(): Promise<void> {
  let o: CompatOptions;
  try {
    o = parseCompatArgs(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`compat: ${(err as Error).message}\n`);
    process.exit(2);
  }
  const noNs = pidNamespaceUnavailable();
  if (noNs) {
    process.stderr.write(`compat: ${noNs}\n`);
    process.exit(2);
  }
  const rows: Row[] = [];
  for (const s of SERVERS.filter((x) => o.servers.includes(x.id))) {
    const row = await runServer(s, o);
    if ('skipped' in row) process.stderr.write(`compat: skipping ${s.id}: ${row.skipped}\n`);
    rows.push(row);
  }
  const date = new Date().toISOString().slice(0, 10);
  const meta = {
    date,
    host: os.hostname(),
    cpu: os.cpus()[0]?.model ?? 'unknown',
    cores: os.cpus().length,
    kernel: os.release(),
  };
  fs.mkdirSync(o.outDir, { recursive: true });
  const file = path.join(o.outDir, `compat-${date}.md`);
  fs.writeFileSync(file, renderCompat(rows, o, meta));
  fs.writeFileSync(file.replace(/\.md$/, '.json'), JSON.stringify({ meta, options: o, rows }, null, 2) + '\n');
  process.stdout.write(`${file}\n`);
  process.exit(rows.some((r) => 'error' in r) ? 1 : 0);
}

if (require.main === module) void main();

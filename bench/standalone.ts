// The self-contained aeterna (make standalone) against `node bin/aeterna.js`, in the same run: how long a command
// takes from exec to exit (`--version`, `validate`), how long `start` takes until its control socket answers, and
// the daemon's RSS once it runs a small app; then what each adds to an image.
//
//   make standalone && node dist/bench/standalone.js [--runs N] [--out FILE.json]
//
// Runs alternate between the two (standalone, node, standalone, ...), so a busy machine slows both alike; medians
// are reported, and the ratio standalone / node.
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

const ROOT = path.resolve(__dirname, '..', '..');
const STANDALONE = path.join(ROOT, 'build', 'standalone', 'aeterna');
const NODE_CLI = [process.execPath, path.join(ROOT, 'bin', 'aeterna.js')];

function option(name: string, fallback: string): string {
  const i = process.argv.indexOf(name);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1] : fallback;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

/** Milliseconds from spawn to exit of one command (which must succeed). */
function timeCommand(argv: string[]): number {
  const t0 = process.hrtime.bigint();
  const r = spawnSync(argv[0], argv.slice(1), { stdio: 'ignore' });
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  if (r.status !== 0) throw new Error(`${argv.join(' ')} exited with ${r.status ?? r.signal}`);
  return ms;
}

function connects(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(socketPath, () => {
      s.destroy();
      resolve(true);
    });
    s.on('error', () => resolve(false));
  });
}

function rssKiB(pid: number): number {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  return Number(/^VmRSS:\s+(\d+) kB/m.exec(status)![1]);
}

/** `start` until the control socket accepts (ms), and the daemon's RSS (KiB) after it has run its app for a while. */
async function startAndRss(argv: string[], dir: string): Promise<{ readyMs: number; rssKiB: number }> {
  const control = path.join(dir, 'control.sock');
  fs.rmSync(control, { force: true });
  const config = path.join(dir, 'aeterna.yaml');
  fs.writeFileSync(
    config,
    `version: "v1"
service:
  name: "bench"
  command: ["sleep", "600"]
  listeners:
    - name: "http"
      address: "unix://${path.join(dir, 'app.sock')}"
orchestration:
  readiness: { mode: "delay", delay: "100ms", timeout: "10s" }
control:
  socket_path: "${control}"
observability:
  log_level: "error"
`,
  );
  const t0 = process.hrtime.bigint();
  const child = spawn(argv[0], [...argv.slice(1), 'start', '-c', config], { stdio: 'ignore' });
  try {
    const deadline = Date.now() + 60_000;
    while (!(await connects(control))) {
      if (Date.now() > deadline || child.exitCode !== null) throw new Error(`${argv.join(' ')} start did not come up`);
      await new Promise((r) => setTimeout(r, 2));
    }
    const readyMs = Number(process.hrtime.bigint() - t0) / 1e6;
    // Settled: the app started, the first garbage collections done.
    await new Promise((r) => setTimeout(r, 2000));
    return { readyMs, rssKiB: rssKiB(child.pid!) };
  } finally {
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    await exited;
  }
}

/** Bytes of a file or of a directory tree (apparent sizes). */
function bytes(p: string): number {
  const stat = fs.lstatSync(p);
  if (!stat.isDirectory()) return stat.size;
  return fs.readdirSync(p).reduce((sum, entry) => sum + bytes(path.join(p, entry)), 0);
}

/** What `node bin/aeterna.js` needs in an image besides itself: Node, npm, the production dependencies, the code. */
function nodeInstallBytes(): Record<string, number> {
  const npmDir = path.resolve(path.dirname(fs.realpathSync(process.execPath)), '..', 'lib', 'node_modules', 'npm');
  const prod = spawnSync('npm', ['ls', '--omit=dev', '--all', '--parseable'], { cwd: ROOT, encoding: 'utf8' });
  const packages = prod.stdout
    .split('\n')
    .filter((p) => p.startsWith(path.join(ROOT, 'node_modules') + path.sep))
    .filter((p, _, all) => !all.some((q) => q !== p && p.startsWith(q + path.sep)));
  return {
    node: fs.statSync(fs.realpathSync(process.execPath)).size,
    npm: fs.existsSync(npmDir) ? bytes(npmDir) : 0,
    dependencies: packages.reduce((sum, p) => sum + bytes(p), 0),
    aeterna: bytes(path.join(ROOT, 'dist', 'src')) + bytes(path.join(ROOT, 'build', 'Release', 'aeterna.node')),
  };
}

async function main(): Promise<void> {
  if (!fs.existsSync(STANDALONE)) throw new Error(`${STANDALONE} is missing: run make standalone`);
  const runs = Number(option('--runs', '15'));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'aeterna-bench-standalone-'));
  const validate = ['validate', '-c', path.join(ROOT, 'examples', 'demo', 'aeterna.yaml')];
  const contenders = { standalone: [STANDALONE], node: NODE_CLI };
  const samples: Record<string, Record<string, number[]>> = { standalone: {}, node: {} };
  const add = (who: string, what: string, v: number): void => {
    (samples[who][what] ??= []).push(v);
  };
  try {
    for (let i = 0; i < runs; i++) {
      for (const [who, argv] of Object.entries(contenders)) {
        add(who, 'version_ms', timeCommand([...argv, '--version']));
        add(who, 'validate_ms', timeCommand([...argv, ...validate]));
      }
    }
    for (let i = 0; i < Math.max(3, Math.ceil(runs / 3)); i++) {
      for (const [who, argv] of Object.entries(contenders)) {
        const { readyMs, rssKiB } = await startAndRss(argv, dir);
        add(who, 'start_ready_ms', readyMs);
        add(who, 'daemon_rss_kib', rssKiB);
      }
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const install = nodeInstallBytes();
  const nodeTotal = Object.values(install).reduce((a, b) => a + b, 0);
  const result = {
    date: new Date().toISOString(),
    host: os.hostname(),
    cpus: os.cpus().length,
    node: process.version,
    runs,
    medians: Object.fromEntries(
      Object.keys(samples.node).map((what) => {
        const s = median(samples.standalone[what]);
        const n = median(samples.node[what]);
        return [
          what,
          { standalone: Number(s.toFixed(1)), node: Number(n.toFixed(1)), ratio: Number((s / n).toFixed(2)) },
        ];
      }),
    ),
    image_bytes: { standalone: fs.statSync(STANDALONE).size, node_install: install, node_install_total: nodeTotal },
  };
  const out = option('--out', '');
  if (out !== '') fs.writeFileSync(out, JSON.stringify(result, null, 2) + '\n');
  const mb = (b: number): string => `${(b / 1e6).toFixed(1)} MB`;
  const lines = [
    `| measure (median of ${runs}) | standalone | node bin/aeterna.js | standalone / node |`,
    '| --- | --- | --- | --- |',
    ...Object.entries(result.medians).map(([what, m]) => `| ${what} | ${m.standalone} | ${m.node} | ${m.ratio} |`),
    '',
    `Added to an image: standalone ${mb(result.image_bytes.standalone)} (one file); node + npm + dependencies + ` +
      `Aeterna ${mb(nodeTotal)} (${Object.entries(install)
        .map(([k, v]) => `${k} ${mb(v)}`)
        .join(', ')}).`,
  ];
  process.stdout.write(lines.join('\n') + '\n');
}

main().catch((err: unknown) => {
  process.stderr.write(`bench/standalone: ${(err as Error).message}\n`);
  process.exitCode = 1;
});

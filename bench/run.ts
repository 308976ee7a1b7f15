// `make bench` / `node dist/bench/run.js [options]`: Aeterna against the
// alternatives on this machine, in one run; writes a Markdown report, an SVG
// chart and the raw numbers (JSON) to --out. See bench/README.md.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ROOT, pidNamespaceUnavailable, progress, python, versionOf, which } from './common';
import { renderReport, type BenchMeta, type BenchResults, type SectionOutcome } from './report';
import { renderChart } from './svg';
import { reloadSection, type ReloadParams } from './sections/reloads';
import { overheadSection } from './sections/overhead';
import { relaySection } from './sections/relay';
import { footprintSection } from './sections/footprint';
import { reapingSection } from './sections/reaping';
import { relaySdkSection } from './sections/relay-sdk';
import { checkpointSection } from './sections/checkpoint';
import { canarySection } from './sections/canary';
import { upgradeSection } from './sections/upgrade';

const MiB = 1024 * 1024;
const SECTIONS = [
  'reloads',
  'overhead',
  'relay',
  'footprint',
  'reaping',
  'relaySdk',
  'checkpoint',
  'canary',
  'upgrade',
] as const;
type SectionName = (typeof SECTIONS)[number];

export interface BenchOptions {
  reloads: number;
  quick: boolean;
  outDir: string;
  connections: number;
  sections: SectionName[];
  contenders?: string[];
  wrk: boolean;
}

const USAGE = `usage: node dist/bench/run.js [options]   (or: make bench BENCH_ARGS="...")

  --reloads N        reloads per contender (default 20; 3 with --quick)
  --quick            a short run (few reloads, small states, few orphans): what CI runs
  --out DIR          where the report goes (default bench/results)
  --connections N    load generator connections (default 32; 8 with --quick)
  --sections LIST    comma-separated subset of: ${SECTIONS.join(', ')} (default: all)
  --contenders LIST  comma-separated subset of: aeterna-immediate, aeterna-canary, naive, pm2
  --no-wrk           skip the wrk cross-check even when wrk is installed
  -h, --help         this text
`;

export function parseArgs(argv: string[]): BenchOptions {
  let reloads: number | null = null;
  let connections: number | null = null;
  let quick = false;
  let outDir = path.join(ROOT, 'bench', 'results');
  let sections: SectionName[] = [...SECTIONS];
  let contenders: string[] | undefined;
  let wrk = true;
  const value = (i: number, flag: string): string => {
    const v = argv[i + 1];
    if (v === undefined || v.startsWith('--')) throw new Error(`${flag} needs a value`);
    return v;
  };
  const count = (v: string, flag: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 1) throw new Error(`${flag}: expected a whole number >= 1, got "${v}"`);
    return n;
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    switch (a) {
      case '--reloads':
        reloads = count(value(i, a), a);
        i++;
        break;
      case '--connections':
        connections = count(value(i, a), a);
        i++;
        break;
      case '--quick':
        quick = true;
        break;
      case '--out':
        outDir = path.resolve(value(i, a));
        i++;
        break;
      case '--sections': {
        const list = value(i, a)
          .split(',')
          .map((s) => s.trim());
        for (const s of list)
          if (!(SECTIONS as readonly string[]).includes(s))
            throw new Error(`--sections: unknown section "${s}" (known: ${SECTIONS.join(', ')})`);
        sections = list as SectionName[];
        i++;
        break;
      }
      case '--contenders':
        contenders = value(i, a)
          .split(',')
          .map((s) => s.trim());
        i++;
        break;
      case '--no-wrk':
        wrk = false;
        break;
      case '-h':
      case '--help':
        process.stdout.write(USAGE);
        process.exit(0);
        break;
      default:
        throw new Error(`unknown option "${a}"\n${USAGE}`);
    }
  }
  return {
    reloads: reloads ?? (quick ? 3 : 20),
    quick,
    outDir,
    connections: connections ?? (quick ? 8 : 32),
    sections,
    contenders,
    wrk,
  };
}

function git(args: string[]): string | null {
  try {
    return execFileSync('git', args, { cwd: ROOT, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  } catch {
    return null;
  }
}

function packageVersion(name: string): string | null {
  try {
    return (JSON.parse(fs.readFileSync(require.resolve(`${name}/package.json`), 'utf8')) as { version: string })
      .version;
  } catch {
    return null;
  }
}

function machine(): BenchMeta['machine'] {
  let distro = 'unknown';
  try {
    distro = fs.readFileSync('/etc/os-release', 'utf8').match(/^PRETTY_NAME="?([^"\n]*)"?/m)?.[1] ?? distro;
  } catch {
    // not Linux-like
  }
  const cpus = os.cpus();
  return {
    host: os.hostname(),
    cpu: cpus[0]?.model.trim() ?? 'unknown',
    cores: cpus.length,
    memoryGiB: os.totalmem() / 1024 ** 3,
    kernel: `${os.type()} ${os.release()} ${os.arch()}`,
    distro,
    loadavgAtStart: os.loadavg(),
    pid1: pidNamespaceUnavailable() ?? 'available (unshare --pid)',
  };
}

function versions(): BenchMeta['versions'] {
  const head = git(['rev-parse', '--short', 'HEAD']);
  const dirty = git(['status', '--porcelain']);
  const py = python();
  const tini = which('tini');
  const wrk = which('wrk');
  return {
    aeterna: `${(JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string }).version}${head ? ` (git ${head}${dirty ? ', with uncommitted changes' : ''})` : ''}`,
    node: process.version,
    autocannon: packageVersion('autocannon') ?? 'not installed',
    pm2: packageVersion('pm2') ?? 'not installed',
    python: py ? (versionOf([py, '--version']) ?? 'unknown') : 'not installed',
    tini: tini ? (versionOf([tini, '--version']) ?? 'installed') : 'not installed',
    wrk: wrk ? (versionOf([wrk, '--version'])?.split(' [')[0] ?? 'installed') : 'not installed',
    cc: versionOf(['cc', '--version']) ?? 'not installed',
  };
}

function reloadParams(o: BenchOptions): ReloadParams {
  const wrk = o.wrk ? which('wrk') : null;
  return {
    reloads: o.reloads,
    connections: o.connections,
    warmupMs: o.quick ? 300 : 2000,
    steadyMs: o.quick ? 500 : 3000,
    gapMs: o.quick ? 300 : 1000,
    tailMs: o.quick ? 400 : 2000,
    bucketMs: o.quick ? 100 : 250,
    settleMs: o.quick ? 150 : 500,
    soak: o.quick ? '300ms' : '1s',
    readinessDelay: '100ms',
    drainIdleMs: o.quick ? 200 : 500,
    wrk,
    wrkReloads: o.quick ? 1 : Math.min(o.reloads, 20),
    only: o.contenders,
  };
}

async function section<T>(name: SectionName, o: BenchOptions, body: () => Promise<T>): Promise<SectionOutcome<T>> {
  if (!o.sections.includes(name)) return { notRun: `not selected (--sections ${o.sections.join(',')})` };
  progress(`section ${name}`);
  const t0 = performance.now();
  try {
    const value = await body();
    progress(`section ${name} done in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    return { value };
  } catch (err) {
    progress(`section ${name} FAILED: ${(err as Error).stack ?? String(err)}`);
    return { error: (err as Error).message.slice(0, 2000) };
  }
}

export async function main(argv: string[]): Promise<number> {
  const o = parseArgs(argv);
  const started = new Date();
  const meta: BenchMeta = {
    date: started.toISOString().slice(0, 10),
    startedAt: started.toISOString(),
    finishedAt: '',
    command: `node dist/bench/run.js ${argv.join(' ')}`.trim(),
    quick: o.quick,
    machine: machine(),
    versions: versions(),
  };
  progress(
    `Aeterna benchmark (${o.quick ? 'quick' : 'full'}): ${o.reloads} reloads per contender; report to ${o.outDir}`,
  );
  const results: BenchResults = {
    meta,
    reloads: { notRun: '' },
    overhead: { notRun: '' },
    relay: { notRun: '' },
    footprint: { notRun: '' },
    reaping: { notRun: '' },
    relaySdk: { notRun: '' },
    checkpoint: { notRun: '' },
    canary: { notRun: '' },
    upgrade: { notRun: '' },
  };
  results.reloads = await section('reloads', o, () => reloadSection(reloadParams(o)));
  results.overhead = await section('overhead', o, () => overheadSection(o.reloads));
  results.relay = await section('relay', o, () =>
    relaySection(o.quick ? [1 * MiB, 16 * MiB] : [1 * MiB, 64 * MiB, 1024 * MiB]),
  );
  results.footprint = await section('footprint', o, () => footprintSection(o.quick ? 3 : 10, o.quick ? 300 : 1500));
  results.reaping = await section('reaping', o, () => reapingSection(o.quick ? 500 : 10000));
  results.relaySdk = await section('relaySdk', o, () =>
    relaySdkSection(o.quick ? [16 * MiB] : [64 * MiB, 1024 * MiB], o.quick ? 1 : 3),
  );
  results.checkpoint = await section('checkpoint', o, () =>
    checkpointSection(o.quick ? [1 * MiB] : [1 * MiB, 64 * MiB, 1024 * MiB], o.quick ? 2 : 5, o.quick ? 1 : 3),
  );
  results.canary = await section('canary', o, () =>
    canarySection({
      weights: [10, 50, 90],
      connections: o.quick ? 400 : 2000,
      switches: o.quick ? 1 : 10,
      keepAlive: 8,
      fresh: 4,
      requestsPerConnection: 50,
    }),
  );
  results.upgrade = await section('upgrade', o, () =>
    o.quick ? upgradeSection(2, 3, o.connections) : upgradeSection(10, 100, o.connections),
  );
  meta.finishedAt = new Date().toISOString();

  const base = `${meta.date}-${meta.machine.host.replace(/[^A-Za-z0-9_.-]/g, '_')}`;
  fs.mkdirSync(o.outDir, { recursive: true });
  const svgName = `${base}.svg`;
  const chart =
    'value' in results.reloads
      ? renderChart(results.reloads.value.contenders, {
          title: `Requests and failures across ${results.reloads.value.params.reloads} reloads`,
          subtitle: `${meta.machine.host}, ${meta.date}: the same keep-alive app, autocannon with ${results.reloads.value.params.connections} connections`,
        })
      : renderChart([], { title: 'Requests and failures across reloads (section not run)' });
  fs.writeFileSync(path.join(o.outDir, svgName), chart);
  fs.writeFileSync(path.join(o.outDir, `${base}.md`), renderReport(results, svgName));
  fs.writeFileSync(path.join(o.outDir, `${base}.json`), JSON.stringify(results, null, 1) + '\n');
  process.stdout.write(`${path.join(o.outDir, `${base}.md`)}\n`);
  const failed = SECTIONS.filter((s) => 'error' in results[s]);
  if (failed.length > 0) {
    progress(`sections that failed: ${failed.join(', ')} (see the report)`);
    return 1;
  }
  return 0;
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
    },
    (err: Error) => {
      process.stderr.write(`bench: ${err.message}\n`);
      process.exitCode = 2;
    },
  );
}

// The long reliability run (`make soak`): N consecutive reloads of a real
// daemon (as PID 1 of a fresh PID namespace when possible) under continuous
// HTTP load, with the state relay on (a 1 MiB state relayed at every reload)
// and outsiders knocking on the state socket; every few reloads the app also
// stores a checkpoint (kept in a memfd and written to its file) and parks an
// fd in the fd store (FDSTORE=1, replacing the one before), which every later
// generation receives. After the run it checks that no request failed, that
// the state arrived intact every time, that the checkpoints and the stored fd
// are Aeterna's latest, that Aeterna's fd count and RSS are flat, that no
// zombie is left and that every reload's record is complete. test/endurance/soak.test.ts runs the same code with a small count
// in CI; `make soak` runs 1,000 reloads and writes bench/results/soak-<date>.md.
//
// With --instances N each generation runs N processes (service.instances; --max-surge K makes each reload a
// rolling one): every instance's state is its own (tagged with its number) and is checked to arrive at the new
// instance of the same number, every instance must answer, and the checkpoints and fds are stored by each. The
// app prints numbered lines (state loads, stores, every few requests, bye): with --app-output prefixed or json
// Aeterna reads them through pipes, and the soak checks that every line came out whole, attributed to the process
// that wrote it, and that none was lost or doubled (each process says at its end how many it printed).
//
//   node dist/bench/soak.js [--reloads 1000] [--concurrency 8] [--state-bytes N] [--outsiders N] [--store-every 3]
//     [--instances 1] [--max-surge K] [--app-output raw|prefixed|json] [--line-every 500] [--no-pid1] [--out bench/results]
//
// The /proc helpers below are shared with the fault and hostile-input tests.
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { call } from '../src/control/client';
import type { ReloadEvent, ReloadRecord, StatusReport } from '../src/orchestrator/types';
import { ROOT, fixture, freePort, pidNamespaceUnavailable } from '../test/helpers/aeterna';
import { Daemon } from '../test/helpers/daemon';
import { getText, requestJson, startLoad, type LoadStats } from '../test/helpers/load';
import { procStat, type ProcStat } from '../src/supervisor/proctree';

// ---- /proc helpers ------------------------------------------------------------------------

export type ProcInfo = ProcStat;
/** /proc/<pid>/stat, or null when there is no such process (not even a zombie). */
export const procInfo = procStat;

/** Every process on the host (as seen from here). */
export function allProcesses(): ProcInfo[] {
  const out: ProcInfo[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const info = procInfo(Number(entry));
    if (info) out.push(info);
  }
  return out;
}

/** The processes of a generation: its root and everything in its session or process group. */
export function generationProcesses(root: number): number[] {
  return allProcesses()
    .filter((p) => p.pid === root || p.sid === root || p.pgrp === root)
    .map((p) => p.pid);
}

/** No /proc entry at all: exited and reaped. */
export function isGone(pid: number): boolean {
  return !fs.existsSync(`/proc/${pid}`);
}

export function fdCount(pid: number): number {
  return fs.readdirSync(`/proc/${pid}/fd`).length;
}

/**
 * The fd count at rest: the fewest seen over half a second. A connection that is still closing (the control
 * request that just asked for a status) is gone by then; a leaked fd never is.
 */
export async function fdCountAtRest(pid: number): Promise<number> {
  let fds = fdCount(pid);
  for (let i = 0; i < 10; i++) {
    await new Promise((r) => setTimeout(r, 50));
    fds = Math.min(fds, fdCount(pid));
  }
  return fds;
}

/** VmRSS in KiB. */
export function rssKiB(pid: number): number {
  const m = fs.readFileSync(`/proc/${pid}/status`, 'utf8').match(/^VmRSS:\s+(\d+) kB$/m);
  if (!m) throw new Error(`no VmRSS for ${pid}`);
  return Number(m[1]);
}

function pidNamespace(pid: number): string | null {
  try {
    return fs.readlinkSync(`/proc/${pid}/ns/pid`);
  } catch {
    return null;
  }
}

/** The pid as seen inside its own PID namespace (the last NSpid entry). */
function innerPid(pid: number): number | null {
  try {
    const m = fs.readFileSync(`/proc/${pid}/status`, 'utf8').match(/^NSpid:\s+(.*)$/m);
    if (!m) return null;
    const pids = m[1].trim().split(/\s+/);
    return Number(pids[pids.length - 1]);
  } catch {
    return null;
  }
}

/**
 * The pids that exist right now among `pids`, which are numbers as Aeterna
 * reports them (status, records): namespace pids when it runs as PID 1 there.
 */
export function stillPresent(pids: number[], aeternaPid: number, pid1: boolean): number[] {
  if (!pid1) return pids.filter((pid) => !isGone(pid));
  const ns = pidNamespace(aeternaPid);
  const inner = new Set<number>();
  for (const p of allProcesses()) if (pidNamespace(p.pid) === ns) inner.add(innerPid(p.pid) ?? -1);
  return pids.filter((pid) => inner.has(pid));
}

/**
 * Zombies Aeterna is responsible for: with pid1, every zombie in its PID
 * namespace; otherwise its own zombie children (it is their subreaper).
 */
export function zombies(aeternaPid: number, pid1: boolean): number[] {
  const ns = pid1 ? pidNamespace(aeternaPid) : null;
  return allProcesses()
    .filter(
      (p) => p.state === 'Z' && (pid1 ? p.pid !== aeternaPid && pidNamespace(p.pid) === ns : p.ppid === aeternaPid),
    )
    .map((p) => p.pid);
}

/** Poll until `check` returns a value that `done` accepts, or return the last value after guardMs (a hang guard). */
export async function settle<T>(check: () => T, done: (value: T) => boolean, guardMs = 5000, everyMs = 50): Promise<T> {
  const deadline = Date.now() + guardMs;
  for (;;) {
    const value = check();
    if (done(value) || Date.now() > deadline) return value;
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

// ---- the soak -----------------------------------------------------------------------------

/** The phases every promoted immediate reload goes through, in order. */
export const IMMEDIATE_PHASES = ['accepted', 'config', 'spawned', 'ready', 'draining', 'done'] as const;
/** The same with the state relay on: the state is relayed before the new generation counts as ready. */
export const IMMEDIATE_RELAY_PHASES = [
  'accepted',
  'config',
  'spawned',
  'relaying',
  'relayed',
  'ready',
  'draining',
  'done',
] as const;

/**
 * The phases of a promoted immediate reload with the relay on (or off) and `instances` processes per generation:
 * a rolling reload (max_surge below instances) goes through spawned, relaying, relayed, ready once per batch.
 */
export function reloadPhases(relay: boolean, instances = 1, maxSurge: number | null = null): string[] {
  const batch = relay ? ['spawned', 'relaying', 'relayed', 'ready'] : ['spawned', 'ready'];
  const batches = maxSurge === null ? 1 : Math.ceil(instances / Math.min(maxSurge, instances));
  return ['accepted', 'config', ...Array.from({ length: batches }, () => batch).flat(), 'draining', 'done'];
}

/** What is missing or wrong in a reload's record (empty when complete). */
export function recordProblems(
  record: ReloadRecord,
  events: ReloadEvent[],
  expected: readonly string[] = IMMEDIATE_PHASES,
): string[] {
  const problems: string[] = [];
  const phases = record.phases.map((p) => p.phase);
  if (JSON.stringify(phases) !== JSON.stringify(expected)) problems.push(`phases ${phases.join(',')}`);
  if (record.outcome !== 'promoted') problems.push(`outcome ${record.outcome} (${record.code}: ${record.reason})`);
  if (record.reason !== null || record.code !== null) problems.push('reason/code set on a promotion');
  if (typeof record.duration_ms !== 'number' || record.duration_ms < 0) problems.push('no duration');
  if (record.to_generation !== record.from_generation + 1)
    problems.push(`generation ${record.from_generation} -> ${record.to_generation}`);
  if (typeof record.new_pid !== 'number' || record.new_pid <= 0) problems.push('no new pid');
  if (Number.isNaN(Date.parse(record.started_at))) problems.push('no start time');
  if (record.phases.some((p) => Number.isNaN(Date.parse(p.at)))) problems.push('a phase without a time');
  const last = events[events.length - 1];
  if (!last || last.type !== 'outcome' || last.record.id !== record.id)
    problems.push('the event stream did not end with the outcome');
  const streamed = events.flatMap((e) => (e.type === 'phase' ? [e.phase] : []));
  if (JSON.stringify(streamed) !== JSON.stringify(phases)) problems.push(`streamed phases ${streamed.join(',')}`);
  return problems;
}

export interface SoakOptions {
  reloads: number;
  /** HTTP load loops (keep-alive). Default 8. */
  concurrency?: number;
  /** Run Aeterna as PID 1 of a new PID namespace (default: when possible). */
  pid1?: boolean;
  /** Reloads before the baseline is taken (V8 sizes its heap, lazy init settles). Default: min(50, reloads / 5). */
  warmup?: number;
  /** Bytes of app state relayed at every reload (binary, streamed by the TypeScript SDK); 0 turns the relay off. Default 1 MiB. */
  stateBytes?: number;
  /** Stranger connections to the state socket per reload (one sends a 1 MiB frame, the others stay idle). Default 4. */
  outsiders?: number;
  /** With the relay on, store a checkpoint and park an fd in the fd store every this many reloads. Default 3. */
  storeEvery?: number;
  /** service.instances: processes per generation. Default 1. Above 1 needs the relay (stateBytes > 0). */
  instances?: number;
  /** orchestration.max_surge (rolling reloads); default absent (the whole new set at once). */
  maxSurge?: number;
  /** observability.app_output. Default raw. */
  appOutput?: AppOutput;
  /** The app prints a line every this many requests it serves (besides its state, store and bye lines). Default 500. */
  lineEvery?: number;
  /** Progress lines (e.g. console.log); default silent. */
  progress?: (line: string) => void;
}

export type AppOutput = 'raw' | 'prefixed' | 'json';

// ---- the app's lines ----------------------------------------------------------------------

/** A numbered line of the app (SOAK_LINES in test/fixtures/apps/stateful_app.js), whole: it ends with " end". */
const SOAK_LINE = /^SOAK pid=(\d+) gen=(\d+) inst=(\d+) seq=(\d+) kind=(\w+)((?: \w+=\S*)*) pad=x* end$/;

interface SoakLine {
  pid: number;
  gen: number;
  inst: number;
  seq: number;
  kind: string;
  fields: Record<string, string>;
}

/** What the daemon's output says about the app's lines. */
export interface LineCheck {
  mode: AppOutput;
  /** The app's numbered lines found whole. */
  seen: number;
  /** What the processes said they printed (the sum of their "bye" counts). */
  printed: number;
  /** Lines of the stream that are not whole: a numbered line cut or joined with another, a prefix missing, JSON that does not parse. */
  broken: number;
  brokenExamples: string[];
  /** Lines whose prefix or JSON record names another generation, instance or pid than the line itself. */
  misattributed: number;
  /** App processes (one per generation and instance) that printed numbered lines, and how many were expected. */
  processes: number;
  expectedProcesses: number;
  /** Processes whose lines were not 1..n each once, or whose n is not what they said they printed, or that never said bye. */
  incomplete: number;
  incompleteExamples: string[];
}

/** The stream the app's stdout lines reach in each mode: Aeterna's stdout, or (json) its stderr as records. */
function appLines(
  run: { stdout: string; stderr: string },
  mode: AppOutput,
): { lines: Array<{ text: string; gen?: number; inst?: number; pid?: number }>; broken: string[] } {
  const broken: string[] = [];
  const lines: Array<{ text: string; gen?: number; inst?: number; pid?: number }> = [];
  const split = (text: string): string[] => text.split('\n').filter((l) => l !== '');
  if (mode === 'raw') return { lines: split(run.stdout).map((text) => ({ text })), broken };
  if (mode === 'prefixed') {
    for (const line of split(run.stdout)) {
      const m = /^\[generation (\d+) pid (\d+)\] (.*)$/.exec(line);
      if (m) lines.push({ text: m[3], gen: Number(m[1]), pid: Number(m[2]) });
      else broken.push(line);
    }
    return { lines, broken };
  }
  for (const line of split(run.stderr)) {
    let record: { name?: string; stream?: string; line?: string; generation?: number; instance?: number; pid?: number };
    try {
      record = JSON.parse(line) as typeof record;
    } catch {
      broken.push(line);
      continue;
    }
    if (record.name === 'app' && record.stream === 'stdout' && typeof record.line === 'string')
      lines.push({ text: record.line, gen: record.generation, inst: record.instance, pid: record.pid });
  }
  return { lines, broken };
}

/**
 * Every numbered line the app printed, parsed, and what is wrong with the stream: lines not whole, lines
 * attributed to another process, processes whose lines are missing or doubled.
 */
export function checkLines(
  run: { stdout: string; stderr: string },
  mode: AppOutput,
  expectedProcesses: number,
): { check: LineCheck; lines: SoakLine[] } {
  const { lines: raw, broken } = appLines(run, mode);
  const lines: SoakLine[] = [];
  let misattributed = 0;
  for (const l of raw) {
    if (!l.text.includes('SOAK pid=')) continue; // the app's other lines (READY ...)
    const m = SOAK_LINE.exec(l.text);
    if (!m) {
      broken.push(l.text);
      continue;
    }
    const line: SoakLine = {
      pid: Number(m[1]),
      gen: Number(m[2]),
      inst: Number(m[3]),
      seq: Number(m[4]),
      kind: m[5],
      fields: Object.fromEntries(
        m[6]
          .trim()
          .split(' ')
          .filter((f) => f !== '')
          .map((f) => [f.slice(0, f.indexOf('=')), f.slice(f.indexOf('=') + 1)]),
      ),
    };
    if (
      (l.gen !== undefined && l.gen !== line.gen) ||
      (l.pid !== undefined && l.pid !== line.pid) ||
      (l.inst !== undefined && l.inst !== line.inst)
    )
      misattributed++;
    lines.push(line);
  }
  const byProcess = new Map<string, SoakLine[]>();
  for (const l of lines) {
    const key = `generation ${l.gen} instance ${l.inst} pid ${l.pid}`;
    byProcess.set(key, [...(byProcess.get(key) ?? []), l]);
  }
  const incomplete: string[] = [];
  let printed = 0;
  for (const [key, own] of byProcess) {
    const seqs = own.map((l) => l.seq).sort((a, b) => a - b);
    const bye = own.find((l) => l.kind === 'bye');
    const said = bye ? Number(bye.fields.printed) : null;
    printed += said ?? 0;
    const whole = seqs.every((s, i) => s === i + 1);
    if (said === null) incomplete.push(`${key}: no bye (${seqs.length} lines)`);
    else if (!whole || seqs.length !== said)
      incomplete.push(`${key}: ${seqs.length} lines, seq ${seqs[0]}..${seqs[seqs.length - 1]}, said ${said}`);
  }
  return {
    check: {
      mode,
      seen: lines.length,
      printed,
      broken: broken.length,
      brokenExamples: broken.slice(0, 3).map((l) => l.slice(0, 200)),
      misattributed,
      processes: byProcess.size,
      expectedProcesses,
      incomplete: incomplete.length,
      incompleteExamples: incomplete.slice(0, 3),
    },
    lines,
  };
}

/**
 * Processes that are not the app connecting to the state socket: each must be refused at once, and none may
 * cost Aeterna memory or fds. Resolves with how many were answered `forbidden`.
 */
async function knock(socketPath: string, count: number): Promise<number> {
  const one = (i: number): Promise<boolean> =>
    new Promise((resolve) => {
      const socket = net.connect(socketPath);
      let got = '';
      socket.on('data', (c: Buffer) => (got += c.toString('latin1')));
      socket.on('error', () => undefined);
      socket.on('close', () => resolve(got.includes('"code":"forbidden"')));
      socket.on('connect', () => {
        if (i === 0) {
          const header = Buffer.alloc(4);
          header.writeUInt32BE(1 << 20);
          socket.write(Buffer.concat([header, Buffer.alloc(1 << 20, 0x20)]));
        }
      });
    });
  const answers = await Promise.all(Array.from({ length: count }, (_, i) => one(i)));
  return answers.filter(Boolean).length;
}

export interface Sample {
  reload: number;
  fds: number;
  rssKiB: number;
  /** V8 heap in use and external memory (from Aeterna's /metrics), to tell a JS leak from RSS that V8 or malloc keeps. */
  heapUsedKiB: number | null;
  externalKiB: number | null;
  /** The V8 heap's committed size: it grows in steps as V8 sizes its young generation (up to 16 MiB at once). */
  heapTotalKiB: number | null;
}

/** One sample line of a Prometheus text exposition, in KiB. */
function metricKiB(text: string, name: string): number | null {
  const line = text.split('\n').find((l) => l.startsWith(name + ' '));
  return line ? Math.round(Number(line.slice(name.length + 1)) / 1024) : null;
}

export interface SoakResult {
  reloads: number;
  promoted: number;
  pid1: boolean;
  concurrency: number;
  warmup: number;
  /** service.instances, orchestration.max_surge (null: absent) and observability.app_output of the run. */
  instances: number;
  maxSurge: number | null;
  appOutput: AppOutput;
  requests: LoadStats;
  /** The relayed state: its size, and whether it arrived intact (same sha256) after the last reload. */
  state: { bytes: number; intact: boolean | null };
  /**
   * Each instance's own state (tagged with its number), asked for before every reload and once at the end on new
   * connections until every instance of the serving generation answered: `checks` answers in all, `wrong` those
   * with another sha256 or tag than that instance's at the start, `unanswered` generations where an instance never
   * answered (it does not serve).
   */
  instanceState: { checks: number; wrong: string[]; unanswered: string[] };
  /** From the app's state lines: instance i of every later generation loaded instance i's original state (sha256 and tag). */
  stateLoads: { expected: number; ok: number; wrong: string[] };
  /** Generations in which every instance answered some of the keep-alive load (pids mapped through the app's lines). */
  loadCoverage: { generations: number; everyInstance: number };
  outsiders: { sent: number; refused: number };
  /**
   * Checkpoints the app stored (one per instance each time), the last one's seq, the one Aeterna holds at the end
   * (status), and per instance, where status has per-instance checkpoints, the last seq each stored and what it holds.
   */
  checkpoints: {
    stored: number;
    lastSeq: number | null;
    atEnd: number | null;
    lastSeqByInstance: Array<number | null>;
    atEndByInstance: Array<number | null> | null;
  };
  /**
   * fds each instance parked (FDSTORE=1, each replacing its last; `stored` counts the rounds), how many of the
   * later processes received the one their instance parked before, and the store's names at the end (instance 0's,
   * and each instance's).
   */
  fdstore: { stored: number; received: number; namesAtEnd: string[]; namesAtEndByInstance: string[][] };
  fds: { start: number; end: number };
  rssKiB: { start: number; end: number; max: number };
  samples: Sample[];
  /** The app's numbered lines as they came out of Aeterna (null without the relay: the plain app prints none). */
  lines: LineCheck | null;
  /** Zombies left at the end (after a short settle). */
  zombiesAtEnd: number;
  /** Processes of old generations still alive at the end. */
  leftoverProcesses: number[];
  /** The serving generation's root was found by the same check (so the leftover check can fail). */
  servingSeen: boolean;
  /** Reloads whose record or event stream was incomplete, with what was wrong. */
  incomplete: Array<{ id: string; problems: string[] }>;
  reloadMs: { min: number; median: number; p99: number; max: number };
  durationMs: number;
  daemonExitCode: number | null;
}

const PLAIN_APP = [process.execPath, fixture('apps', 'reload_app.js')];
/** The state relay fixture: keeps a binary blob in memory and relays it with aeterna/client at every reload. */
const STATEFUL_APP = [process.execPath, fixture('apps', 'stateful_app.js')];

/** What GET /blob answers (BLOB_TAG_INSTANCE=1). */
interface BlobAnswer {
  pid: number;
  generation: string;
  instance: number;
  size: number;
  sha256: string | null;
  tag: string | null;
}

/**
 * A request meant for instance `instance`, sent on new connections until that instance takes one (the kernel
 * picks the process that accepts each; the others answer `misdirected` and do nothing). A hang guard bounds the
 * number of tries, not the time.
 */
async function toInstance<T>(port: number, method: string, pathname: string, instance: number): Promise<T> {
  for (let tries = 0; tries < 5000; tries++) {
    const r = await requestJson<T & { misdirected?: boolean }>(port, method, `${pathname}?instance=${instance}`);
    if (!r.misdirected) return r;
  }
  throw new Error(`instance ${instance} never took ${method} ${pathname}`);
}

export async function runSoak(options: SoakOptions): Promise<SoakResult> {
  const began = Date.now();
  const pid1 = options.pid1 ?? pidNamespaceUnavailable() === null;
  const concurrency = options.concurrency ?? 8;
  const warmup = options.warmup ?? Math.min(50, Math.floor(options.reloads / 5));
  const progress = options.progress ?? ((): void => undefined);
  const stateBytes = options.stateBytes ?? 1 << 20;
  const instances = options.instances ?? 1;
  const maxSurge = options.maxSurge ?? null;
  const appOutput = options.appOutput ?? 'raw';
  const lineEvery = options.lineEvery ?? 500;
  if (stateBytes === 0 && (instances > 1 || appOutput !== 'raw'))
    throw new Error(
      'several instances and app_output need the state relay (the plain app has no instance state, no lines)',
    );
  const outsiders = stateBytes > 0 ? (options.outsiders ?? 4) : 0;
  const port = await freePort();
  const metricsPort = await freePort();
  const storeEvery = stateBytes > 0 ? (options.storeEvery ?? 3) : 0;
  // max_surge is a key of orchestration: it follows readiness (the config helper has no field for it).
  const surgeLine = maxSurge === null ? '' : `\n  max_surge: ${maxSurge}`;
  const d =
    stateBytes > 0
      ? new Daemon({
          command: STATEFUL_APP,
          port,
          metricsPort,
          handoff: true,
          env: [
            'STATE_MODE=binary',
            `BLOB_BYTES=${stateBytes}`,
            'BLOB_TAG_INSTANCE=1',
            `SOAK_LINES=${lineEvery}`,
            // raw: the app's writes reach Aeterna's stdout as they are, so only a line written at once is whole.
            ...(appOutput === 'raw' ? [] : ['SPLIT_WRITES=1']),
          ],
          readiness: `{ mode: "notify", timeout: "20s" }${surgeLine}`,
          extraService: `  fdstore_max: 4\n${instances > 1 ? `  instances: ${instances}\n` : ''}`,
        })
      : new Daemon({
          command: PLAIN_APP,
          port,
          metricsPort,
          readiness: `{ mode: "delay", delay: "100ms", timeout: "20s" }${surgeLine}`,
        });
  // Checkpoints kept in memory and written to their file.
  if (stateBytes > 0)
    d.write({
      ...d.options,
      handoff: `{ enabled: true, socket_path: "${d.dir}/state.sock", timeout: "20s", checkpoint: { enabled: true, path: "${d.dir}/state.checkpoint" } }`,
    });
  const expectedPhases = reloadPhases(stateBytes > 0, instances, maxSurge);
  // Debug logging of 1,000 reloads is a lot of text for the harness to buffer: info is enough here.
  fs.writeFileSync(
    d.configFile,
    fs.readFileSync(d.configFile, 'utf8').replace('log_level: "debug"', 'log_level: "info"'),
  );
  // observability is the config's last section: its key goes at the end.
  if (appOutput !== 'raw') fs.appendFileSync(d.configFile, `  app_output: "${appOutput}"\n`);
  d.start(pid1);
  const socketPath = path.join(d.dir, 'control.sock');
  const status = async (): Promise<StatusReport> => {
    const r = await call(socketPath, { cmd: 'status' });
    if (!('status' in r)) throw new Error(`status answered ${JSON.stringify(r)}`);
    return r.status;
  };
  try {
    await d.waitStatus((s) => s.state === 'Running', 30000);
    const aeterna = await d.run.aeternaPid();
    const blob = async (): Promise<{ size: number; sha256: string | null }> =>
      JSON.parse((await getText(port, '/blob')).body) as { size: number; sha256: string | null };
    const firstBlob = stateBytes > 0 ? await blob() : null;
    let outsidersRefused = 0;
    const checkpoints: SoakResult['checkpoints'] = {
      stored: 0,
      lastSeq: null,
      atEnd: null,
      lastSeqByInstance: Array.from({ length: instances }, () => null),
      atEndByInstance: null,
    };
    const fdstore: SoakResult['fdstore'] = { stored: 0, received: 0, namesAtEnd: [], namesAtEndByInstance: [] };
    const instanceState: SoakResult['instanceState'] = { checks: 0, wrong: [], unanswered: [] };
    /** Each instance's state at the start: the sha256 of the blob instance i made. */
    const originals = new Map<number, string>();
    /**
     * Every instance of the serving generation answers GET /blob on a new connection (the kernel picks the
     * process of each) with its own state: instance i's original sha256 and tag i.
     */
    const checkInstances = async (): Promise<void> => {
      const generation = String((await status()).generation);
      const answered = new Set<number>();
      for (let tries = 0; tries < 5000 && answered.size < instances; tries++) {
        const b = JSON.parse((await getText(port, '/blob')).body) as BlobAnswer;
        if (b.generation !== generation || answered.has(b.instance)) continue;
        answered.add(b.instance);
        instanceState.checks++;
        if (!originals.has(b.instance) && b.sha256 !== null) originals.set(b.instance, b.sha256);
        if (b.sha256 !== originals.get(b.instance) || b.tag !== String(b.instance) || b.size !== stateBytes)
          instanceState.wrong.push(
            `generation ${generation} instance ${b.instance}: ${b.size} bytes, sha256 ${b.sha256}, tag ${b.tag}`,
          );
      }
      if (answered.size < instances)
        instanceState.unanswered.push(`generation ${generation}: only instances ${[...answered].join(', ')}`);
    };
    /**
     * Each instance stores a checkpoint of its state now, then parks an fd as soak-<k> in place of soak-<k-1>.
     * The datagrams reach Aeterna on their own time (sd_notify has no answer): wait until each instance's store
     * holds soak-<k> alone, so that the next generation's instance of that number receives it.
     */
    const store = async (): Promise<void> => {
      for (let i = 0; i < instances; i++) {
        const c = await toInstance<{ seq?: number; error?: string }>(port, 'POST', '/checkpoint', i);
        if (typeof c.seq !== 'number') throw new Error(`checkpoint refused: ${JSON.stringify(c)}`);
        checkpoints.stored++;
        checkpoints.lastSeq = c.seq;
        checkpoints.lastSeqByInstance[i] = c.seq;
      }
      const k = fdstore.stored + 1;
      for (let i = 0; i < instances; i++) {
        const f = await toInstance<{ stored: boolean; received: string }>(port, 'POST', `/fdstore/${k}`, i);
        if (!f.stored) throw new Error(`instance ${i} could not park its fd`);
        if (f.received.split(':').includes(`soak-${k - 1}`)) fdstore.received++;
      }
      fdstore.stored = k;
      const want = JSON.stringify([`soak-${k}`]);
      const names = (s: StatusReport): string[] =>
        instances > 1 ? (s.instances ?? []).map((i) => JSON.stringify(i.fdstore)) : [JSON.stringify(s.fdstore)];
      for (const deadline = Date.now() + 20000; ;) {
        const now = names(await status());
        if (now.length === instances && now.every((n) => n === want)) break;
        if (Date.now() > deadline) throw new Error(`the fd stores hold ${now.join(' ')}, not soak-${k} each`);
        await new Promise((res) => setTimeout(res, 20));
      }
    };
    const load = startLoad(port, { concurrency });
    const samples: Sample[] = [];
    const incomplete: SoakResult['incomplete'] = [];
    const durations: number[] = [];
    const oldRoots: number[] = [];
    let promoted = 0;
    let start: Sample | null = null;
    const every = Math.max(1, Math.floor(options.reloads / 20));
    const sample = async (reload: number): Promise<Sample> => {
      // The reload answers at promotion: the old generation (its relay connection with it) may still be retiring.
      for (const deadline = Date.now() + 30000; Date.now() < deadline;) {
        const r = await call(socketPath, { cmd: 'status' });
        if (!('status' in r) || r.status.retiring.length === 0) break;
        await new Promise((res) => setTimeout(res, 20));
      }
      // A control connection of the reload just answered may still be closing.
      const fds = await fdCountAtRest(aeterna);
      const rss = rssKiB(aeterna);
      const metrics = (await getText(metricsPort, '/metrics')).body;
      return {
        reload,
        fds,
        rssKiB: rss,
        heapUsedKiB: metricKiB(metrics, 'aeterna_nodejs_heap_size_used_bytes'),
        externalKiB: metricKiB(metrics, 'aeterna_nodejs_external_memory_bytes'),
        heapTotalKiB: metricKiB(metrics, 'aeterna_nodejs_heap_size_total_bytes'),
      };
    };
    try {
      for (let i = 1; i <= options.reloads; i++) {
        if (outsiders > 0) outsidersRefused += await knock(path.join(d.dir, 'state.sock'), outsiders);
        if (storeEvery > 0 && i % storeEvery === 0) await store();
        if (stateBytes > 0) await checkInstances();
        const before = await status();
        for (const inst of before.instances ?? [])
          if (inst.pid !== null && !oldRoots.includes(inst.pid)) oldRoots.push(inst.pid);
        if (before.pid !== null && !oldRoots.includes(before.pid)) oldRoots.push(before.pid);
        const events: ReloadEvent[] = [];
        const result = await call(socketPath, { cmd: 'reload', wait: true }, (e) => events.push(e));
        if (!('record' in result)) throw new Error(`reload ${i}: no record in ${JSON.stringify(result)}`);
        const record = result.record;
        if (record.outcome === 'promoted') promoted++;
        if (record.duration_ms !== null) durations.push(record.duration_ms);
        const problems = recordProblems(record, events, expectedPhases);
        if (problems.length > 0) incomplete.push({ id: record.id, problems });
        if (i === warmup || (warmup === 0 && i === 1)) {
          start = await sample(i);
          samples.push(start);
        } else if (i % every === 0 || i === options.reloads) {
          const s = await sample(i);
          samples.push(s);
          progress(
            `reload ${i}/${options.reloads}: fds ${s.fds}, rss ${(s.rssKiB / 1024).toFixed(1)} MiB, ok ${load.stats.ok}, failed ${load.stats.failed}`,
          );
        }
      }
      if (stateBytes > 0) {
        // The last generation's instances, once every one is ready (a rolling reload's promotion waits for it too).
        await d.waitStatus((s) => ((s as StatusReport).instances ?? []).every((i) => i.state === 'ready'), 30000);
        await checkInstances();
      }
    } finally {
      await load.stop();
    }
    const requests = load.stats;
    const end = samples[samples.length - 1];
    const lastBlob = firstBlob ? await blob() : null;
    const leftoverProcesses = await settle(
      () => stillPresent(oldRoots, aeterna, pid1),
      (l) => l.length === 0,
      5000,
    );
    // A positive control for the leftover check: the serving generation must be seen as present.
    const serving = await status();
    const servingSeen = serving.pid !== null && stillPresent([serving.pid], aeterna, pid1).length === 1;
    checkpoints.atEnd = serving.checkpoint?.seq ?? null;
    // Per-instance checkpoints where status reports them (instances[i].checkpoint), else only the service's.
    const perInstanceCheckpoints = (serving.instances ?? []).map(
      (i) => (i as { checkpoint?: { seq: number } | null }).checkpoint,
    );
    if (instances > 1 && perInstanceCheckpoints.length > 0 && perInstanceCheckpoints.every((c) => c !== undefined))
      checkpoints.atEndByInstance = perInstanceCheckpoints.map((c) => c?.seq ?? null);
    fdstore.namesAtEnd = serving.fdstore;
    fdstore.namesAtEndByInstance = (serving.instances ?? []).map((i) => i.fdstore);
    const zombiesAtEnd = (
      await settle(
        () => zombies(aeterna, pid1),
        (z) => z.length === 0,
        5000,
      )
    ).length;
    const daemonExitCode = await d.stop();
    // Every process said bye at its SIGTERM (the last generation's at this stop): its lines are all out now.
    const generations = options.reloads + 1;
    const parsed = stateBytes > 0 ? checkLines(d.run, appOutput, generations * instances) : null;
    const stateLoads: SoakResult['stateLoads'] = { expected: options.reloads * instances, ok: 0, wrong: [] };
    const loadCoverage: SoakResult['loadCoverage'] = { generations, everyInstance: 0 };
    if (parsed) {
      for (const l of parsed.lines) {
        if (l.kind !== 'state' || l.fields.source === 'made') continue;
        const fine =
          l.fields.source === 'relay' && l.fields.sha === originals.get(l.inst) && l.fields.tag === String(l.inst);
        if (fine) stateLoads.ok++;
        else
          stateLoads.wrong.push(
            `generation ${l.gen} instance ${l.inst}: source ${l.fields.source}, sha256 ${l.fields.sha}, tag ${l.fields.tag}`,
          );
      }
      const whose = new Map(parsed.lines.map((l) => [l.pid, l]));
      const servedBy = new Map<number, Set<number>>();
      for (const pid of requests.pids) {
        const l = whose.get(pid);
        if (l) servedBy.set(l.gen, (servedBy.get(l.gen) ?? new Set()).add(l.inst));
      }
      loadCoverage.everyInstance = [...servedBy.values()].filter((s) => s.size === instances).length;
    }
    durations.sort((a, b) => a - b);
    const q = (f: number): number => durations[Math.min(durations.length - 1, Math.floor(f * durations.length))] ?? 0;
    return {
      reloads: options.reloads,
      promoted,
      pid1,
      concurrency,
      warmup,
      instances,
      maxSurge,
      appOutput,
      requests,
      state: {
        bytes: stateBytes,
        // One instance: the blob the same at the end as at the start. Several: each instance's (the load picks
        // which instance answers a GET), checked by instance below; both need every relayed load to be right.
        intact:
          firstBlob && lastBlob
            ? (instances > 1 || (firstBlob.size === stateBytes && lastBlob.sha256 === firstBlob.sha256)) &&
              instanceState.wrong.length === 0 &&
              stateLoads.wrong.length === 0 &&
              stateLoads.ok === stateLoads.expected
            : null,
      },
      instanceState,
      stateLoads,
      loadCoverage,
      outsiders: { sent: outsiders * options.reloads, refused: outsidersRefused },
      checkpoints,
      fdstore,
      fds: { start: start!.fds, end: end.fds },
      rssKiB: { start: start!.rssKiB, end: end.rssKiB, max: Math.max(...samples.map((s) => s.rssKiB)) },
      samples,
      lines: parsed?.check ?? null,
      zombiesAtEnd,
      leftoverProcesses,
      servingSeen,
      incomplete,
      reloadMs: { min: durations[0] ?? 0, median: q(0.5), p99: q(0.99), max: durations[durations.length - 1] ?? 0 },
      durationMs: Date.now() - began,
      daemonExitCode,
    };
  } finally {
    // A soak that threw: the daemon with every generation (as PID 1, killing unshare alone would leave it running).
    await d.run.killAll();
  }
}

/** The problems that fail a soak (empty when it passed). */
/**
 * How Aeterna's memory grew from the baseline to the last sample, told apart: RSS outside the V8 heap's committed size
 * (native memory, buffers: where a leak of fds' buffers or of relayed states shows), and the V8 heap in use (a JS
 * leak). The heap's committed size itself is left out: V8 grows its young generation in one step of up to 16 MiB at a
 * moment that depends on the load, which in a short run decided whether RSS rose 3 or 19 MiB.
 */
export function memoryGrowthKiB(r: SoakResult): { outsideHeap: number; heapUsed: number } {
  const first = r.samples.find((s) => s.reload === r.warmup) ?? r.samples[0]; // the baseline, after the warm-up
  const last = r.samples[r.samples.length - 1];
  const heapTotal = (s: Sample): number => s.heapTotalKiB ?? 0;
  return {
    outsideHeap: last.rssKiB - heapTotal(last) - (first.rssKiB - heapTotal(first)),
    heapUsed: (last.heapUsedKiB ?? 0) - (first.heapUsedKiB ?? 0),
  };
}

export function soakFailures(r: SoakResult, rssBoundKiB = 20 * 1024): string[] {
  const out: string[] = [];
  if (r.promoted !== r.reloads) out.push(`${r.reloads - r.promoted} reloads not promoted`);
  if (r.requests.failed !== 0) out.push(`${r.requests.failed} failed requests: ${JSON.stringify(r.requests.failures)}`);
  if (r.requests.ok === 0) out.push('no request was served');
  if (r.state.intact === false) out.push(`the ${r.state.bytes}-byte state did not survive the reloads intact`);
  if (r.instanceState.wrong.length !== 0)
    out.push(`${r.instanceState.wrong.length} instances answered with another state, e.g. ${r.instanceState.wrong[0]}`);
  if (r.instanceState.unanswered.length !== 0)
    out.push(
      `not every instance answered in ${r.instanceState.unanswered.length} generations, e.g. ${r.instanceState.unanswered[0]}`,
    );
  if (r.state.bytes > 0 && (r.stateLoads.ok !== r.stateLoads.expected || r.stateLoads.wrong.length !== 0))
    out.push(
      `${r.stateLoads.ok} of ${r.stateLoads.expected} relayed loads were the instance's own state${r.stateLoads.wrong.length ? `, e.g. ${r.stateLoads.wrong[0]}` : ''}`,
    );
  const l = r.lines;
  if (l !== null) {
    if (l.broken !== 0) out.push(`${l.broken} output lines not whole, e.g. ${JSON.stringify(l.brokenExamples[0])}`);
    if (l.misattributed !== 0) out.push(`${l.misattributed} app lines attributed to another process`);
    if (l.processes !== l.expectedProcesses)
      out.push(`lines from ${l.processes} app processes, ${l.expectedProcesses} expected`);
    if (l.incomplete !== 0 || l.seen !== l.printed)
      out.push(
        `${l.seen} of ${l.printed} app lines came out; ${l.incomplete} processes incomplete, e.g. ${l.incompleteExamples[0]}`,
      );
  }
  if (r.outsiders.refused !== r.outsiders.sent)
    out.push(`${r.outsiders.sent - r.outsiders.refused} of ${r.outsiders.sent} outsider connections were not refused`);
  const c = r.checkpoints;
  if (c.stored > 0 && c.atEndByInstance === null && c.atEnd !== c.lastSeq)
    out.push(`Aeterna holds checkpoint ${c.atEnd}, not the last one stored (${c.lastSeq})`);
  if (
    c.stored > 0 &&
    c.atEndByInstance !== null &&
    JSON.stringify(c.atEndByInstance) !== JSON.stringify(c.lastSeqByInstance)
  )
    out.push(
      `Aeterna holds checkpoints ${JSON.stringify(c.atEndByInstance)} by instance, not the last ones stored (${JSON.stringify(c.lastSeqByInstance)})`,
    );
  const want = JSON.stringify([`soak-${r.fdstore.stored}`]);
  const names = r.instances > 1 ? r.fdstore.namesAtEndByInstance : [r.fdstore.namesAtEnd];
  if (
    r.fdstore.stored > 0 &&
    (names.length !== r.instances ||
      names.some((n) => JSON.stringify(n) !== want) ||
      r.fdstore.received !== (r.fdstore.stored - 1) * r.instances)
  ) {
    out.push(
      `fd store: ${JSON.stringify(names)} at the end (soak-${r.fdstore.stored} alone in each expected); ${r.fdstore.received} of ${(r.fdstore.stored - 1) * r.instances} processes received the fd their instance parked before`,
    );
  }
  if (r.fds.end > r.fds.start) out.push(`fd count grew ${r.fds.start} -> ${r.fds.end}`);
  const grown = memoryGrowthKiB(r);
  if (grown.outsideHeap > rssBoundKiB)
    out.push(`RSS outside the V8 heap grew by ${grown.outsideHeap} KiB (RSS ${r.rssKiB.start} -> ${r.rssKiB.end} KiB)`);
  if (grown.heapUsed > rssBoundKiB) out.push(`the V8 heap in use grew by ${grown.heapUsed} KiB`);
  if (r.zombiesAtEnd !== 0) out.push(`${r.zombiesAtEnd} zombies at the end`);
  if (r.leftoverProcesses.length !== 0)
    out.push(`old generation processes still alive: ${r.leftoverProcesses.join(' ')}`);
  if (!r.servingSeen) out.push('the serving generation was not found by the leftover check: the check is broken');
  if (r.incomplete.length !== 0)
    out.push(`${r.incomplete.length} incomplete records, e.g. ${JSON.stringify(r.incomplete[0])}`);
  if (r.daemonExitCode !== 0) out.push(`aeterna exited ${r.daemonExitCode}`);
  return out;
}

export function formatReport(r: SoakResult, failures: string[], when = new Date()): string {
  const mib = (kib: number): string => `${(kib / 1024).toFixed(1)} MiB`;
  const lines = [
    `# Soak run, ${when.toISOString().slice(0, 10)}`,
    '',
    r.state.bytes > 0
      ? `\`make soak\` (\`node dist/bench/soak.js\`): ${r.reloads} consecutive \`immediate\` reloads of \`test/fixtures/apps/stateful_app.js\` with the state relay on: a ${r.state.bytes}-byte binary state relayed at every reload by the TypeScript SDK (its first dump on the direct transport's socket pair, its final sync as data frames through Aeterna), and ${r.outsiders.sent / r.reloads} stranger connections to the state socket before each (one sending a 1 MiB frame); every few reloads the app stored a checkpoint (a memfd in Aeterna, and its file) and parked a memfd in the fd store in place of the last one`
      : `\`make soak\` (\`node dist/bench/soak.js\`): ${r.reloads} consecutive \`immediate\` reloads of \`test/fixtures/apps/reload_app.js\` (state relay off)`,
    `under continuous keep-alive HTTP load (${r.concurrency} loops), Aeterna ${r.pid1 ? 'as PID 1 of a fresh PID namespace' : 'as a subreaper (not PID 1)'};`,
    `\`service.instances: ${r.instances}\`${r.maxSurge === null ? '' : `, \`orchestration.max_surge: ${r.maxSurge}\` (rolling reloads)`}, \`observability.app_output: ${r.appOutput}\`${r.lines ? ` (the app printed numbered lines: its state loads, stores, one every few requests, and a last one with its count; ${r.appOutput === 'raw' ? 'each in one write' : 'each in two writes'})` : ''}.`,
    `Baseline taken after ${r.warmup} warm-up reloads. Host: ${os.cpus().length} CPUs, ${os.type()} ${os.release()}, Node ${process.version}.`,
    '',
    `**Result: ${failures.length === 0 ? 'PASS' : 'FAIL'}**${failures.length ? `: ${failures.join('; ')}` : ''}`,
    '',
    '| measure | value |',
    '| --- | --- |',
    `| reloads promoted | ${r.promoted} / ${r.reloads} |`,
    `| state relayed at every reload / intact at the end | ${r.state.bytes} bytes / ${r.state.intact === null ? 'n/a' : r.state.intact ? 'yes (same sha256)' : 'NO'} |`,
    `| each instance's own state (sha256 and tag) answered before each reload / wrong / generations with an instance not answering | ${r.instanceState.checks} / ${r.instanceState.wrong.length} / ${r.instanceState.unanswered.length} |`,
    `| relayed loads that were the instance's own state (app's lines) | ${r.stateLoads.ok} / ${r.stateLoads.expected} |`,
    `| generations whose every instance answered some of the keep-alive load | ${r.loadCoverage.everyInstance} / ${r.loadCoverage.generations} |`,
    ...(r.lines
      ? [
          `| app lines out / printed (said by each process at its end) | ${r.lines.seen} / ${r.lines.printed} |`,
          `| app processes with lines / expected, incomplete | ${r.lines.processes} / ${r.lines.expectedProcesses}, ${r.lines.incomplete} |`,
          `| output lines not whole / app lines attributed to another process | ${r.lines.broken} / ${r.lines.misattributed} |`,
        ]
      : []),
    `| outsider connections refused | ${r.outsiders.refused} / ${r.outsiders.sent} |`,
    `| checkpoints stored (1 MiB, memfd and file) / Aeterna's at the end | ${r.checkpoints.stored} (last seq ${r.checkpoints.lastSeq ?? '-'}) / seq ${r.checkpoints.atEnd ?? '-'}${r.checkpoints.atEndByInstance ? ` (by instance ${JSON.stringify(r.checkpoints.atEndByInstance)})` : ''} |`,
    `| fds parked in the fd store (each replacing the last${r.instances > 1 ? ', by each instance' : ''}) / received by the next generation / names at the end | ${r.fdstore.stored} / ${r.fdstore.received} / ${JSON.stringify(r.instances > 1 ? r.fdstore.namesAtEndByInstance : r.fdstore.namesAtEnd)} |`,
    `| requests served / failed | ${r.requests.ok} / ${r.requests.failed}${r.requests.failed ? ` (${JSON.stringify(r.requests.failures)})` : ''} |`,
    `| Aeterna fds, start → end | ${r.fds.start} → ${r.fds.end} |`,
    `| Aeterna RSS, start → end (max) | ${mib(r.rssKiB.start)} → ${mib(r.rssKiB.end)} (${mib(r.rssKiB.max)}) |`,
    `| zombies at the end | ${r.zombiesAtEnd} |`,
    `| old-generation processes left | ${r.leftoverProcesses.length} |`,
    `| incomplete reload records | ${r.incomplete.length} |`,
    `| reload duration min / median / p99 / max | ${r.reloadMs.min} / ${r.reloadMs.median} / ${r.reloadMs.p99} / ${r.reloadMs.max} ms |`,
    `| Aeterna exit code after SIGTERM | ${r.daemonExitCode} |`,
    `| wall time | ${(r.durationMs / 1000).toFixed(0)} s |`,
    '',
    '## Samples',
    '',
    '| after reload | fds | RSS | V8 heap used | external |',
    '| --- | --- | --- | --- | --- |',
    ...r.samples.map(
      (s) =>
        `| ${s.reload} | ${s.fds} | ${mib(s.rssKiB)} | ${s.heapUsedKiB === null ? '?' : mib(s.heapUsedKiB)} | ${s.externalKiB === null ? '?' : mib(s.externalKiB)} |`,
    ),
    '',
  ];
  return lines.join('\n');
}

function parseArgs(argv: string[]): SoakOptions & { out: string } {
  const opts: SoakOptions & { out: string } = { reloads: 1000, out: path.join(ROOT, 'bench', 'results') };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = (): string => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${a} needs a value`);
      return v;
    };
    if (a === '--reloads') opts.reloads = Number(value());
    else if (a === '--concurrency') opts.concurrency = Number(value());
    else if (a === '--warmup') opts.warmup = Number(value());
    else if (a === '--state-bytes') opts.stateBytes = Number(value());
    else if (a === '--outsiders') opts.outsiders = Number(value());
    else if (a === '--store-every') opts.storeEvery = Number(value());
    else if (a === '--instances') opts.instances = Number(value());
    else if (a === '--max-surge') opts.maxSurge = Number(value());
    else if (a === '--app-output') opts.appOutput = value() as AppOutput;
    else if (a === '--line-every') opts.lineEvery = Number(value());
    else if (a === '--no-pid1') opts.pid1 = false;
    else if (a === '--out') opts.out = value();
    else
      throw new Error(
        `unknown argument ${a} (known: --reloads N, --concurrency N, --warmup N, --state-bytes N, --outsiders N, --store-every N, --instances N, --max-surge K, --app-output raw|prefixed|json, --line-every N, --no-pid1, --out DIR)`,
      );
  }
  if (!Number.isInteger(opts.reloads) || opts.reloads < 1) throw new Error('--reloads must be a positive integer');
  if (
    opts.instances !== undefined &&
    !(Number.isInteger(opts.instances) && opts.instances >= 1 && opts.instances <= 64)
  )
    throw new Error('--instances must be an integer 1..64 (service.instances)');
  if (opts.maxSurge !== undefined && !(Number.isInteger(opts.maxSurge) && opts.maxSurge >= 1 && opts.maxSurge <= 64))
    throw new Error('--max-surge must be an integer 1..64 (orchestration.max_surge)');
  if (opts.appOutput !== undefined && !['raw', 'prefixed', 'json'].includes(opts.appOutput))
    throw new Error('--app-output must be raw, prefixed or json');
  if (opts.lineEvery !== undefined && !(Number.isInteger(opts.lineEvery) && opts.lineEvery >= 1))
    throw new Error('--line-every must be a positive integer');
  return opts;
}

async function main(): Promise<void> {
  const opts = parseArgs(process.argv.slice(2));
  console.log(
    `soak: ${opts.reloads} reloads under load, ${opts.instances ?? 1} instances${opts.maxSurge ? `, max_surge ${opts.maxSurge}` : ''}, app_output ${opts.appOutput ?? 'raw'}...`,
  );
  const result = await runSoak({ ...opts, progress: (l) => console.log(l) });
  const failures = soakFailures(result);
  const when = new Date();
  const report = formatReport(result, failures, when);
  fs.mkdirSync(opts.out, { recursive: true });
  const file = path.join(opts.out, `soak-${when.toISOString().slice(0, 10)}.md`);
  fs.writeFileSync(file, report);
  console.log(report);
  console.log(`written to ${path.relative(process.cwd(), file)}`);
  process.exit(failures.length === 0 ? 0 : 1);
}

if (require.main === module) {
  main().catch((err: unknown) => {
    console.error(err);
    process.exit(2);
  });
}

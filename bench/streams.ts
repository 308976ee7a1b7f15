// Long-lived streams across reloads: N concurrent SSE streams (the demo agent's answers, one token every 100 ms)
// through K reloads, with connection handoff (the streams move to each new generation) and, beside it in the
// same run, with the drain only (no state relay: the old generation drains, and stop_timeout cuts what is left).
// Counts what the clients saw (streams cut, tokens missing or repeated), how long each old generation lived after
// its final sync was acknowledged (from Aeterna's log), and Aeterna's fds and RSS before and after. The peer in the
// same run: pm2's cluster reload of the same agent (bench/fixtures/pm2-streams.config.js).
//
// Then the same for N WebSocket sessions (test/fixtures/apps/ws_app.js, the ws package), each sending a message
// every 200 ms: sessions closed, messages unanswered, replies repeated or out of order.
//
//   node dist/bench/streams.js [--streams 1000] [--sessions 1000] [--reloads 10]
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ROOT, freePort, processMemory } from '../test/helpers/aeterna';
import { Daemon } from '../test/helpers/daemon';
import { requestJson } from '../test/helpers/load';
import { fdCountAtRest, settle } from './soak';
import { openStream, type StreamSeen } from '../test/helpers/sse';
import { fixture as benchFixture, run as runCommand, tempDir as benchTempDir, waitForPort } from './common';

const AGENT = [process.execPath, path.join(ROOT, 'examples', 'llm-agent', 'agent.js')];
/** A chat-like WebSocket echo (ws) that hands its sessions over at promotion, or closes them (1012) without a relay. */
const WS_APP = [process.execPath, path.join(ROOT, 'test', 'fixtures', 'apps', 'ws_app.js')];
/** Between two messages of a WebSocket client. */
const WS_EVERY_MS = 200;

export interface StreamsRun {
  mode: 'handoff' | 'drain only' | 'pm2 cluster reload';
  streams: number;
  reloads: number;
  cut: number;
  lost: number;
  repeated: number;
  /** Streams that saw more than one generation (they were moved). */
  moved: number;
  /** Old generations' lifetimes after the final sync was acknowledged (ms), from Aeterna's log; empty without a relay. */
  exitAfterAckMs: number[];
  /** Aeterna's fds and RSS before and after (null for pm2). */
  fds: { before: number; after: number } | null;
  rssMiB: { before: number; after: number } | null;
}

/** What serves the agent and reloads it. */
interface Server {
  start(port: number): Promise<void>;
  reload(): Promise<void>;
  /** Aeterna's pid (its fds and RSS are measured), or null. */
  supervisor(): Promise<number | null>;
  /** Aeterna's log lines, for the old generations' exits. */
  logs(): Array<{ msg: string; time?: string }>;
  stop(): Promise<void>;
}

function aeternaServer(relay: boolean, command = AGENT): Server {
  let d: Daemon | null = null;
  return {
    async start(port) {
      d = new Daemon({
        command,
        port,
        readiness: relay ? '{ mode: "notify", timeout: "60s" }' : '{ mode: "delay", delay: "500ms" }',
        stopTimeout: '5s',
      });
      if (relay)
        d.write({ ...d.options, handoff: `{ enabled: true, socket_path: "${d.dir}/state.sock", timeout: "30s" }` });
      d.start(true);
      await d.waitStatus((s) => s.state === 'Running', 60000);
    },
    async reload() {
      const r = await d!.cli('reload');
      if (r.code !== 0) throw new Error(`reload failed: ${r.stderr}`);
      await d!.waitStatus((s) => s.state === 'Running', 60000);
    },
    supervisor: () => d!.run.aeternaPid(),
    logs: () => d!.run.logs(),
    async stop() {
      await d?.run.killAll();
    },
  };
}

function pm2Server(): Server {
  let env: NodeJS.ProcessEnv | null = null;
  const bin = require.resolve('pm2/bin/pm2');
  const pm2 = async (...args: string[]): Promise<void> => {
    const r = await runCommand([process.execPath, bin, ...args], { env: env!, timeoutMs: 120000 });
    if (r.code !== 0) throw new Error(`pm2 ${args[0]} exited ${r.code}: ${r.stderr.slice(-500)}`);
  };
  return {
    async start(port) {
      env = { ...process.env, PM2_HOME: benchTempDir('aeterna-bench-pm2-'), PORT: String(port) };
      await pm2('start', benchFixture('pm2-streams.config.js'));
      await waitForPort(port);
    },
    reload: () => pm2('reload', 'aeterna-bench-streams'),
    supervisor: () => Promise.resolve(null),
    logs: () => [],
    async stop() {
      if (env) await pm2('kill');
      env = null;
    },
  };
}

async function run(mode: StreamsRun['mode'], streams: number, reloads: number): Promise<StreamsRun> {
  const port = await freePort();
  const server = mode === 'pm2 cluster reload' ? pm2Server() : aeternaServer(mode === 'handoff');
  try {
    await server.start(port);
    const { id } = await requestJson<{ id: string }>(port, 'POST', '/sessions');
    await requestJson(port, 'POST', `/sessions/${id}/messages`, 'tell me about streams that survive reloads');
    const aeterna = await server.supervisor();
    const measure = async (): Promise<{ fds: number; rss: number } | null> =>
      aeterna === null ? null : { fds: await fdCountAtRest(aeterna), rss: processMemory(aeterna).rss / 1024 };
    const before = await measure();
    // Long enough to outlive every reload: about 3 s per reload, plus a margin.
    const tokens = reloads * 30 + 50;
    const clients: StreamSeen[] = [];
    for (let i = 0; i < streams; i++) clients.push(openStream(port, id, tokens));
    await settle(
      () => clients.filter((c) => c.indices.length > 0).length,
      (n) => n === streams,
      120000,
    );
    for (let i = 0; i < reloads; i++) {
      await server.reload();
      await new Promise((r) => setTimeout(r, 2000));
    }
    const ends = await Promise.all(clients.map((c) => c.ended));
    const after = await measure();
    const logs = server.logs();
    const exitAfterAckMs: number[] = [];
    const timeOf = (l: { time?: string }): number => Date.parse(l.time ?? '');
    for (const ack of logs.filter((l) => l.msg === 'final state sync relayed')) {
      const at = timeOf(ack);
      const exit = logs.find((l) => /^generation \d+ (exited|killed)/.test(l.msg) && timeOf(l) >= at);
      if (exit) exitAfterAckMs.push(timeOf(exit) - at);
    }
    return {
      mode,
      streams,
      reloads,
      // A stream that ended early without a cut (it cannot: the agent sends them all) counts as cut too.
      cut: ends.filter((e, i) => e === 'cut' || clients[i].indices.length < tokens).length,
      lost: clients.reduce((n, c) => n + tokens - new Set(c.indices).size, 0),
      repeated: clients.reduce((n, c) => n + c.indices.length - new Set(c.indices).size, 0),
      moved: clients.filter((c) => new Set(c.generations).size > 1).length,
      exitAfterAckMs,
      fds: before && after ? { before: before.fds, after: after.fds } : null,
      rssMiB: before && after ? { before: before.rss, after: after.rss } : null,
    };
  } finally {
    await server.stop();
  }
}

export interface SessionsRun {
  mode: 'handoff' | 'drain only';
  sessions: number;
  reloads: number;
  /** Sessions that saw a close (or an error) before the end. */
  closed: number;
  sent: number;
  /** Messages sent that got no reply, and replies for a message answered before or out of order. */
  unanswered: number;
  repeatedOrReordered: number;
  /** Sessions whose replies came from more than one generation (they were moved). */
  moved: number;
  fds: { before: number; after: number };
  rssMiB: { before: number; after: number };
}

interface Session {
  sent: number;
  lastSeq: number;
  replies: number;
  disorder: number;
  generations: Set<string>;
  closed: boolean;
  timer: NodeJS.Timeout | null;
}

/** N WebSocket sessions, each sending a message every WS_EVERY_MS, through K reloads of ws_app.js. */
async function runWs(mode: SessionsRun['mode'], count: number, reloads: number): Promise<SessionsRun> {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { WebSocket } = require('ws') as typeof import('ws');
  const port = await freePort();
  const server = aeternaServer(mode === 'handoff', WS_APP);
  const sessions: Session[] = [];
  const sockets: Array<import('ws').WebSocket> = [];
  try {
    await server.start(port);
    const aeterna = (await server.supervisor())!;
    const before = { fds: await fdCountAtRest(aeterna), rss: processMemory(aeterna).rss / 1024 };
    for (let i = 0; i < count; i++) {
      const s: Session = {
        sent: 0,
        lastSeq: -1,
        replies: 0,
        disorder: 0,
        generations: new Set(),
        closed: false,
        timer: null,
      };
      const ws = new WebSocket(`ws://127.0.0.1:${port}/chat?session=s${i}`);
      await new Promise<void>((resolve, reject) => {
        ws.once('open', () => resolve());
        ws.once('error', reject);
      });
      ws.on('message', (data) => {
        const r = JSON.parse((data as Buffer).toString()) as { seq: number; generation: string };
        if (r.seq !== s.lastSeq + 1) s.disorder++;
        s.lastSeq = Math.max(s.lastSeq, r.seq);
        s.replies++;
        s.generations.add(r.generation);
      });
      ws.on('close', () => (s.closed = true));
      ws.on('error', () => (s.closed = true));
      s.timer = setInterval(() => {
        if (s.closed) return;
        ws.send(JSON.stringify({ seq: s.sent++ }));
      }, WS_EVERY_MS);
      sessions.push(s);
      sockets.push(ws);
    }
    for (let i = 0; i < reloads; i++) {
      await server.reload();
      await new Promise((r) => setTimeout(r, 2000));
    }
    for (const s of sessions) clearInterval(s.timer!);
    // The last replies: every open session's last message answered (or a guard).
    await settle(
      () => sessions.every((s) => s.closed || s.replies >= s.sent),
      (v) => v,
      30000,
    );
    const after = { fds: await fdCountAtRest(aeterna), rss: processMemory(aeterna).rss / 1024 };
    return {
      mode,
      sessions: count,
      reloads,
      closed: sessions.filter((s) => s.closed).length,
      sent: sessions.reduce((n, s) => n + s.sent, 0),
      unanswered: sessions.reduce((n, s) => n + Math.max(0, s.sent - s.replies), 0),
      repeatedOrReordered: sessions.reduce((n, s) => n + s.disorder, 0),
      moved: sessions.filter((s) => s.generations.size > 1).length,
      fds: { before: before.fds, after: after.fds },
      rssMiB: { before: before.rss, after: after.rss },
    };
  } finally {
    for (const s of sessions) if (s.timer) clearInterval(s.timer);
    for (const ws of sockets) ws.terminate();
    await server.stop();
  }
}

function wsTable(runs: SessionsRun[]): string {
  const lines = [
    '| mode | sessions | reloads | sessions closed | messages sent | unanswered | repeated or out of order | sessions moved | Aeterna fds before → after | Aeterna RSS MiB before → after |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ];
  for (const r of runs)
    lines.push(
      `| ${r.mode} | ${r.sessions} | ${r.reloads} | ${r.closed} | ${r.sent} | ${r.unanswered} | ${r.repeatedOrReordered} | ${r.moved} | ${r.fds.before} → ${r.fds.after} | ${r.rssMiB.before.toFixed(1)} → ${r.rssMiB.after.toFixed(1)} |`,
    );
  return lines.join('\n');
}

function table(runs: StreamsRun[]): string {
  const lines = [
    '| mode | streams | reloads | streams cut | tokens lost | tokens repeated | streams moved | old generation exit after final ack (max) | Aeterna fds before → after | Aeterna RSS MiB before → after |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ];
  for (const r of runs) {
    const exit = r.exitAfterAckMs.length > 0 ? `${Math.max(...r.exitAfterAckMs)} ms` : '–';
    const fds = r.fds ? `${r.fds.before} → ${r.fds.after}` : '–';
    const rss = r.rssMiB ? `${r.rssMiB.before.toFixed(1)} → ${r.rssMiB.after.toFixed(1)}` : '–';
    lines.push(
      `| ${r.mode} | ${r.streams} | ${r.reloads} | ${r.cut} | ${r.lost} | ${r.repeated} | ${r.moved} | ${exit} | ${fds} | ${rss} |`,
    );
  }
  return lines.join('\n');
}

async function main(): Promise<void> {
  const arg = (name: string, dflt: number): number => {
    const i = process.argv.indexOf(`--${name}`);
    return i > 0 ? Number(process.argv[i + 1]) : dflt;
  };
  const streams = arg('streams', 1000);
  const sessions = arg('sessions', 1000);
  const reloads = arg('reloads', 10);
  // The peers cut every stream at their first reload: three of theirs show it.
  const peers = Math.min(reloads, 3);
  const runs = [
    await run('handoff', streams, reloads),
    await run('drain only', streams, peers),
    await run('pm2 cluster reload', streams, peers),
  ];
  const wsRuns = [await runWs('handoff', sessions, reloads), await runWs('drain only', sessions, peers)];
  const date = new Date().toISOString().slice(0, 10);
  const report = [
    `# Long-lived streams and WebSocket sessions across reloads: ${date}`,
    '',
    `${os.cpus().length} cores, Node ${process.version}; \`node dist/bench/streams.js --streams ${streams} --sessions ${sessions} --reloads ${reloads}\` (bench/streams.ts). Counts, not timings, are the result.`,
    '',
    table(runs),
    '',
    wsTable(wsRuns),
    '',
  ].join('\n');
  const file = path.join(ROOT, 'bench', 'results', `streams-${date}.md`);
  fs.writeFileSync(file, report);
  fs.writeFileSync(file.replace(/\.md$/, '.json'), `${JSON.stringify({ streams: runs, sessions: wsRuns }, null, 2)}\n`);
  console.log(report);
  console.log(file);
}

if (require.main === module) {
  main().catch((err) => {
    console.error(err);
    process.exit(1);
  });
}

// Long-lived streams across reloads: N concurrent SSE streams (the demo agent's answers, one token every 100 ms)
// through K reloads, with connection handoff (the streams move to each new generation) and, beside it in the
// same run, with the drain only (no state relay: the old generation drains, and stop_timeout cuts what is left).
// Counts what the clients saw (streams cut, tokens missing or repeated), how long each old generation lived after
// its final sync was acknowledged (from Aeterna's log), and Aeterna's fds and RSS before and after.
//
//   node dist/bench/streams.js [--streams 1000] [--reloads 10]
import http from 'node:http';
import path from 'node:path';
import { ROOT, freePort, processMemory } from '../test/helpers/aeterna';
import { Daemon } from '../test/helpers/daemon';
import { requestJson } from '../test/helpers/load';
import { fdCountAtRest, settle } from './soak';

const AGENT = [process.execPath, path.join(ROOT, 'examples', 'llm-agent', 'agent.js')];

interface Client {
  next: number;
  lost: number;
  repeated: number;
  generations: Set<string>;
  ended: Promise<'complete' | 'cut'>;
}

function stream(port: number, session: string, tokens: number): Client {
  const c: Client = { next: 0, lost: 0, repeated: 0, generations: new Set(), ended: Promise.resolve('cut') };
  c.ended = new Promise((resolve) => {
    const req = http.get({ port, path: `/sessions/${session}/stream?tokens=${tokens}`, agent: false }, (res) => {
      let buffered = '';
      res.setEncoding('utf8');
      res.on('data', (text: string) => {
        buffered += text;
        for (let end; (end = buffered.indexOf('\n\n')) >= 0;) {
          const m = /^data: (.*)$/m.exec(buffered.slice(0, end));
          buffered = buffered.slice(end + 2);
          if (!m) continue;
          const e = JSON.parse(m[1]) as { i: number; generation: string };
          if (e.i < c.next) c.repeated++;
          else {
            c.lost += e.i - c.next;
            c.next = e.i + 1;
          }
          c.generations.add(e.generation);
        }
      });
      res.on('end', () => resolve(res.complete && c.next === tokens ? 'complete' : 'cut'));
      res.on('error', () => resolve('cut'));
    });
    req.on('error', () => resolve('cut'));
  });
  return c;
}

export interface StreamsRun {
  mode: 'handoff' | 'drain only';
  streams: number;
  reloads: number;
  cut: number;
  lost: number;
  repeated: number;
  /** Streams that saw more than one generation (they were moved). */
  moved: number;
  /** Old generations' lifetimes after the final sync was acknowledged (ms), from Aeterna's log; empty without a relay. */
  exitAfterAckMs: number[];
  fds: { before: number; after: number };
  rssMiB: { before: number; after: number };
}

async function run(mode: StreamsRun['mode'], streams: number, reloads: number): Promise<StreamsRun> {
  const port = await freePort();
  const d = new Daemon({
    command: AGENT,
    port,
    readiness: mode === 'handoff' ? '{ mode: "notify", timeout: "60s" }' : '{ mode: "delay", delay: "500ms" }',
    stopTimeout: '5s',
  });
  if (mode === 'handoff')
    d.write({ ...d.options, handoff: `{ enabled: true, socket_path: "${d.dir}/state.sock", timeout: "30s" }` });
  d.start(true);
  try {
    await d.waitStatus((s) => s.state === 'Running', 60000);
    const { id } = await requestJson<{ id: string }>(port, 'POST', '/sessions');
    await requestJson(port, 'POST', `/sessions/${id}/messages`, 'tell me about streams that survive reloads');
    const aeterna = await d.run.aeternaPid();
    const before = { fds: await fdCountAtRest(aeterna), rss: processMemory(aeterna).rss };
    // Long enough to outlive every reload: about 3 s per reload, plus a margin.
    const tokens = reloads * 30 + 50;
    const clients: Client[] = [];
    for (let i = 0; i < streams; i++) clients.push(stream(port, id, tokens));
    await settle(
      () => clients.filter((c) => c.next > 0).length,
      (n) => n === streams,
      120000,
    );
    for (let i = 0; i < reloads; i++) {
      const r = await d.cli('reload');
      if (r.code !== 0) throw new Error(`reload ${i + 1} failed: ${r.stderr}`);
      await d.waitStatus((s) => s.state === 'Running', 60000);
      await new Promise((r2) => setTimeout(r2, 2000));
    }
    const ends = await Promise.all(clients.map((c) => c.ended));
    const after = { fds: await fdCountAtRest(aeterna), rss: processMemory(aeterna).rss };
    const logs = d.run.logs();
    const exitAfterAckMs: number[] = [];
    const timeOf = (l: object): number => Date.parse((l as { time?: string }).time ?? '');
    for (const ack of logs.filter((l) => l.msg === 'final state sync relayed')) {
      const at = timeOf(ack);
      const exit = logs.find((l) => /^generation \d+ (exited|killed)/.test(l.msg) && timeOf(l) >= at);
      if (exit) exitAfterAckMs.push(timeOf(exit) - at);
    }
    return {
      mode,
      streams,
      reloads,
      cut: ends.filter((e) => e === 'cut').length,
      lost: clients.reduce((n, c) => n + c.lost + (c.next < tokens ? tokens - c.next : 0), 0),
      repeated: clients.reduce((n, c) => n + c.repeated, 0),
      moved: clients.filter((c) => c.generations.size > 1).length,
      exitAfterAckMs,
      fds: { before: before.fds, after: after.fds },
      rssMiB: { before: before.rss / 1024, after: after.rss / 1024 }, // processMemory: KiB
    };
  } finally {
    await d.run.killAll();
  }
}

function table(runs: StreamsRun[]): string {
  const lines = [
    '| mode | streams | reloads | streams cut | tokens lost | tokens repeated | streams moved | old generation exit after final ack (max) | Aeterna fds before → after | Aeterna RSS MiB before → after |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ];
  for (const r of runs) {
    const exit = r.exitAfterAckMs.length > 0 ? `${Math.max(...r.exitAfterAckMs)} ms` : '–';
    lines.push(
      `| ${r.mode} | ${r.streams} | ${r.reloads} | ${r.cut} | ${r.lost} | ${r.repeated} | ${r.moved} | ${exit} | ${r.fds.before} → ${r.fds.after} | ${r.rssMiB.before.toFixed(1)} → ${r.rssMiB.after.toFixed(1)} |`,
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
  const reloads = arg('reloads', 10);
  const runs = [await run('handoff', streams, reloads), await run('drain only', streams, Math.min(reloads, 3))];
  console.log(table(runs));
  console.log(`\n${JSON.stringify(runs)}`);
}

if (require.main === module) {
  main().catch((err) => {
    console.error(err);
    process.exit(1);
  });
}

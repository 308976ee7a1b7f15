// Section 7: the weighted canary (orchestration.canary), through the real
// `aeterna` CLI and its config file:
//   - the share of fresh connections the new generation gets during the soak,
//     against the configured weight (10, 50, 90), and without a weight (one
//     shared socket: whatever the two accept loops make of it) as the peer;
//   - failed requests across weighted promotes and rollbacks under HTTP load:
//     keep-alive connections (the app closes each after a few requests, so the
//     client keeps opening new ones and they are split too) and one request per
//     fresh connection.
// Counts and shares only: nothing here is a timing.
import os from 'node:os';
import { fixture, freePort } from '../../test/helpers/aeterna';
import { Daemon, statusOf, type CliResult } from '../../test/helpers/daemon';
import { getText, startLoad, type LoadStats } from '../../test/helpers/load';
import { fmt, fmtInt } from '../common';

const APP = [process.execPath, fixture('apps', 'reload_app.js')];

export interface CanaryParams {
  weights: number[];
  /** Fresh connections per weight. */
  connections: number;
  /** Promotes and, as many, rollbacks (alternating) under load. */
  switches: number;
  /** Keep-alive connections of the load, and fresh-connection loops beside them. */
  keepAlive: number;
  fresh: number;
  /** The app closes a keep-alive connection after this many requests. */
  requestsPerConnection: number;
}

export interface ShareRow {
  /** null: no orchestration.canary (one shared socket). */
  weight: number | null;
  connections: number;
  toNew: number;
  /** Percent of `connections` the new generation answered. */
  share: number;
  failed: number;
}

export interface FreshStats {
  ok: number;
  failed: number;
  failures: Record<string, number>;
}

export interface SwitchRun {
  promotes: number;
  rollbacks: number;
  /** Switches whose outcome was not the one asked for (a reload that failed, a promote that rolled back). */
  wrongOutcomes: string[];
  /** Fresh-connection requests each side answered in the soaks' measured windows (the ~200 before each switch): the split was live. */
  soakAnswers: { old: number; new: number };
  keepAlive: LoadStats;
  fresh: FreshStats;
}

export interface CanarySection {
  params: CanaryParams;
  loadavg: { start: number[]; end: number[] };
  shares: ShareRow[];
  switches: SwitchRun;
}

/** The generation that answers one request on a fresh connection (reload_app.js says which). */
export async function generationOf(port: number, localAddress?: string, host = '127.0.0.1'): Promise<number> {
  const r = await getText(port, '/', host, localAddress);
  return Number((JSON.parse(r.body) as { generation: string }).generation);
}

/** `count` fresh connections, `concurrency` at a time: how many each generation answered, and what failed. */
export async function freshConnections(
  port: number,
  count: number,
  concurrency = 16,
): Promise<{ byGeneration: Map<number, number>; failures: string[] }> {
  const byGeneration = new Map<number, number>();
  const failures: string[] = [];
  let left = count;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (left-- > 0) {
        try {
          const g = await generationOf(port);
          byGeneration.set(g, (byGeneration.get(g) ?? 0) + 1);
        } catch (err) {
          failures.push((err as NodeJS.ErrnoException).code ?? String(err));
        }
      }
    }),
  );
  return { byGeneration, failures };
}

export interface FreshLoad {
  /** Requests answered, by generation. */
  answeredBy: Map<number, number>;
  /** Failed requests: the error code (ECONNRESET, ...) of each. */
  failures: string[];
  /** Stop after the requests in flight. */
  stop(): Promise<void>;
}

/** `loops` clients, each sending one request per fresh connection back to back until stopped. */
export function startFreshLoad(port: number, loops: number): FreshLoad {
  let running = true;
  const answeredBy = new Map<number, number>();
  const failures: string[] = [];
  const done = Promise.all(
    Array.from({ length: loops }, async () => {
      while (running) {
        try {
          const g = await generationOf(port);
          answeredBy.set(g, (answeredBy.get(g) ?? 0) + 1);
        } catch (err) {
          failures.push((err as NodeJS.ErrnoException).code ?? String(err));
        }
      }
    }),
  );
  return {
    answeredBy,
    failures,
    async stop() {
      running = false;
      await done;
    },
  };
}

const total = (m: Map<number, number>): number => [...m.values()].reduce((a, b) => a + b, 0);

function started(port: number, canary: string | null, env: string[] = []): Daemon {
  return new Daemon({
    command: APP,
    port,
    strategy: 'canary',
    soak: '10m',
    env,
    ...(canary ? { canary } : {}),
  }).start();
}

/** `aeterna reload` (the CLI), waited until the daemon soaks; resolves with the pending CLI run. */
async function soaking(d: Daemon): Promise<{ reload: Promise<CliResult> }> {
  const reload = d.cli('reload');
  await d.waitStatus((s) => s.state === 'Soaking', 30000);
  return { reload };
}

async function share(weight: number | null, connections: number): Promise<ShareRow> {
  const port = await freePort();
  const d = started(port, weight === null ? null : `{ weight: ${weight} }`);
  try {
    await d.waitStatus((s) => s.state === 'Running', 30000);
    const { reload } = await soaking(d);
    const { byGeneration, failures } = await freshConnections(port, connections);
    await d.cli('promote');
    await reload;
    const toNew = byGeneration.get(2) ?? 0;
    return { weight, connections, toNew, share: (toNew / connections) * 100, failed: failures.length };
  } finally {
    await d.stop();
    await d.run.killAll();
  }
}

async function switches(p: CanaryParams): Promise<SwitchRun> {
  const port = await freePort();
  const d = started(port, '{ weight: 50 }', [`MAX_REQUESTS_PER_SOCKET=${p.requestsPerConnection}`]);
  const result: SwitchRun = {
    promotes: 0,
    rollbacks: 0,
    wrongOutcomes: [],
    soakAnswers: { old: 0, new: 0 },
    keepAlive: { ok: 0, failed: 0, failures: {}, pids: [] },
    fresh: { ok: 0, failed: 0, failures: {} },
  };
  let keepAlive: ReturnType<typeof startLoad> | null = null;
  let fresh: FreshLoad | null = null;
  try {
    await d.waitStatus((s) => s.state === 'Running', 30000);
    keepAlive = startLoad(port, { concurrency: p.keepAlive });
    fresh = startFreshLoad(port, p.fresh);
    const answered = fresh.answeredBy;
    for (let i = 0; i < p.switches * 2; i++) {
      const ending = i % 2 === 0 ? 'promote' : 'rollback';
      const { reload } = await soaking(d);
      const { generation: serving, candidate } = await statusOf(d);
      const oldBefore = answered.get(serving) ?? 0;
      const newBefore = answered.get(candidate!.generation) ?? 0;
      // Let both generations serve a few hundred fresh connections before the switch (counted for both from here).
      for (const before = total(answered); total(answered) < before + 200;) await new Promise((r) => setTimeout(r, 20));
      result.soakAnswers.old += (answered.get(serving) ?? 0) - oldBefore;
      result.soakAnswers.new += (answered.get(candidate!.generation) ?? 0) - newBefore;
      const asked = await d.cli(ending);
      const r = await reload;
      if (asked.code !== 0 || r.code !== (ending === 'promote' ? 0 : 1))
        result.wrongOutcomes.push(`${ending} ${i + 1}: ${asked.stderr.trim()} ${r.stderr.trim()}`.trim());
      result[ending === 'promote' ? 'promotes' : 'rollbacks']++;
      await d.waitStatus((s) => s.state === 'Running', 30000);
    }
    await fresh.stop();
    result.fresh = { ok: total(answered), failed: fresh.failures.length, failures: {} };
    for (const kind of fresh.failures) result.fresh.failures[kind] = (result.fresh.failures[kind] ?? 0) + 1;
    result.keepAlive = await keepAlive.stop();
    return result;
  } finally {
    await fresh?.stop();
    await keepAlive?.stop();
    await d.stop();
    await d.run.killAll();
  }
}

export async function canarySection(p: CanaryParams): Promise<CanarySection> {
  const start = os.loadavg();
  const shares: ShareRow[] = [];
  for (const weight of [...p.weights, null]) shares.push(await share(weight, p.connections));
  const run = await switches(p);
  return { params: p, loadavg: { start, end: os.loadavg() }, shares, switches: run };
}

function failureText(failures: Record<string, number>): string {
  const kinds = Object.entries(failures);
  return kinds.length === 0 ? 'none' : kinds.map(([k, n]) => `${k} ${n}`).join(', ');
}

/** The section's Markdown body (the heading is the report's). */
export function renderCanary(s: CanarySection): string[] {
  const p = s.params;
  const w = s.switches;
  return [
    `Through the real CLI and config: \`aeterna start\` with \`strategy: canary\`, \`soak_time: 10m\` and \`orchestration.canary: { weight: W }\`, \`aeterna reload\`, then ${fmtInt(p.connections)} fresh connections (16 at a time, one request each) during the soak, then \`aeterna promote\`. The app is test/fixtures/apps/reload_app.js, which answers with its generation. Load average ${s.loadavg.start.map((v) => fmt(v, 2)).join(' ')} at the start of the section, ${s.loadavg.end.map((v) => fmt(v, 2)).join(' ')} at its end.`,
    '',
    '| configured weight | connections | to the new generation | measured share | off by (points) | failed |',
    '| --- | --- | --- | --- | --- | --- |',
    ...s.shares.map(
      (r) =>
        `| ${r.weight === null ? 'none (one shared socket)' : `${r.weight}%`} | ${fmtInt(r.connections)} | ${fmtInt(r.toNew)} | ${fmt(r.share)}% | ${r.weight === null ? '-' : fmt(Math.abs(r.share - r.weight))} | ${fmtInt(r.failed)} |`,
    ),
    '',
    `Switches under load: weight 50, ${w.promotes} promotes and ${w.rollbacks} rollbacks alternating (\`aeterna promote\` / \`aeterna rollback\` after at least 200 fresh-connection requests in each soak), with ${p.keepAlive} keep-alive connections (the app closes each after ${p.requestsPerConnection} requests, so the client keeps opening new ones, which are split too) and ${p.fresh} loops of one request per fresh connection running throughout.`,
    '',
    '| load | requests | failed | failures by kind |',
    '| --- | --- | --- | --- |',
    `| keep-alive | ${fmtInt(w.keepAlive.ok + w.keepAlive.failed)} | ${fmtInt(w.keepAlive.failed)} | ${failureText(w.keepAlive.failures)} |`,
    `| fresh connections | ${fmtInt(w.fresh.ok + w.fresh.failed)} | ${fmtInt(w.fresh.failed)} | ${failureText(w.fresh.failures)} |`,
    '',
    `In the 200 or so fresh-connection requests before each switch, the old generations answered ${fmtInt(w.soakAnswers.old)} and the new ones ${fmtInt(w.soakAnswers.new)}; the keep-alive load was answered by ${w.keepAlive.pids.length} app processes (${w.promotes + w.rollbacks + 1} generations ran). Switches with another outcome than the one asked for: ${w.wrongOutcomes.length === 0 ? 'none' : w.wrongOutcomes.join('; ')}.`,
    '',
  ];
}

// The Markdown report: machine, versions, the targets, each section's table
// and the ratios against the peers, all from the same run.
import { fmt, fmtInt } from './common';
import type { ContenderResult, ReloadSection } from './sections/reloads';
import type { OverheadSection } from './sections/overhead';
import type { Measurement, RelaySection } from './sections/relay';
import type { FootprintSection, Memory, Timing } from './sections/footprint';
import type { ReapRow, ReapingSection } from './sections/reaping';
import type { UpgradeSection } from './sections/upgrade';
import type { RelaySdkSection, SdkPath, Spread, Steps } from './sections/relay-sdk';
import type { CheckpointSection, Timed } from './sections/checkpoint';
import { renderCanary, type CanarySection } from './sections/canary';

export type SectionOutcome<T> = { value: T } | { error: string } | { notRun: string };

export interface BenchMeta {
  date: string;
  startedAt: string;
  finishedAt: string;
  command: string;
  quick: boolean;
  machine: {
    host: string;
    cpu: string;
    cores: number;
    memoryGiB: number;
    kernel: string;
    distro: string;
    loadavgAtStart: number[];
    pid1: string;
  };
  versions: Record<'aeterna' | 'node' | 'autocannon' | 'pm2' | 'python' | 'tini' | 'wrk' | 'cc', string>;
}

export interface BenchResults {
  meta: BenchMeta;
  reloads: SectionOutcome<ReloadSection>;
  overhead: SectionOutcome<OverheadSection>;
  relay: SectionOutcome<RelaySection>;
  footprint: SectionOutcome<FootprintSection>;
  reaping: SectionOutcome<ReapingSection>;
  relaySdk: SectionOutcome<RelaySdkSection>;
  checkpoint: SectionOutcome<CheckpointSection>;
  canary: SectionOutcome<CanarySection>;
  upgrade: SectionOutcome<UpgradeSection>;
}

/** The section headings, in order; the CI test checks each one is present. */
export const HEADINGS = {
  targets: '## Targets',
  machine: '## Machine and versions',
  reloads: '## 1. Failed requests across reloads',
  overhead: '## 2. Reload overhead',
  relay: '## 3. State relay throughput',
  footprint: '## 4. Footprint',
  reaping: '## 5. Zombie reaping',
  relaySdk: '## 6. State relay through the SDKs',
  checkpoint: '## 7. Checkpoints',
  canary: '## 8. Weighted canary',
  upgrade: '## 9. Aeterna upgrading itself',
  notes: '## Method notes',
} as const;

const MiB = 1024 * 1024;

function table(header: string[], rows: string[][]): string {
  const line = (cells: string[]): string =>
    `| ${cells.map((c) => c.replace(/\|/g, '\\|').replace(/\n/g, ' ')).join(' | ')} |`;
  return [line(header), line(header.map(() => '---')), ...rows.map(line)].join('\n');
}

const ms = (v: number | null | undefined, digits = 1): string =>
  v === null || v === undefined || !Number.isFinite(v) ? 'n/a' : `${fmt(v, digits)} ms`;
const mb = (kb: number): string => `${fmt(kb / 1024, 1)} MB`;
const sizeLabel = (bytes: number): string =>
  bytes >= 1024 * MiB ? `${bytes / (1024 * MiB)} GiB` : `${bytes / MiB} MiB`;

/** "3.2x" (a / b), or a word when b is zero. */
function ratio(a: number, b: number, digits = 1): string {
  if (!Number.isFinite(a) || !Number.isFinite(b)) return 'n/a';
  if (b === 0) return a === 0 ? 'equal (both 0)' : 'infinitely more';
  return `${fmt(a / b, digits)}x`;
}

function outcomeNote<T>(o: SectionOutcome<T>): string | null {
  if ('error' in o) return `**This section failed**: ${o.error}`;
  if ('notRun' in o) return `_Not run: ${o.notRun}._`;
  return null;
}

// ---- targets ----------------------------------------------------------------------------------

interface Target {
  target: string;
  measured: string;
  verdict: 'met' | 'MISSED' | 'pending' | 'n/a';
  context: string;
}

function find(r: BenchResults, id: string): ContenderResult | undefined {
  return 'value' in r.reloads ? r.reloads.value.contenders.find((c) => c.id === id && c.error === null) : undefined;
}

function targets(r: BenchResults): Target[] {
  const out: Target[] = [];
  const imm = find(r, 'aeterna-immediate');
  const can = find(r, 'aeterna-canary');
  const k = 'value' in r.reloads ? r.reloads.value.params.reloads : 0;
  if (imm && can) {
    const zero = imm.failed === 0 && can.failed === 0;
    out.push({
      target: 'zero failed requests over 100 reloads at saturation, both strategies',
      measured: `immediate ${fmtInt(imm.failed)}, canary ${fmtInt(can.failed)} failed over ${k} reloads each`,
      verdict: zero ? 'met' : 'MISSED',
      context:
        k < 100 ? `this run did ${k} reloads per contender; the target is stated for 100 (\`--reloads 100\`)` : '',
    });
    for (const c of [imm, can]) {
      const q = c.during.p99 / c.steady.p99;
      out.push({
        target: `p99 latency during reloads <= 2x steady state (${c.label})`,
        measured: `${ms(c.during.p99, 2)} vs ${ms(c.steady.p99, 2)} (${fmt(q, 2)}x)`,
        verdict: Number.isFinite(q) ? (q <= 2 ? 'met' : 'MISSED') : 'n/a',
        context: `load average at start ${r.meta.machine.loadavgAtStart.map((v) => v.toFixed(2)).join(' ')} on ${r.meta.machine.cores} cores`,
      });
    }
  } else {
    out.push({
      target: 'zero failed requests over 100 reloads at saturation, both strategies',
      measured: 'not measured',
      verdict: 'n/a',
      context: 'section 1 did not complete for both strategies',
    });
  }
  if ('value' in r.overhead && 'overhead' in r.overhead.value) {
    const o = r.overhead.value;
    out.push({
      target: "Aeterna's own reload overhead < 10 ms median",
      measured: `median ${ms(o.overhead.median)}, p95 ${ms(o.overhead.p95)}`,
      verdict: o.overhead.median < 10 ? 'met' : 'MISSED',
      context: `before the app runs ${ms(o.beforeSpawn.median)}, after it is ready ${ms(o.afterReady.median)} (medians)`,
    });
  } else {
    out.push({
      target: "Aeterna's own reload overhead < 10 ms median",
      measured: 'not measured',
      verdict: 'n/a',
      context: skippedText(r.overhead),
    });
  }
  if ('value' in r.relay) {
    const gib = r.relay.value.rows.find((row) => row.bytes === 1024 * MiB);
    const limit = gib ? limitOf(gib.rawC, gib.rawNode) : null;
    const stream = gib?.stream;
    out.push({
      target: 'streamed relay >= 1.5 GB/s for 1 GiB',
      measured:
        stream && 'gbps' in stream
          ? `${fmt(stream.gbps, 2)} GB/s`
          : stream
            ? measurementText(stream)
            : 'no 1 GiB state in this run',
      verdict:
        stream && 'gbps' in stream
          ? stream.gbps >= 1.5
            ? 'met'
            : 'MISSED'
          : stream && 'pending' in stream
            ? 'pending'
            : 'n/a',
      context: [
        limit
          ? `one-hop unix socket on this machine: ${fmt(limit.gbps, 2)} GB/s (${limit.what})`
          : r.meta.quick
            ? 'quick mode: small states only'
            : '',
        r.relay.value.relayStatus === 'measured' ? '' : r.relay.value.relayStatus,
      ]
        .filter((x) => x !== '')
        .join('; '),
    });
    const memfds = r.relay.value.rows.map((row) => row.memfd);
    const measuredMemfd = memfds.filter((m): m is Extract<Measurement, { median: number }> => 'median' in m);
    const worst = measuredMemfd.length > 0 ? Math.max(...measuredMemfd.map((m) => m.median)) : NaN;
    out.push({
      target: 'memfd handoff < 5 ms whatever the size',
      measured:
        measuredMemfd.length > 0
          ? `at most ${ms(worst, 2)} (medians)`
          : measurementText(memfds[0] ?? { pending: 'no sizes' }),
      verdict:
        measuredMemfd.length > 0
          ? worst < 5
            ? 'met'
            : 'MISSED'
          : memfds.some((m) => 'pending' in m)
            ? 'pending'
            : 'n/a',
      context:
        measuredMemfd.length > 0 ? `sizes ${r.relay.value.rows.map((row) => sizeLabel(row.bytes)).join(', ')}` : '',
    });
  }
  out.push(...relaySdkTargets(r));
  if ('value' in r.footprint) {
    const f = r.footprint.value;
    const a = f.rss.aeterna;
    out.push({
      target: 'RSS < 60 MB supervising one app',
      measured: 'rssKb' in a ? mb(a.rssKb) : `error: ${a.error}`,
      verdict: 'rssKb' in a ? (a.rssKb / 1024 < 60 ? 'met' : 'MISSED') : 'n/a',
      context: 'rssKb' in f.rss.nodeBaseline ? `an idle bare Node process: ${mb(f.rss.nodeBaseline.rssKb)}` : '',
    });
    const e = f.startToExec.aeterna;
    out.push({
      target: "`aeterna start` to the app's exec < 100 ms",
      measured: 'median' in e ? `median ${ms(e.median)}, p95 ${ms(e.p95)}` : timingText(e),
      verdict: 'median' in e ? (e.median < 100 ? 'met' : 'MISSED') : 'n/a',
      context:
        'median' in f.startToExec.nodeE0
          ? `a bare \`node -e 0\` takes ${ms(f.startToExec.nodeE0.median)} from spawn to exit`
          : '',
    });
  }
  return out;
}

function skippedText<T>(o: SectionOutcome<T>): string {
  if ('error' in o) return `failed: ${o.error.slice(0, 200)}`;
  if ('notRun' in o) return o.notRun;
  const v = o.value as unknown as { skipped?: string };
  return v.skipped ?? '';
}

// ---- section 1 --------------------------------------------------------------------------------

function kinds(f: Record<string, number>): string {
  const entries = Object.entries(f).sort((a, b) => b[1] - a[1]);
  return entries.length === 0 ? 'none' : entries.map(([k, n]) => `${k} ${fmtInt(n)}`).join(', ');
}

function reloadsSection(r: BenchResults, chartFile: string): string[] {
  const out: string[] = [HEADINGS.reloads, ''];
  const note = outcomeNote(r.reloads);
  if (note || !('value' in r.reloads)) return [...out, note ?? '', ''];
  const { params: p, contenders } = r.reloads.value;
  out.push(
    `The same keep-alive HTTP app (\`bench/fixtures/http_app.js\`, which drains properly on SIGTERM/SIGINT with \`src/client/drain.ts\`), ` +
      `saturated by autocannon (${p.connections} connections, in the bench process) and reloaded ${p.reloads} times per contender, ` +
      `one contender after the other: ${fmt(p.steadyMs / 1000, 1)} s of steady state, then each reload waited for and followed by a ${fmt(p.gapMs / 1000, 1)} s pause, then ${fmt(p.tailMs / 1000, 1)} s more. ` +
      `A failure is any request that did not get a 2xx response: refused, reset, timed out (10 s), or a non-2xx status. autocannon reconnects at once after a refused connection, ` +
      `so while nothing accepts on the port each connection counts one failure per attempt. Under Aeterna the app is ready after a fixed delay of ${p.readinessDelay} ` +
      `(a Node app cannot send sd_notify's datagram without an addon; the Python app of section 2 does). Drain: keep-alive connections idle for ${p.drainIdleMs} ms are closed.`,
    '',
  );
  out.push(
    table(
      ['contender', 'how it reloads'],
      contenders.map((c) => [c.label, c.how]),
    ),
    '',
  );
  out.push(`![requests/s and failures over time, reloads marked](${chartFile})`, '');
  const rows = contenders.map((c) =>
    c.error !== null
      ? [c.label, 'did not run', '', '', '', '', `error: ${c.error.slice(0, 300)}`]
      : [
          c.label,
          `${c.reloadsDone}${c.toolFailures.length > 0 ? ` (${c.toolFailures.length} failed)` : ''}`,
          `**${fmtInt(c.failed)}**`,
          fmtInt(c.ok + c.failed),
          fmt(c.failed / Math.max(1, c.reloadsDone), 1),
          fmtInt(c.rps),
          kinds(c.failures),
        ],
  );
  out.push('### Failures', '');
  out.push(
    table(
      [
        'contender',
        'reloads',
        'failed requests',
        'total requests',
        'failed per reload',
        'req/s (2xx, whole run)',
        'failures by kind',
      ],
      rows,
    ),
    '',
  );
  const ok = contenders.filter((c) => c.error === null);
  out.push('### Latency and throughput: steady state vs reload windows', '');
  out.push(
    'A reload window runs from the reload request to the moment the tool reports it done (Aeterna: the final record; naive: the new process listening; pm2: `pm2 reload` exiting); ' +
      `for latency it is extended by ${p.settleMs} ms, so the new process's first moments (cold JIT) count as the reload's, not as steady state. ` +
      'Latency is that of 2xx responses (autocannon: request written to response read). "reload req/s" is the 2xx rate inside the windows.',
    '',
  );
  out.push(
    table(
      [
        'contender',
        'steady req/s',
        'steady p50',
        'steady p99',
        'reload req/s',
        'reload p50',
        'reload p99',
        'p99 reload / steady',
        'reload duration (median)',
      ],
      ok.map((c) => [
        c.label,
        fmtInt(c.steady.rps),
        ms(c.steady.p50, 2),
        ms(c.steady.p99, 2),
        fmtInt(c.during.rps),
        ms(c.during.p50, 2),
        ms(c.during.p99, 2),
        ratio(c.during.p99, c.steady.p99, 2),
        ms(median(c.reloadMs), 0),
      ]),
    ),
    '',
  );
  out.push(
    '### Failures per reload',
    '',
    table(
      [
        'contender',
        'reloads with failures',
        'max failed in one reload',
        'failures before the first reload',
        'failing span per reload (median, where any)',
      ],
      ok.map((c) => {
        const spans = c.failureSpanMs.filter((_, i) => c.failuresPerReload[i] > 0);
        return [
          c.label,
          `${c.failuresPerReload.filter((n) => n > 0).length} of ${c.failuresPerReload.length}`,
          fmtInt(Math.max(0, ...c.failuresPerReload)),
          fmtInt(c.failuresBefore),
          spans.length > 0 ? ms(median(spans), 0) : '-',
        ];
      }),
    ),
    '',
  );
  // Ratios against the peers.
  const imm = ok.find((c) => c.id === 'aeterna-immediate');
  const peers = ok.filter((c) => !c.id.startsWith('aeterna-'));
  if (imm && peers.length > 0) {
    out.push('### Against the peers (same run)', '');
    const lines = peers.map((peer) => {
      const f =
        imm.failed === 0
          ? peer.failed === 0
            ? 'no failed requests either'
            : `${fmtInt(peer.failed)} failed requests (${fmt(peer.failed / Math.max(1, peer.reloadsDone), 1)} per reload) where Aeterna immediate had none`
          : `${ratio(peer.failed, imm.failed)} Aeterna immediate's failed requests (${fmtInt(peer.failed)} vs ${fmtInt(imm.failed)})`;
      return `- **${peer.label}**: ${f}; p99 during reloads ${ratio(peer.during.p99, imm.during.p99)} Aeterna immediate's (${ms(peer.during.p99, 2)} vs ${ms(imm.during.p99, 2)}); reload duration ${ms(median(peer.reloadMs), 0)} vs ${ms(median(imm.reloadMs), 0)}.`;
    });
    out.push(...lines, '');
  }
  // wrk cross-check.
  out.push('### Cross-check with wrk', '');
  if (p.wrk) {
    out.push(
      `wrk (${p.connections} connections, 1 thread) against the same running contender, ${p.wrkReloads} more reloads, counting wrk's socket errors (connect, read, write, timeout) and non-2xx responses.`,
      '',
      table(
        ['contender', 'reloads', 'failed', 'requests', 'req/s', 'p50', 'p99', 'failures by kind'],
        contenders.map((c) => {
          const w = c.wrk;
          if ('skipped' in w) return [c.label, '', '', '', '', '', '', w.skipped];
          if ('error' in w) return [c.label, '', '', '', '', '', '', `error: ${w.error}`];
          return [
            c.label,
            `${w.reloads}${w.toolFailures > 0 ? ` (${w.toolFailures} failed)` : ''}`,
            `**${fmtInt(w.failed)}**`,
            fmtInt(w.requests),
            fmtInt(w.rps),
            ms(w.p50Ms, 2),
            ms(w.p99Ms, 2),
            kinds(w.failures),
          ];
        }),
      ),
      '',
    );
  } else {
    out.push('wrk: not installed (or `--no-wrk`); autocannon alone measured this section.', '');
  }
  const failures = ok.flatMap((c) => c.toolFailures.map((f) => `- ${c.label}: ${f}`));
  if (failures.length > 0) out.push('Reloads the tool itself reported as failed:', '', ...failures.slice(0, 20), '');
  return out;
}

function median(values: number[]): number {
  if (values.length === 0) return NaN;
  const s = [...values].sort((a, b) => a - b);
  return s[Math.ceil(s.length / 2) - 1];
}

// ---- section 2 --------------------------------------------------------------------------------

function overheadSection(r: BenchResults): string[] {
  const out: string[] = [HEADINGS.overhead, ''];
  const note = outcomeNote(r.overhead);
  if (note || !('value' in r.overhead)) return [...out, note ?? '', ''];
  const o = r.overhead.value;
  if ('skipped' in o) return [...out, `Skipped: ${o.skipped}.`, ''];
  out.push(
    `From the reload request to promotion, minus the app's own start-to-ready time, over ${o.samples.length} reloads of an sd_notify app ` +
      '(`test/fixtures/apps/notify_app.py`, Python standard library, readiness `notify`, strategy immediate, no load). ' +
      "The app stamps the wall-clock time at which it sends READY=1; its start is Aeterna's `spawned` mark (exec has succeeded), so the interpreter's " +
      "start-up counts as the app's. Overhead = (draining - accepted) - (ready - spawned) = (spawned - accepted) + (draining - ready). " +
      "The record's marks have 1 ms resolution: each sample is good to about +-1 ms.",
    '',
    table(
      ['measure', 'median', 'p95'],
      [
        ['request to promotion (accepted -> draining)', ms(o.total.median), ms(o.total.p95)],
        ["the app's own start to ready (spawned -> READY=1)", ms(o.app.median), ms(o.app.p95)],
        ['**Aeterna overhead**', `**${ms(o.overhead.median)}**`, `**${ms(o.overhead.p95)}**`],
        [
          '  of which: request to the app running (config, listeners, fork/exec)',
          ms(o.beforeSpawn.median),
          ms(o.beforeSpawn.p95),
        ],
        ['  of which: READY=1 to promotion', ms(o.afterReady.median), ms(o.afterReady.p95)],
        [
          "(for scale) exec to the script's first line: interpreter start-up",
          ms(o.interpreter.median),
          ms(o.interpreter.p95),
        ],
      ],
    ),
    '',
  );
  if (o.failures.length > 0) out.push(`Reloads not counted: ${o.failures.join('; ')}`, '');
  return out;
}

// ---- section 3 --------------------------------------------------------------------------------

function measurementText(m: Measurement): string {
  if ('gbps' in m) return `${fmt(m.gbps, 2)} GB/s`;
  if ('pending' in m) return 'pending';
  if ('skipped' in m) return `skipped: ${m.skipped}`;
  return `error: ${m.error}`;
}

function limitOf(c: Measurement, node: Measurement): { gbps: number; what: string } | null {
  if ('gbps' in c) return { gbps: c.gbps, what: 'C' };
  if ('gbps' in node) return { gbps: node.gbps, what: 'Node' };
  return null;
}

function relaySection(r: BenchResults): string[] {
  const out: string[] = [HEADINGS.relay, ''];
  const note = outcomeNote(r.relay);
  if (note || !('value' in r.relay)) return [...out, note ?? '', ''];
  const s = r.relay.value;
  out.push(
    "The limit, measured in the same run: one hop over a unix stream socket between two processes, one writing the state's size in 1 MiB writes, the other reading " +
      '(in C: `bench/fixtures/helper.c`, what the kernel allows; in Node: `net.Socket`, what a Node process gets). ' +
      "Streamed relay: MB/s end to end, from the old generation's dump to the new one's ack; memfd: the handoff time of the same state in a sealed memfd. " +
      `Medians over the repetitions. Relay status: ${s.relayStatus}.`,
    '',
    table(
      ['state', 'one hop, C', 'one hop, Node', 'streamed relay', 'fraction of the one-hop limit', 'memfd handoff'],
      s.rows.map((row) => {
        const limit = limitOf(row.rawC, row.rawNode);
        const stream = row.stream;
        return [
          sizeLabel(row.bytes),
          'gbps' in row.rawC ? `${fmt(row.rawC.gbps, 2)} GB/s (${ms(row.rawC.median, 2)})` : measurementText(row.rawC),
          'gbps' in row.rawNode
            ? `${fmt(row.rawNode.gbps, 2)} GB/s (${ms(row.rawNode.median, 2)})`
            : measurementText(row.rawNode),
          'gbps' in stream ? `${fmtInt(stream.gbps * 1000)} MB/s` : measurementText(stream),
          'gbps' in stream && limit
            ? `${fmt((100 * stream.gbps) / limit.gbps, 0)}% of ${limit.what}`
            : 'pending' in stream
              ? 'pending'
              : 'n/a',
          'median' in row.memfd ? ms(row.memfd.median, 2) : measurementText(row.memfd),
        ];
      }),
    ),
    '',
  );
  return out;
}

// ---- section 4 --------------------------------------------------------------------------------

function memText(m: Memory | { skipped: string } | { error: string } | null): [string, string] {
  if (m === null) return ['n/a', 'n/a'];
  if ('rssKb' in m) return [mb(m.rssKb), mb(m.hwmKb)];
  if ('skipped' in m) return [m.skipped, ''];
  return [`error: ${m.error.slice(0, 200)}`, ''];
}

function timingText(t: Timing): string {
  if ('median' in t) return ms(t.median);
  if ('skipped' in t) return t.skipped;
  return `error: ${t.error.slice(0, 200)}`;
}

function footprintSection(r: BenchResults): string[] {
  const out: string[] = [HEADINGS.footprint, ''];
  const note = outcomeNote(r.footprint);
  if (note || !('value' in r.footprint)) return [...out, note ?? '', ''];
  const f = r.footprint.value;
  const imm = find(r, 'aeterna-immediate');
  const pm2 = find(r, 'pm2');
  const rows: string[][] = [
    ['aeterna, supervising the bench HTTP app (idle)', ...memText(f.rss.aeterna)],
    ...(imm?.supervisorMemory
      ? [[`aeterna after section 1 (${imm.reloadsDone} reloads under load)`, ...memText(imm.supervisorMemory)]]
      : []),
    ['tini, supervising the same app', ...memText(f.rss.tini)],
    ...(pm2?.supervisorMemory
      ? [[`pm2's daemon after section 1 (cluster mode, one app)`, ...memText(pm2.supervisorMemory)]]
      : []),
    ['(for scale) an idle bare Node process', ...memText(f.rss.nodeBaseline)],
    ['(for scale) the app itself, under Aeterna', ...memText(f.rss.app)],
  ];
  out.push('### Memory (the supervisor process alone)', '', table(['process', 'RSS', 'peak RSS (VmHWM)'], rows), '');
  const a = f.startToExec.aeterna;
  const vs = (t: Timing): string => ('median' in t && 'median' in a ? ratio(a.median, t.median) : 'n/a');
  out.push(
    '### Start to exec',
    '',
    `From spawning the supervisor to the app's exec; the app is \`date +%s%N\`, which prints the wall clock as it runs. ${f.reps} runs each; Aeterna here is not PID 1 (a subreaper), with the same config loading, listeners (none) and control socket as in production. Last column: Aeterna's time over this one (above 1: Aeterna is slower).`,
    '',
    table(
      ['what', 'median', 'p95', 'Aeterna / this'],
      [
        ['the app spawned directly (floor)', ...timingCells(f.startToExec.direct), vs(f.startToExec.direct)],
        ['`tini -s -- app`', ...timingCells(f.startToExec.tini), vs(f.startToExec.tini)],
        ['bare `node -e 0`, spawn to exit', ...timingCells(f.startToExec.nodeE0), vs(f.startToExec.nodeE0)],
        ['**`aeterna start`**', ...timingCells(a), '1x'],
      ],
    ),
    '',
  );
  return out;
}

function timingCells(t: Timing): [string, string] {
  if ('median' in t) return [ms(t.median), ms(t.p95)];
  return [timingText(t), ''];
}

// ---- section 5 --------------------------------------------------------------------------------

function reapCells(row: ReapRow, n: number): string[] {
  if ('reapMs' in row)
    return [
      ms(row.reapMs),
      `${fmtInt(n / (row.reapMs / 1000))}/s`,
      row.left > 0 ? `${row.left} never reaped (timeout)` : '',
    ];
  if ('skipped' in row) return [row.skipped, '', ''];
  return [`error: ${row.error.slice(0, 200)}`, '', ''];
}

function reapingSection(r: BenchResults): string[] {
  const out: string[] = [HEADINGS.reaping, ''];
  const note = outcomeNote(r.reaping);
  if (note || !('value' in r.reaping)) return [...out, note ?? '', ''];
  const s = r.reaping.value;
  const a = s.aeterna;
  const vs = (row: ReapRow): string => ('reapMs' in row && 'reapMs' in a ? ratio(a.reapMs, row.reapMs) : 'n/a');
  out.push(
    `${fmtInt(s.orphans)} orphans (double fork: \`bench/fixtures/helper.c\`) released at once; the time until the last one has been reaped. ` +
      `The supervisor runs as ${s.mode}. The floor is the helper reaping its own orphans with blocking \`waitpid()\` as a subreaper. Last column: Aeterna's time over this one (above 1: Aeterna is slower).`,
    '',
    table(
      ['reaper', 'time to reap all', 'rate', 'note', 'Aeterna / this'],
      [
        ['floor (waitpid loop)', ...reapCells(s.floor, s.orphans), vs(s.floor)],
        ['tini', ...reapCells(s.tini, s.orphans), vs(s.tini)],
        ['**Aeterna**', ...reapCells(a, s.orphans), '1x'],
      ],
    ),
    '',
  );
  return out;
}

// ---- section 7 --------------------------------------------------------------------------------

function upgradeReport(r: BenchResults): string[] {
  const out: string[] = [HEADINGS.upgrade, ''];
  const note = outcomeNote(r.upgrade);
  if (note || !('value' in r.upgrade)) return [...out, note ?? '', ''];
  const u = r.upgrade.value;
  const l = u.underLoad;
  const failures = Object.entries(l.failures)
    .map(([k, v]) => `${k} ${v}`)
    .join(', ');
  out.push(
    `From running \`aeterna upgrade\` (the CLI) to its exit, which is when the re-executed Aeterna answered on the control socket; ` +
      `beside it, \`aeterna status\` through the same CLI (the same Node start-up and control round trip, no re-exec), ${u.reps} of each, alternating, without load. ` +
      `The ratio is the upgrade's time over the status round trip's.`,
    '',
    table(
      ['command', 'median', 'p95', 'upgrade / status'],
      [
        ['`aeterna status`', ms(u.status.median), ms(u.status.p95), '1x'],
        ['**`aeterna upgrade`**', ms(u.upgrade.median), ms(u.upgrade.p95), ratio(u.upgrade.median, u.status.median)],
      ],
    ),
    '',
    `Carrying the state relay: ${u.reps} upgrades of a daemon whose app (TypeScript SDK) holds its relay connection and has stored a ` +
      `${fmtInt(u.carrying.checkpointBytes >> 20)} MiB in-memory checkpoint (both handed over), each beside an upgrade of the plain daemon above, alternating:`,
    '',
    table(
      ['upgrade of', 'median', 'p95', 'over the plain upgrade', 'same app pid', 'same checkpoint seq'],
      [
        ['the plain daemon', ms(u.carrying.plain.median), ms(u.carrying.plain.p95), '1x', '', ''],
        [
          '**the daemon carrying the relay**',
          ms(u.carrying.upgrade.median),
          ms(u.carrying.upgrade.p95),
          ratio(u.carrying.upgrade.median, u.carrying.plain.median),
          u.carrying.sameAppPid ? 'yes' : '**no**',
          u.carrying.checkpointKept ? 'yes' : '**no**',
        ],
      ],
    ),
    '',
    `Then ${l.upgrades} upgrades in a row, each through the CLI, while autocannon loads the app with ${l.connections} keep-alive connections:`,
    '',
    table(
      [
        'upgrades',
        'requests ok',
        'failed',
        'upgrade median (p95) under load',
        're-execs after',
        'same Aeterna pid',
        'same app pid',
      ],
      [
        [
          String(l.upgrades),
          fmtInt(l.ok),
          `**${fmtInt(l.failed)}**${failures ? ` (${failures})` : ''}`,
          `${ms(l.upgrade.median)} (${ms(l.upgrade.p95)})`,
          String(l.reexecs),
          l.sameDaemonPid ? 'yes' : '**no**',
          l.sameAppPid ? 'yes' : '**no**',
        ],
      ],
    ),
    '',
  );
  return out;
}

// ---- section 6 --------------------------------------------------------------------------------

/** Issue 14's goal: 1 GiB through either SDK within this multiple of the one-hop socket copy. */
const SDK_RELAY_RATIO = 8;
/** ...with Aeterna's peak RSS growing by at most this much while it relays. */
const SDK_RELAY_RSS_MIB = 64;
const SDK_LABEL = { typescript: 'TypeScript SDK', python: 'Python SDK' } as const;

const sec = (msValue: number, digits = 2): string => `${fmt(msValue / 1000, digits)} s`;
const spreadText = (s: Spread): string =>
  s.min === s.max ? sec(s.median) : `${sec(s.median)} (${sec(s.min)} to ${sec(s.max)})`;

function sdkPathText(p: SdkPath): string {
  if ('skipped' in p) return `skipped: ${p.skipped}`;
  if ('error' in p) return `error: ${p.error.slice(0, 300)}`;
  return '';
}

function socketMs(m: Measurement): number | null {
  return 'median' in m ? m.median : null;
}

function relaySdkTargets(r: BenchResults): Target[] {
  if (!('value' in r.relaySdk)) return [];
  const rows = r.relaySdk.value.rows;
  const row = rows.find((x) => x.bytes === 1024 * MiB) ?? rows[rows.length - 1];
  if (!row) return [];
  const gib = row.bytes === 1024 * MiB;
  const peer = socketMs(row.socket);
  const out: Target[] = [];
  for (const sdk of ['typescript', 'python'] as const) {
    const p = row[sdk];
    const measured =
      'relay' in p
        ? `${sec(p.relay.median)}${peer !== null ? ` = ${ratio(p.relay.median, peer)} the socket copy` : ''}`
        : sdkPathText(p);
    out.push({
      target: `1 GiB relayed through the ${SDK_LABEL[sdk]} within ${SDK_RELAY_RATIO}x a one-hop unix socket copy`,
      measured: `${sizeLabel(row.bytes)}: ${measured}`,
      verdict:
        !gib || !('relay' in p) || peer === null ? 'n/a' : p.relay.median <= SDK_RELAY_RATIO * peer ? 'met' : 'MISSED',
      context: `${gib ? '' : 'no 1 GiB state in this run; '}one-hop copy ${peer !== null ? ms(peer, 1) : measurementText(row.socket)}; median of ${r.relaySdk.value.reps} reload(s), spread in section 6`,
    });
  }
  const growth = (['typescript', 'python'] as const)
    .map((sdk) => row[sdk])
    .filter((p): p is Extract<SdkPath, { peakGrowthKb: number }> => 'peakGrowthKb' in p);
  if (growth.length > 0) {
    const worst = Math.max(...growth.map((p) => p.peakGrowthKb));
    out.push({
      target: `Aeterna's peak RSS grows by <= ${SDK_RELAY_RSS_MIB} MiB while relaying through the SDKs`,
      measured: `${sizeLabel(row.bytes)}: at most ${mb(worst)}`,
      verdict: worst <= SDK_RELAY_RSS_MIB * 1024 ? 'met' : 'MISSED',
      context: 'VmRSS sampled every 10 ms over every reload (final sync included), and VmHWM',
    });
  }
  return out;
}

const stepsRows: Array<[string, keyof Steps]> = [
  ["reload's `relaying` mark to the old generation's dump callback (new generation's start-up, hello)", 'startToDump'],
  ['sender: dump callback to the first data frame', 'senderPrep'],
  ['  of which the check, SHA-256 or CRC-32 (sender)', 'senderHash'],
  ['sender: first data frame queued to the last one written', 'senderWrite'],
  ['receiver: load header to the SDK handing the state over (read, copy, verify)', 'receive'],
  ['  of which the check, SHA-256 or CRC-32 (receiver)', 'receiverHash'],
  ["receiver: the app's own checks", 'appLoad'],
  ['**dump callback to the state loaded (end to end, app side)**', 'dumpToLoaded'],
];

function stepMedian(p: SdkPath, final: boolean, key: keyof Steps): string {
  if (!('reloads' in p)) return 'n/a';
  const values = p.reloads.map((x) => (final ? x.finalSteps : x.steps)[key]).filter((v): v is number => v !== null);
  return values.length > 0 ? ms(median(values), 0) : '-';
}

function relaySdkSection(r: BenchResults): string[] {
  const out: string[] = [HEADINGS.relaySdk, ''];
  const note = outcomeNote(r.relaySdk);
  if (note || !('value' in r.relaySdk)) return [...out, note ?? '', ''];
  const s = r.relaySdk.value;
  out.push(
    'The state relay as users get it: an app (`test/fixtures/apps/plain_state_app.js` / `.py`) whose dump callback returns plain bytes and whose load verifies them, ' +
      `reloaded ${s.reps === 1 ? 'once' : `${s.reps} times`} per size through the real daemon (strategy immediate). The relay's time is the reload record's \`relaying -> relayed\` marks, what \`aeterna reload\` prints: ` +
      "it includes the new generation's start-up and hello (see the steps below). The final sync at promotion moves the state a second time: `draining -> done`, the old generation's exit included. " +
      `The peer (a) is a one-hop copy of the same size over a unix socket between two processes (\`bench/fixtures/helper.c\`, median). memfd (d): dump to ack of a sealed memfd (section 3's app). ` +
      'For scale, from the same run: SHA-256 of the state in Node and in Python (the SDKs hash every byte on each side), and a fresh Node process writing the state into newly allocated memory ' +
      '(the page faults a new generation pays to hold a streamed state; the one-hop copy reuses one 1 MiB buffer and never does). ' +
      `Target (issue 14): 1 GiB within ${SDK_RELAY_RATIO}x (a) with either SDK, Aeterna's peak RSS growth <= ${SDK_RELAY_RSS_MIB} MiB. Relay cells: median (min to max), and the median over (a).`,
    '',
  );
  const relayCell = (p: SdkPath, peer: number | null): string =>
    'relay' in p ? `${spreadText(p.relay)}, ${peer !== null ? ratio(p.relay.median, peer) : 'n/a'}` : sdkPathText(p);
  out.push(
    table(
      [
        'state',
        '(a) one-hop socket copy',
        '(b) TypeScript SDK relay',
        '(c) Python SDK relay',
        '(d) memfd',
        'SHA-256 of the state, Node / Python',
        'first write into fresh memory',
      ],
      s.rows.map((row) => {
        const peer = socketMs(row.socket);
        return [
          sizeLabel(row.bytes),
          peer !== null ? sec(peer, 3) : measurementText(row.socket),
          relayCell(row.typescript, peer),
          relayCell(row.python, peer),
          'median' in row.memfd ? ms(row.memfd.median, 2) : measurementText(row.memfd),
          `${row.sha256.node !== null ? sec(row.sha256.node) : 'n/a'} / ${row.sha256.python !== null ? sec(row.sha256.python) : 'n/a'}`,
          row.firstTouch !== null ? sec(row.firstTouch) : 'n/a',
        ];
      }),
    ),
    '',
  );
  out.push(
    table(
      [
        'state',
        'SDK',
        'relay over (a)',
        'final sync (draining -> done)',
        "Aeterna's RSS before",
        "Aeterna's peak RSS growth",
      ],
      s.rows.flatMap((row) =>
        (['typescript', 'python'] as const).map((sdk) => {
          const p = row[sdk];
          const peer = socketMs(row.socket);
          if (!('relay' in p)) return [sizeLabel(row.bytes), SDK_LABEL[sdk], sdkPathText(p), '', '', ''];
          return [
            sizeLabel(row.bytes),
            SDK_LABEL[sdk],
            peer !== null ? ratio(p.relay.median, peer) : 'n/a',
            spreadText(p.final),
            mb(p.rssBeforeKb),
            mb(p.peakGrowthKb),
          ];
        }),
      ),
    ),
    '',
  );
  const largest = s.rows[s.rows.length - 1];
  if (largest) {
    out.push(
      `### Where the time goes (${sizeLabel(largest.bytes)}, medians, from the apps' stamps)`,
      '',
      'Wall-clock steps on each side; the check is the time spent inside the SHA-256 or CRC-32 calls (CRC-32 where both generations offered it, docs/srp.md "Checksums"). Steps overlap where the SDK pipelines them, so they do not add up to the total.',
      '',
      table(
        ['step', 'TypeScript, relay', 'TypeScript, final sync', 'Python, relay', 'Python, final sync'],
        stepsRows.map(([label, key]) => [
          label,
          stepMedian(largest.typescript, false, key),
          stepMedian(largest.typescript, true, key),
          stepMedian(largest.python, false, key),
          stepMedian(largest.python, true, key),
        ]),
      ),
      '',
    );
  }
  return out;
}

// ---- the report -------------------------------------------------------------------------------

function headline(r: BenchResults): string[] {
  const out: string[] = [];
  if ('value' in r.reloads) {
    const parts = r.reloads.value.contenders
      .filter((c) => c.error === null)
      .map((c) => `${c.label} **${fmtInt(c.failed)}**`);
    out.push(`- Failed requests over ${r.reloads.value.params.reloads} reloads under load: ${parts.join(', ')}.`);
  }
  if ('value' in r.overhead && 'overhead' in r.overhead.value)
    out.push(
      `- Aeterna's own reload overhead: **${ms(r.overhead.value.overhead.median)}** median (${ms(r.overhead.value.overhead.p95)} p95).`,
    );
  if ('value' in r.footprint) {
    const f = r.footprint.value;
    const parts: string[] = [];
    if ('rssKb' in f.rss.aeterna) parts.push(`RSS **${mb(f.rss.aeterna.rssKb)}** supervising one app`);
    if ('median' in f.startToExec.aeterna)
      parts.push(`**${ms(f.startToExec.aeterna.median)}** from \`aeterna start\` to the app's exec`);
    if (parts.length > 0) out.push(`- Footprint: ${parts.join('; ')}.`);
  }
  if ('value' in r.reaping && 'reapMs' in r.reaping.value.aeterna) {
    const s = r.reaping.value;
    const t = 'reapMs' in s.tini ? ` (tini: ${ms(s.tini.reapMs)})` : '';
    out.push(`- ${fmtInt(s.orphans)} orphans reaped in **${ms((s.aeterna as { reapMs: number }).reapMs)}**${t}.`);
  }
  if ('value' in r.relay) out.push(`- State relay: ${r.relay.value.relayStatus}.`);
  if ('value' in r.upgrade) {
    const u = r.upgrade.value;
    out.push(
      `- \`aeterna upgrade\` answered in **${ms(u.upgrade.median)}** median (${ratio(u.upgrade.median, u.status.median)} an \`aeterna status\`); **${fmtInt(u.underLoad.failed)}** failed requests over ${u.underLoad.upgrades} upgrades under load.`,
    );
  }
  if ('value' in r.relaySdk) {
    const row = r.relaySdk.value.rows[r.relaySdk.value.rows.length - 1];
    const peer = row ? socketMs(row.socket) : null;
    if (row && peer !== null) {
      const parts = (['typescript', 'python'] as const).map((sdk) => {
        const p = row[sdk];
        return 'relay' in p
          ? `${SDK_LABEL[sdk]} **${sec(p.relay.median)}** (${ratio(p.relay.median, peer)})`
          : `${SDK_LABEL[sdk]} ${sdkPathText(p)}`;
      });
      out.push(
        `- ${sizeLabel(row.bytes)} relayed through the SDKs: ${parts.join(', ')}; a one-hop unix socket copy: ${sec(peer, 3)}.`,
      );
    }
  }
  return out;
}

/** A median with its spread, and its ratio to a peer's median. */
function timedText(t: Timed, peer?: number | null): string {
  if ('skipped' in t) return `skipped: ${t.skipped}`;
  if ('error' in t) return `error: ${t.error.slice(0, 200)}`;
  const ratio = peer ? ` (**${fmt(t.median / peer, 1)}x**)` : '';
  return `${ms(t.median, 2)}${ratio} [${fmt(t.min, 1)}..${fmt(t.max, 1)}]`;
}

const medianOf = (t: Timed | Measurement): number | null => ('median' in t ? t.median : null);

function checkpointReport(r: BenchResults): string[] {
  const out: string[] = [HEADINGS.checkpoint, ''];
  const note = outcomeNote(r.checkpoint);
  if (note || !('value' in r.checkpoint)) return [...out, note ?? '', ''];
  const s = r.checkpoint.value;
  out.push(
    `What one \`relay.checkpoint()\` costs the app (from the call to Aeterna's \`checkpointed\`, median of ${s.reps} [min..max]), in memory beside the one-hop unix socket copy of the same bytes (streamed, and as a sealed memfd the app made beforehand), and durable (\`path\`: written and fsynced before the answer) beside writing the same bytes to a file and fsyncing it. Ratios are to that peer, measured in this run.`,
    '',
    table(
      [
        'size',
        'one-hop copy',
        'TypeScript, memory',
        'Python, memory',
        'TypeScript, memfd',
        'write + fsync',
        'TypeScript, durable',
        'Python, durable',
      ],
      s.cost.map((c) => {
        const hop = medianOf(c.socket);
        return [
          `${fmt(c.bytes / MiB, 0)} MiB`,
          hop !== null ? ms(hop, 2) : measurementText(c.socket),
          timedText(c.typescript.memory, hop),
          timedText(c.python.memory, hop),
          timedText(c.typescript.memfd, hop),
          timedText(c.fsync),
          timedText(c.typescript.durable, c.fsync.median),
          timedText(c.python.durable, c.fsync.median),
        ];
      }),
    ),
    '',
    `From \`kill -9\` of the app (the TypeScript SDK's) to the generation Aeterna restarted saying ready with its state loaded from the checkpoint, beside the same restart without checkpoints (the app makes its bytes again); median of ${s.kills} [min..max]. Both include the same restart back-off (100 ms, doubling per restart in the window): the last two columns are the restarted process's own part, from its first stamp to ready.`,
    '',
    table(
      [
        'size',
        'kill -9 to ready, checkpoint',
        'kill -9 to ready, plain',
        'process start to ready, checkpoint',
        'process start to ready, plain',
      ],
      s.recovery.map((x) => [
        `${fmt(x.bytes / MiB, 0)} MiB`,
        timedText(x.checkpoint, medianOf(x.plain)),
        timedText(x.plain),
        timedText(x.checkpointProcess, medianOf(x.plainProcess)),
        timedText(x.plainProcess),
      ]),
    ),
    '',
  );
  return out;
}

export function renderReport(r: BenchResults, chartFile: string): string {
  const m = r.meta;
  const out: string[] = [];
  out.push(`# Aeterna benchmark: ${m.date} on ${m.machine.host}`, '');
  out.push(
    `${m.quick ? '**Quick mode** (what CI runs so the benchmark cannot rot: few reloads, small states; its numbers are not the reference). ' : ''}` +
      `Run with \`${m.command}\` from ${m.startedAt} to ${m.finishedAt}. Every number below comes from this one run on this one machine; ratios compare contenders measured in it.`,
    '',
  );
  out.push(...headline(r), '');
  out.push(HEADINGS.targets, '');
  const t = targets(r);
  out.push(
    table(
      ['target', 'measured', 'verdict', 'context'],
      t.map((x) => [x.target, x.measured, x.verdict === 'MISSED' ? '**MISSED**' : x.verdict, x.context]),
    ),
    '',
  );
  const missed = t.filter((x) => x.verdict === 'MISSED');
  if (missed.length > 0) out.push(`Missed in this run: ${missed.map((x) => x.target).join('; ')}.`, '');
  out.push(HEADINGS.machine, '');
  out.push(
    table(
      ['', ''],
      [
        ['host', m.machine.host],
        ['CPU', `${m.machine.cpu}, ${m.machine.cores} cores`],
        ['memory', `${fmt(m.machine.memoryGiB, 1)} GiB`],
        ['kernel', m.machine.kernel],
        ['OS', m.machine.distro],
        ['load average at start', m.machine.loadavgAtStart.map((v) => v.toFixed(2)).join(' ')],
        ['PID namespaces', m.machine.pid1],
        ['Aeterna', m.versions.aeterna],
        ['Node', m.versions.node],
        ['autocannon', m.versions.autocannon],
        ['pm2', m.versions.pm2],
        ['Python', m.versions.python],
        ['tini', m.versions.tini],
        ['wrk', m.versions.wrk],
        ['C compiler', m.versions.cc],
      ],
    ),
    '',
  );
  out.push(...reloadsSection(r, chartFile));
  out.push(...overheadSection(r));
  out.push(...relaySection(r));
  out.push(...footprintSection(r));
  out.push(...reapingSection(r));
  out.push(...relaySdkSection(r));
  out.push(...checkpointReport(r));
  out.push(HEADINGS.canary, '', ...('value' in r.canary ? renderCanary(r.canary.value) : [outcomeNote(r.canary)!, '']));
  out.push(...upgradeReport(r));
  out.push(
    HEADINGS.notes,
    '',
    '- All contenders run on the same machine as the load generator, one after the other, never at the same time; the machine is not isolated, so compare within a run, not across runs.',
    '- Aeterna runs the app from `bench/fixtures/` with the socket it owns at fd 3; the naive restart, tini and pm2 run the same file, which then binds the port itself.',
    '- Raw data: the `.json` file beside this report (timelines, per-reload failures and reload times, every overhead sample).',
    '',
  );
  return out.join('\n');
}

// The benchmark's quick mode, so it cannot rot: run it into a temp dir and check
// that the report is complete (every section, every table, every contender) and
// that the chart is well-formed SVG. Never a timing assertion: the numbers are
// whatever this machine gives.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { HEADINGS } from '../../bench/report';
import { ROOT, tempDir } from '../helpers/aeterna';

const RUN = path.join(ROOT, 'dist', 'bench', 'run.js');

function runBench(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [RUN, ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    // A hang guard, not a timing assertion.
    const guard = setTimeout(() => child.kill('SIGINT'), 150_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(guard);
      resolve({ code, stdout, stderr });
    });
  });
}

/** Well-formed enough for a hand-written SVG: one root, every tag closed in order, attributes quoted. */
function checkXml(text: string): void {
  const stack: string[] = [];
  const tag = /<(\/?)([A-Za-z][\w:-]*)((?:\s+[\w:-]+="[^"<]*")*)\s*(\/?)>|<!--[\s\S]*?-->|<\?[\s\S]*?\?>/g;
  let last = 0;
  let roots = 0;
  for (let m = tag.exec(text); m; m = tag.exec(text)) {
    const between = text.slice(last, m.index);
    assert.doesNotMatch(between, /[<>]/, `stray markup near offset ${last}: ${JSON.stringify(between.slice(0, 80))}`);
    assert.doesNotMatch(between, /&(?!(amp|lt|gt|quot|apos|#\d+);)/, `unescaped & near offset ${last}`);
    last = tag.lastIndex;
    if (m[2] === undefined) continue; // comment or declaration
    const [, closing, name, , selfClosing] = m;
    if (closing) {
      assert.equal(stack.pop(), name, `</${name}> closes the wrong element`);
    } else if (!selfClosing) {
      if (stack.length === 0) roots++;
      stack.push(name);
    } else if (stack.length === 0) {
      roots++;
    }
  }
  assert.equal(text.slice(last).trim(), '', 'nothing after the root element');
  assert.deepEqual(stack, [], 'every element is closed');
  assert.equal(roots, 1, 'one root element');
}

/** A section's timing in the raw JSON: a spread, or why it is missing. */
type Timed = { median?: number; error?: string };

describe('benchmark, quick mode (CI)', { timeout: 180_000 }, () => {
  it('produces a complete report, the raw JSON and a well-formed SVG chart', async () => {
    const out = tempDir('aeterna-bench-test-');
    try {
      const r = await runBench(['--quick', '--out', out]);
      assert.equal(r.code, 0, `the quick benchmark failed\n${r.stderr.slice(-6000)}`);
      const files = fs.readdirSync(out);
      const md = files.find((f) => f.endsWith('.md'));
      const svg = files.find((f) => f.endsWith('.svg'));
      const json = files.find((f) => f.endsWith('.json'));
      assert.ok(md && svg && json, `report, chart and data written (got ${files.join(', ')})`);
      assert.match(md, /^\d{4}-\d{2}-\d{2}-.+\.md$/, 'named <date>-<host>.md');
      assert.equal(r.stdout.trim(), path.join(out, md), 'prints the report path');

      // Every contender ran (its error, if any, in the message).
      const data = JSON.parse(fs.readFileSync(path.join(out, json), 'utf8')) as {
        reloads: { value: { contenders: Array<{ id: string; reloadsDone: number; error: string | null }> } };
      };
      assert.deepEqual(
        data.reloads.value.contenders.map((c) => [c.id, c.error, c.reloadsDone]),
        [
          ['aeterna-immediate', null, 3],
          ['aeterna-canary', null, 3],
          ['naive', null, 3],
          ['pm2', null, 3],
        ],
        `every contender completed its reloads\n${r.stderr.slice(-4000)}`,
      );

      // The relay through both SDKs: one reload each, promoted, every step stamped by the apps.
      const sdk = JSON.parse(fs.readFileSync(path.join(out, json), 'utf8')) as {
        relaySdk: {
          value: {
            rows: Array<
              Record<
                'typescript' | 'python',
                { reloads?: Array<{ steps: Record<string, number | null> }>; error?: string }
              >
            >;
          };
        };
      };
      for (const name of ['typescript', 'python'] as const) {
        const p = sdk.relaySdk.value.rows[0][name];
        assert.equal(p.reloads?.length, 1, `one reload relayed through the ${name} SDK (${p.error ?? ''})`);
        const missing = Object.entries(p.reloads[0].steps).filter(([k, v]) => v === null && k !== 'startToDump');
        assert.deepEqual(missing, [], `every step of the ${name} relay stamped`);
      }

      // Checkpoints through both SDKs, in memory and durable, and kill -9 with and without one: each measured.
      const ckpt = (
        JSON.parse(fs.readFileSync(path.join(out, json), 'utf8')) as {
          checkpoint: {
            value: {
              cost: Array<Record<'typescript' | 'python', Record<'memory' | 'durable', Timed>>>;
              recovery: Array<Record<'checkpoint' | 'plain', Timed>>;
            };
          };
        }
      ).checkpoint.value;
      for (const sdk of ['typescript', 'python'] as const) {
        for (const mode of ['memory', 'durable'] as const) {
          const t = ckpt.cost[0][sdk][mode];
          assert.equal(
            typeof t.median,
            'number',
            `a ${mode} checkpoint through the ${sdk} SDK measured (${t.error ?? ''})`,
          );
        }
      }
      for (const way of ['checkpoint', 'plain'] as const)
        assert.equal(
          typeof ckpt.recovery[0][way].median,
          'number',
          `kill -9 to ready, ${way}, measured (${ckpt.recovery[0][way].error ?? ''})`,
        );

      const report = fs.readFileSync(path.join(out, md), 'utf8');
      for (const heading of Object.values(HEADINGS))
        assert.ok(report.includes(`\n${heading}\n`), `section "${heading}"`);
      assert.doesNotMatch(report, /This section failed/, 'no section failed');
      assert.doesNotMatch(report, /\bNaN\b|undefined|\[object /, 'no unformatted values');
      const tables = [
        '| target | measured | verdict | context |',
        '| contender | how it reloads |',
        '| contender | reloads | failed requests | total requests | failed per reload | req/s (2xx, whole run) | failures by kind |',
        '| contender | steady req/s | steady p50 | steady p99 | reload req/s | reload p50 | reload p99 | p99 reload / steady | reload duration (median) |',
        '| contender | reloads with failures |',
        '| measure | median | p95 |',
        '| state | one hop, C | one hop, Node | streamed relay | fraction of the one-hop limit | memfd handoff |',
        '| process | RSS | peak RSS (VmHWM) |',
        '| what | median | p95 | Aeterna / this |',
        '| reaper | time to reap all | rate | note | Aeterna / this |',
        '| state | (a) one-hop socket copy | (b) TypeScript SDK relay | (c) Python SDK relay | (d) memfd |',
        '| state | SDK | relay over (a) | final sync (draining -> done) |',
        '| step | TypeScript, relay | TypeScript, final sync | Python, relay | Python, final sync |',
        '| configured weight | connections | to the new generation | measured share | off by (points) | failed |',
        '| load | requests | failed | failures by kind |',
      ];
      for (const header of tables) assert.ok(report.includes(header), `table ${header}`);
      // wrk is optional: either its table or the sentence saying it is not installed.
      assert.ok(
        report.includes('| contender | reloads | failed | requests |') || report.includes('wrk: not installed'),
        'the wrk cross-check or its absence',
      );
      for (const contender of ['Aeterna immediate', 'Aeterna canary', 'naive restart', 'pm2 cluster reload']) {
        assert.match(report, new RegExp(`^\\| ${contender} \\| \\d+`, 'm'), `a failures row for ${contender}`);
      }
      for (const row of ['1 MiB', '16 MiB'])
        assert.match(report, new RegExp(`^\\| ${row} \\|`, 'm'), `relay row ${row}`);
      for (const weight of ['10%', '50%', '90%', 'none (one shared socket)'])
        assert.ok(report.includes(`\n| ${weight} | 400 | `), `canary share row ${weight}`);
      assert.match(report, /pending|MB\/s/, 'the relay rows say pending or carry a figure');
      for (const what of ['tini', 'node -e 0', 'aeterna start'])
        assert.ok(report.includes(what), `footprint row ${what}`);
      assert.ok(report.includes(`](${svg})`), 'the report embeds the chart');

      const chart = fs.readFileSync(path.join(out, svg), 'utf8');
      assert.match(chart, /^<svg xmlns="http:\/\/www\.w3\.org\/2000\/svg"/);
      checkXml(chart);
      assert.equal((chart.match(/<polyline /g) ?? []).length, 8, 'two lines (requests/s, failures/s) per contender');
      assert.ok((chart.match(/<rect [^>]*fill-opacity/g) ?? []).length >= 4 * 3, 'the reload windows are marked');
    } finally {
      fs.rmSync(out, { recursive: true, force: true });
    }
  });
});

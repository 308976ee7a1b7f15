// bench/compat.ts in its quick mode (2 reloads per server and load): the compatibility report is complete, with
// every server either measured under both loads (every reload promoted, requests served) or skipped saying what
// to install. Counts only; which server loses how many requests is the benchmark's finding, not asserted here.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT, pidNamespaceUnavailable, tempDir } from '../helpers/aeterna';
import { MODES, SERVERS, type Row } from '../../bench/compat';

describe('bench/compat.js --quick', { skip: pidNamespaceUnavailable() ?? false, timeout: 600000 }, () => {
  it('reports every server: measured under keep-alive and per-connection load, or skipped with what to install', async () => {
    const out = tempDir('aeterna-compat-test-');
    const child = spawn(process.execPath, [path.join(ROOT, 'dist', 'bench', 'compat.js'), '--quick', '--out', out], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
    assert.equal(code, 0, stderr);
    const files = fs.readdirSync(out).sort();
    assert.equal(files.length, 2, files.join(', '));
    const report = JSON.parse(
      fs.readFileSync(
        path.join(
          out,
          files.find((f) => f.endsWith('.json'))!,
        ),
        'utf8',
      ),
    ) as { rows: Row[] };
    const markdown = fs.readFileSync(
      path.join(
        out,
        files.find((f) => f.endsWith('.md'))!,
      ),
      'utf8',
    );
    assert.deepEqual(
      report.rows.map((r) => r.id),
      SERVERS.map((s) => s.id),
    );
    for (const row of report.rows) {
      assert.ok(!('error' in row), `${row.id}: ${'error' in row ? row.error : ''}`);
      if ('skipped' in row) {
        assert.match(row.skipped, /install/, `${row.id} says what to install`);
        assert.match(stderr, new RegExp(`skipping ${row.id}: `));
        continue;
      }
      for (const mode of MODES) {
        const phase = (row as Record<string, unknown>)[mode] as {
          reloads: number;
          promoted: number;
          stats: { ok: number; failed: number; failures: Record<string, number> };
        };
        assert.equal(phase.reloads, 2, `${row.id} ${mode}`);
        assert.equal(phase.promoted, 2, `${row.id} ${mode}: every reload promoted`);
        assert.ok(phase.stats.ok > 0, `${row.id} ${mode}: requests served`);
        assert.equal(
          Object.values(phase.stats.failures).reduce((a, b) => a + b, 0),
          phase.stats.failed,
          `${row.id} ${mode}: failures add up`,
        );
      }
    }
    for (const s of SERVERS) assert.ok(markdown.includes(`| ${s.label} |`), `the table has a row for ${s.id}`);
  });
});

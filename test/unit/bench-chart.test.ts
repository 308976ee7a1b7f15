// `make bench`'s chart (bench/svg.ts) as small multiples: one row of panels per measure, one panel per contender,
// one line per panel, the reload windows shaded in each.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { renderChart } from '../../bench/svg';
import type { ContenderResult } from '../../bench/sections/reloads';

function contender(id: string, failed: number[]): ContenderResult {
  return {
    id,
    label: id,
    error: null,
    failed: failed.reduce((a, b) => a + b, 0),
    durationMs: failed.length * 1000,
    windows: [
      [1000, 1500],
      [3000, 3400],
    ],
    timeline: { bucketMs: 1000, okPerS: failed.map((f) => 1000 - f), failedPerS: failed },
  } as unknown as ContenderResult;
}

test('one panel per measure and contender, each with one line and its reload windows', () => {
  const runs = [contender('aeterna-immediate', [0, 0, 0, 0, 0]), contender('naive', [0, 40, 0, 300, 0])];
  const svg = renderChart(runs, { title: 'reloads <&> load' });
  assert.match(svg, /^<svg xmlns="http:\/\/www\.w3\.org\/2000\/svg"/);
  assert.ok(svg.includes('reloads &lt;&amp;&gt; load'), 'text is escaped');
  const panels = svg.match(/<rect [^>]*fill="none" stroke="#999999"\/>/g) ?? [];
  assert.equal(panels.length, 2 * 2, 'two measures by two contenders');
  assert.equal((svg.match(/<polyline /g) ?? []).length, 4, 'one line per panel');
  assert.equal((svg.match(/<rect [^>]*fill-opacity/g) ?? []).length, 2 * 2 * 2, 'each reload window in each panel');
  assert.ok(svg.includes('naive: 340 failed'));
  assert.ok(svg.trimEnd().endsWith('</svg>'));
});

test('no contender ran: a chart that says so', () => {
  assert.match(renderChart([], { title: 'none' }), /no contender completed a run/);
});

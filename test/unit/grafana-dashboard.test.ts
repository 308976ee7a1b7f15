// deploy/grafana/aeterna-dashboard.json: every query names only metrics Aeterna exports (its metrics registry), and
// the JSON has what Grafana's classic dashboard model needs to import it (Grafana itself is not run here).
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Metrics } from '../../src/monitor/metrics';
import { STATES } from '../../src/orchestrator/fsm';
import { ROOT } from '../helpers/aeterna';

const FILE = path.join(ROOT, 'deploy', 'grafana', 'aeterna-dashboard.json');

interface Target {
  refId?: unknown;
  expr?: unknown;
  datasource?: unknown;
}
interface Panel {
  id?: unknown;
  type?: unknown;
  title?: unknown;
  gridPos?: Record<string, unknown>;
  datasource?: unknown;
  targets?: Target[];
}

const dashboard = JSON.parse(fs.readFileSync(FILE, 'utf8')) as Record<string, unknown> & { panels: Panel[] };
const targets = (): Target[] => dashboard.panels.flatMap((p) => p.targets ?? []);

/** Metric names in a PromQL expression: the aeterna_ ones (functions, labels and variables are not). */
function metricNames(expr: string): string[] {
  const noStrings = expr.replace(/"[^"]*"/g, '""'); // label values such as "$instance"
  return [...noStrings.matchAll(/\b(aeterna_[a-z0-9_]+)\b/g)].map((m) => m[1]);
}

describe('the Grafana dashboard', () => {
  test('every expression names only metrics in the metrics registry', async () => {
    const exported = new Metrics(true, STATES, 'Stopped').export();
    assert.ok(exported);
    const registered = new Set((await exported.registry.getMetricsAsJSON()).map((m) => m.name));
    const histograms = new Set(
      (await exported.registry.getMetricsAsJSON()).filter((m) => String(m.type) === 'histogram').map((m) => m.name),
    );
    const known = (name: string): boolean => {
      if (registered.has(name)) return true;
      const base = name.replace(/_(bucket|sum|count)$/, '');
      return base !== name && histograms.has(base);
    };
    const exprs = targets().map((t) => t.expr);
    assert.ok(exprs.length >= 10, `queries found: ${exprs.length}`);
    const unknown: string[] = [];
    for (const expr of exprs) {
      assert.equal(typeof expr, 'string');
      const names = metricNames(expr as string);
      assert.ok(names.length > 0, `an expression without an Aeterna metric: ${String(expr)}`);
      unknown.push(...names.filter((n) => !known(n)));
    }
    assert.deepEqual(unknown, [], 'metrics the dashboard queries but Aeterna does not export');
  });

  test('it covers reloads, their duration, generations, the relay, checkpoints, restarts, memory and CPU', () => {
    const all = targets()
      .map((t) => String(t.expr))
      .join('\n');
    for (const name of [
      'aeterna_reloads_total',
      'aeterna_reload_duration_seconds_bucket',
      'aeterna_retiring_generations',
      'aeterna_state_handoff_bytes_total',
      'aeterna_state_handoff_duration_seconds_bucket',
      'aeterna_checkpoints_total',
      'aeterna_child_restarts_total',
      'aeterna_app_memory_bytes',
      'aeterna_app_cpu_seconds',
    ])
      assert.ok(all.includes(name), name);
  });

  test("has the fields Grafana's dashboard JSON model requires", () => {
    assert.equal(typeof dashboard.title, 'string');
    assert.equal(typeof dashboard.uid, 'string');
    assert.ok(Number.isInteger(dashboard.schemaVersion) && (dashboard.schemaVersion as number) >= 36);
    assert.ok(Array.isArray(dashboard.panels) && dashboard.panels.length > 0);
    const time = dashboard.time as { from?: unknown; to?: unknown };
    assert.equal(typeof time.from, 'string');
    assert.equal(typeof time.to, 'string');
    const variables = (dashboard.templating as { list: Array<{ name: string; type: string }> }).list;
    assert.ok(variables.some((v) => v.name === 'datasource' && v.type === 'datasource'));
    assert.ok(Array.isArray((dashboard.annotations as { list: unknown }).list));
    const ids = new Set<unknown>();
    for (const p of dashboard.panels) {
      assert.ok(Number.isInteger(p.id) && !ids.has(p.id), `panel ids are unique integers (${String(p.id)})`);
      ids.add(p.id);
      assert.equal(typeof p.type, 'string');
      assert.equal(typeof p.title, 'string');
      for (const k of ['h', 'w', 'x', 'y'])
        assert.ok(Number.isInteger(p.gridPos?.[k]), `${String(p.title)}: gridPos.${k}`);
      assert.ok((p.gridPos!.x as number) + (p.gridPos!.w as number) <= 24, 'within the 24-column grid');
      assert.deepEqual(p.datasource, { type: 'prometheus', uid: '${datasource}' });
      const refIds = (p.targets ?? []).map((t) => t.refId);
      assert.ok(refIds.length > 0 && new Set(refIds).size === refIds.length, `${String(p.title)}: unique refIds`);
    }
  });
});

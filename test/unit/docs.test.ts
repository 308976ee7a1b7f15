// The docs against the code: every config key of the schema is in docs/configuration.md with its default (and
// no key there is unknown to the schema); every CLI command and option that buildProgram() registers is in the
// README or docs/operations.md; every error code, exit code and metric is in docs/operations.md; the module paths
// docs/architecture.md names exist; relative links in the README and docs/ resolve.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import { Counter, Gauge, Histogram, Summary } from 'prom-client';
import { buildProgram } from '../../src/cli/main';
import { CliExit } from '../../src/cli/exit-codes';
import { configSchema } from '../../src/config/schema';
import type { Spec } from '../../src/config/spec';
import { ErrorCodes, ExitCodes } from '../../src/errors';
import { Metrics } from '../../src/monitor/metrics';
import { STATES } from '../../src/orchestrator/fsm';
import { ROOT } from '../helpers/aeterna';

const read = (rel: string): string => fs.readFileSync(path.join(ROOT, rel), 'utf8');
const README = read('README.md');
const CONFIGURATION = read('docs/configuration.md');
const OPERATIONS = read('docs/operations.md');
const ARCHITECTURE = read('docs/architecture.md');

interface Key {
  path: string;
  presence: 'required' | 'optional' | 'default';
  value?: unknown;
  kind: Spec['kind'];
}

/** Every key path of the schema, as the docs write them: `service.listeners[].name`. */
function schemaKeys(spec: Spec, prefix = ''): Key[] {
  if (spec.kind === 'list') return spec.items.kind === 'object' ? schemaKeys(spec.items, `${prefix}[]`) : [];
  if (spec.kind !== 'object') return [];
  return Object.entries(spec.fields).flatMap(([name, field]) => {
    const keyPath = prefix === '' ? name : `${prefix}.${name}`;
    const key: Key = {
      path: keyPath,
      presence: field.presence,
      kind: field.spec.kind,
      ...(field.presence === 'default' ? { value: field.value } : {}),
    };
    return [key, ...schemaKeys(field.spec, keyPath)];
  });
}

/** Table rows of a markdown text whose first cell is one `code` span: key -> the row's cells. */
function keyRows(markdown: string): Map<string, string[]> {
  const rows = new Map<string, string[]>();
  for (const line of markdown.split('\n')) {
    const m = /^\|\s*`([^`]+)`\s*\|(.*)\|\s*$/.exec(line);
    if (m)
      rows.set(
        m[1],
        m[2].split(/(?<!\\)\|/).map((c) => c.trim()),
      );
  }
  return rows;
}

describe('docs/configuration.md', () => {
  const keys = schemaKeys(configSchema);
  const rows = keyRows(CONFIGURATION);

  test('the schema has keys to check (the walk works)', () => {
    assert.ok(keys.length >= 30, `${keys.length} keys`);
    assert.ok(keys.some((k) => k.path === 'service.listeners[].address'));
    assert.ok(keys.some((k) => k.path === 'orchestration.state_handoff.max_frame'));
  });

  test('every config key has a row', () => {
    assert.deepEqual(
      keys.filter((k) => !rows.has(k.path)).map((k) => k.path),
      [],
    );
  });

  test("every row's default is the schema's", () => {
    const wrong: string[] = [];
    for (const key of keys) {
      const cells = rows.get(key.path);
      if (!cells) continue;
      const defaultCell = cells[1];
      const expected =
        key.presence === 'required'
          ? '*required*'
          : key.presence === 'optional'
            ? 'absent'
            : key.kind === 'object'
              ? 'all defaults'
              : `\`${JSON.stringify(key.value)}\``;
      if (defaultCell !== expected) wrong.push(`${key.path}: documented ${defaultCell}, schema says ${expected}`);
    }
    assert.deepEqual(wrong, []);
  });

  test('no row documents a key the schema does not have', () => {
    const known = new Set(keys.map((k) => k.path));
    assert.deepEqual(
      [...rows.keys()].filter((k) => !known.has(k)),
      [],
    );
  });
});

describe('the CLI in the README and docs/operations.md', () => {
  const program = buildProgram();
  const docs = README + '\n' + OPERATIONS;

  test('every command is documented as `aeterna <command>`', () => {
    const names = program.commands.map((c) => c.name());
    assert.ok(names.length >= 7, names.join(' '));
    assert.deepEqual(
      names.filter((n) => !docs.includes(`aeterna ${n}`)),
      [],
    );
  });

  test('every option is documented with its flags as declared', () => {
    const missing: string[] = [];
    for (const command of [program, ...program.commands]) {
      for (const option of command.options) {
        if (!docs.includes(`\`${option.flags}\``)) missing.push(`${command.name()} ${option.flags}`);
      }
    }
    assert.deepEqual(missing, []);
  });

  test("every client exit code is in operations.md's table", () => {
    const rows = keyRows(OPERATIONS);
    assert.deepEqual(
      Object.entries(CliExit)
        .filter(([, code]) => !rows.has(String(code)))
        .map(([name]) => name),
      [],
    );
  });

  test("every exit code of aeterna start is in operations.md's table", () => {
    const rows = keyRows(OPERATIONS);
    const missing = Object.entries(ExitCodes).filter(
      ([name, code]) => !rows.has(String(code)) && !(name === 'FAILURE' && rows.has('1')),
    );
    assert.deepEqual(
      missing.map(([name]) => name),
      [],
    );
    for (const code of ['126', '127']) assert.match(OPERATIONS, new RegExp(`\`${code}\``));
  });
});

describe('error codes and metrics in docs/operations.md', () => {
  test('every error code has a row', () => {
    const rows = keyRows(OPERATIONS);
    assert.deepEqual(
      Object.keys(ErrorCodes).filter((code) => !rows.has(code)),
      [],
    );
  });

  test('no unknown error code is mentioned', () => {
    const mentioned = new Set(OPERATIONS.match(/\bE_[A-Z_]+\b/g) ?? []);
    assert.deepEqual(
      [...mentioned].filter((code) => !(code in ErrorCodes)),
      [],
    );
  });

  test('every reload outcome is explained', () => {
    for (const outcome of ['promoted', 'rolled_back', 'failed']) assert.ok(keyRows(OPERATIONS).has(outcome), outcome);
  });

  test('every metric Aeterna defines has a row', () => {
    const exported = new Metrics(true, STATES, 'Stopped').export();
    assert.ok(exported, 'metrics are exported when the endpoint is on');
    const names = Object.values(exported)
      .filter(
        (v): v is { name: string } =>
          v instanceof Counter || v instanceof Gauge || v instanceof Histogram || v instanceof Summary,
      )
      .map((m) => m.name);
    assert.ok(names.length >= 8, names.join(' '));
    const rows = keyRows(OPERATIONS);
    assert.deepEqual(
      names.filter((n) => !rows.has(n)),
      [],
    );
  });

  test('no unknown metric is mentioned', async () => {
    const exported = new Metrics(true, STATES, 'Stopped').export();
    assert.ok(exported);
    const registered = new Set((await exported.registry.getMetricsAsJSON()).map((m) => m.name));
    const mentioned = [...OPERATIONS.matchAll(/\b(aeterna_[a-z0-9_]+)(\*)?/g)]
      .filter((m) => m[2] === undefined)
      .map((m) => m[1]);
    const base = (name: string): string => name.replace(/_(bucket|sum|count)$/, '');
    assert.deepEqual(
      mentioned.filter((n) => !registered.has(n) && !registered.has(base(n))),
      [],
    );
  });
});

describe('the tests the docs name, and the test command', () => {
  const TIERS = ['unit', 'daemon', 'sdk', 'packaging', 'endurance'];
  const testFiles = (dir: string): string[] =>
    fs
      .readdirSync(path.join(ROOT, dir), { withFileTypes: true })
      .flatMap((e) =>
        e.isDirectory() ? testFiles(`${dir}/${e.name}`) : e.name.endsWith('.test.ts') ? [`${dir}/${e.name}`] : [],
      );
  const markdown = (dir: string): string[] =>
    fs.existsSync(path.join(ROOT, dir))
      ? fs
          .readdirSync(path.join(ROOT, dir))
          .filter((f) => f.endsWith('.md'))
          .map((f) => `${dir}/${f}`)
      : [];

  test('every test file the docs name exists', () => {
    const docs = [
      'README.md',
      'bench/README.md',
      'test/conformance/README.md',
      ...markdown('docs'),
      ...['go', 'python', 'java'].flatMap((c) => markdown(`clients/${c}`)),
      ...fs.readdirSync(path.join(ROOT, 'examples')).flatMap((e) => markdown(`examples/${e}`)),
    ];
    const named = new Set(
      docs.flatMap((doc) => [...read(doc).matchAll(/\btest\/[A-Za-z0-9_./-]+\.test\.ts\b/g)].map((m) => m[0])),
    );
    assert.ok(named.size >= 30, `${named.size} test files named`);
    assert.deepEqual(
      [...named].filter((p) => !fs.existsSync(path.join(ROOT, p))),
      [],
    );
  });

  test('every test file sits in a tier the Makefile runs', () => {
    const files = testFiles('test');
    assert.ok(files.length >= 40, `${files.length} test files`);
    assert.deepEqual(
      files.filter((f) => !TIERS.includes(f.split('/')[1])),
      [],
    );
    const makefile = read('Makefile');
    for (const tier of TIERS)
      assert.match(makefile, new RegExp(`\\$\\(call tests_in,test/${tier}\\)`), `the Makefile lists test/${tier}`);
  });

  test("CI runs the README's test command", () => {
    const block = /## Two commands\n[\s\S]*?```sh\n([\s\S]*?)```/.exec(README);
    assert.ok(block, 'README has the two commands');
    const command = block[1]
      .split('\n')
      .map((l) => l.replace(/#.*/, '').trim())
      .find((l) => l.startsWith('make test'));
    assert.ok(command, "README's test command");
    const ci = read('.ci/run')
      .split('\n')
      .map((l) => l.trim())
      .filter((l) => l.startsWith('make '));
    assert.deepEqual(ci, [command]);
  });
});

describe('docs/architecture.md', () => {
  test('has the data flow as Mermaid', () => {
    assert.match(ARCHITECTURE, /```mermaid\ngraph TD\n/);
    assert.match(ARCHITECTURE, /```mermaid\nsequenceDiagram\n/);
  });

  test('every module it names exists', () => {
    const named = new Set(
      [...ARCHITECTURE.matchAll(/\b((?:src|native|bin)\/[A-Za-z0-9_./-]+\.(?:ts|cc|js))\b/g)].map((m) => m[1]),
    );
    assert.ok(named.size >= 25, `${named.size} paths`);
    assert.deepEqual(
      [...named].filter((p) => !fs.existsSync(path.join(ROOT, p))),
      [],
    );
  });

  test('names every source directory under src/', () => {
    const dirs = fs
      .readdirSync(path.join(ROOT, 'src'), { withFileTypes: true })
      .filter((e) => e.isDirectory())
      .map((e) => `src/${e.name}/`);
    assert.deepEqual(
      dirs.filter((d) => !ARCHITECTURE.includes(d)),
      [],
    );
  });
});

describe('links', () => {
  for (const file of [
    'README.md',
    'docs/architecture.md',
    'docs/configuration.md',
    'docs/operations.md',
    'docs/adopting.md',
    'docs/typescript-sdk.md',
    'clients/python/README.md',
    'clients/java/README.md',
    'examples/go-counter/README.md',
  ]) {
    test(`relative links in ${file} resolve`, () => {
      const text = read(file);
      const broken: string[] = [];
      for (const m of text.matchAll(/\]\(([^)\s]+)\)/g)) {
        const target = m[1];
        if (/^[a-z]+:/.test(target)) continue;
        const [rel, anchor] = target.split('#');
        const resolved = rel === '' ? path.join(ROOT, file) : path.resolve(path.dirname(path.join(ROOT, file)), rel);
        if (!fs.existsSync(resolved)) {
          broken.push(target);
          continue;
        }
        if (anchor && resolved.endsWith('.md')) {
          const slugs = [...fs.readFileSync(resolved, 'utf8').matchAll(/^#+ (.+)$/gm)].map((h) =>
            h[1]
              .toLowerCase()
              .replace(/[^a-z0-9 _-]/g, '')
              .replace(/ /g, '-'),
          );
          if (!slugs.includes(anchor)) broken.push(target);
        }
      }
      assert.deepEqual(broken, []);
    });
  }
});

// Random mutations of a config document, shared by the config loader's property
// tests (test/unit/fuzz.test.ts) and `aeterna start` over mutated configs
// (test/daemon/cli/start-fuzz.test.ts).
import fc from 'fast-check';
import { parse as parseYaml, stringify as stringifyYaml } from 'yaml';

/**
 * Plausible values of every type, including the ones validators trip over. Each value is a fresh copy:
 * a mutation may write into it, and a shared constant would then change (even turn cyclic) for later runs.
 */
export const weirdValue: fc.Arbitrary<unknown> = fc
  .oneof(
    fc.constantFrom(
      null,
      true,
      false,
      0,
      -1,
      1,
      65535,
      65536,
      2 ** 53,
      -0,
      1.5,
      NaN,
      Infinity,
      '',
      ' ',
      '0',
      '0s',
      '1ms',
      '99999h',
      '1KiB',
      '2GiB',
      '0777',
      '0o777',
      'tcp://127.0.0.1:0',
      'tcp://[::1]:1',
      'unix://',
      'unix://rel/x.sock',
      'x'.repeat(300),
      '\u0000',
      'a\nb',
      '../..',
      '~',
      '${HOME}',
      'KEY=VALUE',
      'LISTEN_FDS=3',
      [],
      {},
      [[]],
      [null],
      { a: 1 },
    ),
    fc.string({ maxLength: 20 }),
    fc.integer(),
    fc.double(),
    fc.array(fc.string({ maxLength: 10 }), { maxLength: 4 }),
  )
  .map((v) => structuredClone(v));

/** Every path to a value in a plain tree (maps and lists). */
function valuePaths(value: unknown, prefix: Array<string | number> = []): Array<Array<string | number>> {
  const out: Array<Array<string | number>> = [prefix];
  if (Array.isArray(value)) value.forEach((v, i) => out.push(...valuePaths(v, [...prefix, i])));
  else if (value !== null && typeof value === 'object')
    for (const [k, v] of Object.entries(value)) out.push(...valuePaths(v, [...prefix, k]));
  return out;
}

export type TreeMutation = { which: number; action: 'set' | 'delete'; value: unknown };
export const treeMutation: fc.Arbitrary<TreeMutation> = fc.record({
  which: fc.nat(),
  action: fc.constantFrom('set', 'set', 'delete'),
  value: weirdValue,
});

/** Replace (or delete) the value at one path of the parsed config; returns the new YAML text. */
export function applyTree(source: string, mutations: TreeMutation[]): string {
  const tree = parseYaml(source) as Record<string, unknown>;
  const root: unknown = tree;
  for (const m of mutations) {
    const paths = valuePaths(root).filter((p) => p.length > 0);
    if (paths.length === 0) break;
    const p = paths[m.which % paths.length];
    let parent = root as Record<string | number, unknown>;
    for (const k of p.slice(0, -1)) parent = parent[k] as Record<string | number, unknown>;
    const last = p[p.length - 1];
    if (m.action === 'delete') {
      if (Array.isArray(parent)) parent.splice(last as number, 1);
      else delete parent[last];
    } else {
      parent[last] = structuredClone(m.value);
    }
  }
  return stringifyYaml(root);
}

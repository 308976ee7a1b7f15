// Turns YAML text into a small tree of plain values that remember where they
// were written (line, column). Everything YAML-specific stays here: syntax
// errors, duplicate and non-string keys, aliases, tags. The validator then works
// on this tree only, and so can run defaults through the same code path.

import { isAlias, isMap, isScalar, isSeq, LineCounter, parseDocument, type Node } from 'yaml';

export interface Position {
  line: number;
  column: number;
}

export type Scalar = string | number | boolean | null;

export type Located =
  | { kind: 'scalar'; value: Scalar; pos: Position }
  | { kind: 'list'; items: Located[]; pos: Position }
  | { kind: 'map'; entries: MapEntry[]; pos: Position }
  /** Something already reported (a bad alias, an unsupported value); validators skip it quietly. */
  | { kind: 'broken'; pos: Position };

export interface MapEntry {
  key: string;
  keyPos: Position;
  value: Located;
}

export type ReportAt = (pos: Position, path: string, message: string) => void;

/** Caps alias expansion ("billion laughs") long before it costs memory or time. */
const MAX_NODES = 100_000;
/** Caps nesting (a config is a few levels deep): a deeper tree is refused before it can exhaust the stack. */
const MAX_DEPTH = 64;

/**
 * Parses `source`. Returns the document's tree, `null` for an empty document,
 * or `undefined` when YAML errors were reported (the tree would be a guess).
 */
export function parseYamlTree(source: string, report: ReportAt): Located | null | undefined {
  const lineCounter = new LineCounter();
  // uniqueKeys: false because duplicates are reported below, with their key path.
  const doc = parseDocument(source, { lineCounter, prettyErrors: false, uniqueKeys: false });
  const at = (offset: number): Position => {
    const { line, col } = lineCounter.linePos(offset);
    return line === 0 ? { line: 1, column: offset + 1 } : { line, column: col };
  };

  // Warnings (e.g. an unknown tag) count too: a config must read one way only.
  const problems = [...doc.errors, ...doc.warnings];
  for (const problem of problems) report(at(problem.pos[0]), '', `invalid YAML: ${problem.message}`);
  if (problems.length > 0) return undefined;
  if (doc.contents === null) return null;

  let nodes = 0;
  /** The nodes being converted, outermost first: an alias to one of them would expand forever. */
  const within = new Set<Node>();
  const convert = (node: Node | null | undefined, path: string, fallback: Position): Located => {
    if (node === null || node === undefined) return { kind: 'scalar', value: null, pos: fallback };
    const pos = node.range ? at(node.range[0]) : fallback;
    if (++nodes > MAX_NODES) {
      if (nodes === MAX_NODES + 1)
        report(pos, path, `too many values (more than ${MAX_NODES}, counting alias expansions)`);
      return { kind: 'broken', pos };
    }
    if (within.size >= MAX_DEPTH) {
      report(pos, path, `nested more than ${MAX_DEPTH} levels deep`);
      return { kind: 'broken', pos };
    }
    if (isAlias(node)) {
      const target = node.resolve(doc);
      if (target !== undefined && within.has(target)) {
        report(pos, path, `alias *${node.source} refers to a value that contains it (a circular alias)`);
        return { kind: 'broken', pos };
      }
      if (target !== undefined) return convert(target, path, pos);
      report(pos, path, `alias *${node.source} refers to no anchor defined before it`);
      return { kind: 'broken', pos };
    }
    within.add(node);
    try {
      return convertNode(node, path, pos);
    } finally {
      within.delete(node);
    }
  };
  const convertNode = (node: Node, path: string, pos: Position): Located => {
    if (isScalar(node)) {
      const value = node.value;
      if (value === null || typeof value === 'string' || typeof value === 'number' || typeof value === 'boolean') {
        return { kind: 'scalar', value, pos };
      }
      // eslint-disable-next-line @typescript-eslint/no-base-to-string -- whatever YAML made of it, the message shows it
      report(pos, path, `unsupported value ${String(value)}; quote it to make it a string`);
      return { kind: 'broken', pos };
    }
    if (isSeq(node)) {
      const items = node.items.map((item, index) => convert(item as Node | null, `${path}[${index}]`, pos));
      return { kind: 'list', items, pos };
    }
    if (isMap(node)) {
      const entries: MapEntry[] = [];
      for (const pair of node.items) {
        const keyNode = pair.key as Node | null;
        const keyPos = keyNode?.range ? at(keyNode.range[0]) : pos;
        if (!isScalar(keyNode) || keyNode.value === null || typeof keyNode.value === 'object') {
          report(keyPos, path, 'keys must be plain strings (got an empty key, a list or a mapping)');
          continue;
        }
        // eslint-disable-next-line @typescript-eslint/no-base-to-string -- a string, number or boolean here (checked above)
        const key = String(keyNode.value);
        const keyPath = path === '' ? key : `${path}.${key}`;
        const first = entries.find((entry) => entry.key === key);
        if (first !== undefined) {
          const { line, column } = first.keyPos;
          report(keyPos, keyPath, `duplicate key "${key}" (first set at ${line}:${column}); each key may appear once`);
          continue;
        }
        entries.push({ key, keyPos, value: convert(pair.value as Node | null, keyPath, keyPos) });
      }
      return { kind: 'map', entries, pos };
    }
    report(pos, path, 'unsupported YAML node');
    return { kind: 'broken', pos };
  };
  return convert(doc.contents, '', { line: 1, column: 1 });
}

/** A tree for a default value, placed where the defaulted key's parent is. */
export function locatedFromPlain(value: unknown, pos: Position): Located {
  if (Array.isArray(value)) return { kind: 'list', items: value.map((item) => locatedFromPlain(item, pos)), pos };
  if (value !== null && typeof value === 'object') {
    const entries = Object.entries(value).map(([key, item]) => ({
      key,
      keyPos: pos,
      value: locatedFromPlain(item, pos),
    }));
    return { kind: 'map', entries, pos };
  }
  if (value === null || typeof value === 'string' || typeof value === 'number' || typeof value === 'boolean') {
    return { kind: 'scalar', value, pos };
  }
  // eslint-disable-next-line @typescript-eslint/no-base-to-string -- a schema bug's message shows whatever it got
  throw new Error(`schema bug: default ${String(value)} is not a plain value`);
}

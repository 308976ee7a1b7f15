// Walks a located YAML tree against a Spec and produces the typed value, or
// collects every issue found (never stops at the first). Defaults, written in
// the file's own form, go through the same code as the file's values.

import nodePath from 'node:path';
import { parseAddress, parseHostPort, resolveSocketPath, LISTEN_ADDRESS_FORM } from './address';
import { DURATION_FORM, formatDuration, parseDuration } from './duration';
import { formatSize, parseSize, SIZE_FORM } from './size';
import { ACCOUNT_ID_MAX, ACCOUNT_NAME_PATTERN, FILE_MODE_PATTERN, type CheckContext, type Spec } from './spec';
import { closest } from './suggest';
import { locatedFromPlain, type Located, type Position } from './yaml-tree';

export interface Issue {
  pos: Position;
  /** Key path such as "service.listeners[1].name"; "" for the document itself. */
  path: string;
  message: string;
}

/**
 * Validates `root` against `spec`; returns undefined when issues were added (the value would be partial).
 * `written`, when given, receives the key paths the file itself wrote (the others were defaulted).
 */
export function validateTree<T>(
  spec: Spec<T>,
  root: Located,
  baseDir: string,
  issues: Issue[],
  written?: Set<string>,
): T | undefined {
  const before = issues.length;
  const validator = new Validator(spec, baseDir, issues);
  const value = validator.run(root);
  if (written) for (const keyPath of validator.writtenPaths()) written.add(keyPath);
  return issues.length === before && value !== INVALID ? (value as T) : undefined;
}

const INVALID = Symbol('invalid');
type Result = unknown;

interface Written {
  keyPos?: Position;
  valuePos: Position;
}

class Validator {
  /** Paths the file itself wrote (not defaulted), for checks and for placing their issues. */
  private readonly written = new Map<string, Written>();
  /** Every key in the schema -> where it belongs, to tell "soak_time belongs in orchestration". */
  private readonly keyHomes = new Map<string, string[]>();

  constructor(
    private readonly spec: Spec,
    private readonly baseDir: string,
    private readonly issues: Issue[],
  ) {
    indexKeys(spec, '', this.keyHomes);
  }

  writtenPaths(): Iterable<string> {
    return this.written.keys();
  }

  run(root: Located): Result {
    this.written.set('', { valuePos: root.pos });
    return this.validate(this.spec, root, '');
  }

  private report(pos: Position, path: string, message: string): void {
    this.issues.push({ pos, path, message });
  }

  private mismatch(spec: Spec, node: Located, path: string, hint = ''): typeof INVALID {
    this.report(node.pos, path, `must be ${expected(spec)} (got ${found(node)}${hint})`);
    return INVALID;
  }

  /**
   * The value, INVALID when the node is unusable as a whole, or (for lists and mappings)
   * a partial value with undefined in place of invalid parts, which checks still see.
   */
  private validate(spec: Spec, node: Located, path: string): Result {
    if (node.kind === 'broken') return INVALID;
    const value = this.convert(spec, node, path);
    if (value !== INVALID && spec.check) spec.check(value, this.checkContext(path));
    return value;
  }

  private convert(spec: Spec, node: Located, path: string): Result {
    switch (spec.kind) {
      case 'object':
        return this.object(spec, node, path);
      case 'list': {
        if (node.kind !== 'list') return this.mismatch(spec, node, path);
        if (node.items.length < spec.minItems) return this.mismatch(spec, node, path);
        return node.items.map((item, index) => {
          this.written.set(`${path}[${index}]`, { valuePos: item.pos });
          return orUndefined(this.validate(spec.items, item, `${path}[${index}]`));
        });
      }
      case 'integer': {
        if (node.kind !== 'scalar' || typeof node.value !== 'number') return this.mismatch(spec, node, path);
        const n = node.value;
        return Number.isInteger(n) && n >= spec.minimum && n <= spec.maximum ? n : this.mismatch(spec, node, path);
      }
      case 'boolean':
        return node.kind === 'scalar' && typeof node.value === 'boolean' ? node.value : this.mismatch(spec, node, path);
      case 'duration': {
        if (node.kind === 'scalar' && typeof node.value === 'number') {
          return this.mismatch(spec, node, path, `; a bare number has no unit, write e.g. "${node.value}s"`);
        }
        const text = this.text(spec, node, path);
        if (text === INVALID) return INVALID;
        const ms = parseDuration(text);
        if (ms === null)
          return this.mismatch(spec, node, path, text.startsWith('-') ? '; durations cannot be negative' : '');
        if (ms < spec.minimumMs) return this.outOfRange(node, path, `at least ${formatDuration(spec.minimumMs)}`);
        if (ms > spec.maximumMs) return this.outOfRange(node, path, `at most ${formatDuration(spec.maximumMs)}`);
        return ms;
      }
      case 'size': {
        const raw = node.kind === 'scalar' && typeof node.value === 'number' ? node.value : this.text(spec, node, path);
        if (raw === INVALID) return INVALID;
        const bytes = parseSize(raw);
        if (bytes === null) return this.mismatch(spec, node, path);
        if (bytes < spec.minimumBytes || bytes > spec.maximumBytes) {
          return this.outOfRange(
            node,
            path,
            `from ${formatSize(spec.minimumBytes)} to ${formatSize(spec.maximumBytes)}`,
          );
        }
        return bytes;
      }
      case 'fileMode': {
        if (node.kind === 'scalar' && typeof node.value === 'number') {
          return this.mismatch(spec, node, path, '; quote it: unquoted, 0660 is read as the decimal number 660');
        }
        const text = this.text(spec, node, path);
        if (text === INVALID) return INVALID;
        return new RegExp(FILE_MODE_PATTERN).test(text) ? parseInt(text, 8) : this.mismatch(spec, node, path);
      }
      case 'account': {
        const raw = node.kind === 'scalar' && typeof node.value === 'number' ? node.value : this.text(spec, node, path);
        if (raw === INVALID) return INVALID;
        // A digit string is an id: no sane account is named "1000", and ids need no lookup.
        const id = typeof raw === 'number' ? raw : /^[0-9]+$/.test(raw) ? Number(raw) : null;
        if (id !== null)
          return Number.isInteger(id) && id >= 0 && id <= ACCOUNT_ID_MAX ? id : this.mismatch(spec, node, path);
        return new RegExp(ACCOUNT_NAME_PATTERN).test(raw as string) ? raw : this.mismatch(spec, node, path);
      }
      case 'listenAddress': {
        const text = this.text(spec, node, path);
        if (text === INVALID) return INVALID;
        return this.parsed(parseAddress(text, this.baseDir), node, path);
      }
      case 'hostPort': {
        const text = this.text(spec, node, path, { allowEmpty: true });
        if (text === INVALID) return INVALID;
        return text === '' ? null : this.parsed(parseHostPort(text), node, path);
      }
      case 'socketPath': {
        const text = this.text(spec, node, path);
        if (text === INVALID) return INVALID;
        const resolved = resolveSocketPath(text, this.baseDir);
        return resolved.error === undefined ? resolved.path : this.parsed(resolved.error, node, path);
      }
      case 'directory':
      case 'path': {
        const text = this.text(spec, node, path);
        return text === INVALID ? INVALID : nodePath.resolve(this.baseDir, text);
      }
      case 'enum': {
        if (node.kind !== 'scalar' || typeof node.value !== 'string') return this.mismatch(spec, node, path);
        return spec.values.includes(node.value) ? node.value : this.mismatch(spec, node, path);
      }
      case 'string': {
        const text = this.text(spec, node, path, spec);
        if (text === INVALID) return INVALID;
        const tooLong = spec.maxLength !== undefined && text.length > spec.maxLength;
        if (tooLong || (spec.pattern !== undefined && !new RegExp(spec.pattern, 'u').test(text))) {
          return this.mismatch(
            spec,
            node,
            path,
            tooLong ? `, ${text.length} characters long; the limit is ${spec.maxLength}` : '',
          );
        }
        return text;
      }
    }
  }

  /** The node as a string: a type error unless it is one, non-empty unless allowed, and free of NUL bytes. */
  private text(
    spec: Spec,
    node: Located,
    path: string,
    options: { allowEmpty?: boolean } = {},
  ): string | typeof INVALID {
    if (node.kind !== 'scalar' || typeof node.value !== 'string') return this.mismatch(spec, node, path);
    if (node.value === '' && !options.allowEmpty) return this.mismatch(spec, node, path);
    if (node.value.includes('\0')) {
      this.report(node.pos, path, 'must not contain a NUL byte');
      return INVALID;
    }
    return node.value;
  }

  private parsed<T>(result: T | string, node: Located, path: string): T | typeof INVALID {
    if (typeof result !== 'string') return result;
    this.report(node.pos, path, result);
    return INVALID;
  }

  private outOfRange(node: Located, path: string, range: string): typeof INVALID {
    this.report(node.pos, path, `must be ${range} (got ${found(node)})`);
    return INVALID;
  }

  private object(spec: Extract<Spec, { kind: 'object' }>, node: Located, path: string): Result {
    if (node.kind !== 'map') return this.mismatch(spec, node, path);
    const fieldNames = Object.keys(spec.fields);
    for (const entry of node.entries) {
      // hasOwn, not `in`: a key named "toString" must not pass as known.
      if (!Object.hasOwn(spec.fields, entry.key)) {
        this.report(entry.keyPos, join(path, entry.key), this.unknownKey(entry.key, fieldNames, path));
      }
    }
    const result: Record<string, unknown> = {};
    for (const [name, field] of Object.entries(spec.fields)) {
      const fieldPath = join(path, name);
      const entry = node.entries.find((candidate) => candidate.key === name);
      // An empty value ("cwd:" with nothing after it) means the same as leaving the key out.
      const isEmpty = entry === undefined || (entry.value.kind === 'scalar' && entry.value.value === null);
      let value: Result;
      if (!isEmpty) {
        this.written.set(fieldPath, { keyPos: entry.keyPos, valuePos: entry.value.pos });
        value = this.validate(field.spec, entry.value, fieldPath);
      } else if (field.presence === 'default') {
        value = this.validate(field.spec, locatedFromPlain(field.value, node.pos), fieldPath);
      } else if (field.presence === 'optional') {
        value = undefined;
      } else if (entry !== undefined) {
        value = this.mismatch(field.spec, entry.value, fieldPath);
      } else {
        this.report(node.pos, fieldPath, `missing required key; expected ${expected(field.spec)}`);
        value = INVALID;
      }
      result[name] = orUndefined(value);
    }
    return result;
  }

  private unknownKey(key: string, siblings: string[], parentPath: string): string {
    const suggestion = closest(key, siblings);
    if (suggestion !== undefined) return `unknown key "${key}" (did you mean "${suggestion}"?)`;
    const homes = (this.keyHomes.get(key) ?? []).filter((home) => home !== parentPath.replace(/\[\d+\]/g, '[]'));
    if (homes.length > 0)
      return `unknown key "${key}" here; it belongs in ${homes.map((home) => home || 'the top level').join(' or ')}`;
    return `unknown key "${key}"; expected one of ${siblings.join(', ')}`;
  }

  private checkContext(base: string): CheckContext {
    const nearest = (relativePath: string): Written => {
      for (let at = join(base, relativePath); ; at = parentPath(at)) {
        const written = this.written.get(at);
        if (written !== undefined) return written;
        if (at === '') return { valuePos: { line: 1, column: 1 } };
      }
    };
    return {
      given: (relativePath) => this.written.has(join(base, relativePath)),
      where: (relativePath) => {
        const { line, column } = nearest(relativePath).valuePos;
        return `${line}:${column}`;
      },
      report: (relativePath, message, at = 'value') => {
        const written = nearest(relativePath);
        const pos = at === 'key' && written.keyPos !== undefined ? written.keyPos : written.valuePos;
        this.report(pos, join(base, relativePath), message);
      },
    };
  }
}

/** What a spec expects, as error messages say it. */
function expected(spec: Spec): string {
  const example = spec.example === undefined ? '' : `, e.g. ${formatExample(spec.example)}`;
  return `${spec.form ?? formOfKind(spec)}${example}`;
}

function formOfKind(spec: Spec): string {
  switch (spec.kind) {
    case 'string':
      return spec.allowEmpty ? 'a string' : 'a non-empty string';
    case 'enum':
      return spec.values.length === 1 ? JSON.stringify(spec.values[0]) : `one of ${spec.values.join(', ')}`;
    case 'integer':
      return `an integer from ${spec.minimum} to ${spec.maximum}`;
    case 'boolean':
      return 'true or false';
    case 'duration':
      return DURATION_FORM;
    case 'size':
      return SIZE_FORM;
    case 'list':
      return spec.minItems > 0 ? 'a non-empty list' : 'a list';
    case 'object':
      return 'a mapping';
    case 'listenAddress':
      return LISTEN_ADDRESS_FORM;
    case 'hostPort':
      return '[host]:port, or "" to disable';
    case 'socketPath':
      return 'a unix socket path';
    case 'directory':
      return 'a directory path';
    case 'path':
      return 'a file or directory path';
    case 'account':
      return `a name or a numeric id from 0 to ${ACCOUNT_ID_MAX}`;
    case 'fileMode':
      return spec.example === undefined ? 'an octal file mode string such as "0660"' : 'an octal file mode string';
  }
}

/** What was found, as error messages say it. */
function found(node: Located): string {
  switch (node.kind) {
    case 'broken':
      return 'an invalid value';
    case 'list':
      return node.items.length === 0 ? 'an empty list' : 'a list';
    case 'map':
      return 'a mapping';
    case 'scalar':
      if (node.value === null) return 'an empty value';
      if (typeof node.value !== 'string') return String(node.value);
      return node.value.length > 80 ? `${JSON.stringify(node.value.slice(0, 77))}...` : JSON.stringify(node.value);
  }
}

function orUndefined(value: Result): unknown {
  return value === INVALID ? undefined : value;
}

function formatExample(example: unknown): string {
  return Array.isArray(example) ? `[${example.map(formatExample).join(', ')}]` : JSON.stringify(example);
}

function join(base: string, relative: string): string {
  if (relative === '') return base;
  if (relative.startsWith('[') || base === '') return `${base}${relative}`;
  return `${base}.${relative}`;
}

function parentPath(keyPath: string): string {
  return keyPath.replace(/(\.[^.[\]]+|\[\d+\]|^[^.[\]]+)$/, '');
}

/** Records, for every key in the schema, the object paths it may appear in ("service.listeners[]"). */
function indexKeys(spec: Spec, at: string, homes: Map<string, string[]>): void {
  if (spec.kind === 'list') indexKeys(spec.items, `${at}[]`, homes);
  if (spec.kind !== 'object') return;
  for (const [name, field] of Object.entries(spec.fields)) {
    homes.set(name, [...(homes.get(name) ?? []), at]);
    indexKeys(field.spec, join(at, name), homes);
  }
}

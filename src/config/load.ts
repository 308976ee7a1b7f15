// Reads aeterna.yaml into a Config: bounded read, YAML parse, validation
// against the schema (schema.ts), then the mapping to the camelCase Config
// everything else uses. All problems are collected and thrown together as one
// ConfigError, each with file:line:column and key path.

import fs from 'node:fs';
import path from 'node:path';
import { AeternaError, isFdExhaustion } from '../errors';
import { NotARegularFile, openRegularFile } from '../regular-file';
import { configSchema, controlSocketSchema, type ValidatedConfig } from './schema';
import type { Config } from './types';
import { validateTree, type Issue } from './validate';
import { DEFAULT_CONTROL_SOCKET, DEFAULT_STATE_SOCKET, defaultRuntimeDir } from './runtime-dir';
import { parseYamlTree, type Located } from './yaml-tree';

export interface ConfigIssue {
  /** The file as the caller named it. */
  file: string;
  /** 1-based; 0 when the issue concerns the file as a whole (cannot read it, too large). */
  line: number;
  column: number;
  /** Key path, e.g. "service.listeners[1].name"; "" when there is none (YAML syntax, unreadable file). */
  path: string;
  message: string;
}

export class ConfigError extends AeternaError {
  readonly issues: ConfigIssue[];
  constructor(issues: ConfigIssue[]) {
    super('E_CONFIG_INVALID', issues.map(formatIssue).join('\n'));
    this.name = 'ConfigError';
    this.issues = issues;
  }
}

/** `file:line:column path: message`, leaving out what an issue does not have. */
export function formatIssue(issue: ConfigIssue): string {
  const where = issue.line > 0 ? `${issue.file}:${issue.line}:${issue.column}` : `${issue.file}:`;
  return `${where} ${issue.path === '' ? '' : `${issue.path}: `}${issue.message}`;
}

/** Refused before parsing: a config is a page of YAML, and parsing is superlinear in the worst case. */
export const MAX_CONFIG_BYTES = 1024 * 1024;
const TOO_LARGE = `is larger than 1MiB (${MAX_CONFIG_BYTES} bytes); refusing to parse it`;

const CONTROL_SOCKET_KEY = 'control.socket_path';

/** Where the config is: -c/--config, else $AETERNA_CONFIG, else ./aeterna.yaml if it exists, else /etc/aeterna/aeterna.yaml. */
export function resolveConfigPath(
  explicit?: string,
  env: NodeJS.ProcessEnv = process.env,
  cwd = process.cwd(),
): string {
  if (explicit !== undefined && explicit !== '') return explicit;
  const fromEnv = env['AETERNA_CONFIG'];
  if (fromEnv !== undefined && fromEnv !== '') return fromEnv;
  const local = path.join(cwd, 'aeterna.yaml');
  return fs.existsSync(local) ? local : '/etc/aeterna/aeterna.yaml';
}

/** Reads and validates `file`. Throws ConfigError. */
export function loadConfigFile(file: string): Config {
  return parseConfig(readBounded(file), file);
}

/**
 * Validates `source`, the text of `file`. `file` names the file in messages as
 * given; relative paths in the config resolve against its (absolute) directory.
 */
export function parseConfig(source: string, file: string): Config {
  const issues: Issue[] = [];
  const tree = parseTree(source, file, issues);
  let validated: ValidatedConfig | undefined;
  const written = new Set<string>();
  if (tree === null) {
    const message = 'the file is empty; expected a mapping with at least version and service';
    issues.push({ pos: { line: 1, column: 1 }, path: '', message });
  } else if (tree !== undefined) {
    validated = validateTree(configSchema, tree, baseDirOf(file), issues, written);
  }
  if (validated === undefined || issues.length > 0) throw configError(file, issues);
  return toConfig(validated, path.resolve(file), written);
}

/**
 * The control socket the client commands (status, reload, stop, ...) reach
 * the daemon on: control.socket_path of `file`, or its default. Only that key
 * is judged, so an operator who has just broken another part of the file can
 * still run `aeterna status` or `aeterna stop`; the daemon judges the whole file
 * at the next reload. Throws ConfigError when the file cannot be read or parsed,
 * or when control.socket_path itself is invalid.
 */
export function loadControlSocketPath(file: string): string {
  return parseControlSocketPath(readBounded(file), file);
}

/** loadControlSocketPath on `source`, the text of `file`. */
export function parseControlSocketPath(source: string, file: string): string {
  const treeIssues: Issue[] = [];
  const tree = parseTree(source, file, treeIssues);
  if (tree === undefined) throw configError(file, treeIssues);
  // YAML-level issues elsewhere in the file (a duplicate key, a bad alias) do not matter here.
  const issues = treeIssues.filter((issue) => issue.path === 'control' || issue.path === CONTROL_SOCKET_KEY);
  const written = new Set<string>();
  const onlyTheKey = keepOnly(
    tree ?? { kind: 'map', entries: [], pos: { line: 1, column: 1 } },
    CONTROL_SOCKET_KEY.split('.'),
  );
  const validated = validateTree(controlSocketSchema, onlyTheKey, baseDirOf(file), issues, written);
  // No issue on the key itself yet a failure: the key's node was already reported (e.g. too many values); say everything.
  if (validated === undefined || issues.length > 0) throw configError(file, issues.length > 0 ? issues : treeIssues);
  return defaultedSocketPath(written, CONTROL_SOCKET_KEY, validated.control.socket_path, DEFAULT_CONTROL_SOCKET);
}

/** The located tree of `source`, null when empty, undefined when `issues` got YAML errors. */
function parseTree(source: string, file: string, issues: Issue[]): Located | null | undefined {
  if (Buffer.byteLength(source) > MAX_CONFIG_BYTES) {
    throw new ConfigError([{ file, line: 0, column: 0, path: '', message: TOO_LARGE }]);
  }
  return parseYamlTree(source, (pos, keyPath, message) => issues.push({ pos, path: keyPath, message }));
}

/** `node` with only the entry named by each key along `keys` in the mappings on the way. */
function keepOnly(node: Located, keys: readonly string[]): Located {
  const [key, ...rest] = keys;
  if (key === undefined || node.kind !== 'map') return node;
  const entries = node.entries
    .filter((entry) => entry.key === key)
    .map((entry) => ({ ...entry, value: keepOnly(entry.value, rest) }));
  return { ...node, entries };
}

function configError(file: string, issues: Issue[]): ConfigError {
  // In file order, as a reader fixes them; sort is stable for issues at the same spot.
  issues.sort((a, b) => a.pos.line - b.pos.line || a.pos.column - b.pos.column);
  return new ConfigError(
    issues.map(({ pos, path: keyPath, message }) => ({
      file,
      line: pos.line,
      column: pos.column,
      path: keyPath,
      message,
    })),
  );
}

function baseDirOf(file: string): string {
  return path.dirname(path.resolve(file));
}

/** A socket path the file leaves out goes to this user's runtime directory (runtime-dir.ts). */
function defaultedSocketPath(written: Set<string>, keyPath: string, value: string, name: string): string {
  return written.has(keyPath) ? value : path.join(defaultRuntimeDir(), name);
}

function toConfig(raw: ValidatedConfig, file: string, written: Set<string>): Config {
  const { service, orchestration, control, observability } = raw;
  const { readiness, state_handoff: stateHandoff } = orchestration;
  return {
    file,
    version: raw.version,
    service: {
      name: service.name,
      command: service.command,
      env: service.env,
      ...(service.cwd === undefined ? {} : { cwd: service.cwd }),
      ...(service.user === undefined ? {} : { user: service.user }),
      ...(service.group === undefined ? {} : { group: service.group }),
      listeners: service.listeners.map((listener) => ({ ...listener })),
      ...(service.stdin_listener === undefined ? {} : { stdinListener: service.stdin_listener }),
      stopTimeoutMs: service.stop_timeout,
      cgroups: service.cgroups,
      restart: {
        policy: service.restart.policy,
        maxRestarts: service.restart.max_restarts,
        windowMs: service.restart.window,
      },
      fdstoreMax: service.fdstore_max,
      watchdogMs: service.watchdog ?? null,
      instances: service.instances,
    },
    orchestration: {
      strategy: orchestration.strategy,
      soakTimeMs: orchestration.soak_time,
      maxGenerations: orchestration.max_generations,
      maxSurge: orchestration.max_surge ?? null,
      readiness: {
        mode: readiness.mode,
        timeoutMs: readiness.timeout,
        delayMs: readiness.delay,
        command: readiness.command ?? [],
        intervalMs: readiness.interval,
      },
      stateHandoff: {
        enabled: stateHandoff.enabled,
        socketPath: defaultedSocketPath(
          written,
          'orchestration.state_handoff.socket_path',
          stateHandoff.socket_path,
          DEFAULT_STATE_SOCKET,
        ),
        timeoutMs: stateHandoff.timeout,
        maxFrameBytes: stateHandoff.max_frame,
        onDumpFailure: stateHandoff.on_dump_failure,
        checkpoint: {
          enabled: stateHandoff.checkpoint.enabled,
          path: stateHandoff.checkpoint.path ?? null,
          maxSizeBytes: stateHandoff.checkpoint.max_size,
        },
      },
      watch:
        orchestration.watch === undefined
          ? null
          : { paths: orchestration.watch.paths, debounceMs: orchestration.watch.debounce },
      canary: orchestration.canary ?? null,
    },
    control: {
      socketPath: defaultedSocketPath(written, CONTROL_SOCKET_KEY, control.socket_path, DEFAULT_CONTROL_SOCKET),
    },
    observability: {
      metrics: observability.metrics_port ?? null,
      logLevel: observability.log_level,
      appOutput: observability.app_output,
    },
  };
}

/**
 * Reads a regular file of at most MAX_CONFIG_BYTES: a FIFO, a device or a directory is refused without
 * blocking (opened O_NONBLOCK, then fstat'd), and at most MAX_CONFIG_BYTES + 1 bytes are read.
 */
function readBounded(file: string): string {
  const fail = (message: string): never => {
    throw new ConfigError([{ file, line: 0, column: 0, path: '', message }]);
  };
  const cannotRead = (error: unknown): never => {
    // Out of fds is not a problem of the file: say what it is, so nobody goes looking for a config error.
    if (isFdExhaustion(error)) {
      const code = (error as NodeJS.ErrnoException).code;
      throw new AeternaError(
        'E_RESOURCE_EXHAUSTED',
        `cannot read ${file}: out of file descriptors (${code}); raise the fd limit (ulimit -n) or find what holds them`,
        { cause: error },
      );
    }
    return fail(`cannot read: ${(error as Error).message}`);
  };
  let fd: number;
  try {
    fd = openRegularFile(file).fd;
  } catch (error) {
    if (error instanceof NotARegularFile)
      return fail(`${error.kind}, not a regular file: Aeterna reads its config only from a regular file`);
    return cannotRead(error);
  }
  try {
    const buffer = Buffer.alloc(MAX_CONFIG_BYTES + 1);
    let length = 0;
    for (;;) {
      const count = fs.readSync(fd, buffer, length, buffer.length - length, null);
      if (count === 0) break;
      length += count;
      if (length > MAX_CONFIG_BYTES) fail(TOO_LARGE);
    }
    return buffer.toString('utf8', 0, length);
  } catch (error) {
    if (error instanceof ConfigError) throw error;
    return cannotRead(error);
  } finally {
    fs.closeSync(fd);
  }
}

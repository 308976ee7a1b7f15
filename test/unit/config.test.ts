// The config layer: aeterna.yaml -> Config. Error messages are checked in full:
// file:line:column, key path, the expected form and what was found.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';
import { parse as parseYaml, stringify } from 'yaml';
import { parseAddress, parseHostPort } from '../../src/config/address';
import { formatDuration, parseDuration } from '../../src/config/duration';
import { renderConfigJsonSchema, SCHEMA_FILE } from '../../scripts/gen-config-schema';
import { configJsonSchema, type JsonSchema } from '../../src/config/json-schema';
import {
  ConfigError,
  loadConfigFile,
  parseConfig,
  parseControlSocketPath,
  resolveConfigPath,
} from '../../src/config/load';
import { defaultRuntimeDir } from '../../src/config/runtime-dir';
import { configSchema } from '../../src/config/schema';
import type { Spec } from '../../src/config/spec';
import type { Config } from '../../src/config/types';
import { AeternaError } from '../../src/errors';
import { ROOT, tempDir } from '../helpers/aeterna';

const REPO = ROOT;
const fixture = (name: string): string => path.resolve(REPO, 'test/fixtures/config', name);
const EXAMPLE = path.join(REPO, 'configs/aeterna.yaml');
const DURATION_FORM =
  'a duration: whole numbers with units h, m, s or ms, largest first, e.g. "500ms", "10s", "1m30s", "2h"';

/** The ConfigError `run` throws, after checking it is one. */
function configError(run: () => unknown): ConfigError {
  try {
    run();
  } catch (error) {
    assert.ok(error instanceof ConfigError, `expected a ConfigError, got ${String(error)}`);
    assert.ok(error instanceof AeternaError);
    assert.equal(error.code, 'E_CONFIG_INVALID');
    return error;
  }
  assert.fail('expected a ConfigError');
}

/** Loads a fixture that must fail; returns its message lines and the path they name. */
function fixtureErrors(name: string): { file: string; lines: string[] } {
  const file = fixture(name);
  return { file, lines: configError(() => loadConfigFile(file)).message.split('\n') };
}

const minimalYaml = (extra = ''): string =>
  `version: v1\nservice:\n  name: app\n  command: [python, main.py]\n${extra}`;

describe('errors name file:line:column, key path, expected form and what was found', () => {
  test('malformed YAML: every syntax error, with its position', () => {
    const { file, lines } = fixtureErrors('malformed.yaml');
    assert.deepEqual(lines, [
      `${file}:5:3 invalid YAML: Flow sequence in block collection must be sufficiently indented and end with a ]`,
      `${file}:7:1 invalid YAML: Missing closing "quote`,
    ]);
    const error = configError(() => loadConfigFile(file));
    assert.deepEqual(error.issues[0], { file, line: 5, column: 3, path: '', message: error.issues[0].message });
  });

  test('a wrong type: command as a string instead of a list', () => {
    const { file, lines } = fixtureErrors('command-not-list.yaml');
    assert.deepEqual(lines, [
      `${file}:4:12 service.command: must be a non-empty list of strings, e.g. ["/app/venv/bin/python", "main.py"] (got "python main.py")`,
    ]);
  });

  test('an empty command', () => {
    const { file, lines } = fixtureErrors('command-empty.yaml');
    assert.deepEqual(lines, [
      `${file}:4:12 service.command: must be a non-empty list of strings, e.g. ["/app/venv/bin/python", "main.py"] (got an empty list)`,
    ]);
  });

  test('a duplicate listener name', () => {
    const { file, lines } = fixtureErrors('duplicate-listener-name.yaml');
    assert.deepEqual(lines, [
      `${file}:8:13 service.listeners[1].name: duplicate listener name "http" (already used at 6:13); names must be unique`,
    ]);
  });

  test('an address that does not parse', () => {
    const { file, lines } = fixtureErrors('bad-address.yaml');
    assert.deepEqual(lines, [
      `${file}:7:16 service.listeners[0].address: must be tcp://host:port, tcp://[v6]:port or unix:///absolute/path (got "http://0.0.0.0:8080")`,
    ]);
  });

  test('a port out of range', () => {
    const { file, lines } = fixtureErrors('port-out-of-range.yaml');
    assert.deepEqual(lines, [
      `${file}:7:16 service.listeners[0].address: port must be an integer from 1 to 65535 (got "70000")`,
    ]);
  });

  test('a negative duration', () => {
    const { file, lines } = fixtureErrors('negative-duration.yaml');
    assert.deepEqual(lines, [
      `${file}:5:17 service.stop_timeout: must be ${DURATION_FORM} (got "-5s"; durations cannot be negative)`,
    ]);
  });

  test('a stdin_listener that names no listener: the error names it and the listeners there are', () => {
    const listeners =
      '  listeners:\n    - { name: http, address: "tcp://127.0.0.1:8080" }\n    - { name: admin, address: "tcp://127.0.0.1:8081" }\n';
    const lines = configError(() =>
      parseConfig(minimalYaml(`${listeners}  stdin_listener: htp\n`), 'x.yaml'),
    ).message.split('\n');
    assert.deepEqual(lines, [
      'x.yaml:8:19 service.stdin_listener: names no listener (got "htp"); expected one of service.listeners: "http", "admin"',
    ]);
    const none = configError(() => parseConfig(minimalYaml('  stdin_listener: http\n'), 'x.yaml')).message.split('\n');
    assert.deepEqual(none, [
      'x.yaml:5:19 service.stdin_listener: names no listener (got "http"); expected one of service.listeners: none is configured',
    ]);
    const ok = parseConfig(minimalYaml(`${listeners}  stdin_listener: admin\n`), 'x.yaml');
    assert.equal(ok.service.stdinListener, 'admin');
  });

  test('an unknown key, with the closest known key suggested', () => {
    const { file, lines } = fixtureErrors('unknown-key.yaml');
    assert.deepEqual(lines, [`${file}:7:3 orchestration.soak_tme: unknown key "soak_tme" (did you mean "soak_time"?)`]);
  });

  test('an unknown key that belongs elsewhere, and one with no near match', () => {
    const lines = configError(() =>
      parseConfig(minimalYaml('  soak_time: 10s\n  frobnicate: 1\n'), 'x.yaml'),
    ).message.split('\n');
    assert.deepEqual(lines, [
      'x.yaml:5:3 service.soak_time: unknown key "soak_time" here; it belongs in orchestration',
      'x.yaml:6:3 service.frobnicate: unknown key "frobnicate"; expected one of name, command, env, cwd, user, group, listeners, stdin_listener, stop_timeout, restart, instances, fdstore_max, watchdog, cgroups',
    ]);
  });

  test('an invalid strategy, in the documented form', () => {
    const { file, lines } = fixtureErrors('bad-strategy.yaml');
    assert.deepEqual(lines, [`${file}:9:13 orchestration.strategy: must be one of immediate, canary (got "canry")`]);
  });

  test('several errors: all reported at once, in file order', () => {
    const { file, lines } = fixtureErrors('several-errors.yaml');
    assert.deepEqual(lines, [
      `${file}:1:10 version: must be "v1" (got "v2")`,
      `${file}:4:12 service.command: must be a non-empty list of strings, e.g. ["/app/venv/bin/python", "main.py"] (got "python main.py")`,
      `${file}:7:16 service.listeners[0].address: port must be an integer from 1 to 65535 (got "70000")`,
      `${file}:8:13 service.listeners[1].name: duplicate listener name "http" (already used at 6:13); names must be unique`,
      `${file}:10:17 service.stop_timeout: must be ${DURATION_FORM} (got 30; a bare number has no unit, write e.g. "30s")`,
      `${file}:12:13 orchestration.strategy: must be one of immediate, canary (got "canry")`,
      `${file}:14:5 orchestration.readiness.command: is required when mode is exec; expected a non-empty list of strings, e.g. ["curl", "-fsS", "http://127.0.0.1:8080/health"] (got none)`,
      `${file}:16:16 orchestration.state_handoff.max_frame: must be from 1KiB to 1GiB (got "2GiB")`,
      `${file}:18:3 observability.log_levle: unknown key "log_levle" (did you mean "log_level"?)`,
    ]);
    assert.equal(configError(() => loadConfigFile(file)).issues.length, 9);
  });

  test('missing version: reported at the mapping that lacks it', () => {
    const { file, lines } = fixtureErrors('missing-version.yaml');
    assert.deepEqual(lines, [`${file}:1:1 version: missing required key; expected "v1"`]);
  });

  test('wrong version', () => {
    const { file, lines } = fixtureErrors('wrong-version.yaml');
    assert.deepEqual(lines, [`${file}:1:10 version: must be "v1" (got "v2")`]);
  });

  test('readiness mode exec without command', () => {
    const { file, lines } = fixtureErrors('exec-without-command.yaml');
    assert.deepEqual(lines, [
      `${file}:7:5 orchestration.readiness.command: is required when mode is exec; expected a non-empty list of strings, e.g. ["curl", "-fsS", "http://127.0.0.1:8080/health"] (got none)`,
    ]);
  });

  test('keys of another readiness mode are errors, not ignored', () => {
    const source = minimalYaml('orchestration:\n  readiness:\n    mode: delay\n    delay: 40s\n    command: [curl]\n');
    assert.deepEqual(configError(() => parseConfig(source, 'x.yaml')).message.split('\n'), [
      'x.yaml:8:12 orchestration.readiness.delay: must be shorter than timeout (30s), or the app can never be ready in time (got 40s)',
      'x.yaml:9:5 orchestration.readiness.command: applies only to mode exec (got it with mode delay); remove it or set mode: exec',
    ]);
  });

  test('duplicate keys, duplicate addresses, mode on a tcp listener, shared socket paths', () => {
    const source = [
      'version: v1',
      'service:',
      '  name: app',
      '  name: again',
      '  command: [python]',
      '  listeners:',
      '    - { name: a, address: "tcp://127.0.0.1:80", mode: "0600" }',
      '    - { name: b, address: "tcp://127.0.0.1:80" }',
      'control: { socket_path: /run/a.sock }',
      'orchestration: { state_handoff: { enabled: true, socket_path: /run/a.sock } }',
      '',
    ].join('\n');
    assert.deepEqual(configError(() => parseConfig(source, 'x.yaml')).message.split('\n'), [
      'x.yaml:4:3 service.name: duplicate key "name" (first set at 3:3); each key may appear once',
      'x.yaml:7:49 service.listeners[0].mode: applies only to unix:// listeners (got it on "tcp://127.0.0.1:80"); remove it',
      'x.yaml:8:27 service.listeners[1].address: duplicate listener address "tcp://127.0.0.1:80" (already used at 7:27); an address can be bound only once',
      'x.yaml:10:63 orchestration.state_handoff.socket_path: socket path "/run/a.sock" is already used by control.socket_path; each socket needs its own path',
    ]);
  });

  test('env: KEY=VALUE form, reserved and repeated keys', () => {
    const source = minimalYaml('  env: ["A=1", "NOPE", "LISTEN_FDS=3", "A=2"]\n');
    assert.deepEqual(configError(() => parseConfig(source, 'x.yaml')).message.split('\n'), [
      'x.yaml:5:16 service.env[1]: must be a KEY=VALUE string (KEY: letters, digits and "_", not starting with a digit), e.g. "MODEL_PATH=/models/llama3" (got "NOPE")',
      'x.yaml:5:24 service.env[2]: LISTEN_FDS is set by Aeterna and cannot be set here (got "LISTEN_FDS=3")',
      'x.yaml:5:40 service.env[3]: A is already set at 5:9; each KEY may appear once (got "A=2")',
    ]);
  });

  test('an unquoted octal mode gets a hint', () => {
    const source = minimalYaml('  listeners: [{ name: s, address: "unix:///run/s.sock", mode: 0660 }]\n');
    assert.deepEqual(configError(() => parseConfig(source, 'x.yaml')).message.split('\n'), [
      'x.yaml:5:63 service.listeners[0].mode: must be an octal file mode string, e.g. "0660" (got 660; quote it: unquoted, 0660 is read as the decimal number 660)',
    ]);
  });

  test('an empty or non-mapping file', () => {
    assert.equal(
      configError(() => parseConfig('# nothing\n', 'x.yaml')).message,
      'x.yaml:1:1 the file is empty; expected a mapping with at least version and service',
    );
    assert.equal(
      configError(() => parseConfig('- a\n', 'x.yaml')).message,
      'x.yaml:1:1 must be a mapping (got a list)',
    );
  });

  test('a missing file and a file over 1MiB are refused before parsing', () => {
    const missing = path.join(os.tmpdir(), 'aeterna-no-such-config.yaml');
    const error = configError(() => loadConfigFile(missing));
    assert.match(
      error.message,
      new RegExp(`^${missing.replace(/[.]/g, '\\.')}: cannot read: ENOENT: no such file or directory`),
    );
    assert.equal(error.issues[0].line, 0);

    const dir = tempDir('aeterna-config-');
    try {
      const big = path.join(dir, 'big.yaml');
      fs.writeFileSync(big, `# ${'x'.repeat(1024 * 1024)}\n`);
      assert.equal(
        configError(() => loadConfigFile(big)).message,
        `${big}: is larger than 1MiB (1048576 bytes); refusing to parse it`,
      );
    } finally {
      fs.rmSync(dir, { recursive: true });
    }
  });
});

describe('loading', () => {
  test('a minimal config gets every default', () => {
    const file = fixture('minimal.yaml');
    const expected: Config = {
      file,
      version: 'v1',
      service: {
        name: 'minimal',
        command: ['/app/venv/bin/python', 'main.py'],
        env: [],
        listeners: [],
        stopTimeoutMs: 30_000,
        cgroups: true,
        restart: { policy: 'on-failure', maxRestarts: 5, windowMs: 60_000 },
        fdstoreMax: 0,
        watchdogMs: null,
        instances: 1,
      },
      orchestration: {
        strategy: 'immediate',
        soakTimeMs: 60_000,
        maxGenerations: 3,
        maxSurge: null,
        readiness: { mode: 'notify', timeoutMs: 30_000, delayMs: 1_000, command: [], intervalMs: 1_000 },
        stateHandoff: {
          enabled: false,
          socketPath: '/var/run/aeterna-state.sock',
          timeoutMs: 10_000,
          maxFrameBytes: 16 * 1024 * 1024,
          onDumpFailure: 'rollback',
          checkpoint: { enabled: false, path: null, maxSizeBytes: 1024 ** 3 },
        },
        watch: null,
        canary: null,
      },
      control: { socketPath: '/var/run/aeterna.sock' },
      observability: { metrics: null, logLevel: 'info', appOutput: 'raw' },
    };
    assert.deepEqual(loadConfigFile(file), expected);
    // Config.file is absolute even when the caller's path is not.
    assert.equal(loadConfigFile(path.relative(process.cwd(), file)).file, file);
  });

  test('relative paths resolve against the config file directory', () => {
    const file = fixture('relative/aeterna.yaml');
    const dir = path.dirname(file);
    const config = loadConfigFile(file);
    assert.equal(config.service.cwd, path.join(dir, 'app'));
    assert.deepEqual(config.service.listeners[0].address, {
      kind: 'unix',
      path: path.join(dir, 'run/app.sock'),
      raw: 'unix://run/app.sock',
    });
    assert.equal(config.orchestration.stateHandoff.socketPath, path.join(dir, 'run/state.sock'));
    assert.equal(config.control.socketPath, path.join(dir, '../run/aeterna.sock'));
    // argv[0] stays as written: PATH search and cwd apply when the app is started.
    assert.deepEqual(config.service.command, ['./bin/app', '--serve']);
  });

  test('the shipped configs/aeterna.yaml loads', () => {
    const config = loadConfigFile(EXAMPLE);
    assert.equal(config.service.name, 'llm-inference-agent');
    assert.deepEqual(config.service.command, ['/app/venv/bin/python', 'main.py']);
    assert.equal(config.orchestration.strategy, 'canary');
    assert.equal(config.orchestration.stateHandoff.enabled, true);
    assert.deepEqual(config.observability.metrics, { host: '0.0.0.0', port: 9091 });
    assert.deepEqual(
      config.service.listeners.map((listener) => [listener.name, listener.address.raw, listener.mode]),
      [
        ['http', 'tcp://0.0.0.0:8080', 0o660],
        ['admin', 'unix:///var/run/llm-inference-agent.sock', 0o660],
      ],
    );
  });

  test('the shipped example mentions every key of the schema', () => {
    const text = fs.readFileSync(EXAMPLE, 'utf8');
    const missing = schemaKeys(configSchema).filter((key) => !new RegExp(`^\\s*(#\\s*)?(- )?${key}:`, 'm').test(text));
    assert.deepEqual(missing, []);
  });

  test('user/group ids, metrics forms, sizes', () => {
    const config = parseConfig(
      minimalYaml(
        '  user: "1000"\n  group: 1000\n' +
          'orchestration: { state_handoff: { max_frame: 1048576 } }\n' +
          'observability: { metrics_port: "[::1]:9091" }\n',
      ),
      'x.yaml',
    );
    assert.equal(config.service.user, 1000);
    assert.equal(config.service.group, 1000);
    assert.equal(config.orchestration.stateHandoff.maxFrameBytes, 1024 * 1024);
    assert.deepEqual(config.observability.metrics, { host: '::1', port: 9091 });
    assert.equal(
      parseConfig(minimalYaml('observability: { metrics_port: "" }\n'), 'x.yaml').observability.metrics,
      null,
    );
    assert.equal(
      parseConfig(minimalYaml('observability: { app_output: json }\n'), 'x.yaml').observability.appOutput,
      'json',
    );
    assert.match(
      configError(() => parseConfig(minimalYaml('observability: { app_output: lines }\n'), 'x.yaml')).message,
      /observability\.app_output: must be one of raw, prefixed, json \(got "lines"\)/,
    );
    // An empty section (all keys commented out) means defaults, like an absent one.
    assert.equal(parseConfig(minimalYaml('control:\n'), 'x.yaml').control.socketPath, '/var/run/aeterna.sock');
  });
});

describe('durations', () => {
  test('accepted forms', () => {
    const table: [string, number][] = [
      ['0s', 0],
      ['500ms', 500],
      ['10s', 10_000],
      ['1m30s', 90_000],
      ['2h', 7_200_000],
      ['1h2m3s4ms', 3_723_004],
      ['90m', 5_400_000],
    ];
    for (const [text, ms] of table) assert.equal(parseDuration(text), ms, text);
  });

  test('rejected forms', () => {
    for (const text of [
      '',
      '5',
      '-5s',
      '+5s',
      '1.5s',
      '5 s',
      ' 5s',
      '1s1m',
      '10S',
      's',
      'ms',
      '1d',
      '1m1m',
      '5sec',
      '1h 2m',
    ]) {
      assert.equal(parseDuration(text), null, JSON.stringify(text));
    }
  });

  test('formatDuration is the shortest form parseDuration reads back', () => {
    const table: [number, string][] = [
      [0, '0s'],
      [500, '500ms'],
      [10_000, '10s'],
      [90_000, '1m30s'],
      [7_200_000, '2h'],
      [3_723_004, '1h2m3s4ms'],
    ];
    for (const [ms, text] of table) {
      assert.equal(formatDuration(ms), text);
      assert.equal(parseDuration(text), ms);
    }
  });

  test('bounds per key are enforced with the range in the message', () => {
    const source = minimalYaml('orchestration:\n  readiness: { timeout: 0s }\n  soak_time: 25h\n');
    assert.deepEqual(configError(() => parseConfig(source, 'x.yaml')).message.split('\n'), [
      'x.yaml:6:25 orchestration.readiness.timeout: must be at least 1ms (got "0s")',
      'x.yaml:7:14 orchestration.soak_time: must be at most 24h (got "25h")',
    ]);
  });

  test('orchestration.max_generations: 3 by default, at least 2 (the serving generation and a new one)', () => {
    assert.equal(parseConfig(minimalYaml(''), 'x.yaml').orchestration.maxGenerations, 3);
    assert.equal(
      parseConfig(minimalYaml('orchestration:\n  max_generations: 2\n'), 'x.yaml').orchestration.maxGenerations,
      2,
    );
    assert.deepEqual(
      configError(() => parseConfig(minimalYaml('orchestration:\n  max_generations: 1\n'), 'x.yaml')).message.split(
        '\n',
      ),
      ['x.yaml:6:20 orchestration.max_generations: must be an integer from 2 to 64 (got 1)'],
    );
  });
});

describe('addresses', () => {
  test('accepted listener addresses', () => {
    const table: [string, ReturnType<typeof parseAddress>][] = [
      ['tcp://0.0.0.0:8080', { kind: 'tcp', host: '0.0.0.0', port: 8080, raw: 'tcp://0.0.0.0:8080' }],
      ['tcp://[::1]:9000', { kind: 'tcp', host: '::1', port: 9000, raw: 'tcp://[::1]:9000' }],
      ['tcp://[::]:1', { kind: 'tcp', host: '::', port: 1, raw: 'tcp://[::]:1' }],
      ['tcp://localhost:65535', { kind: 'tcp', host: 'localhost', port: 65535, raw: 'tcp://localhost:65535' }],
      ['tcp://api.internal:443', { kind: 'tcp', host: 'api.internal', port: 443, raw: 'tcp://api.internal:443' }],
      ['unix:///var/run/app.sock', { kind: 'unix', path: '/var/run/app.sock', raw: 'unix:///var/run/app.sock' }],
    ];
    for (const [text, address] of table) assert.deepEqual(parseAddress(text), address, text);
    assert.deepEqual(parseAddress('unix://run/app.sock', '/etc/aeterna'), {
      kind: 'unix',
      path: '/etc/aeterna/run/app.sock',
      raw: 'unix://run/app.sock',
    });
  });

  test('rejected listener addresses say why', () => {
    const table: [string, string][] = [
      [
        'http://0.0.0.0:8080',
        'must be tcp://host:port, tcp://[v6]:port or unix:///absolute/path (got "http://0.0.0.0:8080")',
      ],
      ['tcp://0.0.0.0', 'must be tcp://host:port, tcp://[v6]:port or unix:///absolute/path (got "tcp://0.0.0.0")'],
      ['tcp://0.0.0.0:70000', 'port must be an integer from 1 to 65535 (got "70000")'],
      ['tcp://0.0.0.0:http', 'port must be an integer from 1 to 65535 (got "http")'],
      [
        'tcp://0.0.0.0:0',
        'port must be from 1 to 65535 (got 0: port 0 picks a random port at every start, and clients need a fixed one)',
      ],
      ['tcp://::1:80', 'an IPv6 host must be in brackets, e.g. [::1]:8080 (got "tcp://::1:80")'],
      ['tcp://[zz::1]:80', '"zz::1" in brackets is not an IPv6 address (got "tcp://[zz::1]:80")'],
      ['tcp://999.1.1.1:80', 'host "999.1.1.1" is not a valid IPv4 address (got "tcp://999.1.1.1:80")'],
      [
        'tcp://bad!host:80',
        'host "bad!host" must be a host name, an IPv4 address or an IPv6 address in brackets (got "tcp://bad!host:80")',
      ],
      [
        'tcp://:8080',
        'host is missing; write it out, e.g. tcp://0.0.0.0:8080 for all IPv4 interfaces (got "tcp://:8080")',
      ],
      ['unix://', 'socket path is empty'],
      ['unix://relative.sock', 'socket path must be absolute (got "relative.sock")'],
      ['unix://@abstract', 'abstract unix sockets are not supported; use a file path (got "unix://@abstract")'],
      [
        `unix:///${'x'.repeat(107)}`,
        `socket path must be at most 107 bytes, the sun_path limit (got 108 bytes: "/${'x'.repeat(107)}")`,
      ],
    ];
    for (const [text, message] of table) assert.equal(parseAddress(text), message, text);
    assert.equal(typeof parseAddress(`unix:///${'x'.repeat(106)}`), 'object');
  });

  test('metrics [host]:port', () => {
    assert.deepEqual(parseHostPort(':9091'), { host: '0.0.0.0', port: 9091 });
    assert.deepEqual(parseHostPort('127.0.0.1:9091'), { host: '127.0.0.1', port: 9091 });
    assert.deepEqual(parseHostPort('[::1]:9091'), { host: '::1', port: 9091 });
    assert.equal(
      parseHostPort('9091'),
      'must be [host]:port, e.g. ":9091", "127.0.0.1:9091" or "[::1]:9091" (got "9091")',
    );
    assert.equal(parseHostPort(':70000'), 'port must be an integer from 1 to 65535 (got "70000")');
  });
});

describe('resolveConfigPath', () => {
  test('-c, then $AETERNA_CONFIG, then ./aeterna.yaml, then /etc/aeterna/aeterna.yaml', () => {
    const dir = tempDir('aeterna-config-');
    try {
      const env = { AETERNA_CONFIG: '/from/env.yaml' };
      assert.equal(resolveConfigPath('/explicit.yaml', env, dir), '/explicit.yaml');
      assert.equal(resolveConfigPath(undefined, env, dir), '/from/env.yaml');
      assert.equal(resolveConfigPath(undefined, {}, dir), '/etc/aeterna/aeterna.yaml');
      assert.equal(resolveConfigPath('', { AETERNA_CONFIG: '' }, dir), '/etc/aeterna/aeterna.yaml');
      fs.writeFileSync(path.join(dir, 'aeterna.yaml'), minimalYaml());
      assert.equal(resolveConfigPath(undefined, {}, dir), path.join(dir, 'aeterna.yaml'));
      assert.equal(resolveConfigPath(undefined, env, dir), '/from/env.yaml');
    } finally {
      fs.rmSync(dir, { recursive: true });
    }
  });
});

describe('the control socket alone (what the client commands read)', () => {
  test('other problems in the file do not matter: the socket path, relative to the file, or its default', () => {
    const brokenElsewhere = 'version: v9\nservice: 42\norchestration: { strategy: canry }\nfrobnicate: 1\n';
    assert.equal(
      parseControlSocketPath(`${brokenElsewhere}control: { socket_path: run/ctl.sock }\n`, '/etc/app/aeterna.yaml'),
      '/etc/app/run/ctl.sock',
    );
    assert.equal(parseControlSocketPath(brokenElsewhere, 'x.yaml'), path.join(defaultRuntimeDir(), 'aeterna.sock'));
    assert.equal(parseControlSocketPath('control:\n', 'x.yaml'), path.join(defaultRuntimeDir(), 'aeterna.sock'));
    assert.equal(parseControlSocketPath('# nothing yet\n', 'x.yaml'), path.join(defaultRuntimeDir(), 'aeterna.sock'));
    // YAML-level issues away from the key (a duplicate key, an unknown alias) do not count either.
    const yamlIssues =
      'service: { name: a, name: b }\nenv: *nowhere\ncontrol: { socket_path: /run/a.sock, other: 1 }\n';
    assert.equal(parseControlSocketPath(yamlIssues, 'x.yaml'), '/run/a.sock');
  });

  test('a file that cannot be parsed, or an invalid control.socket_path, is an error naming only that', () => {
    assert.deepEqual(
      configError(() => parseControlSocketPath('control: { socket_path: "/a\n', 'x.yaml')).issues.map((i) =>
        i.message.slice(0, 13),
      ),
      ['invalid YAML:', 'invalid YAML:'],
    );
    assert.equal(
      configError(() => parseControlSocketPath('version: v9\ncontrol:\n  socket_path: 42\n', 'x.yaml')).message,
      'x.yaml:3:16 control.socket_path: must be a unix socket path (got 42)',
    );
    assert.equal(
      configError(() => parseControlSocketPath('control: /run/a.sock\n', 'x.yaml')).message,
      'x.yaml:1:10 control: must be a mapping (got "/run/a.sock")',
    );
    assert.equal(
      configError(() => parseControlSocketPath('control: { socket_path: /a.sock }\ncontrol: {}\n', 'x.yaml')).message,
      'x.yaml:2:1 control: duplicate key "control" (first set at 1:1); each key may appear once',
    );
    assert.equal(
      configError(() => parseControlSocketPath('- a\n', 'x.yaml')).message,
      'x.yaml:1:1 must be a mapping (got a list)',
    );
  });
});

describe('JSON Schema', () => {
  test('configs/aeterna.schema.json has not drifted from schema.ts', () => {
    const committed = fs.readFileSync(SCHEMA_FILE, 'utf8');
    assert.deepEqual(JSON.parse(committed), configJsonSchema(), 'run: node dist/scripts/gen-config-schema.js');
    assert.equal(committed, renderConfigJsonSchema());
  });

  test('it accepts and rejects the same basic cases as the loader', () => {
    const minimal = { version: 'v1', service: { name: 'app', command: ['python', 'main.py'] } };
    const withService = (service: object): object => ({ ...minimal, service: { ...minimal.service, ...service } });
    const cases: [string, unknown, boolean][] = [
      ['minimal', minimal, true],
      ['shipped example', loadYaml(EXAMPLE), true],
      ['missing version', { service: minimal.service }, false],
      ['missing service', { version: 'v1' }, false],
      ['wrong version', { ...minimal, version: 'v2' }, false],
      ['invalid strategy', { ...minimal, orchestration: { strategy: 'canry' } }, false],
      ['valid strategy', { ...minimal, orchestration: { strategy: 'canary' } }, true],
      ['command as a string', withService({ command: 'python main.py' }), false],
      ['empty command', withService({ command: [] }), false],
      ['unknown key', withService({ listners: [] }), false],
      ['negative duration', withService({ stop_timeout: '-5s' }), false],
      ['bare-number duration', withService({ stop_timeout: 30 }), false],
      ['compound duration', withService({ stop_timeout: '1m30s' }), true],
      ['bad address', withService({ listeners: [{ name: 'http', address: 'http://x:80' }] }), false],
      ['listener without address', withService({ listeners: [{ name: 'http' }] }), false],
      ['bad log level', { ...minimal, observability: { log_level: 'loud' } }, false],
      ['size as bytes', { ...minimal, orchestration: { state_handoff: { max_frame: 4096 } } }, true],
      ['size with unit', { ...minimal, orchestration: { state_handoff: { max_frame: '1GiB' } } }, true],
      ['size with decimal unit', { ...minimal, orchestration: { state_handoff: { max_frame: '16MB' } } }, false],
    ];
    const schema = configJsonSchema();
    for (const [name, document, valid] of cases) {
      assert.equal(schemaAccepts(schema, document), valid, `JSON Schema, ${name}`);
      assert.equal(loaderAccepts(document), valid, `loader, ${name}`);
    }
  });
});

function loadYaml(file: string): unknown {
  return parseYaml(fs.readFileSync(file, 'utf8')) as unknown;
}

function loaderAccepts(document: unknown): boolean {
  try {
    parseConfig(stringify(document), path.join(REPO, 'case.yaml'));
    return true;
  } catch (error) {
    if (error instanceof ConfigError) return false;
    throw error;
  }
}

/** Just enough of JSON Schema for the keywords our generator emits. */
function schemaAccepts(schema: JsonSchema, value: unknown): boolean {
  const anyOf = schema['anyOf'] as JsonSchema[] | undefined;
  if (anyOf !== undefined && !anyOf.some((option) => schemaAccepts(option, value))) return false;
  const allowed = schema['enum'] as unknown[] | undefined;
  if (allowed !== undefined && !allowed.includes(value)) return false;
  const number = (keyword: string): number | undefined => schema[keyword] as number | undefined;
  switch (schema['type']) {
    case undefined:
      return true;
    case 'string': {
      if (typeof value !== 'string') return false;
      const pattern = schema['pattern'] as string | undefined;
      return (
        value.length >= (number('minLength') ?? 0) &&
        value.length <= (number('maxLength') ?? Infinity) &&
        (pattern === undefined || new RegExp(pattern, 'u').test(value))
      );
    }
    case 'integer':
      return (
        Number.isInteger(value) &&
        (value as number) >= (number('minimum') ?? -Infinity) &&
        (value as number) <= (number('maximum') ?? Infinity)
      );
    case 'boolean':
      return typeof value === 'boolean';
    case 'array':
      return (
        Array.isArray(value) &&
        value.length >= (number('minItems') ?? 0) &&
        value.every((item) => schemaAccepts(schema['items'] as JsonSchema, item))
      );
    case 'object': {
      if (value === null || typeof value !== 'object' || Array.isArray(value)) return false;
      const properties = schema['properties'] as Record<string, JsonSchema>;
      const record = value as Record<string, unknown>;
      return (
        ((schema['required'] as string[] | undefined) ?? []).every((key) => key in record) &&
        Object.entries(record).every(([key, item]) => key in properties && schemaAccepts(properties[key], item))
      );
    }
    default:
      throw new Error(`schemaAccepts: unsupported type ${String(schema['type'])}`);
  }
}

/** Every key name the schema defines. */
function schemaKeys(spec: Spec): string[] {
  if (spec.kind === 'list') return schemaKeys(spec.items);
  if (spec.kind !== 'object') return [];
  return Object.entries(spec.fields).flatMap(([name, field]) => [name, ...schemaKeys(field.spec)]);
}

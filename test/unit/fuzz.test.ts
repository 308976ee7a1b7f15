// Property (fuzz) tests with fast-check: the config loader over random YAML
// documents and random mutations of the valid example, and the parsers of
// untrusted bytes: the control socket's line
// codec and request parser, and the sd_notify datagram parser, over random
// byte streams split at random points. (The State Relay's frame codec gets
// its own property test when it lands.)
//
// fast-check prints the seed and the shrunk counterexample of a failure;
// replay it with { seed, path } in the failing fc.assert call.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import { stringify as stringifyYaml } from 'yaml';
import { ConfigError, formatIssue, parseConfig, parseControlSocketPath } from '../../src/config/load';
import type { Config } from '../../src/config/types';
import { AeternaError } from '../../src/errors';
import {
  COMMANDS,
  LineDecoder,
  LineTooLong,
  MAX_REQUEST_BYTES,
  encodeMessage,
  parseRequest,
  parseServerMessage,
  type ControlRequest,
} from '../../src/control/protocol';
import { parseNotify } from '../../src/resources/notify';
import { ROOT } from '../helpers/aeterna';
import { applyTree, treeMutation, weirdValue } from '../helpers/config-mutations';

const EXAMPLE_FILE = path.join(ROOT, 'configs', 'aeterna.yaml');
const EXAMPLE = fs.readFileSync(EXAMPLE_FILE, 'utf8');

/** The loader's contract: a Config, or a ConfigError whose every issue says where and what. Anything else is a bug. */
function checkLoad(source: string, file = '/fuzz/aeterna.yaml'): 'ok' | 'invalid' {
  try {
    parseConfig(source, file);
    return 'ok';
  } catch (err) {
    if (!(err instanceof ConfigError))
      throw new Error(`parseConfig threw ${String(err)} (not a ConfigError) for:\n${source.slice(0, 2000)}`, {
        cause: err,
      });
    assert.equal(err.code, 'E_CONFIG_INVALID');
    assert.ok(err.issues.length > 0, 'at least one issue');
    const lines = source.split('\n').length;
    for (const issue of err.issues) {
      assert.ok(issue.message.length > 0, 'every issue has a message');
      assert.equal(issue.file, file);
      assert.ok(
        issue.line === 0 || (issue.line >= 1 && issue.line <= lines + 1),
        `issue line ${issue.line} is inside the file (${lines} lines)`,
      );
    }
    assert.ok(err.message.includes(file), 'the message names the file');
    return 'invalid';
  }
}

/**
 * What the client commands read agrees with the loader: for a valid file, the same control socket; for any
 * other, either a socket path or a ConfigError whose every issue the loader reports too.
 */
function checkControlSocket(source: string, file = '/fuzz/aeterna.yaml'): void {
  let config: Config | undefined;
  let loaderIssues = new Set<string>();
  try {
    config = parseConfig(source, file);
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    loaderIssues = new Set(err.issues.map(formatIssue));
  }
  try {
    const socketPath = parseControlSocketPath(source, file);
    if (config !== undefined) assert.equal(socketPath, config.control.socketPath);
  } catch (err) {
    if (!(err instanceof ConfigError))
      throw new Error(
        `parseControlSocketPath threw ${String(err)} (not a ConfigError) for:\n${source.slice(0, 2000)}`,
        { cause: err },
      );
    assert.equal(config, undefined, `refused a file the loader accepts: ${err.message}`);
    for (const issue of err.issues.map(formatIssue))
      assert.ok(
        loaderIssues.has(issue),
        `${issue}\nis not among the loader's issues:\n${[...loaderIssues].join('\n')}`,
      );
  }
}

// ---- random YAML ---------------------------------------------------------------------------

/** Characters that make YAML interesting: indicators, quotes, anchors, tags, flow, block scalars. */
const YAML_CHARS = [
  ...'abcv1 :-?,[]{}#&*!|>\'"%@`\n\n\n  \t\\0.5e+~',
  'version',
  'service',
  'command',
  'listeners',
  ': ',
  '\n  ',
  '\n- ',
  '<<',
  '!!str',
  '!!binary',
  '&a ',
  '*a',
  '---',
  '...',
  '"\\u0000"',
  '\u00e9',
  '\ud83d\ude00',
  '\u0085',
  '\ufeff',
];
const yamlText = fc.array(fc.constantFrom(...YAML_CHARS), { maxLength: 200 }).map((parts) => parts.join(''));

/** Documents shaped like a config (the real keys at the real places) with random values. */
const KEYS: Record<string, string[]> = {
  '': ['version', 'service', 'orchestration', 'control', 'observability', 'bogus'],
  service: ['name', 'command', 'env', 'cwd', 'user', 'group', 'listeners', 'stop_timeout', 'restart'],
  'service.restart': ['policy', 'max_restarts', 'window'],
  orchestration: ['strategy', 'soak_time', 'readiness', 'state_handoff'],
  'orchestration.readiness': ['mode', 'timeout', 'delay', 'command', 'interval'],
  'orchestration.state_handoff': ['enabled', 'socket_path', 'timeout', 'max_frame'],
  control: ['socket_path'],
  observability: ['metrics_port', 'log_level'],
};
function configShaped(prefix = ''): fc.Arbitrary<Record<string, unknown>> {
  const keys = KEYS[prefix];
  const entries: Record<string, fc.Arbitrary<unknown>> = {};
  for (const key of keys) {
    const full = prefix ? `${prefix}.${key}` : key;
    entries[key] = KEYS[full]
      ? fc.oneof({ weight: 3, arbitrary: configShaped(full) }, { weight: 1, arbitrary: weirdValue })
      : key === 'listeners'
        ? fc.array(
            fc.record(
              { name: weirdValue, address: weirdValue, backlog: weirdValue, mode: weirdValue },
              { requiredKeys: [] },
            ),
            { maxLength: 3 },
          )
        : weirdValue;
  }
  return fc.record(entries, { requiredKeys: [] });
}

// ---- mutations of a valid config -----------------------------------------------------------

type TextMutation = {
  kind: 'delete-line' | 'duplicate-line' | 'swap-lines' | 'truncate' | 'insert' | 'replace-char' | 'indent' | 'dedent';
  at: number;
  other: number;
  text: string;
};
const textMutation: fc.Arbitrary<TextMutation> = fc.record({
  kind: fc.constantFrom(
    'delete-line',
    'duplicate-line',
    'swap-lines',
    'truncate',
    'insert',
    'replace-char',
    'indent',
    'dedent',
  ),
  at: fc.nat(),
  other: fc.nat(),
  text: fc.constantFrom(...YAML_CHARS),
});

function applyText(source: string, m: TextMutation): string {
  const lines = source.split('\n');
  const i = m.at % lines.length;
  const j = m.other % lines.length;
  switch (m.kind) {
    case 'delete-line':
      lines.splice(i, 1);
      return lines.join('\n');
    case 'duplicate-line':
      lines.splice(i, 0, lines[i]);
      return lines.join('\n');
    case 'swap-lines':
      [lines[i], lines[j]] = [lines[j], lines[i]];
      return lines.join('\n');
    case 'indent':
      lines[i] = '  ' + lines[i];
      return lines.join('\n');
    case 'dedent':
      lines[i] = lines[i].replace(/^ {1,2}/, '');
      return lines.join('\n');
    case 'truncate':
      return source.slice(0, m.at % (source.length + 1));
    case 'insert': {
      const at = m.at % (source.length + 1);
      return source.slice(0, at) + m.text + source.slice(at);
    }
    case 'replace-char': {
      const at = m.at % Math.max(1, source.length);
      return source.slice(0, at) + m.text + source.slice(at + 1);
    }
  }
}

describe('config loader under random input (property)', () => {
  it('random YAML-ish text: a Config or a ConfigError with file:line, never another exception', () => {
    fc.assert(
      fc.property(yamlText, (text) => void checkLoad(text)),
      { numRuns: 3000 },
    );
  });

  it('random documents (any JSON value as YAML): a Config or a ConfigError, never another exception', () => {
    fc.assert(
      fc.property(fc.jsonValue({ maxDepth: 4 }), (value) => void checkLoad(stringifyYaml(value))),
      { numRuns: 1000 },
    );
  });

  it('random config-shaped documents (real keys, random values of every type): never another exception', () => {
    fc.assert(
      fc.property(configShaped(), (doc) => void checkLoad(stringifyYaml(doc))),
      { numRuns: 2000 },
    );
  });

  it('random text mutations of the valid example (configs/aeterna.yaml): never another exception', () => {
    assert.equal(checkLoad(EXAMPLE, EXAMPLE_FILE), 'ok', 'the example itself is valid');
    const counts = { ok: 0, invalid: 0 };
    fc.assert(
      fc.property(fc.array(textMutation, { minLength: 1, maxLength: 4 }), (ms) => {
        counts[checkLoad(ms.reduce(applyText, EXAMPLE), EXAMPLE_FILE)]++;
      }),
      { numRuns: 2000 },
    );
    // Some mutations (a deleted comment line, say) leave it valid: the property saw both sides.
    assert.ok(counts.ok > 0 && counts.invalid > 0, JSON.stringify(counts));
  });

  it('random value mutations of the valid example (set or delete any value): never another exception', () => {
    const counts = { ok: 0, invalid: 0 };
    fc.assert(
      fc.property(fc.array(treeMutation, { minLength: 1, maxLength: 3 }), (ms) => {
        counts[checkLoad(applyTree(EXAMPLE, ms), EXAMPLE_FILE)]++;
      }),
      { numRuns: 2000 },
    );
    assert.ok(counts.ok > 0 && counts.invalid > 0, JSON.stringify(counts));
  });

  it("the control socket as the client commands read it: the loader's for a valid file; else a path or some of the loader's issues, never another exception", () => {
    fc.assert(
      fc.property(yamlText, (text) => checkControlSocket(text)),
      { numRuns: 1000 },
    );
    fc.assert(
      fc.property(fc.array(textMutation, { minLength: 1, maxLength: 4 }), (ms) =>
        checkControlSocket(ms.reduce(applyText, EXAMPLE), EXAMPLE_FILE),
      ),
      { numRuns: 1000 },
    );
    fc.assert(
      fc.property(fc.array(treeMutation, { minLength: 1, maxLength: 3 }), (ms) =>
        checkControlSocket(applyTree(EXAMPLE, ms), EXAMPLE_FILE),
      ),
      { numRuns: 1000 },
    );
  });

  it('a circular alias (an anchor on a value that contains its own alias) is refused with a message, not a stack overflow', () => {
    for (const source of ['&a \n- *a', 'version: "v1"\nservice: &s\n  name: x\n  command: ["a"]\n  env: { X: *s }\n']) {
      assert.throws(
        () => parseConfig(source, '/fuzz/circular.yaml'),
        (err) => err instanceof ConfigError && /circular alias/.test(err.message),
      );
      checkControlSocket(source);
    }
  });

  it('a tree nested deeper than any config is refused with a message, not a stack overflow', () => {
    const source = `version: "v1"\nservice: ${'['.repeat(200)}${']'.repeat(200)}\n`;
    assert.throws(
      () => parseConfig(source, '/fuzz/deep.yaml'),
      (err) => err instanceof ConfigError && /nested more than 64 levels deep/.test(err.message),
    );
  });

  it('an alias bomb ("billion laughs") is refused with a message, not expanded', () => {
    const levels = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]'];
    for (let i = 1; i < 9; i++)
      levels.push(
        `${String.fromCharCode(97 + i)}: &${String.fromCharCode(97 + i)} [${Array(10)
          .fill(`*${String.fromCharCode(96 + i)}`)
          .join(',')}]`,
      );
    const bomb = `version: "v1"\n${levels.join('\n')}\n`;
    assert.throws(
      () => parseConfig(bomb, '/fuzz/bomb.yaml'),
      (err) => err instanceof ConfigError && /too many values/.test(err.message),
    );
  });
});

// ---- protocol parsers ----------------------------------------------------------------------

/** Bytes with plenty of newlines and UTF-8 edge cases. */
const streamBytes = fc
  .array(
    fc.oneof(
      { weight: 5, arbitrary: fc.integer({ min: 0, max: 255 }) },
      { weight: 2, arbitrary: fc.constant(0x0a) },
      { weight: 1, arbitrary: fc.constantFrom(0x7b, 0x7d, 0x22, 0x3a, 0xc3, 0xe2, 0xf0, 0x80, 0xbf, 0x0d, 0x00) },
    ),
    { maxLength: 600 },
  )
  .map((bytes) => Buffer.from(bytes));

/** Split a buffer at random points. */
const chunked = (data: fc.Arbitrary<Buffer>): fc.Arbitrary<{ data: Buffer; chunks: Buffer[] }> =>
  data.chain((buf) =>
    fc.uniqueArray(fc.integer({ min: 0, max: buf.length }), { maxLength: 12 }).map((cuts) => {
      const points = [0, ...cuts.sort((a, b) => a - b), buf.length];
      const chunks: Buffer[] = [];
      for (let i = 1; i < points.length; i++) chunks.push(buf.subarray(points[i - 1], points[i]));
      return { data: buf, chunks };
    }),
  );

/** What LineDecoder must do, computed on the whole stream: the lines each push returns, or the push that throws. */
function modelDecode(chunks: Buffer[], max: number): { pushes: Array<string[] | 'throws'>; rest: string | null } {
  const pushes: Array<string[] | 'throws'> = [];
  let pending = Buffer.alloc(0);
  for (const chunk of chunks) {
    const all = Buffer.concat([pending, chunk]);
    const parts: Buffer[] = [];
    let start = 0;
    let nl: number;
    while ((nl = all.indexOf(0x0a, start)) !== -1) {
      parts.push(all.subarray(start, nl));
      start = nl + 1;
    }
    const tail = all.subarray(start);
    if (parts.some((p) => p.length > max) || tail.length > max) {
      pushes.push('throws');
      return { pushes, rest: null };
    }
    pushes.push(parts.map((p) => p.toString('latin1')));
    pending = Buffer.from(tail);
  }
  return { pushes, rest: pending.length > 0 ? pending.toString('latin1') : null };
}

const validRequest: fc.Arbitrary<ControlRequest> = fc.oneof(
  fc.constantFrom<ControlRequest>({ cmd: 'status' }, { cmd: 'promote' }, { cmd: 'rollback' }, { cmd: 'stop' }),
  fc.boolean().map((wait): ControlRequest => ({ cmd: 'reload', wait })),
);

/** Random request-like objects: real and fake commands, extra keys, values of every type. */
const requestLike = fc
  .record(
    {
      cmd: fc.oneof(fc.constantFrom(...COMMANDS), fc.string(), weirdValue),
      wait: fc.oneof(fc.boolean(), weirdValue),
      extra: weirdValue,
    },
    { requiredKeys: [] },
  )
  .map((o) => Buffer.from(JSON.stringify(o)));

function checkParseRequest(line: Buffer): void {
  let request: ControlRequest;
  try {
    request = parseRequest(line);
  } catch (err) {
    if (!(err instanceof AeternaError))
      throw new Error(`parseRequest threw ${String(err)} for ${JSON.stringify(line.toString('latin1'))}`, {
        cause: err,
      });
    assert.equal(err.code, 'E_CONTROL_BAD_REQUEST');
    assert.ok(err.message.length > 0);
    return;
  }
  assert.ok((COMMANDS as readonly string[]).includes(request.cmd));
  // wait: always for reload, for stop when it was sent (stop --wait); signal has its own fields.
  const fields = request.cmd === 'signal' ? ['cmd', 'main', 'signal'] : 'wait' in request ? ['cmd', 'wait'] : ['cmd'];
  assert.deepEqual(Object.keys(request).sort(), fields);
  if (request.cmd === 'reload' || 'wait' in request) assert.equal(typeof request.wait, 'boolean');
  assert.ok(request.cmd === 'reload' || request.cmd === 'stop' || !('wait' in request));
}

describe('control protocol under random byte streams (property)', () => {
  it('LineDecoder: any stream split at any points gives exactly the lines of the whole stream, and refuses an over-long line while buffering', () => {
    fc.assert(
      fc.property(chunked(streamBytes), fc.integer({ min: 1, max: 120 }), ({ chunks }, max) => {
        const expected = modelDecode(chunks, max);
        const decoder = new LineDecoder(max);
        for (let i = 0; i < expected.pushes.length; i++) {
          const want = expected.pushes[i];
          if (want === 'throws') {
            assert.throws(() => decoder.push(chunks[i]), LineTooLong);
            return;
          }
          assert.deepEqual(
            decoder.push(chunks[i]).map((l) => l.toString('latin1')),
            want,
          );
        }
        assert.equal(decoder.flush()?.toString('latin1') ?? null, expected.rest);
      }),
      { numRuns: 3000 },
    );
  });

  it('LineDecoder: the same stream split two different ways gives the same lines', () => {
    fc.assert(
      fc.property(
        streamBytes.chain((b) => fc.tuple(chunked(fc.constant(b)), chunked(fc.constant(b)))),
        ([a, b]) => {
          const run = (chunks: Buffer[]): string[] => {
            const d = new LineDecoder(1 << 20);
            const out = chunks.flatMap((c) => d.push(c).map((l) => l.toString('latin1')));
            const rest = d.flush();
            return rest ? [...out, rest.toString('latin1')] : out;
          };
          assert.deepEqual(run(a.chunks), run(b.chunks));
        },
      ),
      { numRuns: 1000 },
    );
  });

  it('parseRequest: random bytes, random JSON and request-like objects give a valid request or E_CONTROL_BAD_REQUEST, never another exception', () => {
    fc.assert(fc.property(streamBytes, checkParseRequest), { numRuns: 3000 });
    fc.assert(
      fc.property(fc.jsonValue({ maxDepth: 3 }), (v) => checkParseRequest(Buffer.from(JSON.stringify(v) ?? 'null'))),
      { numRuns: 1000 },
    );
    fc.assert(fc.property(requestLike, checkParseRequest), { numRuns: 2000 });
  });

  it('parseRequest: every valid request survives encode -> bytes split anywhere -> decode -> parse', () => {
    fc.assert(
      fc.property(
        fc.array(validRequest, { minLength: 1, maxLength: 5 }),
        fc.array(fc.nat(), { maxLength: 8 }),
        (requests, cuts) => {
          const wire = Buffer.from(requests.map((r) => encodeMessage(r)).join(''));
          const points = [...new Set(cuts.map((c) => c % (wire.length + 1)))].sort((a, b) => a - b);
          const decoder = new LineDecoder(MAX_REQUEST_BYTES);
          const lines: Buffer[] = [];
          let prev = 0;
          for (const p of [...points, wire.length]) {
            lines.push(...decoder.push(wire.subarray(prev, p)));
            prev = p;
          }
          assert.equal(decoder.flush(), null);
          assert.deepEqual(lines.map(parseRequest), requests);
        },
      ),
      { numRuns: 1000 },
    );
  });

  it('a stream of valid requests and garbage, split anywhere: only LineTooLong or E_CONTROL_BAD_REQUEST, and the valid lines still parse', () => {
    const piece = fc.oneof(
      validRequest.map((r) => Buffer.from(encodeMessage(r))),
      streamBytes,
      requestLike.map((b) => Buffer.concat([b, Buffer.from('\n')])),
    );
    fc.assert(
      fc.property(chunked(fc.array(piece, { maxLength: 8 }).map((ps) => Buffer.concat(ps))), ({ chunks }) => {
        const decoder = new LineDecoder(256);
        for (const chunk of chunks) {
          let lines: Buffer[];
          try {
            lines = decoder.push(chunk);
          } catch (err) {
            assert.ok(err instanceof LineTooLong, String(err));
            return;
          }
          lines.forEach(checkParseRequest);
        }
      }),
      { numRuns: 2000 },
    );
  });

  it('parseServerMessage (the CLI side): random lines give a message or a plain Error, never anything else', () => {
    const serverish = fc
      .record(
        {
          type: fc.oneof(fc.constantFrom('event', 'result', 'error'), weirdValue),
          ok: weirdValue,
          code: weirdValue,
          message: weirdValue,
          event: weirdValue,
        },
        { requiredKeys: [] },
      )
      .map((o) => Buffer.from(JSON.stringify(o)));
    fc.assert(
      fc.property(fc.oneof(streamBytes, serverish), (line) => {
        try {
          const m = parseServerMessage(line);
          assert.ok(['event', 'result', 'error'].includes(m.type));
        } catch (err) {
          assert.ok(err instanceof Error, String(err));
        }
      }),
      { numRuns: 3000 },
    );
  });
});

describe('sd_notify datagram parser under random bytes (property)', () => {
  it('parseNotify: null or KEY=VALUE fields, never an exception', () => {
    const notifyish = fc
      .array(
        fc.oneof(
          fc.constantFrom('READY=1', 'STATUS=x', 'STOPPING=1', 'MAINPID=1', '=', 'READY', '\n', '\n\n'),
          fc.string({ maxLength: 8 }),
        ),
        { maxLength: 6 },
      )
      .map((p) => Buffer.from(p.join('\n')));
    fc.assert(
      fc.property(fc.oneof(streamBytes, notifyish), (data) => {
        const fields = parseNotify(data);
        if (fields === null) return;
        for (const [k, v] of fields) {
          assert.ok(k.length > 0 && !k.includes('\n') && !k.includes('='), `key ${JSON.stringify(k)}`);
          assert.ok(!v.includes('\n'));
        }
      }),
      { numRuns: 3000 },
    );
  });
});

// LogThrottle (src/log-throttle.ts): lines a peer can repeat at will are logged a few times an interval, and
// the rest are counted in one summary line, never lost. In process, with pino writing to a collecting stream.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import pino from 'pino';
import { LogThrottle } from '../../src/log-throttle';

function collectingLogger(): { log: pino.Logger; lines: Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, done) {
      for (const line of chunk.toString().split('\n'))
        if (line) lines.push(JSON.parse(line) as Record<string, unknown>);
      done();
    },
  });
  return { log: pino({ level: 'debug' }, sink), lines };
}

const tick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

describe('LogThrottle', () => {
  it('10,000 repeats of one kind: the first 10 are logged, the flush says the other 9,990 in one line', async () => {
    const { log, lines } = collectingLogger();
    const throttle = new LogThrottle(log);
    for (let i = 0; i < 10_000; i++) throttle.warn('accept', { i }, 'control socket: accept failed');
    assert.equal(throttle.suppressed('accept'), 9_990);
    throttle.flush();
    await tick();
    assert.equal(lines.length, 11);
    assert.deepEqual(
      lines.slice(0, 10).map((l) => l['i']),
      [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    );
    assert.equal(lines[10]['suppressed'], 9_990);
    assert.equal(lines[10]['throttle'], 'accept');
    assert.match(String(lines[10]['msg']), /^9990 more like this suppressed .*accept failed$/);
  });

  it('kinds are counted apart: a flood of one does not silence another', async () => {
    const { log, lines } = collectingLogger();
    const throttle = new LogThrottle(log, { burst: 2 });
    for (let i = 0; i < 100; i++) throttle.warn('a', {}, 'a');
    throttle.info('b', {}, 'b');
    throttle.flush();
    await tick();
    assert.deepEqual(
      lines.map((l) => l['msg']),
      ['a', 'a', 'b', '98 more like this suppressed (at most 2 a minute): a'],
    );
  });

  it('a new interval logs again, after the summary of the one before', async () => {
    const { log, lines } = collectingLogger();
    // The three lines must fall in one interval: a stalled machine can pause a few milliseconds between two calls,
    // never a second.
    const throttle = new LogThrottle(log, { burst: 1, intervalMs: 1000 });
    throttle.warn('k', {}, 'x');
    throttle.warn('k', {}, 'x');
    throttle.warn('k', {}, 'x');
    // The summary timer fires at the end of the interval even with no further line (a hang guard bounds the wait).
    for (const deadline = Date.now() + 30000; !lines.some((l) => l['suppressed'] === 2);) {
      assert.ok(Date.now() < deadline, `no summary of 2 lines: ${JSON.stringify(lines)}`);
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    throttle.warn('k', {}, 'y');
    throttle.flush();
    await tick();
    assert.deepEqual(
      lines.map((l) => l['msg']),
      ['x', '2 more like this suppressed (at most 1 a 1 s): x', 'y'],
    );
  });
});

// The pieces of monitor/app-output.ts that need no daemon: the output pipe the addon makes, the line splitter's cap
// and UTF-8 cut, and the stderr tail's bounds.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { native } from '../../src/native/binding';
import {
  LineSplitter,
  MAX_LINE_BYTES,
  STDERR_TAIL_BYTES,
  STDERR_TAIL_LINES,
  TailRing,
  utf8Boundary,
} from '../../src/monitor/app-output';

/** The open flags of one of this process's fds (fdinfo's octal "flags"). */
function flagsOf(fd: number): number {
  const m = /^flags:\s+([0-7]+)$/m.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'));
  return parseInt(m![1], 8);
}
const O_NONBLOCK = 0o4000;
const O_CLOEXEC = 0o2000000;

test('the output pipe: both ends close-on-exec, only the read end non-blocking', () => {
  const [read, write] = native.outputPipe();
  try {
    assert.ok(flagsOf(read) & O_CLOEXEC && flagsOf(write) & O_CLOEXEC, 'close-on-exec');
    assert.ok(flagsOf(read) & O_NONBLOCK, 'the read end is non-blocking');
    assert.equal(flagsOf(write) & O_NONBLOCK, 0, 'the write end (the app stdout) blocks');
    fs.writeSync(write, 'a line\n');
    const buf = Buffer.alloc(64);
    assert.equal(buf.toString('utf8', 0, fs.readSync(read, buf, 0, 64, null)), 'a line\n');
    assert.throws(() => fs.readSync(read, buf, 0, 64, null), { code: 'EAGAIN' });
  } finally {
    native.close(read);
    native.close(write);
  }
});

test('lines come out whole however they are cut; a longer one in marked pieces on character boundaries', () => {
  const out: Array<{ text: string; continues: boolean }> = [];
  const splitter = new LineSplitter((p) => out.push(p));
  const long = 'é'.repeat(MAX_LINE_BYTES); // 2 bytes each: 2 × the cap
  const input = Buffer.from(`one\r\ntwo\n${long}\nlast`);
  for (let i = 0; i < input.length; i += 1000) splitter.push(input.subarray(i, i + 1000));
  splitter.flush();
  assert.deepEqual(out.slice(0, 2), [
    { text: 'one', continues: false },
    { text: 'two', continues: false },
  ]);
  const pieces = out.slice(2, -1);
  assert.ok(pieces.length >= 2);
  assert.ok(pieces.slice(0, -1).every((p) => p.continues) && !pieces[pieces.length - 1].continues);
  assert.ok(pieces.every((p) => Buffer.byteLength(p.text) <= MAX_LINE_BYTES && !p.text.includes('\ufffd')));
  assert.equal(pieces.map((p) => p.text).join(''), long);
  assert.deepEqual(out[out.length - 1], { text: 'last', continues: false }, 'an unfinished last line at the end');
});

test('utf8Boundary never splits a character', () => {
  const buf = Buffer.from('a€'); // 61 e2 82 ac
  assert.equal(utf8Boundary(buf, 4), 4);
  assert.equal(utf8Boundary(buf, 3), 1);
  assert.equal(utf8Boundary(buf, 2), 1);
  assert.equal(utf8Boundary(buf, 1), 1);
});

test('the stderr tail keeps the last lines within its line and byte bounds', () => {
  const ring = new TailRing();
  for (let i = 0; i < 100; i++) ring.push(`line ${i}`);
  assert.deepEqual(
    ring.list(),
    Array.from({ length: STDERR_TAIL_LINES }, (_, i) => `line ${80 + i}`),
  );
  for (let i = 0; i < 10; i++) ring.push('x'.repeat(3000));
  assert.ok(ring.list().join('').length <= STDERR_TAIL_BYTES);
  ring.push('y'.repeat(10 * STDERR_TAIL_BYTES));
  assert.ok(ring.list().join('').length <= STDERR_TAIL_BYTES, 'one huge line is cut to the bound');
});

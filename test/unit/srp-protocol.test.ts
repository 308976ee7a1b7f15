// The relay's protocol table (src/srp/protocol.ts), walked whole: every (phase,
// op) pair is decided, each handler is reachable, and docs/srp.md carries the
// table generated from it.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import {
  HANDLERS,
  ON,
  OPS,
  ROWS,
  SRP_TABLE_BEGIN,
  SRP_TABLE_END,
  srpTable,
  type Handler,
} from '../../src/srp/protocol';
import { ROOT } from '../helpers/aeterna';

describe('SRP protocol table', () => {
  it('decides every (phase, op) pair, each as a known handler or unexpected_op', () => {
    let decided = 0;
    for (const row of ROWS) {
      assert.deepEqual(Object.keys(ON[row]).sort(), [...OPS].sort(), row);
      for (const op of OPS) {
        const h = ON[row][op];
        assert.ok(h === null || Object.hasOwn(HANDLERS, h), `${row} × ${op}: ${h}`);
        decided++;
      }
    }
    assert.equal(decided, ROWS.length * OPS.length);
    assert.ok(ROWS.includes('checkpoint') && ROWS.includes('dump-requested'));
  });

  it('uses every handler', () => {
    const used = new Set<Handler>(
      ROWS.flatMap((row) => OPS.map((op) => ON[row][op]).filter((h): h is Handler => h !== null)),
    );
    assert.deepEqual([...used].sort(), Object.keys(HANDLERS).sort());
  });

  it('accepts none of the ops Aeterna sends, in any phase', () => {
    for (const op of ['welcome', 'load', 'dump', 'handoff', 'checkpointed'] as const)
      for (const row of ROWS) assert.equal(ON[row][op], null, `${row} × ${op}`);
  });

  it('takes hello only before the welcome, and nothing else then', () => {
    for (const row of ROWS) assert.equal(ON[row].hello, row === 'hello' ? 'hello' : null, row);
    for (const op of OPS) if (op !== 'hello') assert.equal(ON.hello[op], null, op);
  });

  it('takes an error report from every welcomed connection', () => {
    for (const row of ROWS) if (row !== 'hello') assert.equal(ON[row].error, 'peerError', row);
  });

  it('takes a state only as the answer to a dump, and a checkpoint never while bytes of a state or checkpoint are due', () => {
    for (const row of ROWS) assert.equal(ON[row].state !== null, row === 'dump-requested', row);
    for (const row of ['streaming', 'trailer', 'checkpoint'] as const) assert.equal(ON[row].checkpoint, null, row);
  });

  it('docs/srp.md carries the table generated from it', () => {
    const doc = fs.readFileSync(path.join(ROOT, 'docs', 'srp.md'), 'utf8');
    assert.ok(
      doc.includes(SRP_TABLE_BEGIN + '\n' + srpTable() + '\n' + SRP_TABLE_END),
      'regenerate with: node dist/scripts/gen-srp-doc.js',
    );
  });
});

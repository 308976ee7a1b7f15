// The checkpoints of several instances without a daemon (srp/checkpoint-instances.ts): each instance's durable
// file beside `path`, loaded back as that instance's; a file Aeterna did not write at an instance's name refuses
// the start; what a re-exec carries; and orchestration.watch treating those files as Aeterna's own.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import pino from 'pino';
import { native } from '../../src/native/binding';
import { parseConfig } from '../../src/config/load';
import { ownFiles } from '../../src/own-files';
import { InstanceCheckpoints } from '../../src/srp/checkpoint-instances';
import { tempDir } from '../helpers/aeterna';

const log = pino({ level: 'silent' });

/** A sealed memfd holding `text`, as an app sends a memfd checkpoint. */
function sealed(text: string): number {
  const fd = native.memfdCreate('test-checkpoint');
  fs.writeSync(fd, text);
  native.sealMemfd(fd);
  return fd;
}

function contents(store: InstanceCheckpoints, instance: number): string {
  const c = store.current(instance)!;
  const buffer = Buffer.alloc(c.size);
  fs.readSync(c.fd, buffer, 0, c.size, 0);
  return buffer.toString();
}

const config = (file: string) => ({ enabled: true, path: file, maxSizeBytes: 1 << 20 });

test("each instance's checkpoint is written to its own file and loaded back as that instance's", async () => {
  const file = path.join(tempDir(), 'checkpoint');
  const store = new InstanceCheckpoints(config(file), log, 3);
  for (const [instance, text] of [
    [1, 'one'],
    [2, 'two'],
  ] as const) {
    const seq = store.of(instance).adopt(sealed(text), { size: text.length, encoding: 'json' });
    await store.of(instance).persist(seq);
  }
  store.close();
  assert.deepEqual(fs.readdirSync(path.dirname(file)).sort(), ['checkpoint.1', 'checkpoint.2']);
  const loaded = new InstanceCheckpoints(config(file), log, 3);
  assert.equal(loaded.current(0), null, 'instance 0 stored none');
  assert.equal(contents(loaded, 1), 'one');
  assert.equal(contents(loaded, 2), 'two');
  assert.deepEqual(
    loaded.carry().map((c) => [c.instance, c.seq]),
    [
      [1, 1],
      [2, 1],
    ],
    'each carried with its instance number',
  );
  loaded.close();
});

test("instance 0's checkpoint is the file at path, carried without an instance number, as with one instance", async () => {
  const file = path.join(tempDir(), 'checkpoint');
  const store = new InstanceCheckpoints(config(file), log, 2);
  await store.of(0).persist(store.of(0).adopt(sealed('zero'), { size: 4, encoding: 'json' }));
  assert.deepEqual(fs.readdirSync(path.dirname(file)), ['checkpoint']);
  const [carried] = store.carry();
  assert.equal(carried.seq, 1);
  assert.equal('instance' in carried, false, "carried as the handover's `checkpoint` always was");
  store.close();
});

test("a file Aeterna did not write at an instance's name refuses the start and is left as it was", () => {
  const file = path.join(tempDir(), 'checkpoint');
  fs.writeFileSync(`${file}.2`, 'not a checkpoint');
  assert.throws(() => new InstanceCheckpoints(config(file), log, 3), { code: 'E_CONFIG_INVALID' });
  assert.equal(fs.readFileSync(`${file}.2`, 'utf8'), 'not a checkpoint');
});

test("orchestration.watch counts the other instances' checkpoint files and their temporary files as Aeterna's own", () => {
  const dir = tempDir();
  const cfg = parseConfig(
    [
      'version: "v1"',
      'service:',
      '  name: app',
      '  command: ["true"]',
      '  instances: 3',
      'orchestration:',
      `  state_handoff: { enabled: true, socket_path: "${dir}/state.sock", checkpoint: { enabled: true, path: "${dir}/checkpoint" } }`,
      'control:',
      `  socket_path: "${dir}/control.sock"`,
      '',
    ].join('\n'),
    path.join(dir, 'aeterna.yaml'),
  );
  const own = ownFiles(cfg);
  for (const name of ['checkpoint', 'checkpoint.1', 'checkpoint.2', '.checkpoint.2.41.7.tmp', '.checkpoint.41.7.tmp'])
    assert.equal(own(path.join(dir, name)), true, name);
  for (const name of ['checkpoint.0', 'checkpoint.x', 'checkpoint.1.bak', 'app.yaml', '.checkpoint.x.41.7.tmp'])
    assert.equal(own(path.join(dir, name)), false, name);
});

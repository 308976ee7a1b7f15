// The README's tour, as a test: the demo agent's sessions survive a reload.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT, freePort, runAeterna, tempDir, type AeternaRun } from '../../helpers/aeterna';
import { cli } from '../../helpers/daemon';
import { requestJson } from '../../helpers/load';

const call = (port: number, method: string, url: string, body?: string): Promise<Record<string, unknown>> =>
  requestJson(port, method, url, body);

/**
 * Run the shipped demo config (with this test's own ports and socket paths) under Aeterna, until `body` is done;
 * then stop it with SIGTERM, which must end it with code 0.
 */
async function withDemo(body: (port: number, file: string, run: AeternaRun) => Promise<void>): Promise<void> {
  const dir = tempDir('aeterna-demo-');
  const port = await freePort();
  const metrics = await freePort();
  const config = fs
    .readFileSync(path.join(ROOT, 'examples', 'llm-agent', 'aeterna.yaml'), 'utf8')
    .replace('cwd: "."', `cwd: "${path.join(ROOT, 'examples', 'llm-agent')}"`)
    .replace('tcp://127.0.0.1:8080', `tcp://127.0.0.1:${port}`)
    .replace('127.0.0.1:9091', `127.0.0.1:${metrics}`)
    .replace('/tmp/aeterna-demo-state.sock', path.join(dir, 'state.sock'))
    .replace('/tmp/aeterna-demo.sock', path.join(dir, 'control.sock'));
  const file = path.join(dir, 'aeterna.yaml');
  fs.writeFileSync(file, config);
  const run = runAeterna(['start', '-c', file]);
  try {
    await run.waitFor(/state Starting -> Running/);
    await body(port, file, run);
  } finally {
    run.child.kill('SIGTERM');
    assert.equal((await run.exit()).code, 0);
  }
}

describe('the demo (examples/llm-agent)', { timeout: 60000 }, () => {
  it('a chat session survives `aeterna reload`, served by the new pid', () =>
    withDemo(async (port, file) => {
      const { id } = (await call(port, 'POST', '/sessions')) as { id: string };
      await call(port, 'POST', `/sessions/${id}/messages`, 'hello, agent');
      await call(port, 'POST', `/sessions/${id}/messages`, 'do you remember me?');
      const before = (await call(port, 'GET', `/sessions/${id}`)) as {
        pid: number;
        history: unknown[];
        context: number[];
      };
      const r = await cli(['reload', '-c', file]);
      assert.equal(r.code, 0, r.stderr);
      const after = (await call(port, 'GET', `/sessions/${id}`)) as {
        pid: number;
        generation: string;
        history: unknown[];
        context: number[];
      };
      assert.notEqual(after.pid, before.pid);
      assert.equal(after.generation, '2');
      assert.equal(after.history.length, 4);
      assert.deepEqual(after.history, before.history);
      assert.deepEqual(after.context, before.context);
    }));

  it('kill -9 of the demo agent: Aeterna restarts it with its sessions (from its last checkpoint)', () =>
    withDemo(async (port, _file, run) => {
      const { id } = (await call(port, 'POST', '/sessions')) as { id: string };
      await call(port, 'POST', `/sessions/${id}/messages`, 'hello, agent');
      await call(port, 'POST', '/sessions');
      const before = (await call(port, 'GET', `/sessions/${id}`)) as {
        pid: number;
        history: unknown[];
        context: number[];
      };
      process.kill(before.pid, 'SIGKILL');
      await run.waitFor(/generation 2\) starts with 2 session\(s\) from checkpoint \d+/);
      const index = (await call(port, 'GET', '/')) as { pid: number; generation: string; sessions: number };
      assert.notEqual(index.pid, before.pid);
      assert.equal(index.generation, '2');
      assert.equal(index.sessions, 2);
      const after = (await call(port, 'GET', `/sessions/${id}`)) as { history: unknown[]; context: number[] };
      assert.deepEqual(after.history, before.history);
      assert.deepEqual(after.context, before.context);
    }));
});

// Property (fuzz) test with fast-check: `aeterna start` over mutated configs
// exits 78 with a message, or starts and stops on SIGTERM; never an unhandled
// exception. The config loader's own property tests are in test/unit/fuzz.test.ts.
//
// fast-check prints the seed and the shrunk counterexample of a failure;
// replay it with { seed, path } in the failing fc.assert call.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import { freePort, pidNamespaceUnavailable, runAeterna, tempDir } from '../../helpers/aeterna';
import { applyTree, weirdValue } from '../../helpers/config-mutations';

const startSkip = pidNamespaceUnavailable();

describe(
  '`aeterna start` over mutated configs (property)',
  { timeout: 240000, skip: startSkip ? `needs a private mount namespace: ${startSkip}` : false },
  () => {
    it('exits 78 with the issues, or starts (and stops on SIGTERM); never an unhandled exception', async () => {
      const port = await freePort();
      const metrics = await freePort();
      const seen = { invalid: 0, started: 0 };
      await fc.assert(
        // Deletions are weighted up here: most leave a valid config, so the daemon's own start path is fuzzed too.
        fc.asyncProperty(
          fc.array(
            fc.record({
              which: fc.nat(),
              action: fc.constantFrom<'set' | 'delete'>('set', 'delete', 'delete'),
              value: weirdValue,
            }),
            { minLength: 1, maxLength: 2 },
          ),
          async (ms) => {
            const dir = tempDir('aeterna-fuzz-');
            try {
              // A valid config whose every path is inside dir: a mutation that deletes a path
              // falls back to a default under /run, which is a private tmpfs in the namespace below.
              const base = `version: "v1"
service:
  name: "fuzz"
  command: ["sleep", "60"]
  env: ["A=1"]
  cwd: "${dir}"
  listeners:
    - name: "http"
      address: "tcp://127.0.0.1:${port}"
      backlog: 16
  stop_timeout: "2s"
  restart: { policy: "never", max_restarts: 1, window: "10s" }
orchestration:
  strategy: "canary"
  soak_time: "1s"
  readiness: { mode: "delay", delay: "10ms", timeout: "5s" }
  state_handoff: { enabled: false, socket_path: "${dir}/state.sock", timeout: "1s", max_frame: "1MiB" }
control:
  socket_path: "${dir}/control.sock"
observability:
  metrics_port: "127.0.0.1:${metrics}"
  log_level: "info"
`;
              const file = path.join(dir, 'aeterna.yaml');
              fs.writeFileSync(file, applyTree(base, ms));
              // As PID 1 of new PID and mount namespaces, with a private /run: nothing it does can reach the host's.
              const run = runAeterna(['start', '-c', file], {
                pid1: true,
                prefix: ['sh', '-c', 'mount -t tmpfs tmpfs /run && exec "$@"', 'sh'],
              });
              const first = await Promise.race([
                run.exited.then(() => 'exited' as const),
                run.waitFor(/"name":"aeterna"/, 30000).then(
                  () => 'logged' as const,
                  () => 'exited' as const,
                ),
              ]);
              if (first === 'logged') await run.signal('SIGTERM');
              const exit = await run.exit(30000);
              const detail = `exit ${exit.code}\nconfig:\n${fs.readFileSync(file, 'utf8')}\nstderr:\n${run.stderr.slice(0, 3000)}`;
              assert.doesNotMatch(
                run.stderr,
                /internal error|Uncaught|UnhandledPromiseRejection|^\s+at /m,
                `an unhandled exception: ${detail}`,
              );
              if (exit.code === 78) {
                assert.match(run.stderr, /^aeterna: invalid configuration\n/, detail);
                assert.match(
                  run.stderr,
                  new RegExp(`${file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}:(\\d+:\\d+)? `),
                  `the issues name the file: ${detail}`,
                );
                seen.invalid++;
              } else {
                // It started, and ended on its own terms: "aeterna exiting" after the stop, or a start
                // failure logged with its code (a listener or the metrics port it could not have).
                const logs = run.logs();
                assert.ok(
                  logs.some(
                    (l) =>
                      l.msg === 'aeterna exiting' ||
                      (l.level === 'error' && typeof l.code === 'string' && l.code.startsWith('E_')),
                  ),
                  `a clean end: ${detail}`,
                );
                assert.ok(exit.code !== null && exit.code !== 70, detail);
                seen.started++;
              }
            } finally {
              fs.rmSync(dir, { recursive: true, force: true });
            }
          },
        ),
        { numRuns: 20, endOnFailure: true, includeErrorInReport: true },
      );
      console.log(`# aeterna start over mutated configs: ${JSON.stringify(seen)}`);
      assert.ok(seen.invalid > 0, 'some mutations were refused');
    });
  },
);

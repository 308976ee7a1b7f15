// The Go SDK (clients/go): go vet, then go test, which runs its unit tests
// against a scripted peer, the conformance suite (test/conformance) and the
// end-to-end test of examples/go-counter under the real daemon.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT } from '../helpers/aeterna';

function goUnavailable(): string | null {
  const r = spawnSync('go', ['version'], { encoding: 'utf8' });
  if (r.error)
    return `go is not available (${r.error.message}); install golang-go (Go 1.19+) to run the Go SDK's tests`;
  return null;
}
const noGo = goUnavailable();

function run(cwd: string, args: string[]): Promise<{ code: number | null; output: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn('go', args, { cwd: path.join(ROOT, cwd), stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (output += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (output += d));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, output }));
  });
}

describe('Go SDK (clients/go)', { skip: noGo ?? false, timeout: 300000 }, () => {
  for (const dir of ['clients/go', 'examples/go-counter']) {
    it(`go vet ./... in ${dir} is clean`, async () => {
      const r = await run(dir, ['vet', './...']);
      assert.equal(r.code, 0, r.output);
    });
  }

  it('go test ./... in clients/go passes (unit, conformance with the checkpoint cases, end to end against the daemon: reloads and kill -9 with a checkpoint)', async () => {
    const r = await run('clients/go', ['test', '-count=1', '-v', './...']);
    assert.equal(r.code, 0, r.output);
    assert.match(r.output, /^ok\s+aeterna\.dev\/client/m, r.output);
    // The end-to-end tests ran (the daemon is built before `make test` runs the tests), not skipped: reloads,
    // and a kill -9 of the counter restored from its checkpoint (streamed and memfd); and so did these.
    for (const name of [
      'TestE2ECounterSurvivesReloadsThroughTheDaemon',
      'TestE2ECounterSurvivesKill9WithACheckpoint',
      'TestE2ECounterSurvivesKill9WithAMemfdCheckpoint',
      // Drain, and connection handoff over a real socket pair with real TCP connections.
      'TestDrainFinishesInFlightAnswersWithConnectionCloseAndClosesIdle',
      'TestDrainAnswersWithConnectionCloseAndLeavesNewConnectionsInTheBacklog',
      'TestHandoffMovesTCPConnectionsThatKeepWorking',
      'TestHandoffUnreadBytesComeFirst',
      'TestHandoffClientWritingDuringTheMoveLosesNothing',
      'TestHandoff1000ConnectionsMove',
      'TestHandoffMalformedFrameClosesItsFdsAndEndsTheChannel',
      'TestHandoffEndOfFileWithoutEndAdoptsWhatArrivedWhole',
      'TestHandoffNewGenerationAdoptsThroughTheRelay',
      'TestHandoffOldGenerationGetsTheChannelFromTheFinalDump',
      'TestHandoffUntakenChannelIsEndedByShutdown',
    ]) {
      assert.match(r.output, new RegExp(`^--- PASS: ${name}\\b`, 'm'), r.output);
    }
    // Every exchange of the conformance suite ran and passed, those that require the digest trailer or
    // checkpoints included (this SDK declares the trailer in its hello and implements Checkpoint); only those
    // that require direct or crc32 are skipped (its hello declares neither), each with its reason.
    const cases = (
      JSON.parse(fs.readFileSync(path.join(ROOT, 'test', 'conformance', 'exchanges.json'), 'utf8')) as {
        cases: { name: string; requires?: string[] }[];
      }
    ).cases;
    const passed = r.output.split('\n').filter((l) => /^ {4}--- PASS: TestConformanceExchanges\//.test(l));
    const skipped = r.output.split('\n').filter((l) => /^ {4}--- SKIP: TestConformanceExchanges\//.test(l));
    const undeclared = cases.filter((c) => (c.requires ?? []).some((r) => r === 'direct' || r === 'crc32'));
    assert.equal(passed.length, cases.length - undeclared.length, r.output);
    assert.equal(skipped.length, undeclared.length, r.output);
    assert.ok(undeclared.length > 0, 'the suite has direct and crc32 cases');
    assert.match(r.output, /requires direct: the Go SDK does not implement the direct transport/, 'a skip says why');
    assert.ok(
      cases.some((c) => c.requires?.includes('trailer')),
      'the suite has trailer cases',
    );
    assert.ok(
      cases.some((c) => c.requires?.includes('checkpoint')),
      'the suite has checkpoint cases',
    );
  });
});

// The CI version of `make soak` (bench/soak.ts, the same code): consecutive
// reloads of a real daemon under continuous HTTP load, then the state checks.
// Counts and states only; the long run's numbers go to bench/results/.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { runSoak, soakFailures } from '../../bench/soak';

const RELOADS = 25;

describe('soak (short CI version of make soak)', { timeout: 300000 }, () => {
  it(`${RELOADS} consecutive reloads under load with a 1 MiB state relayed each time, a checkpoint and an fd parked in the fd store every 3 reloads, and strangers at the state socket: zero failed requests, the state intact, the latest checkpoint and stored fd kept, fds and RSS flat, zero zombies, every record complete`, async () => {
    const r = await runSoak({ reloads: RELOADS, concurrency: 4, warmup: 10, stateBytes: 1 << 20, outsiders: 4 });
    console.log(
      `# soak: ${r.promoted}/${r.reloads} promoted, ${r.requests.ok} requests ok, ${r.requests.failed} failed; state ${r.state.bytes} bytes intact ${r.state.intact}; ` +
        `outsiders refused ${r.outsiders.refused}/${r.outsiders.sent}; checkpoints ${r.checkpoints.stored} (Aeterna holds seq ${r.checkpoints.atEnd}); ` +
        `fds parked ${r.fdstore.stored}, received by ${r.fdstore.received} later generations; ` +
        `fds ${r.fds.start} -> ${r.fds.end}; RSS ${r.rssKiB.start} -> ${r.rssKiB.end} KiB; zombies ${r.zombiesAtEnd}; pid1 ${r.pid1}`,
    );
    assert.equal(r.promoted, RELOADS);
    assert.equal(r.requests.failed, 0, JSON.stringify(r.requests.failures));
    assert.ok(r.requests.ok > RELOADS, `requests were served throughout (${r.requests.ok})`);
    assert.equal(r.state.intact, true, 'the 1 MiB state arrived intact after every reload');
    assert.equal(r.outsiders.refused, r.outsiders.sent, 'every stranger was refused');
    assert.equal(r.checkpoints.stored, Math.floor(RELOADS / 3));
    assert.equal(r.checkpoints.atEnd, r.checkpoints.lastSeq, "Aeterna holds the app's latest checkpoint");
    assert.equal(r.fdstore.stored, Math.floor(RELOADS / 3));
    assert.deepEqual(r.fdstore.namesAtEnd, [`soak-${r.fdstore.stored}`], 'one stored fd: each replaced the one before');
    assert.equal(r.fdstore.received, r.fdstore.stored - 1, 'every later generation received the stored fd');
    // Exactly equal: measured once the reload's own control connection has closed
    // (a reload's connection still closing would be the only legitimate +1).
    assert.equal(r.fds.end, r.fds.start, `fd count ${r.fds.start} -> ${r.fds.end}`);
    assert.ok(r.rssKiB.end - r.rssKiB.start < 20 * 1024, `RSS grew ${r.rssKiB.end - r.rssKiB.start} KiB`);
    assert.equal(r.zombiesAtEnd, 0);
    assert.ok(r.servingSeen, 'the leftover-process check sees the serving generation (it can fail)');
    assert.deepEqual(r.leftoverProcesses, [], 'every old generation is gone');
    assert.deepEqual(r.incomplete, [], 'every reload record is complete');
    assert.equal(r.daemonExitCode, 0);
    assert.deepEqual(soakFailures(r), []);
  });
});

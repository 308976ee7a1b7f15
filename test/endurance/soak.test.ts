// The CI version of `make soak` (bench/soak.ts, the same code): consecutive
// reloads of a real daemon under continuous HTTP load, then the state checks.
// Counts and states only; the long run's numbers go to bench/results/.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { memoryGrowthKiB, runSoak, soakFailures } from '../../bench/soak';

const RELOADS = 25;
/** The several-instances case: rolling reloads take longer, and a few cover a store and its hand-over. */
const SHORT = 8;

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
    const grown = memoryGrowthKiB(r);
    assert.ok(grown.outsideHeap < 20 * 1024, `RSS outside the V8 heap grew ${grown.outsideHeap} KiB`);
    assert.ok(grown.heapUsed < 20 * 1024, `the V8 heap in use grew ${grown.heapUsed} KiB`);
    assert.equal(r.zombiesAtEnd, 0);
    assert.ok(r.servingSeen, 'the leftover-process check sees the serving generation (it can fail)');
    assert.deepEqual(r.leftoverProcesses, [], 'every old generation is gone');
    assert.deepEqual(r.incomplete, [], 'every reload record is complete');
    assert.equal(r.daemonExitCode, 0);
    assert.deepEqual(soakFailures(r), []);
  });

  it(`${SHORT} consecutive rolling reloads (service.instances 2, max_surge 1, app_output json) under load, each instance relaying its own 1 MiB state, storing a checkpoint and parking an fd every 3 reloads: every instance answers with its own state, every line the app printed comes out whole and attributed to its process, none lost or doubled; zero failed requests, fds and RSS flat, zero zombies, every record complete`, async () => {
    const r = await runSoak({
      reloads: SHORT,
      concurrency: 4,
      warmup: 4,
      stateBytes: 1 << 20,
      outsiders: 2,
      instances: 2,
      maxSurge: 1,
      appOutput: 'json',
      lineEvery: 100,
    });
    const l = r.lines!;
    console.log(
      `# soak, 2 instances: ${r.promoted}/${r.reloads} promoted, ${r.requests.ok} requests ok, ${r.requests.failed} failed; ` +
        `instance states checked ${r.instanceState.checks} (wrong ${r.instanceState.wrong.length}), relayed loads ${r.stateLoads.ok}/${r.stateLoads.expected}; ` +
        `lines ${l.seen}/${l.printed} from ${l.processes} processes, broken ${l.broken}, misattributed ${l.misattributed}; ` +
        `checkpoints ${r.checkpoints.stored}, fds parked ${r.fdstore.stored} rounds, received ${r.fdstore.received}; ` +
        `fds ${r.fds.start} -> ${r.fds.end}; RSS ${r.rssKiB.start} -> ${r.rssKiB.end} KiB; zombies ${r.zombiesAtEnd}`,
    );
    assert.equal(r.promoted, SHORT);
    assert.deepEqual(r.incomplete, [], 'every record complete: spawned, relaying, relayed, ready once per instance');
    assert.equal(r.requests.failed, 0, JSON.stringify(r.requests.failures));
    // Each instance answered before every reload and at the end, with its own state.
    assert.equal(r.instanceState.checks, 2 * (SHORT + 1));
    assert.deepEqual(r.instanceState.wrong, []);
    assert.deepEqual(r.instanceState.unanswered, []);
    assert.deepEqual(r.stateLoads.wrong, [], "every new instance i loaded old instance i's state");
    assert.equal(r.stateLoads.ok, 2 * SHORT);
    assert.equal(r.state.intact, true);
    // The app's lines: every process of every generation, each line once, whole, attributed to its writer.
    assert.equal(l.processes, 2 * (SHORT + 1));
    assert.equal(l.incomplete, 0, JSON.stringify(l.incompleteExamples));
    assert.equal(l.broken, 0, JSON.stringify(l.brokenExamples));
    assert.equal(l.misattributed, 0);
    assert.ok(
      l.printed >= 3 * 2 * (SHORT + 1),
      `every process printed its state, ready and bye lines at least (${l.printed})`,
    );
    assert.equal(l.seen, l.printed, 'every line printed came out once');
    // One checkpoint per instance each time, the latest held; one fd per instance each time, each received.
    assert.equal(r.checkpoints.stored, 2 * Math.floor(SHORT / 3));
    if (r.checkpoints.atEndByInstance === null) assert.equal(r.checkpoints.atEnd, r.checkpoints.lastSeq);
    else assert.deepEqual(r.checkpoints.atEndByInstance, r.checkpoints.lastSeqByInstance);
    assert.deepEqual(r.fdstore.namesAtEndByInstance, [[`soak-${r.fdstore.stored}`], [`soak-${r.fdstore.stored}`]]);
    assert.equal(r.fdstore.received, 2 * (r.fdstore.stored - 1));
    assert.equal(r.fds.end, r.fds.start, `fd count ${r.fds.start} -> ${r.fds.end}`);
    const grown = memoryGrowthKiB(r);
    assert.ok(grown.outsideHeap < 20 * 1024, `RSS outside the V8 heap grew ${grown.outsideHeap} KiB`);
    assert.ok(grown.heapUsed < 20 * 1024, `the V8 heap in use grew ${grown.heapUsed} KiB`);
    assert.equal(r.zombiesAtEnd, 0);
    assert.ok(r.servingSeen);
    assert.deepEqual(r.leftoverProcesses, [], 'every old instance is gone');
    assert.equal(r.daemonExitCode, 0);
    assert.deepEqual(soakFailures(r), []);
  });
});

// The real Orchestrator driven through every row of the FSM's table, in milliseconds: its spawn, canary split and
// process ownership come in through OrchestratorDeps, so here the generations are fakes whose exits are promises
// the test resolves and whose readiness is a READY=1 the test sends; time is node:test's mock timers. What runs for
// real: the Orchestrator, its FSM, the readiness watch, the restart budget, the listener set (with no listeners).
// The daemon tests (reload, canary, faults, ...) check the same reactions with real processes and sockets.
import { afterEach, beforeEach, mock, test } from 'node:test';
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import pino from 'pino';
import { AeternaError } from '../../src/errors';
import { parseConfig } from '../../src/config/load';
import type { CanaryConfig, Config } from '../../src/config/types';
import type { ExitInfo } from '../../src/native/binding';
import type { Metrics } from '../../src/monitor/metrics';
import { ListenerSet } from '../../src/resources/listeners';
import { ListenerWatch } from '../../src/resources/listener-watch';
import type { NotifySocket } from '../../src/resources/notify';
import type { FdStore } from '../../src/resources/fd-store';
import type { Generation } from '../../src/supervisor/generation';
import type { Reaper } from '../../src/supervisor/reaper';
import { Orchestrator, type CanarySplit, type OrchestratorDeps } from '../../src/orchestrator/orchestrator';
import { EVENTS, STATES, TRANSITIONS, type Event, type State } from '../../src/orchestrator/fsm';
import type { StateRelay } from '../../src/orchestrator/relay';
import type { ReloadRecord } from '../../src/orchestrator/types';

const SIGKILL = 9;

/** A generation as the orchestrator sees one: its exit is a promise the test resolves; stop() only records the signal. */
class FakeGeneration {
  readonly pid: number;
  startedAt = new Date();
  exitInfo: ExitInfo | null = null;
  readonly exited: Promise<ExitInfo>;
  /** Signals the orchestrator sent: stop's (SIGTERM, SIGABRT), kill's SIGKILL, forwarded ones. */
  readonly signals: string[] = [];
  private resolveExit!: (info: ExitInfo) => void;
  private stopping = false;

  constructor(readonly number: number) {
    this.pid = 4_000_000 + number; // no such process: only the fakes' own ownership check ever sees it
    this.exited = new Promise<ExitInfo>((r) => (this.resolveExit = r)).then((info) => {
      this.exitInfo = info;
      return info;
    });
  }

  get alive(): boolean {
    return this.exitInfo === null;
  }

  /** The process exits: with `code`, or killed by signal `signal`. */
  exit(code: number | null = 0, signal: number | null = null): void {
    this.resolveExit({ pid: this.pid, code, signal });
  }

  /** As Generation.stop: idempotent, the first request's signal only. */
  stop(_timeoutMs: number, signal: NodeJS.Signals = 'SIGTERM'): Promise<ExitInfo> {
    if (this.alive && !this.stopping) this.signals.push(signal);
    this.stopping = true;
    return this.exited;
  }

  kill(): Promise<ExitInfo> {
    this.signals.push('SIGKILL');
    return this.exited;
  }

  signal(signal: NodeJS.Signals | number): void {
    this.signals.push(String(signal));
  }
}

/** The weighted split as the orchestrator drives it: the steering it was told, and how it ended. */
class FakeSplit implements CanarySplit {
  weight = 0;
  readonly steered: number[] = [];
  ended: 'promoted' | 'discarded' | null = null;
  readonly noMigration = null;
  constructor(readonly canary: CanaryConfig) {}
  candidateListeners(): [] {
    return [];
  }
  steer(percent: number): void {
    this.weight = percent;
    this.steered.push(percent);
  }
  async drained(): Promise<void> {}
  promote(): void {
    this.ended = 'promoted';
  }
  discard(): void {
    this.ended = 'discarded';
  }
}

/** A promise the test settles from outside (a relay or a final sync). */
function deferred<T>(): { promise: Promise<T>; resolve: (v: T) => void; reject: (e: Error) => void } {
  let resolve!: (v: T) => void;
  let reject!: (e: Error) => void;
  const promise = new Promise<T>((res, rej) => ((resolve = res), (reject = rej)));
  return { promise, resolve, reject };
}

/** The state relay as the orchestrator uses it (typed as StateRelay, so a change of that port shows here): each relay and final sync waits for the test. */
class FakeRelay implements StateRelay {
  readonly socketPath = '/run/aeterna/test-state.sock';
  readonly relays: Array<ReturnType<typeof deferred<{ bytes: number }>>> = [];
  readonly finalSyncs: Array<ReturnType<typeof deferred<{ bytes: number }>>> = [];
  watchReady(): () => void {
    return () => undefined;
  }
  attach(): void {}
  startOutcome(): void {}
  lastCheckpoint(): null {
    return null;
  }
  release(): void {}
  relay(): Promise<{ bytes: number }> {
    const d = deferred<{ bytes: number }>();
    this.relays.push(d);
    return d.promise;
  }
  restoreCheckpoint(): Promise<{ bytes: number }> {
    return Promise.reject(new Error('no checkpoint'));
  }
  finalSync(): Promise<{ bytes: number }> {
    const d = deferred<{ bytes: number }>();
    this.finalSyncs.push(d);
    return d.promise;
  }
  relaying(): boolean {
    return false;
  }
  async close(): Promise<void> {}
}

const BASE = parseConfig(
  [
    'version: v1',
    'service:',
    '  name: unit',
    '  command: ["/bin/app"]',
    '  stop_timeout: "5s"',
    '  restart:',
    '    policy: always',
    '    max_restarts: 2',
    '    window: "60s"',
    'orchestration:',
    '  strategy: immediate',
    '  soak_time: "10s"',
    '  readiness:',
    '    mode: notify',
    '    timeout: "30s"',
    '',
  ].join('\n'),
  '/etc/aeterna/unit.yaml',
);

function immediate(): Config {
  return BASE;
}

function canary(weight: number | null = 10): Config {
  return {
    ...BASE,
    orchestration: {
      ...BASE.orchestration,
      strategy: 'canary',
      canary: weight === null ? null : { weight, affinity: 'none' },
    },
  };
}

function withRelay(config: Config): Config {
  return {
    ...config,
    orchestration: { ...config.orchestration, stateHandoff: { ...config.orchestration.stateHandoff, enabled: true } },
  };
}

/** Every (state, event) row the cases below made the real Orchestrator take. */
const exercised = new Set<string>();

/** One Orchestrator with fake generations, split and relay; the config a reload reads is `next`. */
function harness(config: Config, opts: { relay?: boolean; logs?: boolean } = {}) {
  const logs: Array<{ level: number; msg: string; [key: string]: unknown }> = [];
  const log = opts.logs
    ? pino({ level: 'info' }, { write: (line: string) => logs.push(JSON.parse(line) as (typeof logs)[number]) })
    : pino({ level: 'silent' });
  const gens: FakeGeneration[] = [];
  const splits: FakeSplit[] = [];
  const records: ReloadRecord[] = [];
  const relay = opts.relay ? new FakeRelay() : null;
  const notify = Object.assign(new EventEmitter(), {
    address: '/run/aeterna/test-notify.sock',
    grant: () => undefined,
  });
  const listeners = new ListenerSet();
  const fdStore = { handled: [] as number[], refused: [] as number[] };
  const h = {
    next: config,
    fdStore,
    /** A datagram on the notify socket from `pid`. */
    notify(pid: number, fields: Record<string, string>): void {
      notify.emit('message', { pid, uid: 0, fields: new Map(Object.entries(fields)), takeFds: () => [] });
    },
    spawnFails: false,
    /** Aeterna's log lines, with opts.logs. */
    logs,
    gens,
    splits,
    records,
    relay,
    orchestrator: null as unknown as Orchestrator,
    /** READY=1 from the generation's own pid, as sd_notify sends it. */
    ready(gen: FakeGeneration): void {
      notify.emit('message', { pid: gen.pid, uid: 0, fields: new Map([['READY', '1']]), takeFds: () => [] });
    },
    get state(): State {
      return h.orchestrator.fsm.state;
    },
  };
  const deps: OrchestratorDeps = {
    log,
    // Every metric is a no-op here: the daemon tests read /metrics.
    metrics: new Proxy({}, { get: () => () => undefined }) as unknown as Metrics,
    reaper: {} as Reaper, // used by exec probes only; these cases run in notify mode
    listeners,
    listenerWatch: new ListenerWatch(listeners, () => undefined, log),
    notify: notify as unknown as NotifySocket,
    fdStore: {
      list: () => [],
      names: () => [],
      refuseStranger: (pid: number) => fdStore.refused.push(pid),
      handle: (_m: unknown, _max: number, generation: number) => fdStore.handled.push(generation),
      keepInstances: () => 0,
    } as unknown as FdStore,
    loadConfig: () => h.next,
    relay,
    spawn: (number) => {
      if (h.spawnFails) throw new AeternaError('E_SPAWN_FAILED', 'spawn "/bin/app": execve: No such file or directory');
      const gen = new FakeGeneration(number);
      gens.push(gen);
      return gen as unknown as Generation;
    },
    split: (_listeners, canaryConfig) => {
      const split = new FakeSplit(canaryConfig);
      splits.push(split);
      return split;
    },
    // A generation's processes here: its root, and root + 1000 (a worker it forked).
    belongsTo: (pid, root) => pid === root || pid === root + 1000,
    reloadSettled: (record) => records.push(record),
  };
  h.orchestrator = new Orchestrator(config, deps);
  h.orchestrator.fsm.onTransition((t) => exercised.add(`${t.from} --${t.event}-->`));
  return h;
}

/** Let promise callbacks run (the exits, the readiness, the relay): no time passes. */
async function settle(): Promise<void> {
  for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
}

/** Advance the mock clock by `ms` and let what it fired run. */
async function tick(ms: number): Promise<void> {
  mock.timers.tick(ms);
  await settle();
}

/** Start and wait for generation 1 to be ready: Running. */
async function running(config: Config, opts: { relay?: boolean; logs?: boolean } = {}) {
  const h = harness(config, opts);
  const stopped = h.orchestrator.run();
  await settle();
  assert.equal(h.state, 'Starting');
  assert.equal(h.gens.length, 1);
  h.ready(h.gens[0]);
  await settle();
  assert.equal(h.state, 'Running');
  return { h, stopped };
}

/** Stop and let every live generation exit as SIGTERM asks: resolves with Aeterna's exit code. */
async function stopAll(h: ReturnType<typeof harness>, stopped: Promise<number>): Promise<number> {
  h.orchestrator.stop('test over');
  await settle();
  for (const g of h.gens) if (g.alive) g.exit(0);
  await settle();
  assert.equal(h.state, 'Stopped');
  return stopped;
}

beforeEach(() => mock.timers.enable({ apis: ['setTimeout', 'setInterval'] }));
afterEach(() => mock.timers.reset());

test('start: generation 1 is spawned, READY=1 makes it Running; stop sends SIGTERM and ends with its exit code', async () => {
  const { h, stopped } = await running(immediate());
  assert.equal(h.orchestrator.status().generation, 1);
  h.orchestrator.stop('SIGTERM');
  await settle();
  assert.equal(h.state, 'Stopping');
  assert.deepEqual(h.gens[0].signals, ['SIGTERM']);
  h.gens[0].exit(0);
  await settle();
  assert.equal(h.state, 'Stopped');
  assert.equal(await stopped, 0);
});

test('start: an app that cannot be spawned stops Aeterna with 127', async () => {
  const h = harness(immediate());
  h.spawnFails = true;
  const code = await h.orchestrator.run();
  assert.equal(h.state, 'Stopped');
  assert.equal(code, 127);
});

test('a second stop request kills every generation at once', async () => {
  const { h, stopped } = await running(immediate());
  h.orchestrator.stop('first');
  h.orchestrator.stop('second');
  await settle();
  assert.deepEqual(h.gens[0].signals, ['SIGTERM', 'SIGKILL']);
  h.gens[0].exit(null, SIGKILL);
  await settle();
  assert.equal(h.state, 'Stopped');
  assert.equal(await stopped, 128 + SIGKILL);
});

test("FDSTORE=1 is taken from a process of a generation only: a stranger's fds are refused", async () => {
  const { h, stopped } = await running(immediate());
  const gen = h.gens[0];
  h.notify(gen.pid + 1000, { FDSTORE: '1', FDNAME: 'conn' });
  h.notify(gen.pid + 1, { FDSTORE: '1', FDNAME: 'conn' });
  h.notify(gen.pid + 1000, { STATUS: 'busy' }); // not about the fd store
  assert.deepEqual(h.fdStore.handled, [1]);
  assert.deepEqual(h.fdStore.refused, [gen.pid + 1]);
  assert.equal(await stopAll(h, stopped), 0);
});

test('an immediate reload whose new generation is ready is promoted; the old one is drained', async () => {
  const { h, stopped } = await running(immediate());
  const done = h.orchestrator.reload('control');
  await settle();
  assert.equal(h.state, 'Handover');
  assert.equal(h.gens.length, 2);
  const [old, next] = h.gens;
  h.ready(next);
  const record = await done;
  assert.equal(h.state, 'Running');
  assert.equal(record.outcome, 'promoted');
  assert.equal(record.to_generation, 2);
  assert.deepEqual(old.signals, ['SIGTERM']);
  assert.deepEqual(next.signals, []);
  assert.equal(h.orchestrator.status().generation, 2);
  old.exit(0);
  await settle();
  assert.deepEqual(h.orchestrator.status().retiring, [], 'the old generation was drained');
  assert.equal(await stopAll(h, stopped), 0);
});

test('a promoted reload is answered before its old generation exits: it retires with SIGTERM, and status lists it', async () => {
  const { h, stopped } = await running(immediate());
  const done = h.orchestrator.reload('control');
  await settle();
  const [old, next] = h.gens;
  h.ready(next);
  const record = await done;
  assert.equal(record.outcome, 'promoted');
  assert.equal(h.state, 'Running');
  assert.ok(old.alive, 'the reload was answered while the old generation is alive');
  assert.deepEqual(old.signals, ['SIGTERM']);
  assert.ok(
    record.serving_since !== null && record.serving_since !== undefined,
    'the record says since when it serves',
  );
  assert.deepEqual(
    record.retiring?.map((r) => [r.generation, r.pid]),
    [[1, old.pid]],
  );
  const retiring = h.orchestrator.status().retiring;
  assert.equal(retiring.length, 1);
  assert.equal(retiring[0].generation, 1);
  assert.equal(retiring[0].pid, old.pid);
  // stop_timeout is 5s: SIGKILL is due 5s after SIGTERM.
  assert.equal(Date.parse(retiring[0].kill_deadline) - Date.parse(retiring[0].draining_since), 5000);
  assert.equal(h.orchestrator.status().pid, next.pid);
  assert.equal(h.orchestrator.status().previous, null, 'no reload runs: nothing is "previous"');
  old.exit(0);
  await settle();
  assert.deepEqual(h.orchestrator.status().retiring, []);
  assert.equal(await stopAll(h, stopped), 0);
});

test("a retiring generation's exit is no crash: whatever its exit, nothing restarts and no restart is counted", async () => {
  const { h, stopped } = await running(immediate()); // max_restarts: 2
  for (let i = 1; i <= 3; i++) {
    const done = h.orchestrator.reload('control');
    await settle();
    h.ready(h.gens[i]);
    assert.equal((await done).outcome, 'promoted');
  }
  // Three old generations die badly (the bound killed none: it keeps 1 serving + 1 retiring + 1 new).
  for (const [i, code, signal] of [
    [0, null, SIGKILL],
    [1, 1, null],
    [2, null, 11],
  ] as const)
    h.gens[i].exit(code, signal);
  await settle();
  await tick(10_000);
  assert.equal(h.state, 'Running');
  assert.equal(h.gens.length, 4, 'nothing was started');
  assert.equal(h.orchestrator.status().restarts, 0);
  assert.equal(h.orchestrator.status().generation, 4);
  assert.deepEqual(h.orchestrator.status().retiring, []);
  assert.deepEqual(h.gens[3].signals, [], 'the serving generation was not touched');
  assert.equal(await stopAll(h, stopped), 0);
});

test('a second reload while the old generation of the first still drains is accepted and promoted', async () => {
  const { h, stopped } = await running(immediate());
  let done = h.orchestrator.reload('control');
  await settle();
  h.ready(h.gens[1]);
  assert.equal((await done).outcome, 'promoted');
  assert.ok(h.gens[0].alive);
  done = h.orchestrator.reload('control');
  await settle();
  assert.equal(h.state, 'Handover');
  h.ready(h.gens[2]);
  const record = await done;
  assert.equal(record.outcome, 'promoted');
  assert.equal(record.to_generation, 3);
  assert.deepEqual(
    record.retiring?.map((r) => r.generation),
    [1, 2],
  );
  assert.deepEqual(
    h.gens.map((g) => g.signals),
    [['SIGTERM'], ['SIGTERM'], []],
  );
  assert.deepEqual(
    h.orchestrator.status().retiring.map((r) => r.generation),
    [1, 2],
  );
  assert.equal(await stopAll(h, stopped), 0);
});

test('max_generations: a reload that would exceed it kills the oldest retiring generation at once, never the serving one', async () => {
  const { h, stopped } = await running(immediate(), { logs: true }); // max_generations: 3 (the default)
  for (let i = 1; i <= 2; i++) {
    const done = h.orchestrator.reload('control');
    await settle();
    h.ready(h.gens[i]);
    assert.equal((await done).outcome, 'promoted');
  }
  assert.deepEqual(
    h.orchestrator.status().retiring.map((r) => r.generation),
    [1, 2],
  );
  // Serving 3, retiring 1 and 2, and a new one: 4 > 3.
  const done = h.orchestrator.reload('control');
  await settle();
  assert.equal(h.state, 'Handover');
  assert.deepEqual(h.gens[0].signals, ['SIGTERM', 'SIGKILL'], 'the oldest retiring one is killed');
  assert.deepEqual(h.gens[1].signals, ['SIGTERM'], 'the younger one drains on');
  assert.deepEqual(h.gens[2].signals, [], 'the serving one is never killed to make room');
  const warned = h.logs.filter((l) => l.level === 40 && /^killing retiring generation/.test(l.msg));
  assert.equal(warned.length, 1);
  assert.match(
    warned[0].msg,
    new RegExp(
      `^killing retiring generation 1 \\(pid ${h.gens[0].pid}\\) after \\d.*s of draining: orchestration\\.max_generations is 3`,
    ),
  );
  assert.equal(warned[0].generation, 1);
  assert.equal(typeof warned[0].drained_ms, 'number', 'how long it drained');
  h.gens[0].exit(null, SIGKILL);
  h.ready(h.gens[3]);
  assert.equal((await done).outcome, 'promoted');
  assert.deepEqual(
    h.orchestrator.status().retiring.map((r) => r.generation),
    [2, 3],
  );

  // max_generations: 2 leaves no room for any: both retiring ones are killed.
  h.next = { ...immediate(), orchestration: { ...immediate().orchestration, maxGenerations: 2 } };
  const second = h.orchestrator.reload('control');
  await settle();
  assert.deepEqual(h.gens[1].signals, ['SIGTERM', 'SIGKILL']);
  assert.deepEqual(h.gens[2].signals, ['SIGTERM', 'SIGKILL']);
  assert.deepEqual(h.gens[3].signals, []);
  h.ready(h.gens[4]);
  assert.equal((await second).outcome, 'promoted');
  assert.equal(await stopAll(h, stopped), 0);
});

test('stop stops the retiring generations too: Aeterna has stopped only once they have exited', async () => {
  const { h, stopped } = await running(immediate());
  const done = h.orchestrator.reload('control');
  await settle();
  const [old, next] = h.gens;
  h.ready(next);
  assert.equal((await done).outcome, 'promoted');
  h.orchestrator.stop('SIGTERM');
  await settle();
  assert.equal(h.state, 'Stopping');
  assert.deepEqual(next.signals, ['SIGTERM']);
  assert.deepEqual(old.signals, ['SIGTERM'], 'it already had its SIGTERM; its SIGKILL deadline stands');
  next.exit(0);
  await settle();
  assert.equal(h.state, 'Stopping', 'the retiring generation is still alive');
  h.orchestrator.stop('second SIGTERM');
  await settle();
  assert.deepEqual(old.signals, ['SIGTERM', 'SIGKILL'], 'a second stop request kills it at once');
  old.exit(null, SIGKILL);
  await settle();
  assert.equal(h.state, 'Stopped');
  assert.equal(await stopped, 0, "the serving generation's exit code, not the killed old one's");
});

test('while a retiring generation drains, what the orchestrator carries lists it as retiring beside the serving one, with its SIGKILL deadline', async () => {
  const { h, stopped } = await running(immediate());
  let changed = 0;
  h.orchestrator.onCarryChanged(() => changed++);
  assert.equal(h.orchestrator.carry().part.generations.length, 1);
  const done = h.orchestrator.reload('control');
  await settle();
  h.ready(h.gens[1]);
  await done;
  const carried = h.orchestrator.carry().part.generations;
  assert.deepEqual(
    carried.map((g) => [g.number, g.state]),
    [
      [2, 'serving'],
      [1, 'retiring'],
    ],
  );
  const retiring = carried[1];
  assert.equal(typeof retiring.draining_since, 'string');
  assert.equal(
    Date.parse(retiring.kill_deadline!) - Date.parse(retiring.draining_since!),
    h.orchestrator.stopTimeoutMs,
    'SIGKILL at its stop_timeout after its SIGTERM',
  );
  h.gens[0].exit(0);
  await settle();
  assert.equal(changed, 1, 'its exit says that what is carried changed');
  assert.deepEqual(
    h.orchestrator.carry().part.generations.map((g) => g.number),
    [2],
  );
  assert.equal(await stopAll(h, stopped), 0);
});

test('a reload whose new generation never becomes ready is rolled back; the old one keeps serving', async () => {
  const { h, stopped } = await running(immediate());
  const done = h.orchestrator.reload('control');
  await settle();
  const [old, next] = h.gens;
  await tick(30_000 - 1);
  assert.equal(h.state, 'Handover');
  await tick(1);
  assert.equal(h.state, 'RollingBack');
  assert.deepEqual(next.signals, ['SIGTERM']);
  next.exit(0);
  const record = await done;
  assert.equal(h.state, 'Running');
  assert.equal(record.outcome, 'rolled_back');
  assert.equal(record.code, 'E_READY_TIMEOUT');
  assert.deepEqual(old.signals, []);
  assert.equal(h.orchestrator.status().generation, 1);
  assert.equal(await stopAll(h, stopped), 0);
});

test('a reload whose new generation cannot be spawned fails at once; the old one keeps serving', async () => {
  const { h, stopped } = await running(immediate());
  h.spawnFails = true;
  const record = await h.orchestrator.reload('control');
  assert.equal(record.outcome, 'failed');
  assert.equal(record.code, 'E_SPAWN_FAILED');
  assert.equal(h.state, 'Running');
  assert.equal(h.gens.length, 1);
  assert.equal(await stopAll(h, stopped), 0);
});

test('a reload whose new generation exits before it is ready is rolled back', async () => {
  const { h, stopped } = await running(immediate());
  const done = h.orchestrator.reload('control');
  await settle();
  h.gens[1].exit(3);
  const record = await done;
  assert.equal(record.outcome, 'rolled_back');
  assert.equal(record.code, 'E_CHILD_EXITED');
  assert.equal(h.state, 'Running');
  assert.deepEqual(h.gens[0].signals, []);
  assert.equal(await stopAll(h, stopped), 0);
});

test('the old generation dies during the handover: the new one is promoted once ready', async () => {
  const { h, stopped } = await running(immediate());
  const done = h.orchestrator.reload('control');
  await settle();
  const [old, next] = h.gens;
  old.exit(1);
  await settle();
  assert.equal(h.state, 'Handover');
  h.ready(next);
  const record = await done;
  assert.equal(record.outcome, 'promoted');
  assert.equal(h.state, 'Running');
  assert.equal(h.orchestrator.status().generation, 2);
  assert.equal(await stopAll(h, stopped), 0);
});

test('a canary soak that lasts soak_time is promoted: weight, then every new connection to the new generation', async () => {
  const { h, stopped } = await running(canary(10));
  const done = h.orchestrator.reload('control');
  await settle();
  const [old, next] = h.gens;
  h.ready(next);
  await settle();
  assert.equal(h.state, 'Soaking');
  const split = h.splits[0];
  assert.deepEqual(split.steered, [10]);
  assert.equal(h.orchestrator.status().canary_weight, 10);
  await tick(10_000 - 1);
  assert.equal(h.state, 'Soaking');
  await tick(1);
  const record = await done;
  assert.deepEqual(split.steered, [10, 100]);
  assert.deepEqual(old.signals, ['SIGTERM']);
  assert.equal(record.outcome, 'promoted');
  assert.equal(split.ended, 'promoted');
  assert.equal(h.state, 'Running');
  old.exit(0);
  assert.equal(await stopAll(h, stopped), 0);
});

test('a canary whose new generation crashes during the soak is rolled back: every new connection back to the old one', async () => {
  const { h, stopped } = await running(canary(10));
  const done = h.orchestrator.reload('control');
  await settle();
  const [old, next] = h.gens;
  h.ready(next);
  await settle();
  assert.equal(h.state, 'Soaking');
  next.exit(null, 11);
  const record = await done;
  assert.equal(record.outcome, 'rolled_back');
  assert.equal(record.code, 'E_CHILD_EXITED');
  assert.match(record.reason ?? '', /during soak/);
  const split = h.splits[0];
  assert.deepEqual(split.steered, [10, 0]);
  assert.equal(split.ended, 'discarded');
  assert.deepEqual(old.signals, []);
  assert.equal(h.state, 'Running');
  assert.equal(await stopAll(h, stopped), 0);
});

test('aeterna rollback during a soak stops the new generation; aeterna promote drains the old one', async () => {
  const { h, stopped } = await running(canary(null));
  let done = h.orchestrator.reload('control');
  await settle();
  h.ready(h.gens[1]);
  await settle();
  h.orchestrator.rollback();
  await settle();
  assert.equal(h.state, 'RollingBack');
  assert.deepEqual(h.gens[1].signals, ['SIGTERM']);
  h.gens[1].exit(0);
  let record = await done;
  assert.equal(record.code, 'E_OPERATOR_ROLLBACK');
  assert.equal(h.state, 'Running');

  done = h.orchestrator.reload('control');
  await settle();
  h.ready(h.gens[2]);
  await settle();
  h.orchestrator.promote();
  record = await done;
  assert.equal(record.outcome, 'promoted');
  assert.deepEqual(h.gens[0].signals, ['SIGTERM']);
  assert.equal(h.orchestrator.status().generation, 3);
  assert.equal(await stopAll(h, stopped), 0);
});

test('the old generation dies during a soak: the new one is promoted at once', async () => {
  const { h, stopped } = await running(canary(10));
  const done = h.orchestrator.reload('control');
  await settle();
  h.ready(h.gens[1]);
  await settle();
  h.gens[0].exit(1);
  const record = await done;
  assert.equal(record.outcome, 'promoted');
  assert.equal(h.state, 'Running');
  assert.equal(h.orchestrator.status().generation, 2);
  assert.equal(await stopAll(h, stopped), 0);
});

test('the new generation dies while the promotion settles (final sync): it is restarted once it has', async () => {
  const { h, stopped } = await running(withRelay(immediate()), { relay: true });
  const done = h.orchestrator.reload('control');
  await settle();
  const [old, next] = h.gens;
  h.relay!.relays[0].resolve({ bytes: 1 });
  h.ready(next);
  await settle();
  assert.equal(h.state, 'Draining');
  next.exit(2);
  await settle();
  assert.equal(h.state, 'Draining');
  h.relay!.finalSyncs[0].reject(new Error('generation 2 died'));
  const record = await done;
  assert.equal(record.outcome, 'promoted');
  await settle();
  assert.equal(h.state, 'Starting'); // the promoted one is dead: restart after the first backoff
  assert.ok(old.alive, 'the old one drains on, and serves no one new');
  await tick(100);
  assert.equal(h.gens.length, 3);
  h.ready(h.gens[2]);
  await settle();
  assert.equal(h.state, 'Running');
  assert.equal(await stopAll(h, stopped), 0);
});

test('the old generation dies during a rollback: it is restarted once the rollback is done', async () => {
  const { h, stopped } = await running(canary(10));
  const done = h.orchestrator.reload('control');
  await settle();
  const [old, next] = h.gens;
  h.ready(next);
  await settle();
  h.orchestrator.rollback();
  await settle();
  old.exit(1);
  await settle();
  assert.equal(h.state, 'RollingBack');
  next.exit(0);
  const record = await done;
  assert.equal(record.outcome, 'rolled_back');
  await settle();
  assert.equal(h.state, 'Starting');
  await tick(100);
  assert.equal(h.gens.length, 3);
  h.ready(h.gens[2]);
  await settle();
  assert.equal(h.state, 'Running');
  assert.equal(await stopAll(h, stopped), 0);
});

test('a crash is restarted with exponential backoff; one more than max_restarts in the window is a crash loop', async () => {
  const { h, stopped } = await running(immediate()); // max_restarts: 2
  h.gens[0].exit(1);
  await settle();
  assert.equal(h.state, 'Starting');
  await tick(99);
  assert.equal(h.gens.length, 1);
  await tick(1); // 100ms: the first backoff
  assert.equal(h.gens.length, 2);
  h.gens[1].exit(1); // crashes again before it is ready
  await settle();
  assert.equal(h.state, 'Starting');
  await tick(199);
  assert.equal(h.gens.length, 2);
  await tick(1); // 200ms: the second
  assert.equal(h.gens.length, 3);
  h.gens[2].exit(4);
  await settle();
  assert.equal(h.state, 'Stopped');
  assert.equal(h.gens.length, 3);
  assert.equal(await stopped, 4);
  assert.equal(h.orchestrator.status().restarts, 2);
});

test('a generation that never becomes ready at start is stopped, and restarted as a failure', async () => {
  const h = harness(immediate());
  const stopped = h.orchestrator.run();
  await settle();
  await tick(30_000);
  assert.equal(h.state, 'Starting');
  assert.deepEqual(h.gens[0].signals, ['SIGTERM']);
  h.gens[0].exit(0); // exits 0 after SIGTERM: still a failure, never ready
  await settle();
  await tick(100);
  assert.equal(h.gens.length, 2);
  h.ready(h.gens[1]);
  await settle();
  assert.equal(h.state, 'Running');
  assert.equal(await stopAll(h, stopped), 0);
});

test('stop during a handover, a soak, a drain or a rollback fails the reload and stops every generation', async () => {
  for (const at of ['Handover', 'Soaking', 'Draining', 'RollingBack'] as const) {
    // With the relay: the final sync keeps the promotion in Draining until it settles.
    const { h, stopped } = await running(withRelay(canary(10)), { relay: true });
    const done = h.orchestrator.reload('control');
    await settle();
    if (at !== 'Handover') {
      h.relay!.relays[0].resolve({ bytes: 1 });
      h.ready(h.gens[1]);
    }
    await settle();
    if (at === 'Draining') h.orchestrator.promote();
    if (at === 'RollingBack') h.orchestrator.rollback();
    await settle();
    assert.equal(h.state, at);
    h.orchestrator.stop('SIGTERM');
    const record = await done;
    assert.equal(record.outcome, 'failed');
    assert.equal(record.code, 'E_STOPPED');
    assert.equal(h.state, 'Stopping');
    for (const g of h.gens) assert.deepEqual(g.signals, ['SIGTERM'], `${at}: generation ${g.number}`);
    assert.equal(await stopAll(h, stopped), 0);
  }
});

test('with the state relay: the new generation is promoted once relayed and ready; the final sync is awaited in Draining', async () => {
  const { h, stopped } = await running(withRelay(immediate()), { relay: true });
  const done = h.orchestrator.reload('control');
  await settle();
  const [old, next] = h.gens;
  h.ready(next);
  await settle();
  assert.equal(h.state, 'Handover'); // ready, but the state has not arrived
  h.relay!.relays[0].resolve({ bytes: 42 });
  await settle();
  assert.equal(h.state, 'Draining');
  assert.equal(h.relay!.finalSyncs.length, 1);
  assert.deepEqual(old.signals, ['SIGTERM']);
  let answered = false;
  void done.then(() => (answered = true));
  await settle();
  assert.equal(answered, false, 'the reload waits for the final sync');
  h.relay!.finalSyncs[0].resolve({ bytes: 7 });
  const record = await done;
  assert.equal(h.state, 'Running');
  assert.equal(record.outcome, 'promoted');
  assert.ok(record.phases.some((p) => p.phase === 'relayed'));
  assert.ok(old.alive, 'but not for the old generation to exit');
  assert.equal(await stopAll(h, stopped), 0);
});

test('with the state relay: a failed relay rolls back; a lost final sync leaves the promotion standing', async () => {
  const { h, stopped } = await running(withRelay(immediate()), { relay: true });
  let done = h.orchestrator.reload('control');
  await settle();
  h.relay!.relays[0].reject(new Error('nack'));
  await settle();
  assert.equal(h.state, 'RollingBack');
  h.gens[1].exit(0);
  let record = await done;
  assert.equal(record.code, 'E_RELAY_FAILED');
  assert.equal(h.state, 'Running');

  done = h.orchestrator.reload('control');
  await settle();
  h.relay!.relays[1].resolve({ bytes: 1 });
  h.ready(h.gens[2]);
  await settle();
  assert.equal(h.state, 'Draining');
  h.relay!.finalSyncs[0].reject(new Error('timed out'));
  record = await done;
  assert.equal(record.outcome, 'promoted');
  assert.equal(h.state, 'Running');
  assert.ok(h.gens[0].alive);
  assert.equal(await stopAll(h, stopped), 0);
});

test('with the state relay: the old generation exits during the final sync: the promotion is over at once', async () => {
  const { h, stopped } = await running(withRelay(immediate()), { relay: true });
  const done = h.orchestrator.reload('control');
  await settle();
  h.relay!.relays[0].resolve({ bytes: 1 });
  h.ready(h.gens[1]);
  await settle();
  assert.equal(h.state, 'Draining');
  h.gens[0].exit(0);
  const record = await done;
  assert.equal(record.outcome, 'promoted');
  assert.deepEqual(record.retiring, []);
  assert.equal(h.state, 'Running');
  h.relay!.finalSyncs[0].reject(new Error('generation 1 died during the relay'));
  await settle();
  assert.equal(h.state, 'Running', 'the late end of its final sync changes nothing');
  assert.equal(await stopAll(h, stopped), 0);
});

// Runs last (a file's tests run in order): every legal row of the table, as "State --event-->", was taken above.
test('every row of the FSM table is exercised by the cases above', () => {
  const rows: string[] = [];
  for (const s of STATES)
    for (const e of EVENTS as readonly Event[]) if (TRANSITIONS[s][e] !== null) rows.push(`${s} --${e}-->`);
  const missing = rows.filter((r) => !exercised.has(r));
  assert.deepEqual(missing, [], `rows of TRANSITIONS no case exercised: ${missing.join(', ')}`);
});

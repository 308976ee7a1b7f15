// Prometheus metrics (prom-client) and the HTTP endpoint that serves them with
// the Kubernetes probes. Only counts, states and durations are exported: never
// the environment, the command line or the app's state.
import http from 'node:http';
import type net from 'node:net';
import type { Counter, Gauge, Histogram, Registry } from 'prom-client';
import { AeternaError } from '../errors';
import { native } from '../native/binding';
import type { Logger } from '../log';
import { ConnectionPool, connectionBudget } from '../resources/fd-budget';

/** Connections the endpoint holds at once when the fd limit allows it. */
const PREFERRED_MAX_CONNECTIONS = 64;
/** The endpoint's share of the fds left (after the control socket took its share) beyond the reserve. */
const METRICS_FD_SHARE = 0.5;
/** A probe sends its request at once: a connection without complete headers by then is cut (checked every second). */
const HEADERS_TIMEOUT_MS = 5000;

/** What each live generation uses, for the aeterna_app_* series (read at each scrape). */
export interface AppUsage {
  generation: number;
  memory_bytes?: number | null;
  memory_peak_bytes?: number | null;
  cpu_seconds?: number | null;
}

/** The prom-client side: created only when the endpoint is on, and after the app was spawned. */
/** What the checkpoint gauges show: the latest checkpoint's size and age. */
/** What the aeterna_instance* series show of one instance of the serving generation (its status entry). */
export interface InstanceFigures {
  instance: number;
  pid: number | null;
  state: string;
  ready: boolean;
  restarts: number;
}

export interface LatestCheckpoint {
  size: number;
  age_ms: number;
}

class Exported {
  readonly registry: Registry;
  readonly reloads: Counter<'strategy' | 'result'>;
  readonly reloadDuration: Histogram;
  readonly generation: Gauge;
  readonly retiring: Gauge;
  readonly retiringKilled: Counter;
  readonly canaryWeight: Gauge;
  readonly state: Gauge<'state'>;
  readonly childRestarts: Counter<'reason'>;
  readonly zombiesReaped: Counter;
  readonly handoffBytes: Counter;
  readonly handoffDuration: Histogram;
  readonly listenerRepairs: Counter<'listener' | 'result'>;
  readonly fdstoreFds: Gauge;
  readonly watchdogTimeouts: Counter;
  readonly reexecs: Counter<'reason'>;
  readonly checkpoints: Counter<'result'>;

  /**
   * `latestCheckpoint`: the checkpoint Aeterna holds now (however it got it: stored, read from its file, handed over),
   * `instances`: how many instances of the serving generation are in each state, `appUsage`: the live generations'
   * memory and CPU; each read at each scrape.
   */
  constructor(
    latestCheckpoint: () => LatestCheckpoint | null,
    instances: () => readonly InstanceFigures[],
    appUsage: () => AppUsage[] = () => [],
  ) {
    // Loaded here, not at the top: prom-client takes tens of milliseconds to load, and
    // `aeterna start` should exec the app first (start-to-exec is one of Aeterna's targets).
    // eslint-disable-next-line @typescript-eslint/no-require-imports -- the lazy load above
    const prom = require('prom-client') as typeof import('prom-client');
    const registers = [(this.registry = new prom.Registry())];
    this.reloads = new prom.Counter({
      name: 'aeterna_reloads_total',
      help: 'Reloads by strategy and result (promoted, rolled_back, failed)',
      labelNames: ['strategy', 'result'] as const,
      registers,
    });
    this.reloadDuration = new prom.Histogram({
      name: 'aeterna_reload_duration_seconds',
      help: 'Time from a reload request to its outcome',
      buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300],
      registers,
    });
    this.generation = new prom.Gauge({
      name: 'aeterna_generation',
      help: 'Number of the generation that serves',
      registers,
    });
    this.retiring = new prom.Gauge({
      name: 'aeterna_retiring_generations',
      help: 'Old generations of promoted reloads still draining in the background',
      registers,
    });
    this.retiringKilled = new prom.Counter({
      name: 'aeterna_retiring_killed_total',
      help: 'Draining old generations killed (SIGKILL) to make room for a new one (orchestration.max_generations)',
      registers,
    });
    this.canaryWeight = new prom.Gauge({
      name: 'aeterna_canary_weight',
      help: 'Percentage of new connections steered to the new generation during a weighted canary soak; 0 outside one',
      registers,
    });
    this.state = new prom.Gauge({
      name: 'aeterna_state',
      help: 'The orchestrator state: 1 for the current one, 0 for the others',
      labelNames: ['state'] as const,
      registers,
    });
    this.childRestarts = new prom.Counter({
      name: 'aeterna_child_restarts_total',
      help: 'Restarts of the app outside a reload, by reason',
      labelNames: ['reason'] as const,
      registers,
    });
    this.zombiesReaped = new prom.Counter({
      name: 'aeterna_zombies_reaped_total',
      help: 'Orphaned processes reaped by Aeterna',
      registers,
    });
    this.handoffBytes = new prom.Counter({
      name: 'aeterna_state_handoff_bytes_total',
      help: 'Bytes of app state relayed between generations',
      registers,
    });
    this.handoffDuration = new prom.Histogram({
      name: 'aeterna_state_handoff_duration_seconds',
      help: 'Time from the dump request to the new generation acknowledging the state',
      buckets: [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30],
      registers,
    });
    this.listenerRepairs = new prom.Counter({
      name: 'aeterna_listener_repairs_total',
      help: 'Listeners found broken (an app shut its socket down), by listener and what repairing did (relistened, rebound, failed)',
      labelNames: ['listener', 'result'] as const,
      registers,
    });
    this.fdstoreFds = new prom.Gauge({
      name: 'aeterna_fdstore_fds',
      help: 'Fds the app parked in the fd store (FDSTORE=1)',
      registers,
    });
    this.watchdogTimeouts = new prom.Counter({
      name: 'aeterna_watchdog_timeouts_total',
      help: 'Generations the watchdog fired on (no WATCHDOG=1 in time, or WATCHDOG=trigger)',
      registers,
    });
    this.reexecs = new prom.Counter({
      name: 'aeterna_reexecs_total',
      help: 'Times Aeterna re-executed itself in place since the container started, by reason (upgrade, exception, signal)',
      labelNames: ['reason'] as const,
      registers,
    });
    this.checkpoints = new prom.Counter({
      name: 'aeterna_checkpoints_total',
      help:
        'Checkpoints the app sent, by result (stored, or why refused: too_large, checksum_mismatch, bad_state, ' +
        'disabled, write_failed, cut_short; set_aside: one the app could not load, set aside)',
      labelNames: ['result'] as const,
      registers,
    });
    new prom.Gauge({
      name: 'aeterna_checkpoint_bytes',
      help: 'Size of the latest stored checkpoint',
      registers,
      collect() {
        this.set(latestCheckpoint()?.size ?? 0);
      },
    });
    new prom.Gauge({
      name: 'aeterna_checkpoint_age_seconds',
      help: 'Age of the latest stored checkpoint (absent until one is stored)',
      registers,
      collect() {
        const latest = latestCheckpoint();
        if (latest === null) this.reset();
        else this.set(latest.age_ms / 1000);
      },
    });
    new prom.Gauge({
      name: 'aeterna_instances',
      help: 'Instances of the serving generation (service.instances) by state: starting, ready, restarting, exited, pending',
      labelNames: ['state'] as const,
      registers,
      collect() {
        this.reset();
        const counts = new Map<string, number>();
        for (const i of instances()) counts.set(i.state, (counts.get(i.state) ?? 0) + 1);
        for (const [state, count] of counts) this.set({ state }, count);
      },
    });
    // Each instance of the serving generation, as pm2 lists its processes: its pid and state (an info series,
    // always 1), whether it is ready, and how often its slot was restarted alone.
    new prom.Gauge({
      name: 'aeterna_instance_info',
      help: 'Each instance of the serving generation: its pid ("" while it has no process) and state; always 1',
      labelNames: ['instance', 'pid', 'state'] as const,
      registers,
      collect() {
        this.reset();
        for (const i of instances())
          this.set({ instance: String(i.instance), pid: String(i.pid ?? ''), state: i.state }, 1);
      },
    });
    new prom.Gauge({
      name: 'aeterna_instance_ready',
      help: 'Whether each instance of the serving generation is ready (1) or not (0)',
      labelNames: ['instance'] as const,
      registers,
      collect() {
        this.reset();
        for (const i of instances()) this.set({ instance: String(i.instance) }, i.ready ? 1 : 0);
      },
    });
    new prom.Counter({
      name: 'aeterna_instance_restarts_total',
      help: 'Restarts of each instance alone (after it exited between reloads) since Aeterna started',
      labelNames: ['instance'] as const,
      registers,
      collect() {
        this.reset();
        for (const i of instances()) this.inc({ instance: String(i.instance) }, i.restarts);
      },
    });
    // The live generations' memory and CPU, labelled by generation: a generation's series go when it has exited.
    let usage: { at: number; list: AppUsage[] } = { at: 0, list: [] };
    /** Read once for the three series of one scrape (they are collected one after the other). */
    const current = (): AppUsage[] => {
      if (performance.now() - usage.at > 100) usage = { at: performance.now(), list: appUsage() };
      return usage.list;
    };
    const series = (name: string, help: string, figure: (u: AppUsage) => number | null | undefined): void => {
      new prom.Gauge({
        name,
        help,
        labelNames: ['generation'] as const,
        registers,
        collect() {
          this.reset();
          // A generation with several instances (service.instances): the sum of its processes' figures.
          const sums = new Map<number, number>();
          for (const u of current()) {
            const value = figure(u);
            if (value !== null && value !== undefined) sums.set(u.generation, (sums.get(u.generation) ?? 0) + value);
          }
          for (const [generation, value] of sums) this.set({ generation: String(generation) }, value);
        },
      });
    };
    series(
      'aeterna_app_memory_bytes',
      "Memory a live generation uses now: its cgroup's memory.current, else its processes' resident memory",
      (u) => u.memory_bytes,
    );
    series(
      'aeterna_app_memory_peak_bytes',
      "The most memory a live generation used: its cgroup's memory.peak, else the sum of its processes' peaks",
      (u) => u.memory_peak_bytes,
    );
    series(
      'aeterna_app_cpu_seconds',
      'CPU time (user + system) a live generation used since it started: its cgroup cpu.stat, else its processes',
      (u) => u.cpu_seconds,
    );
    prom.collectDefaultMetrics({ register: this.registry, prefix: 'aeterna_' });
  }
}

/**
 * What Aeterna counts, recorded as it happens. With the endpoint off nothing
 * is kept; with it on, prom-client is loaded once the first generation has
 * been spawned (`export()`), and what happened before is replayed into it.
 */
export class Metrics {
  private exported: Exported | null = null;
  private pending: Array<(e: Exported) => void> | null = [];
  private currentState: string;
  private instanceStates: () => readonly InstanceFigures[] = () => [];
  /** `states`: every state of the orchestrator (each gets its series in aeterna_state), `initial` the one it starts in. */
  constructor(
    enabled: boolean,
    private readonly states: readonly string[],
    initial: string,
    private readonly latestCheckpoint: () => LatestCheckpoint | null = () => null,
    private readonly appUsage: () => AppUsage[] = () => [],
  ) {
    if (!enabled) this.pending = null;
    this.currentState = initial;
  }

  private record(apply: (e: Exported) => void): void {
    if (this.exported) apply(this.exported);
    else this.pending?.push(apply);
  }

  /** Load prom-client and start exporting (no-op when the endpoint is off or already exporting). */
  export(): Exported | null {
    if (this.exported || this.pending === null) return this.exported;
    const e = new Exported(this.latestCheckpoint, () => this.instanceStates(), this.appUsage);
    for (const s of this.states) e.state.set({ state: s }, s === this.currentState ? 1 : 0);
    for (const apply of this.pending) apply(e);
    this.pending = [];
    this.exported = e;
    return e;
  }

  /** Where the aeterna_instance* series read the serving generation's instances (the orchestrator's status). */
  watchInstances(read: () => readonly InstanceFigures[]): void {
    this.instanceStates = read;
  }

  setState(current: string): void {
    this.currentState = current;
    this.record((e) => {
      for (const s of this.states) e.state.set({ state: s }, s === current ? 1 : 0);
    });
  }

  setGeneration(n: number): void {
    this.record((e) => e.generation.set(n));
  }

  setRetiring(count: number): void {
    this.record((e) => e.retiring.set(count));
  }

  retiringKilled(): void {
    this.record((e) => e.retiringKilled.inc());
  }

  setCanaryWeight(percent: number): void {
    this.record((e) => e.canaryWeight.set(percent));
  }

  reloadFinished(strategy: string, result: string, seconds: number): void {
    this.record((e) => {
      e.reloads.inc({ strategy, result });
      e.reloadDuration.observe(seconds);
    });
  }

  childRestarted(reason: string): void {
    this.record((e) => e.childRestarts.inc({ reason }));
  }

  zombieReaped(): void {
    this.record((e) => e.zombiesReaped.inc());
  }

  listenerRepaired(listener: string, result: string): void {
    this.record((e) => e.listenerRepairs.inc({ listener, result }));
  }

  fdStoreChanged(count: number): void {
    this.record((e) => e.fdstoreFds.set(count));
  }

  /** A checkpoint the app sent was stored, or refused (`result` says why); its size and age are read at each scrape. */
  checkpointed(result: string): void {
    this.record((e) => e.checkpoints.inc({ result }));
  }

  watchdogTimedOut(): void {
    this.record((e) => e.watchdogTimeouts.inc());
  }

  /** Re-executions carried over from the handover, by reason (this exec included). */
  reexecuted(byReason: Partial<Record<string, number>>): void {
    this.record((e) => {
      for (const [reason, count] of Object.entries(byReason)) e.reexecs.inc({ reason }, count ?? 0);
    });
  }

  stateRelayed(bytes: number, seconds?: number): void {
    this.record((e) => {
      e.handoffBytes.inc(bytes);
      if (seconds !== undefined) e.handoffDuration.observe(seconds);
    });
  }
}

/** The metrics endpoint: its server, and its listening socket (an upgrade carries it). */
export interface MetricsEndpoint {
  server: http.Server;
  fd: number;
  carry(): { fds: Array<{ role: 'metrics'; name: string; fd: number }>; part: Record<string, never> };
}

/**
 * Serve GET /metrics, /healthz (the daemon is alive and its listeners listen)
 * and /readyz (a generation serves and is ready, and the listeners listen: 200,
 * else 503). `brokenListeners` checks (and repairs) the listeners and says what
 * is still broken. Rejects with E_METRICS_FAILED naming the address when it
 * cannot listen (e.g. the port is taken).
 */
export function startMetricsServer(
  metrics: Metrics,
  address: { host: string; port: number },
  isReady: () => boolean,
  brokenListeners: (probe: 'healthz' | 'readyz') => string[],
  log: Logger,
  /** A listening socket a re-executed Aeterna took over (aeterna upgrade): serve on it instead of binding. */
  adoptFd?: number,
): Promise<MetricsEndpoint> {
  const pool = new ConnectionPool(connectionBudget(PREFERRED_MAX_CONNECTIONS, METRICS_FD_SHARE));
  const server = http.createServer({ connectionsCheckingInterval: 1000 }, (req, res) => {
    pool.mark(req.socket, true);
    res.once('close', () => pool.mark(req.socket, false));
    const url = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD' }).end();
      return;
    }
    if (url === '/metrics') {
      const registry = metrics.export()!.registry;
      registry.metrics().then(
        (text) => res.writeHead(200, { 'content-type': registry.contentType }).end(text),
        (err: Error) => {
          log.error({ err }, 'metrics collection failed');
          res.writeHead(500).end();
        },
      );
    } else if (url === '/healthz') {
      const broken = brokenListeners('healthz');
      if (broken.length === 0) res.writeHead(200, { 'content-type': 'text/plain' }).end('ok\n');
      else res.writeHead(503, { 'content-type': 'text/plain' }).end(`unhealthy\n${broken.join('\n')}\n`);
    } else if (url === '/readyz') {
      const ready = isReady();
      const broken = ready ? brokenListeners('readyz') : [];
      if (ready && broken.length === 0) res.writeHead(200, { 'content-type': 'text/plain' }).end('ready\n');
      else
        res.writeHead(503, { 'content-type': 'text/plain' }).end(`not ready\n${broken.map((b) => `${b}\n`).join('')}`);
    } else {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found\n');
    }
  });
  server.keepAliveTimeout = 5000;
  server.headersTimeout = HEADERS_TIMEOUT_MS;
  server.requestTimeout = 2 * HEADERS_TIMEOUT_MS;
  // Bounded so that clients holding connections cannot use up Aeterna's fds, and cannot keep a probe out (fd-budget.ts).
  server.on('connection', (socket: net.Socket) => {
    if (!pool.admit(socket, (victim) => victim.destroy())) socket.destroy();
  });
  const failed = (err: NodeJS.ErrnoException): AeternaError => {
    const where = `${address.host.includes(':') ? `[${address.host}]` : address.host}:${address.port}`;
    return new AeternaError(
      'E_METRICS_FAILED',
      `metrics endpoint ${where}: ${err.code === 'EADDRINUSE' ? 'address already in use' : err.message}; free the port, or change observability.metrics_port`,
      { cause: err },
    );
  };
  // Bound through the addon, so that Aeterna knows the socket's fd (an upgrade hands it over) without Node's internals.
  let fd: number;
  try {
    fd = adoptFd ?? native.listenTcp(address.host, address.port, 511).fd;
  } catch (err) {
    return Promise.reject(failed(err as NodeJS.ErrnoException));
  }
  return new Promise((resolve, reject) => {
    server.once('error', (err: NodeJS.ErrnoException) => reject(failed(err)));
    server.listen({ fd }, () => {
      server.removeAllListeners('error');
      server.on('error', (err) => log.error({ err }, 'metrics endpoint error'));
      // What an upgrade carries (upgrade/carried.ts): the listening socket.
      resolve({ server, fd, carry: () => ({ fds: [{ role: 'metrics', name: 'metrics', fd }], part: {} }) });
    });
  });
}

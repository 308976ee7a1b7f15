// Prometheus metrics (prom-client) and the HTTP endpoint that serves them with
// the Kubernetes probes. Only counts, states and durations are exported: never
// the environment, the command line or the app's state.
import http from 'node:http';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import { AeternaError } from '../errors';
import { STATES, type State } from '../orchestrator/fsm';
import type { Logger } from '../log';

export class Metrics {
  readonly registry = new Registry();
  readonly reloads = new Counter({
    name: 'aeterna_reloads_total',
    help: 'Reloads by strategy and result (promoted, rolled_back, failed)',
    labelNames: ['strategy', 'result'] as const,
    registers: [this.registry],
  });
  readonly reloadDuration = new Histogram({
    name: 'aeterna_reload_duration_seconds',
    help: 'Time from a reload request to its outcome',
    buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300],
    registers: [this.registry],
  });
  readonly generation = new Gauge({
    name: 'aeterna_generation',
    help: 'Number of the generation that serves',
    registers: [this.registry],
  });
  readonly state = new Gauge({
    name: 'aeterna_state',
    help: 'The orchestrator state: 1 for the current one, 0 for the others',
    labelNames: ['state'] as const,
    registers: [this.registry],
  });
  readonly childRestarts = new Counter({
    name: 'aeterna_child_restarts_total',
    help: 'Restarts of the app outside a reload, by reason',
    labelNames: ['reason'] as const,
    registers: [this.registry],
  });
  readonly zombiesReaped = new Counter({
    name: 'aeterna_zombies_reaped_total',
    help: 'Orphaned processes reaped by Aeterna',
    registers: [this.registry],
  });
  readonly handoffBytes = new Counter({
    name: 'aeterna_state_handoff_bytes_total',
    help: 'Bytes of app state relayed between generations',
    registers: [this.registry],
  });
  readonly handoffDuration = new Histogram({
    name: 'aeterna_state_handoff_duration_seconds',
    help: 'Time from the dump request to the new generation acknowledging the state',
    buckets: [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30],
    registers: [this.registry],
  });

  constructor() {
    collectDefaultMetrics({ register: this.registry, prefix: 'aeterna_' });
    this.setState('Stopped');
  }

  setState(current: State): void {
    for (const s of STATES) this.state.set({ state: s }, s === current ? 1 : 0);
  }
}

/**
 * Serve GET /metrics, /healthz (the daemon is alive) and /readyz (a generation
 * serves and is ready: 200, else 503). Rejects with E_METRICS_FAILED naming the
 * address when it cannot listen (e.g. the port is taken).
 */
export function startMetricsServer(
  metrics: Metrics,
  address: { host: string; port: number },
  isReady: () => boolean,
  log: Logger,
): Promise<http.Server> {
  const server = http.createServer((req, res) => {
    const url = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD' }).end();
      return;
    }
    if (url === '/metrics') {
      metrics.registry.metrics().then(
        (text) => res.writeHead(200, { 'content-type': metrics.registry.contentType }).end(text),
        (err: Error) => {
          log.error({ err }, 'metrics collection failed');
          res.writeHead(500).end();
        },
      );
    } else if (url === '/healthz') {
      res.writeHead(200, { 'content-type': 'text/plain' }).end('ok\n');
    } else if (url === '/readyz') {
      const ready = isReady();
      res.writeHead(ready ? 200 : 503, { 'content-type': 'text/plain' }).end(ready ? 'ready\n' : 'not ready\n');
    } else {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found\n');
    }
  });
  server.keepAliveTimeout = 5000;
  return new Promise((resolve, reject) => {
    server.once('error', (err: NodeJS.ErrnoException) => {
      const where = `${address.host.includes(':') ? `[${address.host}]` : address.host}:${address.port}`;
      reject(new AeternaError('E_METRICS_FAILED', `metrics endpoint ${where}: ${err.code === 'EADDRINUSE' ? 'address already in use' : err.message}`, { cause: err }));
    });
    server.listen(address.port, address.host, () => {
      server.removeAllListeners('error');
      server.on('error', (err) => log.error({ err }, 'metrics endpoint error'));
      resolve(server);
    });
  });
}

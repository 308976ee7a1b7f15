// Load generators for the reload comparison.
//
// autocannon (always): runs in this process through its programmatic API, so
// every response and every error is seen with its time: the timeline for the
// chart and latency inside and outside the reload windows come from here.
// A failure is anything that is not a 2xx response: a refused or reset
// connection, a timeout, or a non-2xx status. Note that autocannon reconnects
// at once after a refused connection, so while nothing accepts, each of its
// connections counts a failure per attempt.
//
// One correction to autocannon 9: when a connection ends or fails it opens a
// new one without forgetting the requests still queued on the old one, so the
// latency of every later response on that client would be measured from a
// stale start time (a request written on a connection the server was closing
// after a `Connection: close` response is never answered). setupClient clears
// that queue whenever a client reconnects; counting is unchanged.
//
// wrk (where installed): a faster generator (C, epoll) used as a cross-check
// of the failure counts at a higher request rate; it reports totals only.
import autocannon from 'autocannon';
import { Proc } from './common';

/** A growable array of float32 (ms since the start: ~0.03 ms resolution over ten minutes, half the memory of doubles). */
class Samples {
  data = new Float32Array(1 << 16);
  length = 0;
  push(v: number): void {
    if (this.length === this.data.length) {
      const next = new Float32Array(this.data.length * 2);
      next.set(this.data);
      this.data = next;
    }
    this.data[this.length++] = v;
  }
  values(): Float32Array {
    return this.data.subarray(0, this.length);
  }
}

export interface Capture {
  /** Load duration, ms (from begin() to stop()). */
  durationMs: number;
  ok: number;
  failed: number;
  /** Failures by kind: ECONNREFUSED, ECONNRESET, timeout, status 503, ... */
  failures: Record<string, number>;
  /** Per 2xx response, in time order: completion time (ms since begin) and latency (ms). */
  okAt: Float32Array;
  latency: Float32Array;
  /** Per failure, in time order: time (ms since begin). */
  failedAt: Float32Array;
}

interface AutocannonClient {
  _connect(): void;
  pipelinedRequests: { clear(): void };
}

/** See the note at the top: a reconnecting client starts with an empty request queue. */
function forgetStaleRequests(client: unknown): void {
  const c = client as AutocannonClient;
  // eslint-disable-next-line @typescript-eslint/unbound-method -- called below with .call(this)
  const connect = c._connect;
  if (typeof connect !== 'function' || typeof c.pipelinedRequests?.clear !== 'function') return; // another autocannon version: leave it as it is
  c._connect = function (this: AutocannonClient) {
    this.pipelinedRequests.clear();
    connect.call(this);
  };
}

export class AutocannonLoad {
  private readonly okAt = new Samples();
  private readonly latency = new Samples();
  private readonly failedAt = new Samples();
  private readonly failures: Record<string, number> = {};
  private t0 = Infinity;
  private stopped = false;
  private readonly instance: autocannon.Instance;
  private readonly finished: Promise<void>;

  /** Starts loading at once; nothing is recorded before begin(). */
  constructor(port: number, connections: number) {
    let resolve!: () => void;
    this.finished = new Promise((r) => (resolve = r));
    this.instance = autocannon(
      {
        url: `http://127.0.0.1:${port}/`,
        connections,
        pipelining: 1,
        duration: 24 * 3600,
        timeout: 10,
        sampleInt: 200,
        setupClient: forgetStaleRequests,
      },
      () => resolve(),
    );
    this.instance.on('response', (_client, status, _bytes, responseTime) => {
      const t = performance.now() - this.t0;
      if (t < 0 || this.stopped) return;
      if (status >= 200 && status < 300) {
        this.okAt.push(t);
        this.latency.push(responseTime);
      } else {
        this.fail(t, `status ${status}`);
      }
    });
    this.instance.on('reqError', (err) => {
      const t = performance.now() - this.t0;
      if (t < 0 || this.stopped) return;
      this.fail(t, err.code ?? (/timed out/.test(err.message) ? 'timeout' : err.message));
    });
  }

  private fail(t: number, kind: string): void {
    this.failedAt.push(t);
    this.failures[kind] = (this.failures[kind] ?? 0) + 1;
  }

  /** Start recording now (after a warm-up). */
  begin(): void {
    this.t0 = performance.now();
  }

  /** ms since begin(). */
  now(): number {
    return performance.now() - this.t0;
  }

  async stop(): Promise<Capture> {
    const durationMs = this.now();
    this.stopped = true;
    this.instance.stop();
    await this.finished;
    return {
      durationMs,
      ok: this.okAt.length,
      failed: this.failedAt.length,
      failures: { ...this.failures },
      okAt: this.okAt.values(),
      latency: this.latency.values(),
      failedAt: this.failedAt.values(),
    };
  }
}

export interface WrkResult {
  requests: number;
  durationS: number;
  rps: number;
  failed: number;
  failures: Record<string, number>;
  p50Ms: number;
  p99Ms: number;
}

/** wrk until stop() (SIGINT makes it print its summary). */
export class WrkLoad {
  private readonly proc: Proc;

  constructor(wrk: string, port: number, connections: number) {
    this.proc = new Proc([
      wrk,
      '-t1',
      `-c${connections}`,
      '-d3600s',
      '--timeout',
      '10s',
      '--latency',
      `http://127.0.0.1:${port}/`,
    ]);
  }

  async stop(): Promise<WrkResult> {
    await this.proc.stop('SIGINT', 10000);
    return parseWrk(this.proc.stdout);
  }
}

function toMs(value: string, unit: string): number {
  const n = Number(value);
  if (unit === 'us') return n / 1000;
  if (unit === 's') return n * 1000;
  if (unit === 'm') return n * 60000;
  return n;
}

export function parseWrk(out: string): WrkResult {
  const total = out.match(/(\d+) requests in ([\d.]+)(us|ms|s|m)/);
  if (!total) throw new Error(`could not read wrk's summary:\n${out.slice(-2000)}`);
  const requests = Number(total[1]);
  const durationS = toMs(total[2], total[3]) / 1000;
  const failures: Record<string, number> = {};
  const sock = out.match(/Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/);
  if (sock) {
    const kinds = ['connect', 'read', 'write', 'timeout'];
    kinds.forEach((k, i) => {
      const n = Number(sock[i + 1]);
      if (n > 0) failures[k] = n;
    });
  }
  const non2xx = out.match(/Non-2xx or 3xx responses: (\d+)/);
  if (non2xx && Number(non2xx[1]) > 0) failures['non-2xx'] = Number(non2xx[1]);
  const pct = (p: string): number => {
    const m = out.match(new RegExp(`^\\s+${p}%\\s+([\\d.]+)(us|ms|s|m)`, 'm'));
    return m ? toMs(m[1], m[2]) : NaN;
  };
  const failed = Object.values(failures).reduce((a, b) => a + b, 0);
  return {
    requests,
    durationS,
    rps: (requests - (failures['non-2xx'] ?? 0)) / durationS,
    failed,
    failures,
    p50Ms: pct('50'),
    p99Ms: pct('99'),
  };
}

// A small HTTP load generator for correctness tests: `concurrency` loops, each
// sending keep-alive GETs back to back, counting every failure (refused,
// reset, timeout, non-2xx) by kind. Counts only; timings belong to bench/.
// With keepAlive: false, each request opens its own connection (and says
// `Connection: close`): one request per connection.
import http from 'node:http';

export interface LoadStats {
  ok: number;
  failed: number;
  /** Failures by kind: the error code (ECONNREFUSED, ECONNRESET, ...) or `status <n>`. */
  failures: Record<string, number>;
  /** How many distinct server pids answered, in order of first answer. */
  pids: number[];
}

export interface Load {
  stats: LoadStats;
  /** Stop after the requests in flight; resolves with the totals. */
  stop(): Promise<LoadStats>;
}

export function startLoad(
  port: number,
  options: { concurrency?: number; timeoutMs?: number; path?: string; keepAlive?: boolean } = {},
): Load {
  const agent =
    options.keepAlive === false ? false : new http.Agent({ keepAlive: true, maxSockets: options.concurrency ?? 8 });
  const stats: LoadStats = { ok: 0, failed: 0, failures: {}, pids: [] };
  let running = true;
  const fail = (kind: string): void => {
    stats.failed++;
    stats.failures[kind] = (stats.failures[kind] ?? 0) + 1;
  };
  const once = (): Promise<void> =>
    new Promise((resolve) => {
      const req = http.get(
        { host: '127.0.0.1', port, path: options.path ?? '/', agent, timeout: options.timeoutMs ?? 10000 },
        (res) => {
          let body = '';
          res.setEncoding('utf8');
          res.on('data', (d: string) => (body += d));
          res.on('end', () => {
            if (res.statusCode !== undefined && res.statusCode >= 200 && res.statusCode < 300) {
              stats.ok++;
              try {
                const pid = (JSON.parse(body) as { pid?: number }).pid;
                if (pid !== undefined && !stats.pids.includes(pid)) stats.pids.push(pid);
              } catch {
                // a body that is not JSON still counts as served
              }
            } else {
              fail(`status ${res.statusCode}`);
            }
            resolve();
          });
          res.on('error', (err: NodeJS.ErrnoException) => {
            fail(err.code ?? err.message);
            resolve();
          });
        },
      );
      req.on('timeout', () => req.destroy(Object.assign(new Error('timeout'), { code: 'ETIMEDOUT' })));
      req.on('error', (err: NodeJS.ErrnoException) => {
        fail(err.code ?? err.message);
        resolve();
      });
    });
  const loops = Array.from({ length: options.concurrency ?? 8 }, async () => {
    while (running) await once();
  });
  return {
    stats,
    async stop() {
      running = false;
      await Promise.all(loops);
      if (agent) agent.destroy();
      return stats;
    },
  };
}

/** The value of one series (`name{labels}` as exposed) in a Prometheus text page, or null when it is absent. */
export function metricSample(text: string, name: string): number | null {
  const line = text.split('\n').find((l) => l.startsWith(name + ' '));
  return line ? Number(line.slice(name.length + 1)) : null;
}

/** One GET; resolves with the parsed JSON body. */
export function getJson<T = Record<string, unknown>>(port: number, path = '/'): Promise<T> {
  return requestJson<T>(port, 'GET', path);
}

/** One GET on a fresh connection (from `localAddress` when given); resolves with status and text body. */
export function getText(
  port: number,
  path = '/',
  host = '127.0.0.1',
  localAddress?: string,
): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    http
      .get({ host, port, path, agent: false, ...(localAddress ? { localAddress } : {}) }, (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (d: string) => (body += d));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      })
      .on('error', reject);
  });
}

/** One request with an optional body and agent; resolves with the parsed JSON body. */
export function requestJson<T = Record<string, unknown>>(
  port: number,
  method: string,
  path: string,
  body?: string,
  agent: http.Agent | false = false,
): Promise<T> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path, agent }, (res) => {
      let data = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (data += d));
      res.on('end', () => {
        try {
          resolve(JSON.parse(data) as T);
        } catch (err) {
          reject(err);
        }
      });
    });
    req.on('error', reject);
    req.end(body);
  });
}

// A client of SSE streams whose events carry an index and a generation (the demo agent's
// GET /sessions/<id>/stream?tokens=N, the SDK fixtures' GET /stream?events=N) that records what it saw: each
// event's index and generation, the TCP connections it used, and whether the response ended cleanly. Used by the
// connection handoff tests and bench/streams.ts.
import http from 'node:http';

export interface StreamSeen {
  indices: number[];
  generations: string[];
  /** Local ports of the TCP connections it used (one: the connection never closed). */
  ports: Set<number>;
  /** 'complete': the response ended cleanly; 'cut': the connection ended first. */
  ended: Promise<'complete' | 'cut'>;
  /** The response is over (`ended` has settled). */
  over: boolean;
}

/** The demo agent's stream of `tokens` events for `session`. */
export function openStream(port: number, session: string, tokens: number, agent?: http.Agent): StreamSeen {
  return openSse(port, `/sessions/${session}/stream?tokens=${tokens}`, agent);
}

/** Any event stream whose events carry `data: {"i": <index>, "generation": "<n>", ...}`. */
export function openSse(port: number, path: string, agent?: http.Agent): StreamSeen {
  const seen: StreamSeen = {
    indices: [],
    generations: [],
    ports: new Set(),
    ended: Promise.resolve('cut'),
    over: false,
  };
  seen.ended = new Promise<'complete' | 'cut'>((resolve) => {
    const req = http.get({ port, path, agent: agent ?? false }, (res) => {
      seen.ports.add(res.socket.localPort!);
      let buffered = '';
      res.setEncoding('utf8');
      res.on('data', (text: string) => {
        buffered += text;
        for (let end; (end = buffered.indexOf('\n\n')) >= 0;) {
          const data = /^data: (.*)$/m.exec(buffered.slice(0, end));
          buffered = buffered.slice(end + 2);
          if (!data) continue;
          const e = JSON.parse(data[1]) as { i: number; generation: string };
          seen.indices.push(e.i);
          seen.generations.push(e.generation);
        }
      });
      res.on('end', () => resolve(res.complete ? 'complete' : 'cut'));
      res.on('error', () => resolve('cut'));
      res.on('aborted', () => resolve('cut'));
    });
    req.on('error', () => resolve('cut'));
  }).finally(() => (seen.over = true));
  return seen;
}

// Graceful HTTP drain for apps under Aeterna: on SIGTERM, stop accepting,
// finish in-flight requests, and close keep-alive connections without racing
// a request on the wire.
//
// Why not just server.close(): since Node 19 it also closes every idle
// keep-alive connection at once, and a client may be writing its next request
// on such a connection at that very moment; it then sees a reset. Instead,
// every response from now on says `Connection: close` (the client opens its
// next connection, which the new generation accepts on the shared socket), and
// only connections that have been idle for `idleMs` are closed.
import net from 'node:net';
import type http from 'node:http';

export interface DrainOptions {
  /** Close a connection once it has had no request in flight for this long. Default 1000 ms. */
  idleMs?: number;
  /** Give up and resolve anyway after this long. Default: never (Aeterna's stop_timeout ends it). */
  timeoutMs?: number;
}

interface Tracked {
  active: number;
  lastActive: number;
}

const tracked = new WeakMap<http.Server, Map<net.Socket, Tracked>>();

/**
 * Start tracking connections. Call right after creating the server (before it
 * serves) so `drain` knows which connections are idle.
 */
export function trackConnections(server: http.Server): void {
  if (tracked.has(server)) return;
  const sockets = new Map<net.Socket, Tracked>();
  tracked.set(server, sockets);
  server.on('connection', (socket: net.Socket) => {
    sockets.set(socket, { active: 0, lastActive: Date.now() });
    socket.once('close', () => sockets.delete(socket));
  });
  server.on('request', (req: http.IncomingMessage, res: http.ServerResponse) => {
    const entry = sockets.get(req.socket);
    if (!entry) return;
    entry.active++;
    res.once('close', () => {
      entry.active--;
      entry.lastActive = Date.now();
    });
  });
}

/** Drain the server; resolves once every connection has closed. */
export function drain(server: http.Server, options: DrainOptions = {}): Promise<void> {
  const idleMs = options.idleMs ?? 1000;
  const sockets = tracked.get(server) ?? new Map<net.Socket, Tracked>();
  // Every response from now on closes its connection after it is sent.
  server.prependListener('request', (_req: http.IncomingMessage, res: http.ServerResponse) =>
    res.setHeader('connection', 'close'),
  );
  return new Promise((resolve) => {
    let done = false;
    const finish = (): void => {
      if (done) return;
      done = true;
      clearInterval(sweeper);
      if (deadline) clearTimeout(deadline);
      resolve();
    };
    // Stop accepting without net's http override, which would cut idle keep-alive connections at once.
    net.Server.prototype.close.call(server, () => finish());
    const sweeper = setInterval(
      () => {
        const now = Date.now();
        for (const [socket, entry] of sockets) {
          if (entry.active === 0 && now - entry.lastActive >= idleMs) socket.end();
        }
      },
      Math.max(10, Math.floor(idleMs / 4)),
    );
    const deadline = options.timeoutMs === undefined ? null : setTimeout(finish, options.timeoutMs);
  });
}

// The daemon's control socket: a Unix stream socket (mode 0600) on which the
// `aeterna` CLI asks for status, reloads, promotion, rollback, stop and signals for the app. The
// wire format is in protocol.ts. Nothing a client sends (or fails to send) may
// crash, stall or slow the daemon: requests are size- and time-limited, peers
// are checked by their kernel credentials, and a client going away mid-reload
// only stops the progress stream, never the reload.
//
// The socket file is watched: when it is deleted (a tmp cleaner, an operator's
// rm) or replaced, the daemon would be unreachable (`aeterna reload` and
// `aeterna stop` fail) while it still runs, and a second daemon could start on
// the same path. The socket is then re-created at the same path (with a
// warning); a path another daemon now answers on, or that is no longer a
// socket, is left alone (with an error). The state relay's and the notify
// socket are kept the same way (keepSocketFile in resources/socket-file.ts).
import net from 'node:net';
import path from 'node:path';
import type pino from 'pino';
import { AeternaError } from '../errors';
import { native, type Credentials } from '../native/binding';
import { Acceptor } from '../resources/acceptor';
import { ConnectionPool, connectionBudget } from '../resources/fd-budget';
import {
  SOCKET_FILE_CHECK_MS,
  SocketPathError,
  claimSocketPath,
  keepSocketFile,
  listenSocketFile,
  removeSocketFile,
  type SocketFile,
} from '../resources/socket-file';
import type { ControlApi, ReloadRecord } from '../orchestrator/types';
import {
  LineDecoder,
  MAX_REQUEST_BYTES,
  encodeMessage,
  errorMessage,
  parseRequest,
  type ControlRequest,
  type ErrorMessage,
  type ServerMessage,
} from './protocol';

export interface ControlServerOptions {
  /** A connection must deliver its request line within this time (default 2 s: the CLI sends it at once). */
  requestTimeoutMs?: number;
  /**
   * Connections held at once (default 64, less when the fd limit is low: see
   * fd-budget.ts). When full, a new connection evicts the oldest one that has
   * not sent its request yet; only when every one is busy with a request is it refused.
   */
  maxConnections?: number;
  /** After the last reply, how long a client may keep its end open before it is cut (default 2 s). */
  lingerMs?: number;
  /** How often the socket file is checked (and re-created when deleted or replaced; default 2 s). */
  watchIntervalMs?: number;
  /** A control socket a re-executed Aeterna took over (aeterna upgrade): accept on it instead of creating one. */
  adopt?: { fd: number; file: SocketFile };
  /** Called when the listening socket changed (the file was re-created): what an upgrade hands over changed. */
  listeningChanged?: () => void;
}

export interface ControlServer {
  readonly socketPath: string;
  /** The listening socket now (it changes when the file is re-created). */
  readonly listening: { fd: number; file: SocketFile };
  /** What an upgrade carries (upgrade/carried.ts): the listening socket, and its file. */
  carry(): { fds: Array<{ role: 'control'; name: string; fd: number }>; part: { control: SocketFile } };
  /**
   * Aeterna exits with `code` (the app and its leftovers are gone): tell each `stop --wait` client, and leave its
   * connection open, so that the end of Aeterna's process is what closes it. Resolves once the answers are written.
   */
  exiting(code: number): Promise<void>;
  /** Stop accepting, close every connection but the `stop --wait` ones (see exiting), remove the socket file. Idempotent. */
  close(): Promise<void>;
}

const BACKLOG = 64;
/** Progress lines queued for a client that does not read; beyond this it is cut off (the reload goes on). */
const MAX_UNREAD_REPLY_BYTES = 1024 * 1024;
/** The fix for a control socket path that cannot be used. */
const PATH_FIX = 'set control.socket_path to a path in a directory this user can write (or run as root)';
/** On close(), how long connections get to flush their last lines. */
const CLOSE_GRACE_MS = 500;
/** Connections held at once when the fd limit allows it. */
const PREFERRED_MAX_CONNECTIONS = 64;
/** The control socket's share of the fds left beyond the reserve; the metrics endpoint takes a share of the rest. */
export const CONTROL_FD_SHARE = 0.5;

export async function startControlServer(
  socketPath: string,
  api: ControlApi,
  log: pino.Logger,
  options: ControlServerOptions = {},
): Promise<ControlServer> {
  const requestTimeoutMs = options.requestTimeoutMs ?? 2_000;
  const pool = new ConnectionPool(
    options.maxConnections ?? connectionBudget(PREFERRED_MAX_CONNECTIONS, CONTROL_FD_SHARE),
  );
  const lingerMs = options.lingerMs ?? 2_000;
  const watchIntervalMs = options.watchIntervalMs ?? SOCKET_FILE_CHECK_MS;
  const ownUid = process.getuid!();
  const connections = new Set<net.Socket>();
  /** `stop --wait` clients: answered by exiting(), closed only by Aeterna's exit. */
  const stopWaiters = new Set<net.Socket>();
  /** Aeterna's exit code, once exiting() was called (a `stop --wait` arriving later is answered at once). */
  let exitCode: number | null = null;

  if (!options.adopt) claimControlSocketPath(socketPath, log);
  let listening = serve(socketPath, (fd) => onConnection(fd), log, options.adopt);

  /** Send the last message and half-close; cut the connection if the client lingers. */
  const finish = (socket: net.Socket, message: ServerMessage): void => {
    if (socket.destroyed || socket.writableEnded) return;
    socket.end(encodeMessage(message));
    // Keep reading (and discarding) so the client's EOF is seen and the
    // connection closes; unread data would also turn our close into a reset.
    socket.resume();
    const timer = setTimeout(() => socket.destroy(), lingerMs);
    timer.unref();
    socket.once('close', () => clearTimeout(timer));
  };

  const refuse = (socket: net.Socket, message: ErrorMessage, context: Record<string, unknown>): void => {
    log.warn({ ...context, code: message.code }, `control request refused: ${message.message}`);
    finish(socket, message);
  };

  const dispatch = (socket: net.Socket, request: ControlRequest, peer: Credentials): void => {
    const context = { cmd: request.cmd, peer_uid: peer.uid, peer_pid: peer.pid };
    log.debug(context, 'control request');
    try {
      switch (request.cmd) {
        case 'status':
          finish(socket, { type: 'result', ok: true, status: api.status() });
          return;
        case 'promote':
          api.promote();
          finish(socket, { type: 'result', ok: true });
          return;
        case 'rollback':
          api.rollback();
          finish(socket, { type: 'result', ok: true });
          return;
        case 'stop':
          // Reply first: stopping may close this server (and this connection) at once.
          if (request.wait === true) waitForExit(socket);
          else finish(socket, { type: 'result', ok: true });
          api.stop(
            `aeterna stop${request.wait === true ? ' --wait' : ''} (control socket, uid ${peer.uid}, pid ${peer.pid})`,
          );
          return;
        case 'reload':
          reload(socket, request.wait, context);
          return;
        case 'upgrade':
          upgrade(socket, request.exec, context);
          return;
        case 'events':
          subscribe(socket, context);
          return;
        case 'signal': {
          if (!api.signal) throw new AeternaError('E_ILLEGAL_TRANSITION', 'this daemon cannot signal the app');
          const signalled = api.signal(`SIG${request.signal}`, request.main);
          finish(socket, { type: 'result', ok: true, signalled });
          return;
        }
      }
    } catch (err) {
      refuse(socket, errorMessage(err), context);
    }
  };

  const reload = (socket: net.Socket, wait: boolean, context: Record<string, unknown>): void => {
    // `answered` is set once the final line is sent; later events and the
    // outcome only go to the daemon's log. The reload itself never depends on
    // this connection.
    let answered = false;
    const send = (message: ServerMessage): void => {
      if (socket.destroyed || socket.writableEnded) return;
      if (socket.writableLength > MAX_UNREAD_REPLY_BYTES) {
        log.warn(context, 'control client does not read its progress stream; disconnecting it (the reload goes on)');
        socket.destroy();
        return;
      }
      socket.write(encodeMessage(message));
    };
    const answer = (message: ServerMessage): void => {
      if (answered) return;
      answered = true;
      if (message.type === 'error') refuse(socket, message, context);
      else finish(socket, message);
    };
    let outcome: Promise<ReloadRecord>;
    try {
      outcome = api.reload('control', (event) => {
        if (answered) return;
        send({ type: 'event', event });
        // --no-wait: the first event (the 'accepted' phase) means the daemon took the reload.
        if (!wait) answer({ type: 'result', ok: true, accepted: event.reload });
      });
    } catch (err) {
      answer(errorMessage(err));
      return;
    }
    outcome.then(
      (record) => answer({ type: 'result', ok: true, record }),
      (err: unknown) => {
        if (answered) log.debug({ ...context, err }, 'reload failed after its requester was answered');
        answer(errorMessage(err));
      },
    );
  };

  /** Connections following `aeterna events` now. */
  let subscribers = 0;

  /** `aeterna events`: the connection stays open and gets every event (the limits are control/events.ts's). */
  const subscribe = (socket: net.Socket, context: Record<string, unknown>): void => {
    if (!api.subscribe)
      return refuse(
        socket,
        { type: 'error', code: 'E_ILLEGAL_TRANSITION', message: 'this daemon has no event stream' },
        context,
      );
    // Subscribers hold their connections for good: at most half of them, so commands always find room.
    if (subscribers >= Math.max(1, Math.floor(pool.limit / 2)))
      return refuse(
        socket,
        {
          type: 'error',
          code: 'E_CONTROL_UNAVAILABLE',
          message: `too many event subscribers (limit ${Math.max(1, Math.floor(pool.limit / 2))}: half of the control socket's ${pool.limit} connections)`,
        },
        context,
      );
    const unsubscribe = api.subscribe({
      send: (line) => {
        if (!socket.destroyed && !socket.writableEnded) socket.write(line);
      },
      backlog: () => socket.writableLength,
      close: (line) => {
        if (socket.destroyed || socket.writableEnded) return;
        socket.end(line);
        const timer = setTimeout(() => socket.destroy(), lingerMs); // one that does not read is cut
        timer.unref();
        socket.once('close', () => clearTimeout(timer));
      },
    });
    subscribers++;
    socket.once('close', () => {
      subscribers--;
      unsubscribe();
      log.debug(context, 'event subscriber gone');
    });
    socket.once('end', () => socket.destroy()); // half-open is allowed on this socket: its end is the subscriber's
    socket.resume(); // read (and drop) anything more, so that a client going away is seen
    log.debug(context, 'event subscriber');
  };

  /** `stop --wait`: out of the connections close() ends; answered by exiting(). */
  const waitForExit = (socket: net.Socket): void => {
    if (exitCode !== null) {
      socket.write(encodeMessage({ type: 'result', ok: true, exited: { code: exitCode } }));
      return;
    }
    connections.delete(socket);
    stopWaiters.add(socket);
    socket.once('close', () => stopWaiters.delete(socket));
    socket.resume(); // read (and drop) anything more, so that a client going away is seen
  };

  /** Answer first (the reply must reach the client before this process is replaced), then re-execute. */
  const upgrade = (socket: net.Socket, exec: string | undefined, context: Record<string, unknown>): void => {
    if (!api.upgrade)
      return refuse(
        socket,
        { type: 'error', code: 'E_ILLEGAL_TRANSITION', message: 'this daemon cannot upgrade itself' },
        context,
      );
    api.upgrade(exec).then(
      ({ from, reexecs, execNow }) => {
        socket.end(encodeMessage({ type: 'result', ok: true, upgrade: { from, reexecs } }), execNow);
      },
      (err: unknown) => refuse(socket, errorMessage(err), context),
    );
  };

  /** Cut a connection that sent no request, to make room for a newcomer. */
  const evict = (victim: net.Socket): void => {
    connections.delete(victim);
    // One warning per burst, not per connection: a flood must not flood PID 1's log.
    if (pool.evicted % 1000 === 1)
      log.warn(
        { limit: pool.limit, evicted: pool.evicted },
        `control socket full (${pool.limit} connections): closing the oldest ones that sent no request`,
      );
    // A connection already answered (and lingering) keeps its answer; one still waiting learns why it is cut.
    if (!victim.writableEnded)
      victim.end(
        encodeMessage({
          type: 'error',
          code: 'E_CONTROL_UNAVAILABLE',
          message: 'closed to make room: no request was sent',
        }),
      );
    victim.destroySoon();
  };

  function onConnection(fd: number): void {
    // The kernel's word on who connected, read from the raw fd before Node owns it.
    let peer: Credentials | Error;
    try {
      peer = native.peerCred(fd);
    } catch (err) {
      peer = err as Error;
    }
    let socket: net.Socket;
    try {
      // allowHalfOpen: a client may send its request and shut down its write side
      // (printf ... | nc -U -N); it must still get the reply.
      socket = new net.Socket({ fd, allowHalfOpen: true, readable: true, writable: true });
    } catch (err) {
      log.warn({ err }, 'control connection could not be opened: closed');
      native.close(fd);
      return;
    }
    if (!pool.admit(socket, evict)) {
      const message = `too many control connections (limit ${pool.limit}), each busy with a request; try again`;
      log.warn({ code: 'E_CONTROL_UNAVAILABLE', limit: pool.limit }, `control request refused: ${message}`);
      socket.on('error', () => undefined);
      socket.end(encodeMessage({ type: 'error', code: 'E_CONTROL_UNAVAILABLE', message }));
      socket.destroySoon();
      return;
    }
    connections.add(socket);
    socket.once('close', () => connections.delete(socket));
    socket.on('error', (err) => log.debug({ err }, 'control connection error'));

    if (peer instanceof Error) {
      log.warn({ err: peer }, 'control connection without peer credentials: closed');
      socket.destroy();
      return;
    }
    const context = { peer_uid: peer.uid, peer_pid: peer.pid };
    if (peer.uid !== 0 && peer.uid !== ownUid) {
      refuse(socket, forbidden(peer, ownUid), context);
      return;
    }
    readRequest(socket, requestTimeoutMs, {
      onRequest: (line) => {
        pool.mark(socket, true);
        let request: ControlRequest;
        try {
          request = parseRequest(line);
        } catch (err) {
          refuse(socket, errorMessage(err), context);
          return;
        }
        dispatch(socket, request, peer);
      },
      onBad: (message) => refuse(socket, { type: 'error', code: 'E_CONTROL_BAD_REQUEST', message }, context),
      onEmpty: () => socket.destroy(),
    });
  }

  let closing: Promise<void> | null = null;

  const watch = keepSocketFile(
    listening.file,
    {
      what: 'control socket',
      consequence: '`aeterna` commands cannot reach this daemon',
      intervalMs: watchIntervalMs,
      recreate: () => {
        claimControlSocketPath(socketPath, log); // refuses a path another daemon answers on, or that is not a socket
        const next = serve(socketPath, (fd) => onConnection(fd), log);
        // The old socket is unreachable by path: stop accepting on it (and free its fd); its connections go on.
        listening.close();
        listening = next;
        options.listeningChanged?.();
        return listening.file;
      },
    },
    log,
  );

  return {
    socketPath,
    get listening() {
      return { fd: listening.fd, file: listening.file };
    },
    carry() {
      return { fds: [{ role: 'control', name: 'control', fd: listening.fd }], part: { control: listening.file } };
    },
    exiting(code: number): Promise<void> {
      exitCode = code;
      const written = [...stopWaiters].map(
        (socket) =>
          new Promise<void>((resolve) => {
            if (socket.destroyed) return resolve();
            const timer = setTimeout(resolve, CLOSE_GRACE_MS); // a client that does not read does not hold the exit
            socket.write(encodeMessage({ type: 'result', ok: true, exited: { code } }), () => {
              clearTimeout(timer);
              resolve();
            });
          }),
      );
      return Promise.all(written).then(() => undefined);
    },
    close(): Promise<void> {
      closing ??= (async () => {
        watch.stop();
        listening.close();
        removeSocketFile(listening.file);
        await Promise.all(
          [...connections].map(
            (socket) =>
              new Promise<void>((resolve) => {
                if (socket.destroyed) return resolve();
                // Flush what is queued, then cut after a short grace.
                const timer = setTimeout(() => socket.destroy(), CLOSE_GRACE_MS);
                socket.once('close', () => {
                  clearTimeout(timer);
                  resolve();
                });
                socket.end();
                socket.resume();
              }),
          ),
        );
      })();
      return closing;
    },
  };
}

/**
 * Read the single request line. Exactly one of the callbacks is called:
 * onRequest with the line (a last line without '\n' counts at EOF), onBad when
 * it is too long or does not arrive in time, onEmpty when the client closed
 * without sending anything. Bytes after the first line are read and ignored.
 */
function readRequest(
  socket: net.Socket,
  timeoutMs: number,
  handlers: { onRequest: (line: Buffer) => void; onBad: (message: string) => void; onEmpty: () => void },
): void {
  const decoder = new LineDecoder(MAX_REQUEST_BYTES);
  let done = false;
  const settle = (): boolean => {
    if (done) return false;
    done = true;
    clearTimeout(timer);
    return true;
  };
  const timer = setTimeout(() => {
    if (settle()) handlers.onBad(`no complete request line within ${timeoutMs} ms`);
  }, timeoutMs);
  timer.unref();
  socket.once('close', () => settle());
  socket.on('data', (chunk: Buffer) => {
    if (done) return;
    let lines: Buffer[];
    try {
      lines = decoder.push(chunk);
    } catch (err) {
      if (settle()) handlers.onBad(`request line: ${(err as Error).message}`);
      return;
    }
    if (lines.length > 0 && settle()) handlers.onRequest(lines[0]);
  });
  socket.on('end', () => {
    if (!settle()) return;
    const rest = decoder.flush();
    if (rest) handlers.onRequest(rest);
    else handlers.onEmpty();
  });
}

/** The control socket listening at its path. */
interface Listening {
  fd: number;
  file: SocketFile;
  /** Stop accepting and close the socket; its connections go on. The file stays: see removeSocketFile. */
  close(): void;
}

/** Create the listening socket at socketPath (mode 0600; the path must be free) and accept on it. */
function serve(
  socketPath: string,
  onConnection: (fd: number) => void,
  log: pino.Logger,
  adopted?: { fd: number; file: SocketFile },
): Listening {
  let listening: { fd: number; file: SocketFile };
  try {
    listening = adopted ?? listenSocketFile(socketPath, BACKLOG, 0o600);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EADDRINUSE') {
      // Another daemon bound the path between our probe and our bind.
      throw new AeternaError(
        'E_DAEMON_RUNNING',
        `another Aeterna daemon took the control socket ${socketPath} while this one started`,
        { cause: err },
      );
    }
    throw new AeternaError(
      'E_LISTEN_FAILED',
      `cannot create the control socket ${socketPath}: ${(err as Error).message}; ${PATH_FIX}`,
      { cause: err },
    );
  }
  const { fd, file } = listening;
  const acceptor = new Acceptor(fd, onConnection, log, 'control socket');
  let closed = false;
  return {
    fd,
    file,
    close(): void {
      if (closed) return;
      closed = true;
      acceptor.close();
      native.close(fd);
    },
  };
}

function forbidden(peer: Credentials, ownUid: number): ErrorMessage {
  return {
    type: 'error',
    code: 'E_CONTROL_FORBIDDEN',
    message: `uid ${peer.uid} is not allowed to use the control socket (only root and uid ${ownUid}, the daemon's own user)`,
  };
}

/**
 * Make socketPath free for the control socket: create its directory; remove a
 * stale socket left by a crashed daemon; refuse when a daemon still answers
 * there or when the path is something other than a socket.
 */
function claimControlSocketPath(socketPath: string, log: pino.Logger): void {
  try {
    if (claimSocketPath(socketPath, true).removedStale) {
      log.warn({ socket: socketPath }, 'removing a stale control socket left by a previous daemon');
    }
  } catch (err) {
    if (!(err instanceof SocketPathError)) throw err;
    const cause = (err.cause as Error | undefined)?.message;
    switch (err.problem) {
      case 'directory':
        throw new AeternaError(
          'E_LISTEN_FAILED',
          `cannot create the control socket's directory ${path.dirname(socketPath)}: ${cause}; ${PATH_FIX}`,
          { cause: err },
        );
      case 'inspect':
        throw new AeternaError(
          'E_LISTEN_FAILED',
          `cannot inspect the control socket path ${socketPath}: ${cause}; ${PATH_FIX}`,
          { cause: err },
        );
      case 'not-a-socket':
        throw new AeternaError(
          'E_LISTEN_FAILED',
          `the control socket path ${socketPath} exists and is not a socket; refusing to replace it (remove it or set control.socket_path)`,
        );
      case 'probe':
        throw new AeternaError('E_LISTEN_FAILED', `cannot probe the existing control socket ${socketPath}: ${cause}`, {
          cause: err,
        });
      case 'live':
        throw new AeternaError(
          'E_DAEMON_RUNNING',
          `another Aeterna daemon answers on the control socket ${socketPath}; refusing to start (stop it first, or give this one another control.socket_path)`,
        );
    }
  }
}

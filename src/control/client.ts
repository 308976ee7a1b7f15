// The CLI's side of the control socket: connect, send one request, read the
// reply lines until the final one. Plain node:net: the CLI is not the
// supervisor and needs no addon.
import net from 'node:net';
import { AeternaError } from '../errors';
import type { ReloadEvent } from '../orchestrator/types';
import {
  LineDecoder,
  MAX_REPLY_BYTES,
  encodeMessage,
  isErrorCode,
  parseServerMessage,
  type ControlRequest,
  type ResultMessage,
  type ServerMessage,
} from './protocol';

export interface RequestOptions {
  /** Give up when the daemon sends nothing for this long (default: wait as long as it takes). */
  idleTimeoutMs?: number;
  /**
   * After the final reply, wait until the daemon closes the connection before handing it over (`stop --wait`: the
   * end of Aeterna's process closes it).
   */
  untilClosed?: boolean;
}

/**
 * Send one request and yield each reply line; the last one yielded is the
 * 'result' or 'error'. Throws AeternaError E_CONTROL_UNAVAILABLE when no daemon
 * answers (or it goes away before its final reply), E_CONTROL_FORBIDDEN when
 * the socket file's permissions keep this user out.
 */
export async function* request(
  socketPath: string,
  req: ControlRequest,
  options: RequestOptions = {},
): AsyncGenerator<ServerMessage, void, undefined> {
  const socket = await connect(socketPath);
  try {
    socket.write(encodeMessage(req));
    if (options.idleTimeoutMs !== undefined) {
      const ms = options.idleTimeoutMs;
      socket.setTimeout(ms, () =>
        socket.destroy(
          new AeternaError('E_CONTROL_UNAVAILABLE', `the daemon on ${socketPath} sent nothing for ${ms} ms`),
        ),
      );
    }
    const decoder = new LineDecoder(MAX_REPLY_BYTES);
    const lines = async function* (): AsyncGenerator<Buffer> {
      try {
        for await (const chunk of socket) yield* decoder.push(chunk as Buffer);
      } catch (err) {
        if (err instanceof AeternaError) throw err;
        throw new AeternaError(
          'E_CONTROL_UNAVAILABLE',
          `lost the connection to the daemon on ${socketPath}: ${(err as Error).message}`,
          { cause: err },
        );
      }
      const last = decoder.flush();
      if (last) yield last;
    };
    let final: ServerMessage | null = null;
    for await (const line of lines()) {
      if (final !== null) continue; // only waiting for the daemon to close the connection
      const message = parseServerMessage(line);
      if (message.type !== 'event' && options.untilClosed === true) {
        final = message;
        continue;
      }
      yield message;
      if (message.type !== 'event') return;
    }
    if (final !== null) {
      yield final;
      return;
    }
    throw new AeternaError(
      'E_CONTROL_UNAVAILABLE',
      `the daemon on ${socketPath} closed the connection before its final reply`,
    );
  } finally {
    socket.destroy();
  }
}

/**
 * Send one request and resolve with its result; events go to onEvent. An error
 * reply is thrown: as AeternaError for a known code, else as an Error with
 * `code` set (e.g. E_INTERNAL, or a code from a newer daemon).
 */
export async function call(
  socketPath: string,
  req: ControlRequest,
  onEvent?: (event: ReloadEvent) => void,
  options: RequestOptions = {},
): Promise<ResultMessage> {
  for await (const message of request(socketPath, req, options)) {
    if (message.type === 'event')
      onEvent?.(message.event as ReloadEvent); // a reload's stream has only these
    else if (message.type === 'result') return message;
    else if (isErrorCode(message.code)) throw new AeternaError(message.code, message.message);
    else throw Object.assign(new Error(message.message), { code: message.code });
  }
  // request() always ends with a result or error, or throws
  throw new AeternaError('E_CONTROL_UNAVAILABLE', `no final reply from the daemon on ${socketPath}`);
}

function connect(socketPath: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.createConnection({ path: socketPath });
    const onError = (err: NodeJS.ErrnoException): void => reject(connectError(socketPath, err));
    socket.once('error', onError);
    socket.once('connect', () => {
      socket.off('error', onError);
      resolve(socket);
    });
  });
}

function connectError(socketPath: string, err: NodeJS.ErrnoException): AeternaError {
  if (err.code === 'EACCES' || err.code === 'EPERM') {
    return new AeternaError(
      'E_CONTROL_FORBIDDEN',
      `permission denied on the control socket ${socketPath} (${err.code}): run as root or as the daemon's user`,
      { cause: err },
    );
  }
  return new AeternaError('E_CONTROL_UNAVAILABLE', `no daemon answers on ${socketPath} (${err.code ?? err.message})`, {
    cause: err,
  });
}

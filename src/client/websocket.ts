// WebSocket sessions (the `ws` package) that survive a reload: at promotion the old generation hands each session's
// TCP connection to the new one between two messages (docs/srp.md, "Connection handoff"), and the new one goes on
// with a server-side WebSocket over the same connection, so the client sees one session that never closed.
//
// ws keeps no state between messages that matters on the wire, except in two places this module moves by hand:
// what its Receiver has read of a frame or message not yet whole (turned back into frame bytes that go along as
// unread bytes), and permessage-deflate's compression context (which cannot move: such a session is refused).
// The SDK does not depend on ws: it is loaded only when an app calls resumeWebSocket (an app that uses these
// functions has it), and handOverWebSocket works on the app's own WebSocket object.
import { createRequire } from 'node:module';
import type { EventEmitter } from 'node:events';
import type net from 'node:net';
import { MAX_UNREAD, type AdoptedConnection, type Handoff } from './handoff';

/** The part of ws's `WebSocket` an app sees here (ws's own types need not be installed to use this SDK). */
export interface WebSocketLike extends EventEmitter {
  readonly readyState: number;
  readonly protocol: string;
  readonly extensions: string;
  send(data: unknown, cb?: (err?: Error) => void): void;
  close(code?: number, reason?: string | Buffer): void;
  pause(): void;
  resume(): void;
}

/** What a WebSocketServer (ws) offers that resumeWebSocket uses: its options and the set of its clients. */
export interface WebSocketServerLike {
  options: Record<string, unknown>;
  clients?: Set<unknown>;
}

/** The receiver's limits and the session's settings: what the next generation needs to parse the same session. */
interface WsSession {
  protocol: string;
  binaryType: string;
  /** The app had paused the session (backpressure of its own): it stays paused. */
  paused: boolean;
  maxPayload: number;
  skipUTF8Validation: boolean;
  allowSynchronousEvents: boolean;
  maxBufferedChunks: number;
  maxFragments: number;
}

/** The meta of a handed-over WebSocket session: Aeterna's part, and the app's own. */
interface WsMeta {
  aeterna_ws: WsSession;
  app: unknown;
}

/** Options of resumeWebSocket: the receiver's limits (by default the server's, else the old generation's). */
export interface ResumeWebSocketOptions {
  /** Take the limits from this WebSocketServer's options and track the session in its `clients`. */
  server?: WebSocketServerLike;
  /** ws's WebSocket class (default: the server's, else `require('ws')`). */
  WebSocket?: unknown;
  maxPayload?: number;
  skipUTF8Validation?: boolean;
  allowSynchronousEvents?: boolean;
  maxBufferedChunks?: number;
  maxFragments?: number;
  autoPong?: boolean;
  maxPendingAutoPongs?: number;
  closeTimeout?: number;
}

// ws's readyState values, and its Receiver's parser states (lib/receiver.js, the same in every 8.x release).
const OPEN = 1;
const CLOSED = 3;
const GET_INFO = 0;
const GET_PAYLOAD_LENGTH_16 = 1;
const GET_PAYLOAD_LENGTH_64 = 2;
const GET_MASK = 3;
const DEFER_EVENT = 6;
/** ws's Sender with nothing queued (no Blob being read). */
const SENDER_IDLE = 0;
/** What the next generation's close event says of the old generation's WebSocket object (RFC 6455: Service Restart). */
const HANDED_OVER_CODE = 1012;
/** ws's listeners on the socket, by their names in lib/websocket.js: removed to detach ws without closing. */
const SOCKET_LISTENERS = {
  data: 'socketOnData',
  end: 'socketOnEnd',
  close: 'socketOnClose',
  error: 'socketOnError',
} as const;

interface Receiver extends EventEmitter {
  _state: number;
  _buffers: Buffer[];
  _bufferedBytes: number;
  _fin: boolean;
  _opcode: number;
  _fragmented: number;
  _fragments: Buffer[];
  _payloadLength: number;
  _masked: boolean;
  _mask: Buffer | undefined;
  _errored: boolean;
  _maxPayload: number;
  _skipUTF8Validation: boolean;
  _allowSynchronousEvents: boolean;
  _maxBufferedChunks?: number;
  _maxFragments?: number;
  _writableState: { length: number };
}

interface WsInternals extends WebSocketLike {
  binaryType: string;
  isPaused: boolean;
  _protocol: string;
  _extensions: Record<string, unknown>;
  _socket: net.Socket | null;
  _receiver: Receiver | null;
  _sender: { _state?: number; _queue?: unknown[] } | null;
  _closeCode: number;
  _closeMessage: Buffer;
  emitClose(): void;
  setSocket(socket: net.Socket, head: Buffer, options: Record<string, unknown>): void;
}

type WebSocketClass = new (address: null, protocols: undefined, options: Record<string, unknown>) => WsInternals;

/** ws's WebSocket class, loaded now (the SDK has no dependency on ws): from the SDK's place, else the app's. */
function loadWs(): WebSocketClass {
  const places = [__filename, require.main?.filename, `${process.cwd()}/`].filter((p): p is string => !!p);
  for (const place of places) {
    try {
      const ws = createRequire(place)('ws') as { WebSocket?: WebSocketClass };
      if (typeof ws.WebSocket === 'function') return ws.WebSocket;
    } catch {
      // not installed where this place looks: try the next
    }
  }
  throw new Error('resumeWebSocket needs the ws package (npm install ws), and it cannot be found');
}

/** A frame header as ws's Receiver reads it; masked (a client's frames always are) with `mask`. */
function frameHeader(fin: boolean, opcode: number, length: number, mask: Buffer): Buffer {
  const size = length < 126 ? 0 : length < 65536 ? 2 : 8;
  const header = Buffer.alloc(2 + size + 4);
  header[0] = (fin ? 0x80 : 0) | opcode;
  header[1] = 0x80 | (size === 0 ? length : size === 2 ? 126 : 127);
  if (size === 2) header.writeUInt16BE(length, 2);
  if (size === 8) header.writeBigUInt64BE(BigInt(length), 2);
  mask.copy(header, 2 + size);
  return header;
}

/**
 * The bytes ws's Receiver holds and has not turned into messages yet, as a client would send them: the fragments
 * of a message not yet whole (already unmasked: re-sent as one fragment under a zero mask), the part of a frame
 * whose header it has read (the header written again), then what it has not parsed at all. Fed to a new
 * Receiver, they give the same messages.
 */
function receiverLeftover(r: Receiver): Buffer {
  const parts: Buffer[] = [];
  if (r._fragmented !== 0) {
    // A message in fragments: what arrived of it becomes its first fragment; the frames after it continue it.
    const data = Buffer.concat(r._fragments);
    parts.push(frameHeader(false, r._fragmented, data.length, Buffer.alloc(4)), data);
  }
  if (r._state !== GET_INFO) {
    // The frame in progress: its first two bytes (and, past them, its length and mask) were consumed.
    const dataFrame = r._opcode < 0x08;
    const opcode = dataFrame && r._fragmented !== 0 ? 0 : r._opcode;
    const byte0 = (r._fin ? 0x80 : 0) | opcode;
    if (r._state === GET_PAYLOAD_LENGTH_16 || r._state === GET_PAYLOAD_LENGTH_64) {
      parts.push(Buffer.from([byte0, 0x80 | (r._state === GET_PAYLOAD_LENGTH_16 ? 126 : 127)]));
    } else {
      const header = frameHeader(r._fin, opcode, r._payloadLength, r._mask ?? Buffer.alloc(4));
      // At GET_MASK the mask is still among the unparsed bytes.
      parts.push(r._state === GET_MASK ? header.subarray(0, header.length - 4) : header);
    }
  }
  parts.push(...r._buffers);
  return Buffer.concat(parts);
}

/** The Receiver has parsed all it was given and has no event waiting to be emitted. */
function receiverSettled(r: Receiver): boolean {
  return r._state !== DEFER_EVENT && r._writableState.length === 0;
}

/** Everything the app sent is in the kernel: ws's Sender has nothing queued, the socket nothing buffered. */
function sent(w: WsInternals, socket: net.Socket): boolean {
  const sender = w._sender;
  return (
    (sender?._state ?? SENDER_IDLE) === SENDER_IDLE &&
    (sender?._queue?.length ?? 0) === 0 &&
    socket.writableLength === 0
  );
}

/** Resolves once what `socket` has buffered was written (a write completes after the writes before it). */
function flushed(socket: net.Socket): Promise<void> {
  if (socket.writableLength === 0 || socket.destroyed) return Promise.resolve();
  return new Promise((resolve) => socket.write(Buffer.alloc(0), () => resolve()));
}

const nextTurn = (): Promise<void> => new Promise((resolve) => setTimeout(resolve, 1));

/** Why `w` cannot be handed over as it is, or null. */
function unsupported(w: WsInternals, socket: net.Socket | null, id: string): string | null {
  if (w.readyState !== OPEN || !socket || !w._receiver)
    return `WebSocket ${id} is not open (readyState ${w.readyState}): nothing to hand over`;
  if (Object.keys(w._extensions ?? {}).length > 0)
    return (
      `WebSocket ${id} negotiated ${w.extensions}: its compression context cannot move to another process. ` +
      "Serve the sessions you hand over without it (perMessageDeflate: false, ws servers' default)"
    );
  const r = w._receiver;
  if (!Array.isArray(r._buffers) || !Array.isArray(r._fragments) || typeof r._state !== 'number')
    return `WebSocket ${id}: this version of ws is not supported (8.13 or later)`;
  for (const [event, name] of Object.entries(SOCKET_LISTENERS))
    if (!socket.listeners(event).some((f) => f.name === name))
      return `WebSocket ${id}: this version of ws is not supported (its ${event} listener is not ${name})`;
  return null;
}

/**
 * Hand the WebSocket session `ws` (a server-side WebSocket of the `ws` package, 8.13 or later) to the next
 * generation, between two messages: its reads stop, what ws had read of a message or frame not yet whole goes
 * along as unread bytes, what the app sent is flushed, and ws lets go of the socket without a close frame. The
 * connection goes to the next generation with `id` and `meta` (any JSON value: what it needs to continue the
 * session), where resumeWebSocket gives the session back. Once this resolves, `ws` here is closed (its close
 * event says 1012); send nothing more on it.
 *
 * Rejects, leaving the session open here, when it is not open, when permessage-deflate was negotiated (its
 * compression context cannot move: serve such sessions without it, or close them), or when the handoff fails
 * before the connection went (the channel closed, the next generation went away).
 */
export async function handOverWebSocket(
  handoff: Handoff,
  ws: WebSocketLike,
  id: string,
  meta: unknown = null,
): Promise<void> {
  const w = ws as WsInternals;
  const socket = w._socket;
  const refused = unsupported(w, socket, id);
  if (refused) throw new Error(refused);
  const r = w._receiver!;
  const wasPaused = w.isPaused;
  const limits = {
    maxPayload: r._maxPayload,
    skipUTF8Validation: r._skipUTF8Validation,
    allowSynchronousEvents: r._allowSynchronousEvents,
    maxBufferedChunks: r._maxBufferedChunks ?? 0,
    maxFragments: r._maxFragments ?? 0,
  };
  w.pause(); // the socket's data stops reaching the Receiver
  // Let the Receiver finish what it holds (a message it defers to a later turn) and the writes go out, until
  // both hold at once: the app may answer a message emitted meanwhile.
  while (!(receiverSettled(r) && sent(w, socket!)) && w.readyState === OPEN && !socket!.destroyed) {
    await flushed(socket!);
    if (!receiverSettled(r) || !sent(w, socket!)) await nextTurn();
  }
  if (w.readyState !== OPEN || r._errored || socket!.destroyed) {
    throw new Error(`WebSocket ${id} closed while being handed over`);
  }
  const unread = receiverLeftover(r);
  // The socket's own buffer joins it in Handoff.send; leave room for a read or two of it.
  if (unread.length + 2 * socket!.readableHighWaterMark > MAX_UNREAD) {
    if (!wasPaused) w.resume();
    throw new RangeError(
      `WebSocket ${id}: ws holds ${unread.length} bytes of a message not yet whole, too many to hand over (at most ${MAX_UNREAD})`,
    );
  }
  // Detach ws: it will not read, write or close this socket any more.
  for (const [event, name] of Object.entries(SOCKET_LISTENERS))
    for (const f of socket!.listeners(event)) if (f.name === name) socket!.removeListener(event, f as () => void);
  const quiet = (): void => undefined; // an error in transit is the next generation's to see
  socket!.on('error', quiet);
  r.removeAllListeners();
  const session: WsSession = { protocol: w.protocol, binaryType: w.binaryType, paused: wasPaused, ...limits };
  const full: WsMeta = { aeterna_ws: session, app: meta };
  try {
    await handoff.send(socket!, id, full, unread);
  } catch (err) {
    // Still ours: ws takes the socket again, with what its Receiver held first.
    socket!.removeListener('error', quiet);
    if (socket!.destroyed) closeHere(w, 1006, 'the connection ended while being handed over');
    else {
      w.setSocket(socket!, unread, limits);
      if (!wasPaused) w.resume();
    }
    throw err;
  }
  closeHere(w, HANDED_OVER_CODE, 'handed over to the next generation');
}

/** Close the WebSocket object in this process (the connection is elsewhere or gone): its close event, nothing sent. */
function closeHere(w: WsInternals, code: number, reason: string): void {
  w._closeCode = code;
  w._closeMessage = Buffer.from(reason);
  if (w.readyState !== CLOSED) w.emitClose();
}

/**
 * The WebSocket session a previous generation handed over as `c`, to continue on the same connection: a
 * server-side WebSocket of the `ws` package over `c.socket` (the bytes the old generation had not processed
 * first), and the app's meta it came with; null when `c` is not a WebSocket session (another kind of connection
 * the app handed over). Attach its listeners at once (in this turn): its messages flow from the next one.
 * The receiver's limits are `options`', else the `server`'s, else the old generation's; with `server`, the session
 * is one of its `clients`.
 */
export function resumeWebSocket<W = WebSocketLike>(
  c: AdoptedConnection,
  options: ResumeWebSocketOptions = {},
): { ws: W; meta: unknown } | null {
  const meta = c.meta as Partial<WsMeta> | null;
  const s = meta?.aeterna_ws;
  if (!s || typeof s !== 'object' || typeof s.maxPayload !== 'number') return null;
  const server = options.server;
  const WebSocket = (options.WebSocket ?? server?.options.WebSocket ?? loadWs()) as WebSocketClass;
  const pick = <T>(name: keyof ResumeWebSocketOptions & keyof WsSession, fallback: T): T =>
    (options[name] ?? server?.options[name] ?? s[name] ?? fallback) as T;
  const fromServer = <T>(name: keyof ResumeWebSocketOptions, fallback: T): T =>
    (options[name] ?? server?.options[name] ?? fallback) as T;
  // ws's defaults (WebSocketServer's), where neither the app nor the old generation says otherwise.
  const ws = new WebSocket(null, undefined, {
    autoPong: fromServer('autoPong', true),
    maxPendingAutoPongs: fromServer('maxPendingAutoPongs', 60),
    closeTimeout: fromServer('closeTimeout', 30_000),
  });
  ws._protocol = typeof s.protocol === 'string' ? s.protocol : '';
  if (typeof s.binaryType === 'string') ws.binaryType = s.binaryType;
  ws.setSocket(c.socket, Buffer.alloc(0), {
    maxPayload: pick('maxPayload', 100 << 20),
    skipUTF8Validation: pick('skipUTF8Validation', false),
    allowSynchronousEvents: pick('allowSynchronousEvents', true),
    maxBufferedChunks: pick('maxBufferedChunks', 0),
    maxFragments: pick('maxFragments', 0),
  });
  if (s.paused) ws.pause();
  if (server?.clients) track(server, ws);
  return { ws: ws as unknown as W, meta: meta.app ?? null };
}

/** One of the server's clients, as ws's own upgrade does it (a closing server emits close once the last one goes). */
function track(server: WebSocketServerLike, ws: WsInternals): void {
  const s = server as WebSocketServerLike & EventEmitter & { _shouldEmitClose?: boolean; _state?: number };
  s.clients!.add(ws);
  ws.on('close', () => {
    s.clients!.delete(ws);
    if (s._shouldEmitClose && s.clients!.size === 0)
      process.nextTick(() => {
        s._state = 2; // CLOSED
        s.emit('close');
      });
  });
}

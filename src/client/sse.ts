// Server-sent events (an HTTP response of `text/event-stream`) that survive a reload: the old generation hands the
// stream to the new one between two events (docs/srp.md, "Connection handoff"), and the new one resumes the same
// response on the same TCP connection, framed as it was (chunked or not), so the client sees one stream.
import type http from 'node:http';
import type net from 'node:net';
import type { AdoptedConnection, Handoff } from './handoff';

/** What the next generation needs to continue the response's framing (carried in the connection's meta). */
interface SseFraming {
  /** The response is chunked (HTTP/1.1 without a length): each event is one chunk, and the end is `0\r\n\r\n`. */
  chunked: boolean;
  /** The connection may serve more requests once the stream ends. */
  keepAlive: boolean;
}

/** The meta of a handed-over SSE stream: Aeterna's framing, and the app's own. */
interface SseMeta {
  aeterna_sse: SseFraming;
  app: unknown;
}

/** One event in the text/event-stream format: `data` lines (one per line of `data`), and the optional fields. */
export function formatEvent(data: string, options: { event?: string; id?: string } = {}): string {
  let out = '';
  if (options.event !== undefined) out += `event: ${options.event}\n`;
  if (options.id !== undefined) out += `id: ${options.id}\n`;
  for (const line of data.split('\n')) out += `data: ${line}\n`;
  return `${out}\n`;
}

/** An event stream being answered: on node:http's response (start), or resumed on an adopted connection (resumeSse). */
export class SseStream {
  private handed = false;
  private ended = false;

  private constructor(
    private readonly res: http.ServerResponse | null,
    private readonly socket: net.Socket,
    private readonly framing: SseFraming,
    private readonly server: http.Server | null,
  ) {}

  /** Answer `res` with an event stream: status 200, `text/event-stream`, headers sent at once. */
  static start(res: http.ServerResponse, headers: http.OutgoingHttpHeaders = {}): SseStream {
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', ...headers });
    res.flushHeaders();
    const internals = res as unknown as { chunkedEncoding?: boolean; shouldKeepAlive?: boolean };
    const framing = { chunked: internals.chunkedEncoding === true, keepAlive: internals.shouldKeepAlive === true };
    return new SseStream(res, res.socket!, framing, null);
  }

  /** Whether this stream went to the next generation (handOver): write nothing more to it here. */
  get handedOver(): boolean {
    return this.handed;
  }

  /** Whether the stream can take events: not ended, not handed over, its connection open. */
  get open(): boolean {
    return !this.handed && !this.ended && !this.socket.destroyed;
  }

  /** Send one event; false when the stream is no longer open here (ended, handed over, or the client left). */
  send(data: string, options: { event?: string; id?: string } = {}): boolean {
    if (!this.open) return false;
    const text = formatEvent(data, options);
    if (this.res) this.res.write(text);
    else if (this.framing.chunked) this.socket.write(`${Buffer.byteLength(text).toString(16)}\r\n${text}\r\n`);
    else this.socket.write(text);
    return true;
  }

  /**
   * End the response. Resumed on an adopted connection that may serve more requests (HTTP/1.1 keep-alive), the
   * connection goes to `server` given to resumeSse (node:http serves its next requests); without one it closes.
   */
  end(): void {
    if (!this.open) return;
    this.ended = true;
    if (this.res) return void this.res.end();
    if (this.framing.chunked) this.socket.write('0\r\n\r\n');
    if (this.framing.keepAlive && this.server) this.server.emit('connection', this.socket);
    else this.socket.end();
  }

  /**
   * Hand the stream to the next generation, between two events: `meta` is what it needs to go on (where the
   * stream is, what is left to send). Resolves once the connection is the next generation's.
   */
  async handOver(handoff: Handoff, id: string, meta: unknown = null): Promise<void> {
    if (!this.open) throw new Error(`stream ${id} is not open here (ended, handed over, or its client left)`);
    this.handed = true;
    const full: SseMeta = { aeterna_sse: this.framing, app: meta };
    try {
      await handoff.send(this.socket, id, full);
    } catch (err) {
      this.handed = false; // still ours: the caller may end it here
      throw err;
    }
  }

  /** @internal */
  static resumed(c: AdoptedConnection, framing: SseFraming, server: http.Server | null): SseStream {
    return new SseStream(null, c.socket, framing, server);
  }
}

/**
 * The event stream a previous generation handed over as `c`, to continue on the same connection, and the app's
 * meta it came with; null when `c` is not an SSE stream (another kind of connection the app handed over).
 * `server`: where the connection goes once the stream ends, if the client keeps it alive for more requests.
 */
export function resumeSse(
  c: AdoptedConnection,
  options: { server?: http.Server } = {},
): { stream: SseStream; meta: unknown } | null {
  const meta = c.meta as Partial<SseMeta> | null;
  const framing = meta?.aeterna_sse;
  if (!framing || typeof framing.chunked !== 'boolean' || typeof framing.keepAlive !== 'boolean') return null;
  // A client sends nothing on an event stream until it ends (then its next request, which `server` reads): the
  // socket stays paused. A client that left shows as a failed write, which ends the stream (`open` is false).
  c.socket.on('error', () => c.socket.destroy());
  return { stream: SseStream.resumed(c, framing, options.server ?? null), meta: meta.app ?? null };
}

// The control socket's wire format: line-delimited JSON, one request line from
// the client, then one or more reply lines from the daemon, then the daemon
// closes the connection (one request per connection).
//
//   -> {"cmd":"status"}
//   <- {"type":"result","ok":true,"status":{...StatusReport}}
//
//   -> {"cmd":"reload"}                 (wait for the outcome; the default)
//   <- {"type":"event","event":{...ReloadEvent}}   one per progress event, the 'outcome' event included
//   <- {"type":"result","ok":true,"record":{...ReloadRecord}}
//      (promoted: answered once the new generation serves and the final sync settled, not when the old one has
//      exited; the record's serving_since says since when, its retiring lists the old generations still draining)
//
//   -> {"cmd":"reload","wait":false}    (return once accepted)
//   <- {"type":"event","event":{"type":"phase","phase":"accepted",...}}
//   <- {"type":"result","ok":true,"accepted":"reload-3"}
//
//   -> {"cmd":"upgrade"} | {"cmd":"upgrade","exec":"/path/to/aeterna"}
//   <- {"type":"result","ok":true,"upgrade":{"from":"1.2.0","reexecs":3}}   (then the daemon re-executes itself)
//
//   -> {"cmd":"signal","signal":"HUP"} | {"cmd":"signal","signal":"USR1","main":true}
//   <- {"type":"result","ok":true,"signalled":{"signal":"SIGHUP","generation":3,"pid":118,"to":"group"}}
//
//   -> {"cmd":"promote"} | {"cmd":"rollback"} | {"cmd":"stop"}
//   <- {"type":"result","ok":true}
//
//   -> {"cmd":"events"}                 (stays open: every operator event as it happens)
//   <- {"type":"event","event":{...OperatorEvent}}   one per event, until the client goes away; then, when Aeterna
//      stops: {"type":"result","ok":true,"ended":"..."}; a subscriber that does not read: an error line, and the end
//
//   -> {"cmd":"stop","wait":true}       (return when Aeterna exits)
//   <- {"type":"result","ok":true,"exited":{"code":143}}   once the app and every leftover are gone; then the
//      connection stays open until Aeterna's process exits, whose end closes it
//
// Any failure, at any point: {"type":"error","code":"E_...","message":"..."}.
// This module only encodes and decodes; it does no I/O.
import { AeternaError, ErrorCodes, type ErrorCode } from '../errors';
import type { OperatorEvent, ReloadEvent, ReloadRecord, Signalled, StatusReport } from '../orchestrator/types';
import { parseAppSignal, type AppSignal } from './app-signals';

/** Longest request line the daemon buffers, newline excluded. */
export const MAX_REQUEST_BYTES = 64 * 1024;
/** Longest reply line the client buffers (a status or record is a few KiB). */
export const MAX_REPLY_BYTES = 4 * 1024 * 1024;

export const COMMANDS = ['status', 'reload', 'promote', 'rollback', 'stop', 'upgrade', 'signal', 'events'] as const;
export type Command = (typeof COMMANDS)[number];

export type ControlRequest =
  | { cmd: 'status' }
  | { cmd: 'reload'; wait: boolean }
  | { cmd: 'promote' }
  | { cmd: 'rollback' }
  /** `wait`: answer with Aeterna's exit code when it exits, instead of at once. */
  | { cmd: 'stop'; wait?: boolean }
  /** Re-execute the daemon in place: `exec` names the program, else the aeterna entry it was started from. */
  | { cmd: 'upgrade'; exec?: string }
  /** Pass `signal` to the serving generation's process group (`main`: to its root process only). */
  | { cmd: 'signal'; signal: AppSignal; main: boolean }
  /** Subscribe to every operator event until the connection ends (`aeterna events`). */
  | { cmd: 'events' };

/** Error codes on the wire: Aeterna's stable codes (E_INTERNAL for an unexpected exception, a bug). */
export type WireErrorCode = ErrorCode;

export type ResultMessage =
  | { type: 'result'; ok: true; status: StatusReport }
  | { type: 'result'; ok: true; record: ReloadRecord }
  /** reload with wait:false: the id of the accepted reload. */
  | { type: 'result'; ok: true; accepted: string }
  /** upgrade: the target passed its check; the daemon (version `from`, re-executed `reexecs` times so far) execs now. */
  | { type: 'result'; ok: true; upgrade: { from: string; reexecs: number } }
  /** stop with wait: Aeterna's exit code (the app's, as `aeterna start` propagates it); Aeterna exits next. */
  | { type: 'result'; ok: true; exited: { code: number } }
  /** signal: which generation got it. */
  | { type: 'result'; ok: true; signalled: Signalled }
  /** events: the stream ends because Aeterna stops (why). */
  | { type: 'result'; ok: true; ended: string }
  | { type: 'result'; ok: true };

/** A reload's progress (to `aeterna reload`), or any operator event (to `aeterna events`). */
export type EventMessage = { type: 'event'; event: ReloadEvent | OperatorEvent };
export type ErrorMessage = { type: 'error'; code: WireErrorCode; message: string };
export type ServerMessage = EventMessage | ResultMessage | ErrorMessage;

export function encodeMessage(message: ServerMessage | ControlRequest): string {
  return JSON.stringify(message) + '\n';
}

export function isErrorCode(code: unknown): code is ErrorCode {
  return typeof code === 'string' && Object.hasOwn(ErrorCodes, code);
}

/** The wire form of any thrown value. */
export function errorMessage(err: unknown): ErrorMessage {
  if (err instanceof AeternaError) return { type: 'error', code: err.code, message: err.message };
  return { type: 'error', code: 'E_INTERNAL', message: err instanceof Error ? err.message : String(err) };
}

/**
 * Splits a byte stream into lines, refusing a line longer than maxBytes while
 * it is still being buffered (so a client cannot make the daemon grow a buffer
 * without bound by never sending a newline).
 */
export class LineDecoder {
  private pending: Buffer[] = [];
  private pendingBytes = 0;

  constructor(private readonly maxBytes: number) {}

  /** Feed a chunk; returns the complete lines it finished (without '\n'). Throws LineTooLong. */
  push(chunk: Buffer): Buffer[] {
    const lines: Buffer[] = [];
    let start = 0;
    for (;;) {
      const nl = chunk.indexOf(0x0a, start);
      if (nl === -1) break;
      this.check(nl - start);
      lines.push(this.take(chunk.subarray(start, nl)));
      start = nl + 1;
    }
    if (start < chunk.length) {
      const rest = chunk.subarray(start);
      this.check(rest.length);
      this.pending.push(rest);
      this.pendingBytes += rest.length;
    }
    return lines;
  }

  /** At the end of the stream: the last line when it had no newline, else null. */
  flush(): Buffer | null {
    return this.pendingBytes === 0 ? null : this.take(Buffer.alloc(0));
  }

  private check(more: number): void {
    if (this.pendingBytes + more > this.maxBytes) {
      throw new LineTooLong(this.maxBytes, this.pendingBytes + more);
    }
  }

  private take(tail: Buffer): Buffer {
    const line = this.pending.length === 0 ? tail : Buffer.concat([...this.pending, tail]);
    this.pending = [];
    this.pendingBytes = 0;
    return line;
  }
}

export class LineTooLong extends Error {
  constructor(
    readonly limit: number,
    readonly seen: number,
  ) {
    super(`line longer than ${limit} bytes (at least ${seen} bytes without a newline)`);
    this.name = 'LineTooLong';
  }
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** Decode one line as UTF-8 JSON. Throws a plain Error saying what was wrong and where. */
export function parseJsonLine(line: Buffer): unknown {
  let text: string;
  try {
    text = utf8.decode(line);
  } catch {
    throw new Error(`not valid UTF-8 (${describeBadUtf8(line)})`);
  }
  if (text.endsWith('\r')) text = text.slice(0, -1); // tolerate CRLF from hand-typed clients (socat, nc -C)
  if (text.trim() === '') throw new Error('empty line: expected a JSON object');
  try {
    return JSON.parse(text) as unknown;
  } catch (err) {
    throw new Error(`invalid JSON: ${(err as Error).message}`);
  }
}

/** Where decoding failed: fed byte by byte to a streaming decoder, so linear in the line length. */
function describeBadUtf8(line: Buffer): string {
  const decoder = new TextDecoder('utf-8', { fatal: true });
  for (let i = 0; i < line.length; i++) {
    try {
      decoder.decode(line.subarray(i, i + 1), { stream: true });
    } catch {
      return `byte 0x${line[i].toString(16).padStart(2, '0')} at offset ${i}`;
    }
  }
  return 'truncated sequence at the end of the line';
}

/** The fields each command takes besides "cmd" being the only one. */
const ALLOWED_FIELDS: Partial<Record<Command, string[]>> = {
  reload: ['cmd', 'wait'],
  upgrade: ['cmd', 'exec'],
  stop: ['cmd', 'wait'],
  signal: ['cmd', 'signal', 'main'],
};

function badRequest(message: string): AeternaError {
  return new AeternaError('E_CONTROL_BAD_REQUEST', message);
}

/** Parse and validate one request line. Throws AeternaError E_CONTROL_BAD_REQUEST. */
export function parseRequest(line: Buffer): ControlRequest {
  let value: unknown;
  try {
    value = parseJsonLine(line);
  } catch (err) {
    throw badRequest(`request line: ${(err as Error).message}`);
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw badRequest(
      `request: expected a JSON object, got ${Array.isArray(value) ? 'an array' : value === null ? 'null' : typeof value}`,
    );
  }
  const obj = value as Record<string, unknown>;
  if (!('cmd' in obj)) throw badRequest(`request: missing field "cmd" (one of ${COMMANDS.join(', ')})`);
  const cmd = obj.cmd;
  if (typeof cmd !== 'string' || !(COMMANDS as readonly string[]).includes(cmd)) {
    throw badRequest(`request.cmd: unknown command ${JSON.stringify(cmd)} (expected one of ${COMMANDS.join(', ')})`);
  }
  // Unknown fields are refused rather than ignored: a newer client asking for
  // something this daemon does not know gets a clear answer, not a silent no-op.
  const allowed = ALLOWED_FIELDS[cmd as Command] ?? ['cmd'];
  for (const key of Object.keys(obj)) {
    if (!allowed.includes(key))
      throw badRequest(`request.${key}: unknown field for "${cmd}" (allowed: ${allowed.join(', ')})`);
  }
  if (cmd === 'reload' || (cmd === 'stop' && obj.wait !== undefined)) {
    const wait = obj.wait ?? true; // a reload waits for its outcome unless told not to (a stop only when told to)
    if (typeof wait !== 'boolean') throw badRequest(`request.wait: expected a boolean, got ${JSON.stringify(wait)}`);
    return { cmd, wait };
  }
  if (cmd === 'signal') {
    if (typeof obj.signal !== 'string')
      throw badRequest(`request.signal: expected a signal name such as "HUP", got ${JSON.stringify(obj.signal)}`);
    const signal = parseAppSignal(obj.signal);
    if (signal instanceof Error) throw badRequest(`request.signal: ${signal.message}`);
    const main = obj.main ?? false;
    if (typeof main !== 'boolean') throw badRequest(`request.main: expected a boolean, got ${JSON.stringify(main)}`);
    return { cmd, signal, main };
  }
  if (cmd === 'upgrade' && obj.exec !== undefined) {
    if (typeof obj.exec !== 'string' || !obj.exec.startsWith('/'))
      throw badRequest(`request.exec: expected an absolute path, got ${JSON.stringify(obj.exec)}`);
    return { cmd, exec: obj.exec };
  }
  return { cmd } as ControlRequest;
}

/** Parse one reply line on the client side. Throws a plain Error on a malformed reply. */
export function parseServerMessage(line: Buffer): ServerMessage {
  const value = parseJsonLine(line);
  if (typeof value !== 'object' || value === null) throw new Error('reply is not a JSON object');
  const msg = value as { type?: unknown; code?: unknown; message?: unknown; event?: unknown; ok?: unknown };
  switch (msg.type) {
    case 'event':
      if (typeof msg.event !== 'object' || msg.event === null) throw new Error('event reply without an event');
      return value as EventMessage;
    case 'result':
      if (msg.ok !== true) throw new Error('result reply without ok: true');
      return value as ResultMessage;
    case 'error':
      if (typeof msg.code !== 'string' || typeof msg.message !== 'string')
        throw new Error('error reply without code and message');
      return value as ErrorMessage;
    default:
      throw new Error(`unknown reply type ${JSON.stringify(msg.type)}`);
  }
}

// SRP control messages: parsed and checked field by field, so the relay code
// downstream can trust their shape (docs/srp.md, "Messages").
import { SrpError, encodeFrame, MAX_FDS_PER_FRAME } from './codec';

export interface StateHeader {
  size: number;
  encoding?: string;
  sha256?: string;
  transport?: 'stream' | 'memfd';
  fds?: string[];
}

export type Message =
  /** fds: false = the client cannot receive fds (no memfd state, no fd passing); absent = it can. */
  | { op: 'hello'; v: number; fds?: boolean }
  | { op: 'welcome'; v: number; generation: number; max_frame: number }
  | ({ op: 'load'; final?: boolean } & StateHeader)
  | ({ op: 'state' } & StateHeader)
  | { op: 'ack'; ok: boolean; error?: string }
  | { op: 'ready' }
  /** timeout_ms: how long Aeterna waits for the state and the new generation's ack (state_handoff.timeout). */
  | { op: 'dump'; final: boolean; timeout_ms?: number }
  | { op: 'error'; code: string; message: string };

export type Op = Message['op'];
const OPS: readonly Op[] = ['hello', 'welcome', 'load', 'state', 'ack', 'ready', 'dump', 'error'];

const utf8 = new TextDecoder('utf-8', { fatal: true });

function fail(message: string): never {
  throw new SrpError('bad_json', message);
}

function optionalString(o: Record<string, unknown>, key: string, max: number): string | undefined {
  const v = o[key];
  if (v === undefined) return undefined;
  if (typeof v !== 'string' || v.length > max) fail(`"${key}" must be a string of at most ${max} characters`);
  return v;
}

function header(o: Record<string, unknown>, op: string): StateHeader {
  const size = o.size;
  if (typeof size !== 'number' || !Number.isSafeInteger(size) || size < 0) fail(`${op}: "size" must be a whole number >= 0`);
  const h: StateHeader = { size };
  const encoding = optionalString(o, 'encoding', 64);
  if (encoding !== undefined) h.encoding = encoding;
  const sha256 = optionalString(o, 'sha256', 64);
  if (sha256 !== undefined) {
    if (!/^[0-9a-f]{64}$/.test(sha256)) fail(`${op}: "sha256" must be 64 lowercase hex digits`);
    h.sha256 = sha256;
  }
  if (o.transport !== undefined) {
    if (o.transport !== 'stream' && o.transport !== 'memfd') fail(`${op}: "transport" must be "stream" or "memfd"`);
    h.transport = o.transport;
  }
  if (o.fds !== undefined) {
    const fds = o.fds;
    if (!Array.isArray(fds) || fds.length > MAX_FDS_PER_FRAME || !fds.every((n) => typeof n === 'string' && n.length > 0 && n.length <= 128)) {
      fail(`${op}: "fds" must be a list of at most ${MAX_FDS_PER_FRAME} names`);
    }
    if (new Set(fds).size !== fds.length) fail(`${op}: "fds" names must be unique`);
    h.fds = fds as string[];
  }
  if (h.transport === 'memfd' && !(h.fds ?? []).includes('state')) fail(`${op}: transport "memfd" needs an fd named "state"`);
  if (h.size > 0 && h.transport !== 'memfd' && h.sha256 === undefined) fail(`${op}: "sha256" is required for a streamed state`);
  return h;
}

/** Parse a control frame's payload. Throws SrpError (bad_json, unexpected_op). */
export function parseMessage(payload: Buffer): Message {
  let text: string;
  try {
    text = utf8.decode(payload);
  } catch {
    fail('control frame is not valid UTF-8');
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    fail(`control frame is not JSON: ${(err as Error).message}`);
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) fail('control frame is not a JSON object');
  const o = value as Record<string, unknown>;
  if (typeof o.op !== 'string') fail('control frame has no string "op"');
  if (!OPS.includes(o.op as Op)) throw new SrpError('unexpected_op', `unknown op "${o.op.slice(0, 40)}"`);
  switch (o.op as Op) {
    case 'hello':
      if (typeof o.v !== 'number') fail('hello: "v" must be a number');
      if (o.fds !== undefined && typeof o.fds !== 'boolean') fail('hello: "fds" must be true or false');
      return o.fds === false ? { op: 'hello', v: o.v, fds: false } : { op: 'hello', v: o.v };
    case 'welcome':
      return { op: 'welcome', v: Number(o.v), generation: Number(o.generation), max_frame: Number(o.max_frame) };
    case 'load':
      return { op: 'load', ...header(o, 'load'), ...(o.final === true ? { final: true } : {}) };
    case 'state':
      return { op: 'state', ...header(o, 'state') };
    case 'ack': {
      if (typeof o.ok !== 'boolean') fail('ack: "ok" must be true or false');
      const error = optionalString(o, 'error', 4096);
      return error === undefined ? { op: 'ack', ok: o.ok } : { op: 'ack', ok: o.ok, error };
    }
    case 'ready':
      return { op: 'ready' };
    case 'dump':
      return Number.isSafeInteger(o.timeout_ms) && (o.timeout_ms as number) > 0
        ? { op: 'dump', final: o.final === true, timeout_ms: o.timeout_ms as number }
        : { op: 'dump', final: o.final === true };
    case 'error':
      return { op: 'error', code: String(o.code ?? 'unknown').slice(0, 64), message: String(o.message ?? '').slice(0, 4096) };
  }
}

/** A control message as a whole frame. */
export function encodeMessage(message: Message): Buffer {
  return encodeFrame(Buffer.from(JSON.stringify(message)));
}

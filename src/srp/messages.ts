// SRP control messages: parsed and checked field by field, so the relay code
// downstream can trust their shape (docs/srp.md, "Messages").
import { SrpError, encodeFrame, MAX_FDS_PER_FRAME } from './codec';

/** The longest `encoding` name a state, load or checkpoint may carry (characters). */
export const MAX_ENCODING_LENGTH = 64;

export interface StateHeader {
  size: number;
  encoding?: string;
  sha256?: string;
  /** The sha256 follows the data frames, in a `trailer` frame (so the sender need not hash before its first byte). */
  trailer?: true;
  /** The trailer's algorithm when not SHA-256: `crc32`, only where the dump offered it (docs/srp.md, "Checksums"). */
  checksum?: Checksum;
  /** `direct`: the bytes come on a socket pair of their own (the fd named "direct"), not as data frames (docs/srp.md, "Direct transport"). */
  transport?: 'stream' | 'memfd' | 'direct';
  fds?: string[];
}

export type Message =
  /**
   * fds: false = the client cannot receive fds (no memfd state, no fd passing); absent = it can. trailer: it can
   * receive a state whose digest follows the data (docs/srp.md, "Digest trailer").
   */
  /** checksums: the trailer algorithms it can compute and verify besides sha256 (docs/srp.md, "Checksums"). */
  /** handoff: it can hand its client connections to the next generation and adopt them (docs/srp.md, "Connection handoff"). */
  | { op: 'hello'; v: number; fds?: boolean; trailer?: true; direct?: true; checksums?: string[]; handoff?: true }
  /** checkpoint: Aeterna stores checkpoints (docs/srp.md, "Checkpoints"). */
  | {
      op: 'welcome';
      v: number;
      generation: number;
      max_frame: number;
      checkpoint?: true;
      direct?: true;
      handoff?: true;
    }
  /** source/seq/age_ms: a generation with no live predecessor loads the latest checkpoint ("checkpoint"); a reload's live dump is "relay". */
  | ({ op: 'load'; final?: boolean; source?: LoadSource; seq?: number; age_ms?: number } & StateHeader)
  /** The app stores its latest state in Aeterna: the payload forms of `state`. */
  | ({ op: 'checkpoint' } & StateHeader)
  /** Aeterna's answer to `checkpoint`: stored as `seq`, or refused with `code` (the previous checkpoint stays). */
  | { op: 'checkpointed'; seq?: number; code?: string; message?: string }
  | ({ op: 'state' } & StateHeader)
  | { op: 'ack'; ok: boolean; error?: string }
  | { op: 'ready' }
  /** timeout_ms: how long Aeterna waits for the state and the new generation's ack (state_handoff.timeout). */
  /** direct: the sender may write the state's bytes on the socket pair end it carries (fds: ["direct"]). */
  | {
      op: 'dump';
      final: boolean;
      timeout_ms?: number;
      trailer?: true;
      direct?: true;
      /** A final dump's end of the connection handoff channel (fds: ["handoff"]). */
      handoff?: true;
      fds?: string[];
      checksum?: Checksum;
    }
  /** The new generation's end of the connection handoff channel, right before the old one's final dump. */
  | { op: 'handoff'; fds: ['handoff'] }
  /** The digest of the state's data frames, right after the last of them (a header with `trailer`): `sha256`, or `crc32` when the header said so. */
  | ({ op: 'trailer' } & TrailerDigest)
  | { op: 'error'; code: string; message: string };

export type LoadSource = 'relay' | 'checkpoint';

/** A trailer's check, besides the default SHA-256. */
export type Checksum = 'crc32';
export const CHECKSUMS: readonly Checksum[] = ['crc32'];

/** Exactly one of the two. */
export type TrailerDigest = { sha256: string; crc32?: never } | { crc32: string; sha256?: never };

export type Op = Message['op'];
const OPS: readonly Op[] = [
  'hello',
  'welcome',
  'load',
  'state',
  'ack',
  'ready',
  'dump',
  'handoff',
  'trailer',
  'error',
  'checkpoint',
  'checkpointed',
];

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

function optionalSha256(o: Record<string, unknown>, op: string): string | undefined {
  const sha256 = optionalString(o, 'sha256', 64);
  if (sha256 !== undefined && !/^[0-9a-f]{64}$/.test(sha256)) fail(`${op}: "sha256" must be 64 lowercase hex digits`);
  return sha256;
}

function header(o: Record<string, unknown>, op: string): StateHeader {
  const size = o.size;
  if (typeof size !== 'number' || !Number.isSafeInteger(size) || size < 0)
    fail(`${op}: "size" must be a whole number >= 0`);
  const h: StateHeader = { size };
  const encoding = optionalString(o, 'encoding', MAX_ENCODING_LENGTH);
  if (encoding !== undefined) h.encoding = encoding;
  const sha256 = optionalSha256(o, op);
  if (sha256 !== undefined) h.sha256 = sha256;
  if (o.transport !== undefined) {
    if (o.transport !== 'stream' && o.transport !== 'memfd' && o.transport !== 'direct')
      fail(`${op}: "transport" must be "stream", "memfd" or "direct"`);
    h.transport = o.transport;
  }
  if (o.fds !== undefined) {
    const fds = o.fds;
    if (
      !Array.isArray(fds) ||
      fds.length > MAX_FDS_PER_FRAME ||
      !fds.every((n) => typeof n === 'string' && n.length > 0 && n.length <= 128)
    ) {
      fail(`${op}: "fds" must be a list of at most ${MAX_FDS_PER_FRAME} names`);
    }
    if (new Set(fds).size !== fds.length) fail(`${op}: "fds" names must be unique`);
    h.fds = fds as string[];
  }
  if (h.transport === 'memfd' && !(h.fds ?? []).includes('state'))
    fail(`${op}: transport "memfd" needs an fd named "state"`);
  if (o.trailer !== undefined) {
    if (o.trailer !== true) fail(`${op}: "trailer" must be true when present`);
    if (h.sha256 !== undefined || h.transport === 'memfd' || h.size === 0)
      fail(`${op}: "trailer" is only for a streamed state of at least 1 byte without "sha256"`);
    h.trailer = true;
  }
  if (o.checksum !== undefined) {
    if (!CHECKSUMS.includes(o.checksum as Checksum))
      fail(`${op}: "checksum" must be one of ${CHECKSUMS.join(', ')} when present`);
    if (!h.trailer || op === 'checkpoint') fail(`${op}: "checksum" is only for a relayed state with "trailer": true`);
    h.checksum = o.checksum as Checksum;
  }
  if (h.transport === 'direct') {
    // The digest always follows the bytes on the pair; the pair end rides on the load, the sender already has its own.
    if (!h.trailer || h.size === 0)
      fail(`${op}: transport "direct" needs "trailer": true and a size of at least 1 byte`);
    if ((h.fds ?? []).includes('direct') !== (op === 'load'))
      fail(`${op}: the fd name "direct" is ${op === 'load' ? 'required' : 'reserved'} for the direct transport`);
  } else if ((h.fds ?? []).includes('direct') && op !== 'load')
    fail(`${op}: the fd name "direct" is reserved for the direct transport`);
  if (h.size > 0 && h.transport !== 'memfd' && h.sha256 === undefined && !h.trailer)
    fail(`${op}: "sha256" (or "trailer": true) is required for a streamed state`);
  return h;
}

function offeredChecksum(o: Record<string, unknown>): Checksum {
  if (!CHECKSUMS.includes(o.checksum as Checksum) || o.trailer !== true)
    fail(`dump: "checksum" must be one of ${CHECKSUMS.join(', ')}, and only with "trailer": true`);
  return o.checksum as Checksum;
}

/** The trailer's digest as the header's algorithm says, or null when the trailer carries the other one. */
export function trailerDigest(m: TrailerDigest, checksum: Checksum | undefined): string | null {
  return (checksum === 'crc32' ? m.crc32 : m.sha256) ?? null;
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
      if (o.handoff !== undefined && (o.handoff !== true || o.fds === false))
        fail('hello: "handoff" must be true, and only from a client that can receive fds');
      if (
        o.checksums !== undefined &&
        (!Array.isArray(o.checksums) ||
          o.checksums.length > 16 ||
          !o.checksums.every((c) => typeof c === 'string' && c.length <= 32))
      ) {
        fail('hello: "checksums" must be a list of at most 16 names');
      }
      return {
        op: 'hello',
        v: o.v,
        ...(o.fds === false ? { fds: false } : {}),
        ...(o.trailer === true ? { trailer: true as const } : {}),
        ...(o.direct === true ? { direct: true as const } : {}),
        ...(o.handoff === true ? { handoff: true as const } : {}),
        // Names this Aeterna does not know are ignored (a later client may know more).
        ...(Array.isArray(o.checksums)
          ? { checksums: CHECKSUMS.filter((c) => (o.checksums as unknown[]).includes(c)) }
          : {}),
      };
    case 'welcome':
      return {
        op: 'welcome',
        v: Number(o.v),
        generation: Number(o.generation),
        max_frame: Number(o.max_frame),
        ...(o.checkpoint === true ? { checkpoint: true as const } : {}),
        ...(o.direct === true ? { direct: true as const } : {}),
        ...(o.handoff === true ? { handoff: true as const } : {}),
      };
    case 'load':
      return {
        op: 'load',
        ...header(o, 'load'),
        ...(o.final === true ? { final: true } : {}),
        ...(o.source === 'relay' || o.source === 'checkpoint' ? { source: o.source } : {}),
        ...(Number.isSafeInteger(o.seq) ? { seq: o.seq as number } : {}),
        ...(Number.isSafeInteger(o.age_ms) ? { age_ms: o.age_ms as number } : {}),
      };
    case 'state':
      return { op: 'state', ...header(o, 'state') };
    case 'checkpoint':
      return { op: 'checkpoint', ...header(o, 'checkpoint') };
    case 'checkpointed':
      return {
        op: 'checkpointed',
        ...(Number.isSafeInteger(o.seq) ? { seq: o.seq as number } : {}),
        ...(typeof o.code === 'string' ? { code: o.code.slice(0, 64) } : {}),
        ...(typeof o.message === 'string' ? { message: o.message.slice(0, 4096) } : {}),
      };
    case 'ack': {
      if (typeof o.ok !== 'boolean') fail('ack: "ok" must be true or false');
      const error = optionalString(o, 'error', 4096);
      return error === undefined ? { op: 'ack', ok: o.ok } : { op: 'ack', ok: o.ok, error };
    }
    case 'ready':
      return { op: 'ready' };
    case 'dump':
      if (o.direct !== undefined && (o.direct !== true || o.trailer !== true || o.final === true))
        fail('dump: "direct" must be true, and only with "trailer": true on a non-final dump');
      if (o.handoff !== undefined && (o.handoff !== true || o.final !== true))
        fail('dump: "handoff" must be true, and only on a final dump');
      {
        const pairName = o.direct === true ? 'direct' : o.handoff === true ? 'handoff' : null;
        const named = Array.isArray(o.fds) && o.fds.length === 1 ? (o.fds[0] as unknown) : undefined;
        if ((pairName === null && o.fds !== undefined) || (pairName !== null && named !== pairName))
          fail('dump: "fds" must be ["direct"] exactly when "direct" is true, ["handoff"] when "handoff" is');
      }
      return {
        op: 'dump',
        ...(o.direct === true ? { direct: true as const, fds: ['direct'] } : {}),
        ...(o.handoff === true ? { handoff: true as const, fds: ['handoff'] } : {}),
        final: o.final === true,
        ...(Number.isSafeInteger(o.timeout_ms) && (o.timeout_ms as number) > 0
          ? { timeout_ms: o.timeout_ms as number }
          : {}),
        ...(o.trailer === true ? { trailer: true as const } : {}),
        ...(o.checksum !== undefined ? { checksum: offeredChecksum(o) } : {}),
      };
    case 'handoff':
      if (!Array.isArray(o.fds) || o.fds.length !== 1 || o.fds[0] !== 'handoff')
        fail('handoff: "fds" must be ["handoff"]');
      return { op: 'handoff', fds: ['handoff'] };
    case 'trailer': {
      const sha256 = optionalSha256(o, 'trailer');
      const crc32 = optionalString(o, 'crc32', 8);
      if (crc32 !== undefined && !/^[0-9a-f]{8}$/.test(crc32)) fail('trailer: "crc32" must be 8 lowercase hex digits');
      if ((sha256 === undefined) === (crc32 === undefined))
        fail('trailer: exactly one of "sha256" and "crc32" is required');
      return sha256 !== undefined ? { op: 'trailer', sha256 } : { op: 'trailer', crc32: crc32! };
    }
    case 'error':
      return {
        op: 'error',
        // A peer's error fields are shown whatever their type (an object prints as [object Object]), never refused.
        // eslint-disable-next-line @typescript-eslint/no-base-to-string
        code: String(o.code ?? 'unknown').slice(0, 64),
        // eslint-disable-next-line @typescript-eslint/no-base-to-string
        message: String(o.message ?? '').slice(0, 4096),
      };
  }
}

/** A control message as a whole frame. */
export function encodeMessage(message: Message): Buffer {
  return encodeFrame(Buffer.from(JSON.stringify(message)));
}

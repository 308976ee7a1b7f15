// The durable checkpoint file (state_handoff.checkpoint.path): written so that
// a crash at any point leaves either the previous file or the new one whole
// (temporary file in the same directory, every write checked, fsync, rename,
// fsync of the directory), in a small self-describing format, so a file that is
// corrupt, cut short or of another version is recognised and never offered to
// the app. Its magic is how Aeterna knows a file it wrote: a file at the path
// without it is someone else's, and Aeterna never renames or replaces it.
//
//   offset  size  field
//   0       8     magic "AETCKPT\n"
//   8       4     version (1), big-endian
//   12      8     size of the data, big-endian
//   20      32    sha256 of the data
//   52      8     seq, big-endian
//   60      8     when it was stored (ms since the epoch), big-endian
//   68      2     length of the encoding name, big-endian
//   70      n     the encoding name (UTF-8)
//   70+n    size  the data
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { native } from '../native/binding';
import { openRegularFile } from '../regular-file';
import { closeQuietly } from './codec';
import { MAX_ENCODING_LENGTH } from './messages';

const MAGIC = Buffer.from('AETCKPT\n');
export const CHECKPOINT_FILE_VERSION = 1;
const FIXED = 70;
/** Bytes copied at a time: what the file's bytes cost in memory, whatever its size. */
const CHUNK = 1 << 20;

/** The app's latest checkpoint as Aeterna keeps it (in a memfd) and as a durable file describes it. */
export interface Checkpoint {
  /** A sealed memfd holding the bytes. */
  fd: number;
  size: number;
  seq: number;
  encoding: string;
  /** Date.now() when it was stored. */
  savedAt: number;
  /** sha256 of the bytes (hex), once known (streamed and file checkpoints at once, a memfd one when first asked). */
  sha256?: string;
}

function header(c: Omit<Checkpoint, 'fd'>, sha256: Buffer): Buffer {
  const encoding = Buffer.from(c.encoding);
  const h = Buffer.alloc(FIXED + encoding.length);
  MAGIC.copy(h, 0);
  h.writeUInt32BE(CHECKPOINT_FILE_VERSION, 8);
  h.writeBigUInt64BE(BigInt(c.size), 12);
  sha256.copy(h, 20);
  h.writeBigUInt64BE(BigInt(c.seq), 52);
  h.writeBigUInt64BE(BigInt(c.savedAt), 60);
  h.writeUInt16BE(encoding.length, 68);
  encoding.copy(h, FIXED);
  return h;
}

/** Hash the memfd's bytes (read in chunks; positional reads leave its offset alone). */
export async function hashFd(fd: number, size: number, buffer: Buffer = Buffer.allocUnsafe(CHUNK)): Promise<Buffer> {
  const hash = crypto.createHash('sha256');
  for (let off = 0; off < size;) {
    const { bytesRead } = await readAt(fd, buffer, Math.min(buffer.length, size - off), off);
    if (bytesRead === 0) throw new Error(`checkpoint ended after ${off} of ${size} bytes`);
    hash.update(buffer.subarray(0, bytesRead));
    off += bytesRead;
  }
  return hash.digest();
}

export function readAt(fd: number, buffer: Buffer, length: number, position: number): Promise<{ bytesRead: number }> {
  return new Promise((resolve, reject) =>
    fs.read(fd, buffer, 0, length, position, (err, bytesRead) => (err ? reject(err) : resolve({ bytesRead }))),
  );
}

/** Write all of `data` at `position` (a short write is continued; a write that makes no progress fails). */
async function writeAll(out: fs.promises.FileHandle, data: Buffer, position: number): Promise<void> {
  for (let off = 0; off < data.length;) {
    const { bytesWritten } = await out.write(data, off, data.length - off, position + off);
    if (bytesWritten <= 0) throw new Error(`wrote nothing at byte ${position + off}`);
    off += bytesWritten;
  }
}

/** Numbers the temporary files of this process: with O_EXCL, a leftover of an earlier Aeterna is never reused. */
let tempCounter = 0;

/** Whether `entry` (a name in the same directory) is one of the temporary files of `file`: `.<name>.<pid>.<n>.tmp` beside it. */
export function isTempOf(file: string, entry: string): boolean {
  const base = path.basename(file);
  return entry.startsWith(`.${base}.`) && /^\d+\.\d+\.tmp$/.test(entry.slice(base.length + 2));
}

/** Create a new temporary file beside `file` (never one that exists: O_EXCL). */
async function createTemp(file: string): Promise<{ temp: string; out: fs.promises.FileHandle }> {
  for (let tries = 0; ; tries++) {
    const temp = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.${++tempCounter}.tmp`);
    try {
      return {
        temp,
        out: await fs.promises.open(temp, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600),
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST' || tries >= 100) throw err;
    }
  }
}

/**
 * Remove the temporary files an earlier Aeterna left beside `file` when it was killed mid-write: only those
 * named as Aeterna names them and that are empty or start with its magic. Returns the names removed.
 */
export function removeLeftoverTemps(file: string): string[] {
  const removed: string[] = [];
  let entries: string[];
  try {
    entries = fs.readdirSync(path.dirname(file));
  } catch {
    return removed;
  }
  for (const entry of entries.filter((e) => isTempOf(file, e))) {
    const temp = path.join(path.dirname(file), entry);
    try {
      const st = fs.lstatSync(temp);
      if (!st.isFile() || (st.size > 0 && !isOwnFile(temp))) continue;
      fs.rmSync(temp, { force: true });
      removed.push(temp);
    } catch {
      // gone meanwhile, or not ours to judge
    }
  }
  return removed;
}

/**
 * Write `c` durably to `file`: the previous file stays whole until the rename. Off the event loop (libuv's
 * pool). Every write is checked; on any failure, or when `signal` aborts (Aeterna stops), the temporary file is
 * removed and the previous file is left as it was. Refuses to replace a file at `file` that Aeterna did not
 * write (no checkpoint magic).
 */
export async function writeCheckpointFile(file: string, c: Checkpoint, signal?: AbortSignal): Promise<void> {
  const buffer = Buffer.allocUnsafe(CHUNK);
  // Known for a streamed or loaded checkpoint (hashed as it arrived): read the bytes once, to copy them.
  const sha256 = c.sha256 !== undefined ? Buffer.from(c.sha256, 'hex') : await hashFd(c.fd, c.size, buffer);
  const stopped = (): void => {
    if (signal?.aborted) throw new Error('Aeterna is stopping: the write was abandoned');
  };
  stopped();
  const { temp, out } = await createTemp(file);
  // Aeterna may exit before this write's next step: the temporary file goes now, synchronously.
  const onAbort = (): void => fs.rmSync(temp, { force: true });
  signal?.addEventListener('abort', onAbort, { once: true });
  try {
    try {
      const head = header(c, sha256);
      await writeAll(out, head, 0);
      for (let off = 0; off < c.size;) {
        stopped();
        const { bytesRead } = await readAt(c.fd, buffer, Math.min(CHUNK, c.size - off), off);
        if (bytesRead === 0) throw new Error(`checkpoint ended after ${off} of ${c.size} bytes`);
        await writeAll(out, buffer.subarray(0, bytesRead), head.length + off);
        off += bytesRead;
      }
      await out.sync();
      const written = (await out.stat()).size;
      if (written !== head.length + c.size)
        throw new Error(`the temporary file holds ${written} bytes, ${head.length + c.size} were written`);
    } finally {
      await out.close();
    }
    stopped();
    if (!isOwnFile(file))
      throw new Error(`${file} exists and is not a checkpoint file Aeterna wrote: Aeterna does not replace it`);
    await fs.promises.rename(temp, file);
  } catch (err) {
    await fs.promises.rm(temp, { force: true });
    throw err;
  } finally {
    signal?.removeEventListener('abort', onAbort);
  }
  const dir = await fs.promises.open(path.dirname(file), 'r');
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
}

/**
 * Whether Aeterna may replace `file`: absent, or a regular file that starts with the checkpoint magic (a file it
 * wrote). Never blocks (a FIFO is not opened for reading, only looked at).
 */
export function isOwnFile(file: string): boolean {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(file);
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'ENOENT';
  }
  if (!st.isFile()) return false;
  let fd: number;
  try {
    fd = openRegularFile(file).fd;
  } catch {
    return false;
  }
  try {
    const magic = Buffer.alloc(MAGIC.length);
    return fs.readSync(fd, magic, 0, MAGIC.length, 0) === MAGIC.length && magic.equals(MAGIC);
  } finally {
    closeQuietly(fd);
  }
}

/** Why a checkpoint file of Aeterna's own was not loaded (corrupt, cut short, another version, a forbidden header). */
export class CheckpointFileCorrupt extends Error {}

/** The file at the path is not one Aeterna wrote (no checkpoint magic, or not a regular file): it is left alone. */
export class CheckpointFileForeign extends Error {}

/** A valid checkpoint file larger than max_size allows now: not loaded, left where it is. */
export class CheckpointFileTooLarge extends Error {}

/**
 * Load `file` into a sealed memfd, verified: null when there is no file. Throws CheckpointFileForeign when it is
 * not a file Aeterna wrote, CheckpointFileTooLarge when its data is above `maxSize`, CheckpointFileCorrupt when
 * it is corrupt, cut short, of another version or has a header the protocol forbids (an `encoding` above 64
 * characters, a `seq` above 2^53 - 1, which JSON readers would round). At start only (synchronous, a chunk at a
 * time; the file is opened without blocking and must be a regular file).
 */
export function readCheckpointFile(file: string, maxSize: number): Checkpoint | null {
  let fd: number;
  let total: number;
  try {
    ({ fd, size: total } = openRegularFile(file));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    if (err instanceof Error && err.name === 'NotARegularFile') throw new CheckpointFileForeign(err.message);
    throw err;
  }
  let memfd = -1;
  try {
    const fixed = Buffer.alloc(FIXED);
    const got = total >= MAGIC.length ? fs.readSync(fd, fixed, 0, Math.min(FIXED, total), 0) : 0;
    if (got < MAGIC.length || !fixed.subarray(0, 8).equals(MAGIC))
      throw new CheckpointFileForeign(
        `${file} is not a checkpoint file (it does not start with Aeterna's checkpoint magic)`,
      );
    if (got !== FIXED) throw new CheckpointFileCorrupt(`${total} bytes, shorter than its ${FIXED}-byte header`);
    const version = fixed.readUInt32BE(8);
    if (version !== CHECKPOINT_FILE_VERSION)
      throw new CheckpointFileCorrupt(`version ${version}, this Aeterna reads ${CHECKPOINT_FILE_VERSION}`);
    const bigSize = fixed.readBigUInt64BE(12);
    const sha256 = fixed.subarray(20, 52);
    const bigSeq = fixed.readBigUInt64BE(52);
    if (bigSeq < 1n || bigSeq > BigInt(Number.MAX_SAFE_INTEGER))
      throw new CheckpointFileCorrupt(`seq ${bigSeq} is outside 1..2^53-1 (a JSON reader could not read it exactly)`);
    const seq = Number(bigSeq);
    const savedAt = Number(fixed.readBigUInt64BE(60));
    const encodingLength = fixed.readUInt16BE(68);
    if (encodingLength > MAX_ENCODING_LENGTH * 4)
      throw new CheckpointFileCorrupt(
        `an encoding name of ${encodingLength} bytes (the protocol allows ${MAX_ENCODING_LENGTH} characters)`,
      );
    const encodingBytes = Buffer.alloc(encodingLength);
    if (fs.readSync(fd, encodingBytes, 0, encodingLength, FIXED) !== encodingLength)
      throw new CheckpointFileCorrupt('cut short in its header');
    const encoding = encodingBytes.toString('utf8');
    if (encoding.length > MAX_ENCODING_LENGTH)
      throw new CheckpointFileCorrupt(
        `an encoding name of ${encoding.length} characters (the protocol allows ${MAX_ENCODING_LENGTH})`,
      );
    const start = FIXED + encodingLength;
    if (BigInt(total) !== BigInt(start) + bigSize)
      throw new CheckpointFileCorrupt(`holds ${total - start} bytes of data, its header says ${bigSize}`);
    const size = Number(bigSize);
    if (size > maxSize)
      throw new CheckpointFileTooLarge(
        `its ${size} bytes exceed orchestration.state_handoff.checkpoint.max_size (${maxSize} bytes)`,
      );
    memfd = native.memfdCreate('aeterna-checkpoint');
    const buffer = Buffer.allocUnsafe(CHUNK);
    const hash = crypto.createHash('sha256');
    for (let off = 0; off < size;) {
      const n = fs.readSync(fd, buffer, 0, Math.min(CHUNK, size - off), start + off);
      if (n === 0) throw new CheckpointFileCorrupt(`cut short after ${off} of ${size} bytes`);
      hash.update(buffer.subarray(0, n));
      for (let w = 0; w < n;) w += fs.writeSync(memfd, buffer, w, n - w, off + w);
      off += n;
    }
    if (!hash.digest().equals(sha256)) throw new CheckpointFileCorrupt('its data does not match its sha256');
    native.sealMemfd(memfd);
    const loaded = { fd: memfd, size, seq, encoding, savedAt, sha256: sha256.toString('hex') };
    memfd = -1;
    return loaded;
  } finally {
    if (memfd >= 0) closeQuietly(memfd);
    closeQuietly(fd);
  }
}

/** The seq in the header of Aeterna's checkpoint file at `file`, or null (absent, unreadable, not one of its files). */
export function fileSeq(file: string): number | null {
  if (!isOwnFile(file)) return null;
  try {
    const { fd } = openRegularFile(file);
    try {
      const fixed = Buffer.alloc(FIXED);
      if (fs.readSync(fd, fixed, 0, FIXED, 0) !== FIXED) return null;
      return Number(fixed.readBigUInt64BE(52));
    } finally {
      closeQuietly(fd);
    }
  } catch {
    return null;
  }
}

// The durable checkpoint file (state_handoff.checkpoint.path): written so that
// a crash at any point leaves either the previous file or the new one whole
// (temporary file in the same directory, fsync, rename, fsync of the directory),
// in a small self-describing format, so a file that is corrupt, cut short or of
// another version is recognised and never offered to the app.
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
import { closeQuietly } from './codec';

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
  for (let off = 0; off < size; ) {
    const { bytesRead } = await readAt(fd, buffer, Math.min(buffer.length, size - off), off);
    if (bytesRead === 0) throw new Error(`checkpoint ended after ${off} of ${size} bytes`);
    hash.update(buffer.subarray(0, bytesRead));
    off += bytesRead;
  }
  return hash.digest();
}

export function readAt(fd: number, buffer: Buffer, length: number, position: number): Promise<{ bytesRead: number }> {
  return new Promise((resolve, reject) => fs.read(fd, buffer, 0, length, position, (err, bytesRead) => (err ? reject(err) : resolve({ bytesRead }))));
}

/** Write `c` durably to `file`: the previous file stays whole until the rename. Off the event loop (libuv's pool). */
export async function writeCheckpointFile(file: string, c: Checkpoint): Promise<void> {
  const buffer = Buffer.allocUnsafe(CHUNK);
  // Known for a streamed or loaded checkpoint (hashed as it arrived): read the bytes once, to copy them.
  const sha256 = c.sha256 !== undefined ? Buffer.from(c.sha256, 'hex') : await hashFd(c.fd, c.size, buffer);
  const temp = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp`);
  const out = await fs.promises.open(temp, 'w', 0o600);
  try {
    await out.write(header(c, sha256));
    for (let off = 0; off < c.size; ) {
      const { bytesRead } = await readAt(c.fd, buffer, Math.min(CHUNK, c.size - off), off);
      if (bytesRead === 0) throw new Error(`checkpoint ended after ${off} of ${c.size} bytes`);
      await out.write(buffer, 0, bytesRead);
      off += bytesRead;
    }
    await out.sync();
  } catch (err) {
    await out.close().catch(() => undefined);
    await fs.promises.rm(temp, { force: true });
    throw err;
  }
  await out.close();
  await fs.promises.rename(temp, file);
  const dir = await fs.promises.open(path.dirname(file), 'r');
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
}

/** Why a checkpoint file was not loaded. */
export class CheckpointFileCorrupt extends Error {}

/**
 * Load `file` into a sealed memfd, verified: null when there is no file; throws CheckpointFileCorrupt when it
 * is corrupt, cut short or of another version. At start only (synchronous, a chunk at a time).
 */
export function readCheckpointFile(file: string): Checkpoint | null {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
  let memfd = -1;
  try {
    const total = fs.fstatSync(fd).size;
    const fixed = Buffer.alloc(FIXED);
    if (total < FIXED || fs.readSync(fd, fixed, 0, FIXED, 0) !== FIXED) throw new CheckpointFileCorrupt(`${total} bytes, shorter than its ${FIXED}-byte header`);
    if (!fixed.subarray(0, 8).equals(MAGIC)) throw new CheckpointFileCorrupt('not a checkpoint file (wrong magic)');
    const version = fixed.readUInt32BE(8);
    if (version !== CHECKPOINT_FILE_VERSION) throw new CheckpointFileCorrupt(`version ${version}, this Aeterna reads ${CHECKPOINT_FILE_VERSION}`);
    const size = Number(fixed.readBigUInt64BE(12));
    const sha256 = fixed.subarray(20, 52);
    const seq = Number(fixed.readBigUInt64BE(52));
    const savedAt = Number(fixed.readBigUInt64BE(60));
    const encodingLength = fixed.readUInt16BE(68);
    const encoding = Buffer.alloc(encodingLength);
    if (fs.readSync(fd, encoding, 0, encodingLength, FIXED) !== encodingLength) throw new CheckpointFileCorrupt('cut short in its header');
    const start = FIXED + encodingLength;
    if (total !== start + size) throw new CheckpointFileCorrupt(`holds ${total - start} bytes of data, its header says ${size}`);
    memfd = native.memfdCreate('aeterna-checkpoint');
    const buffer = Buffer.allocUnsafe(CHUNK);
    const hash = crypto.createHash('sha256');
    for (let off = 0; off < size; ) {
      const n = fs.readSync(fd, buffer, 0, Math.min(CHUNK, size - off), start + off);
      if (n === 0) throw new CheckpointFileCorrupt(`cut short after ${off} of ${size} bytes`);
      hash.update(buffer.subarray(0, n));
      for (let w = 0; w < n; ) w += fs.writeSync(memfd, buffer, w, n - w, off + w);
      off += n;
    }
    if (!hash.digest().equals(sha256)) throw new CheckpointFileCorrupt('its data does not match its sha256');
    native.sealMemfd(memfd);
    const loaded = { fd: memfd, size, seq, encoding: encoding.toString('utf8'), savedAt, sha256: sha256.toString('hex') };
    memfd = -1;
    return loaded;
  } finally {
    if (memfd >= 0) closeQuietly(memfd);
    closeQuietly(fd);
  }
}

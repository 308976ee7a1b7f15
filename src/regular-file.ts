// Opening a file Aeterna reads (its config, the checkpoint file) without ever
// blocking on it: open(2) of a FIFO waits for a writer, and reading a FIFO or a
// device waits or never ends. So the file is opened O_NONBLOCK (a FIFO opens at
// once that way), fstat'd, and refused unless it is a regular file. Reads of a
// regular file ignore O_NONBLOCK: what follows reads it as usual.
import fs from 'node:fs';

/** The path names something other than a regular file (a FIFO, a device, a socket, a directory). */
export class NotARegularFile extends Error {
  constructor(
    readonly file: string,
    readonly kind: string,
  ) {
    super(`${file} is ${kind}, not a regular file`);
    this.name = 'NotARegularFile';
  }
}

function kindOf(st: fs.Stats): string {
  if (st.isFIFO()) return 'a FIFO';
  if (st.isCharacterDevice()) return 'a character device';
  if (st.isBlockDevice()) return 'a block device';
  if (st.isSocket()) return 'a socket';
  if (st.isDirectory()) return 'a directory';
  return 'not a regular file';
}

/**
 * Open `file` for reading without blocking, and only if it is a regular file (symlinks followed): returns the
 * fd (close-on-exec, as Node opens every fd) and its size. Throws NotARegularFile, or the open's own error
 * (ENOENT among them).
 */
export function openRegularFile(file: string): { fd: number; size: number } {
  const fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK | fs.constants.O_NOCTTY);
  try {
    const st = fs.fstatSync(fd);
    if (!st.isFile()) throw new NotARegularFile(file, kindOf(st));
    return { fd, size: st.size };
  } catch (err) {
    fs.closeSync(fd);
    throw err;
  }
}

// Where Aeterna's sockets go when aeterna.yaml does not say: as root (in a
// container) /var/run; as any other user, who cannot write there, a private
// directory of that user: $XDG_RUNTIME_DIR/aeterna when XDG_RUNTIME_DIR is set
// (a per-user 0700 directory, by the XDG spec), else /tmp/aeterna-<uid>,
// created 0700. The daemon and the CLI derive the same path, so `aeterna
// status` finds a daemon started with the same config by the same user.
import fs from 'node:fs';
import path from 'node:path';
import { AeternaError } from '../errors';

/** Root's runtime directory; the schema's defaults are under it. */
export const ROOT_RUNTIME_DIR = '/var/run';
export const DEFAULT_CONTROL_SOCKET = 'aeterna.sock';
export const DEFAULT_STATE_SOCKET = 'aeterna-state.sock';

/** The directory of the default socket paths for this user. */
export function defaultRuntimeDir(uid = process.getuid!(), env: NodeJS.ProcessEnv = process.env): string {
  if (uid === 0) return ROOT_RUNTIME_DIR;
  const xdg = env['XDG_RUNTIME_DIR'];
  if (xdg !== undefined && path.isAbsolute(xdg)) return path.join(xdg, 'aeterna');
  return `/tmp/aeterna-${uid}`;
}

/**
 * Create the non-root runtime directory (mode 0700) and make sure it is this
 * user's own and private: in /tmp another user could have made it first
 * (or a symlink) to read or replace our sockets.
 */
export function ensurePrivateRuntimeDir(dir: string, uid = process.getuid!()): void {
  const fail = (why: string, cause?: unknown): never => {
    throw new AeternaError(
      'E_LISTEN_FAILED',
      `the runtime directory ${dir} ${why}; remove it, or set control.socket_path (and orchestration.state_handoff.socket_path) to paths this user owns`,
      { cause },
    );
  };
  try {
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  } catch (err) {
    fail(`cannot be created: ${(err as Error).message}`, err);
  }
  const stat = fs.lstatSync(dir);
  if (!stat.isDirectory()) fail('is not a directory');
  if (stat.uid !== uid) fail(`belongs to uid ${stat.uid}, not to this user (uid ${uid})`);
  if ((stat.mode & 0o077) !== 0)
    fail(`is accessible to other users (mode ${(stat.mode & 0o777).toString(8)}, expected 700)`);
}

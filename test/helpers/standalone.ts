// The self-contained Aeterna (build/standalone/aeterna, `make standalone`) for the packaging tests: reused when it
// is newer than everything it is built from, else built (seconds: scripts/standalone.ts), so that a test never runs
// an executable older than the code under test.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT } from './aeterna';

export const STANDALONE = path.join(ROOT, 'build', 'standalone', 'aeterna');

function newestMtime(dir: string): number {
  let newest = 0;
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, entry.name);
    newest = Math.max(newest, entry.isDirectory() ? newestMtime(p) : fs.statSync(p).mtimeMs);
  }
  return newest;
}

/** What the executable is built from: the compiled code, the addon, the Node that builds it, package.json. */
function inputsMtime(): number {
  return Math.max(
    newestMtime(path.join(ROOT, 'dist', 'src')),
    fs.statSync(path.join(ROOT, 'build', 'Release', 'aeterna.node')).mtimeMs,
    fs.statSync(path.join(ROOT, 'dist', 'scripts', 'standalone.js')).mtimeMs,
    fs.statSync(path.join(ROOT, 'package.json')).mtimeMs,
    fs.statSync(process.execPath).mtimeMs,
  );
}

/** The path of an up-to-date build/standalone/aeterna, building it first when needed. */
export function standalone(): string {
  if (fs.existsSync(STANDALONE) && fs.statSync(STANDALONE).mtimeMs > inputsMtime()) return STANDALONE;
  // Built in a directory of its own, then renamed into place: two test files may ask at once.
  const out = fs.mkdtempSync(path.join(ROOT, 'build', 'standalone-'));
  try {
    const r = spawnSync(process.execPath, [path.join(ROOT, 'dist', 'scripts', 'standalone.js'), '--out', out], {
      encoding: 'utf8',
      timeout: 300_000,
    });
    if (r.status !== 0) throw new Error(`make standalone failed (${r.status ?? r.signal}):\n${r.stdout}\n${r.stderr}`);
    fs.mkdirSync(path.dirname(STANDALONE), { recursive: true });
    fs.renameSync(path.join(out, 'aeterna'), STANDALONE);
  } finally {
    fs.rmSync(out, { recursive: true, force: true });
  }
  return STANDALONE;
}

/** The real python3 (not a shim script), which the fixtures run. */
export function python3(): string | null {
  const r = spawnSync('python3', ['-c', 'import sys; print(sys.executable)'], { encoding: 'utf8' });
  return r.status === 0 && r.stdout.trim() !== '' ? r.stdout.trim() : null;
}

/** A directory for PATH that holds only the named programs (symlinks): no node, no npm. */
export function onlyOnPath(dir: string, programs: Record<string, string>): string {
  const bin = path.join(dir, 'bin');
  fs.mkdirSync(bin, { recursive: true });
  for (const [name, target] of Object.entries(programs)) fs.symlinkSync(target, path.join(bin, name));
  return bin;
}

/** The absolute path of a program on this process's PATH. */
export function which(program: string): string | null {
  for (const dir of (process.env['PATH'] ?? '').split(':')) {
    const p = path.join(dir, program);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      return p;
    } catch {
      // not here
    }
  }
  return null;
}

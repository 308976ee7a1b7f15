// Section 5: zombie reaping. bench/fixtures/helper.c makes N orphans (double
// fork), releases them all at once, and times until every one is gone from the
// process table, i.e. reaped by the supervisor. Run as the supervisor's app,
// with the supervisor as PID 1 of a new PID namespace (unshare; needs root),
// else as a child subreaper. The floor: the helper as its own subreaper,
// reaping with blocking waitpid().
import { BenchDaemon } from '../aeterna';
import { UNSHARE, nativeHelper, parseResult, pidNamespaceUnavailable, progress, run, which } from '../common';

interface HelperResult {
  orphans: number;
  create_ms: number;
  reap_ms: number;
  left: number;
}

export type ReapRow = { reapMs: number; createMs: number; left: number } | { skipped: string } | { error: string };

export interface ReapingSection {
  orphans: number;
  /** "PID 1 (unshare --pid)" or "child subreaper (...)" */
  mode: string;
  floor: ReapRow;
  aeterna: ReapRow;
  tini: ReapRow;
}

function row(stdout: string, code: number | null, stderr: string): ReapRow {
  const r = parseResult<HelperResult>(stdout);
  if (!r) return { error: `no result (exit ${code}): ${stderr.slice(-500)}` };
  return { reapMs: r.reap_ms, createMs: r.create_ms, left: r.left };
}

export async function reapingSection(orphans: number): Promise<ReapingSection> {
  const helper = nativeHelper();
  const noPid1 = pidNamespaceUnavailable();
  const mode = noPid1
    ? `child subreaper (${noPid1})`
    : 'PID 1 of a new PID namespace (unshare --pid --fork --mount-proc)';
  if ('error' in helper) {
    const skipped = { skipped: helper.error };
    return { orphans, mode, floor: skipped, aeterna: skipped, tini: skipped };
  }
  const argv = [helper.path, 'orphans', String(orphans)];
  const timeoutMs = 300000;

  progress(`  reaping: floor (${orphans} orphans)`);
  const f = await run([helper.path, 'orphans-self', String(orphans)], { timeoutMs });
  const floor = row(f.stdout, f.code, f.stderr);

  progress('  reaping: aeterna');
  let aeterna: ReapRow;
  const d = new BenchDaemon({ command: argv, restart: 'never', logLevel: 'info' }).start({ pid1: !noPid1 });
  const t = setTimeout(() => d.proc.child.kill('SIGKILL'), timeoutMs);
  try {
    const { code } = await d.proc.exited;
    aeterna = row(d.proc.stdout, code, d.proc.stderr);
  } finally {
    clearTimeout(t);
  }

  const tiniPath = which('tini');
  let tini: ReapRow = { skipped: 'tini not installed' };
  if (tiniPath) {
    progress('  reaping: tini');
    const r = await run(noPid1 ? [tiniPath, '-s', '--', ...argv] : [...UNSHARE, tiniPath, '--', ...argv], {
      timeoutMs,
    });
    tini = row(r.stdout, r.code, r.stderr);
  }
  return { orphans, mode, floor, aeterna, tini };
}

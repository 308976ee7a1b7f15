// `aeterna upgrade`: check the target, then re-execute in place. The target is
// first run (through the addon, like every process Aeterna starts) exactly as it
// will be exec'd, with a dry-run copy of the handover: it must load its code and
// the addon, read the handover and the config in it, and say it can take over,
// or the upgrade is refused and nothing changes. Then Aeterna execve()s itself:
// same pid, its children stay its children; if execve fails it goes on as before.
import fs from 'node:fs';
import { addonPath, isStandalone, native, type ExitInfo } from '../native/binding';
import { AeternaError } from '../errors';
import type { Reaper } from '../supervisor/reaper';
import { runCommand } from '../supervisor/command';
import { HANDOVER_ENV, HANDOVER_VERSION, writeHandover, type Handover } from './handover';

/** The check must answer within this time, or the target is refused. */
const CHECK_TIMEOUT_MS = 15_000;
/** What a target that reads this handover version prints (`start --check-handover V`). */
export function checkAnswer(version: string): string {
  return `aeterna reads handover version ${version}`;
}

/** What a target prints at the end of its dry run: it read the handover and the config in it. */
export function dryRunAnswer(version: number): string {
  return `aeterna can take over handover version ${version}`;
}

/**
 * The program to exec: `exec` with this daemon's arguments, else the same node and entry it was started from (the
 * self-contained build is both: its argv[1] is only the name it was called by).
 */
export function upgradeArgv(exec: string | undefined): string[] {
  const args = process.argv.slice(2);
  if (exec !== undefined) return [exec, ...args];
  if (isStandalone()) return [process.execPath, ...args];
  return [process.execPath, ...process.execArgv, process.argv[1], ...args];
}

/** This environment for the new program: without the socket activation variables (they were for the first exec). */
function environment(extra: Record<string, string>): string[] {
  const env = Object.entries(process.env).filter(
    ([k, v]) => v !== undefined && !k.startsWith('LISTEN_') && k !== HANDOVER_ENV,
  );
  return [...env.map(([k, v]) => `${k}=${v}`), ...Object.entries(extra).map(([k, v]) => `${k}=${v}`)];
}

/** The variables that make the exec'd program hold stop signals until its handlers exist (native/hold.cc). */
export const HOLD_ENV = 'AETERNA_HOLD_SIGNALS';
function holdingSignals(): Record<string, string> {
  const preload = process.env['LD_PRELOAD'];
  return { LD_PRELOAD: preload ? `${addonPath()}:${preload}` : addonPath(), [HOLD_ENV]: '1' };
}

/** The environment of Aeterna's own exec: `extra`, and stop signals held across it (LD_PRELOAD replaced, not doubled). */
function execEnvironment(extra: Record<string, string>): string[] {
  const hold = holdingSignals();
  return [
    ...environment(extra).filter((entry) => !Object.keys(hold).some((k) => entry.startsWith(`${k}=`))),
    ...Object.entries(hold).map(([k, v]) => `${k}=${v}`),
  ];
}

/**
 * Start the target as it will be exec'd (same argv, same environment) with `dryRun`, a copy of the handover that
 * says so, at its fd 3; throws E_UPGRADE_REFUSED unless it exits 0 saying it can take over this handover version.
 * A target that is not an Aeterna of this handover version, or that cannot load, or cannot read the handover or
 * the config in it, fails here, while the running Aeterna still serves.
 */
export async function checkTarget(argv: string[], dryRun: Handover, reaper: Reaper): Promise<void> {
  const out = native.memfdCreate('aeterna-upgrade-check');
  let doc: number | null = null;
  try {
    let info: ExitInfo;
    try {
      doc = writeHandover({ ...dryRun, dry_run: true });
      // Its process group is killed after CHECK_TIMEOUT_MS: a target that hangs refuses the upgrade.
      info = await runCommand(argv, {}, reaper, CHECK_TIMEOUT_MS, {
        env: environment({ [HANDOVER_ENV]: '3' }),
        stdio: [0, out, 2],
        fds: [doc],
      });
    } catch (err) {
      throw new AeternaError(
        'E_UPGRADE_REFUSED',
        `cannot run the upgrade target ${argv[0]}: ${(err as Error).message}; nothing changed`,
        { cause: err },
      );
    }
    const size = fs.fstatSync(out).size;
    const said = Buffer.alloc(Math.min(size, 4096));
    fs.readSync(out, said, 0, said.length, 0);
    const answer = said.toString('utf8').trim();
    if (info.code !== 0 || !answer.includes(dryRunAnswer(HANDOVER_VERSION))) {
      const how = info.signal !== null ? `was killed by signal ${info.signal}` : `exited ${info.code}`;
      throw new AeternaError(
        'E_UPGRADE_REFUSED',
        `the upgrade target ${argv.join(' ')} ${how} in its dry run${answer ? ` saying ${JSON.stringify(answer.slice(0, 200))}` : ''}` +
          `: it cannot take over handover version ${HANDOVER_VERSION}; nothing changed`,
      );
    }
  } finally {
    native.close(out);
    if (doc !== null) native.close(doc);
  }
}

/**
 * Every fd that survives the exec: Aeterna's stdin, stdout and stderr (Node marks them close-on-exec, and the
 * log goes to stderr), the handover's fds and the handover itself.
 */
function keptFds(handover: Handover, handoverFd: number): number[] {
  return [0, 1, 2, ...handover.fds.map((f) => f.fd), handoverFd];
}

/** Make a fatal signal exec argv[0] with `handover` (written now, with reason 'signal'); returns its memfd, which must stay open until replaced. */
export function prepareSignalExec(argv: string[], handover: Handover): number {
  const fd = writeHandover(handover);
  try {
    native.prepareFatalSignalExec(
      argv[0],
      argv,
      execEnvironment({ [HANDOVER_ENV]: String(fd) }),
      keptFds(handover, fd),
      true,
    );
  } catch (err) {
    native.close(fd);
    throw err;
  }
  return fd;
}

/** Replace this process with argv[0], handing `handover` over. Returns only if the exec failed (it throws then; nothing changed). */
export function reexec(argv: string[], handover: Handover): void {
  const fd = writeHandover(handover);
  try {
    native.execve(argv[0], argv, execEnvironment({ [HANDOVER_ENV]: String(fd) }), keptFds(handover, fd), true);
  } finally {
    native.close(fd);
  }
}

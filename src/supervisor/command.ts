// Short-lived helper commands Aeterna runs itself (the `exec` readiness probe).
// They go through the addon like the app does: the supervisor never uses
// child_process, whose children libuv would reap behind the reaper's back.
import os from 'node:os';
import { native, type ExitInfo } from '../native/binding';
import { signalIfAlive } from './signal';
import type { Reaper } from './reaper';

/** What a command gets instead of Aeterna's own: a whole environment, and its fds 0-2. */
export interface CommandIo {
  env?: string[];
  stdio?: [number, number, number];
  /** fds placed at 3, 4, ... (the upgrade check's dry-run handover); none by default. */
  fds?: number[];
}

/** Run argv with extra environment; SIGKILL its process group after timeoutMs. Throws when it cannot start. */
export async function runCommand(
  argv: string[],
  extraEnv: Record<string, string>,
  reaper: Reaper,
  timeoutMs: number,
  io: CommandIo = {},
): Promise<ExitInfo> {
  const env =
    io.env ??
    Object.entries({ ...process.env, ...extraEnv })
      .filter(([, v]) => v !== undefined)
      .map(([k, v]) => `${k}=${v}`);
  const pid = native.spawn({
    argv,
    env,
    fds: io.fds ?? [],
    listenPid: false,
    ...(io.stdio ? { stdio: io.stdio } : {}),
  });
  const exit = reaper.watch(pid);
  reaper.sweep();
  const timer = setTimeout(() => signalIfAlive(-pid, os.constants.signals.SIGKILL), timeoutMs);
  try {
    return await exit;
  } finally {
    clearTimeout(timer);
  }
}

// Reaps every child and orphan that reaches Aeterna, and reports the exits of
// the processes it was asked to watch.
//
// Why waitpid(-1) is safe here: the supervisor never uses node:child_process,
// so libuv owns no child processes whose exit status we could steal. Every
// process Aeterna starts goes through the addon's spawn. On SIGCHLD (signals
// coalesce, so one SIGCHLD may stand for many exits) we sweep until nothing is
// left: orphans re-parented to us (PID 1 or PR_SET_CHILD_SUBREAPER), orphans of
// orphans, and our own children alike.
import { EventEmitter } from 'node:events';
import { native, type ExitInfo } from '../native/binding';

export interface ReaperEvents {
  /** A watched process exited. */
  exit: [info: ExitInfo];
  /** An unwatched process (an orphan) was reaped. */
  orphan: [info: ExitInfo];
}

export class Reaper extends EventEmitter<ReaperEvents> {
  private readonly watched = new Map<number, (info: ExitInfo) => void>();
  private readonly onSigchld = (): void => this.sweep();
  private installed = false;
  /** How many unwatched processes (orphans) were reaped so far. */
  orphansReaped = 0;

  /** Become a subreaper and start listening for SIGCHLD. */
  install(): void {
    if (this.installed) return;
    this.installed = true;
    native.setChildSubreaper();
    process.on('SIGCHLD', this.onSigchld);
    // A child may have exited before the listener existed.
    this.sweep();
  }

  uninstall(): void {
    if (!this.installed) return;
    this.installed = false;
    process.off('SIGCHLD', this.onSigchld);
  }

  /** Report this pid's exit (as the promise and an 'exit' event) instead of counting it as an orphan. */
  watch(pid: number): Promise<ExitInfo> {
    return new Promise((resolve) => this.watched.set(pid, resolve));
  }

  /** Reap everything that has exited; never blocks. */
  sweep(): void {
    for (const info of native.reapAll()) {
      const resolve = this.watched.get(info.pid);
      if (resolve) {
        this.watched.delete(info.pid);
        resolve(info);
        this.emit('exit', info);
      } else {
        this.orphansReaped++;
        this.emit('orphan', info);
      }
    }
  }
}

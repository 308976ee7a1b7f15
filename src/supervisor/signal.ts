// Signalling processes that may have gone in the meantime: a generation's root
// that just exited, a process group whose last member left, an orphan reaped a
// moment ago. That is the normal case for a supervisor, not an error.
import { native } from '../native/binding';

/**
 * Send `signal` to `pid` (a negative pid: its process group). False when there
 * is nothing to signal (ESRCH: it has exited, or the group is empty) or the
 * process is not Aeterna's to signal (EPERM: a descendant that took another
 * uid, such as a setuid program, while Aeterna is not root). Other failures
 * (a bad pid or signal number) throw.
 */
export function signalIfAlive(pid: number, signal: number): boolean {
  try {
    native.kill(pid, signal);
    return true;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ESRCH' || code === 'EPERM') return false;
    throw err;
  }
}

// Stop signals held across Aeterna's own exec: see hold.cc.
#pragma once

#include <signal.h>
#include <sys/types.h>

// SIGTERM, SIGINT and SIGHUP: blocked right before Aeterna execs itself.
void HeldSignals(sigset_t* set);
// The new program's handlers exist: let the held signals (and any pending one) through.
void ReleaseHeldSignals();
// Blocking in one thread is not enough: a process-directed signal goes to any thread that does not block it
// (Node.js's worker threads block none of these), and libuv's handler there only leaves a note the exec discards.
// While guarded, a stop signal caught by any thread is re-sent to thread `tid` (the one that will exec, where it is
// blocked): it stays pending there, and pending signals survive execve. Async-signal-safe. Returns false if a guard
// was in place already (then only its thread changes).
bool GuardStopSignals(pid_t tid);
// The exec did not happen: the previous handlers (libuv's) are back; unblock afterwards to receive what waited.
void UnguardStopSignals();

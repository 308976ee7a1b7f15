// Stop signals held across Aeterna's own exec: see hold.cc.
#pragma once

#include <signal.h>

// SIGTERM, SIGINT and SIGHUP: blocked right before Aeterna execs itself.
void HeldSignals(sigset_t* set);
// The new program's handlers exist: let the held signals (and any pending one) through.
void ReleaseHeldSignals();

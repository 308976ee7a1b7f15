// Stop signals held across Aeterna's own exec (an upgrade, a recovery).
//
// As PID 1, a signal with no handler is dropped by the kernel; and Node.js, as it starts, unblocks
// every signal (PlatformInit) long before Aeterna's first line of JavaScript runs. A container
// runtime's one SIGTERM sent in that moment would be lost. So Aeterna blocks SIGTERM, SIGINT and
// SIGHUP right before it execs itself, and execs with this addon preloaded (LD_PRELOAD) and
// AETERNA_HOLD_SIGNALS=1: until releaseHeldSignals(), no call to sigprocmask or pthread_sigmask in
// the process can unblock them. A signal that arrives meanwhile stays pending; it is delivered once
// Aeterna's first module has installed its handlers and released them.
//
// Loaded the ordinary way (require), this addon's definitions of sigprocmask and pthread_sigmask are
// not used by anyone else (libc's come first), and AETERNA_HOLD_SIGNALS is unset: nothing changes.
#include "hold.h"

#include <dlfcn.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>

namespace {

using MaskFn = int (*)(int, const sigset_t*, sigset_t*);
// libc's own functions, found once at load (never in a signal handler).
MaskFn next_sigprocmask = nullptr;
MaskFn next_pthread_sigmask = nullptr;
std::atomic<bool> holding{false};

void AddHeld(sigset_t* set) {
  sigaddset(set, SIGTERM);
  sigaddset(set, SIGINT);
  sigaddset(set, SIGHUP);
}

void DeleteHeld(sigset_t* set) {
  sigdelset(set, SIGTERM);
  sigdelset(set, SIGINT);
  sigdelset(set, SIGHUP);
}

// A mask change as asked, except that while holding, the held signals stay blocked.
int Filtered(MaskFn next, int how, const sigset_t* set, sigset_t* old) {
  if (next == nullptr) return -1;
  if (!holding.load() || set == nullptr || how == SIG_BLOCK) return next(how, set, old);
  sigset_t kept = *set;
  if (how == SIG_SETMASK) AddHeld(&kept);
  if (how == SIG_UNBLOCK) DeleteHeld(&kept);
  return next(how, &kept, old);
}

__attribute__((constructor)) void FindNextAndHold() {
  next_sigprocmask = reinterpret_cast<MaskFn>(dlsym(RTLD_NEXT, "sigprocmask"));
  next_pthread_sigmask = reinterpret_cast<MaskFn>(dlsym(RTLD_NEXT, "pthread_sigmask"));
  const char* hold = getenv("AETERNA_HOLD_SIGNALS");
  if (hold != nullptr && strcmp(hold, "1") == 0 && next_pthread_sigmask != nullptr) holding.store(true);
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int sigprocmask(int how, const sigset_t* set, sigset_t* old) {
  return Filtered(next_sigprocmask, how, set, old);
}

extern "C" __attribute__((visibility("default"))) int pthread_sigmask(int how, const sigset_t* set, sigset_t* old) {
  return Filtered(next_pthread_sigmask, how, set, old);
}

extern "C" __attribute__((visibility("default"))) void aeterna_release_held_signals() {
  if (!holding.exchange(false)) return;
  sigset_t held;
  sigemptyset(&held);
  AddHeld(&held);
  next_pthread_sigmask(SIG_UNBLOCK, &held, nullptr);
}

void HeldSignals(sigset_t* set) {
  sigemptyset(set);
  AddHeld(set);
}

void ReleaseHeldSignals() {
  // The preloaded copy of this addon holds; a program exec'd with another install's addon preloaded releases that one.
  auto preloaded = reinterpret_cast<void (*)()>(dlsym(RTLD_DEFAULT, "aeterna_release_held_signals"));
  if (preloaded != nullptr) preloaded();
  aeterna_release_held_signals();
}

namespace {
const int kStopSignals[] = {SIGTERM, SIGINT, SIGHUP};
std::atomic<pid_t> exec_thread{0};
std::atomic<bool> guarded{false};
struct sigaction saved_stop[3];

void OnStopDuringExec(int sig) {
  pid_t tid = exec_thread.load();
  if (tid != 0) syscall(SYS_tgkill, getpid(), tid, sig);
}
}  // namespace

bool GuardStopSignals(pid_t tid) {
  exec_thread.store(tid);
  if (guarded.exchange(true)) return false;
  struct sigaction sa = {};
  sa.sa_handler = OnStopDuringExec;
  sigfillset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  for (int i = 0; i < 3; i++) sigaction(kStopSignals[i], &sa, &saved_stop[i]);
  return true;
}

void UnguardStopSignals() {
  if (!guarded.load()) return;
  for (int i = 0; i < 3; i++) sigaction(kStopSignals[i], &saved_stop[i], nullptr);
  exec_thread.store(0);
  guarded.store(false);
}

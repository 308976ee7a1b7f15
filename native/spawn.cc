// spawn.cc - fork/exec with exact fd placement (the addon's `spawn`).
//
// Everything the child needs is built before fork (a SpawnPlan); after fork the
// child runs RunChild, its steps in a fixed order, and reports a failure on a
// close-on-exec pipe that the parent reads: EOF means exec succeeded.

#include "spawn.h"

#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <string>
#include <vector>

#ifndef SYS_close_range
#define SYS_close_range 436  // same number on every architecture
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

namespace aeterna {

namespace {

// What went wrong in the child, sent back over the error pipe.
enum Stage { kCgroup, kSigmask, kSetsid, kMoveFd, kDup2, kCloseRange, kChdir, kSetgroups, kSetgid, kSetuid, kExecve };
const char* const kStageSyscall[] = {"write",  "sigprocmask", "setsid", "fcntl",  "dup2",  "close_range",
                                     "chdir",  "setgroups",   "setgid", "setuid", "execve"};
struct ChildError {
  int stage;
  int err;
};

// Everything the child needs, built before fork: after fork the child may only make
// async-signal-safe calls (another thread may have held the malloc lock at fork time),
// so it must not allocate, format or look anything up.
struct SpawnPlan {
  std::vector<std::string> args, envs;
  std::vector<char*> argv, envp;  // NULL-terminated, pointing into args/envs
  std::vector<std::string> paths;  // execve candidates, in order
  std::vector<char*> pid_slots;    // digit slots inside envs (LISTEN_PID, WATCHDOG_PID), filled in by the child
  std::string cwd;
  bool has_cwd = false;
  std::vector<int> sources;  // the child's fd i is sources[i]: stdio, then fds
  std::vector<int> moved;    // scratch space for the child
  int cgroup_procs = -1;  // an open cgroup.procs the child joins first, or -1
  bool has_uid = false, has_gid = false, has_groups = false;
  uid_t uid = 0;
  gid_t gid = 0;
  std::vector<gid_t> groups;
};

constexpr size_t kPidDigits = 20;  // a 64-bit number in decimal

[[noreturn]] void ChildFail(int error_fd, int stage, int err) {
  ChildError report{stage, err};
  ssize_t n;
  do n = write(error_fd, &report, sizeof report);
  while (n < 0 && errno == EINTR);
  _exit(127);
}

// Async-signal-safe itoa into the reserved slot.
void WriteDecimal(char* slot, long value) {
  char digits[kPidDigits];
  size_t n = 0;
  do {
    digits[n++] = static_cast<char>('0' + value % 10);
    value /= 10;
  } while (value > 0 && n < kPidDigits);
  for (size_t i = 0; i < n; i++) slot[i] = digits[n - 1 - i];
  slot[n] = '\0';
}

// Marks every fd >= first close-on-exec. close_range(CLOSE_RANGE_CLOEXEC) needs
// Linux 5.11; older kernels (still common on container hosts) get a plain loop.
bool CloexecFrom(int first) {
  if (syscall(SYS_close_range, static_cast<unsigned>(first), ~0U, CLOSE_RANGE_CLOEXEC) == 0) return true;
  if (errno != ENOSYS && errno != EINVAL) return false;
  rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) < 0) return false;
  for (rlim_t fd = first; fd < rl.rlim_cur && fd <= INT_MAX; fd++) fcntl(static_cast<int>(fd), F_SETFD, FD_CLOEXEC);
  return true;
}


// The child's way from fork to exec, one step each. Only async-signal-safe calls:
// a step that fails reports its stage and errno on the error pipe and exits 127
// (ChildFail); none returns on failure.

// Into the generation's cgroup before anything else (and while still root):
// writing "0" to cgroup.procs moves the writer. From here on every process the
// app starts is born in that cgroup and cannot leave it without the right to
// write to another cgroup's cgroup.procs.
void JoinCgroup(const SpawnPlan& plan, int error_fd) {
  if (plan.cgroup_procs < 0) return;
  ssize_t n;
  do n = write(plan.cgroup_procs, "0", 1);
  while (n < 0 && errno == EINTR);
  if (n != 1) ChildFail(error_fd, kCgroup, n < 0 ? errno : EIO);
}

// Handlers and ignored signals are Node's business, not the app's: SIG_IGN would
// survive execve (Node ignores SIGPIPE). The parent blocked every signal around
// fork, so no handler of Node's can run here before it is reset.
//
// The raw rt_sigaction syscall, not libc's sigaction(): glibc refuses (EINVAL)
// to touch the signals it reserves for itself (32 and 33), yet an ignored one
// of those inherited by Aeterna would otherwise reach the app. A kernel
// sigaction with handler SIG_DFL needs no restorer and an empty mask.
void ResetSignals(int error_fd) {
  struct {
    void (*handler)(int);
    unsigned long flags;
    void (*restorer)(void);
    uint64_t mask;
  } dfl = {SIG_DFL, 0, nullptr, 0};
  for (int sig = 1; sig <= 64; sig++) {
    if (sig != SIGKILL && sig != SIGSTOP) syscall(SYS_rt_sigaction, sig, &dfl, nullptr, sizeof dfl.mask);
  }
  sigset_t none;
  sigemptyset(&none);
  if (sigprocmask(SIG_SETMASK, &none, nullptr) < 0) ChildFail(error_fd, kSigmask, errno);
}

// Own session and process group: the group can be signalled as a whole. The
// child's pid is known from here on: fill in LISTEN_PID and the like.
void StartSession(SpawnPlan& plan, int error_fd) {
  if (setsid() < 0) ChildFail(error_fd, kSetsid, errno);
  for (char* slot : plan.pid_slots) WriteDecimal(slot, static_cast<long>(getpid()));
}

// Place fds. A source may sit at another source's target (fds [4, 3] swaps them),
// so first copy every source, and the error pipe, above the whole target range
// 0..n-1; then dup2 the copies down. dup2 clears close-on-exec on the target.
// Returns the error pipe's new fd.
int PlaceFds(SpawnPlan& plan, int error_fd) {
  const int n = static_cast<int>(plan.sources.size());
  int moved_error_fd = fcntl(error_fd, F_DUPFD_CLOEXEC, n);
  if (moved_error_fd < 0) ChildFail(error_fd, kMoveFd, errno);
  error_fd = moved_error_fd;
  for (int i = 0; i < n; i++) {
    plan.moved[i] = fcntl(plan.sources[i], F_DUPFD_CLOEXEC, n);
    if (plan.moved[i] < 0) ChildFail(error_fd, kMoveFd, errno);
  }
  for (int i = 0; i < n; i++) {
    if (dup2(plan.moved[i], i) < 0) ChildFail(error_fd, kDup2, errno);
  }
  // Whatever else Aeterna holds (the copies above, fds it inherited without
  // close-on-exec) closes at exec. The error pipe must stay open until exec
  // succeeds, which is exactly close-on-exec.
  if (!CloexecFrom(n)) ChildFail(error_fd, kCloseRange, errno);
  return error_fd;
}

// Groups and gid first: after setuid we no longer have the right to change them.
void SwitchIdentity(const SpawnPlan& plan, int error_fd) {
  if (plan.has_groups && setgroups(plan.groups.size(), plan.groups.data()) < 0) ChildFail(error_fd, kSetgroups, errno);
  if (plan.has_gid && setgid(plan.gid) < 0) ChildFail(error_fd, kSetgid, errno);
  if (plan.has_uid && setuid(plan.uid) < 0) ChildFail(error_fd, kSetuid, errno);
}

// chdir as the app's user, not as root (so after SwitchIdentity): a directory the
// app may not enter must fail here (EACCES, reported like an exec failure), not
// crash-loop the app later.
void EnterCwd(const SpawnPlan& plan, int error_fd) {
  if (plan.has_cwd && chdir(plan.cwd.c_str()) < 0) ChildFail(error_fd, kChdir, errno);
}

// execvp's search, without its allocations: a missing candidate moves on; a
// candidate we may not execute is reported only if nothing later works.
[[noreturn]] void FindAndExec(const SpawnPlan& plan, int error_fd) {
  int missing = ENOENT;
  bool denied = false;
  for (const std::string& path : plan.paths) {
    execve(path.c_str(), plan.argv.data(), plan.envp.data());
    if (errno == EACCES) {
      denied = true;
    } else if (errno == ENOENT || errno == ENOTDIR) {
      missing = errno;
    } else {
      ChildFail(error_fd, kExecve, errno);  // ENOEXEC, E2BIG, ETXTBSY...: this is the program, and it is broken
    }
  }
  ChildFail(error_fd, kExecve, denied ? EACCES : missing);
}

// Runs in the forked child. The order matters: see each step.
[[noreturn]] void RunChild(SpawnPlan& plan, int error_fd) {
  JoinCgroup(plan, error_fd);
  ResetSignals(error_fd);
  StartSession(plan, error_fd);
  error_fd = PlaceFds(plan, error_fd);
  SwitchIdentity(plan, error_fd);
  EnterCwd(plan, error_fd);
  FindAndExec(plan, error_fd);
}

bool BuildSpawnPlan(const Napi::Object& options, SpawnPlan* plan) {
  Napi::Env env = options.Env();
  Napi::Array argv, envs;
  if (!GetArray(options.Get("argv"), "argv", &argv) || !GetArray(options.Get("env"), "env", &envs)) return false;
  if (argv.Length() == 0) {
    Napi::TypeError::New(env, "argv must not be empty").ThrowAsJavaScriptException();
    return false;
  }
  for (uint32_t i = 0; i < argv.Length(); i++) {
    plan->args.emplace_back();
    if (!GetString(argv.Get(i), "argv[]", &plan->args.back())) return false;
  }
  // Variables whose value is the child's own pid, known only after fork.
  std::vector<std::string> pid_vars;
  if (options.Get("listenPid").ToBoolean()) pid_vars.push_back("LISTEN_PID");
  Napi::Value extra_pid_vars = options.Get("pidEnv");
  if (!extra_pid_vars.IsUndefined()) {
    Napi::Array names;
    if (!GetArray(extra_pid_vars, "pidEnv", &names)) return false;
    for (uint32_t i = 0; i < names.Length(); i++) {
      pid_vars.emplace_back();
      if (!GetString(names.Get(i), "pidEnv[]", &pid_vars.back())) return false;
    }
  }
  auto is_pid_var = [&pid_vars](const std::string& entry) {
    for (const std::string& name : pid_vars)
      if (entry.size() > name.size() && entry.compare(0, name.size(), name) == 0 && entry[name.size()] == '=') return true;
    return false;
  };
  std::string path_var = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
  bool found_path = false;
  for (uint32_t i = 0; i < envs.Length(); i++) {
    std::string entry;
    if (!GetString(envs.Get(i), "env[]", &entry)) return false;
    // A stale LISTEN_PID would shadow ours: getenv returns the first match.
    if (is_pid_var(entry)) continue;
    if (!found_path && entry.compare(0, 5, "PATH=") == 0) {
      path_var = entry.substr(5);
      found_path = true;
    }
    plan->envs.push_back(std::move(entry));
  }
  for (const std::string& name : pid_vars) plan->envs.push_back(name + "=" + std::string(kPidDigits + 1, '\0'));

  // Pointers only after the vectors stop growing.
  for (std::string& s : plan->args) plan->argv.push_back(&s[0]);
  plan->argv.push_back(nullptr);
  for (std::string& s : plan->envs) plan->envp.push_back(&s[0]);
  plan->envp.push_back(nullptr);
  for (size_t i = 0; i < pid_vars.size(); i++) {
    std::string& entry = plan->envs[plan->envs.size() - pid_vars.size() + i];
    plan->pid_slots.push_back(&entry[pid_vars[i].size() + 1]);
  }

  const std::string& file = plan->args[0];
  if (file.find('/') != std::string::npos) {
    plan->paths.push_back(file);
  } else {
    size_t start = 0;
    while (true) {
      size_t end = path_var.find(':', start);
      std::string dir = path_var.substr(start, end == std::string::npos ? std::string::npos : end - start);
      plan->paths.push_back(dir.empty() ? file : dir + "/" + file);  // empty entry = current directory
      if (end == std::string::npos) break;
      start = end + 1;
    }
  }

  Napi::Value cwd = options.Get("cwd");
  if (!IsAbsent(cwd)) {
    if (!GetString(cwd, "cwd", &plan->cwd)) return false;
    plan->has_cwd = true;
  }

  Napi::Value stdio = options.Get("stdio");
  if (IsAbsent(stdio)) {
    plan->sources = {0, 1, 2};
  } else {
    if (!GetFdList(stdio, "stdio", 3, &plan->sources)) return false;
    if (plan->sources.size() != 3) {
      Napi::TypeError::New(env, "stdio must have exactly 3 fds").ThrowAsJavaScriptException();
      return false;
    }
  }
  if (!GetFdList(options.Get("fds"), "fds", 65536, &plan->sources)) return false;
  plan->moved.resize(plan->sources.size());

  Napi::Value cgroup = options.Get("cgroupProcsFd");
  if (!IsAbsent(cgroup) && !GetFd(cgroup, "cgroupProcsFd", &plan->cgroup_procs)) return false;

  int64_t id;
  Napi::Value uid = options.Get("uid"), gid = options.Get("gid"), groups = options.Get("groups");
  if (!IsAbsent(uid)) {
    if (!GetInt(uid, "uid", 0, UINT32_MAX - 1, &id)) return false;
    plan->has_uid = true;
    plan->uid = static_cast<uid_t>(id);
  }
  if (!IsAbsent(gid)) {
    if (!GetInt(gid, "gid", 0, UINT32_MAX - 1, &id)) return false;
    plan->has_gid = true;
    plan->gid = static_cast<gid_t>(id);
  }
  if (!IsAbsent(groups)) {
    Napi::Array list;
    if (!GetArray(groups, "groups", &list)) return false;
    for (uint32_t i = 0; i < list.Length(); i++) {
      if (!GetInt(list.Get(i), "groups[]", 0, UINT32_MAX - 1, &id)) return false;
      plan->groups.push_back(static_cast<gid_t>(id));
    }
    plan->has_groups = true;
  }
  return true;
}

}  // namespace

Napi::Value Spawn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsObject()) return Throw(Napi::TypeError::New(env, "spawn: options must be an object"));
  SpawnPlan plan;
  if (!BuildSpawnPlan(info[0].As<Napi::Object>(), &plan)) return Napi::Value();
  std::string what = "spawn \"" + plan.args[0] + "\"";

  // A bad fd is the caller's bug; name it here rather than as a bare EBADF from the child.
  for (int fd : plan.sources) {
    if (fcntl(fd, F_GETFD) < 0) return Throw(SysError(env, errno, "fcntl", what + " (" + FdName(fd) + ")"));
  }

  int pipe_fds[2];
  if (pipe2(pipe_fds, O_CLOEXEC) < 0) return Throw(SysError(env, errno, "pipe2", what));

  // Block every signal across fork so the child cannot run one of Node's handlers
  // (which would write into the parent's libuv signal pipe) before it resets them.
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  pid_t pid = fork();
  if (pid == 0) {
    close(pipe_fds[0]);
    RunChild(plan, pipe_fds[1]);
  }
  int fork_err = errno;
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  close(pipe_fds[1]);
  if (pid < 0) {
    close(pipe_fds[0]);
    return Throw(SysError(env, fork_err, "fork", what));
  }

  // EOF means execve succeeded (the pipe was close-on-exec); a record means it did not.
  ChildError report{};
  ssize_t n;
  do n = read(pipe_fds[0], &report, sizeof report);
  while (n < 0 && errno == EINTR);
  close(pipe_fds[0]);
  if (n != static_cast<ssize_t>(sizeof report)) return Napi::Number::New(env, pid);

  // The child is exiting with 127; reap it here so it never reaches reapAll.
  int status;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (report.stage < kCgroup || report.stage > kExecve) report.stage = kExecve;
  switch (report.stage) {
    case kCgroup: what += " (joining its cgroup)"; break;
    case kChdir: what += " (cwd \"" + plan.cwd + "\")"; break;
    case kSetuid: what += " (uid " + std::to_string(plan.uid) + ")"; break;
    case kSetgid: what += " (gid " + std::to_string(plan.gid) + ")"; break;
    default: break;
  }
  return Throw(SysError(env, report.err, kStageSyscall[report.stage], what));
}

}  // namespace aeterna

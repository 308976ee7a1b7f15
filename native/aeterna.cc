// aeterna.cc - the native part of Aeterna.
//
// Only what Node cannot do lives here: fork/exec with exact fd placement,
// subreaping and reaping, SCM_RIGHTS and peer credentials, memfd sealing, and a
// uv_poll watcher for raw fds. There is no policy in this file; every decision
// (timeouts, protocol, what to spawn) is made in TypeScript. The JS surface is
// src/native/binding.ts.
//
// Errors are thrown as Error objects shaped like Node's system errors:
//   .code = errno name ('EADDRINUSE'), .errno = errno (positive), .syscall,
//   message = "<what>: <syscall>: <strerror> (<CODE>)".

#include <napi.h>
#include <uv.h>

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#ifndef SYS_close_range
#define SYS_close_range 436  // same number on every architecture
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

namespace {

constexpr int kReadable = 1;  // READABLE in binding.ts
constexpr int kWritable = 2;  // WRITABLE in binding.ts
constexpr int kMaxFdsPerMessage = 253;  // SCM_MAX_FD: the kernel refuses more in one message
constexpr int64_t kMaxMessageBytes = 64 << 20;

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

const char* ErrnoName(int err) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
  if (const char* name = strerrorname_np(err)) return name;
  return "EUNKNOWN";
#else
  // musl and old glibc have no strerrorname_np: name the errnos these calls can return.
  switch (err) {
#define NAME(e) \
  case e:       \
    return #e;
    NAME(EPERM) NAME(ENOENT) NAME(ESRCH) NAME(EINTR) NAME(EIO) NAME(ENXIO) NAME(E2BIG)
    NAME(ENOEXEC) NAME(EBADF) NAME(ECHILD) NAME(EAGAIN) NAME(ENOMEM) NAME(EACCES)
    NAME(EFAULT) NAME(EBUSY) NAME(EEXIST) NAME(ENOTDIR) NAME(EISDIR) NAME(EINVAL)
    NAME(ENFILE) NAME(EMFILE) NAME(ETXTBSY) NAME(ENOSPC) NAME(EROFS) NAME(EPIPE)
    NAME(ERANGE) NAME(ENAMETOOLONG) NAME(ENOSYS) NAME(ELOOP) NAME(ENOTSOCK)
    NAME(EMSGSIZE) NAME(EPROTONOSUPPORT) NAME(EOPNOTSUPP) NAME(EAFNOSUPPORT)
    NAME(EADDRINUSE) NAME(EADDRNOTAVAIL) NAME(ENETUNREACH) NAME(ECONNABORTED)
    NAME(ECONNRESET) NAME(ENOBUFS) NAME(ENOTCONN) NAME(ETIMEDOUT) NAME(ECONNREFUSED)
    NAME(ELIBBAD)
#undef NAME
    default:
      return "EUNKNOWN";
  }
#endif
}

Napi::Error MakeError(Napi::Env env, const std::string& message, const char* code, const char* syscall) {
  Napi::Error error = Napi::Error::New(env, message);
  error.Value().Set("code", code);
  error.Value().Set("syscall", syscall);
  return error;
}

// `what` names the object of the failed call: 'listen tcp://127.0.0.1:80', 'spawn "app"', 'fd 7'.
Napi::Error SysError(Napi::Env env, int err, const char* syscall, const std::string& what) {
  const char* code = ErrnoName(err);
  Napi::Error error =
      MakeError(env, what + ": " + syscall + ": " + strerror(err) + " (" + code + ")", code, syscall);
  error.Value().Set("errno", err);
  return error;
}

// Returning an empty value from a callback with an exception pending throws it in JS.
Napi::Value Throw(const Napi::Error& error) {
  error.ThrowAsJavaScriptException();
  return Napi::Value();
}

std::string FdName(int fd) { return "fd " + std::to_string(fd); }

// ---------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------

bool IsAbsent(const Napi::Value& v) { return v.IsUndefined() || v.IsNull(); }

bool GetInt(Napi::Value v, const char* name, int64_t lo, int64_t hi, int64_t* out) {
  Napi::Env env = v.Env();
  if (!v.IsNumber()) {
    Napi::TypeError::New(env, std::string(name) + " must be a number").ThrowAsJavaScriptException();
    return false;
  }
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= static_cast<double>(lo) && d <= static_cast<double>(hi)) || d != std::floor(d)) {
    Napi::RangeError::New(env, std::string(name) + " must be an integer in [" + std::to_string(lo) + ", " +
                                   std::to_string(hi) + "], got " + v.ToString().Utf8Value())
        .ThrowAsJavaScriptException();
    return false;
  }
  *out = static_cast<int64_t>(d);
  return true;
}

bool GetFd(Napi::Value v, const char* name, int* out) {
  int64_t n;
  if (!GetInt(v, name, 0, INT_MAX, &n)) return false;
  *out = static_cast<int>(n);
  return true;
}

// C strings end at the first NUL, so a JS string with one would silently mean something else.
bool GetString(Napi::Value v, const char* name, std::string* out) {
  if (!v.IsString()) {
    Napi::TypeError::New(v.Env(), std::string(name) + " must be a string").ThrowAsJavaScriptException();
    return false;
  }
  *out = v.As<Napi::String>().Utf8Value();
  if (out->find('\0') != std::string::npos) {
    Napi::TypeError::New(v.Env(), std::string(name) + " must not contain NUL bytes").ThrowAsJavaScriptException();
    return false;
  }
  return true;
}

bool GetArray(Napi::Value v, const char* name, Napi::Array* out) {
  if (!v.IsArray()) {
    Napi::TypeError::New(v.Env(), std::string(name) + " must be an array").ThrowAsJavaScriptException();
    return false;
  }
  *out = v.As<Napi::Array>();
  return true;
}

bool GetFdList(Napi::Value v, const char* name, size_t max, std::vector<int>* out) {
  Napi::Array array;
  if (!GetArray(v, name, &array)) return false;
  if (array.Length() > max) {
    Napi::RangeError::New(v.Env(), std::string(name) + ": at most " + std::to_string(max) + " fds")
        .ThrowAsJavaScriptException();
    return false;
  }
  for (uint32_t i = 0; i < array.Length(); i++) {
    int fd;
    if (!GetFd(array.Get(i), name, &fd)) return false;
    out->push_back(fd);
  }
  return true;
}

Napi::Array FdArray(Napi::Env env, const std::vector<int>& fds) {
  Napi::Array array = Napi::Array::New(env, fds.size());
  for (size_t i = 0; i < fds.size(); i++) array.Set(static_cast<uint32_t>(i), fds[i]);
  return array;
}

// ---------------------------------------------------------------------------
// Listeners
// ---------------------------------------------------------------------------

// getaddrinfo has its own error space; map it onto the codes Node's dns uses.
Napi::Error GaiError(Napi::Env env, int rc, const std::string& what) {
  if (rc == EAI_SYSTEM) return SysError(env, errno, "getaddrinfo", what);
  const char* code = rc == EAI_AGAIN ? "EAI_AGAIN" : rc == EAI_MEMORY ? "ENOMEM" : "ENOTFOUND";
  Napi::Error error =
      MakeError(env, what + ": getaddrinfo: " + gai_strerror(rc) + " (" + code + ")", code, "getaddrinfo");
  error.Value().Set("errno", rc);
  return error;
}

// One attempt at one resolved address. Returns the fd, or -1 with *failed = syscall and errno set.
int ListenOn(const addrinfo* ai, int backlog, const char** failed) {
  int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
  if (fd < 0) {
    *failed = "socket";
    return -1;
  }
  // Lets a restarted Aeterna bind while old connections sit in TIME_WAIT.
  int one = 1;
  if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0) {
    *failed = "setsockopt";
  } else if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
    *failed = "bind";
  } else if (listen(fd, backlog) < 0) {
    *failed = "listen";
  } else {
    return fd;
  }
  int err = errno;
  close(fd);
  errno = err;
  return -1;
}

int BoundPort(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) < 0) return -1;
  if (ss.ss_family == AF_INET) return ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  if (ss.ss_family == AF_INET6) return ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port);
  errno = EAFNOSUPPORT;
  return -1;
}

Napi::Value ListenTcp(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string host;
  int64_t port, backlog;
  if (!GetString(info[0], "host", &host) || !GetInt(info[1], "port", 0, 65535, &port) ||
      !GetInt(info[2], "backlog", 0, INT_MAX, &backlog))
    return Napi::Value();
  const bool v6 = host.find(':') != std::string::npos;
  const std::string what = "listen tcp://" + (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);

  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  int rc = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found);
  if (rc != 0) return Throw(GaiError(env, rc, what));

  // "localhost" may resolve to ::1 and 127.0.0.1. Move on to the next address only
  // when this one cannot exist here (no IPv6 in the container); any other failure,
  // EADDRINUSE above all, is the answer: binding a different family instead would
  // silently serve half the clients.
  int fd = -1, err = 0;
  const char* failed = "getaddrinfo";
  for (addrinfo* ai = found; ai != nullptr && fd < 0; ai = ai->ai_next) {
    fd = ListenOn(ai, static_cast<int>(backlog), &failed);
    if (fd >= 0) break;
    err = errno;
    if (err != EAFNOSUPPORT && err != EADDRNOTAVAIL && err != EPROTONOSUPPORT) break;
  }
  freeaddrinfo(found);
  if (fd < 0) return Throw(SysError(env, err, failed, what));

  int bound = BoundPort(fd);
  if (bound < 0) {
    err = errno;
    close(fd);
    return Throw(SysError(env, err, "getsockname", what));
  }
  Napi::Object result = Napi::Object::New(env);
  result.Set("fd", fd);
  result.Set("port", bound);
  return result;
}

// A path, or "@name" for a Linux abstract socket (leading NUL, no file, no permissions).
bool UnixAddress(const std::string& path, sockaddr_un* addr, socklen_t* len) {
  memset(addr, 0, sizeof *addr);
  addr->sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr->sun_path) {
    errno = path.empty() ? EINVAL : ENAMETOOLONG;
    return false;
  }
  memcpy(addr->sun_path, path.data(), path.size());
  if (path[0] == '@') {
    addr->sun_path[0] = '\0';  // abstract names are exactly this long, no terminator
    *len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size());
  } else {
    *len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + 1);
  }
  return true;
}

Napi::Value ListenUnix(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path;
  int64_t backlog, mode;
  if (!GetString(info[0], "path", &path) || !GetInt(info[1], "backlog", 0, INT_MAX, &backlog) ||
      !GetInt(info[2], "mode", 0, 07777, &mode))
    return Napi::Value();
  const std::string what = "listen unix:" + path;
  const bool abstract = !path.empty() && path[0] == '@';

  sockaddr_un addr;
  socklen_t len;
  if (!UnixAddress(path, &addr, &len)) return Throw(SysError(env, errno, "bind", what));
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Throw(SysError(env, errno, "socket", what));

  // The mode must hold before anyone can connect. bind() creates the file with the
  // socket inode's mode minus the umask, so fchmod before bind means the file is
  // never wider than `mode`; chmod after bind then restores bits the umask took.
  // Both happen before listen(), and connect() to a socket that does not listen yet
  // is refused, so no client ever sees an intermediate mode. (umask(0) around bind
  // would be simpler but is process-wide and races libuv's threads creating files.)
  const char* failed = nullptr;
  bool bound = false;
  if (!abstract && fchmod(fd, static_cast<mode_t>(mode)) < 0) {
    failed = "fchmod";
  } else if (bind(fd, reinterpret_cast<sockaddr*>(&addr), len) < 0) {
    failed = "bind";
  } else {
    bound = true;
    if (!abstract && chmod(path.c_str(), static_cast<mode_t>(mode)) < 0) {
      failed = "chmod";
    } else if (listen(fd, static_cast<int>(backlog)) < 0) {
      failed = "listen";
    }
  }
  if (failed != nullptr) {
    int err = errno;
    if (bound && !abstract) unlink(path.c_str());  // the file is ours: we just created it
    close(fd);
    return Throw(SysError(env, err, failed, what));
  }
  return Napi::Number::New(env, fd);
}

// ---------------------------------------------------------------------------
// Spawn
// ---------------------------------------------------------------------------

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
  char* listen_pid = nullptr;      // digit slot inside envs, filled in by the child
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

// Runs in the forked child. Only async-signal-safe calls from here on.
[[noreturn]] void RunChild(SpawnPlan& plan, int error_fd) {
  // Into the generation's cgroup before anything else (and while still root):
  // writing "0" to cgroup.procs moves the writer. From here on every process the
  // app starts is born in that cgroup and cannot leave it without the right to
  // write to another cgroup's cgroup.procs.
  if (plan.cgroup_procs >= 0) {
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

  // Own session and process group: the group can be signalled as a whole.
  if (setsid() < 0) ChildFail(error_fd, kSetsid, errno);
  if (plan.listen_pid != nullptr) WriteDecimal(plan.listen_pid, static_cast<long>(getpid()));

  // Place fds. A source may sit at another source's target (fds [4, 3] swaps them),
  // so first copy every source, and the error pipe, above the whole target range
  // 0..n-1; then dup2 the copies down. dup2 clears close-on-exec on the target.
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

  // Groups and gid first: after setuid we no longer have the right to change them.
  if (plan.has_groups && setgroups(plan.groups.size(), plan.groups.data()) < 0) ChildFail(error_fd, kSetgroups, errno);
  if (plan.has_gid && setgid(plan.gid) < 0) ChildFail(error_fd, kSetgid, errno);
  if (plan.has_uid && setuid(plan.uid) < 0) ChildFail(error_fd, kSetuid, errno);
  // chdir as the app's user, not as root: a directory the app may not enter must
  // fail here (EACCES, reported like an exec failure), not crash-loop the app later.
  if (plan.has_cwd && chdir(plan.cwd.c_str()) < 0) ChildFail(error_fd, kChdir, errno);

  // execvp's search, without its allocations: a missing candidate moves on; a
  // candidate we may not execute is reported only if nothing later works.
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
  const bool listen_pid = options.Get("listenPid").ToBoolean();
  std::string path_var = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
  bool found_path = false;
  for (uint32_t i = 0; i < envs.Length(); i++) {
    std::string entry;
    if (!GetString(envs.Get(i), "env[]", &entry)) return false;
    // A stale LISTEN_PID would shadow ours: getenv returns the first match.
    if (listen_pid && entry.compare(0, 11, "LISTEN_PID=") == 0) continue;
    if (!found_path && entry.compare(0, 5, "PATH=") == 0) {
      path_var = entry.substr(5);
      found_path = true;
    }
    plan->envs.push_back(std::move(entry));
  }
  if (listen_pid) plan->envs.push_back("LISTEN_PID=" + std::string(kPidDigits + 1, '\0'));

  // Pointers only after the vectors stop growing.
  for (std::string& s : plan->args) plan->argv.push_back(&s[0]);
  plan->argv.push_back(nullptr);
  for (std::string& s : plan->envs) plan->envp.push_back(&s[0]);
  plan->envp.push_back(nullptr);
  if (listen_pid) plan->listen_pid = &plan->envs.back()[11];

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

// ---------------------------------------------------------------------------
// Reaping and signals
// ---------------------------------------------------------------------------

Napi::Value SetChildSubreaper(const Napi::CallbackInfo& info) {
  if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0)
    return Throw(SysError(info.Env(), errno, "prctl", "PR_SET_CHILD_SUBREAPER"));
  return info.Env().Undefined();
}

// waitpid(-1) would steal the exit status of a child libuv spawned (uv_spawn reaps
// its own children by pid). The supervisor never uses child_process, so every
// child of this process is ours: the ones we spawned and the orphans we adopt.
Napi::Value ReapAll(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Array exits = Napi::Array::New(env);
  uint32_t count = 0;
  while (true) {
    int status;
    pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid < 0 && errno == EINTR) continue;
    if (pid <= 0) break;  // 0: children left, none exited; -1 ECHILD: no children at all
    if (!WIFEXITED(status) && !WIFSIGNALED(status)) continue;
    Napi::Object exit = Napi::Object::New(env);
    exit.Set("pid", pid);
    exit.Set("code", WIFEXITED(status) ? Napi::Value(Napi::Number::New(env, WEXITSTATUS(status))) : env.Null());
    exit.Set("signal", WIFSIGNALED(status) ? Napi::Value(Napi::Number::New(env, WTERMSIG(status))) : env.Null());
    exits.Set(count++, exit);
  }
  return exits;
}

Napi::Value Kill(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  // Never throws: bad arguments are EINVAL, like kill(2) itself would say.
  if (!info[0].IsNumber() || !info[1].IsNumber()) return Napi::Number::New(env, EINVAL);
  double pid = info[0].As<Napi::Number>().DoubleValue(), sig = info[1].As<Napi::Number>().DoubleValue();
  if (pid != std::floor(pid) || pid < INT_MIN || pid > INT_MAX || sig != std::floor(sig) || sig < 0 || sig >= NSIG)
    return Napi::Number::New(env, EINVAL);
  int rc = kill(static_cast<pid_t>(pid), static_cast<int>(sig));
  return Napi::Number::New(env, rc == 0 ? 0 : errno);
}

// ---------------------------------------------------------------------------
// Unix sockets and SCM_RIGHTS
// ---------------------------------------------------------------------------

Napi::Value SocketPair(const Napi::CallbackInfo& info) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) < 0)
    return Throw(SysError(info.Env(), errno, "socketpair", "socketpair"));
  return FdArray(info.Env(), {sv[0], sv[1]});
}

Napi::Value ConnectUnix(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path;
  if (!GetString(info[0], "path", &path)) return Napi::Value();
  const std::string what = "connect unix:" + path;
  sockaddr_un addr;
  socklen_t len;
  if (!UnixAddress(path, &addr, &len)) return Throw(SysError(env, errno, "connect", what));
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return Throw(SysError(env, errno, "socket", what));
  // A unix stream connect completes at once or fails; EAGAIN means the listener's
  // backlog is full (it is alive but not accepting), which the caller must see.
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), len) < 0) {
    int err = errno;
    close(fd);
    return Throw(SysError(env, err, "connect", what));
  }
  return Napi::Number::New(env, fd);
}

Napi::Value Accept(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!GetFd(info[0], "fd", &fd)) return Napi::Value();
  // accept4 has no per-call non-blocking flag: on a blocking listener (listenUnix
  // creates them so) it would block the event loop. Ask first; only Aeterna accepts
  // on its own listeners, so nobody takes the connection between the two calls.
  pollfd p{fd, POLLIN, 0};
  int ready;
  do ready = poll(&p, 1, 0);
  while (ready < 0 && errno == EINTR);
  if (ready < 0) return Throw(SysError(env, errno, "poll", FdName(fd)));
  if (p.revents & POLLNVAL) return Throw(SysError(env, EBADF, "accept4", FdName(fd)));
  if (ready == 0) return Napi::Number::New(env, -1);
  while (true) {
    int conn = accept4(fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (conn >= 0) return Napi::Number::New(env, conn);
    // ECONNABORTED: that client gave up while queued; the next one may be fine.
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return Napi::Number::New(env, -1);
    return Throw(SysError(env, errno, "accept4", FdName(fd)));
  }
}

Napi::Value SendMsg(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  std::vector<int> fds;
  if (!GetFd(info[0], "fd", &fd)) return Napi::Value();
  if (!info[1].IsBuffer()) return Throw(Napi::TypeError::New(env, "data must be a Buffer"));
  if (!GetFdList(info[2], "fds", kMaxFdsPerMessage, &fds)) return Napi::Value();
  Napi::Buffer<uint8_t> data = info[1].As<Napi::Buffer<uint8_t>>();

  iovec iov{data.Data(), data.Length()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control(CMSG_SPACE(sizeof(int) * fds.size()));
  if (!fds.empty()) {
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    memcpy(CMSG_DATA(cmsg), fds.data(), sizeof(int) * fds.size());
  }
  // The fds ride with the first byte: on a partial send they have already gone.
  ssize_t n;
  do n = sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
  while (n < 0 && errno == EINTR);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return Napi::Number::New(env, -1);
  if (n < 0) return Throw(SysError(env, errno, "sendmsg", FdName(fd)));
  return Napi::Number::New(env, static_cast<double>(n));
}

void CloseAll(const std::vector<int>& fds) {
  for (int fd : fds) close(fd);
}

// Collects SCM_RIGHTS fds; other control messages (credentials) are left to the caller.
std::vector<int> ReceivedFds(msghdr* msg) {
  std::vector<int> fds;
  for (cmsghdr* c = CMSG_FIRSTHDR(msg); c != nullptr; c = CMSG_NXTHDR(msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    const unsigned char* p = CMSG_DATA(c);
    for (size_t i = 0; i < count; i++) {
      int fd;
      memcpy(&fd, p + i * sizeof(int), sizeof fd);
      fds.push_back(fd);
    }
  }
  return fds;
}

// One non-blocking recvmsg into buf, shared by recvmsg and recvmsgInto. Returns
// null on EAGAIN, an empty value after throwing, or {bytes, fds}.
Napi::Value ReceiveInto(Napi::Env env, int fd, uint8_t* buf, size_t len, int64_t max_fds) {
  std::vector<char> control(CMSG_SPACE(sizeof(int) * max_fds));
  iovec iov{buf, len};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = max_fds > 0 ? control.data() : nullptr;
  msg.msg_controllen = max_fds > 0 ? control.size() : 0;
  ssize_t n;
  // MSG_CMSG_CLOEXEC: a received fd must not leak into a child spawned before the caller decides.
  do n = recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  while (n < 0 && errno == EINTR);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return env.Null();
  if (n < 0) return Throw(SysError(env, errno, "recvmsg", FdName(fd)));

  std::vector<int> fds = ReceivedFds(&msg);
  if (msg.msg_flags & MSG_CTRUNC) {
    // More fds were sent than asked for; the kernel dropped the rest. A partial set
    // is useless to the protocol, so close what came and report. (Not a kernel
    // errno, hence no .errno.)
    CloseAll(fds);
    return Throw(MakeError(env,
                           FdName(fd) + ": recvmsg: control message truncated: more than " + std::to_string(max_fds) +
                               " fds were sent; the " + std::to_string(fds.size()) + " that arrived were closed (ECTRUNC)",
                           "ECTRUNC", "recvmsg"));
  }
  Napi::Object result = Napi::Object::New(env);
  result.Set("bytes", static_cast<double>(n));
  result.Set("fds", FdArray(env, fds));
  return result;
}

Napi::Value RecvMsg(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  int64_t max_bytes, max_fds;
  if (!GetFd(info[0], "fd", &fd) || !GetInt(info[1], "maxBytes", 1, kMaxMessageBytes, &max_bytes) ||
      !GetInt(info[2], "maxFds", 0, kMaxFdsPerMessage, &max_fds))
    return Napi::Value();
  std::unique_ptr<uint8_t[]> data(new uint8_t[max_bytes]);
  Napi::Value got = ReceiveInto(env, fd, data.get(), static_cast<size_t>(max_bytes), max_fds);
  if (!got.IsObject()) return got;
  Napi::Object result = got.As<Napi::Object>();
  size_t n = static_cast<size_t>(result.Get("bytes").As<Napi::Number>().Int64Value());
  result.Set("data", Napi::Buffer<uint8_t>::Copy(env, data.get(), n));
  result.Delete("bytes");
  return result;
}

// recvmsg straight into the caller's Buffer: the relay's hot path, with no
// intermediate allocation or copy.
Napi::Value RecvMsgInto(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  int64_t max_fds;
  if (!GetFd(info[0], "fd", &fd)) return Napi::Value();
  if (!info[1].IsBuffer()) return Throw(Napi::TypeError::New(env, "buffer must be a Buffer"));
  if (!GetInt(info[2], "maxFds", 0, kMaxFdsPerMessage, &max_fds)) return Napi::Value();
  Napi::Buffer<uint8_t> buffer = info[1].As<Napi::Buffer<uint8_t>>();
  if (buffer.Length() == 0) return Throw(Napi::RangeError::New(env, "buffer must not be empty"));
  return ReceiveInto(env, fd, buffer.Data(), buffer.Length(), max_fds);
}

Napi::Object CredentialsObject(Napi::Env env, pid_t pid, uid_t uid, gid_t gid) {
  Napi::Object result = Napi::Object::New(env);
  result.Set("pid", pid);
  result.Set("uid", static_cast<double>(uid));
  result.Set("gid", static_cast<double>(gid));
  return result;
}

Napi::Value PeerCred(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!GetFd(info[0], "fd", &fd)) return Napi::Value();
  ucred cred{};
  socklen_t len = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
    return Throw(SysError(env, errno, "getsockopt", FdName(fd) + " (SO_PEERCRED)"));
  return CredentialsObject(env, cred.pid, cred.uid, cred.gid);
}

// ---------------------------------------------------------------------------
// Notify socket (sd_notify)
// ---------------------------------------------------------------------------

Napi::Value BindNotifySocket(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path;
  int64_t mode = 0600;
  if (!GetString(info[0], "path", &path)) return Napi::Value();
  if (info.Length() > 1 && !GetInt(info[1], "mode", 0, 07777, &mode)) return Napi::Value();
  const std::string what = "notify socket unix:" + path;
  const bool abstract = !path.empty() && path[0] == '@';
  sockaddr_un addr;
  socklen_t len;
  if (!UnixAddress(path, &addr, &len)) return Throw(SysError(env, errno, "bind", what));
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return Throw(SysError(env, errno, "socket", what));
  // SO_PASSCRED: the kernel attaches the sender's real pid/uid/gid to every datagram,
  // which is what tells us which process said READY=1.
  int one = 1;
  const char* failed = nullptr;
  bool bound = false;
  // A path socket's file is never wider than `mode`: fchmod before bind, chmod after
  // (bind applies the umask), as ListenUnix does. Only who may write the file may send.
  if (setsockopt(fd, SOL_SOCKET, SO_PASSCRED, &one, sizeof one) < 0) {
    failed = "setsockopt";
  } else if (!abstract && fchmod(fd, static_cast<mode_t>(mode)) < 0) {
    failed = "fchmod";
  } else if (bind(fd, reinterpret_cast<sockaddr*>(&addr), len) < 0) {
    failed = "bind";
  } else {
    bound = true;
    if (!abstract && chmod(path.c_str(), static_cast<mode_t>(mode)) < 0) failed = "chmod";
  }
  if (failed != nullptr) {
    int err = errno;
    if (bound && !abstract) unlink(path.c_str());  // the file is ours: we just created it
    close(fd);
    return Throw(SysError(env, err, failed, what));
  }
  return Napi::Number::New(env, fd);
}

Napi::Value RecvDatagram(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  int64_t max_bytes;
  if (!GetFd(info[0], "fd", &fd) || !GetInt(info[1], "maxBytes", 1, kMaxMessageBytes, &max_bytes))
    return Napi::Value();

  std::unique_ptr<uint8_t[]> data(new uint8_t[max_bytes]);
  // Room for the credentials and a full SCM_RIGHTS load: fds a sender attaches are
  // installed here and closed below; whatever did not fit the kernel drops itself.
  std::vector<char> control(CMSG_SPACE(sizeof(ucred)) + CMSG_SPACE(sizeof(int) * kMaxFdsPerMessage));
  iovec iov{data.get(), static_cast<size_t>(max_bytes)};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  ssize_t n;
  do n = recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  while (n < 0 && errno == EINTR);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return env.Null();
  if (n < 0) return Throw(SysError(env, errno, "recvmsg", FdName(fd)));

  CloseAll(ReceivedFds(&msg));
  // With SO_PASSCRED the kernel always adds credentials; pid 0 means "unknown"
  // (e.g. a sender in a pid namespace we cannot see) and never matches a child.
  ucred cred{0, static_cast<uid_t>(-1), static_cast<gid_t>(-1)};
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_CREDENTIALS && c->cmsg_len >= CMSG_LEN(sizeof cred))
      memcpy(&cred, CMSG_DATA(c), sizeof cred);
  }
  // A datagram longer than maxBytes is cut to maxBytes (MSG_TRUNC); callers that
  // care pass one byte more than they accept and reject a full buffer.
  Napi::Object result = CredentialsObject(env, cred.pid, cred.uid, cred.gid);
  result.Set("data", Napi::Buffer<uint8_t>::Copy(env, data.get(), static_cast<size_t>(n)));
  return result;
}

// ---------------------------------------------------------------------------
// memfd
// ---------------------------------------------------------------------------

Napi::Value MemfdCreate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string name;
  if (!GetString(info[0], "name", &name)) return Napi::Value();
  int fd = memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return Throw(SysError(env, errno, "memfd_create", "memfd \"" + name + "\""));
  return Napi::Number::New(env, fd);
}

Napi::Value SealMemfd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!GetFd(info[0], "fd", &fd)) return Napi::Value();
  // After this the content can be trusted by the receiver: nobody, not even the
  // sender, can change it, and the seals themselves are fixed.
  if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) < 0)
    return Throw(SysError(env, errno, "fcntl", FdName(fd) + " (F_ADD_SEALS)"));
  return env.Undefined();
}

Napi::Value GetSeals(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!GetFd(info[0], "fd", &fd)) return Napi::Value();
  int seals = fcntl(fd, F_GET_SEALS);
  if (seals < 0) return Throw(SysError(env, errno, "fcntl", FdName(fd) + " (F_GET_SEALS)"));
  return Napi::Number::New(env, seals);
}

// ---------------------------------------------------------------------------
// Plain fds
// ---------------------------------------------------------------------------

Napi::Value SetCloexec(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!GetFd(info[0], "fd", &fd)) return Napi::Value();
  int flags = fcntl(fd, F_GETFD);
  if (flags < 0 || fcntl(fd, F_SETFD, flags | FD_CLOEXEC) < 0) return Throw(SysError(env, errno, "fcntl", FdName(fd)));
  return env.Undefined();
}

Napi::Value IsListeningSocket(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!GetFd(info[0], "fd", &fd)) return Napi::Value();
  int listening = 0;
  socklen_t len = sizeof listening;
  if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) < 0) {
    if (errno == ENOTSOCK) return Napi::Boolean::New(env, false);
    return Throw(SysError(env, errno, "getsockopt", FdName(fd) + " (SO_ACCEPTCONN)"));
  }
  return Napi::Boolean::New(env, listening != 0);
}

// listen(2) again on a socket that stopped listening (an app's shutdown(2) puts a
// TCP listener back to CLOSE; its bound address stays, so listen() revives it).
Napi::Value Listen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  int64_t backlog;
  if (!GetFd(info[0], "fd", &fd) || !GetInt(info[1], "backlog", 0, INT_MAX, &backlog)) return Napi::Value();
  if (listen(fd, static_cast<int>(backlog)) < 0) return Throw(SysError(env, errno, "listen", FdName(fd)));
  return env.Undefined();
}

// Whether a socket was shut down for reading: poll() reports POLLRDHUP or POLLHUP.
// A unix listener shut down that way stays in LISTEN (SO_ACCEPTCONN is still 1) but
// refuses every connect(). poll() neither accepts nor changes the socket.
Napi::Value IsReadShutdown(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!GetFd(info[0], "fd", &fd)) return Napi::Value();
  pollfd p{fd, POLLRDHUP, 0};
  int rc;
  do rc = poll(&p, 1, 0);
  while (rc < 0 && errno == EINTR);
  if (rc < 0) return Throw(SysError(env, errno, "poll", FdName(fd)));
  if (p.revents & POLLNVAL) return Throw(SysError(env, EBADF, "poll", FdName(fd)));
  return Napi::Boolean::New(env, (p.revents & (POLLRDHUP | POLLHUP)) != 0);
}

Napi::Value Close(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!GetFd(info[0], "fd", &fd)) return Napi::Value();
  // On Linux the fd is gone even when close reports EINTR; retrying could close a
  // reused number, so EINTR counts as success.
  if (close(fd) < 0 && errno != EINTR) return Throw(SysError(env, errno, "close", FdName(fd)));
  return env.Undefined();
}

// ---------------------------------------------------------------------------
// Users and groups
// ---------------------------------------------------------------------------

// The *_r lookups want a caller buffer of unknown size: grow it on ERANGE.
template <typename Entry, typename Lookup>
int LookupEntry(const std::string& name, Entry* entry, std::vector<char>* buf, Lookup lookup) {
  Entry* result = nullptr;
  while (true) {
    int rc = lookup(name.c_str(), entry, buf->data(), buf->size(), &result);
    if (rc == ERANGE && buf->size() < (64u << 20)) {
      buf->resize(buf->size() * 2);
      continue;
    }
    if (rc == 0 && result == nullptr) return ENOENT;  // no such entry
    return rc;
  }
}

Napi::Value LookupUser(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string name;
  if (!GetString(info[0], "name", &name)) return Napi::Value();
  passwd pw;
  std::vector<char> buf(16384);
  int rc = LookupEntry(name, &pw, &buf, getpwnam_r);
  if (rc == ENOENT) return env.Null();
  if (rc != 0) return Throw(SysError(env, rc, "getpwnam_r", "user \"" + name + "\""));

  // getgrouplist includes the primary gid, as initgroups would.
  std::vector<gid_t> groups(32);
  int count = static_cast<int>(groups.size());
  while (getgrouplist(name.c_str(), pw.pw_gid, groups.data(), &count) < 0) {
    count = std::max<int>(count, static_cast<int>(groups.size()) * 2);  // count = the size it needs
    groups.resize(count);
  }
  groups.resize(count);

  Napi::Object result = Napi::Object::New(env);
  result.Set("uid", static_cast<double>(pw.pw_uid));
  result.Set("gid", static_cast<double>(pw.pw_gid));
  Napi::Array list = Napi::Array::New(env, groups.size());
  for (size_t i = 0; i < groups.size(); i++) list.Set(static_cast<uint32_t>(i), static_cast<double>(groups[i]));
  result.Set("groups", list);
  return result;
}

Napi::Value LookupGroup(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string name;
  if (!GetString(info[0], "name", &name)) return Napi::Value();
  group gr;
  std::vector<char> buf(16384);
  int rc = LookupEntry(name, &gr, &buf, getgrnam_r);
  if (rc == ENOENT) return env.Null();
  if (rc != 0) return Throw(SysError(env, rc, "getgrnam_r", "group \"" + name + "\""));
  return Napi::Number::New(env, static_cast<double>(gr.gr_gid));
}

// ---------------------------------------------------------------------------
// Poller: a uv_poll_t on Node's loop
// ---------------------------------------------------------------------------

// The error a POLLERR stands for: the socket's pending error (SO_ERROR, which
// also clears it), EBADF if the fd is really gone, else EIO.
int PendingSocketError(int fd) {
  int err = 0;
  socklen_t len = sizeof err;
  if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0) return err != 0 ? err : EIO;
  return errno == EBADF ? EBADF : EIO;
}

class Poller : public Napi::ObjectWrap<Poller> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Poller",
                       {InstanceMethod("start", &Poller::Start), InstanceMethod("stop", &Poller::Stop),
                        InstanceMethod("close", &Poller::Close)});
  }

  explicit Poller(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Poller>(info) {
    Napi::Env env = info.Env();
    int fd;
    if (!GetFd(info[0], "fd", &fd)) return;
    if (!info[1].IsFunction()) {
      Napi::TypeError::New(env, "callback must be a function").ThrowAsJavaScriptException();
      return;
    }
    uv_loop_t* loop = nullptr;
    if (napi_get_uv_event_loop(env, &loop) != napi_ok) {
      Napi::Error::New(env, "Poller: no event loop").ThrowAsJavaScriptException();
      return;
    }
    // Note: uv_poll_init puts the fd's open file description in O_NONBLOCK mode.
    auto* handle = new uv_poll_t;
    int rc = uv_poll_init(loop, handle, fd);
    if (rc < 0) {
      delete handle;  // never initialised, so no uv_close
      SysError(env, -rc, "uv_poll_init", FdName(fd)).ThrowAsJavaScriptException();
      return;
    }
    handle->data = this;
    handle_ = handle;
    fd_ = fd;
    struct stat st;
    if (fstat(fd, &st) == 0) {
      dev_ = st.st_dev;
      ino_ = st.st_ino;
    }
    callback_ = Napi::Persistent(info[1].As<Napi::Function>());
    context_ = std::make_unique<Napi::AsyncContext>(env, "AeternaPoller");
  }

  // Reached only when JS let go of the object, i.e. while it is not started (an
  // active poller holds a reference to itself). The handle may still be open.
  ~Poller() override { CloseHandle(); }

 private:
  Napi::Value Start(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t events;
    if (!GetInt(info[0], "events", 1, kReadable | kWritable, &events)) return Napi::Value();
    if (handle_ == nullptr) return Throw(Napi::Error::New(env, "Poller is closed"));
    int uv_events = ((events & kReadable) ? UV_READABLE : 0) | ((events & kWritable) ? UV_WRITABLE : 0);
    int rc = uv_poll_start(handle_, uv_events, OnPoll);
    if (rc < 0) return Throw(SysError(env, -rc, "uv_poll_start", "Poller"));
    // Like any libuv handle, a started poller stays alive (and keeps the loop alive)
    // even if JS drops every reference to it.
    if (!referenced_) {
      Ref();
      referenced_ = true;
    }
    return env.Undefined();
  }

  Napi::Value Stop(const Napi::CallbackInfo& info) {
    if (handle_ != nullptr) uv_poll_stop(handle_);
    Release();
    return info.Env().Undefined();
  }

  // Drops the callback too: a persistent reference is a GC root, and the callback's
  // closure usually holds its owner (with its buffers), which would then live forever.
  Napi::Value Close(const Napi::CallbackInfo& info) {
    CloseHandle();
    Release();
    callback_.Reset();
    return info.Env().Undefined();
  }

  void Release() {
    if (referenced_) {
      Unref();
      referenced_ = false;
    }
  }

  // uv_close is asynchronous: the handle memory is freed in its callback, which may
  // run after this object is gone, hence the separate allocation.
  void CloseHandle() {
    if (handle_ == nullptr) return;
    handle_->data = nullptr;
    // uv_close removes the fd *number* from epoll. If the caller closed the fd
    // first (or dropped an unclosed poller), that number may now be another watched
    // socket, which would silently go deaf. Then leak the few bytes of the handle instead.
    struct stat st;
    if (fstat(fd_, &st) == 0 && st.st_dev == dev_ && st.st_ino == ino_) {
      uv_close(reinterpret_cast<uv_handle_t*>(handle_), [](uv_handle_t* h) { delete reinterpret_cast<uv_poll_t*>(h); });
    }
    handle_ = nullptr;
  }

  static void OnPoll(uv_poll_t* handle, int status, int events) {
    auto* self = static_cast<Poller*>(handle->data);
    if (self == nullptr || self->callback_.IsEmpty()) return;
    Napi::Env env = self->Env();
    Napi::HandleScope scope(env);
    // libuv reports any POLLERR as UV_EBADF (and stops the handle). For a socket the
    // real cause is its pending error (ECONNRESET when the peer died with unread
    // data): report that, so that callers can say what happened.
    if (status == UV_EBADF) status = -PendingSocketError(self->fd_);
    int ready = ((events & UV_READABLE) ? kReadable : 0) | ((events & UV_WRITABLE) ? kWritable : 0);
    // MakeCallback (not Call): runs process.nextTick and microtasks afterwards, as
    // for any I/O callback, and keeps async_hooks context.
    self->callback_.MakeCallback(self->Value(),
                                 {Napi::Number::New(env, status < 0 ? -status : 0), Napi::Number::New(env, status < 0 ? 0 : ready)},
                                 *self->context_);
    // No JS frame is below us to catch an exception: hand it to process 'uncaughtException'.
    if (env.IsExceptionPending()) napi_fatal_exception(env, env.GetAndClearPendingException().Value());
  }

  uv_poll_t* handle_ = nullptr;
  int fd_ = -1;
  dev_t dev_ = 0;  // identity of the watched file, see CloseHandle
  ino_t ino_ = 0;
  Napi::FunctionReference callback_;
  std::unique_ptr<Napi::AsyncContext> context_;
  bool referenced_ = false;
};

// ---------------------------------------------------------------------------
// Module
// ---------------------------------------------------------------------------

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  struct {
    const char* name;
    Napi::Value (*fn)(const Napi::CallbackInfo&);
  } functions[] = {
      {"listenTcp", ListenTcp},
      {"listenUnix", ListenUnix},
      {"spawn", Spawn},
      {"setChildSubreaper", SetChildSubreaper},
      {"reapAll", ReapAll},
      {"kill", Kill},
      {"socketpair", SocketPair},
      {"connectUnix", ConnectUnix},
      {"accept", Accept},
      {"sendmsg", SendMsg},
      {"recvmsg", RecvMsg},
      {"recvmsgInto", RecvMsgInto},
      {"peerCred", PeerCred},
      {"bindNotifySocket", BindNotifySocket},
      {"recvDatagram", RecvDatagram},
      {"memfdCreate", MemfdCreate},
      {"sealMemfd", SealMemfd},
      {"getSeals", GetSeals},
      {"setCloexec", SetCloexec},
      {"isListeningSocket", IsListeningSocket},
      {"listen", Listen},
      {"isReadShutdown", IsReadShutdown},
      {"close", Close},
      {"lookupUser", LookupUser},
      {"lookupGroup", LookupGroup},
  };
  for (const auto& f : functions) exports.Set(f.name, Napi::Function::New(env, f.fn, f.name));
  exports.Set("Poller", Poller::Define(env));
  return exports;
}

}  // namespace

NODE_API_MODULE(aeterna, Init)

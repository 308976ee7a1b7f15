// aeterna.cc - the native part of Aeterna, and its module table.
//
// Only what Node cannot do lives here: fork/exec with exact fd placement
// (spawn.cc), subreaping and reaping, SCM_RIGHTS and peer credentials, memfd
// sealing, and a uv_poll watcher for raw fds. There is no policy in this file;
// every decision (timeouts, protocol, what to spawn) is made in TypeScript.
// The JS surface is src/native/binding.ts.
//
// Every function reports a failure the same way: it throws an Error shaped like
// Node's system errors:
//   .code = errno name ('EADDRINUSE'), .errno = errno (positive), .syscall,
//   message = "<what>: <syscall>: <strerror> (<CODE>)"
// (common.h), or a TypeError/RangeError naming a bad argument.

#include <napi.h>
#include <uv.h>

#include "common.h"
#include "hold.h"
#include "spawn.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <netdb.h>
#include <linux/filter.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <string>
#include <vector>

namespace aeterna {
namespace {

constexpr int kReadable = 1;  // READABLE in binding.ts
constexpr int kWritable = 2;  // WRITABLE in binding.ts
constexpr int kMaxFdsPerMessage = 253;  // SCM_MAX_FD: the kernel refuses more in one message
constexpr int64_t kMaxMessageBytes = 64 << 20;

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
// reuse_port: join (or start) the SO_REUSEPORT group of the address, for the weighted canary split.
int ListenOn(int family, const sockaddr* addr, socklen_t addrlen, int backlog, bool reuse_port, const char** failed) {
  int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, IPPROTO_TCP);
  if (fd < 0) {
    *failed = "socket";
    return -1;
  }
  // Lets a restarted Aeterna bind while old connections sit in TIME_WAIT.
  int one = 1;
  if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0) {
    *failed = "setsockopt";
  } else if (reuse_port && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) < 0) {
    *failed = "setsockopt";
  } else if (bind(fd, addr, addrlen) < 0) {
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
  const bool reuse_port = info.Length() > 3 && info[3].ToBoolean().Value();
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
    fd = ListenOn(ai->ai_family, ai->ai_addr, ai->ai_addrlen, static_cast<int>(backlog), reuse_port, &failed);
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


// A second listener in the SO_REUSEPORT group of `fd` (bound with SO_REUSEPORT): same family, same address
// and port (the bound one, so port 0 works), same owner, which the kernel requires of a group.
Napi::Value ListenBeside(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  int64_t backlog;
  if (!GetFd(info[0], "fd", &fd) || !GetInt(info[1], "backlog", 0, INT_MAX, &backlog)) return Napi::Value();
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) < 0) return Throw(SysError(env, errno, "getsockname", FdName(fd)));
  const char* failed = "socket";
  int beside = ListenOn(ss.ss_family, reinterpret_cast<sockaddr*>(&ss), len, static_cast<int>(backlog), true, &failed);
  if (beside < 0) return Throw(SysError(env, errno, failed, "listener beside " + FdName(fd)));
  return Napi::Number::New(env, beside);
}

// Attach (or atomically replace) the classic BPF program that picks the socket of each new connection in
// fd's SO_REUSEPORT group. `program` holds struct sock_filter entries, 8 bytes each, built by the caller.
Napi::Value AttachReuseportProgram(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!GetFd(info[0], "fd", &fd)) return Napi::Value();
  if (!info[1].IsBuffer()) return Throw(Napi::TypeError::New(env, "program must be a Buffer"));
  Napi::Buffer<uint8_t> program = info[1].As<Napi::Buffer<uint8_t>>();
  if (program.Length() == 0 || program.Length() % sizeof(sock_filter) != 0 || program.Length() / sizeof(sock_filter) > BPF_MAXINSNS)
    return Throw(Napi::RangeError::New(env, "program must be 1 to 4096 sock_filter entries of 8 bytes"));
  std::vector<sock_filter> insns(program.Length() / sizeof(sock_filter));
  memcpy(insns.data(), program.Data(), program.Length());
  sock_fprog prog{static_cast<unsigned short>(insns.size()), insns.data()};
  if (setsockopt(fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &prog, sizeof prog) < 0)
    return Throw(SysError(env, errno, "setsockopt", FdName(fd) + " (SO_ATTACH_REUSEPORT_CBPF)"));
  return env.Undefined();
}

// Stop a listener for every holder of it: shutdown(2) takes it out of its reuseport group, which close(2)
// does not while another process still holds a copy.
Napi::Value ShutdownListener(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!GetFd(info[0], "fd", &fd)) return Napi::Value();
  if (shutdown(fd, SHUT_RDWR) < 0) return Throw(SysError(env, errno, "shutdown", FdName(fd)));
  return env.Undefined();
}

// Connections waiting in a TCP listener's accept queue (TCP_INFO's tcpi_unacked is sk_ack_backlog in LISTEN).
Napi::Value AcceptQueueLength(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!GetFd(info[0], "fd", &fd)) return Napi::Value();
  tcp_info ti{};
  socklen_t len = sizeof ti;
  if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0) return Throw(SysError(env, errno, "getsockopt", FdName(fd) + " (TCP_INFO)"));
  if (ti.tcpi_state != TCP_LISTEN) return Throw(MakeError(env, FdName(fd) + " is not a listening TCP socket", "EINVAL", "getsockopt"));
  return Napi::Number::New(env, ti.tcpi_unacked);
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

// A negative pid is a process group. ESRCH (nothing left to signal) throws like
// any other failure: the caller knows whether that is expected.
Napi::Value Kill(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int64_t pid, sig;
  if (!GetInt(info[0], "pid", -INT_MAX, INT_MAX, &pid) || !GetInt(info[1], "signal", 0, NSIG - 1, &sig))
    return Napi::Value();
  if (kill(static_cast<pid_t>(pid), static_cast<int>(sig)) < 0)
    return Throw(SysError(env, errno, "kill", (pid < 0 ? "process group " + std::to_string(-pid) : "pid " + std::to_string(pid)) +
                                                  " (signal " + std::to_string(sig) + ")"));
  return env.Undefined();
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

// The app's stdout or stderr when Aeterna reads it (observability.app_output): both ends close-on-exec (spawn
// places the write end at the child's fd 1 or 2, where it is open across exec); the read end, Aeterna's only,
// non-blocking, the write end blocking as any program expects its stdout to be.
Napi::Value OutputPipe(const Napi::CallbackInfo& info) {
  int p[2];
  if (pipe2(p, O_CLOEXEC) < 0) return Throw(SysError(info.Env(), errno, "pipe2", "output pipe"));
  int flags = fcntl(p[0], F_GETFL);
  if (flags < 0 || fcntl(p[0], F_SETFL, flags | O_NONBLOCK) < 0) {
    int err = errno;
    close(p[0]);
    close(p[1]);
    return Throw(SysError(info.Env(), err, "fcntl", "output pipe"));
  }
  return FdArray(info.Env(), {p[0], p[1]});
}

// The two ends of a direct relay (docs/srp.md, "Direct transport"): blocking (each app sets its own mode),
// close-on-exec, with send and receive buffers of `bufferBytes` so the bytes flow while the receiver hashes.
// SO_SNDBUFFORCE lifts the wmem_max cap when Aeterna may (CAP_NET_ADMIN); else the capped size stands.
Napi::Value RelayPair(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int64_t bytes;
  if (!GetInt(info[0], "bufferBytes", 4096, INT_MAX / 2, &bytes)) return Napi::Value();
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) return Throw(SysError(env, errno, "socketpair", "relay pair"));
  const int size = static_cast<int>(bytes);
  for (int fd : sv) {
    for (int opt : {SO_SNDBUF, SO_RCVBUF}) {
      const int force = opt == SO_SNDBUF ? SO_SNDBUFFORCE : SO_RCVBUFFORCE;
      if (setsockopt(fd, SOL_SOCKET, force, &size, sizeof size) < 0) setsockopt(fd, SOL_SOCKET, opt, &size, sizeof size);
    }
  }
  return FdArray(env, {sv[0], sv[1]});
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

  // fds a sender attaches are the caller's only when it asked to keep them (the fd
  // store); otherwise they are closed here. A cut set (MSG_CTRUNC) is never kept.
  const bool keep_fds = info.Length() > 2 && info[2].ToBoolean();
  const bool fds_cut = (msg.msg_flags & MSG_CTRUNC) != 0;
  std::vector<int> fds = ReceivedFds(&msg);
  if (!keep_fds || fds_cut) {
    CloseAll(fds);
    fds.clear();
  }
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
  result.Set("fds", FdArray(env, fds));
  result.Set("fdsCut", fds_cut);
  return result;
}

// ---------------------------------------------------------------------------
// Hangup set: an epoll set that reports only POLLHUP/POLLERR of its members
// ---------------------------------------------------------------------------

// Stored fds are watched with no events requested: epoll always reports hangups
// and errors. Unlike a uv_poll per fd, this never touches the fd's O_NONBLOCK flag,
// which the app that owns the fd shares. The set's own fd goes to a Poller.

Napi::Value HangupSetCreate(const Napi::CallbackInfo& info) {
  int fd = epoll_create1(EPOLL_CLOEXEC);
  if (fd < 0) return Throw(SysError(info.Env(), errno, "epoll_create1", "hangup set"));
  return Napi::Number::New(info.Env(), fd);
}

// Throws EPERM for an fd that cannot be polled (a memfd, a regular file): nothing to watch.
Napi::Value HangupSetAdd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int set, fd;
  if (!GetFd(info[0], "set", &set) || !GetFd(info[1], "fd", &fd)) return Napi::Value();
  epoll_event ev{};
  ev.events = 0;
  ev.data.fd = fd;
  if (epoll_ctl(set, EPOLL_CTL_ADD, fd, &ev) < 0) return Throw(SysError(env, errno, "epoll_ctl", FdName(fd)));
  return env.Undefined();
}

// Must come before close(fd): an epoll entry lives as long as the open file, which the app may still hold.
Napi::Value HangupSetRemove(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int set, fd;
  if (!GetFd(info[0], "set", &set) || !GetFd(info[1], "fd", &fd)) return Napi::Value();
  epoll_ctl(set, EPOLL_CTL_DEL, fd, nullptr);  // not a member (never pollable): nothing to do
  return env.Undefined();
}

// The members that hung up or failed, without waiting.
Napi::Value HangupSetReady(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int set;
  if (!GetFd(info[0], "set", &set)) return Napi::Value();
  epoll_event events[64];
  int n;
  do n = epoll_wait(set, events, 64, 0);
  while (n < 0 && errno == EINTR);
  if (n < 0) return Throw(SysError(env, errno, "epoll_wait", "hangup set"));
  std::vector<int> fds;
  for (int i = 0; i < n; i++) {
    if (events[i].events & (EPOLLHUP | EPOLLERR)) fds.push_back(events[i].data.fd);
  }
  return FdArray(env, fds);
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

Napi::Value ClearCloexec(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!GetFd(info[0], "fd", &fd)) return Napi::Value();
  int flags = fcntl(fd, F_GETFD);
  if (flags < 0 || fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC) < 0) return Throw(SysError(env, errno, "fcntl", FdName(fd)));
  return env.Undefined();
}

// Aeterna re-executes itself in place (aeterna upgrade): same pid, its children stay its children.
// Only the fds listed in `keep` lose close-on-exec, right before the exec; everything else closes.
// If execve fails, they get close-on-exec back and the caller goes on as before.
// An execve's arguments, read from (path, argv, env, keep) and held as the C arrays execve takes.
struct ExecCall {
  std::string file;
  std::vector<std::string> args, envs;
  std::vector<char*> argv, envp;
  std::vector<int> keep;
  // Block the held stop signals (hold.cc) across the exec: the new program is started with this addon preloaded.
  bool hold = false;
};

// Fills `call` from info[0..3]; false (with a JS exception pending) on a bad argument.
bool GetExecCall(const Napi::CallbackInfo& info, ExecCall* call) {
  if (!GetString(info[0], "path", &call->file)) return false;
  const char* names[] = {"argv", "env"};
  std::vector<std::string>* outs[] = {&call->args, &call->envs};
  for (int k = 0; k < 2; k++) {
    Napi::Array list;
    if (!GetArray(info[k + 1], names[k], &list)) return false;
    for (uint32_t i = 0; i < list.Length(); i++) {
      outs[k]->emplace_back();
      if (!GetString(list.Get(i), names[k], &outs[k]->back())) return false;
    }
  }
  if (!GetFdList(info[3], "keep", 65536, &call->keep)) return false;
  call->hold = info.Length() > 4 && info[4].IsBoolean() && info[4].As<Napi::Boolean>().Value();
  for (std::string& s : call->args) call->argv.push_back(&s[0]);
  call->argv.push_back(nullptr);
  for (std::string& s : call->envs) call->envp.push_back(&s[0]);
  call->envp.push_back(nullptr);
  return true;
}

Napi::Value Execve(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ExecCall call;
  if (!GetExecCall(info, &call)) return Napi::Value();
  const std::vector<int>& keep = call.keep;
  size_t cleared = 0;
  for (; cleared < keep.size(); cleared++) {
    int flags = fcntl(keep[cleared], F_GETFD);
    if (flags < 0 || fcntl(keep[cleared], F_SETFD, flags & ~FD_CLOEXEC) < 0) break;
  }
  int err = cleared < keep.size() ? errno : 0;
  std::string failed = cleared < keep.size() ? "fcntl" : "execve";
  sigset_t held, before;
  HeldSignals(&held);
  if (err == 0) {
    // From here a stop signal stays pending, across the exec, until the new program's handlers exist.
    bool guard = false;
    if (call.hold) {
      pthread_sigmask(SIG_BLOCK, &held, &before);
      guard = GuardStopSignals(static_cast<pid_t>(syscall(SYS_gettid)));
    }
    execve(call.file.c_str(), call.argv.data(), call.envp.data());
    err = errno;
    if (guard) UnguardStopSignals();
    if (call.hold) pthread_sigmask(SIG_SETMASK, &before, nullptr);
  }
  for (size_t i = 0; i < cleared; i++) fcntl(keep[i], F_SETFD, fcntl(keep[i], F_GETFD) | FD_CLOEXEC);
  return Throw(SysError(env, err, failed.c_str(), failed == "execve" ? call.file : FdName(keep[cleared])));
}

// ---------------------------------------------------------------------------
// Recovery from a fatal signal: Aeterna (PID 1) must not take the app down with it.
// The daemon prepares an execve (argv, envp, a handover memfd) in advance and keeps it
// current; the handler only clears close-on-exec on the kept fds and calls execve,
// all async-signal-safe. Without a prepared exec, or if execve fails, the signal kills
// as it would have without the handler.
// ---------------------------------------------------------------------------

const int kFatalSignals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
// Swapped whole (never changed in place) so the handler sees either the old or the new call.
std::atomic<ExecCall*> prepared_exec{nullptr};
// The call swapped out last, freed only at the next swap: a kill()ed fatal signal may run the handler on another
// thread, which may still be reading the call it loaded just before the swap.
ExecCall* retired_exec = nullptr;

void RetireExec(ExecCall* previous) {
  delete retired_exec;
  retired_exec = previous;
}

void OnFatalSignal(int sig) {
  ExecCall* call = prepared_exec.load();
  if (call != nullptr) {
    for (int fd : call->keep) {
      int flags = fcntl(fd, F_GETFD);
      if (flags >= 0) fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC);
    }
    // The signal mask survives execve: the new Aeterna must not start with this signal blocked; the held stop
    // signals stay blocked (and pending) until its handlers exist.
    sigset_t mask;
    sigemptyset(&mask);
    if (call->hold) HeldSignals(&mask);
    sigprocmask(SIG_SETMASK, &mask, nullptr);
    // A stop signal caught meanwhile by another thread comes to this one, where it waits for the new program.
    if (call->hold) GuardStopSignals(static_cast<pid_t>(syscall(SYS_gettid)));
    execve(call->file.c_str(), call->argv.data(), call->envp.data());
  }
  struct sigaction dfl = {};
  dfl.sa_handler = SIG_DFL;
  sigaction(sig, &dfl, nullptr);
  raise(sig);  // delivered once the handler returns (a fault re-faults): the process dies of it
}

bool InstallFatalSignalHandlers() {
  static bool installed = false;
  if (installed) return true;
  // The handler runs on its own stack: a stack overflow must still be able to exec.
  stack_t alt = {};
  alt.ss_size = 64 * 1024;
  alt.ss_sp = malloc(alt.ss_size);
  if (alt.ss_sp == nullptr || sigaltstack(&alt, nullptr) < 0) return false;
  struct sigaction sa = {};
  sa.sa_handler = OnFatalSignal;
  sa.sa_flags = SA_ONSTACK;
  // A stop signal that arrives while the handler runs stays pending (across its exec, see OnFatalSignal); without
  // this it would run libuv's handler, whose note to the event loop the exec then discards.
  HeldSignals(&sa.sa_mask);
  for (int sig : kFatalSignals) {
    if (sigaction(sig, &sa, nullptr) < 0) return false;
  }
  installed = true;
  return true;
}

// prepareFatalSignalExec(path, argv, env, keep): what a fatal signal execs from now on.
Napi::Value PrepareFatalSignalExec(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto call = std::make_unique<ExecCall>();
  if (!GetExecCall(info, call.get())) return Napi::Value();
  if (!InstallFatalSignalHandlers()) return Throw(SysError(env, errno, "sigaction", "fatal signal handlers"));
  RetireExec(prepared_exec.exchange(call.release()));
  return env.Undefined();
}

// releaseHeldSignals(): the handlers of a re-executed Aeterna exist; the stop signals held across its exec go through.
Napi::Value ReleaseHeld(const Napi::CallbackInfo& info) {
  ReleaseHeldSignals();
  return info.Env().Undefined();
}

// holdStopSignals(on): block (or unblock) SIGTERM, SIGINT and SIGHUP in this thread, and guard them (hold.h): one
// that arrives, whichever thread catches it, stays pending here, also across an execve.
Napi::Value HoldStopSignals(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsBoolean()) return Throw(Napi::TypeError::New(env, "holdStopSignals(on: boolean)"));
  sigset_t held;
  HeldSignals(&held);
  bool on = info[0].As<Napi::Boolean>().Value();
  if (!on) UnguardStopSignals();  // libuv's handlers first, then what waited is delivered to them
  int err = pthread_sigmask(on ? SIG_BLOCK : SIG_UNBLOCK, &held, nullptr);
  if (err != 0) return Throw(SysError(env, err, "pthread_sigmask", "stop signals"));
  if (on) GuardStopSignals(static_cast<pid_t>(syscall(SYS_gettid)));
  return env.Undefined();
}

// clearFatalSignalExec(): a fatal signal kills again (no state Aeterna could hand over).
Napi::Value ClearFatalSignalExec(const Napi::CallbackInfo& info) {
  RetireExec(prepared_exec.exchange(nullptr));
  return info.Env().Undefined();
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
// Open file descriptions: do two fds share one (dup(), or the same fd sent twice)?
// ---------------------------------------------------------------------------

#ifndef KCMP_FILE
#define KCMP_FILE 0
#endif
#ifndef F_DUPFD_QUERY
#define F_DUPFD_QUERY 1027  // F_LINUX_SPECIFIC_BASE + 3, Linux 6.10
#endif

// kcmp() is missing without CONFIG_KCMP, and container seccomp profiles often refuse it (EPERM): then
// F_DUPFD_QUERY (Linux 6.10), then systemd's last resort (same inode, not a device, same status flags).
std::atomic<int> kcmp_works{-1};  // -1 unknown, 0 no, 1 yes

bool KcmpRefused(int err) { return err == ENOSYS || err == EPERM || err == EACCES || err == EOPNOTSUPP; }

// 0: same description; -1 / 1: different, ordered (kcmp's order of the kernel's file objects, stable while
// both are open); 2: different, no order known. Throws when either fd is not open.
int CompareFiles(int a, int b, int* err) {
  pid_t pid = getpid();
  if (kcmp_works.load() != 0) {
    long r = syscall(SYS_kcmp, pid, pid, KCMP_FILE, a, b);
    if (r >= 0 && r <= 2) {
      kcmp_works.store(1);
      return r == 0 ? 0 : r == 1 ? -1 : 1;
    }
    if (r == 3) return 2;
    if (!KcmpRefused(errno)) return *err = errno, -2;
    kcmp_works.store(0);
  }
  int q = fcntl(a, F_DUPFD_QUERY, b);
  if (q > 0) return 0;
  if (q == 0) return fcntl(b, F_GETFD) < 0 ? (*err = errno, -2) : 2;
  if (errno != EINVAL && errno != EBADF) return *err = errno, -2;
  struct stat sa, sb;
  if (fstat(a, &sa) < 0 || fstat(b, &sb) < 0) return *err = errno, -2;
  if (sa.st_dev != sb.st_dev || sa.st_ino != sb.st_ino) return 2;
  if (S_ISCHR(sa.st_mode) || S_ISBLK(sa.st_mode)) return 2;
  int fa = fcntl(a, F_GETFL), fb = fcntl(b, F_GETFL);
  if (fa < 0 || fb < 0) return *err = errno, -2;
  return fa == fb ? 0 : 2;
}

Napi::Value CompareOpenFiles(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int a, b;
  if (!GetFd(info[0], "a", &a) || !GetFd(info[1], "b", &b)) return Napi::Value();
  int err = 0;
  int r = a == b ? 0 : CompareFiles(a, b, &err);
  if (r == -2) return Throw(SysError(env, err, "kcmp", FdName(a)));
  return Napi::Number::New(env, r);
}

// Whether CompareOpenFiles can order (kcmp works here): probed on `fd` against a dup of itself.
Napi::Value OpenFilesOrdered(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!GetFd(info[0], "fd", &fd)) return Napi::Value();
  if (kcmp_works.load() == -1) {
    pid_t pid = getpid();
    long r = syscall(SYS_kcmp, pid, pid, KCMP_FILE, fd, fd);
    kcmp_works.store(r == 0 ? 1 : 0);
  }
  return Napi::Boolean::New(env, kcmp_works.load() == 1);
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

struct Export {
  const char* name;
  Napi::Value (*fn)(const Napi::CallbackInfo&);
};

template <size_t N>
void SetFunctions(Napi::Env env, Napi::Object target, const Export (&functions)[N]) {
  for (const auto& f : functions) target.Set(f.name, Napi::Function::New(env, f.fn, f.name));
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  const Export functions[] = {
      {"listenTcp", ListenTcp},
      {"listenUnix", ListenUnix},
      {"listenBeside", ListenBeside},
      {"attachReuseportProgram", AttachReuseportProgram},
      {"acceptQueueLength", AcceptQueueLength},
      {"shutdownListener", ShutdownListener},
      {"spawn", Spawn},
      {"setChildSubreaper", SetChildSubreaper},
      {"reapAll", ReapAll},
      {"kill", Kill},
      {"connectUnix", ConnectUnix},
      {"relayPair", RelayPair},
      {"outputPipe", OutputPipe},
      {"accept", Accept},
      {"sendmsg", SendMsg},
      {"recvmsgInto", RecvMsgInto},
      {"peerCred", PeerCred},
      {"bindNotifySocket", BindNotifySocket},
      {"recvDatagram", RecvDatagram},
      {"hangupSetCreate", HangupSetCreate},
      {"hangupSetAdd", HangupSetAdd},
      {"hangupSetRemove", HangupSetRemove},
      {"hangupSetReady", HangupSetReady},
      {"memfdCreate", MemfdCreate},
      {"sealMemfd", SealMemfd},
      {"getSeals", GetSeals},
      {"setCloexec", SetCloexec},
      {"clearCloexec", ClearCloexec},
      {"execve", Execve},
      {"prepareFatalSignalExec", PrepareFatalSignalExec},
      {"clearFatalSignalExec", ClearFatalSignalExec},
      {"releaseHeldSignals", ReleaseHeld},
      {"holdStopSignals", HoldStopSignals},
      {"isListeningSocket", IsListeningSocket},
      {"listen", Listen},
      {"isReadShutdown", IsReadShutdown},
      {"close", Close},
      {"compareOpenFiles", CompareOpenFiles},
      {"openFilesOrdered", OpenFilesOrdered},
      {"lookupUser", LookupUser},
      {"lookupGroup", LookupGroup},
  };
  SetFunctions(env, exports, functions);
  exports.Set("Poller", Poller::Define(env));
  // Used only by Aeterna's tests (to make socket pairs and read what the code under test sent), never by Aeterna.
  const Export test_only[] = {
      {"socketpair", SocketPair},
      {"recvmsg", RecvMsg},
  };
  Napi::Object test = Napi::Object::New(env);
  SetFunctions(env, test, test_only);
  exports.Set("test", test);
  return exports;
}

}  // namespace
}  // namespace aeterna

Napi::Object InitModule(Napi::Env env, Napi::Object exports) { return aeterna::Init(env, exports); }

NODE_API_MODULE(aeterna, InitModule)

// common.cc - errors and argument checks shared by the addon's functions (common.h).

#include "common.h"

#include <errno.h>
#include <limits.h>
#include <string.h>

#include <cmath>

namespace aeterna {

namespace {

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

}  // namespace

Napi::Error MakeError(Napi::Env env, const std::string& message, const char* code, const char* syscall) {
  Napi::Error error = Napi::Error::New(env, message);
  error.Value().Set("code", code);
  error.Value().Set("syscall", syscall);
  return error;
}

Napi::Error SysError(Napi::Env env, int err, const char* syscall, const std::string& what) {
  const char* code = ErrnoName(err);
  Napi::Error error =
      MakeError(env, what + ": " + syscall + ": " + strerror(err) + " (" + code + ")", code, syscall);
  error.Value().Set("errno", err);
  return error;
}

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

}  // namespace aeterna

// common.h - what every part of the addon shares: errors shaped like Node's
// system errors, and argument checks that throw a TypeError/RangeError naming
// the argument. A function that fails returns an empty Napi::Value with the
// exception pending (see Throw).
#pragma once

#include <napi.h>

#include <cstdint>
#include <string>
#include <vector>

namespace aeterna {

Napi::Error MakeError(Napi::Env env, const std::string& message, const char* code, const char* syscall);
// `what` names the object of the failed call: 'listen tcp://127.0.0.1:80', 'spawn "app"', 'fd 7'.
Napi::Error SysError(Napi::Env env, int err, const char* syscall, const std::string& what);
// Returning an empty value from a callback with an exception pending throws it in JS.
Napi::Value Throw(const Napi::Error& error);
std::string FdName(int fd);

bool IsAbsent(const Napi::Value& v);
bool GetInt(Napi::Value v, const char* name, int64_t lo, int64_t hi, int64_t* out);
bool GetFd(Napi::Value v, const char* name, int* out);
bool GetString(Napi::Value v, const char* name, std::string* out);
bool GetArray(Napi::Value v, const char* name, Napi::Array* out);
bool GetFdList(Napi::Value v, const char* name, size_t max, std::vector<int>* out);
Napi::Array FdArray(Napi::Env env, const std::vector<int>& fds);

}  // namespace aeterna

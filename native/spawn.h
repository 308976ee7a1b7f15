// spawn.h - the addon's `spawn` (spawn.cc).
#pragma once

#include <napi.h>

namespace aeterna {

// spawn(options): fork/exec with exact fd placement; the child's pid, or throws (binding.ts: SpawnOptions).
Napi::Value Spawn(const Napi::CallbackInfo& info);

}  // namespace aeterna

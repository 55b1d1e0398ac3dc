// Exceptions never cross into Rust: each C entry point runs its body through `guarded`,
// which turns a C++ exception into status 1 and keeps its message for `cx_last_error`
// (one per thread, shared by every file of the shim).
#pragma once

#include <c10/util/Exception.h>

#include <exception>
#include <string>

namespace cx {

inline std::string& last_error() {
  thread_local std::string message;
  return message;
}

template <class F>
int guarded(F f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    last_error() = e.what_without_backtrace();
  } catch (const std::exception& e) {
    last_error() = e.what();
  } catch (...) {
    last_error() = "unknown C++ exception";
  }
  return 1;
}

}  // namespace cx

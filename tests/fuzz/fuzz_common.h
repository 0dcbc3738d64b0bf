#pragma once

// Shared by the fuzz targets: the readers under test open paths, so each input is written to a
// per-process file under $TMPDIR first. A c10::Error is the parsers' documented answer to a bad
// input; anything else escaping (std::bad_alloc, std::out_of_range, ...) is a finding, so it is
// left uncaught and libFuzzer reports it as a crash.

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <unistd.h>

namespace slowed_fuzz {

/// Path of this process's scratch file with the given suffix ("x.gguf").
inline std::string scratch_path(const char* suffix) {
  const char* dir = std::getenv("TMPDIR");
  return std::string(dir && *dir ? dir : "/tmp") + "/slowed_fuzz_" + std::to_string(getpid()) +
         "_" + suffix;
}

inline void write_file(const std::string& path, const uint8_t* data, size_t size) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();
  if (size && std::fwrite(data, 1, size, f) != size) std::abort();
  if (std::fclose(f) != 0) std::abort();
}

/// Runs f; a c10::Error is an accepted rejection.
template <class F>
void expect_ok_or_error(F&& f) {
  try {
    f();
  } catch (const c10::Error&) {
  }
}

}  // namespace slowed_fuzz

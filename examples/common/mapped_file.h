#pragma once

// A read-only memory map of a whole file, shared by the checkpoint readers (GGUF, safetensors).

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace slowed_examples {

/// The mapping of one file; unmapped when the last holder lets go (tensors viewing the bytes
/// keep a reference).
struct MappedFile {
  const uint8_t* data = nullptr;
  size_t size = 0;
  MappedFile() = default;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();
};

/// Maps `path` read-only. Errors (c10::Error) read "<kind> '<path>': cannot open (...)",
/// "... cannot stat (...)" or "... mmap failed (...)". An empty file maps to data == nullptr.
std::shared_ptr<const MappedFile> map_file(const std::string& path, const char* kind);

}  // namespace slowed_examples

#pragma once

// The on-disk cache of compiled CUDA kernels (cubin or PTX), so that a process pays NVRTC's
// compile time only once per machine.
//
// Folder: $SLOWED_CACHE_DIR/kernels, else $HOME/.cache/slowed/kernels (read at each lookup).
// File name: <family>-<target>-<32 hex digits>.<cubin|ptx>, the digits being two independent
// FNV-1a 64 hashes of the cache key. The key is a text naming everything the binary depends on:
// the source hash and size, the kernel names, every NVRTC option (target and defines included)
// and the NVRTC version.
//
// File format (version 1), integers little-endian:
//   offset  0  8 bytes  magic "SLOWEDK\n"
//   offset  8  u32      format version (1)
//   offset 12  u32      payload kind (1 = cubin, 2 = PTX)
//   offset 16  u64      key size K
//   offset 24  u64      payload size P
//   offset 32  u64      FNV-1a 64 of the key
//   offset 40  u64      FNV-1a 64 of the payload
//   offset 48  K bytes  the key (compared in full on load, so a hash collision is a miss)
//   offset 48+K P bytes the payload
// A file whose size is not exactly 48 + K + P, or whose magic, version, kind, key or checksums
// do not match, is rejected (never loaded), and the kernel is compiled and the file rewritten.
// Files are written atomically: a unique temporary file in the same folder, fsync, rename.

#include <slowed/cuda/kernel_source.h>

#include <c10/util/Exception.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

namespace slowed {
namespace cuda {

/// What a compiled kernel binary holds.
enum class BinaryKind : uint32_t {
  Cubin = 1,  ///< an ELF cubin for one sm_XY
  Ptx = 2,    ///< PTX text for compute_XY, JIT-compiled by the driver at load
};

inline const char* binary_kind_name(BinaryKind kind) {
  return kind == BinaryKind::Cubin ? "cubin" : "ptx";
}

/// The kernel cache folder: $SLOWED_CACHE_DIR/kernels, else $HOME/.cache/slowed/kernels;
/// "" when neither variable is set (then there is no disk cache).
inline std::string kernel_cache_dir() {
  const char* root = std::getenv("SLOWED_CACHE_DIR");
  if (root && *root) return std::string(root) + "/kernels";
  const char* home = std::getenv("HOME");
  if (home && *home) return std::string(home) + "/.cache/slowed/kernels";
  return "";
}

namespace detail {

constexpr char kCacheMagic[8] = {'S', 'L', 'O', 'W', 'E', 'D', 'K', '\n'};
constexpr uint32_t kCacheFormatVersion = 1;
constexpr size_t kCacheHeaderBytes = 48;
constexpr uint64_t kSecondHashSeed = 0x9e3779b97f4a7c15ull;

inline void put_u32(std::string& out, size_t offset, uint32_t v) {
  for (int i = 0; i < 4; ++i) out[offset + i] = static_cast<char>((v >> (8 * i)) & 0xffu);
}
inline void put_u64(std::string& out, size_t offset, uint64_t v) {
  for (int i = 0; i < 8; ++i) out[offset + i] = static_cast<char>((v >> (8 * i)) & 0xffu);
}
inline uint32_t get_u32(const std::string& in, size_t offset) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(in[offset + i]);
  return v;
}
inline uint64_t get_u64(const std::string& in, size_t offset) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(in[offset + i]);
  return v;
}

/// The cache file name of `key`: "<family>-<target>-<hash>.<cubin|ptx>".
inline std::string cache_file_name(const std::string& family, const std::string& target,
                                   const std::string& key, BinaryKind kind) {
  return family + "-" + target + "-" + hex64(fnv1a64(key)) + hex64(fnv1a64(key, kSecondHashSeed)) +
         "." + binary_kind_name(kind);
}

/// The bytes of a cache file holding `payload` under `key`.
inline std::string encode_cache_file(const std::string& key, BinaryKind kind,
                                     const std::string& payload) {
  std::string out(kCacheHeaderBytes, '\0');
  std::memcpy(&out[0], kCacheMagic, sizeof(kCacheMagic));
  put_u32(out, 8, kCacheFormatVersion);
  put_u32(out, 12, static_cast<uint32_t>(kind));
  put_u64(out, 16, key.size());
  put_u64(out, 24, payload.size());
  put_u64(out, 32, fnv1a64(key));
  put_u64(out, 40, fnv1a64(payload));
  out += key;
  out += payload;
  return out;
}

/// Checks a cache file's bytes. Returns true and sets `payload` when valid for `key`/`kind`;
/// otherwise returns false with `why` saying what did not match.
inline bool decode_cache_file(const std::string& bytes, const std::string& key, BinaryKind kind,
                              std::string& payload, std::string& why) {
  if (bytes.size() < kCacheHeaderBytes) {
    why = "truncated header (" + std::to_string(bytes.size()) + " bytes)";
    return false;
  }
  if (std::memcmp(bytes.data(), kCacheMagic, sizeof(kCacheMagic)) != 0) {
    why = "bad magic";
    return false;
  }
  if (get_u32(bytes, 8) != kCacheFormatVersion) {
    why = "format version " + std::to_string(get_u32(bytes, 8)) + ", expected " +
          std::to_string(kCacheFormatVersion);
    return false;
  }
  if (get_u32(bytes, 12) != static_cast<uint32_t>(kind)) {
    why = "payload kind " + std::to_string(get_u32(bytes, 12)) + ", expected " +
          std::to_string(static_cast<uint32_t>(kind));
    return false;
  }
  const uint64_t key_size = get_u64(bytes, 16);
  const uint64_t payload_size = get_u64(bytes, 24);
  const uint64_t body = bytes.size() - kCacheHeaderBytes;
  if (key_size > body || payload_size != body - key_size) {
    why = "size mismatch (file has " + std::to_string(bytes.size()) + " bytes, header says " +
          std::to_string(kCacheHeaderBytes) + " + " + std::to_string(key_size) + " + " +
          std::to_string(payload_size) + "): truncated or extended";
    return false;
  }
  if (key_size != key.size() || get_u64(bytes, 32) != fnv1a64(key) ||
      bytes.compare(kCacheHeaderBytes, key_size, key) != 0) {
    why = "key mismatch (another kernel or a damaged key)";
    return false;
  }
  const size_t payload_offset = kCacheHeaderBytes + static_cast<size_t>(key_size);
  const uint64_t checksum = fnv1a64(bytes.data() + payload_offset, static_cast<size_t>(payload_size));
  if (checksum != get_u64(bytes, 40)) {
    why = "payload checksum mismatch";
    return false;
  }
  payload.assign(bytes, payload_offset, static_cast<size_t>(payload_size));
  return true;
}

inline std::string errno_text(int error) { return std::string(std::strerror(error)); }

/// Reads a whole file. Returns false with errno's text (ENOENT: `missing` = true).
inline bool read_whole_file(const std::string& path, std::string& out, bool& missing,
                            std::string& why) {
  missing = false;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    missing = errno == ENOENT;
    why = "open: " + errno_text(errno);
    return false;
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    why = "fstat: " + errno_text(errno);
    ::close(fd);
    return false;
  }
  out.assign(static_cast<size_t>(st.st_size), '\0');
  size_t done = 0;
  while (done < out.size()) {
    const ssize_t n = ::read(fd, &out[done], out.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;  // EOF early (the file shrank) or an error: the size check rejects it
    done += static_cast<size_t>(n);
  }
  out.resize(done);
  ::close(fd);
  return true;
}

/// mkdir -p. Returns false with the reason.
inline bool make_directories(const std::string& dir, std::string& why) {
  if (dir.empty()) {
    why = "no cache folder";
    return false;
  }
  for (size_t pos = 1; pos <= dir.size(); ++pos) {
    if (pos != dir.size() && dir[pos] != '/') continue;
    const std::string prefix = dir.substr(0, pos);
    if (::mkdir(prefix.c_str(), 0755) != 0 && errno != EEXIST) {
      why = "mkdir " + prefix + ": " + errno_text(errno);
      return false;
    }
  }
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    why = dir + " is not a folder";
    return false;
  }
  return true;
}

/// Writes `bytes` to `path` atomically: a unique temporary file in the same folder, fsync,
/// rename over `path`. Readers see the old file or the new one, never a partial one.
inline bool write_file_atomically(const std::string& path, const std::string& bytes,
                                  std::string& why) {
  static std::atomic<uint64_t> counter{0};
  const auto ticks = std::chrono::steady_clock::now().time_since_epoch().count();
  const std::string temp = path + ".tmp." + std::to_string(::getpid()) + "." +
                           std::to_string(counter.fetch_add(1)) + "." +
                           hex64(static_cast<uint64_t>(ticks));
  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) {
    why = "create " + temp + ": " + errno_text(errno);
    return false;
  }
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      why = "write " + temp + ": " + errno_text(errno);
      ::close(fd);
      ::unlink(temp.c_str());
      return false;
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    why = "fsync " + temp + ": " + errno_text(errno);
    ::close(fd);
    ::unlink(temp.c_str());
    return false;
  }
  if (::close(fd) != 0) {
    why = "close " + temp + ": " + errno_text(errno);
    ::unlink(temp.c_str());
    return false;
  }
  if (::rename(temp.c_str(), path.c_str()) != 0) {
    why = "rename " + temp + " -> " + path + ": " + errno_text(errno);
    ::unlink(temp.c_str());
    return false;
  }
  return true;
}

}  // namespace detail
}  // namespace cuda
}  // namespace slowed

#pragma once

// KernelSource: what the run-time compiler needs to know about one CUDA kernel source. The
// source text lives in a header under slowed/cuda/kernels/ as a raw string literal and includes
// no CUDA header; its entry points are `extern "C" __global__` functions (unmangled names, so
// the module can be searched by name); variants (dtype, block size, ...) are chosen with
// compile definitions (-DNAME=VALUE), which are part of every cache key.

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace slowed {
namespace cuda {
namespace detail {

constexpr uint64_t kFnv1aOffsetBasis = 14695981039346656037ull;
constexpr uint64_t kFnv1aPrime = 1099511628211ull;

/// FNV-1a, 64 bits: a fast non-cryptographic hash, used for cache keys and file checksums
/// (they guard against accidents, not attacks). `seed` replaces the offset basis, which gives
/// independent hashes of the same bytes.
inline uint64_t fnv1a64(const void* data, size_t size, uint64_t seed = kFnv1aOffsetBasis) {
  const auto* bytes = static_cast<const unsigned char*>(data);
  uint64_t hash = seed;
  for (size_t i = 0; i < size; ++i) {
    hash ^= bytes[i];
    hash *= kFnv1aPrime;
  }
  return hash;
}

inline uint64_t fnv1a64(const std::string& text, uint64_t seed = kFnv1aOffsetBasis) {
  return fnv1a64(text.data(), text.size(), seed);
}

inline std::string hex64(uint64_t value) {
  static const char digits[] = "0123456789abcdef";
  std::string out(16, '0');
  for (int i = 15; i >= 0; --i, value >>= 4) out[static_cast<size_t>(i)] = digits[value & 0xf];
  return out;
}

/// [A-Za-z_][A-Za-z0-9_]*
inline bool is_identifier(const std::string& s) {
  if (s.empty()) return false;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    const bool digit = c >= '0' && c <= '9';
    if (!(alpha || (digit && i > 0))) return false;
  }
  return true;
}

}  // namespace detail

/// One CUDA kernel source: a family name, the source text, its entry points and the compile
/// definitions of this variant.
///
/// The constructor validates its arguments and throws c10::Error naming the bad one.
///
/// Example:
/// ```
/// static const slowed::cuda::KernelSource source(
///     "scale_add",                                     // family: names cache files and errors
///     R"(extern "C" __global__ void scale(float* p, float a) { p[threadIdx.x] *= a; })",
///     {"scale"},                                       // extern "C" entry points
///     {{"SLOWED_BLOCK", "256"}});                      // -DSLOWED_BLOCK=256
/// auto fp16 = source.with_define("SLOWED_DTYPE", "2");  // another variant, another cache key
/// ```
class KernelSource {
 public:
  using Define = std::pair<std::string, std::string>;

  KernelSource(std::string family, std::string source, std::vector<std::string> kernels,
               std::vector<Define> defines = {})
      : family_(std::move(family)),
        source_(std::move(source)),
        kernels_(std::move(kernels)),
        defines_(std::move(defines)) {
    TORCH_CHECK(detail::is_identifier(family_),
                "family: expected a name made of [A-Za-z0-9_] (it names cache files), got '",
                family_, "'");
    TORCH_CHECK(!source_.empty(), "source: expected CUDA C++ text for kernel family '", family_,
                "', got an empty string");
    TORCH_CHECK(!kernels_.empty(), "kernels: expected at least one extern \"C\" entry point for "
                "kernel family '", family_, "', got none");
    for (const auto& k : kernels_) {
      TORCH_CHECK(detail::is_identifier(k), "kernels: expected extern \"C\" function names, got '",
                  k, "' in kernel family '", family_, "'");
    }
    for (const auto& d : defines_) check_define(d);
    source_hash_ = detail::fnv1a64(source_);
  }

  /// Family name, e.g. "slow_tuning": names cache files and appears in every error.
  const std::string& family() const { return family_; }
  /// The CUDA C++ source text (no #include).
  const std::string& source() const { return source_; }
  /// The extern "C" __global__ entry points defined by the source.
  const std::vector<std::string>& kernels() const { return kernels_; }
  /// Compile definitions of this variant, passed as -DNAME=VALUE in this order.
  const std::vector<Define>& defines() const { return defines_; }
  /// FNV-1a 64 of the source text.
  uint64_t source_hash() const { return source_hash_; }

  bool has_kernel(const std::string& name) const {
    for (const auto& k : kernels_) {
      if (k == name) return true;
    }
    return false;
  }

  /// A copy with NAME=VALUE defined (replacing an earlier value of NAME).
  KernelSource with_define(const std::string& name, const std::string& value) const {
    KernelSource copy = *this;
    const Define define{name, value};
    copy.check_define(define);
    for (auto& d : copy.defines_) {
      if (d.first == name) {
        d.second = value;
        return copy;
      }
    }
    copy.defines_.push_back(define);
    return copy;
  }

  /// "family#<source hash>[-DA=1 -DB=x]": identifies this variant's source and definitions
  /// (not the target architecture or compiler version).
  std::string identity() const {
    std::string id = family_ + "#" + detail::hex64(source_hash_);
    for (const auto& d : defines_) id += " -D" + d.first + "=" + d.second;
    return id;
  }

 private:
  void check_define(const Define& d) const {
    TORCH_CHECK(detail::is_identifier(d.first),
                "defines: expected a macro name made of [A-Za-z0-9_], got '", d.first,
                "' in kernel family '", family_, "'");
    TORCH_CHECK(d.second.find_first_of(" \t\n\r") == std::string::npos,
                "defines: expected a value without whitespace for ", d.first, ", got '", d.second,
                "' in kernel family '", family_, "'");
  }

  std::string family_;
  std::string source_;
  std::vector<std::string> kernels_;
  std::vector<Define> defines_;
  uint64_t source_hash_ = 0;
};

}  // namespace cuda
}  // namespace slowed

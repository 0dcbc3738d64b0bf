#pragma once

// The device-side storage type every slowed kernel source starts with: storage_t, to_float and
// from_float for SLOWED_DTYPE 0 (float32), 1 (bfloat16: bit operations, round to nearest even)
// and 2 (float16: PTX cvt). No CUDA header needed. A kernel source is this prelude followed by
// its body (see `with_storage_prelude`); SLOWED_DTYPE defaults to 0. The host names the codes
// with slowed::slowed::detail::StorageDtype (`StorageVariants` compiles one variant per value).

#include <slowed/cuda/kernel_source.h>
#include <slowed/detail/storage_dtype.h>

#include <string>

namespace slowed {
namespace cuda {
namespace kernels {

inline constexpr const char* kStoragePrelude = R"SLOWED_CUDA(
#ifndef SLOWED_DTYPE
#define SLOWED_DTYPE 0
#endif
#if SLOWED_DTYPE == 0
typedef float storage_t;
__device__ __forceinline__ float to_float(storage_t x) { return x; }
__device__ __forceinline__ storage_t from_float(float f) { return f; }
#else
typedef unsigned short storage_t;
#if SLOWED_DTYPE == 1
// bfloat16: the high half of a float; round to nearest even on the way back, NaN -> 0x7FC0.
__device__ __forceinline__ float to_float(storage_t h) {
  return __uint_as_float(static_cast<unsigned int>(h) << 16);
}
__device__ __forceinline__ storage_t from_float(float f) {
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<storage_t>(0x7fc0u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<storage_t>(u >> 16);
}
#else
// float16 through the hardware conversions (PTX cvt), round to nearest even.
__device__ __forceinline__ float to_float(storage_t h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
__device__ __forceinline__ storage_t from_float(float f) {
  storage_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
#endif
#endif
)SLOWED_CUDA";

/// The prelude followed by `body`: the text handed to NVRTC.
inline std::string with_storage_prelude(const char* body) {
  return std::string(kStoragePrelude) + body;
}

/// The three storage variants of one kernel source, -DSLOWED_DTYPE=<StorageDtype value>. Held as
/// a function-local static by each kernel header, so the addresses the registry lists stay valid.
class StorageVariants {
 public:
  explicit StorageVariants(const KernelSource& base)
      : variants_{variant(base, slowed::detail::StorageDtype::Float32),
                  variant(base, slowed::detail::StorageDtype::BFloat16),
                  variant(base, slowed::detail::StorageDtype::Float16)} {}

  const KernelSource& operator[](slowed::detail::StorageDtype d) const {
    return variants_[static_cast<int>(d)];
  }

 private:
  static KernelSource variant(const KernelSource& base, slowed::detail::StorageDtype d) {
    return base.with_define("SLOWED_DTYPE", slowed::detail::storage_define(d));
  }
  KernelSource variants_[3];
};

}  // namespace kernels
}  // namespace cuda
}  // namespace slowed

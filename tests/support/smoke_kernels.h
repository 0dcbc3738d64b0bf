#pragma once

// Test-only smoke kernels of the run-time CUDA compiler (not installed, not in the library's
// registry): out = alpha * x + y, elementwise, in fp32 and in bf16 (fp32 arithmetic, one
// rounding to bf16 at the store). Used by tests/test_cuda_runtime.cpp, the emulator's generator
// (tests/emulator/generate_kernels.cpp, for tests/emulator/test_emulator_core.cpp) and
// benchmarks/kernel_dump.cpp.
//
// What is fused and why: nothing worth the name (a scale and an add in one pass). The kernels
// exist so that the tests exercise the whole run-time path (NVRTC compile for sm_80/sm_90, disk
// cache, module load, launch on torch's current stream) with arithmetic simple enough to compare
// against ATen. They also show the conventions every kernel source here follows:
//   - no #include at all (NVRTC needs no include path): bf16 <-> fp32 with bit operations;
//   - extern "C" __global__ entry points, so the loaded module is searched by plain name;
//   - element counts are 64-bit (long long), grid-stride loops cover any size with any grid;
//   - variants are compile definitions with defaults (SLOWED_SCALE_ADD_ITEMS here).

#include <slowed/cuda/kernel_source.h>

namespace slowed_tests {

inline constexpr const char* kSmokeKernelsSource = R"SLOWED_CUDA(
// Elements handled by one thread per grid-stride step (a define, so a variant is a -D away).
#ifndef SLOWED_SCALE_ADD_ITEMS
#define SLOWED_SCALE_ADD_ITEMS 4
#endif

typedef unsigned short slowed_bf16;  // the raw bits of a bfloat16

// bf16 -> fp32 is exact: a bf16 is the high half of an fp32.
__device__ __forceinline__ float slowed_bf16_to_float(slowed_bf16 h) {
  return __uint_as_float(static_cast<unsigned int>(h) << 16);
}

// fp32 -> bf16, round to nearest, ties to even (as c10::BFloat16); any NaN becomes 0x7FC0.
__device__ __forceinline__ slowed_bf16 slowed_float_to_bf16(float f) {
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<slowed_bf16>(0x7fc0u);
  // Adding 0x7fff rounds up exactly when the dropped half is > 0x8000; the low kept bit turns
  // the tie (== 0x8000) into round-half-to-even. Overflow carries into the exponent (-> inf).
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<slowed_bf16>(u >> 16);
}

// out[i] = alpha * x[i] + y[i] for i < n; out may alias x or y.
extern "C" __global__ void slowed_scale_add_f32(float* out, const float* x, const float* y,
                                                float alpha, long long n) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long base = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; base < n;
       base += stride * SLOWED_SCALE_ADD_ITEMS) {
#pragma unroll
    for (int k = 0; k < SLOWED_SCALE_ADD_ITEMS; ++k) {
      const long long i = base + k * stride;
      if (i < n) out[i] = alpha * x[i] + y[i];
    }
  }
}

// Same in bf16 storage: load bf16, compute in fp32, round once to bf16 when storing.
extern "C" __global__ void slowed_scale_add_bf16(slowed_bf16* out, const slowed_bf16* x,
                                                 const slowed_bf16* y, float alpha, long long n) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long base = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; base < n;
       base += stride * SLOWED_SCALE_ADD_ITEMS) {
#pragma unroll
    for (int k = 0; k < SLOWED_SCALE_ADD_ITEMS; ++k) {
      const long long i = base + k * stride;
      if (i < n) {
        const float r = alpha * slowed_bf16_to_float(x[i]) + slowed_bf16_to_float(y[i]);
        out[i] = slowed_float_to_bf16(r);
      }
    }
  }
}
)SLOWED_CUDA";

/// The smoke kernels: `slowed_scale_add_f32(float* out, const float* x, const float* y,
/// float alpha, long long n)` and `slowed_scale_add_bf16` (same, bf16 storage as uint16 bits).
/// Define SLOWED_SCALE_ADD_ITEMS (default 4) for the elements per thread per grid step.
///
/// Example:
/// ```
/// const auto& src = slowed_tests::smoke_kernels_source();
/// std::string cubin = slowed::cuda::compile_to_binary(src, 9, 0, /*cubin=*/true);
/// ```
inline const slowed::cuda::KernelSource& smoke_kernels_source() {
  static const slowed::cuda::KernelSource source("smoke_scale_add", kSmokeKernelsSource,
                                   {"slowed_scale_add_f32", "slowed_scale_add_bf16"});
  return source;
}

}  // namespace slowed_tests

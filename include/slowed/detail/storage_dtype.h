#pragma once

// The storage dtype of a fused kernel's operands, one enum for every kernel: the CPU kernels
// switch on it, and its value is the SLOWED_DTYPE code the CUDA kernel sources are compiled with
// (-DSLOWED_DTYPE=0/1/2; the kernel text keeps the numbers, the host names them here). The
// arithmetic is fp32 in all three.

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

namespace slowed {
namespace detail {

/// Storage type shared by every operand of one kernel call.
enum class StorageDtype : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

/// The storage dtype of `t`; `what` names the caller in the error for other dtypes.
inline StorageDtype storage_dtype(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat:
      return StorageDtype::Float32;
    case at::kBFloat16:
      return StorageDtype::BFloat16;
    case at::kHalf:
      return StorageDtype::Float16;
    default:
      TORCH_CHECK(false, what, ": the CUDA kernels take float32, bfloat16 or float16, got ", t);
  }
}

/// The SLOWED_DTYPE value of `d` in a kernel source's compile definitions ("0", "1", "2").
inline std::string storage_define(StorageDtype d) { return std::to_string(static_cast<int>(d)); }

}  // namespace detail
}  // namespace slowed

#pragma once

// The storage dtype code every slowed kernel source takes as -DSLOWED_DTYPE: 0 float32,
// 1 bfloat16, 2 float16 (fp32 arithmetic in all three).

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace slowed {
namespace cuda {

/// SLOWED_DTYPE code of `t`; `what` names the caller in the error for other dtypes.
inline int storage_code(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat:
      return 0;
    case at::kBFloat16:
      return 1;
    case at::kHalf:
      return 2;
    default:
      TORCH_CHECK(false, what, ": the CUDA kernels take float32, bfloat16 or float16, got ", t);
  }
}

}  // namespace cuda
}  // namespace slowed

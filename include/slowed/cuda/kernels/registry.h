#pragma once

// The registry of every CUDA kernel source slowed ships. The test suite compiles each entry with
// NVRTC for sm_80 and sm_90 (cubin) and to PTX, so a kernel that stops compiling fails on any
// machine with libnvrtc, GPU or not.
//
// Adding a kernel: include its header below and add one line to the list; register each
// variant that production code compiles (e.g. `source.with_define("SLOWED_DTYPE", "1")`) as a
// function-local static in the kernel's header, so the address stays valid.

#include <slowed/cuda/kernel_source.h>
#include <slowed/cuda/kernels/entropy_masked_ce_kernels.h>
#include <slowed/cuda/kernels/slow_tuning_kernels.h>
#include <slowed/cuda/kernels/smoke_kernels.h>

#include <vector>

namespace slowed {
namespace cuda {

/// Every kernel source (and registered variant) of the library, in a fixed order.
///
/// Example:
/// ```
/// for (const auto* source : slowed::cuda::all_kernel_sources())
///   slowed::cuda::compile_to_binary(*source, 8, 0, /*cubin=*/true);
/// ```
inline const std::vector<const KernelSource*>& all_kernel_sources() {
  static const std::vector<const KernelSource*> sources = {
      &kernels::smoke_kernels_source(),
      &kernels::entropy_masked_ce_source(0),  // float
      &kernels::entropy_masked_ce_source(1),  // bfloat16
      &kernels::entropy_masked_ce_source(2),  // float16
      &kernels::slow_tuning_source(0),  // float
      &kernels::slow_tuning_source(1),  // bfloat16
      &kernels::slow_tuning_source(2),  // float16
  };
  return sources;
}

}  // namespace cuda
}  // namespace slowed

#pragma once

// The registry of every CUDA kernel source slowed ships. The test suite compiles each entry with
// NVRTC for sm_80 and sm_90 (cubin) and to PTX, so a kernel that stops compiling fails on any
// machine with libnvrtc, GPU or not.
//
// Adding a kernel: include its header below and add one line to the list; register each
// variant that production code compiles (e.g. the StorageVariants of
// cuda/kernels/storage_prelude.h) as a function-local static in the kernel's header, so the
// address stays valid. Test-only kernels (tests/support/smoke_kernels.h) are not listed here;
// the tests that compile every source add them themselves.

#include <slowed/cuda/kernel_source.h>
#include <slowed/cuda/kernels/entropy_masked_cross_entropy_kernels.h>
#include <slowed/cuda/kernels/slow_tuning_kernels.h>
#include <slowed/detail/storage_dtype.h>

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
  using slowed::detail::StorageDtype;
  static const std::vector<const KernelSource*> sources = {
      &kernels::entropy_masked_ce_source(StorageDtype::Float32),
      &kernels::entropy_masked_ce_source(StorageDtype::BFloat16),
      &kernels::entropy_masked_ce_source(StorageDtype::Float16),
      &kernels::slow_tuning_source(StorageDtype::Float32),
      &kernels::slow_tuning_source(StorageDtype::BFloat16),
      &kernels::slow_tuning_source(StorageDtype::Float16),
  };
  return sources;
}

}  // namespace cuda
}  // namespace slowed

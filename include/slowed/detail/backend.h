#pragma once

// Backend selection, in one place for every op: whether the fused CUDA kernels are switched on,
// which fused kernels serve a tensor (CPU, CUDA, or none: the ATen reference path), and the
// autograd version bump after a write through a raw pointer. The ops (optim/, loss/) ask here;
// the launchers in cpu/ and cuda/ only launch.

#include <slowed/cuda/jit.h>

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>

namespace slowed {
namespace detail {

/// Which fused kernels transform a tensor.
enum class FusedKind { None, Cpu, Cuda };

/// True when SLOWED_CUDA_KERNELS=1 asks for the fused CUDA kernels. They compile with NVRTC in
/// every test run but have not yet run on a GPU in this project's test record
/// (docs/benchmarks.md); until they have, CUDA tensors take the ATen reference path by default.
inline bool fused_kernels_requested() {
  const char* v = std::getenv("SLOWED_CUDA_KERNELS");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

/// The dtypes the CUDA kernels are compiled for (fp32, bf16, fp16).
inline bool cuda_kernel_dtype(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf;
}

/// The CUDA kernels serve `who` when requested and the run-time compiler works; otherwise one
/// warning per process (naming `who`) and the reference path.
inline bool cuda_kernels_usable(const char* who) {
  if (!fused_kernels_requested()) return false;
  if (cuda::cuda_jit_available()) return true;
  cuda::warn_once_fallback(who);
  return false;
}

/// The optimizer's choice for a parameter (or state tensor): dense contiguous fp32/bf16 CPU
/// tensors take the CPU kernels; fp32/bf16/fp16 CUDA tensors the CUDA kernels (when usable);
/// everything else the reference path.
inline FusedKind fused_kind(const at::Tensor& t) {
  if (!t.defined() || t.layout() != at::kStrided || !t.is_contiguous() || t.is_inference()) {
    return FusedKind::None;
  }
  const auto dt = t.scalar_type();
  if (t.is_cpu()) {
    return dt == at::kFloat || dt == at::kBFloat16 ? FusedKind::Cpu : FusedKind::None;
  }
  if (t.is_cuda() && cuda_kernel_dtype(dt) && cuda_kernels_usable("SlowTuningOptimizer")) {
    return FusedKind::Cuda;
  }
  return FusedKind::None;
}

/// The loss's choice for its logits: the fused CUDA kernel for CUDA tensors in fp32, bf16 or
/// fp16 when usable and `use_reference` is off.
inline bool use_fused_cuda(const at::Tensor& t, bool use_reference) {
  return !use_reference && t.is_cuda() && cuda_kernel_dtype(t.scalar_type()) &&
         cuda_kernels_usable("EntropyMaskedCrossEntropy");
}

/// Marks an in-place write made through a raw pointer, as ATen's in-place ops do, so that
/// autograd detects a tensor modified after it was saved for a backward.
inline void bump_version(const at::Tensor& t) {
  if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace detail
}  // namespace slowed

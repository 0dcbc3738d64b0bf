#pragma once

// Host side of the fused CUDA entropy-masked cross-entropy: tensors -> pointers, sizes, launch
// on torch's current stream through the run-time compiler (slowed/cuda/jit.h). No CUDA headers:
// this compiles against a CPU-only LibTorch and switches on at run time for CUDA tensors. The
// CPU kernel's launchers (slowed/cpu/entropy_masked_cross_entropy_cpu.h) have the same names
// and arguments.
//
// Status: the kernels compile with NVRTC for sm_80/sm_90 in every test run, but have not yet run
// on a GPU in this project's test record (docs/benchmarks.md). Until they have, the loss uses
// them only when SLOWED_CUDA_KERNELS=1 is set; otherwise CUDA tensors take the ATen reference
// path, which is correct everywhere.

#include <slowed/cuda/jit.h>
#include <slowed/cuda/kernels/entropy_masked_cross_entropy_kernels.h>
#include <slowed/detail/storage_dtype.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace slowed {
namespace cuda {

/// Threads per row: enough 16-byte vectors per thread to hide latency, at most 1024.
inline unsigned emce_block_size(int64_t vocab) {
  if (vocab >= 65536) return 1024;
  if (vocab >= 8192) return 512;
  return 256;
}

inline unsigned emce_grid_size(int64_t rows) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(rows, int64_t(1) << 20)));
}

/// Kernel `name` of the variant for `t`'s dtype, loaded for `t`'s device.
inline const KernelHandle& emce_kernel(const at::Tensor& t, const char* name) {
  const auto dtype = slowed::detail::storage_dtype(t.scalar_type(), "logits");
  return get_kernel(kernels::entropy_masked_ce_source(dtype), name, t.device());
}

/// The row kernel: fills lse/entropy/loss (float [N]) and kept (bool [N]) and, when `grad` is
/// defined, the keep-masked gradient (may alias `logits`). All tensors contiguous, on one device.
inline void emce_rows(const at::Tensor& logits, const at::Tensor& grad, const at::Tensor& targets,
                      const at::Tensor& reference, const at::Tensor& lse,
                      const at::Tensor& entropy, const at::Tensor& loss, const at::Tensor& kept,
                      int64_t ignore_index, float eps, float zs, float cap, bool absolute,
                      float threshold) {
  long long n = logits.size(0), vocab = logits.size(1);
  if (n == 0) return;
  const auto& k = emce_kernel(logits, "slowed_emce_rows");
  void* logits_p = logits.data_ptr();
  void* grad_p = grad.defined() ? grad.data_ptr() : nullptr;
  void* targets_p = targets.data_ptr();
  void* ref_p = reference.defined() ? reference.data_ptr() : nullptr;
  void* lse_p = lse.data_ptr();
  void* ent_p = entropy.data_ptr();
  void* loss_p = loss.data_ptr();
  void* kept_p = kept.data_ptr();
  long long ignore = ignore_index;
  int abs_flag = absolute ? 1 : 0;
  void* args[] = {&logits_p, &grad_p, &targets_p, &ref_p, &lse_p,  &ent_p, &loss_p,   &kept_p,
                  &n,        &vocab,  &ignore,    &eps,   &zs,     &cap,   &abs_flag, &threshold};
  launch(k, {emce_grid_size(n)}, {emce_block_size(vocab)}, 0, args, logits.device());
}

/// Zeroes the gradient rows with kernel_keep && !keep (ratio mode's decision comes after the
/// row kernel). No host synchronization.
inline void emce_zero_rows(const at::Tensor& grad, const at::Tensor& kernel_keep,
                           const at::Tensor& keep) {
  long long n = grad.size(0), vocab = grad.size(1);
  if (n == 0) return;
  const auto& k = emce_kernel(grad, "slowed_emce_zero_rows");
  at::Tensor keep_c = keep.contiguous();
  void* grad_p = grad.data_ptr();
  void* kk_p = kernel_keep.data_ptr();
  void* keep_p = keep_c.data_ptr();
  void* args[] = {&grad_p, &kk_p, &keep_p, &n, &vocab};
  launch(k, {emce_grid_size(n)}, {emce_block_size(vocab)}, 0, args, grad.device());
}

/// out = grad * factor (float, 0-dim or [N] per row), fp32 math, one rounding; out may alias
/// grad. Rows whose factor is exactly 1 are skipped when out aliases grad.
inline void emce_scale_rows(const at::Tensor& grad, const at::Tensor& factor, const at::Tensor& out) {
  long long n = grad.size(0), vocab = grad.size(1);
  if (n == 0) return;
  const auto& k = emce_kernel(grad, "slowed_emce_scale_rows");
  at::Tensor f = factor.to(at::kFloat).contiguous();
  void* grad_p = grad.data_ptr();
  void* out_p = out.data_ptr();
  void* f_p = f.data_ptr();
  int per_row = f.dim() == 0 ? 0 : 1;
  void* args[] = {&grad_p, &out_p, &f_p, &per_row, &n, &vocab};
  launch(k, {emce_grid_size(n)}, {emce_block_size(vocab)}, 0, args, grad.device());
}

}  // namespace cuda
}  // namespace slowed

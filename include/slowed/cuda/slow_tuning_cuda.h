#pragma once

// Host side of the fused CUDA Slow Tuning kernels (slowed/cuda/kernels/slow_tuning_kernels.h):
// tensors -> chunk lists in by-value kernel arguments, launches on torch's current stream
// through the run-time compiler (slowed/cuda/jit.h). No CUDA headers: this compiles against a
// CPU-only LibTorch and switches on at run time for CUDA tensors.
//
// Status: the kernels compile with NVRTC for sm_80/sm_90 in every test run but have not yet run
// on a GPU in this project's test record. Until they have, SlowTuningOptimizer uses them only
// when SLOWED_CUDA_KERNELS=1 is set (slowed::detail::fused_kernels_requested(), shared with the
// loss); otherwise CUDA tensors take the ATen reference path, which is correct everywhere.

#include <slowed/cuda/jit.h>
#include <slowed/cuda/kernels/slow_tuning_kernels.h>
#include <slowed/detail/storage_dtype.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <vector>

namespace slowed {
namespace cuda {

/// One tensor's operands for the multi-tensor kernels. Every defined tensor is contiguous, has
/// `param`'s dtype (float32, bfloat16 or float16), device and number of elements.
struct SlowTuningTensor {
  at::Tensor param;
  at::Tensor aux;         ///< generic: the snapshot theta_prev (undefined: none); Adam: the gradient
  at::Tensor exp_avg;     ///< Adam
  at::Tensor exp_avg_sq;  ///< Adam
  at::Tensor max_exp_avg_sq;  ///< Adam with amsgrad
  at::Tensor initial;     ///< theta_0 (undefined: no drift projection for this tensor)
  /// Adam hyper-parameters (fp32, as torch::optim::AdamW's ops round them): beta1, beta2,
  /// 1 - beta1, 1 - beta2, eps, lr / (1 - beta1^t), sqrt(1 - beta2^t), weight decay (AdamW:
  /// lr * weight_decay; Adam: weight_decay).
  float hyper[8] = {0.f, 0.f, 1.f, 1.f, 0.f, 0.f, 1.f, 0.f};
  bool amsgrad = false;
};

/// Slow Tuning settings of one step; a bound <= 0 is off.
struct SlowTuningLaunchBounds {
  double scale = 1.0;
  double max_step = 0.0;
  double max_drift = 0.0;
  double norm_floor = 0.0;
  bool any() const { return max_step > 0.0 || max_drift > 0.0; }
};

namespace detail {

inline constexpr int kMtTensors = 24;      // SLOWED_MT_TENSORS
inline constexpr int kMtBlocks = 320;      // SLOWED_MT_BLOCKS
inline constexpr int64_t kMtChunk = 65536; // SLOWED_MT_CHUNK
inline constexpr unsigned kMtThreads = 512;

/// Host mirror of the kernels' SlowMtArgs (same fields, same order, same size).
struct SlowMtArgs {
  void* ptr[6][kMtTensors];
  long long numel[kMtTensors];
  float hyper[8][kMtTensors];
  int first_slot[kMtTensors];
  int block_chunk[kMtBlocks];
  unsigned char block_tensor[kMtBlocks];
  unsigned char amsgrad[kMtTensors];
};
static_assert(sizeof(SlowMtArgs) == 3832, "SlowMtArgs: layout differs from the kernel source");

inline void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

/// Calls launch(args, blocks) for every batch of chunks of `ts` (one dtype), as PyTorch's
/// multi_tensor_apply batches them; first_slot[i] is tensor i's first partial-sum slot.
template <class Launch>
void for_each_batch(const std::vector<const SlowTuningTensor*>& ts,
                    const std::vector<int>& first_slot, bool snapshot, Launch&& launch) {
  SlowMtArgs args;
  std::memset(&args, 0, sizeof args);
  int nt = 0, nb = 0;
  auto fill = [&](int slot, size_t i) {
    const SlowTuningTensor& t = *ts[i];
    args.ptr[0][slot] = t.param.data_ptr();
    args.ptr[1][slot] = ptr_or_null(t.aux);
    args.ptr[2][slot] = snapshot ? nullptr : ptr_or_null(t.exp_avg);
    args.ptr[3][slot] = snapshot ? nullptr : ptr_or_null(t.exp_avg_sq);
    args.ptr[4][slot] = snapshot ? nullptr : ptr_or_null(t.max_exp_avg_sq);
    args.ptr[5][slot] = snapshot ? nullptr : ptr_or_null(t.initial);
    args.numel[slot] = t.param.numel();
    for (int k = 0; k < 8; ++k) args.hyper[k][slot] = t.hyper[k];
    args.first_slot[slot] = first_slot[i];
    args.amsgrad[slot] = t.amsgrad ? 1 : 0;
  };
  for (size_t i = 0; i < ts.size(); ++i) {
    const int64_t n = ts[i]->param.numel();
    if (n == 0) continue;
    if (nt == kMtTensors) {
      launch(args, nb);
      nt = nb = 0;
    }
    int slot = nt++;
    fill(slot, i);
    const int64_t chunks = (n + kMtChunk - 1) / kMtChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      if (nb == kMtBlocks) {
        launch(args, nb);
        nb = 0;
        nt = 1;  // the current tensor continues as slot 0 of the next launch
        slot = 0;
        fill(0, i);
      }
      args.block_tensor[nb] = static_cast<unsigned char>(slot);
      args.block_chunk[nb] = static_cast<int>(c);
      ++nb;
    }
  }
  if (nb > 0) launch(args, nb);
}

/// Tensors of one call grouped by storage dtype (each dtype is a kernel variant).
inline std::map<slowed::detail::StorageDtype, std::vector<const SlowTuningTensor*>> by_dtype(
    const std::vector<SlowTuningTensor>& ts) {
  std::map<slowed::detail::StorageDtype, std::vector<const SlowTuningTensor*>> groups;
  for (const auto& t : ts) {
    groups[slowed::detail::storage_dtype(t.param.scalar_type(), "SlowTuningOptimizer parameters")]
        .push_back(&t);
  }
  return groups;
}

/// Partial-sum slots: one per chunk, tensor by tensor.
inline std::vector<int> slot_layout(const std::vector<const SlowTuningTensor*>& ts, int* total) {
  std::vector<int> first(ts.size());
  int64_t next = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    first[i] = static_cast<int>(next);
    next += (ts[i]->param.numel() + kMtChunk - 1) / kMtChunk;
  }
  TORCH_CHECK(next < (int64_t(1) << 31), "SlowTuningOptimizer: too many chunks for one step (",
              next, ")");
  *total = static_cast<int>(next);
  return first;
}

/// Pass 1 (when a bound is on) and pass 2 of one dtype group.
inline void two_pass(const std::vector<const SlowTuningTensor*>& ts,
                     slowed::detail::StorageDtype dtype,
                     const SlowTuningLaunchBounds& b, const char* sums_kernel,
                     const char* apply_kernel, bool decoupled) {
  if (ts.empty()) return;
  const c10::Device device = ts.front()->param.device();
  const KernelSource& source = kernels::slow_tuning_source(dtype);
  int total = 0;
  const std::vector<int> first = slot_layout(ts, &total);
  at::Tensor partials;
  void* partials_p = nullptr;
  int decoupled_flag = decoupled ? 1 : 0;
  if (b.any() && total > 0) {
    partials = at::empty({static_cast<int64_t>(total) * 5},
                         ts.front()->param.options().dtype(at::kDouble));
    partials_p = partials.data_ptr();
    const KernelHandle& k = get_kernel(source, sums_kernel, device);
    for_each_batch(ts, first, false, [&](SlowMtArgs& args, int blocks) {
      void* params[] = {&args, &partials_p, &decoupled_flag};  // generic: the first two
      launch(k, {static_cast<unsigned>(blocks)}, {kMtThreads}, 0, params, device);
    });
  }
  double scale = b.scale, max_step = b.max_step, max_drift = b.max_drift, floor = b.norm_floor;
  const KernelHandle& k = get_kernel(source, apply_kernel, device);
  for_each_batch(ts, first, false, [&](SlowMtArgs& args, int blocks) {
    // The generic apply kernel takes the first six (cuLaunchKernel reads as many arguments as
    // the kernel declares).
    void* params[] = {&args, &partials_p, &scale, &max_step, &max_drift, &floor, &decoupled_flag};
    launch(k, {static_cast<unsigned>(blocks)}, {kMtThreads}, 0, params, device);
  });
}

}  // namespace detail

/// theta_prev <- theta for every tensor (`aux` receives a bitwise copy of `param`): the
/// snapshot of the generic path, a few launches for all tensors.
inline void slow_tuning_snapshot(const std::vector<SlowTuningTensor>& ts) {
  for (const auto& group : detail::by_dtype(ts)) {
    const c10::Device device = group.second.front()->param.device();
    const auto& k =
        get_kernel(kernels::slow_tuning_source(group.first), "slowed_st_snapshot", device);
    const std::vector<int> first(group.second.size(), 0);
    detail::for_each_batch(group.second, first, true, [&](detail::SlowMtArgs& args, int blocks) {
      void* params[] = {&args};
      launch(k, {static_cast<unsigned>(blocks)}, {detail::kMtThreads}, 0, params, device);
    });
  }
}

/// The generic path after Base::step: `param` holds Base's new values, `aux` the snapshot (or
/// undefined when the scale is 1 and no step bound is on), `initial` theta_0 for the drift
/// bound. Pass 1 only when a bound is on.
inline void slow_tuning_generic_step(const std::vector<SlowTuningTensor>& ts,
                                     const SlowTuningLaunchBounds& b) {
  for (const auto& group : detail::by_dtype(ts)) {
    detail::two_pass(group.second, group.first, b, "slowed_st_generic_sums",
                     "slowed_st_generic_apply", false);
  }
}

/// The Adam path: `aux` is the gradient; the moments and the step counters are the caller's
/// (torch::optim::AdamW's state objects). `decoupled` selects AdamW's weight decay.
inline void slow_tuning_adam_step(const std::vector<SlowTuningTensor>& ts,
                                  const SlowTuningLaunchBounds& b, bool decoupled) {
  for (const auto& group : detail::by_dtype(ts)) {
    detail::two_pass(group.second, group.first, b, "slowed_st_adam_sums", "slowed_st_adam_apply",
                     decoupled);
  }
}

}  // namespace cuda
}  // namespace slowed

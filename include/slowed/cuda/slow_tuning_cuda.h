#pragma once

// Host side of the fused CUDA Slow Tuning kernels (slowed/cuda/kernels/slow_tuning_kernels.h):
// the operands every backend takes (slowed/detail/slow_tuning_operands.h; the CPU twin is
// slowed/cpu/slow_tuning_cpu.h, same launchers) -> chunk lists in by-value kernel arguments,
// packed once here, launched on torch's current stream through the run-time compiler
// (slowed/cuda/jit.h). No CUDA headers: this compiles against a
// CPU-only LibTorch and switches on at run time for CUDA tensors.
//
// Status: the kernels compile with NVRTC for sm_80/sm_90 in every test run but have not yet run
// on a GPU in this project's test record. Until they have, SlowTuningOptimizer uses them only
// when SLOWED_CUDA_KERNELS=1 is set (slowed::detail::fused_kernels_requested(), shared with the
// loss); otherwise CUDA tensors take the ATen reference path, which is correct everywhere.

#include <slowed/cuda/jit.h>
#include <slowed/cuda/kernels/slow_tuning_kernels.h>
#include <slowed/detail/slow_tuning_operands.h>
#include <slowed/detail/storage_dtype.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <vector>

namespace slowed {
namespace cuda {

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
  int tensor_index[kMtTensors];
  int block_chunk[kMtBlocks];
  unsigned char block_tensor[kMtBlocks];
  unsigned char amsgrad[kMtTensors];
};
static_assert(sizeof(SlowMtArgs) == 3928, "SlowMtArgs: layout differs from the kernel source");

inline void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

using Operands = slowed::detail::SlowTuningOperands;

/// Calls launch(args, blocks) for every batch of chunks of `ts` (one dtype), as PyTorch's
/// multi_tensor_apply batches them; first_slot[i] is tensor i's first partial-sum slot, and
/// SlowMtArgs::tensor_index its i (the place of its factors). Slot
/// AUX of SlowMtArgs::ptr is the gradient for the Adam kernels (`adam`), else the snapshot
/// `prev`; the Adam settings go to SlowMtArgs::hyper in the kernels' H_* order.
template <class Launch>
void for_each_batch(const std::vector<const Operands*>& ts, const std::vector<int>& first_slot,
                    bool adam, Launch&& launch) {
  SlowMtArgs args;
  std::memset(&args, 0, sizeof args);
  int nt = 0, nb = 0;
  auto fill = [&](int slot, size_t i) {
    const Operands& t = *ts[i];
    const slowed::detail::AdamSettings& h = t.adam;
    args.ptr[0][slot] = t.param.data_ptr();                   // SLOT_PARAM
    args.ptr[1][slot] = ptr_or_null(adam ? t.grad : t.prev);  // SLOT_AUX
    args.ptr[2][slot] = ptr_or_null(t.exp_avg);
    args.ptr[3][slot] = ptr_or_null(t.exp_avg_sq);
    args.ptr[4][slot] = h.amsgrad ? ptr_or_null(t.max_exp_avg_sq) : nullptr;
    args.ptr[5][slot] = ptr_or_null(t.initial);               // SLOT_INITIAL
    args.numel[slot] = t.param.numel();
    const float hyper[8] = {h.beta1, h.beta2,     h.one_minus_beta1, h.one_minus_beta2,
                            h.eps,   h.step_size, h.bc2_sqrt,        h.weight_decay};
    for (int k = 0; k < 8; ++k) args.hyper[k][slot] = hyper[k];
    args.first_slot[slot] = first_slot[i];
    args.tensor_index[slot] = static_cast<int>(i);
    args.amsgrad[slot] = h.amsgrad ? 1 : 0;
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
inline std::map<slowed::detail::StorageDtype, std::vector<const Operands*>> by_dtype(
    const std::vector<Operands>& ts) {
  std::map<slowed::detail::StorageDtype, std::vector<const Operands*>> groups;
  for (const auto& t : ts) {
    groups[slowed::detail::storage_dtype(t.param.scalar_type(), "SlowTuningOptimizer parameters")]
        .push_back(&t);
  }
  return groups;
}

/// Partial-sum slots: one per chunk, tensor by tensor.
inline std::vector<int> slot_layout(const std::vector<const Operands*>& ts, int* total) {
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

/// The tensors of a batch of `blocks` chunks whose finalize it launches: slots *first .. the
/// last block's. Slot 0 is skipped when it continues a tensor from the previous batch (block 0
/// is not its chunk 0): that batch finalized it, so each tensor is finalized once. A tensor
/// filled into a batch that was launched before any of its chunks joined has no block there
/// and is finalized in the next. Returns the number of tensors (the finalize grid).
inline int finalize_tensors(const SlowMtArgs& args, int blocks, int* first) {
  *first = args.block_chunk[0] != 0 ? 1 : 0;
  return args.block_tensor[blocks - 1] + 1 - *first;
}

/// Pass 1, the finalize (when a bound is on) and pass 2 of one dtype group, of the Adam kernels
/// (`adam`) or the generic ones.
inline void two_pass(const std::vector<const Operands*>& ts, slowed::detail::StorageDtype dtype,
                     const slowed::detail::SlowBounds& b, bool adam, bool decoupled) {
  if (ts.empty()) return;
  const char* sums_kernel = adam ? "slowed_st_adam_sums" : "slowed_st_generic_sums";
  const char* apply_kernel = adam ? "slowed_st_adam_apply" : "slowed_st_generic_apply";
  const c10::Device device = ts.front()->param.device();
  const KernelSource& source = kernels::slow_tuning_source(dtype);
  int total = 0;
  const std::vector<int> first = slot_layout(ts, &total);
  at::Tensor sums;
  void* partials_p = nullptr;
  void* factors_p = nullptr;  // null: the apply kernels use (scale, 1)
  int decoupled_flag = decoupled ? 1 : 0;
  double scale = b.scale, max_step = b.max_step, max_drift = b.max_drift, floor = b.norm_floor;
  if (b.any() && total > 0) {
    // One allocation: 5 partial sums per chunk, then (a, g) per tensor (by its index in `ts`).
    sums = at::empty({static_cast<int64_t>(total) * 5 + static_cast<int64_t>(ts.size()) * 2},
                     ts.front()->param.options().dtype(at::kDouble));
    partials_p = sums.data_ptr();
    factors_p = sums.data_ptr<double>() + static_cast<int64_t>(total) * 5;
    const KernelHandle& k = get_kernel(source, sums_kernel, device);
    for_each_batch(ts, first, adam, [&](SlowMtArgs& args, int blocks) {
      void* params[] = {&args, &partials_p, &decoupled_flag};  // generic: the first two
      launch(k, {static_cast<unsigned>(blocks)}, {kMtThreads}, 0, params, device);
    });
    // After every sums launch (same stream): a tensor's slots may span several batches.
    const KernelHandle& f = get_kernel(source, "slowed_st_finalize", device);
    for_each_batch(ts, first, adam, [&](SlowMtArgs& args, int blocks) {
      int first_tensor = 0;
      const int tensors = finalize_tensors(args, blocks, &first_tensor);
      if (tensors == 0) return;  // only the continuation of a tensor finalized before
      void* params[] = {&args,  &partials_p, &factors_p, &first_tensor,
                        &scale, &max_step,   &max_drift, &floor};
      launch(f, {static_cast<unsigned>(tensors)}, {kMtThreads}, 0, params, device);
    });
  }
  const KernelHandle& k = get_kernel(source, apply_kernel, device);
  for_each_batch(ts, first, adam, [&](SlowMtArgs& args, int blocks) {
    // The generic apply kernel takes the first three (cuLaunchKernel reads as many arguments as
    // the kernel declares).
    void* params[] = {&args, &factors_p, &scale, &decoupled_flag};
    launch(k, {static_cast<unsigned>(blocks)}, {kMtThreads}, 0, params, device);
  });
}

}  // namespace detail

/// theta_prev <- theta for every tensor (`prev`, allocated by the caller, receives a bitwise
/// copy of `param`): the snapshot of the generic path, a few launches for all tensors.
inline void slow_tuning_snapshot(const std::vector<slowed::detail::SlowTuningOperands>& ts) {
  for (const auto& group : detail::by_dtype(ts)) {
    const c10::Device device = group.second.front()->param.device();
    const auto& k =
        get_kernel(kernels::slow_tuning_source(group.first), "slowed_st_snapshot", device);
    const std::vector<int> first(group.second.size(), 0);
    detail::for_each_batch(group.second, first, false, [&](detail::SlowMtArgs& args, int blocks) {
      void* params[] = {&args};
      launch(k, {static_cast<unsigned>(blocks)}, {detail::kMtThreads}, 0, params, device);
    });
  }
}

/// The generic path after Base::step: `param` holds Base's new values, `prev` the snapshot (or
/// undefined when the scale is 1 and no step bound is on), `initial` theta_0 for the drift
/// bound. Pass 1 only when a bound is on.
inline void slow_tuning_generic_step(const std::vector<slowed::detail::SlowTuningOperands>& ts,
                                     const slowed::detail::SlowBounds& b) {
  for (const auto& group : detail::by_dtype(ts)) {
    detail::two_pass(group.second, group.first, b, /*adam=*/false, /*decoupled=*/false);
  }
}

/// The Adam path: the moments and the step counters are the caller's (torch::optim::AdamW's
/// state objects). `decoupled` selects AdamW's weight decay.
inline void slow_tuning_adam_step(const std::vector<slowed::detail::SlowTuningOperands>& ts,
                                  const slowed::detail::SlowBounds& b, bool decoupled) {
  for (const auto& group : detail::by_dtype(ts)) {
    detail::two_pass(group.second, group.first, b, /*adam=*/true, decoupled);
  }
}

}  // namespace cuda
}  // namespace slowed

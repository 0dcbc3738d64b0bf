#pragma once

// What SlowTuningOptimizer hands its multi-tensor kernels, the same for the CPU kernels
// (slowed/cpu/slow_tuning_cpu.h) and the CUDA kernels (slowed/cuda/slow_tuning_cuda.h): the
// operands of each tensor, its Adam settings and the step's bounds. Both backends offer the same
// three launchers on these,
//   slow_tuning_snapshot(ts)                       prev <- param (prev allocated by the caller)
//   slow_tuning_generic_step(ts, bounds)           after Base::step: rewrite and projection
//   slow_tuning_adam_step(ts, bounds, decoupled)   the whole Adam(W) step with the transform
// and turn the tensors into their own kernel arguments (raw pointers on CPU, the by-value
// SlowMtArgs on CUDA) once, in the launcher.

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

namespace slowed {
namespace detail {

/// The Slow Tuning settings of one step; a bound <= 0 is off.
struct SlowBounds {
  double scale = 1.0;
  double max_step = 0.0;   ///< r of max_relative_step
  double max_drift = 0.0;  ///< R of max_relative_drift
  double norm_floor = 0.0;
  /// True when a norm bound is on (the kernels then make a first pass for the sums).
  bool any() const { return max_step > 0.0 || max_drift > 0.0; }
};

/// Hyper-parameters of one tensor's Adam step, rounded to fp32 as ATen rounds the scalar
/// arguments of torch::optim::AdamW's ops for fp32 and bf16 tensors.
struct AdamSettings {
  float beta1 = 0.f, beta2 = 0.f;
  float one_minus_beta1 = 1.f, one_minus_beta2 = 1.f;  ///< 1 - beta, formed in fp64
  float eps = 0.f;
  float step_size = 0.f;     ///< lr / (1 - beta1^t)
  float bc2_sqrt = 1.f;      ///< sqrt(1 - beta2^t)
  float weight_decay = 0.f;  ///< AdamW: lr * weight_decay (decoupled); Adam: weight_decay (L2)
  bool amsgrad = false;
};

/// The settings of step `step` (the counter after its increment) of one parameter; `decoupled`
/// is AdamW's weight decay (multiplied by lr), otherwise Adam's L2 term.
inline AdamSettings adam_settings(double lr, double beta1, double beta2, double eps,
                                  double weight_decay, int64_t step, bool decoupled,
                                  bool amsgrad) {
  const double bc1 = 1.0 - std::pow(beta1, step);
  const double bc2 = 1.0 - std::pow(beta2, step);
  AdamSettings h;
  h.beta1 = static_cast<float>(beta1);
  h.beta2 = static_cast<float>(beta2);
  h.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  h.eps = static_cast<float>(eps);
  h.step_size = static_cast<float>(lr / bc1);
  h.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  h.weight_decay = static_cast<float>(decoupled ? lr * weight_decay : weight_decay);
  h.amsgrad = amsgrad;
  return h;
}

/// One tensor's operands. Every defined tensor is contiguous and has `param`'s dtype, device and
/// number of elements (float32 or bfloat16 on CPU; float32, bfloat16 or float16 on CUDA).
struct SlowTuningOperands {
  at::Tensor param;
  at::Tensor prev;            ///< generic: the snapshot theta_prev (undefined: no rewrite)
  at::Tensor grad;            ///< Adam
  at::Tensor exp_avg;         ///< Adam
  at::Tensor exp_avg_sq;      ///< Adam
  at::Tensor max_exp_avg_sq;  ///< Adam with amsgrad
  at::Tensor initial;         ///< theta_0 (undefined: no drift projection for this tensor)
  AdamSettings adam;          ///< Adam
};

}  // namespace detail
}  // namespace slowed

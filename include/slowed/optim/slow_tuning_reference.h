#pragma once

// The reference arithmetic of SlowTuningOptimizer (slowed/optim/slow_tuning_optimizer.h): the
// rewrite of Base's step and the projection onto the drift ball as ATen ops, tensor by tensor,
// on any device and dtype. It is the fallback for every tensor the fused kernels do not take
// (slowed/cpu/slow_tuning_cpu.h, slowed/cuda/slow_tuning_cuda.h) and their oracle in the tests.
// fp32 working copies for bf16/fp16 parameters (fp64 stays fp64), no host synchronization.

#include <slowed/optim/slow_tuning_options.h>

#include <ATen/ATen.h>

#include <limits>

namespace slowed {
namespace detail {

/// fp32 (fp64 for fp64) working copy for reduced-precision parameters.
inline at::Tensor working(const at::Tensor& t) {
  return (t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16) ? t.to(at::kFloat)
                                                                            : t;
}

inline at::Tensor l2_norm(const at::Tensor& t) {
  return at::linalg_vector_norm(t, 2, c10::nullopt, false,
                                t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
}

/// factor in (0, 1] that brings a vector of norm `norm` within `radius`; 1 when radius is 0.
inline at::Tensor bound_factor(const at::Tensor& norm, const at::Tensor& radius) {
  at::Tensor active = (radius > 0) & (norm > radius);
  return at::where(active, radius / norm.clamp_min(std::numeric_limits<float>::min()),
                   at::ones({}, norm.options()));
}

/// theta <- theta_prev + f * (theta - theta_prev) with f = s * bound factor of the step bound,
/// computed as theta - (1 - f) * (theta - theta_prev) so that f = 1 leaves theta bitwise
/// unchanged. `param` holds Base's new values, `prev` the snapshot theta_prev.
inline void rewrite_step(const at::Tensor& param, const at::Tensor& prev, double s,
                         const SlowTuningOptions& slow) {
  at::Tensor p = param.detach();
  at::Tensor now = working(p);
  at::Tensor before = working(prev);
  at::Tensor delta = now - before;  // Base's full step
  at::Tensor f = at::full({}, s, delta.options());
  if (auto r = slow.max_relative_step()) {
    at::Tensor radius = l2_norm(before).clamp_min(slow.norm_floor()) * *r;
    f = f * bound_factor(l2_norm(delta) * s, radius).to(delta.scalar_type());
  }
  p.copy_(now.sub_(delta.mul_(1.0 - f)));
}

/// theta <- theta - (1 - f) * (theta - theta_0), f = min(1, radius / ||theta - theta_0||): the
/// projection onto the drift ball, a bitwise no-op for tensors inside it. `initial_norm` caches
/// ||theta_0|| (computed here when undefined). Needs `slow.max_relative_drift()`.
inline void project_onto_drift_ball(const at::Tensor& param, const at::Tensor& initial,
                                    at::Tensor& initial_norm, const SlowTuningOptions& slow) {
  const double r = *slow.max_relative_drift();
  at::Tensor p = param.detach();
  at::Tensor t0 = working(initial);
  if (!initial_norm.defined()) initial_norm = l2_norm(t0);
  at::Tensor now = working(p);
  at::Tensor d = now - t0;
  at::Tensor radius = initial_norm.clamp_min(slow.norm_floor()) * r;
  at::Tensor f = bound_factor(l2_norm(d), radius).to(d.scalar_type());
  p.copy_(now.sub_(d.mul_(1.0 - f)));
}

}  // namespace detail
}  // namespace slowed

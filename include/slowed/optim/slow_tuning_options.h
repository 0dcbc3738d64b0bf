#pragma once

// Options of SlowTuningOptimizer (Slow Tuning, SLowED). See docs/api.md and docs/design.md for
// the readings of "scale down the magnitude of weight changes" that these modes implement.

#include <slowed/detail/check.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <utility>

namespace slowed {

/// Options of `SlowTuningOptimizer<Base>`. Every weight change the base optimizer makes in a
/// step, delta = theta_base_step - theta_prev, is transformed per tensor, in this order:
///   1. scaled:   delta <- s(t) * delta, s(t) in (0, 1] from `scale` and the schedule;
///   2. bounded:  ||delta|| <= max_relative_step * max(||theta_prev||, norm_floor);
///   3. projected onto the ball ||theta - theta_0|| <= max_relative_drift * max(||theta_0||, norm_floor).
/// A bound whose radius is 0 (a zero tensor with norm_floor 0) does not apply.
///
/// Defaults: scale 0.1, no bounds, constant schedule, drift tracking on (docs/design.md says why).
///
/// Example:
/// ```
/// auto slow = slowed::SlowTuningOptions().scale(0.1).max_relative_drift(0.05);
/// ```
class SlowTuningOptions {
 public:
  SlowTuningOptions() = default;

  /// The step scale s in (0, 1]; s = 1 with no bound reproduces the base optimizer exactly.
  SlowTuningOptions& scale(double s) {
    TORCH_CHECK(std::isfinite(s) && s > 0.0 && s <= 1.0,
                "scale: expected a value in (0, 1], got ", s);
    scale_ = s;
    return *this;
  }
  double scale() const { return scale_; }

  /// Per-tensor bound on the relative step, r > 0; std::nullopt (default) disables it.
  SlowTuningOptions& max_relative_step(std::optional<double> r) {
    if (r) {
      TORCH_CHECK(std::isfinite(*r) && *r > 0.0,
                  "max_relative_step: expected a finite value > 0 (or no bound), got ", *r);
    }
    max_relative_step_ = r;
    return *this;
  }
  std::optional<double> max_relative_step() const { return max_relative_step_; }

  /// Per-tensor bound on the relative drift from the initial weights, R > 0; std::nullopt
  /// (default) disables it. Keeps a copy of the initial weights.
  SlowTuningOptions& max_relative_drift(std::optional<double> r) {
    if (r) {
      TORCH_CHECK(std::isfinite(*r) && *r > 0.0,
                  "max_relative_drift: expected a finite value > 0 (or no bound), got ", *r);
    }
    max_relative_drift_ = r;
    return *this;
  }
  std::optional<double> max_relative_drift() const { return max_relative_drift_; }

  /// Norm floor (absolute, >= 0) used in both bounds, so that zero-initialized tensors (biases,
  /// LoRA B matrices) can move: radius = r * max(||reference||, norm_floor). Default 0.
  SlowTuningOptions& norm_floor(double f) {
    TORCH_CHECK(std::isfinite(f) && f >= 0.0, "norm_floor: expected a finite value >= 0, got ",
                f);
    norm_floor_ = f;
    return *this;
  }
  double norm_floor() const { return norm_floor_; }

  /// Schedule: `scale` for the first `steps` steps, then a linear ramp over `ramp_steps` to
  /// `final_scale`, which holds afterwards. Without this call the scale is constant.
  SlowTuningOptions& hold_then_ramp(int64_t steps, int64_t ramp_steps, double final_scale = 1.0) {
    TORCH_CHECK(steps >= 0, "hold_then_ramp: expected steps >= 0, got ", steps);
    TORCH_CHECK(ramp_steps >= 0, "hold_then_ramp: expected ramp_steps >= 0, got ", ramp_steps);
    TORCH_CHECK(std::isfinite(final_scale) && final_scale > 0.0 && final_scale <= 1.0,
                "hold_then_ramp: expected final_scale in (0, 1], got ", final_scale);
    hold_steps_ = steps;
    ramp_steps_ = ramp_steps;
    final_scale_ = final_scale;
    return *this;
  }
  std::optional<int64_t> hold_steps() const { return hold_steps_; }
  int64_t ramp_steps() const { return ramp_steps_; }
  double final_scale() const { return final_scale_; }

  /// A custom schedule: step index (0-based, counted by the wrapper) -> scale in (0, 1]. It
  /// replaces `scale` and `hold_then_ramp`; a value outside (0, 1] throws at that step.
  SlowTuningOptions& scale_schedule(std::function<double(int64_t)> fn) {
    scale_schedule_ = std::move(fn);
    return *this;
  }
  const std::function<double(int64_t)>& scale_schedule() const { return scale_schedule_; }

  /// Keep a copy of the initial weights so that `stats()` reports drift (default true). The
  /// drift bound keeps the copy regardless.
  SlowTuningOptions& track_drift(bool enabled) {
    track_drift_ = enabled;
    return *this;
  }
  bool track_drift() const { return track_drift_; }

  /// Run the plain-ATen reference path even where a fused path exists (testing, debugging, or
  /// to rule the kernels out). Default false: AdamW and Adam take the fused Adam path and other
  /// optimizers the multi-tensor kernels wherever the tensors allow (docs/design.md, "Fused
  /// optimizer paths"). Changing it between steps is allowed; the state is the same either way.
  SlowTuningOptions& use_reference(bool enabled) {
    use_reference_ = enabled;
    return *this;
  }
  bool use_reference() const { return use_reference_; }

  /// True when the initial weights are kept (drift tracking or the drift bound).
  bool keeps_initial_weights() const { return track_drift_ || max_relative_drift_.has_value(); }

  /// The scale applied at (0-based) step `step`.
  double scale_at(int64_t step) const {
    if (scale_schedule_) {
      const double s = scale_schedule_(step);
      TORCH_CHECK(std::isfinite(s) && s > 0.0 && s <= 1.0,
                  "scale_schedule: expected a value in (0, 1] at step ", step, ", got ", s);
      return s;
    }
    if (!hold_steps_ || step < *hold_steps_) return scale_;
    const int64_t into_ramp = step - *hold_steps_ + 1;
    if (into_ramp >= ramp_steps_) return final_scale_;
    const double t = static_cast<double>(into_ramp) / static_cast<double>(ramp_steps_);
    return scale_ + (final_scale_ - scale_) * t;
  }

 private:
  double scale_ = 0.1;
  std::optional<double> max_relative_step_;
  std::optional<double> max_relative_drift_;
  double norm_floor_ = 0.0;
  std::optional<int64_t> hold_steps_;
  int64_t ramp_steps_ = 0;
  double final_scale_ = 1.0;
  std::function<double(int64_t)> scale_schedule_;
  bool track_drift_ = true;
  bool use_reference_ = false;
};

}  // namespace slowed

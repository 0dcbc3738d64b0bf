#pragma once

// Statistics of SlowTuningOptimizer after a step.

#include <cstdint>
#include <limits>

namespace slowed {

/// Which implementation served a step of SlowTuningOptimizer (docs/design.md, "Fused optimizer
/// paths"); `SlowTuningOptimizer::last_step_path()` reports it, for tests and benchmarks.
enum class SlowTuningPath {
  None,       ///< no step taken yet
  Base,       ///< Base::step alone (scale 1 and no bound): Base's own arithmetic, bitwise
  Reference,  ///< Base::step, then ATen ops tensor by tensor (the reference path)
  Generic,    ///< Base::step, then the multi-tensor kernels (tensors they do not take: reference)
  Adam,       ///< the fused Adam path (AdamW, Adam): no snapshot, no Base::step
};

inline const char* path_name(SlowTuningPath p) {
  switch (p) {
    case SlowTuningPath::None: return "none";
    case SlowTuningPath::Base: return "base";
    case SlowTuningPath::Reference: return "reference";
    case SlowTuningPath::Generic: return "generic";
    case SlowTuningPath::Adam: return "adam";
  }
  return "?";
}

/// What `SlowTuningOptimizer::stats()` reports. Drift fields are NaN when the initial weights
/// are not kept (`track_drift(false)` without a drift bound).
struct SlowTuningStats {
  int64_t step = 0;    ///< steps taken by the wrapper
  double scale = 1.0;  ///< scale applied at the last step (1 before the first step)
  /// Mean and max over parameter tensors with a nonzero initial norm of ||theta - theta_0|| / ||theta_0||.
  double mean_relative_drift = std::numeric_limits<double>::quiet_NaN();
  double max_relative_drift = std::numeric_limits<double>::quiet_NaN();
  /// ||theta - theta_0|| / ||theta_0|| over all parameters as one vector.
  double global_relative_drift = std::numeric_limits<double>::quiet_NaN();
};

}  // namespace slowed

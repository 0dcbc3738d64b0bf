#pragma once

// Statistics of SlowTuningOptimizer after a step.

#include <cstdint>
#include <limits>

namespace slowed {

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

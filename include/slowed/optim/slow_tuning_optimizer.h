#pragma once

// SlowTuningOptimizer<Base>: Slow Tuning (SLowED, arXiv 2508.09666) around any torch::optim
// optimizer. It derives from Base and overrides only step, save and load, so param groups, LR
// schedulers, zero_grad and torch::save/torch::load work as with Base itself.
//
// Reference path (every device): before Base::step it copies the parameters that the step will
// move (only when the scale differs from 1 or the step bound is on), lets Base step, then
// rewrites each parameter as theta_prev + transformed delta (see SlowTuningOptions). The drift
// bound then projects onto the ball around theta_0. All of it runs as tensor ops on the
// parameters' device, with no host synchronization.

#include <slowed/detail/check.h>
#include <slowed/optim/slow_tuning_options.h>
#include <slowed/optim/slow_tuning_stats.h>

#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

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

}  // namespace detail

/// Slow Tuning around any `torch::optim` optimizer.
///
/// Example:
/// ```
/// slowed::SlowTuningOptimizer<torch::optim::AdamW> opt(
///     model->parameters(), torch::optim::AdamWOptions(2e-4).weight_decay(0.05),
///     slowed::SlowTuningOptions().scale(0.1));
/// loss.backward();
/// opt.step();
/// std::cout << opt.stats().max_relative_drift;
/// ```
template <class Base>
class SlowTuningOptimizer : public Base {
  static_assert(std::is_base_of<torch::optim::Optimizer, Base>::value,
                "SlowTuningOptimizer<Base>: Base must derive from torch::optim::Optimizer");

 public:
  using LossClosure = torch::optim::Optimizer::LossClosure;

  template <class BaseOptions>
  SlowTuningOptimizer(std::vector<at::Tensor> params, BaseOptions defaults,
                      SlowTuningOptions slow = {})
      : Base(std::move(params), std::move(defaults)), slow_(std::move(slow)) {
    keep_initial_weights();
  }

  template <class BaseOptions>
  SlowTuningOptimizer(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                      BaseOptions defaults, SlowTuningOptions slow = {})
      : Base(param_groups, std::move(defaults)), slow_(std::move(slow)) {
    keep_initial_weights();
  }

  /// Base's step, with its weight change scaled and bounded per SlowTuningOptions.
  at::Tensor step(LossClosure closure = nullptr) override {
    const double s = slow_.scale_at(step_count_);
    keep_initial_weights();  // parameters added with add_param_group since the last step
    const bool rewrite = s != 1.0 || slow_.max_relative_step().has_value();
    std::vector<std::pair<at::Tensor, at::Tensor>> moved;  // (parameter, its value before)
    if (rewrite) {
      at::NoGradGuard no_grad;
      for (const auto& p : parameters()) {
        if (!closure && !p.grad().defined()) continue;  // Base will not touch it
        moved.emplace_back(p, p.detach().clone());
      }
    }
    const bool closure_given = static_cast<bool>(closure);
    at::Tensor loss = Base::step(std::move(closure));
    {
      at::NoGradGuard no_grad;
      for (auto& [p, prev] : moved) rewrite_step(p, prev, s);
      if (slow_.max_relative_drift()) project_onto_drift_ball(closure_given);
    }
    last_scale_ = s;
    ++step_count_;
    return loss;
  }

  void save(torch::serialize::OutputArchive& archive) const override {
    Base::save(archive);
    torch::serialize::OutputArchive state(archive.compilation_unit());
    state.write("format", c10::IValue(kStateFormat));
    state.write("step", c10::IValue(step_count_));
    state.write("last_scale", c10::IValue(last_scale_));
    const auto params = parameters();
    const bool keep = slow_.keeps_initial_weights();
    state.write("num_initial", c10::IValue(static_cast<int64_t>(keep ? params.size() : 0)));
    if (keep) {
      for (size_t i = 0; i < params.size(); ++i) {
        auto it = initial_.find(params[i].unsafeGetTensorImpl());
        const at::Tensor& t0 = it != initial_.end() ? it->second : params[i].detach();
        state.write("initial_" + std::to_string(i), t0, /*is_buffer=*/true);
      }
    }
    archive.write("slowed", state);
  }

  /// Loads Base's state and the wrapper's own. A plain Base checkpoint (no slowed state) is
  /// accepted with a warning: the step counter restarts at 0 and the current weights become
  /// the initial weights.
  void load(torch::serialize::InputArchive& archive) override {
    // Read and validate the wrapper's state first, so that a bad checkpoint leaves the
    // optimizer untouched (Base's state included).
    torch::serialize::InputArchive state;
    if (!archive.try_read("slowed", state)) {
      Base::load(archive);
      TORCH_WARN("SlowTuningOptimizer::load: the checkpoint holds no slowed state (a plain base "
                 "optimizer checkpoint); the step counter restarts at 0 and the current weights "
                 "become the initial weights");
      step_count_ = 0;
      last_scale_ = 1.0;
      initial_.clear();
      initial_norm_.clear();
      keep_initial_weights();
      return;
    }
    c10::IValue v;
    state.read("format", v);
    TORCH_CHECK(v.isInt() && v.toInt() == kStateFormat,
                "checkpoint: expected slowed state format ", kStateFormat, ", got ",
                v.isInt() ? std::to_string(v.toInt()) : v.tagKind());
    state.read("step", v);
    TORCH_CHECK(v.isInt() && v.toInt() >= 0, "checkpoint: slowed step counter is corrupt");
    const int64_t step = v.toInt();
    state.read("last_scale", v);
    TORCH_CHECK(v.isDouble(), "checkpoint: slowed last_scale is corrupt");
    const double last_scale = v.toDouble();
    state.read("num_initial", v);
    TORCH_CHECK(v.isInt() && v.toInt() >= 0, "checkpoint: slowed num_initial is corrupt");
    const int64_t n = v.toInt();
    const auto params = parameters();
    std::unordered_map<c10::TensorImpl*, at::Tensor> initial;
    if (n > 0) {
      TORCH_CHECK(n == static_cast<int64_t>(params.size()), "checkpoint: slowed state holds ", n,
                  " initial-weight tensors, expected ", params.size(),
                  " (one per parameter of this optimizer)");
      for (int64_t i = 0; i < n; ++i) {
        at::Tensor t0;
        state.read("initial_" + std::to_string(i), t0, /*is_buffer=*/true);
        TORCH_CHECK(t0.sizes() == params[i].sizes(), "checkpoint: initial weights of parameter ",
                    i, " have shape ", detail::shape_string(t0.sizes()), ", expected ",
                    detail::shape_string(params[i].sizes()));
        initial[params[i].unsafeGetTensorImpl()] =
            t0.to(params[i].device(), params[i].scalar_type());
      }
    }
    Base::load(archive);
    step_count_ = step;
    last_scale_ = last_scale;
    initial_ = std::move(initial);
    initial_norm_.clear();
    if (slow_.keeps_initial_weights() && n == 0) {
      TORCH_WARN("SlowTuningOptimizer::load: the checkpoint holds no initial weights; the "
                 "current weights become the initial weights");
    }
    keep_initial_weights();
  }

  /// Step counter, scale and drift. Computing drift reads every parameter and synchronizes.
  SlowTuningStats stats() const {
    SlowTuningStats st;
    st.step = step_count_;
    st.scale = last_scale_;
    if (!slow_.keeps_initial_weights()) return st;
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> drift, base;
    for (const auto& p : parameters()) {
      auto it = initial_.find(p.unsafeGetTensorImpl());
      if (it == initial_.end()) continue;
      drift.push_back(detail::l2_norm(detail::working(p.detach()) - detail::working(it->second))
                          .to(at::kDouble).cpu());
      base.push_back(detail::l2_norm(it->second).to(at::kDouble).cpu());
    }
    double sum_d2 = 0, sum_b2 = 0, sum_rel = 0, max_rel = 0;
    int64_t counted = 0;
    for (size_t i = 0; i < drift.size(); ++i) {
      const double d = drift[i].item<double>(), b = base[i].item<double>();
      sum_d2 += d * d;
      sum_b2 += b * b;
      if (b > 0) {
        sum_rel += d / b;
        max_rel = std::max(max_rel, d / b);
        ++counted;
      }
    }
    if (counted > 0) {
      st.mean_relative_drift = sum_rel / static_cast<double>(counted);
      st.max_relative_drift = max_rel;
    }
    if (sum_b2 > 0) st.global_relative_drift = std::sqrt(sum_d2 / sum_b2);
    return st;
  }

  const SlowTuningOptions& slow_options() const { return slow_; }
  /// Mutable options (e.g. to change the scale between steps). Enabling drift tracking later
  /// takes the weights at the next step as the initial weights.
  SlowTuningOptions& slow_options() { return slow_; }
  int64_t slow_step_count() const { return step_count_; }

  /// The initial weights of `param` (undefined when not kept).
  at::Tensor initial_weights(const at::Tensor& param) const {
    auto it = initial_.find(param.unsafeGetTensorImpl());
    return it == initial_.end() ? at::Tensor() : it->second;
  }

 private:
  static constexpr int64_t kStateFormat = 1;

  std::vector<at::Tensor> parameters() const {
    std::vector<at::Tensor> out;
    for (const auto& group : this->param_groups()) {
      for (const auto& p : group.params()) out.push_back(p);
    }
    return out;
  }

  void keep_initial_weights() {
    if (!slow_.keeps_initial_weights()) return;
    at::NoGradGuard no_grad;
    for (const auto& p : parameters()) {
      auto* key = p.unsafeGetTensorImpl();
      if (initial_.find(key) == initial_.end()) initial_.emplace(key, p.detach().clone());
    }
  }

  // theta <- theta_prev + f * (theta - theta_prev) with f = s * bound factor, computed as
  // theta - (1 - f) * (theta - theta_prev) so that f = 1 leaves theta bitwise unchanged.
  void rewrite_step(const at::Tensor& param, const at::Tensor& prev, double s) {
    at::Tensor p = param.detach();
    at::Tensor now = detail::working(p);
    at::Tensor before = detail::working(prev);
    at::Tensor delta = now - before;  // Base's full step
    at::Tensor f = at::full({}, s, delta.options());
    if (auto r = slow_.max_relative_step()) {
      at::Tensor radius = detail::l2_norm(before).clamp_min(slow_.norm_floor()) * *r;
      f = f * detail::bound_factor(detail::l2_norm(delta) * s, radius).to(delta.scalar_type());
    }
    p.copy_(now.sub_(delta.mul_(1.0 - f)));
  }

  // theta <- theta - (1 - f) * (theta - theta_0), f = min(1, radius / ||theta - theta_0||):
  // the projection onto the drift ball, a bitwise no-op for tensors inside it. Only tensors
  // Base may have moved (with a gradient, or all under a closure) are projected: the others
  // were projected when they last moved.
  void project_onto_drift_ball(bool closure_given) {
    const double r = *slow_.max_relative_drift();
    for (const auto& param : parameters()) {
      if (!closure_given && !param.grad().defined()) continue;
      auto it = initial_.find(param.unsafeGetTensorImpl());
      if (it == initial_.end()) continue;
      at::Tensor p = param.detach();
      at::Tensor t0 = detail::working(it->second);
      auto& n0 = initial_norm_[param.unsafeGetTensorImpl()];
      if (!n0.defined()) n0 = detail::l2_norm(t0);
      at::Tensor now = detail::working(p);
      at::Tensor d = now - t0;
      at::Tensor radius = n0.clamp_min(slow_.norm_floor()) * r;
      at::Tensor f = detail::bound_factor(detail::l2_norm(d), radius).to(d.scalar_type());
      p.copy_(now.sub_(d.mul_(1.0 - f)));
    }
  }

  SlowTuningOptions slow_;
  int64_t step_count_ = 0;
  double last_scale_ = 1.0;
  std::unordered_map<c10::TensorImpl*, at::Tensor> initial_;       // theta_0 per parameter
  std::unordered_map<c10::TensorImpl*, at::Tensor> initial_norm_;  // ||theta_0||, lazily
};

}  // namespace slowed

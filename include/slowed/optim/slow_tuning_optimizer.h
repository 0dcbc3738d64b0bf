#pragma once

// SlowTuningOptimizer<Base>: Slow Tuning (SLowED, arXiv 2508.09666) around any torch::optim
// optimizer. It derives from Base and overrides only step, save and load, so param groups, LR
// schedulers, zero_grad and torch::save/torch::load work as with Base itself.
//
// Three paths compute the same step (docs/design.md, "Fused optimizer paths"; tolerances in
// docs/numerics.md, "Optimizer"):
//  - reference (every device and dtype; `use_reference(true)` forces it): before Base::step it
//    copies the parameters that the step will move (only when the scale differs from 1 or the
//    step bound is on), lets Base step, then rewrites each parameter as theta_prev + transformed
//    delta with ATen ops, tensor by tensor; the drift bound then projects onto the ball around
//    theta_0 (slowed/optim/slow_tuning_reference.h). No host synchronization.
//  - generic (any Base; fp32/bf16 CPU tensors, fp32/bf16/fp16 CUDA tensors): the same snapshot
//    and Base::step, then one multi-tensor pass for the norms (only with a bound) and one for
//    the rewrite and the projection (slowed/cpu/slow_tuning_cpu.h, slowed/cuda/slow_tuning_cuda.h:
//    the same launchers on the same operands, slowed/detail/slow_tuning_operands.h).
//  - Adam (Base = torch::optim::AdamW or Adam, no closure): no snapshot and no Base::step; the
//    wrapper computes the Adam update itself and applies the scale, the bounds and the
//    projection in the same kernels, one pass in step-scale mode (on CPU: ATen's
//    at::_fused_adamw_ / at::_fused_adam_ with lr * s), two with a bound. The state lives in
//    Base's own AdamWParamState / AdamParamState objects, so checkpoints are Base's.
// A step with scale 1 and no bound is Base::step itself on every path (bitwise).
// CUDA kernels are used only with SLOWED_CUDA_KERNELS=1 until they have run on a GPU.

#include <slowed/cpu/slow_tuning_cpu.h>
#include <slowed/cuda/slow_tuning_cuda.h>
#include <slowed/detail/backend.h>
#include <slowed/detail/check.h>
#include <slowed/detail/slow_tuning_operands.h>
#include <slowed/optim/slow_tuning_options.h>
#include <slowed/optim/slow_tuning_reference.h>
#include <slowed/optim/slow_tuning_stats.h>

#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/optimizer.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>
#include <torch/serialize/archive.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace slowed {
namespace detail {

/// The Base types the Adam path serves (exactly these types: a subclass takes the generic path).
template <class Base>
struct AdamTraits {
  static constexpr bool value = false;
};
template <>
struct AdamTraits<torch::optim::AdamW> {
  static constexpr bool value = true;
  static constexpr bool decoupled = true;  // weight decay applied to theta, scaled by lr
  static constexpr const char* name = "AdamW";
  using Options = torch::optim::AdamWOptions;
  using State = torch::optim::AdamWParamState;
};
template <>
struct AdamTraits<torch::optim::Adam> {
  static constexpr bool value = true;
  static constexpr bool decoupled = false;  // L2: weight_decay * theta added to the gradient
  static constexpr const char* name = "Adam";
  using Options = torch::optim::AdamOptions;
  using State = torch::optim::AdamParamState;
};

/// True when `t` is a dense contiguous tensor with the dtype, device and shape of `like`.
inline bool same_layout(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() && t.layout() == at::kStrided && t.scalar_type() == like.scalar_type() &&
         t.device() == like.device() && t.sizes().equals(like.sizes()) && t.is_contiguous();
}

/// The multi-tensor launchers of one backend: the CPU and the CUDA kernels take the same
/// operands through the same signatures.
struct SlowTuningKernels {
  void (*snapshot)(const std::vector<SlowTuningOperands>&);
  void (*generic_step)(const std::vector<SlowTuningOperands>&, const SlowBounds&);
  void (*adam_step)(const std::vector<SlowTuningOperands>&, const SlowBounds&, bool decoupled);
};

inline const SlowTuningKernels& slow_tuning_kernels(FusedKind kind) {
  static const SlowTuningKernels on_cpu{&cpu::slow_tuning_snapshot,
                                        &cpu::slow_tuning_generic_step,
                                        &cpu::slow_tuning_adam_step};
  static const SlowTuningKernels on_cuda{&cuda::slow_tuning_snapshot,
                                         &cuda::slow_tuning_generic_step,
                                         &cuda::slow_tuning_adam_step};
  TORCH_INTERNAL_ASSERT(kind != FusedKind::None, "slow_tuning_kernels: no fused kernels");
  return kind == FusedKind::Cpu ? on_cpu : on_cuda;
}

/// theta_prev of every tensor of `ts` (one device) into `prev`: one buffer per dtype, filled by
/// the backend's multi-tensor snapshot.
inline void snapshot_into_prev(std::vector<SlowTuningOperands>& ts, const SlowTuningKernels& k) {
  if (ts.empty()) return;
  std::map<at::ScalarType, int64_t> total;
  for (const auto& t : ts) total[t.param.scalar_type()] += t.param.numel();
  std::map<at::ScalarType, std::pair<at::Tensor, int64_t>> buffers;
  for (const auto& [dtype, n] : total) {
    buffers[dtype] = {at::empty({n}, ts.front().param.options().dtype(dtype)), 0};
  }
  for (auto& t : ts) {
    auto& [buffer, offset] = buffers[t.param.scalar_type()];
    const int64_t n = t.param.numel();
    t.prev = buffer.narrow(0, offset, n).view(t.param.sizes());
    offset += n;
  }
  k.snapshot(ts);
}

/// Rejects a tensor listed twice among `groups` (or within one group), naming both places.
/// torch::optim would step such a tensor twice per step; the wrapper's single-pass kernels
/// cannot, so it is an error before anything changes.
inline void check_distinct_parameters(const std::vector<torch::optim::OptimizerParamGroup>& groups,
                                      const torch::optim::OptimizerParamGroup* extra = nullptr) {
  std::unordered_map<const c10::TensorImpl*, std::pair<size_t, size_t>> seen;
  auto visit = [&](const torch::optim::OptimizerParamGroup& group, size_t g) {
    for (size_t i = 0; i < group.params().size(); ++i) {
      const at::Tensor& p = group.params()[i];
      auto [it, fresh] = seen.emplace(p.unsafeGetTensorImpl(), std::make_pair(g, i));
      TORCH_CHECK(fresh, "SlowTuningOptimizer: parameter ", i, " of param group ", g,
                  " (shape ", shape_string(p.sizes()), ") is the same tensor as parameter ",
                  it->second.second, " of param group ", it->second.first,
                  "; expected each tensor once across all param groups");
    }
  };
  for (size_t g = 0; g < groups.size(); ++g) visit(groups[g], g);
  if (extra != nullptr) visit(*extra, groups.size());
}

/// Largest step counter a checkpoint may hold: counters are incremented and raised to powers
/// (bias correction) in double precision, exact up to 2^53.
inline constexpr int64_t kMaxCheckpointStep = int64_t(1) << 53;

/// `t` (one tensor of a parameter's loaded optimizer state) checked against the parameter and
/// brought to its dtype and device, as PyTorch's Optimizer.load_state_dict does.
inline at::Tensor checked_state_tensor(const at::Tensor& t, const at::Tensor& p, const char* name,
                                       size_t group, size_t index, bool required) {
  const std::string where = "checkpoint: state '" + std::string(name) + "' of parameter " +
                            std::to_string(index) + " in param group " + std::to_string(group);
  if (!t.defined()) {
    TORCH_CHECK(!required, where, ": expected a tensor of shape ", shape_string(p.sizes()),
                ", got none");
    return t;
  }
  TORCH_CHECK(t.is_floating_point(), where, ": expected a floating-point tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes().equals(p.sizes()), where, ": expected shape ", shape_string(p.sizes()),
              " (the parameter's), got ", shape_string(t.sizes()));
  return t.to(p.device(), p.scalar_type()).contiguous();
}

inline void check_checkpoint_step(int64_t step, size_t group, size_t index) {
  TORCH_CHECK(step >= 0 && step <= kMaxCheckpointStep, "checkpoint: step counter of parameter ",
              index, " in param group ", group, ": expected 0 <= step <= 2^53, got ", step);
}

inline void check_checkpoint_option(bool ok, const char* name, double value, const char* expected,
                                    size_t group) {
  TORCH_CHECK(ok, "checkpoint: option ", name, " of param group ", group, ": expected ", expected,
              ", got ", value);
}

/// Checks the state `Base::load` just loaded against the parameters and the options of
/// `opt`, bringing state tensors to each parameter's dtype and device. Known Bases (Adam,
/// AdamW, SGD, Adagrad, RMSprop) are checked field by field; others only by what Base checks.
template <class Base>
void check_loaded_base_state(Base& opt) {
  namespace o = torch::optim;
  for (size_t g = 0; g < opt.param_groups().size(); ++g) {
    auto& group = opt.param_groups()[g];
    if constexpr (AdamTraits<Base>::value) {
      const auto& a = static_cast<const typename AdamTraits<Base>::Options&>(group.options());
      const double b1 = std::get<0>(a.betas()), b2 = std::get<1>(a.betas());
      check_checkpoint_option(std::isfinite(a.lr()) && a.lr() >= 0, "lr", a.lr(), "finite >= 0", g);
      check_checkpoint_option(b1 >= 0 && b1 < 1, "betas[0]", b1, "in [0, 1)", g);
      check_checkpoint_option(b2 >= 0 && b2 < 1, "betas[1]", b2, "in [0, 1)", g);
      check_checkpoint_option(std::isfinite(a.eps()) && a.eps() >= 0, "eps", a.eps(),
                              "finite >= 0", g);
      check_checkpoint_option(std::isfinite(a.weight_decay()) && a.weight_decay() >= 0,
                              "weight_decay", a.weight_decay(), "finite >= 0", g);
    } else if constexpr (std::is_same_v<Base, o::SGD>) {
      const auto& a = static_cast<const o::SGDOptions&>(group.options());
      check_checkpoint_option(std::isfinite(a.lr()) && a.lr() >= 0, "lr", a.lr(), "finite >= 0", g);
      check_checkpoint_option(std::isfinite(a.momentum()) && a.momentum() >= 0, "momentum",
                              a.momentum(), "finite >= 0", g);
    }
    for (size_t i = 0; i < group.params().size(); ++i) {
      const at::Tensor& p = group.params()[i];
      auto it = opt.state().find(p.unsafeGetTensorImpl());
      if (it == opt.state().end()) continue;
      o::OptimizerParamState* st = it->second.get();
      if constexpr (AdamTraits<Base>::value) {
        auto& s = static_cast<typename AdamTraits<Base>::State&>(*st);
        const auto& a = static_cast<const typename AdamTraits<Base>::Options&>(group.options());
        check_checkpoint_step(s.step(), g, i);
        s.exp_avg(checked_state_tensor(s.exp_avg(), p, "exp_avg", g, i, true));
        s.exp_avg_sq(checked_state_tensor(s.exp_avg_sq(), p, "exp_avg_sq", g, i, true));
        s.max_exp_avg_sq(
            checked_state_tensor(s.max_exp_avg_sq(), p, "max_exp_avg_sq", g, i, a.amsgrad()));
      } else if constexpr (std::is_same_v<Base, o::SGD>) {
        auto& s = static_cast<o::SGDParamState&>(*st);
        s.momentum_buffer(checked_state_tensor(s.momentum_buffer(), p, "momentum_buffer", g, i,
                                               false));
      } else if constexpr (std::is_same_v<Base, o::Adagrad>) {
        auto& s = static_cast<o::AdagradParamState&>(*st);
        check_checkpoint_step(s.step(), g, i);
        s.sum(checked_state_tensor(s.sum(), p, "sum", g, i, true));
      } else if constexpr (std::is_same_v<Base, o::RMSprop>) {
        auto& s = static_cast<o::RMSpropParamState&>(*st);
        check_checkpoint_step(s.step(), g, i);
        s.square_avg(checked_state_tensor(s.square_avg(), p, "square_avg", g, i, true));
        s.momentum_buffer(checked_state_tensor(s.momentum_buffer(), p, "momentum_buffer", g, i,
                                               false));
        s.grad_avg(checked_state_tensor(s.grad_avg(), p, "grad_avg", g, i, false));
      } else {
        (void)st;
      }
    }
  }
}

/// Checks, before Base::load runs, that the checkpoint's param groups have the sizes of
/// `groups` (Base checks them too, but only after it replaced the earlier groups' state).
/// Archives without the format's "param_groups" (older formats) are left to Base.
inline void check_checkpoint_group_layout(torch::serialize::InputArchive& archive,
                                          const std::vector<torch::optim::OptimizerParamGroup>& groups) {
  torch::serialize::InputArchive saved;
  if (!archive.try_read("param_groups", saved)) return;
  at::Tensor count;
  saved.read("param_groups/size", count);
  TORCH_CHECK(count.numel() == 1 && !count.is_floating_point(),
              "checkpoint: param_groups/size is corrupt");
  const int64_t n = count.item<int64_t>();
  TORCH_CHECK(n == static_cast<int64_t>(groups.size()), "checkpoint: holds ", n,
              " param groups, this optimizer has ", groups.size());
  for (int64_t g = 0; g < n; ++g) {
    torch::serialize::InputArchive group;
    saved.read("param_groups/" + std::to_string(g), group);
    at::Tensor size;
    group.read("params/size", size);
    TORCH_CHECK(size.numel() == 1 && !size.is_floating_point(), "checkpoint: param group ", g,
                ": params/size is corrupt");
    const int64_t k = size.item<int64_t>();
    TORCH_CHECK(k == static_cast<int64_t>(groups[g].params().size()), "checkpoint: param group ",
                g, " holds ", k, " parameters, this optimizer's param group ", g, " holds ",
                groups[g].params().size());
  }
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
    detail::check_distinct_parameters(this->param_groups());
    keep_initial_weights();
  }

  template <class BaseOptions>
  SlowTuningOptimizer(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                      BaseOptions defaults, SlowTuningOptions slow = {})
      : Base(param_groups, std::move(defaults)), slow_(std::move(slow)) {
    detail::check_distinct_parameters(this->param_groups());
    keep_initial_weights();
  }

  /// Base's add_param_group, refused (nothing added) when a tensor of `group` is already
  /// among this optimizer's parameters or listed twice in it. step() checks the same for
  /// groups added through a Base reference.
  void add_param_group(const torch::optim::OptimizerParamGroup& group) {
    detail::check_distinct_parameters(this->param_groups(), &group);
    Base::add_param_group(group);
  }

  /// Base's step, with its weight change scaled and bounded per SlowTuningOptions. The path
  /// (reference, generic kernels, or the Adam path for AdamW/Adam) is chosen per step from the
  /// options and the tensors; see the top of this file.
  at::Tensor step(LossClosure closure = nullptr) override {
    detail::check_distinct_parameters(this->param_groups());
    const double s = slow_.scale_at(step_count_);
    keep_initial_weights();  // parameters added with add_param_group since the last step
    at::Tensor loss;
    bool stepped = false;
    if constexpr (detail::AdamTraits<Base>::value) {
      if (!closure && !slow_.use_reference()) stepped = adam_step(s);
    }
    if (stepped) {
      last_path_ = SlowTuningPath::Adam;
    } else {
      loss = generic_step(std::move(closure), s);
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

  /// Loads Base's state and the wrapper's own, all or nothing: every part of the checkpoint is
  /// checked (param group layout, state shapes and dtypes, counters, options, the wrapper's
  /// state) and on any mismatch a c10::Error names it and the optimizer is left as it was.
  /// State tensors are brought to their parameter's dtype and device, as PyTorch's
  /// Optimizer.load_state_dict does. A plain Base checkpoint (no slowed state) is accepted with
  /// a warning: the step counter restarts at 0 and the current weights become the initial
  /// weights.
  void load(torch::serialize::InputArchive& archive) override {
    // The wrapper's state first: read and checked, nothing assigned yet.
    torch::serialize::InputArchive state;
    const bool has_slowed = archive.try_read("slowed", state);
    int64_t step = 0;
    double last_scale = 1.0;
    int64_t n = 0;
    std::unordered_map<c10::TensorImpl*, at::Tensor> initial;
    const auto params = parameters();
    if (has_slowed) {
      c10::IValue v;
      state.read("format", v);
      TORCH_CHECK(v.isInt() && v.toInt() == kStateFormat,
                  "checkpoint: expected slowed state format ", kStateFormat, ", got ",
                  v.isInt() ? std::to_string(v.toInt()) : v.tagKind());
      state.read("step", v);
      TORCH_CHECK(v.isInt() && v.toInt() >= 0 && v.toInt() <= detail::kMaxCheckpointStep,
                  "checkpoint: slowed step counter: expected an integer in [0, 2^53], got ",
                  v.isInt() ? std::to_string(v.toInt()) : v.tagKind());
      step = v.toInt();
      state.read("last_scale", v);
      TORCH_CHECK(v.isDouble() && v.toDouble() > 0.0 && v.toDouble() <= 1.0,
                  "checkpoint: slowed last_scale: expected a number in (0, 1], got ",
                  v.isDouble() ? std::to_string(v.toDouble()) : v.tagKind());
      last_scale = v.toDouble();
      state.read("num_initial", v);
      TORCH_CHECK(v.isInt() && (v.toInt() == 0 || v.toInt() == static_cast<int64_t>(params.size())),
                  "checkpoint: slowed state holds ",
                  v.isInt() ? std::to_string(v.toInt()) : v.tagKind(),
                  " initial-weight tensors, expected 0 or ", params.size(),
                  " (one per parameter of this optimizer)");
      n = v.toInt();
      for (int64_t i = 0; i < n; ++i) {
        at::Tensor t0;
        state.read("initial_" + std::to_string(i), t0, /*is_buffer=*/true);
        TORCH_CHECK(t0.defined() && t0.is_floating_point(), "checkpoint: initial weights of "
                    "parameter ", i, ": expected a floating-point tensor, got ",
                    t0.defined() ? c10::toString(t0.scalar_type()) : "none");
        TORCH_CHECK(t0.sizes() == params[i].sizes(), "checkpoint: initial weights of parameter ",
                    i, " have shape ", detail::shape_string(t0.sizes()), ", expected ",
                    detail::shape_string(params[i].sizes()));
        initial[params[i].unsafeGetTensorImpl()] =
            t0.to(params[i].device(), params[i].scalar_type()).contiguous();
      }
    }
    load_base_or_restore(archive);
    // Nothing below can fail.
    step_count_ = step;
    last_scale_ = last_scale;
    initial_ = std::move(initial);
    initial_norm_.clear();
    if (!has_slowed) {
      TORCH_WARN("SlowTuningOptimizer::load: the checkpoint holds no slowed state (a plain base "
                 "optimizer checkpoint); the step counter restarts at 0 and the current weights "
                 "become the initial weights");
    } else if (slow_.keeps_initial_weights() && n == 0) {
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
  /// The path that served the last step (SlowTuningPath::None before the first).
  SlowTuningPath last_step_path() const { return last_path_; }

  /// The initial weights of `param` (undefined when not kept).
  at::Tensor initial_weights(const at::Tensor& param) const {
    auto it = initial_.find(param.unsafeGetTensorImpl());
    return it == initial_.end() ? at::Tensor() : it->second;
  }

 private:
  static constexpr int64_t kStateFormat = 1;

  // Base::load, checked against the parameters; on any error Base's state and group options
  // are put back as they were and the error is rethrown as a c10::Error.
  void load_base_or_restore(torch::serialize::InputArchive& archive) {
    detail::check_checkpoint_group_layout(archive, this->param_groups());
    std::vector<std::unique_ptr<torch::optim::OptimizerOptions>> options;
    for (const auto& group : this->param_groups()) options.push_back(group.options().clone());
    std::decay_t<decltype(this->state())> saved;
    for (const auto& [key, st] : this->state()) saved[key] = st->clone();
    auto restore = [&] {
      this->state() = std::move(saved);
      for (size_t g = 0; g < options.size(); ++g)
        this->param_groups()[g].set_options(std::move(options[g]));
    };
    try {
      Base::load(archive);
      detail::check_loaded_base_state(static_cast<Base&>(*this));
    } catch (const c10::Error&) {
      restore();
      throw;
    } catch (const std::exception& e) {
      restore();
      TORCH_CHECK(false, "checkpoint: corrupt base optimizer state (", e.what(), ")");
    }
  }

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

  // The reference projection of `param` onto its drift ball (nothing without a theta_0).
  void project_onto_drift_ball(const at::Tensor& param) {
    auto it = initial_.find(param.unsafeGetTensorImpl());
    if (it == initial_.end()) return;
    detail::project_onto_drift_ball(param, it->second,
                                    initial_norm_[param.unsafeGetTensorImpl()], slow_);
  }

  detail::SlowBounds bounds(double s) const {
    detail::SlowBounds b;
    b.scale = s;
    b.max_step = slow_.max_relative_step().value_or(0.0);
    b.max_drift = slow_.max_relative_drift().value_or(0.0);
    b.norm_floor = slow_.norm_floor();
    return b;
  }

  /// theta_0 of `p` when the drift bound needs it and the kernels can read it; else undefined.
  at::Tensor kernel_initial(const at::Tensor& p) const {
    if (!slow_.max_relative_drift()) return at::Tensor();
    auto it = initial_.find(p.unsafeGetTensorImpl());
    return it != initial_.end() && detail::same_layout(it->second, p) ? it->second : at::Tensor();
  }

  // Reference and generic paths: snapshot (when rewriting), Base::step, then the transform. The
  // tensors Base may move (with a gradient, or all under a closure) are split per tensor among
  // the reference ops, the CPU kernels and the CUDA kernels.
  at::Tensor generic_step(LossClosure closure, double s) {
    const bool rewrite = s != 1.0 || slow_.max_relative_step().has_value();
    const bool drift = slow_.max_relative_drift().has_value();
    if (!rewrite && !drift) {
      last_path_ = SlowTuningPath::Base;
      return Base::step(std::move(closure));  // Base's step, bitwise
    }
    const bool closure_given = static_cast<bool>(closure);

    // The tensors of the reference ops, and the fused ones per backend and device (one launcher
    // call each).
    std::vector<at::Tensor> ref;
    std::map<std::pair<detail::FusedKind, c10::DeviceIndex>,
             std::vector<detail::SlowTuningOperands>>
        fused;
    for (const auto& p : parameters()) {
      if (!closure_given && !p.grad().defined()) continue;  // Base will not touch it
      detail::FusedKind kind = slow_.use_reference() ? detail::FusedKind::None
                                                     : detail::fused_kind(p);
      if (drift && kind != detail::FusedKind::None) {
        auto it = initial_.find(p.unsafeGetTensorImpl());
        if (it != initial_.end() && !detail::same_layout(it->second, p)) {
          kind = detail::FusedKind::None;
        }
      }
      if (kind == detail::FusedKind::None) {
        ref.push_back(p);
        continue;
      }
      detail::SlowTuningOperands t;
      t.param = p.detach();
      t.initial = kernel_initial(p);
      fused[{kind, p.device().index()}].push_back(std::move(t));
    }

    // Snapshots theta_prev.
    std::vector<at::Tensor> ref_prev;
    if (rewrite) {
      at::NoGradGuard no_grad;
      for (const auto& p : ref) ref_prev.push_back(p.detach().clone());
      for (auto& [key, ts] : fused) {
        detail::snapshot_into_prev(ts, detail::slow_tuning_kernels(key.first));
      }
    }

    last_path_ = fused.empty() ? SlowTuningPath::Reference : SlowTuningPath::Generic;
    at::Tensor loss = Base::step(std::move(closure));

    at::NoGradGuard no_grad;
    for (size_t i = 0; i < ref.size(); ++i) {
      if (rewrite) detail::rewrite_step(ref[i], ref_prev[i], s, slow_);
      if (drift) project_onto_drift_ball(ref[i]);
    }
    for (const auto& [key, ts] : fused) {
      detail::slow_tuning_kernels(key.first).generic_step(ts, bounds(s));
      for (const auto& t : ts) detail::bump_version(t.param);
    }
    return loss;
  }

  // The Adam path for Base = AdamW or Adam (no closure): the wrapper computes the Adam update
  // itself, in Base's state objects, and applies the scale, the bounds and the projection in the
  // same passes. Returns false, having touched nothing, when it does not serve this step: scale 1
  // without a bound (Base::step is then the step, bitwise), or tensors it does not take (another
  // dtype, non-contiguous, mixed devices or kinds, a gradient or state of another dtype or
  // layout). A sparse gradient is an error, as in Base, raised before anything changes.
  template <class B = Base>  // a template, so that only AdamW and Adam instantiate it
  bool adam_step(double s) {
    using Traits = detail::AdamTraits<B>;
    using Options = typename Traits::Options;
    using State = typename Traits::State;
    const bool drift = slow_.max_relative_drift().has_value();
    const bool bounded = slow_.max_relative_step().has_value() || drift;
    if (s == 1.0 && !bounded) return false;

    struct Item {
      at::Tensor p;
      Options* opt;
      State* state;
      at::Tensor initial;
    };
    std::vector<Item> items;
    detail::FusedKind kind = detail::FusedKind::None;
    c10::optional<c10::Device> device;
    bool ok = true;
    for (auto& group : this->param_groups()) {
      auto& opt = static_cast<Options&>(group.options());
      for (auto& p : group.params()) {
        const at::Tensor& g = p.grad();
        if (!g.defined()) continue;
        TORCH_CHECK(!g.is_sparse(), Traits::name, " does not support sparse gradients");
        if (!ok) continue;  // keep looking for sparse gradients only
        const detail::FusedKind k = detail::fused_kind(p);
        ok = k != detail::FusedKind::None && (items.empty() || (k == kind && *device == p.device()));
        ok = ok && detail::same_layout(g, p);
        kind = k;
        device = p.device();
        Item item{p, &opt, nullptr, kernel_initial(p)};
        auto st = this->state().find(p.unsafeGetTensorImpl());
        if (st != this->state().end()) {
          item.state = static_cast<State*>(st->second.get());
          ok = ok && detail::same_layout(item.state->exp_avg(), p) &&
               detail::same_layout(item.state->exp_avg_sq(), p) &&
               (!opt.amsgrad() || detail::same_layout(item.state->max_exp_avg_sq(), p));
        }
        if (drift && !item.initial.defined() && initial_.count(p.unsafeGetTensorImpl())) {
          ok = false;  // theta_0 of another layout: the reference path projects it
        }
        items.push_back(std::move(item));
      }
    }
    if (!ok) return false;

    at::NoGradGuard no_grad;
    std::vector<detail::SlowTuningOperands> ts(items.size());
    for (size_t i = 0; i < items.size(); ++i) {
      Item& it = items[i];
      if (it.state == nullptr) {  // as Base initializes it
        auto st = std::make_unique<State>();
        st->step(0);
        st->exp_avg(torch::zeros_like(it.p, at::MemoryFormat::Preserve));
        st->exp_avg_sq(torch::zeros_like(it.p, at::MemoryFormat::Preserve));
        if (it.opt->amsgrad()) st->max_exp_avg_sq(torch::zeros_like(it.p, at::MemoryFormat::Preserve));
        it.state = st.get();
        this->state()[it.p.unsafeGetTensorImpl()] = std::move(st);
      }
      it.state->step(it.state->step() + 1);
      detail::SlowTuningOperands& t = ts[i];
      t.param = it.p.detach();
      t.grad = it.p.grad();
      t.exp_avg = it.state->exp_avg();
      t.exp_avg_sq = it.state->exp_avg_sq();
      if (it.opt->amsgrad()) t.max_exp_avg_sq = it.state->max_exp_avg_sq();
      t.initial = it.initial;
      t.adam = detail::adam_settings(it.opt->lr(), std::get<0>(it.opt->betas()),
                                     std::get<1>(it.opt->betas()), it.opt->eps(),
                                     it.opt->weight_decay(), it.state->step(), Traits::decoupled,
                                     it.opt->amsgrad());
    }

    if (kind == detail::FusedKind::Cpu && !bounded) {
      // Step-scale mode on CPU: under Adam and AdamW scaling the step by s is scaling the
      // learning rate by s, so ATen's fused CPU kernel with lr * s is the whole step (one pass,
      // no extra memory). One call per param group (hyper-parameters are per group).
      size_t i = 0;
      while (i < items.size()) {
        Options* opt = items[i].opt;
        std::vector<at::Tensor> ps, gs, ms, vs, vmax, steps;
        for (; i < items.size() && items[i].opt == opt; ++i) {
          ps.push_back(items[i].p);
          gs.push_back(items[i].p.grad());
          ms.push_back(items[i].state->exp_avg());
          vs.push_back(items[i].state->exp_avg_sq());
          if (opt->amsgrad()) vmax.push_back(items[i].state->max_exp_avg_sq());
          steps.push_back(at::scalar_tensor(static_cast<double>(items[i].state->step()),
                                            at::TensorOptions().dtype(at::kFloat)));
        }
        const double lr = opt->lr() * s;
        const double beta1 = std::get<0>(opt->betas()), beta2 = std::get<1>(opt->betas());
        if (Traits::decoupled) {
          at::_fused_adamw_(ps, gs, ms, vs, vmax, steps, lr, beta1, beta2, opt->weight_decay(),
                            opt->eps(), opt->amsgrad(), /*maximize=*/false);
        } else {
          at::_fused_adam_(ps, gs, ms, vs, vmax, steps, lr, beta1, beta2, opt->weight_decay(),
                           opt->eps(), opt->amsgrad(), /*maximize=*/false);
        }
      }
    } else if (!ts.empty()) {  // (no tensor with a gradient: nothing to launch)
      detail::slow_tuning_kernels(kind).adam_step(ts, bounds(s), Traits::decoupled);
    }
    for (const Item& it : items) {
      detail::bump_version(it.p);
      detail::bump_version(it.state->exp_avg());
      detail::bump_version(it.state->exp_avg_sq());
      if (it.opt->amsgrad()) detail::bump_version(it.state->max_exp_avg_sq());
    }
    return true;
  }

  SlowTuningOptions slow_;
  int64_t step_count_ = 0;
  double last_scale_ = 1.0;
  SlowTuningPath last_path_ = SlowTuningPath::None;
  std::unordered_map<c10::TensorImpl*, at::Tensor> initial_;       // theta_0 per parameter
  std::unordered_map<c10::TensorImpl*, at::Tensor> initial_norm_;  // ||theta_0||, lazily
};

}  // namespace slowed

// Tests of the fused paths of SlowTuningOptimizer<Base> against its reference path
// (use_reference(true)): the Adam path for AdamW and Adam (CPU: ATen's fused kernel in
// step-scale mode, slowed/cpu/slow_tuning_cpu.h with a bound; CUDA: the multi-tensor kernels)
// and the generic path for any Base (multi-tensor kernels after Base::step).
//
// Tolerances (docs/numerics.md, "Optimizer: Slow Tuning"): after step t (1-based), every element
// of a parameter satisfies |fused - reference| <= t * c * u * max|reference| over the tensor,
// u = 2^-23 (float32), 2^-8 (bfloat16) or 2^-11 (float16, CUDA only), c = kParamUlps; the
// moments likewise with c = kStateUlps against max|moment|; step counters are equal. Both paths round every stored value
// to the parameter dtype; they differ in the order of operations (the reference forms Base's full
// step, subtracts theta_prev and scales the difference, rounding each time; the fused path forms
// theta_prev + a u once), so they may drift apart by a few roundings of theta per step.
//
// CUDA cases ("[cuda]") set SLOWED_CUDA_KERNELS=1 and skip with a warning without a GPU.

#include <slowed/slowed.h>
#include <torch/torch.h>

#include <catch2/catch.hpp>

#include "support/common.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace optim = torch::optim;
using slowed::SlowTuningOptimizer;
using slowed::SlowTuningOptions;
using slowed::SlowTuningPath;

// Tolerance factors c of the header comment (per step, in units of u * max|x|).
constexpr double kParamUlps = 4.0;
constexpr double kStateUlps = 4.0;

/// An AdamW that is not torch::optim::AdamW: the wrapper gives it the generic path.
struct PlainAdamW : optim::AdamW {
  using optim::AdamW::AdamW;
};

bool report() { return std::getenv("SLOWED_TEST_REPORT") != nullptr; }

double unit_roundoff(torch::Dtype dtype) {
  if (dtype == torch::kBFloat16) return std::ldexp(1.0, -8);
  if (dtype == torch::kHalf) return std::ldexp(1.0, -11);
  return std::ldexp(1.0, -23);
}

template <class T>
struct TypeTag {
  using type = T;
};

/// Worst error / tolerance seen, for docs/numerics.md (SLOWED_TEST_REPORT=1 prints it).
struct Worst {
  double param = 0, state = 0;
};

Worst& worst(torch::Dtype dtype) {
  static Worst f32, bf16;
  return dtype == torch::kBFloat16 ? bf16 : f32;
}

/// max |a - b| / (steps * u * max|b|), in units of the per-step tolerance.
double ulps_of_max(const torch::Tensor& a, const torch::Tensor& b, int64_t steps,
                   torch::Dtype dtype) {
  if (a.numel() == 0) return 0.0;
  auto x = a.detach().to(torch::kCPU, torch::kDouble);
  auto y = b.detach().to(torch::kCPU, torch::kDouble);
  const double scale = y.abs().max().item<double>();
  const double diff = (x - y).abs().max().item<double>();
  if (diff == 0.0) return 0.0;
  return diff / (static_cast<double>(steps) * unit_roundoff(dtype) * std::max(scale, 1e-30));
}

// Shapes: not multiples of 8, one above the CPU chunk (16384) and one above the CUDA chunk
// (65536), a scalar-like one and an empty one.
std::vector<std::vector<int64_t>> shapes() {
  return {{37, 19}, {5}, {1}, {130, 131}, {0}, {3, 2, 2}, {260, 257}};
}

std::vector<torch::Tensor> make_params(torch::Dtype dtype, uint64_t seed, torch::Device device) {
  torch::manual_seed(seed);
  std::vector<torch::Tensor> out;
  for (const auto& shape : shapes()) {
    out.push_back(torch::randn(shape, torch::kDouble).to(device, dtype).requires_grad_(true));
  }
  return out;
}

/// Gradients of step t: a seeded random part plus 0.5 theta, so the trajectory feeds back. The
/// same values (computed in float64 from the parameters in float64) for both runs.
void set_grads(std::vector<torch::Tensor>& ps, int64_t t, uint64_t seed) {
  torch::manual_seed(seed * 1000 + static_cast<uint64_t>(t));
  for (auto& p : ps) {
    auto g = torch::randn(p.sizes(), torch::kDouble) + 0.5 * p.detach().to(torch::kCPU, torch::kDouble);
    p.mutable_grad() = g.to(p.device(), p.scalar_type());
  }
}

template <class Base>
struct AdamStateOf;
template <>
struct AdamStateOf<optim::AdamW> {
  using type = optim::AdamWParamState;
};
template <>
struct AdamStateOf<optim::Adam> {
  using type = optim::AdamParamState;
};

template <class Base>
void compare_adam_state(const optim::Optimizer& fused, const optim::Optimizer& ref,
                        const std::vector<torch::Tensor>& pf, const std::vector<torch::Tensor>& pr,
                        int64_t steps, torch::Dtype dtype) {
  using State = typename AdamStateOf<Base>::type;
  for (size_t i = 0; i < pf.size(); ++i) {
    INFO("state of parameter " << i);
    auto a = fused.state().find(pf[i].unsafeGetTensorImpl());
    auto b = ref.state().find(pr[i].unsafeGetTensorImpl());
    REQUIRE((a == fused.state().end()) == (b == ref.state().end()));
    if (a == fused.state().end()) continue;
    const auto& sa = static_cast<const State&>(*a->second);
    const auto& sb = static_cast<const State&>(*b->second);
    REQUIRE(sa.step() == sb.step());
    REQUIRE(sa.exp_avg().scalar_type() == sb.exp_avg().scalar_type());
    REQUIRE(sa.exp_avg().sizes() == sb.exp_avg().sizes());
    double r = std::max(ulps_of_max(sa.exp_avg(), sb.exp_avg(), steps, dtype),
                        ulps_of_max(sa.exp_avg_sq(), sb.exp_avg_sq(), steps, dtype));
    REQUIRE(sa.max_exp_avg_sq().defined() == sb.max_exp_avg_sq().defined());
    if (sa.max_exp_avg_sq().defined()) {
      r = std::max(r, ulps_of_max(sa.max_exp_avg_sq(), sb.max_exp_avg_sq(), steps, dtype));
    }
    worst(dtype).state = std::max(worst(dtype).state, r / kStateUlps);
    CAPTURE(r);
    REQUIRE(r <= kStateUlps);
  }
}

/// Runs the default path and the reference path side by side for `steps` steps and compares
/// parameters after every step (and Adam states at the end). Returns the default path's last
/// step path.
template <class Base, class Opts>
SlowTuningPath compare_paths(const Opts& opts, const SlowTuningOptions& slow, torch::Dtype dtype,
                             torch::Device device, int64_t steps = 6, uint64_t seed = 7) {
  auto pf = make_params(dtype, seed, device);
  auto pr = clone_params(pf);
  SlowTuningOptimizer<Base> fused(pf, opts, slow);
  auto ref_slow = slow;
  ref_slow.use_reference(true);
  SlowTuningOptimizer<Base> ref(pr, opts, ref_slow);
  for (int64_t t = 0; t < steps; ++t) {
    set_grads(pf, t, seed);
    set_grads(pr, t, seed);
    fused.step();
    ref.step();
    REQUIRE(ref.last_step_path() != SlowTuningPath::Generic);
    REQUIRE(ref.last_step_path() != SlowTuningPath::Adam);
    for (size_t i = 0; i < pf.size(); ++i) {
      INFO("step " << t << ", parameter " << i << " " << pf[i].sizes());
      REQUIRE(pf[i].scalar_type() == dtype);
      const double r = ulps_of_max(pf[i], pr[i], t + 1, dtype);
      worst(dtype).param = std::max(worst(dtype).param, r / kParamUlps);
      CAPTURE(r);
      REQUIRE(r <= kParamUlps);
    }
  }
  if constexpr (std::is_same_v<Base, optim::AdamW> || std::is_same_v<Base, optim::Adam>) {
    compare_adam_state<Base>(fused, ref, pf, pr, steps, dtype);
  }
  return fused.last_step_path();
}

/// The modes of the grid; `ends_in_base`: the last step has scale 1 and no bound, so it is
/// Base::step itself on every path.
struct Mode {
  std::string name;
  SlowTuningOptions slow;
  bool ends_in_base = false;
};

std::vector<Mode> modes() {
  std::vector<Mode> m;
  m.push_back({"scale", SlowTuningOptions().scale(0.3)});
  m.push_back({"step bound", SlowTuningOptions().scale(0.5).max_relative_step(0.004)});
  m.push_back({"drift bound, scale 1", SlowTuningOptions().scale(1.0).max_relative_drift(0.01)});
  m.push_back({"both bounds, floor",
               SlowTuningOptions().scale(0.6).max_relative_step(0.006).max_relative_drift(0.012)
                   .norm_floor(0.5)});
  m.push_back({"schedule", SlowTuningOptions().scale(0.2).hold_then_ramp(2, 3, 0.9)
                               .max_relative_drift(0.02)});
  m.push_back({"custom schedule, no drift tracking",
               SlowTuningOptions()
                   .scale_schedule([](int64_t t) { return t % 2 == 0 ? 0.25 : 0.75; })
                   .track_drift(false)});
  m.push_back({"ramp to 1 without a bound", SlowTuningOptions().scale(0.2).hold_then_ramp(1, 2),
               true});
  return m;
}

/// cuda_or_warn(), and the CUDA kernels switched on (SLOWED_CUDA_KERNELS=1) when there is a GPU.
bool cuda_kernels_or_warn() {
  if (!cuda_or_warn()) return false;
  setenv("SLOWED_CUDA_KERNELS", "1", 1);
  return true;
}

void adam_grid(torch::Device device) {
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    for (const auto& mode : modes()) {
      for (bool amsgrad : {false, true}) {
        INFO("dtype " << dtype << ", mode " << mode.name << ", amsgrad " << amsgrad);
        {
          INFO("AdamW");
          const auto path = compare_paths<optim::AdamW>(
              optim::AdamWOptions(0.05).weight_decay(0.05).amsgrad(amsgrad), mode.slow, dtype,
              device);
          REQUIRE(path == (mode.ends_in_base ? SlowTuningPath::Base : SlowTuningPath::Adam));
        }
        for (double wd : {0.0, 0.02}) {
          INFO("Adam, weight decay " << wd);
          const auto path = compare_paths<optim::Adam>(
              optim::AdamOptions(0.05).betas({0.8, 0.99}).eps(1e-6).weight_decay(wd)
                  .amsgrad(amsgrad),
              mode.slow, dtype, device);
          REQUIRE(path == (mode.ends_in_base ? SlowTuningPath::Base : SlowTuningPath::Adam));
        }
      }
    }
  }
}

void generic_grid(torch::Device device) {
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    for (const auto& mode : modes()) {
      INFO("dtype " << dtype << ", mode " << mode.name);
      const auto expected = mode.ends_in_base ? SlowTuningPath::Base : SlowTuningPath::Generic;
      {
        INFO("SGD");
        REQUIRE(compare_paths<optim::SGD>(
                    optim::SGDOptions(0.05).momentum(0.9).weight_decay(0.01), mode.slow, dtype,
                    device) == expected);
      }
      {
        INFO("RMSprop");
        REQUIRE(compare_paths<optim::RMSprop>(optim::RMSpropOptions(0.01).momentum(0.5),
                                              mode.slow, dtype, device) ==
                expected);
      }
      {
        INFO("AdamW subclass (generic path)");
        REQUIRE(compare_paths<PlainAdamW>(optim::AdamWOptions(0.05).weight_decay(0.05),
                                          mode.slow, dtype, device) == expected);
      }
    }
  }
}

}  // namespace

// =============================================================================================
// Fused vs reference

TEST_CASE("the Adam path matches the reference path for AdamW and Adam in every mode", "[cpu]") {
  worst(torch::kFloat) = worst(torch::kBFloat16) = Worst();
  adam_grid(torch::kCPU);
  if (report()) {
    std::printf("adam grid, worst error / tolerance: fp32 param %.3g state %.3g, "
                "bf16 param %.3g state %.3g\n",
                worst(torch::kFloat).param, worst(torch::kFloat).state,
                worst(torch::kBFloat16).param, worst(torch::kBFloat16).state);
  }
}

TEST_CASE("the generic path matches the reference path for SGD, RMSprop and an AdamW subclass",
          "[cpu]") {
  worst(torch::kFloat) = worst(torch::kBFloat16) = Worst();
  generic_grid(torch::kCPU);
  if (report()) {
    std::printf("generic grid, worst error / tolerance: fp32 param %.3g, bf16 param %.3g\n",
                worst(torch::kFloat).param, worst(torch::kBFloat16).param);
  }
}

TEST_CASE("the Adam path matches the reference path on CUDA", "[cuda]") {
  if (!cuda_kernels_or_warn()) return;
  adam_grid(torch::Device(torch::kCUDA));
}

TEST_CASE("the generic path matches the reference path on CUDA", "[cuda]") {
  if (!cuda_kernels_or_warn()) return;
  generic_grid(torch::Device(torch::kCUDA));
  // float16 parameters are served by the CUDA kernels too.
  REQUIRE(compare_paths<optim::SGD>(optim::SGDOptions(0.05).momentum(0.9),
                                    SlowTuningOptions().scale(0.5).max_relative_drift(0.02),
                                    torch::kHalf, torch::Device(torch::kCUDA), 4) ==
          SlowTuningPath::Generic);
}

TEST_CASE("step-scale mode equals torch::optim::AdamW and Adam with lr * s", "[cpu]") {
  // CPU step-scale mode is ATen's fused kernel with lr * s: the same AdamW up to the order of
  // operations (lerp vs mul + add for exp_avg), a few fp32 roundings per step.
  const double s = 0.3;
  double worst_ratio = 0;
  for (bool amsgrad : {false, true}) {
    INFO("amsgrad " << amsgrad);
    auto a = make_params(torch::kFloat, 3, torch::kCPU);
    auto b = clone_params(a);
    auto c = clone_params(a);
    auto d = clone_params(a);
    SlowTuningOptimizer<optim::AdamW> slow(
        a, optim::AdamWOptions(0.05).weight_decay(0.1).amsgrad(amsgrad),
        SlowTuningOptions().scale(s));
    optim::AdamW plain(b, optim::AdamWOptions(0.05 * s).weight_decay(0.1).amsgrad(amsgrad));
    SlowTuningOptimizer<optim::Adam> slow_adam(
        c, optim::AdamOptions(0.05).weight_decay(0.1).amsgrad(amsgrad),
        SlowTuningOptions().scale(s));
    optim::Adam plain_adam(d, optim::AdamOptions(0.05 * s).weight_decay(0.1).amsgrad(amsgrad));
    for (int64_t t = 0; t < 8; ++t) {
      for (auto* ps : {&a, &b, &c, &d}) set_grads(*ps, t, 11);
      slow.step();
      plain.step();
      slow_adam.step();
      plain_adam.step();
      REQUIRE(slow.last_step_path() == SlowTuningPath::Adam);
      for (size_t i = 0; i < a.size(); ++i) {
        INFO("step " << t << ", parameter " << i);
        const double r = std::max(ulps_of_max(a[i], b[i], t + 1, torch::kFloat),
                                  ulps_of_max(c[i], d[i], t + 1, torch::kFloat));
        worst_ratio = std::max(worst_ratio, r);
        REQUIRE(r <= kParamUlps);
      }
    }
    compare_adam_state<optim::AdamW>(slow, plain, a, b, 8, torch::kFloat);
    compare_adam_state<optim::Adam>(slow_adam, plain_adam, c, d, 8, torch::kFloat);
  }
  if (report()) std::printf("lr-scaled AdamW/Adam, worst error / tolerance: %.3g\n", worst_ratio / kParamUlps);
}

TEST_CASE("the fused paths keep the bounds after every step", "[cpu]") {
  const double R = 0.01, r = 0.004;
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    INFO("dtype " << dtype);
    auto ps = make_params(dtype, 5, torch::kCPU);
    std::vector<torch::Tensor> p0;
    for (const auto& p : ps) p0.push_back(p.detach().clone());
    SlowTuningOptimizer<optim::AdamW> opt(
        ps, optim::AdamWOptions(0.05).weight_decay(0.1),
        SlowTuningOptions().scale(0.5).max_relative_step(r).max_relative_drift(R));
    // The stored value is rounded after the projection: u * ||theta|| on top of the bound.
    const double u = unit_roundoff(dtype);
    double max_drift = 0, max_step = 0;
    for (int64_t t = 0; t < 12; ++t) {
      std::vector<torch::Tensor> prev;
      for (const auto& p : ps) prev.push_back(p.detach().clone());
      set_grads(ps, t, 5);
      opt.step();
      REQUIRE(opt.last_step_path() == SlowTuningPath::Adam);
      for (size_t i = 0; i < ps.size(); ++i) {
        if (ps[i].numel() == 0) continue;
        INFO("step " << t << ", parameter " << i);
        const double drift = norm64(ps[i].to(torch::kDouble) - p0[i].to(torch::kDouble));
        const double n0 = norm64(p0[i]);
        REQUIRE(drift <= R * n0 * (1 + 1e-6) + u * norm64(ps[i]));
        const double step = norm64(ps[i].to(torch::kDouble) - prev[i].to(torch::kDouble));
        const double np = norm64(prev[i]);
        REQUIRE(step <= r * np * (1 + 1e-6) + u * norm64(ps[i]));
        max_drift = std::max(max_drift, drift / (R * n0));
        max_step = std::max(max_step, step / (r * np));
      }
    }
    REQUIRE(max_drift > 0.98);  // both bounds were reached
    REQUIRE(max_step > 0.98);
  }
}

// =============================================================================================
// Edge cases

TEST_CASE("empty tensors and tensors without gradients", "[cpu]") {
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    for (const auto& slow : {SlowTuningOptions().scale(0.5),
                             SlowTuningOptions().scale(0.5).max_relative_drift(0.01)}) {
      INFO("dtype " << dtype << ", drift bound " << slow.max_relative_drift().has_value());
      auto ps = make_params(dtype, 9, torch::kCPU);  // holds an empty tensor
      auto rs = clone_params(ps);
      SlowTuningOptimizer<optim::AdamW> fused(ps, optim::AdamWOptions(0.05), slow);
      auto ref_slow = slow;
      SlowTuningOptimizer<optim::AdamW> ref(rs, optim::AdamWOptions(0.05), ref_slow.use_reference(true));
      const auto untouched = ps[0].detach().clone();
      for (int64_t t = 0; t < 3; ++t) {
        set_grads(ps, t, 9);
        set_grads(rs, t, 9);
        ps[0].mutable_grad() = torch::Tensor();  // no gradient: not moved, no state
        rs[0].mutable_grad() = torch::Tensor();
        fused.step();
        ref.step();
        REQUIRE(fused.last_step_path() == SlowTuningPath::Adam);
      }
      REQUIRE(torch::equal(ps[0], untouched));
      REQUIRE(fused.state().count(ps[0].unsafeGetTensorImpl()) == 0);
      REQUIRE(ref.state().count(rs[0].unsafeGetTensorImpl()) == 0);
      for (size_t i = 1; i < ps.size(); ++i) {
        REQUIRE(ulps_of_max(ps[i], rs[i], 3, dtype) <= kParamUlps);
      }
      compare_adam_state<optim::AdamW>(fused, ref, ps, rs, 3, dtype);  // the empty one too
    }
  }
}

TEST_CASE("a sparse gradient is an error on the Adam path, before anything changes", "[cpu]") {
  auto run = [](auto tag, auto opts) {
    using Base = typename decltype(tag)::type;
    auto ps = make_params(torch::kFloat, 13, torch::kCPU);
    SlowTuningOptimizer<Base> opt(ps, opts, SlowTuningOptions().scale(0.5));
    set_grads(ps, 0, 13);
    ps[3].mutable_grad() = ps[3].grad().to_sparse();
    std::vector<torch::Tensor> before;
    for (const auto& p : ps) before.push_back(p.detach().clone());
    REQUIRE_THROWS_WITH(opt.step(), Catch::Contains("does not support sparse gradients"));
    for (size_t i = 0; i < ps.size(); ++i) REQUIRE(torch::equal(ps[i], before[i]));
    REQUIRE(opt.state().empty());
    REQUIRE(opt.slow_step_count() == 0);
  };
  run(TypeTag<optim::AdamW>{}, optim::AdamWOptions(0.01));
  run(TypeTag<optim::Adam>{}, optim::AdamOptions(0.01));
}

TEST_CASE("mixed dtypes: fp32 and bf16 take the Adam path, fp64 sends the step to the generic "
          "path", "[cpu]") {
  const auto slow = SlowTuningOptions().scale(0.4).max_relative_drift(0.01);
  auto build = [](std::vector<torch::Dtype> dtypes) {
    torch::manual_seed(17);
    std::vector<torch::Tensor> ps;
    for (size_t i = 0; i < dtypes.size(); ++i) {
      ps.push_back(torch::randn({41, 9}, torch::kDouble).to(dtypes[i]).requires_grad_(true));
    }
    return ps;
  };
  for (const auto& dtypes : {std::vector<torch::Dtype>{torch::kFloat, torch::kBFloat16},
                             std::vector<torch::Dtype>{torch::kFloat, torch::kDouble,
                                                       torch::kBFloat16}}) {
    const bool has_fp64 = dtypes.size() == 3;
    INFO("with float64: " << has_fp64);
    auto ps = build(dtypes);
    auto rs = clone_params(ps);
    SlowTuningOptimizer<optim::AdamW> fused(ps, optim::AdamWOptions(0.05), slow);
    auto ref_slow = slow;
    SlowTuningOptimizer<optim::AdamW> ref(rs, optim::AdamWOptions(0.05), ref_slow.use_reference(true));
    for (int64_t t = 0; t < 4; ++t) {
      set_grads(ps, t, 17);
      set_grads(rs, t, 17);
      fused.step();
      ref.step();
      REQUIRE(fused.last_step_path() ==
              (has_fp64 ? SlowTuningPath::Generic : SlowTuningPath::Adam));
      for (size_t i = 0; i < ps.size(); ++i) {
        INFO("parameter " << i << " " << dtypes[i]);
        if (dtypes[i] == torch::kDouble) {
          REQUIRE(torch::equal(ps[i], rs[i]));  // the reference ops, the same as the reference
        } else {
          REQUIRE(ulps_of_max(ps[i], rs[i], t + 1, dtypes[i]) <= kParamUlps);
        }
      }
    }
  }
}

TEST_CASE("a gradient of another dtype, a non-contiguous parameter and a closure fall back",
          "[cpu]") {
  const auto slow = SlowTuningOptions().scale(0.5).max_relative_step(0.01);
  SECTION("float32 gradient of a bfloat16 parameter: generic path") {
    auto p = torch::randn({33, 7}).to(torch::kBFloat16).requires_grad_(true);
    auto q = p.detach().clone().requires_grad_(true);
    SlowTuningOptimizer<optim::AdamW> fused(std::vector<torch::Tensor>{p}, optim::AdamWOptions(0.05), slow);
    auto ref_slow = slow;
    SlowTuningOptimizer<optim::AdamW> ref(std::vector<torch::Tensor>{q}, optim::AdamWOptions(0.05), ref_slow.use_reference(true));
    for (int64_t t = 0; t < 3; ++t) {
      const auto g = torch::randn({33, 7});
      p.mutable_grad() = g;
      q.mutable_grad() = g;
      fused.step();
      ref.step();
      REQUIRE(fused.last_step_path() == SlowTuningPath::Generic);
      REQUIRE(ulps_of_max(p, q, t + 1, torch::kBFloat16) <= kParamUlps);
    }
  }
  SECTION("non-contiguous parameter: reference path, bitwise") {
    auto p = torch::randn({7, 5}).t().detach().requires_grad_(true);
    REQUIRE_FALSE(p.is_contiguous());
    auto q = torch::empty_strided(p.sizes(), p.strides()).copy_(p.detach()).requires_grad_(true);
    SlowTuningOptimizer<optim::AdamW> fused(std::vector<torch::Tensor>{p}, optim::AdamWOptions(0.05), slow);
    auto ref_slow = slow;
    SlowTuningOptimizer<optim::AdamW> ref(std::vector<torch::Tensor>{q}, optim::AdamWOptions(0.05), ref_slow.use_reference(true));
    for (int64_t t = 0; t < 3; ++t) {
      const auto g = torch::randn({5, 7});
      p.mutable_grad() = g;
      q.mutable_grad() = g;
      fused.step();
      ref.step();
      REQUIRE(fused.last_step_path() == SlowTuningPath::Reference);
      REQUIRE(torch::equal(p, q));
    }
  }
  SECTION("a closure: Base::step evaluates it, then the generic path") {
    auto ps = make_params(torch::kFloat, 21, torch::kCPU);
    auto rs = clone_params(ps);
    SlowTuningOptimizer<optim::AdamW> fused(ps, optim::AdamWOptions(0.05), slow);
    auto ref_slow = slow;
    SlowTuningOptimizer<optim::AdamW> ref(rs, optim::AdamWOptions(0.05), ref_slow.use_reference(true));
    auto closure_for = [](std::vector<torch::Tensor>& v) {
      return [&v]() {
        torch::Tensor loss = torch::zeros({}, torch::kDouble);
        for (auto& p : v) {
          p.mutable_grad() = torch::Tensor();
          loss = loss + (p.to(torch::kDouble) - 0.3).pow(2).sum();
        }
        loss.backward();
        return loss;
      };
    };
    for (int64_t t = 0; t < 3; ++t) {
      const auto lf = fused.step(closure_for(ps));
      const auto lr = ref.step(closure_for(rs));
      REQUIRE(fused.last_step_path() == SlowTuningPath::Generic);
      REQUIRE(lf.defined());
      for (size_t i = 0; i < ps.size(); ++i) {
        REQUIRE(ulps_of_max(ps[i], rs[i], t + 1, torch::kFloat) <= kParamUlps);
      }
    }
  }
}

TEST_CASE("scale 1 without a bound is Base's step on every path", "[cpu]") {
  auto ps = make_params(torch::kFloat, 31, torch::kCPU);
  auto rs = clone_params(ps);
  SlowTuningOptimizer<optim::AdamW> slow(ps, optim::AdamWOptions(0.05).amsgrad(true),
                                         SlowTuningOptions().scale(1.0));
  optim::AdamW plain(rs, optim::AdamWOptions(0.05).amsgrad(true));
  for (int64_t t = 0; t < 3; ++t) {
    set_grads(ps, t, 31);
    set_grads(rs, t, 31);
    slow.step();
    plain.step();
    REQUIRE(slow.last_step_path() == SlowTuningPath::Base);
    for (size_t i = 0; i < ps.size(); ++i) REQUIRE(torch::equal(ps[i], rs[i]));
  }
}

TEST_CASE("fused results are deterministic and do not depend on the number of threads", "[cpu]") {
  const int threads = at::get_num_threads();
  for (const auto& slow : {SlowTuningOptions().scale(0.5).max_relative_step(0.004),
                           SlowTuningOptions().scale(0.5).max_relative_drift(0.01)}) {
    std::vector<std::vector<torch::Tensor>> results;
    for (int n : {1, std::max(2, threads), 1}) {
      at::set_num_threads(n);
      for (bool generic : {false, true}) {
        auto ps = make_params(torch::kFloat, 37, torch::kCPU);
        std::unique_ptr<optim::Optimizer> opt;
        if (generic) {
          opt = std::make_unique<SlowTuningOptimizer<PlainAdamW>>(ps, optim::AdamWOptions(0.05), slow);
        } else {
          opt = std::make_unique<SlowTuningOptimizer<optim::AdamW>>(ps, optim::AdamWOptions(0.05), slow);
        }
        for (int64_t t = 0; t < 3; ++t) {
          set_grads(ps, t, 37);
          opt->step();
        }
        results.push_back(ps);
      }
    }
    at::set_num_threads(threads);
    for (size_t k = 2; k < results.size(); ++k) {
      for (size_t i = 0; i < results[k].size(); ++i) {
        REQUIRE(torch::equal(results[k][i], results[k % 2][i]));
      }
    }
  }
}

// =============================================================================================
// Checkpoints

namespace {

using SlowAdamW = SlowTuningOptimizer<optim::AdamW>;

SlowTuningOptions checkpoint_options(bool reference) {
  return SlowTuningOptions().scale(0.3).hold_then_ramp(2, 4, 1.0).max_relative_drift(0.02)
      .max_relative_step(0.01).use_reference(reference);
}

void train(SlowAdamW& opt, std::vector<torch::Tensor>& ps, int64_t from, int64_t n) {
  for (int64_t t = from; t < from + n; ++t) {
    set_grads(ps, t, 41);
    opt.step();
  }
}

}  // namespace

TEST_CASE("a checkpoint written by one path resumes identically on the other", "[cpu]") {
  const int64_t k = 3, n = 4;
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    for (bool write_fused : {true, false}) {
      INFO("dtype " << dtype << ", written by the " << (write_fused ? "fused" : "reference")
                    << " path");
      TempFile opt_file("ckpt_opt.pt");
      const auto opts = optim::AdamWOptions(0.05).weight_decay(0.05).amsgrad(true);
      // Writer: k steps on one path, save, then switch paths in memory and continue.
      auto ps = make_params(dtype, 43, torch::kCPU);
      SlowAdamW writer(ps, opts, checkpoint_options(!write_fused));
      train(writer, ps, 0, k);
      REQUIRE(writer.last_step_path() ==
              (write_fused ? SlowTuningPath::Adam : SlowTuningPath::Reference));
      torch::save(writer, opt_file.path);
      std::vector<torch::Tensor> at_k;
      for (const auto& p : ps) at_k.push_back(p.detach().clone());
      writer.slow_options().use_reference(write_fused);
      train(writer, ps, k, n);
      // Reader: the other path, loads the checkpoint into fresh parameters set to theta_k.
      auto qs = make_params(dtype, 99, torch::kCPU);
      {
        torch::NoGradGuard no_grad;
        for (size_t i = 0; i < qs.size(); ++i) qs[i].copy_(at_k[i]);
      }
      SlowAdamW reader(qs, opts, checkpoint_options(write_fused));
      torch::load(reader, opt_file.path);
      REQUIRE(reader.slow_step_count() == k);
      train(reader, qs, k, n);
      REQUIRE(reader.last_step_path() ==
              (write_fused ? SlowTuningPath::Reference : SlowTuningPath::Adam));
      for (size_t i = 0; i < ps.size(); ++i) {
        INFO("parameter " << i);
        REQUIRE(torch::equal(ps[i], qs[i]));
        REQUIRE(torch::equal(writer.initial_weights(ps[i]), reader.initial_weights(qs[i])));
      }
      compare_adam_state<optim::AdamW>(writer, reader, ps, qs, 1, dtype);
      for (size_t i = 0; i < ps.size(); ++i) {
        const auto& a = static_cast<const optim::AdamWParamState&>(
            *writer.state().at(ps[i].unsafeGetTensorImpl()));
        const auto& b = static_cast<const optim::AdamWParamState&>(
            *reader.state().at(qs[i].unsafeGetTensorImpl()));
        REQUIRE(torch::equal(a.exp_avg(), b.exp_avg()));
        REQUIRE(torch::equal(a.exp_avg_sq(), b.exp_avg_sq()));
        REQUIRE(torch::equal(a.max_exp_avg_sq(), b.max_exp_avg_sq()));
        REQUIRE(a.exp_avg().scalar_type() == dtype);  // the state keeps the parameter dtype
      }
    }
  }
}

TEST_CASE("a fused-path checkpoint loads into plain torch::optim::AdamW", "[cpu]") {
  TempFile file("fused_into_plain.pt");
  const auto opts = optim::AdamWOptions(0.02).weight_decay(0.05);
  auto ps = make_params(torch::kFloat, 47, torch::kCPU);
  SlowAdamW slow(ps, opts, SlowTuningOptions().scale(0.5).max_relative_drift(0.05));
  train(slow, ps, 0, 3);
  REQUIRE(slow.last_step_path() == SlowTuningPath::Adam);
  torch::save(slow, file.path);
  auto qs = clone_params(ps);
  optim::AdamW plain(qs, opts);
  torch::load(plain, file.path);
  for (size_t i = 0; i < ps.size(); ++i) {
    const auto& a = static_cast<const optim::AdamWParamState&>(
        *slow.state().at(ps[i].unsafeGetTensorImpl()));
    const auto& b = static_cast<const optim::AdamWParamState&>(
        *plain.state().at(qs[i].unsafeGetTensorImpl()));
    REQUIRE(a == b);  // AdamWParamState's own comparison: step and every moment, bitwise
  }
}

// =============================================================================================
// CUDA host logic that runs without a GPU

TEST_CASE("the CUDA launch batches cover every chunk of every tensor exactly once", "[cpu]") {
  namespace d = slowed::cuda::detail;
  // 60 tensors (more than one launch holds), empty ones, and one with more chunks than a launch
  // has blocks. CPU tensors stand in: batching reads only pointers and sizes (pages untouched).
  std::vector<int64_t> sizes;
  for (int i = 0; i < 60; ++i) sizes.push_back(i % 7 == 3 ? 0 : 1 + 4973 * i);
  sizes[11] = d::kMtChunk * (d::kMtBlocks + 17) + 5;
  sizes[12] = d::kMtChunk;
  std::vector<slowed::detail::SlowTuningOperands> ts(sizes.size());
  std::vector<const slowed::detail::SlowTuningOperands*> ptrs;
  for (size_t i = 0; i < sizes.size(); ++i) {
    ts[i].param = torch::empty({sizes[i]});
    ts[i].adam.step_size = static_cast<float>(i);  // hyper[5] (H_STEP_SIZE): tells the tensor
    ptrs.push_back(&ts[i]);
  }
  int total = 0;
  const auto first = d::slot_layout(ptrs, &total);
  std::vector<std::vector<int>> seen(sizes.size());
  int launches = 0;
  d::for_each_batch(ptrs, first, false, [&](d::SlowMtArgs& args, int blocks) {
    ++launches;
    REQUIRE(blocks > 0);
    REQUIRE(blocks <= d::kMtBlocks);
    for (int b = 0; b < blocks; ++b) {
      const int slot = args.block_tensor[b];
      REQUIRE(slot < d::kMtTensors);
      const auto i = static_cast<size_t>(args.hyper[5][slot]);
      REQUIRE(args.ptr[0][slot] == ts[i].param.data_ptr());
      REQUIRE(args.numel[slot] == sizes[i]);
      REQUIRE(args.first_slot[slot] == first[i]);
      seen[i].push_back(args.block_chunk[b]);
    }
  });
  int64_t chunks = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    const int64_t n = (sizes[i] + d::kMtChunk - 1) / d::kMtChunk;
    chunks += n;
    REQUIRE(static_cast<int64_t>(seen[i].size()) == n);
    for (int64_t c = 0; c < n; ++c) REQUIRE(seen[i][static_cast<size_t>(c)] == c);
  }
  REQUIRE(total == chunks);
  REQUIRE(launches >= 3);
}

TEST_CASE("the CPU kernels' parallel_for runs on ATen's threads in a build without OpenMP", "[cpu]") {
  // at::parallel_for is serial in a translation unit compiled without -fopenmp (as this one is:
  // _OPENMP undefined) on LibTorch's OpenMP builds; slowed::cpu::parallel_for must not be.
  const int threads = at::get_num_threads();
  for (const int64_t n : {int64_t{1}, int64_t{2}, int64_t{7}, int64_t{1000}}) {
    for (const int64_t grain : {int64_t{1}, int64_t{3}, int64_t{5000}}) {
      INFO("n " << n << ", grain " << grain);
      std::vector<std::atomic<int>> visits(static_cast<size_t>(n));
      std::mutex m;
      std::set<std::thread::id> ids;
      int64_t calls = 0;
      std::atomic<bool> bad_range{false};  // (Catch's assertions are for the main thread only)
      slowed::cpu::parallel_for(10, 10 + n, grain, [&](int64_t b, int64_t e) {
        if (!(10 <= b && b < e && e <= 10 + n)) {
          bad_range = true;
          return;
        }
        for (int64_t i = b; i < e; ++i) visits[static_cast<size_t>(i - 10)]++;
        // Long enough that one thread cannot take every range before the others start.
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
        std::lock_guard<std::mutex> lock(m);
        ids.insert(std::this_thread::get_id());
        ++calls;
      });
      CHECK_FALSE(bad_range.load());
      for (const auto& v : visits) CHECK(v.load() == 1);
      const int64_t expected = std::min<int64_t>(threads, (n + grain - 1) / grain);
      CHECK(static_cast<int64_t>(ids.size()) == expected);
      CHECK(calls == expected);
    }
  }
  if (threads == 1) WARN("one ATen thread: the parallel branch was not exercised");
  // An exception in a range reaches the caller.
  CHECK_THROWS_WITH(slowed::cpu::parallel_for(0, 100, 1,
                                              [](int64_t b, int64_t) {
                                                TORCH_CHECK(b != 0, "range at 0 fails");
                                              }),
                    Catch::Contains("range at 0 fails"));
  // An empty range calls nothing.
  bool called = false;
  slowed::cpu::parallel_for(5, 5, 1, [&](int64_t, int64_t) { called = true; });
  CHECK_FALSE(called);
}

// Tests of EntropyMaskedCrossEntropy (Low-Entropy Masking).
//
// The library is checked against
//   * an independent double-precision oracle written with Eigen in support/loss_oracle.h (no ATen
//     arithmetic): the loss, d loss / d logits (with arbitrary upstream gradients) and the
//     statistics, over a seeded grid of shapes, dtypes, threshold modes, reductions and options;
//   * PyTorch's own cross_entropy when nothing is masked;
//   * properties (all masked, empty input, determinism, reference entropies, in-place backward)
//     and the error contract (c10::Error naming the argument).
// The tolerances and why they are what they are: docs/numerics.md, "Loss: tolerances". Keep the
// `tolerance_for` table in support/loss_oracle.h and that table in step.

#include <catch2/catch.hpp>
#include <slowed/slowed.h>
#include <torch/torch.h>
#include <Eigen/Dense>

#include "support/common.h"
#include "support/loss_oracle.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

// ------------------------------------------------------------------------------------------------
// Running the library
// ------------------------------------------------------------------------------------------------

struct LibRun {
  torch::Tensor loss;  ///< detached
  torch::Tensor grad;  ///< logits.grad after backward
  EntropyMaskStats stats;
};

/// One forward + backward on a fresh leaf copy of `logits`. `upstream` undefined: backward().
LibRun run_library(const torch::Tensor& logits, const torch::Tensor& targets, const Opts& o,
                   const torch::Tensor& reference, const torch::Tensor& upstream) {
  torch::Tensor x = leaf(logits);
  LibRun r;
  torch::Tensor loss = slowed::entropy_masked_cross_entropy(x, targets, o, reference, &r.stats);
  r.loss = loss.detach().clone();
  backward_with(loss, upstream);
  r.grad = x.grad();
  return r;
}

/// Compares one library run with the oracle: dtypes, shapes, loss, gradient, exact zeros of
/// masked rows, stats.
void check_against_oracle(const LibRun& lib, const OracleResult& o, torch::Dtype dtype,
                          const Shape& lead, int64_t vocab, Reduction red, torch::Device device,
                          bool exact_threshold, const std::string& path) {
  const Tolerance tol = tolerance_for(dtype);
  const std::string key = dtype_name(dtype) + " " + path;
  const int64_t n = numel_of(lead);
  CHECK(lib.loss.scalar_type() == loss_dtype_for(dtype));
  CHECK(lib.loss.device() == device);
  if (red == Reduction::None) {
    CHECK(lib.loss.sizes() == at::IntArrayRef(lead));
  } else {
    CHECK(lib.loss.dim() == 0);
  }
  REQUIRE(lib.grad.defined());
  CHECK(lib.grad.scalar_type() == dtype);
  CHECK(lib.grad.device() == device);
  CHECK(lib.grad.sizes() == at::IntArrayRef(with_vocab(lead, vocab)));

  // Loss.
  if (red == Reduction::None) {
    const Mat actual = as_matrix(lib.loss, n, 1);
    Mat expected(n, 1), t(n, 1);
    for (int64_t i = 0; i < n; ++i) {
      expected(i, 0) = o.loss_none(i);
      t(i, 0) = o.keep[size_t(i)] ? tol.compute * o.rows.scale(i) : 0.0;  // masked: exactly 0
    }
    const std::string msg = compare(actual, expected, t, "per-token loss", key + " loss");
    INFO(msg);
    CHECK(msg.empty());
  } else {
    const double t = tol.compute * o.loss_scale;
    const std::string msg = compare_scalar(scalar_of(lib.loss), o.loss, t, "loss", key + " loss");
    INFO(msg);
    CHECK(msg.empty());
    if (o.num_kept == 0) CHECK(scalar_of(lib.loss) == 0.0);
  }

  // Gradient: masked and ignored rows exactly 0, the others within tolerance.
  const Mat g = as_matrix(lib.grad, n, vocab);
  Mat t(n, vocab);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < vocab; ++j) {
      t(i, j) = o.keep[size_t(i)] ? tol.out_rtol * std::abs(o.grad(i, j)) +
                                        tol.compute * o.grad_scale(i) + tol.out_atol
                                  : 0.0;
    }
  }
  const std::string msg = compare(g, o.grad, t, "gradient", key + " grad");
  INFO(msg);
  CHECK(msg.empty());

  check_stats(lib.stats, o, tol, device, exact_threshold, key);
}

void check_bitwise_equal_stats(const EntropyMaskStats& a, const EntropyMaskStats& b) {
  CHECK(torch::equal(a.num_valid, b.num_valid));
  CHECK(torch::equal(a.num_kept, b.num_kept));
  CHECK(torch::equal(a.kept_fraction, b.kept_fraction));
  CHECK(torch::equal(a.mean_entropy, b.mean_entropy));
  // threshold may be +inf: equal() compares values, and inf == inf.
  CHECK(torch::equal(a.threshold, b.threshold));
}

// ------------------------------------------------------------------------------------------------
// The grid
// ------------------------------------------------------------------------------------------------

struct GridCase : LossGridCase {
  bool inplace = false;

  std::string name() const {
    std::ostringstream os;
    os << "logits " << shape_name(with_vocab(lead, vocab)) << ' ' << dtype_name(dtype) << ", "
       << (mode == ThresholdMode::Absolute ? "Absolute" : "Ratio") << ", "
       << reduction_name(reduction) << ", ignore_index " << ignore_index << terms_name()
       << (inplace ? ", +inplace_backward" : "") << inputs_name();
    return os.str();
  }
};

/// Builds the inputs of `c`, runs the oracle and the library (and the in-place variant), and
/// compares them.
void run_grid_case(const GridCase& c, torch::Device device) {
  INFO(c.name());
  std::mt19937_64 rng(c.seed);
  const int64_t n = numel_of(c.lead), v = c.vocab;
  const torch::Tensor logits = tensor_from(random_logits(rng, n, v), with_vocab(c.lead, v), c.dtype, device);
  const Mat x = as_matrix(logits, n, v);  // exactly the (rounded) values the library sees
  const std::vector<int64_t> t = random_targets(rng, n, v, c.ignore_index, 0.25);
  const torch::Tensor targets =
      targets_from(t, c.lead, c.int32_targets ? torch::kInt : torch::kLong, device);

  Opts o = c.options();
  const OracleRows rows = oracle_rows(x, t, o);

  ReferenceEntropies ref;
  if (c.reference) ref = random_reference_entropies(rng, rows, c.lead, device);
  const torch::Tensor& reference = ref.tensor;
  set_robust_threshold(o, c.mode, decision_values(rows, c.reference ? &ref.values : nullptr),
                       /*exact_ties=*/v == 1 && !c.reference, rng);

  // Upstream gradient: random per token for None, 1 or 0.75 otherwise.
  const Upstream up =
      random_upstream(rng, c.reduction, c.scaled_upstream, c.lead, loss_dtype_for(c.dtype), device);
  const torch::Tensor& upstream = up.tensor;

  const OracleResult ora = oracle(x, t, o, c.reference ? &ref.values : nullptr,
                                  c.reduction == Reduction::None ? &up.per_token : nullptr, up.scalar);
  const bool exact_threshold = c.reference;  // reference values are fp32 already

  // Both the default path (fused kernel where one serves the call) and the plain-ATen reference.
  for (bool reference_path : {false, true}) {
    INFO((reference_path ? "use_reference(true)" : "default path"));
    Opts op = o;
    op.use_reference(reference_path);
    const LibRun lib = run_library(logits, targets, op, reference, upstream);
    check_against_oracle(lib, ora, c.dtype, c.lead, v, c.reduction, device, exact_threshold,
                         reference_path ? "reference" : "default");

    if (c.inplace) {
      Opts oi = op;
      oi.inplace_backward(true);
      const LibRun lib2 = run_library(logits, targets, oi, reference, upstream);
      INFO("in-place backward against out-of-place");
      CHECK(torch::equal(lib2.loss, lib.loss));
      REQUIRE(lib2.grad.defined());
      CHECK(lib2.grad.scalar_type() == lib.grad.scalar_type());
      CHECK(lib2.grad.sizes() == lib.grad.sizes());
      CHECK(torch::equal(lib2.grad, lib.grad));
      check_bitwise_equal_stats(lib2.stats, lib.stats);
    }
  }
}

/// The whole grid: 8 shapes x 4 vocabulary sizes x 4 dtypes x 2 threshold modes x 4 reductions;
/// the binary options are drawn per case from a seeded generator, ignore_index cycles through
/// -100, -1 and 2 (a real class index when V > 2).
void run_oracle_grid(torch::Device device) {
  const std::vector<Shape> leads = {{0}, {1}, {5}, {37}, {2, 0}, {1, 1}, {3, 5}, {2, 19}};
  const std::vector<int64_t> vocabs = {1, 3, 17, 130};
  const auto& dtypes = kGridDtypes;
  const auto& modes = kGridModes;
  const auto& reductions = kGridReductions;
  const auto& ignores = kGridIgnoreIndices;
  uint64_t index = 0;
  for (const auto& lead : leads) {
    for (int64_t v : vocabs) {
      for (torch::Dtype dtype : dtypes) {
        for (ThresholdMode mode : modes) {
          for (Reduction red : reductions) {
            std::mt19937_64 flags(0x51ED0000ULL + index);
            std::bernoulli_distribution coin(0.5);
            GridCase c;
            c.set_point(lead, v, dtype, mode, red, ignores[index % 3]);
            c.draw_terms(flags);
            c.inplace = coin(flags);
            c.draw_inputs(flags);
            c.seed = 0x10551055ULL * 31 + index;
            ++index;
            run_grid_case(c, device);
          }
        }
      }
    }
  }
  print_worst_ratios();
}

Opts all_options_on() {
  Opts o;
  o.label_smoothing(0.1).lse_square_scale(0.01).softcap(4.0);
  return o;
}

/// Every way of masking everything gives loss 0 and a gradient of exact zeros, for every
/// reduction and dtype.
void check_all_masked(torch::Device device) {
  const Reduction reductions[] = {Reduction::MeanKept, Reduction::MeanValid, Reduction::Sum,
                                  Reduction::None};
  const std::vector<torch::Dtype> dtypes = {torch::kFloat, torch::kBFloat16, torch::kHalf,
                                            torch::kDouble};
  const char* ways[] = {"absolute threshold above every entropy", "mask_ratio 1",
                        "every target ignored", "V = 1 (entropy 0) with threshold 0.5"};
  for (torch::Dtype dtype : dtypes) {
    for (Reduction red : reductions) {
      for (int way = 0; way < 4; ++way) {
        INFO(dtype_name(dtype) << ", " << reduction_name(red) << ", " << ways[way]);
        std::mt19937_64 rng(7 + static_cast<uint64_t>(way));
        const int64_t v = way == 3 ? 1 : 5;
        const Shape lead = {2, 3};
        const torch::Tensor logits =
            tensor_from(random_logits(rng, 6, v), with_vocab(lead, v), dtype, device);
        std::vector<int64_t> t = random_targets(rng, 6, v, -100, 0.3);
        if (way == 2) std::fill(t.begin(), t.end(), -100);
        const torch::Tensor targets = targets_from(t, lead, torch::kLong, device);
        Opts o = all_options_on();
        o.reduction(red);
        if (way == 0) o.entropy_threshold(1e6);
        if (way == 1) o.mask_ratio(1.0);
        if (way == 2) o.entropy_threshold(-1.0);
        if (way == 3) o.entropy_threshold(0.5);
        torch::Tensor upstream;
        if (red == Reduction::None)
          upstream = torch::randn(lead, torch::TensorOptions().dtype(loss_dtype_for(dtype))).to(device);
        for (bool inplace : {false, true}) {
          INFO("inplace_backward " << inplace);
          Opts oi = o;
          oi.inplace_backward(inplace);
          const LibRun r = run_library(logits, targets, oi, {}, upstream);
          CHECK(torch::all(torch::isfinite(r.loss)).item<bool>());
          CHECK(torch::equal(r.loss, torch::zeros_like(r.loss)));
          REQUIRE(r.grad.defined());
          CHECK(torch::all(torch::isfinite(r.grad)).item<bool>());
          CHECK(torch::equal(r.grad, torch::zeros_like(r.grad)));
          CHECK(r.stats.num_kept.item<int64_t>() == 0);
          CHECK(r.stats.kept_fraction.item<float>() == 0.0f);
          CHECK(std::isfinite(r.stats.mean_entropy.item<float>()));
        }
      }
    }
  }
}

/// N = 0 ([0, V], [2, 0, V]): loss 0 (or an empty per-token loss), an empty gradient, zero stats.
void check_empty(torch::Device device) {
  const Reduction reductions[] = {Reduction::MeanKept, Reduction::MeanValid, Reduction::Sum,
                                  Reduction::None};
  for (const Shape& lead : {Shape{0}, Shape{2, 0}}) {
    for (Reduction red : reductions) {
      for (bool ratio : {false, true}) {
        INFO(shape_name(lead) << ", " << reduction_name(red) << (ratio ? ", Ratio 0.5" : ", Absolute 0.3"));
        const torch::Tensor logits =
            torch::randn(with_vocab(lead, 4), torch::TensorOptions().device(device));
        const torch::Tensor targets = torch::zeros(lead, torch::TensorOptions().dtype(torch::kLong).device(device));
        Opts o;
        o.reduction(red);
        if (ratio) o.mask_ratio(0.5);
        torch::Tensor upstream;
        if (red == Reduction::None) upstream = torch::ones(lead, torch::TensorOptions().device(device));
        const LibRun r = run_library(logits, targets, o, {}, upstream);
        if (red == Reduction::None) {
          CHECK(r.loss.sizes() == at::IntArrayRef(lead));
        } else {
          CHECK(r.loss.dim() == 0);
          CHECK(r.loss.item<double>() == 0.0);
        }
        REQUIRE(r.grad.defined());
        CHECK(r.grad.sizes() == logits.sizes());
        CHECK(r.stats.num_valid.item<int64_t>() == 0);
        CHECK(r.stats.num_kept.item<int64_t>() == 0);
        CHECK(r.stats.kept_fraction.item<float>() == 0.0f);
        CHECK(r.stats.mean_entropy.item<float>() == 0.0f);
        if (ratio) {
          CHECK(std::isinf(r.stats.threshold.item<float>()));
        } else {
          CHECK(r.stats.threshold.item<float>() == 0.3f);
        }
      }
    }
  }
}

/// Two identical calls give bitwise identical loss, gradient and stats.
void check_determinism(torch::Device device) {
  std::mt19937_64 rng(99);
  const Shape lead = {4, 33};
  const int64_t v = 130, n = numel_of(lead);
  const torch::Tensor logits = tensor_from(random_logits(rng, n, v), with_vocab(lead, v), torch::kFloat, device);
  const torch::Tensor targets = targets_from(random_targets(rng, n, v, -100, 0.2), lead, torch::kLong, device);
  for (Reduction red : {Reduction::MeanKept, Reduction::None}) {
    for (bool ratio : {false, true}) {
      INFO(reduction_name(red) << (ratio ? ", Ratio 0.3" : ", Absolute 1.0"));
      Opts o = all_options_on();
      o.reduction(red);
      if (ratio) {
        o.mask_ratio(0.3);
      } else {
        o.entropy_threshold(1.0);
      }
      torch::Tensor upstream;
      if (red == Reduction::None) upstream = torch::randn(lead).to(device);
      const LibRun a = run_library(logits, targets, o, {}, upstream);
      const LibRun b = run_library(logits, targets, o, {}, upstream);
      CHECK(torch::equal(a.loss, b.loss));
      CHECK(torch::equal(a.grad, b.grad));
      check_bitwise_equal_stats(a.stats, b.stats);
    }
  }
}

}  // namespace

// ================================================================================================
// The oracle itself (a few hand-checked values, so that a wrong oracle cannot hide a wrong library)
// ================================================================================================

TEST_CASE("the Eigen oracle reproduces hand-computed cross-entropy values", "[cpu]") {
  // Uniform logits over V classes: lse = log V + c, H = log V, loss = log V.
  Mat x(1, 4);
  x << 2.0, 2.0, 2.0, 2.0;
  Opts o;
  o.entropy_threshold(-1.0).reduction(Reduction::Sum);
  OracleResult r = oracle(x, {1}, o, nullptr, nullptr);
  CHECK(r.rows.lse(0) == Approx(2.0 + std::log(4.0)).epsilon(1e-15));
  CHECK(r.rows.entropy(0) == Approx(std::log(4.0)).epsilon(1e-14));
  CHECK(r.loss == Approx(std::log(4.0)).epsilon(1e-14));
  CHECK(r.grad(0, 0) == Approx(0.25).epsilon(1e-15));
  CHECK(r.grad(0, 1) == Approx(-0.75).epsilon(1e-15));
  // Two classes, logits (0, log 3): p = (1/4, 3/4); target 0: loss = log 4; smoothing 0.2 adds
  // 0.2 (lse - mean z) - 0.2 (lse - z_0) = 0.2 (z_0 - mean z) = -0.1 log 3.
  Mat y(1, 2);
  y << 0.0, std::log(3.0);
  o.label_smoothing(0.2);
  r = oracle(y, {0}, o, nullptr, nullptr);
  CHECK(r.loss == Approx(std::log(4.0) - 0.1 * std::log(3.0)).epsilon(1e-14));
  // grad = p - 0.8 onehot - 0.1 = (0.25 - 0.9, 0.75 - 0.1)
  CHECK(r.grad(0, 0) == Approx(-0.65).epsilon(1e-14));
  CHECK(r.grad(0, 1) == Approx(0.65).epsilon(1e-14));
  // Ratio: k = floor(0.5 * 3) = 1 -> the threshold is the 2nd smallest entropy.
  Mat z(3, 3);
  z << 0, 0, 0, 0, 5, 0, 0, 20, 0;  // entropies log 3 > mid > ~0
  Opts q;
  q.mask_ratio(0.5);
  r = oracle(z, {0, 1, 2}, q, nullptr, nullptr);
  CHECK(r.num_kept == 2);
  CHECK_FALSE(r.keep[2]);
  CHECK(r.threshold == r.rows.entropy(1));
}

// ================================================================================================
// Grid comparison with the oracle
// ================================================================================================

TEST_CASE("loss, gradient and stats match the double-precision oracle over the grid", "[cpu]") {
  run_oracle_grid(torch::kCPU);
}

TEST_CASE("loss, gradient and stats on CUDA match the double-precision oracle over the grid",
          "[cuda]") {
  if (!cuda_or_warn()) return;
  run_oracle_grid(torch::Device(torch::kCUDA, 0));
}

// ================================================================================================
// Properties
// ================================================================================================

TEST_CASE("all tokens masked gives zero loss and zero grad", "[cpu]") { check_all_masked(torch::kCPU); }

TEST_CASE("all tokens masked on CUDA gives zero loss and zero grad", "[cuda]") {
  if (!cuda_or_warn()) return;
  check_all_masked(torch::Device(torch::kCUDA, 0));
}

TEST_CASE("empty input (N = 0) gives zero loss, an empty gradient and zero stats", "[cpu]") {
  check_empty(torch::kCPU);
}

TEST_CASE("empty input on CUDA gives zero loss, an empty gradient and zero stats", "[cuda]") {
  if (!cuda_or_warn()) return;
  check_empty(torch::Device(torch::kCUDA, 0));
}

TEST_CASE("with nothing masked, the loss and grad equal torch cross_entropy", "[cpu]") {
  namespace F = torch::nn::functional;
  const Reduction reductions[] = {Reduction::MeanKept, Reduction::MeanValid, Reduction::Sum,
                                  Reduction::None};
  for (torch::Dtype dtype : {torch::kFloat, torch::kDouble}) {
    const double rtol = dtype == torch::kDouble ? 1e-12 : 1e-5;
    const double atol = dtype == torch::kDouble ? 1e-13 : 1e-6;
    for (const Shape& lead : {Shape{7}, Shape{2, 5}}) {
      for (int64_t ignore_index : {int64_t(-100), int64_t(1)}) {
        for (double eps : {0.0, 0.2}) {
          for (Reduction red : reductions) {
            for (bool ratio : {false, true}) {
              INFO(dtype_name(dtype) << ' ' << shape_name(lead) << ", ignore_index " << ignore_index
                                     << ", label_smoothing " << eps << ", " << reduction_name(red)
                                     << (ratio ? ", mask_ratio 0" : ", entropy_threshold -1"));
              const int64_t v = 11, n = numel_of(lead);
              std::mt19937_64 rng(static_cast<uint64_t>(n * 1000 + ignore_index + 500));
              const torch::Tensor logits =
                  tensor_from(random_logits(rng, n, v), with_vocab(lead, v), dtype, torch::kCPU);
              std::vector<int64_t> t = random_targets(rng, n, v, ignore_index, 0.3);
              t[0] = 3;  // at least one valid token, so PyTorch's mean is defined
              const torch::Tensor targets = targets_from(t, lead, torch::kLong, torch::kCPU);
              Opts o;
              o.ignore_index(ignore_index).label_smoothing(eps).reduction(red);
              if (ratio) {
                o.mask_ratio(0.0);
              } else {
                o.entropy_threshold(-1.0);
              }
              torch::Tensor upstream;
              if (red == Reduction::None) upstream = torch::randn(lead, torch::TensorOptions().dtype(dtype));
              const LibRun ours = run_library(logits, targets, o, {}, upstream);

              auto fo = F::CrossEntropyFuncOptions().ignore_index(ignore_index).label_smoothing(eps);
              if (red == Reduction::Sum) {
                fo.reduction(torch::kSum);
              } else if (red == Reduction::None) {
                fo.reduction(torch::kNone);
              } else {
                fo.reduction(torch::kMean);
              }
              torch::Tensor leaf = logits.detach().clone().requires_grad_(true);
              torch::Tensor theirs = F::cross_entropy(leaf.reshape({n, v}), targets.reshape({n}), fo);
              if (red == Reduction::None) {
                theirs = theirs.reshape(lead);
                theirs.backward(upstream);
              } else {
                theirs.backward();
              }
              CHECK(ours.stats.num_kept.item<int64_t>() == ours.stats.num_valid.item<int64_t>());
              CHECK(ours.loss.scalar_type() == theirs.scalar_type());
              CHECK(ours.loss.sizes() == theirs.sizes());
              CHECK(torch::allclose(ours.loss, theirs.detach(), rtol, atol));
              CHECK(torch::allclose(ours.grad, leaf.grad(), rtol, atol));
            }
          }
        }
      }
    }
  }
}

TEST_CASE("Sum equals the sum of the None per-token losses, and MeanKept their mean over kept tokens",
          "[cpu]") {
  std::mt19937_64 rng(5);
  const Shape lead = {3, 9};
  const int64_t v = 17, n = numel_of(lead);
  const torch::Tensor logits = tensor_from(random_logits(rng, n, v), with_vocab(lead, v), torch::kDouble, torch::kCPU);
  const torch::Tensor targets = targets_from(random_targets(rng, n, v, -100, 0.2), lead, torch::kLong, torch::kCPU);
  Opts o = all_options_on();
  o.mask_ratio(0.4);
  const LibRun none = run_library(logits, targets, Opts(o).reduction(Reduction::None), {}, torch::ones(lead, torch::kDouble));
  const LibRun sum = run_library(logits, targets, Opts(o).reduction(Reduction::Sum), {}, {});
  const LibRun mean = run_library(logits, targets, Opts(o).reduction(Reduction::MeanKept), {}, {});
  const LibRun mean_valid = run_library(logits, targets, Opts(o).reduction(Reduction::MeanValid), {}, {});
  const double kept = static_cast<double>(none.stats.num_kept.item<int64_t>());
  const double valid = static_cast<double>(none.stats.num_valid.item<int64_t>());
  REQUIRE(kept > 0);
  CHECK(sum.loss.item<double>() == Approx(none.loss.sum().item<double>()).epsilon(1e-13));
  CHECK(mean.loss.item<double>() == Approx(none.loss.sum().item<double>() / kept).epsilon(1e-13));
  CHECK(mean_valid.loss.item<double>() == Approx(none.loss.sum().item<double>() / valid).epsilon(1e-13));
  CHECK(torch::allclose(sum.grad, none.grad, 1e-13, 1e-15));
  CHECK(torch::allclose(mean.grad, none.grad / kept, 1e-13, 1e-15));
}

TEST_CASE("token_entropy matches the oracle's entropy for every dtype, shape and softcap", "[cpu]") {
  const std::vector<torch::Dtype> dtypes = {torch::kFloat, torch::kBFloat16, torch::kHalf,
                                            torch::kDouble};
  for (torch::Dtype dtype : dtypes) {
    for (const Shape& lead : {Shape{}, Shape{1}, Shape{37}, Shape{3, 5}, Shape{2, 0}}) {
      for (int64_t v : {int64_t(1), int64_t(3), int64_t(130)}) {
        for (double cap : {0.0, 4.0}) {
          INFO(dtype_name(dtype) << " logits " << shape_name(with_vocab(lead, v)) << ", softcap " << cap);
          std::mt19937_64 rng(static_cast<uint64_t>(v * 31 + numel_of(lead)));
          const int64_t n = numel_of(lead);
          const torch::Tensor logits =
              tensor_from(random_logits(rng, n, v), with_vocab(lead, v), dtype, torch::kCPU);
          const torch::Tensor h = slowed::token_entropy(logits, cap);
          CHECK(h.scalar_type() == torch::kFloat);
          CHECK(h.sizes() == at::IntArrayRef(lead));
          CHECK_FALSE(h.requires_grad());
          Opts o;
          o.softcap(cap);
          const OracleRows rows = oracle_rows(as_matrix(logits, n, v), std::vector<int64_t>(size_t(n), 0), o);
          const Mat actual = as_matrix(h, n, 1);
          Mat tol(n, 1);
          for (int64_t i = 0; i < n; ++i)
            tol(i, 0) = tolerance_for(dtype).compute * rows.scale(i) +
                        std::ldexp(1.0, -23) * rows.entropy(i);  // fp32 result
          const std::string msg = compare(actual, rows.entropy, tol, "entropy", dtype_name(dtype) + " token_entropy");
          INFO(msg);
          CHECK(msg.empty());
        }
      }
    }
  }
  // Gradient-free even when the logits require grad.
  torch::Tensor leaf = torch::randn({4, 7}).requires_grad_(true);
  CHECK_FALSE(slowed::token_entropy(leaf).requires_grad());
}

TEST_CASE("stats are 0-dim tensors with the documented dtypes", "[cpu]") {
  const torch::Tensor logits = torch::randn({6, 9});
  const torch::Tensor targets = torch::tensor({1, 2, -100, 4, 5, 6});
  EntropyMaskStats st;
  slowed::entropy_masked_cross_entropy(logits, targets, Opts().mask_ratio(0.5), {}, &st);
  CHECK(st.num_valid.dim() == 0);
  CHECK(st.num_kept.dim() == 0);
  CHECK(st.kept_fraction.dim() == 0);
  CHECK(st.mean_entropy.dim() == 0);
  CHECK(st.threshold.dim() == 0);
  CHECK(st.num_valid.scalar_type() == torch::kLong);
  CHECK(st.num_kept.scalar_type() == torch::kLong);
  CHECK(st.kept_fraction.scalar_type() == torch::kFloat);
  CHECK(st.mean_entropy.scalar_type() == torch::kFloat);
  CHECK(st.threshold.scalar_type() == torch::kFloat);
  CHECK(st.num_valid.item<int64_t>() == 5);
  CHECK(st.num_kept.item<int64_t>() == 3);  // floor(0.5 * 5) = 2 masked
  CHECK(st.kept_fraction.item<float>() == Approx(0.6f));
}

TEST_CASE("the functor keeps the statistics of its last call", "[cpu]") {
  slowed::EntropyMaskedCrossEntropy fn(Opts().mask_ratio(0.5));
  CHECK_FALSE(fn.last_stats().num_valid.defined());
  CHECK_FALSE(fn.last_stats().threshold.defined());
  std::mt19937_64 rng(3);
  const torch::Tensor logits = tensor_from(random_logits(rng, 12, 10), {3, 4, 10}, torch::kFloat, torch::kCPU);
  const torch::Tensor targets = targets_from(random_targets(rng, 12, 10, -100, 0.0), {3, 4}, torch::kLong, torch::kCPU);
  EntropyMaskStats expected;
  const torch::Tensor want =
      slowed::entropy_masked_cross_entropy(logits, targets, fn.options(), {}, &expected);
  const torch::Tensor got = fn(logits, targets);
  CHECK(torch::equal(got, want));
  check_bitwise_equal_stats(fn.last_stats(), expected);
  CHECK(fn.last_stats().num_valid.item<int64_t>() == 12);
  CHECK(fn.last_stats().num_kept.item<int64_t>() == 6);

  // A second call replaces the stats; forward() is operator().
  torch::Tensor fewer = targets.clone();
  fewer.index_put_({0}, -100);
  fn.forward(logits, fewer);
  CHECK(fn.last_stats().num_valid.item<int64_t>() == 8);
  CHECK(fn.last_stats().num_kept.item<int64_t>() == 4);
  // The options are reachable and mutable.
  fn.options().mask_ratio(0.0);
  fn(logits, fewer);
  CHECK(fn.last_stats().num_kept.item<int64_t>() == 8);
}

TEST_CASE("two calls give bitwise identical loss, gradient and stats", "[cpu]") {
  check_determinism(torch::kCPU);
}

TEST_CASE("two calls on CUDA give bitwise identical loss, gradient and stats", "[cuda]") {
  if (!cuda_or_warn()) return;
  check_determinism(torch::Device(torch::kCUDA, 0));
}

TEST_CASE("reference entropies change the keep decision but not the loss formula", "[cpu]") {
  std::mt19937_64 rng(11);
  const int64_t n = 24, v = 9;
  const torch::Tensor logits = tensor_from(random_logits(rng, n, v), {n, v}, torch::kDouble, torch::kCPU);
  const torch::Tensor targets = targets_from(random_targets(rng, n, v, -100, 0.0), {n}, torch::kLong, torch::kCPU);
  Opts o = all_options_on();
  o.reduction(Reduction::None);
  const torch::Tensor ones = torch::ones({n}, torch::kDouble);
  // Everything kept: the per-token losses and gradient rows.
  const LibRun all = run_library(logits, targets, Opts(o).entropy_threshold(-1.0), {}, ones);
  const torch::Tensor h = slowed::token_entropy(logits, o.softcap());
  // Reference entropies in the reverse order of the current ones, threshold at their median.
  const torch::Tensor ref = (h.max() + h.min() - h).to(torch::kFloat);
  const double thr = ref.median().item<double>() + 1e-4;
  const torch::Tensor keep_by_ref = ref >= thr;
  const torch::Tensor keep_by_current = h >= thr;
  REQUIRE_FALSE(torch::equal(keep_by_ref, keep_by_current));
  for (torch::Dtype ref_dtype : {torch::kFloat, torch::kDouble}) {
    INFO("reference dtype " << dtype_name(ref_dtype));
    const LibRun with_ref = run_library(logits, targets, Opts(o).entropy_threshold(thr), ref.to(ref_dtype), ones);
    const LibRun without = run_library(logits, targets, Opts(o).entropy_threshold(thr), {}, ones);
    CHECK(with_ref.stats.num_kept.item<int64_t>() == keep_by_ref.sum().item<int64_t>());
    CHECK(without.stats.num_kept.item<int64_t>() == keep_by_current.sum().item<int64_t>());
    // Same formula, other tokens: the kept per-token losses and gradient rows are those of the
    // unmasked call, bit for bit.
    CHECK(torch::equal(with_ref.loss, torch::where(keep_by_ref, all.loss, torch::zeros_like(all.loss))));
    CHECK(torch::equal(with_ref.grad,
                       torch::where(keep_by_ref.unsqueeze(1), all.grad, torch::zeros_like(all.grad))));
    // mean_entropy stays the current model's.
    CHECK(torch::equal(with_ref.stats.mean_entropy, without.stats.mean_entropy));
  }
  // Ratio mode masks the lowest reference entropies.
  const LibRun ratio = run_library(logits, targets, Opts(o).mask_ratio(0.25), ref, ones);
  CHECK(ratio.stats.num_kept.item<int64_t>() == n - 6);
  const torch::Tensor masked = ratio.loss == 0;
  const torch::Tensor lowest = std::get<1>(ref.sort()).slice(0, 0, 6);
  CHECK(masked.index_select(0, lowest).all().item<bool>());
  CHECK(ratio.stats.threshold.item<float>() == std::get<0>(ref.sort())[6].item<float>());
}

TEST_CASE("a scalar upstream gradient scales the gradient; no grad needed gives the same loss",
          "[cpu]") {
  std::mt19937_64 rng(13);
  const torch::Tensor logits = tensor_from(random_logits(rng, 10, 6), {10, 6}, torch::kFloat, torch::kCPU);
  const torch::Tensor targets = targets_from(random_targets(rng, 10, 6, -100, 0.2), {10}, torch::kLong, torch::kCPU);
  const Opts o = all_options_on();
  const LibRun one = run_library(logits, targets, o, {}, {});
  const LibRun three = run_library(logits, targets, o, {}, torch::full({}, 3.0));
  CHECK(torch::allclose(three.grad, 3.0 * one.grad, 1e-6, 1e-8));
  EntropyMaskStats st;
  const torch::Tensor plain = slowed::entropy_masked_cross_entropy(logits, targets, o, {}, &st);
  CHECK_FALSE(plain.requires_grad());
  CHECK(torch::equal(plain, one.loss));
  check_bitwise_equal_stats(st, one.stats);
}

TEST_CASE("Ratio mode keeps ties at the threshold, so at most floor(q * n_valid) tokens are masked",
          "[cpu]") {
  const torch::Tensor logits = torch::randn({7, 5});
  const torch::Tensor targets = torch::tensor({0, 1, 2, 3, 4, 0, -100});
  // Decision values with exact ties; the last token is ignored (its value never counts).
  const torch::Tensor ref = torch::tensor({0.5f, 0.5f, 0.5f, 1.0f, 1.0f, 2.0f, 0.0f});
  EntropyMaskStats st;
  // k = floor(0.5 * 6) = 3: threshold = 4th smallest = 1.0, the three 0.5 are masked.
  slowed::entropy_masked_cross_entropy(logits, targets, Opts().mask_ratio(0.5), ref, &st);
  CHECK(st.num_valid.item<int64_t>() == 6);
  CHECK(st.num_kept.item<int64_t>() == 3);
  CHECK(st.threshold.item<float>() == 1.0f);
  // k = floor(0.34 * 6) = 2: threshold = 3rd smallest = 0.5, tied with the two below: all kept.
  slowed::entropy_masked_cross_entropy(logits, targets, Opts().mask_ratio(0.34), ref, &st);
  CHECK(st.num_kept.item<int64_t>() == 6);
  CHECK(st.threshold.item<float>() == 0.5f);
  // k = floor(0.6 * 6) = 3 again (not 4): the two 1.0 tie at the threshold and stay.
  slowed::entropy_masked_cross_entropy(logits, targets, Opts().mask_ratio(0.6), ref, &st);
  CHECK(st.num_kept.item<int64_t>() == 3);
  // k = n_valid: threshold +inf, everything masked; loss 0.
  const torch::Tensor loss =
      slowed::entropy_masked_cross_entropy(logits, targets, Opts().mask_ratio(1.0), ref, &st);
  CHECK(st.num_kept.item<int64_t>() == 0);
  CHECK(std::isinf(st.threshold.item<float>()));
  CHECK(loss.item<float>() == 0.0f);
}

TEST_CASE("2-D non-contiguous logits (transposed, column slice) give the same loss and gradient",
          "[cpu]") {
  // Regression: the gradient buffer once inherited the logits' transposed strides while the
  // fused kernel wrote it as row-major [N, V] (wrong gradient, right loss).
  std::mt19937_64 rng(19);
  const int64_t n = 6, v = 11;
  for (torch::Dtype dtype : {torch::kFloat, torch::kBFloat16, torch::kDouble}) {
    for (bool reference_path : {false, true}) {
      for (Reduction red : {Reduction::MeanKept, Reduction::None}) {
        const torch::Tensor logits = tensor_from(random_logits(rng, n, v), {n, v}, dtype, torch::kCPU);
        const torch::Tensor targets = targets_from(random_targets(rng, n, v, -100, 0.2), {n}, torch::kLong, torch::kCPU);
        Opts o = all_options_on();
        o.mask_ratio(0.3).reduction(red).use_reference(reference_path);
        torch::Tensor upstream;
        if (red == Reduction::None) upstream = torch::randn({n}, torch::TensorOptions().dtype(loss_dtype_for(dtype)));
        const LibRun want = run_library(logits, targets, o, {}, upstream);
        for (int layout = 0; layout < 2; ++layout) {
          INFO(dtype_name(dtype) << (reference_path ? ", use_reference(true)" : ", default path") << ", "
                                 << reduction_name(red) << (layout == 0 ? ", transposed storage" : ", column slice"));
          // Same values: [v, n] storage transposed, or the first v columns of an [n, v + 5] tensor.
          torch::Tensor leaf = layout == 0
                                   ? logits.t().contiguous().t()
                                   : torch::cat({logits, torch::zeros({n, 5}, logits.options())}, 1).narrow(1, 0, v);
          leaf = leaf.detach().requires_grad_(true);
          REQUIRE_FALSE(leaf.is_contiguous());
          torch::Tensor loss = slowed::entropy_masked_cross_entropy(leaf, targets, o);
          if (upstream.defined()) {
            loss.backward(upstream);
          } else {
            loss.backward();
          }
          // Not bitwise: ATen's reductions may sum in another order for another layout.
          const Tolerance tol = tolerance_for(dtype);
          const double loss_err = (loss.detach() - want.loss).abs().max().item<double>();
          INFO("max |loss difference| " << loss_err);
          CHECK(loss_err <= tol.compute * (1.0 + want.loss.abs().max().item<double>()) * 10);
          REQUIRE(leaf.grad().defined());
          const torch::Tensor g = leaf.grad().to(torch::kDouble), w = want.grad.to(torch::kDouble);
          const double grad_err = (g - w).abs().max().item<double>();
          INFO("max |grad difference| " << grad_err << ", max |grad| " << w.abs().max().item<double>());
          CHECK(grad_err <= (2 * tol.out_rtol + tol.compute) * w.abs().max().item<double>());
        }
      }
    }
  }
}

TEST_CASE("non-contiguous logits and targets give the same loss and gradient as contiguous ones",
          "[cpu]") {
  std::mt19937_64 rng(17);
  const int64_t b = 3, t = 6, v = 17;
  const torch::Tensor logits = tensor_from(random_logits(rng, b * t, v), {b, t, v}, torch::kFloat, torch::kCPU);
  const torch::Tensor targets = targets_from(random_targets(rng, b * t, v, -100, 0.2), {b, t}, torch::kLong, torch::kCPU);
  // Same values, transposed storage: [t, b, v] -> transpose(0, 1) is [b, t, v], not contiguous.
  const torch::Tensor logits_nc = logits.transpose(0, 1).contiguous().transpose(0, 1);
  const torch::Tensor targets_nc = targets.t().contiguous().t();
  REQUIRE_FALSE(logits_nc.is_contiguous());
  REQUIRE_FALSE(targets_nc.is_contiguous());
  for (Reduction red : {Reduction::MeanKept, Reduction::None}) {
    INFO(reduction_name(red));
    Opts o = all_options_on();
    o.mask_ratio(0.3).reduction(red);
    torch::Tensor upstream;
    if (red == Reduction::None) upstream = torch::randn({b, t});
    const LibRun a = run_library(logits, targets, o, {}, upstream);
    torch::Tensor leaf = logits_nc.detach().clone();  // clone keeps the strides
    leaf = leaf.as_strided(logits_nc.sizes(), logits_nc.strides()).detach().requires_grad_(true);
    torch::Tensor loss = slowed::entropy_masked_cross_entropy(leaf, targets_nc, o);
    if (upstream.defined()) {
      loss.backward(upstream);
    } else {
      loss.backward();
    }
    CHECK(torch::equal(loss.detach(), a.loss));
    CHECK(torch::equal(leaf.grad(), a.grad));
  }
}

TEST_CASE("in-place backward through a linear layer gives the same weight gradient", "[cpu]") {
  // The real use: logits are the output of the LM head, not a leaf.
  torch::manual_seed(0);
  const torch::Tensor hidden = torch::randn({2, 9, 16});
  const torch::Tensor targets = torch::randint(0, 33, {2, 9});
  const torch::Tensor w0 = torch::randn({33, 16}) * 0.5;
  for (Reduction red : {Reduction::MeanKept, Reduction::None}) {
    INFO(reduction_name(red));
    torch::Tensor grads[2];
    torch::Tensor losses[2];
    const torch::Tensor upstream = torch::randn({2, 9});
    for (int inplace = 0; inplace < 2; ++inplace) {
      torch::Tensor w = w0.clone().requires_grad_(true);
      torch::Tensor logits = torch::matmul(hidden, w.t());  // [2, 9, 33], non-leaf
      Opts o = all_options_on();
      o.mask_ratio(0.25).reduction(red).inplace_backward(inplace == 1);
      torch::Tensor loss = slowed::entropy_masked_cross_entropy(logits, targets, o);
      losses[inplace] = loss.detach().clone();
      if (red == Reduction::None) {
        loss.backward(upstream);
      } else {
        loss.backward();
      }
      grads[inplace] = w.grad();
    }
    CHECK(torch::equal(losses[0], losses[1]));
    REQUIRE(grads[1].defined());
    CHECK(torch::allclose(grads[0], grads[1], 1e-6, 1e-7));
  }
}

TEST_CASE("in-place backward over logits that autograd saved is reported by the version check",
          "[cpu]") {
  // docs/design.md: "The write bumps the logits' version counter, so if anything else saved the
  // logits for its backward, autograd raises its usual 'modified by an inplace operation' error
  // instead of computing garbage." Checked on both paths.
  // Regression: the fused kernel writes through data_ptr, which does not bump the version
  // counter by itself; the public layer bumps it.
  for (torch::Dtype dtype : {torch::kFloat, torch::kBFloat16, torch::kDouble}) {
    for (bool reference_path : {false, true}) {
      INFO(dtype_name(dtype) << (reference_path ? ", use_reference(true)" : ", default path"));
      torch::Tensor x = torch::randn({4, 6}, torch::TensorOptions().dtype(dtype)).requires_grad_(true);
      torch::Tensor logits = torch::exp(x);  // exp's backward needs its output: the logits
      const int64_t version_before = logits._version();
      torch::Tensor loss = slowed::entropy_masked_cross_entropy(
          logits, torch::tensor({0, 1, 2, 3}),
          Opts().entropy_threshold(-1.0).inplace_backward(true).use_reference(reference_path));
      CHECK(logits._version() > version_before);
      CHECK_THROWS_WITH(loss.backward(), Catch::Contains("modified by an inplace operation"));
    }
  }
}

TEST_CASE("finite logits near FLT_MAX pass the checks on every path and agree with the reference",
          "[cpu]") {
  // Regression: the fused kernel flagged a row as non-finite when the plain sum of its logits
  // (kept for label smoothing) overflowed to +Inf, although every logit is finite. V = 11: the
  // large values sit in the 8-lane part and in the tail.
  const float big = 3.0e38f;
  std::vector<float> rows = {
      big, 2.0e38f, 0, 1, 2, 3, 4, 5, 1, 2, 3,             // the vector lanes' sum overflows
      0, 1, 2, 3, 4, 5, 6, 7, 3.2e38f, 3.3e38f, -3.3e38f,  // the tail's sum overflows
      -big, -big, -big, -big, -big, -big, -big, -big, -big, -big, 1,  // -Inf sum: valid too
  };
  const torch::Tensor targets = torch::tensor({1, 8, 10});
  for (torch::Dtype dtype : {torch::kFloat, torch::kBFloat16}) {
    INFO(dtype_name(dtype));
    const torch::Tensor logits = torch::from_blob(rows.data(), {3, 11}, torch::kFloat).to(dtype);
    torch::Tensor out[2], grad[2];
    for (int reference = 0; reference < 2; ++reference) {
      torch::Tensor leaf = logits.clone().requires_grad_(true);
      out[reference] = slowed::entropy_masked_cross_entropy(
          leaf, targets,
          Opts().entropy_threshold(-1.0).reduction(Reduction::None).use_reference(reference == 1));
      out[reference].sum().backward();
      grad[reference] = leaf.grad().to(torch::kFloat);
    }
    REQUIRE(torch::isfinite(out[0]).all().item<bool>());
    CHECK(torch::allclose(out[0], out[1], 1e-6, 0.0));
    CHECK(torch::allclose(grad[0], grad[1], 0.0, 1e-6));
    // One-hot rows: the loss is the gap between the largest logit and the target's.
    CHECK(out[1][0].item<float>() == Approx(static_cast<double>(big) - 2.0e38).epsilon(0.05));
  }
}

TEST_CASE("a -Inf logit at the target gives loss +Inf and torch's gradient, as cross_entropy does",
          "[cpu]") {
  // check_inputs accepts -Inf logits (masked vocabulary entries); at the target the token's
  // loss is +Inf, with a finite gradient p - onehot (torch: the same).
  const float inf = std::numeric_limits<float>::infinity();
  const torch::Tensor logits = torch::tensor({{0.f, -inf, 1.f, 0.5f}, {2.f, 1.f, -inf, 0.f}});
  const torch::Tensor targets = torch::tensor({1, 0});
  torch::Tensor ref_leaf = logits.clone().requires_grad_(true);
  torch::Tensor ref = torch::nn::functional::cross_entropy(
      ref_leaf, targets, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
  ref.backward();
  for (bool reference : {false, true}) {
    INFO("use_reference " << reference);
    torch::Tensor leaf = logits.clone().requires_grad_(true);
    torch::Tensor per_token = slowed::entropy_masked_cross_entropy(
        leaf, targets,
        Opts().entropy_threshold(-1.0).reduction(Reduction::None).use_reference(reference));
    CHECK(per_token[0].item<float>() == inf);
    CHECK(per_token[1].item<float>() == Approx(std::log(1.0 + std::exp(-1.0) + std::exp(-2.0))));
    per_token.sum().backward();
    CHECK(torch::allclose(leaf.grad(), ref_leaf.grad(), 1e-6, 1e-7));
  }
}

TEST_CASE("in-place backward over a leaf (or a view of one) gives .grad storage of its own",
          "[cpu]") {
  // Regression: leaf.grad shared the leaf's storage (the gradient written over the values).
  torch::manual_seed(3);
  const torch::Tensor x = torch::randn({6, 9});
  const torch::Tensor targets = torch::tensor({0, 1, 2, 3, 4, 5});
  torch::Tensor expected_leaf = x.clone().requires_grad_(true);
  slowed::entropy_masked_cross_entropy(expected_leaf, targets, Opts().entropy_threshold(-1.0))
      .backward();
  for (bool reference : {false, true}) {
    for (bool view : {false, true}) {
      INFO("use_reference " << reference << ", view " << view);
      torch::Tensor leaf = (view ? x.reshape({2, 3, 9}) : x).clone().requires_grad_(true);
      torch::Tensor logits = view ? leaf.view({6, 9}) : leaf;
      slowed::entropy_masked_cross_entropy(
          logits, targets,
          Opts().entropy_threshold(-1.0).inplace_backward(true).use_reference(reference))
          .backward();
      REQUIRE(leaf.grad().defined());
      CHECK(leaf.grad().data_ptr() != leaf.data_ptr());
      CHECK(torch::allclose(leaf.grad().reshape({6, 9}), expected_leaf.grad(), 1e-6, 1e-7));
    }
  }
}

TEST_CASE("a loss call on logits an in-place call already overwrote throws; other bytes do not",
          "[cpu]") {
  // Regression: the second call read the first call's gradient as logits and returned a wrong
  // loss silently.
  torch::manual_seed(4);
  const torch::Tensor hidden = torch::randn({2, 5, 8});
  const torch::Tensor targets = torch::randint(0, 13, {5});
  const auto opts = Opts().entropy_threshold(-1.0);
  for (bool reference : {false, true}) {
    INFO("use_reference " << reference);
    torch::Tensor w = torch::randn({13, 8}).requires_grad_(true);
    torch::Tensor both = torch::matmul(hidden, w.t());  // [2, 5, 13], computed
    const torch::Tensor fresh = both.detach().clone();
    torch::Tensor first = both.select(0, 0);
    torch::Tensor loss = slowed::entropy_masked_cross_entropy(
        first, targets, Opts(opts).inplace_backward(true).use_reference(reference));
    const auto needle = Catch::Contains("logits: expected logits, got a tensor whose values");
    CHECK_THROWS_WITH(slowed::entropy_masked_cross_entropy(first, targets, opts), needle);
    CHECK_THROWS_WITH(slowed::token_entropy(first), needle);
    // The other half of the same storage still holds logits.
    const torch::Tensor second = slowed::entropy_masked_cross_entropy(both.select(0, 1), targets, opts);
    CHECK(torch::allclose(second,
                          slowed::entropy_masked_cross_entropy(fresh.select(0, 1), targets, opts)));
    loss.backward();
    CHECK_THROWS_WITH(slowed::entropy_masked_cross_entropy(first, targets, opts), needle);
    // Written again (a version bump): logits once more.
    {
      torch::NoGradGuard no_grad;
      first.copy_(fresh.select(0, 0));
    }
    CHECK(torch::allclose(slowed::entropy_masked_cross_entropy(first.detach(), targets, opts),
                          slowed::entropy_masked_cross_entropy(fresh.select(0, 0), targets, opts)));
  }
}

TEST_CASE("Reduction::None composes with autograd and honours any upstream gradient", "[cpu]") {
  std::mt19937_64 rng(23);
  const Shape lead = {4, 8};
  const int64_t v = 17, n = numel_of(lead);
  const torch::Tensor logits = tensor_from(random_logits(rng, n, v), with_vocab(lead, v), torch::kDouble, torch::kCPU);
  const torch::Tensor targets = targets_from(random_targets(rng, n, v, -100, 0.2), lead, torch::kLong, torch::kCPU);
  Opts o = all_options_on();
  o.mask_ratio(0.4);
  const LibRun mean = run_library(logits, targets, Opts(o).reduction(Reduction::MeanKept), {}, {});
  for (bool inplace : {false, true}) {
    INFO("inplace_backward " << inplace);
    // (loss * keep / n_kept).sum(): the upstream reaching the loss is an expanded (stride-0)
    // tensor times a mask.
    torch::Tensor leaf = logits.clone().requires_grad_(true);
    EntropyMaskStats st;
    torch::Tensor per_token = slowed::entropy_masked_cross_entropy(
        leaf, targets, Opts(o).reduction(Reduction::None).inplace_backward(inplace), {}, &st);
    const double kept = static_cast<double>(st.num_kept.item<int64_t>());
    (per_token.sum() / kept).backward();
    CHECK(torch::allclose(leaf.grad(), mean.grad, 1e-12, 1e-14));
    // A non-contiguous upstream gradient.
    torch::Tensor leaf2 = logits.clone().requires_grad_(true);
    torch::Tensor per_token2 = slowed::entropy_masked_cross_entropy(
        leaf2, targets, Opts(o).reduction(Reduction::None).inplace_backward(inplace));
    const torch::Tensor up = torch::randn({lead[1], lead[0]}, torch::kDouble).t();
    REQUIRE_FALSE(up.is_contiguous());
    per_token2.backward(up);
    torch::Tensor leaf3 = logits.clone().requires_grad_(true);
    torch::Tensor per_token3 = slowed::entropy_masked_cross_entropy(
        leaf3, targets, Opts(o).reduction(Reduction::None).inplace_backward(inplace));
    per_token3.backward(up.contiguous());
    CHECK(torch::equal(leaf2.grad(), leaf3.grad()));
  }
}

TEST_CASE("a second backward through one call (retain_graph) accumulates or throws, never corrupts",
          "[cpu]") {
  // PyTorch convention: with retain_graph the second backward adds the same gradient again. The
  // library may instead refuse (it scales its saved gradient in place); both are acceptable, a
  // silently wrong second gradient is not.
  for (torch::Dtype dtype : {torch::kFloat, torch::kDouble}) {
    for (bool reference_path : {false, true}) {
      INFO(dtype_name(dtype) << (reference_path ? ", use_reference(true)" : ", default path"));
      const torch::Tensor x = torch::randn({5, 7}, torch::TensorOptions().dtype(dtype));
      const torch::Tensor targets = torch::tensor({0, 1, 2, 3, 4});
      torch::Tensor leaf = x.clone().requires_grad_(true);
      torch::Tensor loss = slowed::entropy_masked_cross_entropy(
          leaf, targets, Opts().entropy_threshold(-1.0).use_reference(reference_path));
      loss.backward({}, /*retain_graph=*/true);
      const torch::Tensor once = leaf.grad().clone();
      bool threw = false;
      try {
        loss.backward();
      } catch (const c10::Error& e) {
        threw = true;
        CHECK_THAT(e.what(), Catch::Contains("backward"));
      }
      if (threw) {
        CHECK(torch::equal(leaf.grad(), once));  // the failed backward left .grad alone
      } else {
        CHECK(torch::allclose(leaf.grad(), 2.0 * once, 1e-6, 1e-8));
      }
    }
  }
}

// ================================================================================================
// Errors
// ================================================================================================

TEST_CASE("bad logits, targets and reference entropies throw c10::Error naming the argument",
          "[cpu]") {
  namespace sl = slowed;
  const torch::Tensor logits = torch::randn({4, 5});
  const torch::Tensor targets = torch::tensor({0, 1, 2, 3});

  SECTION("logits of rank 1 or 4") {
    REQUIRE_THROWS_AS(sl::entropy_masked_cross_entropy(torch::randn({5}), torch::tensor({0})), c10::Error);
    REQUIRE_THROWS_WITH(sl::entropy_masked_cross_entropy(torch::randn({5}), torch::tensor({0})),
                        Catch::Contains("logits") && Catch::Contains("[5]"));
    REQUIRE_THROWS_WITH(sl::entropy_masked_cross_entropy(torch::randn({2, 2, 2, 5}), torch::zeros({2, 2, 2}, torch::kLong)),
                        Catch::Contains("logits") && Catch::Contains("[2, 2, 2, 5]"));
  }
  SECTION("integer logits") {
    REQUIRE_THROWS_WITH(sl::entropy_masked_cross_entropy(torch::zeros({4, 5}, torch::kLong), targets),
                        Catch::Contains("logits"));
  }
  SECTION("targets whose shape does not match the logits") {
    REQUIRE_THROWS_AS(sl::entropy_masked_cross_entropy(logits, torch::tensor({0, 1, 2})), c10::Error);
    REQUIRE_THROWS_WITH(sl::entropy_masked_cross_entropy(logits, torch::tensor({0, 1, 2})),
                        Catch::Contains("targets") && Catch::Contains("[3]"));
    REQUIRE_THROWS_WITH(sl::entropy_masked_cross_entropy(torch::randn({2, 3, 5}), torch::zeros({3, 2}, torch::kLong)),
                        Catch::Contains("targets"));
  }
  SECTION("float targets") {
    REQUIRE_THROWS_AS(sl::entropy_masked_cross_entropy(logits, torch::zeros({4})), c10::Error);
    REQUIRE_THROWS_WITH(sl::entropy_masked_cross_entropy(logits, torch::zeros({4})),
                        Catch::Contains("targets") && Catch::Contains("Float"));
  }
  SECTION("a target out of range names its value") {
    REQUIRE_THROWS_AS(sl::entropy_masked_cross_entropy(logits, torch::tensor({0, 5, 1, 2})), c10::Error);
    REQUIRE_THROWS_WITH(sl::entropy_masked_cross_entropy(logits, torch::tensor({0, 5, 1, 2})),
                        Catch::Contains("targets") && Catch::Contains("got 5 ") &&
                            Catch::Contains("flat position 1"));
    REQUIRE_THROWS_WITH(sl::entropy_masked_cross_entropy(logits, torch::tensor({0, 1, 2, -5})),
                        Catch::Contains("targets") && Catch::Contains("got -5 "));
    // int32 targets and [B, T, V] logits too.
    REQUIRE_THROWS_WITH(sl::entropy_masked_cross_entropy(torch::randn({2, 2, 5}),
                                                         torch::tensor({0, 1, 7, 2}, torch::kInt).reshape({2, 2})),
                        Catch::Contains("targets") && Catch::Contains("got 7 "));
    // -100 is ignore_index and accepted; with another ignore_index it is out of range.
    CHECK_NOTHROW(sl::entropy_masked_cross_entropy(logits, torch::tensor({0, -100, 1, 2})));
    REQUIRE_THROWS_WITH(sl::entropy_masked_cross_entropy(logits, torch::tensor({0, -100, 1, 2}), Opts().ignore_index(-1)),
                        Catch::Contains("targets") && Catch::Contains("got -100 "));
  }
  SECTION("no classes (V = 0)") {
    REQUIRE_THROWS_AS(sl::entropy_masked_cross_entropy(torch::randn({3, 0}), torch::tensor({0, 0, 0})), c10::Error);
    REQUIRE_THROWS_WITH(sl::entropy_masked_cross_entropy(torch::randn({3, 0}), torch::tensor({0, 0, 0})),
                        Catch::Contains("logits") && Catch::Contains("V >= 1"));
    REQUIRE_THROWS_WITH(sl::token_entropy(torch::randn({3, 0})), Catch::Contains("logits"));
  }
  SECTION("NaN or infinite logits") {
    torch::Tensor bad = logits.clone();
    bad.index_put_({2, 3}, kNaN);
    REQUIRE_THROWS_AS(sl::entropy_masked_cross_entropy(bad, targets), c10::Error);
    REQUIRE_THROWS_WITH(sl::entropy_masked_cross_entropy(bad, targets),
                        Catch::Contains("logits") && Catch::Contains("row 2"));
    bad = logits.clone();
    bad.index_put_({1, 0}, kInf);
    REQUIRE_THROWS_WITH(sl::entropy_masked_cross_entropy(bad, targets), Catch::Contains("logits"));
    // A NaN in a row whose target is ignored is still an error (the row's entropy is undefined).
    bad = logits.clone();
    bad.index_put_({3, 1}, kNaN);
    REQUIRE_THROWS_WITH(sl::entropy_masked_cross_entropy(bad, torch::tensor({0, 1, 2, -100})),
                        Catch::Contains("logits"));
  }
  SECTION("reference entropies of the wrong shape, dtype or with NaN at a valid token") {
    REQUIRE_THROWS_AS(sl::entropy_masked_cross_entropy(logits, targets, {}, torch::zeros({5})), c10::Error);
    REQUIRE_THROWS_WITH(sl::entropy_masked_cross_entropy(logits, targets, {}, torch::zeros({5})),
                        Catch::Contains("reference_entropy") && Catch::Contains("[5]"));
    REQUIRE_THROWS_WITH(sl::entropy_masked_cross_entropy(logits, targets, {}, torch::zeros({4, 1})),
                        Catch::Contains("reference_entropy"));
    REQUIRE_THROWS_WITH(sl::entropy_masked_cross_entropy(logits, targets, {}, torch::zeros({4}, torch::kLong)),
                        Catch::Contains("reference_entropy"));
    torch::Tensor ref = torch::ones({4});
    ref.index_put_({2}, kNaN);
    REQUIRE_THROWS_WITH(sl::entropy_masked_cross_entropy(logits, targets, {}, ref),
                        Catch::Contains("reference_entropy"));
    // ... but NaN at an ignored token is fine.
    CHECK_NOTHROW(sl::entropy_masked_cross_entropy(logits, torch::tensor({0, 1, -100, 3}), {}, ref));
  }
  SECTION("in-place backward on non-contiguous logits") {
    torch::Tensor t = torch::randn({5, 4}).t().requires_grad_(true);  // [4, 5], not contiguous
    REQUIRE_THROWS_WITH(sl::entropy_masked_cross_entropy(t, targets, Opts().inplace_backward(true)),
                        Catch::Contains("logits") && Catch::Contains("contiguous"));
  }
}

TEST_CASE("option setters reject bad values with c10::Error naming the option", "[cpu]") {
  REQUIRE_THROWS_AS(Opts().entropy_threshold(kNaN), c10::Error);
  REQUIRE_THROWS_WITH(Opts().entropy_threshold(kNaN), Catch::Contains("entropy_threshold"));
  REQUIRE_THROWS_WITH(Opts().entropy_threshold(kInf), Catch::Contains("entropy_threshold"));
  REQUIRE_THROWS_WITH(Opts().entropy_threshold(-kInf), Catch::Contains("entropy_threshold"));
  REQUIRE_THROWS_AS(Opts().mask_ratio(1.5), c10::Error);
  REQUIRE_THROWS_WITH(Opts().mask_ratio(1.5), Catch::Contains("mask_ratio") && Catch::Contains("1.5"));
  REQUIRE_THROWS_WITH(Opts().mask_ratio(-0.1), Catch::Contains("mask_ratio"));
  REQUIRE_THROWS_WITH(Opts().mask_ratio(kNaN), Catch::Contains("mask_ratio"));
  REQUIRE_THROWS_AS(Opts().label_smoothing(-0.1), c10::Error);
  REQUIRE_THROWS_WITH(Opts().label_smoothing(-0.1), Catch::Contains("label_smoothing") && Catch::Contains("-0.1"));
  REQUIRE_THROWS_WITH(Opts().label_smoothing(1.5), Catch::Contains("label_smoothing"));
  REQUIRE_THROWS_AS(Opts().softcap(-1.0), c10::Error);
  REQUIRE_THROWS_WITH(Opts().softcap(-1.0), Catch::Contains("softcap"));
  REQUIRE_THROWS_WITH(Opts().softcap(kInf), Catch::Contains("softcap"));
  REQUIRE_THROWS_AS(Opts().lse_square_scale(kNaN), c10::Error);
  REQUIRE_THROWS_WITH(Opts().lse_square_scale(kNaN), Catch::Contains("lse_square_scale"));
  REQUIRE_THROWS_WITH(Opts().lse_square_scale(-1.0), Catch::Contains("lse_square_scale"));
  REQUIRE_THROWS_WITH(slowed::token_entropy(torch::randn({2, 3}), kNaN), Catch::Contains("softcap"));
  // Boundary values are accepted.
  CHECK_NOTHROW(Opts().mask_ratio(0.0).mask_ratio(1.0).label_smoothing(0.0).label_smoothing(1.0));
  CHECK_NOTHROW(Opts().softcap(0.0).lse_square_scale(0.0).entropy_threshold(-1e300));
  // A failed setter leaves the options as they were.
  Opts o;
  o.entropy_threshold(0.7);
  CHECK_THROWS(o.mask_ratio(2.0));
  CHECK(o.threshold_mode() == ThresholdMode::Absolute);
  CHECK(o.entropy_threshold() == 0.7);
}

TEST_CASE("logits and targets on different devices throw c10::Error naming targets", "[cuda]") {
  if (!cuda_or_warn()) return;
  const torch::Tensor logits = torch::randn({4, 5}, torch::Device(torch::kCUDA, 0));
  const torch::Tensor targets = torch::tensor({0, 1, 2, 3});
  REQUIRE_THROWS_AS(slowed::entropy_masked_cross_entropy(logits, targets), c10::Error);
  REQUIRE_THROWS_WITH(slowed::entropy_masked_cross_entropy(logits, targets),
                      Catch::Contains("targets") && Catch::Contains("cuda"));
  REQUIRE_THROWS_WITH(slowed::entropy_masked_cross_entropy(logits, targets.to(logits.device()), {},
                                                           torch::zeros({4})),
                      Catch::Contains("reference_entropy"));
}

TEST_CASE("the kept CPU gradient buffer is reused only when no tensor holds it", "[cpu]") {
  // reuse_gradient_buffer (default on): the fused CPU path writes its gradient into the buffer of
  // an earlier call once autograd and every caller have let go of it, never into a gradient
  // someone still holds; results are bitwise those of fresh buffers.
  slowed::release_gradient_buffer();
  const int64_t n = 48, v = 33;
  const torch::Tensor targets = torch::randint(0, v, {n}, torch::kLong);
  const Opts on = Opts().entropy_threshold(0.5);
  const Opts off = Opts(on).reuse_gradient_buffer(false);
  auto logits_of = [&](int seed) {
    torch::manual_seed(seed);
    return (torch::randn({n, v}) * 2.0).requires_grad_(true);
  };
  auto grad_of = [&](const torch::Tensor& x, const Opts& o) {
    slowed::entropy_masked_cross_entropy(x, targets, o).backward();
    return x.grad();
  };
  auto expected = [&](int seed) { return grad_of(logits_of(seed), off).clone(); };

  torch::Tensor x1 = logits_of(1);
  torch::Tensor g1 = grad_of(x1, on);  // fresh; the workspace keeps its storage
  const void* kept = g1.data_ptr();
  const torch::Tensor g1_copy = g1.clone();
  CHECK(torch::equal(g1, expected(1)));
  CHECK(slowed::detail::GradientWorkspace::instance().bytes() >= n * v * 4);

  // g1 (x1.grad) still holds the kept buffer: the next call must not write into it.
  torch::Tensor x2 = logits_of(2);
  torch::Tensor g2 = grad_of(x2, on);
  CHECK(g2.data_ptr() != kept);
  CHECK(torch::equal(g1, g1_copy));
  CHECK(torch::equal(g2, expected(2)));

  // Every holder gone (the leaf's .grad and our copies of it): the next call reuses the buffer.
  x1.mutable_grad() = torch::Tensor();
  g1 = torch::Tensor();
  torch::Tensor x3 = logits_of(3);
  torch::Tensor g3 = grad_of(x3, on);
  CHECK(g3.data_ptr() == kept);
  CHECK(torch::equal(g3, expected(3)));
  CHECK(torch::equal(g2, expected(2)));  // the busy call's own buffer was not touched either
  x3.mutable_grad() = torch::Tensor();
  g3 = torch::Tensor();

  // Opting out never hands the kept buffer out.
  torch::Tensor x4 = logits_of(4);
  CHECK(grad_of(x4, off).data_ptr() != kept);

  // A smaller call reuses it too; a larger one replaces the free buffer with its own.
  {
    torch::Tensor small = torch::randn({n / 2, v}).requires_grad_(true);
    slowed::entropy_masked_cross_entropy(small, targets.slice(0, 0, n / 2), on).backward();
    CHECK(small.grad().data_ptr() == kept);
    CHECK(small.grad().sizes() == small.sizes());
  }
  {
    torch::Tensor large = torch::randn({2 * n, v}).requires_grad_(true);
    slowed::entropy_masked_cross_entropy(large, targets.repeat({2}), on).backward();
    CHECK(slowed::detail::GradientWorkspace::instance().bytes() == 2 * n * v * 4);
  }

  // Through a layer (the trainer's case): the logits' gradient is consumed inside backward, so
  // every step after the first reuses the buffer; the weights' gradients are bitwise those of
  // fresh buffers.
  for (int step = 0; step < 3; ++step) {
    INFO("step " << step);
    torch::manual_seed(10 + step);
    const torch::Tensor h = torch::randn({n, 8});
    torch::nn::Linear a(torch::nn::LinearOptions(8, v)), b(torch::nn::LinearOptions(8, v));
    {
      torch::NoGradGuard g;
      b->weight.copy_(a->weight);
      b->bias.copy_(a->bias);
    }
    slowed::entropy_masked_cross_entropy(a(h), targets, on).backward();
    slowed::entropy_masked_cross_entropy(b(h), targets, off).backward();
    CHECK(torch::equal(a->weight.grad(), b->weight.grad()));
    CHECK(torch::equal(a->bias.grad(), b->bias.grad()));
  }
  CHECK(slowed::release_gradient_buffer() == 2 * n * v * 4);
  CHECK(slowed::detail::GradientWorkspace::instance().bytes() == 0);
}

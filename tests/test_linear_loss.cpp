// Tests of EntropyMaskedLinearCrossEntropy (LM head fused with entropy-masked cross-entropy).
//
// The library is checked against
//   * the double-precision Eigen oracle of support/loss_oracle.h applied to logits X = H·Wᵀ + b
//     formed in fp64 from the (rounded) inputs, with d_hidden = G·W, dW = Gᵀ·H, db = Gᵀ·1 from the
//     oracle's d loss / d logits G; over a seeded grid of shapes, vocabulary and hidden sizes, dtypes,
//     threshold modes, reductions (None with a random upstream gradient), chunkings (1 row, rows
//     not dividing N, a memory budget, one chunk), bias or not, and the loss options;
//   * EntropyMaskedCrossEntropy on materialized logits (hidden.matmul(weight.t()) + bias), held to
//     the same tolerances against the same oracle;
//   * properties: all masked, empty input, tied heads, partial requires_grad, the chunk rule,
//     peak memory, and the error contract.
// Tolerances and their derivation: docs/numerics.md, "Fused linear loss".

#include <catch2/catch.hpp>
#include <slowed/slowed.h>
#include <torch/torch.h>
#include <Eigen/Dense>

#include "support/common.h"
#include "support/loss_oracle.h"
// The benchmarks' tracking CPU allocator measures the peak memory of a call.
#include "../benchmarks/bench_common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace {

using LOpts = slowed::EntropyMaskedLinearCrossEntropyOptions;

/// Unit roundoff of a dtype (half the spacing at 1).
double unit_roundoff(torch::Dtype d) {
  if (d == torch::kDouble) return std::ldexp(1.0, -53);
  if (d == torch::kFloat) return std::ldexp(1.0, -24);
  if (d == torch::kBFloat16) return std::ldexp(1.0, -9);
  return std::ldexp(1.0, -12);  // float16
}

/// Unit roundoff of the arithmetic (GEMM accumulation, loss terms): fp64 for fp64, else fp32.
double compute_roundoff(torch::Dtype d) {
  return d == torch::kDouble ? std::ldexp(1.0, -53) : std::ldexp(1.0, -24);
}

/// Inputs of one case, as tensors and as the exact (rounded) values the library sees.
struct LinearInputs {
  torch::Tensor hidden, weight, bias, targets, reference;  // bias/reference may be undefined
  Mat h, w;                                                 // [N, D], [V, D]
  Vec b;                                                    // [V] (zeros without bias)
  std::vector<int64_t> t;
};

/// Hidden rows with a per-row spread (log-uniform in [0.05, 6], as the loss tests' logits) over a
/// weight of unit-variance logits, so entropies cover (0, log V]; bias ~ 0.5 N(0, 1).
LinearInputs make_inputs(std::mt19937_64& rng, const Shape& lead, int64_t v, int64_t d,
                         torch::Dtype dtype, bool with_bias, int64_t ignore_index, bool int32) {
  const int64_t n = numel_of(lead);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> log_spread(std::log(0.05), std::log(6.0));
  std::vector<double> hv(static_cast<size_t>(n * d)), wv(static_cast<size_t>(v * d)),
      bv(static_cast<size_t>(v), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const double s = std::exp(log_spread(rng));
    for (int64_t k = 0; k < d; ++k) hv[size_t(i * d + k)] = s * normal(rng);
  }
  for (auto& x : wv) x = normal(rng) / std::sqrt(static_cast<double>(d));
  if (with_bias)
    for (auto& x : bv) x = 0.5 * normal(rng);
  LinearInputs in;
  in.hidden = tensor_from(hv, with_vocab(lead, d), dtype, torch::kCPU);
  in.weight = tensor_from(wv, {v, d}, dtype, torch::kCPU);
  if (with_bias) in.bias = tensor_from(bv, {v}, dtype, torch::kCPU);
  in.h = as_matrix(in.hidden, n, d);
  in.w = as_matrix(in.weight, v, d);
  in.b = with_bias ? as_vector(in.bias) : Vec::Zero(v);
  in.t = random_targets(rng, n, v, ignore_index, 0.25);
  in.targets = targets_from(in.t, lead, int32 ? torch::kInt : torch::kLong, torch::kCPU);
  return in;
}

/// Logits in fp64 from the rounded inputs, rounded once to the inputs' dtype (what an exact GEMM
/// followed by the store into a `dtype` buffer gives), and the size of each logit's computation
/// A = |H|·|W|ᵀ + |b|.
struct OracleLogits {
  Mat x, a;
};

OracleLogits oracle_logits(const LinearInputs& in, torch::Dtype dtype) {
  OracleLogits o;
  Mat exact = in.h * in.w.transpose();
  exact.rowwise() += in.b.transpose();
  o.a = in.h.cwiseAbs() * in.w.cwiseAbs().transpose();
  o.a.rowwise() += in.b.cwiseAbs().transpose();
  const int64_t n = exact.rows(), v = exact.cols();
  o.x = as_matrix(torch::from_blob(exact.data(), {n, v}, torch::kDouble).to(dtype), n, v);
  return o;
}

struct LinRun {
  torch::Tensor loss, d_hidden, d_weight, d_bias;
  EntropyMaskStats stats;
};

/// One forward + backward of `loss_of(hidden, weight, bias, stats)` on fresh leaf copies of the
/// inputs. `upstream` undefined: backward().
template <class LossOf>
LinRun run_linear(const LinearInputs& in, const torch::Tensor& upstream, LossOf&& loss_of) {
  torch::Tensor h = leaf(in.hidden), w = leaf(in.weight), b = leaf(in.bias);
  LinRun r;
  torch::Tensor loss = loss_of(h, w, b, &r.stats);
  r.loss = loss.detach().clone();
  backward_with(loss, upstream);
  r.d_hidden = h.grad();
  r.d_weight = w.grad();
  if (b.defined()) r.d_bias = b.grad();
  return r;
}

LinRun run_fused(const LinearInputs& in, const LOpts& o, const torch::Tensor& upstream) {
  return run_linear(in, upstream, [&](const torch::Tensor& h, const torch::Tensor& w,
                                      const torch::Tensor& b, EntropyMaskStats* stats) {
    return slowed::entropy_masked_linear_cross_entropy(h, w, in.targets, o, b, in.reference, stats);
  });
}

/// The same loss on materialized logits, with autograd through the matmul.
LinRun run_materialized(const LinearInputs& in, const Opts& o, const torch::Tensor& upstream) {
  return run_linear(in, upstream, [&](const torch::Tensor& h, const torch::Tensor& w,
                                      const torch::Tensor& b, EntropyMaskStats* stats) {
    torch::Tensor logits = h.matmul(w.t());
    if (b.defined()) logits = logits + b;
    return slowed::entropy_masked_cross_entropy(logits, in.targets, o, in.reference, stats);
  });
}

/// What the oracle expects, with elementwise tolerances (docs/numerics.md, "Fused linear loss").
struct LinearExpected {
  OracleResult o;
  Mat d_hidden, d_weight, tol_hidden, tol_weight;
  Vec d_bias, tol_bias, tol_token_loss;
  double tol_loss = 0.0;
  Tolerance stats_tol;  ///< the loss tolerances with the logit error added to `compute`
};

/// `chunks`: the number of chunks whose dW contributions are accumulated in the weight's dtype.
LinearExpected expected_for(const LinearInputs& in, const OracleLogits& lg, const Opts& o,
                            const Vec* reference, const Vec* upstream, double scalar_up,
                            torch::Dtype dtype, int64_t chunks) {
  LinearExpected e;
  e.o = oracle(lg.x, in.t, o, reference, upstream, scalar_up);
  const Mat& g = e.o.grad;  // [N, V] d loss / d logits, weighted and times the upstream
  const int64_t n = lg.x.rows(), v = lg.x.cols(), d = in.h.cols();
  e.d_hidden = g * in.w;
  e.d_weight = g.transpose() * in.h;
  e.d_bias = g.transpose() * Vec::Ones(n);

  const Tolerance tol = tolerance_for(dtype);
  const double u = unit_roundoff(dtype), uc = compute_roundoff(dtype);
  const double eps = o.label_smoothing(), zs = o.lse_square_scale(), cap = o.softcap();
  // delta_i: bound on the error of row i's logits (rounding into the buffer, fp32/fp64 GEMM).
  // T_ij: the size of the terms of d loss_i / d logit_ij; tau_i: its relative error.
  // floor_ij: fp16's absolute floor on the stored gradient entries of kept rows (before and after
  // the scaling by g_i w_i), carried through the GEMMs like the relative error.
  Vec delta(n), tau(n);
  Mat t_mag = Mat::Zero(n, v), floor = Mat::Zero(n, v);
  for (int64_t i = 0; i < n; ++i) {
    double di = 0.0;
    for (int64_t j = 0; j < v; ++j)
      di = std::max(di, 2.0 * u * std::abs(lg.x(i, j)) + (d + 1) * uc * lg.a(i, j));
    delta(i) = di;
    const double lse = e.o.rows.lse(i);
    const double c = 2.0 * (1.0 + 2.0 * zs * (std::abs(lse) + 1.0)) + (cap > 0 ? 2.0 / cap : 0.0);
    tau(i) = tol.compute + 2.0 * u + delta(i) * c + static_cast<double>(v) * uc + u;
    if (!e.o.keep[size_t(i)]) continue;
    const double up = upstream ? (*upstream)(i) : scalar_up;
    const double gw = std::abs(e.o.weight(i) * up);
    floor.row(i).setConstant(tol.out_atol * (1.0 + gw));
    for (int64_t j = 0; j < v; ++j) {
      const double z = cap > 0 ? cap * std::tanh(lg.x(i, j) / cap) : lg.x(i, j);
      const double p = std::exp(z - lse);
      t_mag(i, j) = gw * ((1.0 + 2.0 * zs * std::abs(lse)) * p + eps / static_cast<double>(v) +
                          (j == in.t[size_t(i)] ? 1.0 - eps : 0.0));
    }
  }
  const Mat tau_t = tau.asDiagonal() * t_mag;
  const double a = tol.out_atol;
  e.tol_hidden = ((tau_t + floor) * in.w.cwiseAbs()).array() +
                 2.0 * u * e.d_hidden.cwiseAbs().array() + a;
  const Mat mag_w = t_mag.transpose() * in.h.cwiseAbs();
  e.tol_weight = ((tau_t + floor).transpose() * in.h.cwiseAbs()).array() +
                 ((chunks + 1) * u + static_cast<double>(n) * uc) * mag_w.array() + a;
  const Vec mag_b = t_mag.transpose() * Vec::Ones(n);
  e.tol_bias = ((tau_t + floor).transpose() * Vec::Ones(n)).array() +
               (2.0 * u + static_cast<double>(n) * uc) * mag_b.array() + a;
  e.tol_token_loss = Vec::Zero(n);
  for (int64_t i = 0; i < n; ++i) {
    if (!e.o.keep[size_t(i)]) continue;
    const double lse = e.o.rows.lse(i);
    e.tol_token_loss(i) = tol.compute * e.o.rows.scale(i) + 2.0 * (1.0 + zs * std::abs(lse)) * delta(i);
    e.tol_loss += e.o.weight(i) * e.tol_token_loss(i);
  }
  e.stats_tol = tol;
  e.stats_tol.compute = tol.compute + 2.0 * (n > 0 ? delta.maxCoeff() : 0.0);
  return e;
}

void check_matrix(const torch::Tensor& actual, const Mat& expected, const Mat& tol,
                  const std::string& what, const std::string& key) {
  const Mat a = as_matrix(actual, expected.rows(), expected.cols());
  const std::string msg = compare(a, expected, tol, what, key);
  INFO(msg);
  CHECK(msg.empty());
}

void check_run(const LinRun& r, const LinearExpected& e, const LinearInputs& in, const Shape& lead,
               torch::Dtype dtype, Reduction red, bool exact_threshold, const std::string& path) {
  const std::string key = dtype_name(dtype) + " " + path;
  const int64_t n = numel_of(lead), v = in.w.rows(), d = in.h.cols();
  CHECK(r.loss.scalar_type() == loss_dtype_for(dtype));
  if (red == Reduction::None) {
    CHECK(r.loss.sizes() == at::IntArrayRef(lead));
    Mat expected(n, 1), tol(n, 1);
    for (int64_t i = 0; i < n; ++i) {
      expected(i, 0) = e.o.loss_none(i);
      tol(i, 0) = e.tol_token_loss(i);  // 0 (exact) for masked and ignored tokens
    }
    check_matrix(r.loss, expected, tol, "per-token loss", key + " loss");
  } else {
    CHECK(r.loss.dim() == 0);
    const std::string msg = compare_scalar(scalar_of(r.loss), e.o.loss, e.tol_loss, "loss", key + " loss");
    INFO(msg);
    CHECK(msg.empty());
    if (e.o.num_kept == 0) CHECK(scalar_of(r.loss) == 0.0);
  }
  REQUIRE(r.d_hidden.defined());
  REQUIRE(r.d_weight.defined());
  CHECK(r.d_hidden.scalar_type() == dtype);
  CHECK(r.d_weight.scalar_type() == dtype);
  CHECK(r.d_hidden.sizes() == at::IntArrayRef(with_vocab(lead, d)));
  CHECK(r.d_weight.sizes() == at::IntArrayRef(Shape{v, d}));
  // Rows of tokens that are masked or ignored: exactly 0 (their tolerance is only the fp16 floor,
  // so check them separately).
  const Mat dh = as_matrix(r.d_hidden, n, d);
  for (int64_t i = 0; i < n; ++i) {
    if (e.o.keep[size_t(i)]) continue;
    INFO("d_hidden row " << i << " of a token without loss");
    CHECK(dh.row(i).cwiseAbs().maxCoeff() == 0.0);
  }
  check_matrix(r.d_hidden, e.d_hidden, e.tol_hidden, "d_hidden", key + " d_hidden");
  check_matrix(r.d_weight, e.d_weight, e.tol_weight, "d_weight", key + " d_weight");
  if (in.bias.defined()) {
    REQUIRE(r.d_bias.defined());
    CHECK(r.d_bias.scalar_type() == dtype);
    check_matrix(r.d_bias.reshape({v, 1}), e.d_bias, e.tol_bias, "d_bias", key + " d_bias");
  }
  check_stats(r.stats, e.o, e.stats_tol, torch::kCPU, exact_threshold, key);
}

struct LinearCase : LossGridCase {
  int64_t dim = 1;
  int chunking = 0;  ///< 0: default budget (one chunk here), 1: 1 row, 2: 4 rows, 3: 5-row budget
  bool bias = false;

  std::string name() const {
    std::ostringstream os;
    const char* chunk_names[] = {"default budget", "chunk_rows 1", "chunk_rows 4", "budget of 5 rows"};
    os << "hidden " << shape_name(with_vocab(lead, dim)) << ", V " << vocab << ' '
       << dtype_name(dtype) << ", " << (mode == ThresholdMode::Absolute ? "Absolute" : "Ratio")
       << ", " << reduction_name(reduction) << ", ignore_index " << ignore_index << ", "
       << chunk_names[chunking] << (bias ? ", bias" : "") << terms_name() << inputs_name();
    return os.str();
  }
};

LOpts chunked(const Opts& o, int chunking, int64_t vocab, int64_t dim, torch::Dtype dtype) {
  LOpts l(o);
  if (chunking == 1) l.chunk_rows(1);
  if (chunking == 2) l.chunk_rows(4);
  if (chunking == 3) {
    const int64_t e = c10::elementSize(dtype);
    l.chunk_memory_budget(5 * (vocab * e + 2 * dim * e + 16));  // 5 rows by the documented rule
  }
  return l;
}

void run_linear_case(const LinearCase& c) {
  INFO(c.name());
  std::mt19937_64 rng(c.seed);
  const int64_t n = numel_of(c.lead), v = c.vocab;
  LinearInputs in = make_inputs(rng, c.lead, v, c.dim, c.dtype, c.bias, c.ignore_index, c.int32_targets);
  const OracleLogits lg = oracle_logits(in, c.dtype);

  Opts o = c.options();
  const OracleRows rows = oracle_rows(lg.x, in.t, o);
  ReferenceEntropies ref;
  if (c.reference) {
    ref = random_reference_entropies(rng, rows, c.lead, torch::kCPU);
    in.reference = ref.tensor;
  }
  set_robust_threshold(o, c.mode, decision_values(rows, c.reference ? &ref.values : nullptr),
                       /*exact_ties=*/v == 1 && !c.reference, rng);

  const Upstream up = random_upstream(rng, c.reduction, c.scaled_upstream, c.lead,
                                      loss_dtype_for(c.dtype), torch::kCPU);
  const torch::Tensor& upstream = up.tensor;

  const LOpts lo = chunked(o, c.chunking, v, c.dim, c.dtype);
  const int64_t rows_per_chunk = slowed::detail::linear_ce_chunk_rows(
      n, v, c.dim, c10::elementSize(c.dtype), false, lo.chunk_memory_budget(), lo.chunk_rows());
  const int64_t chunks = (std::max<int64_t>(n, 1) + rows_per_chunk - 1) / rows_per_chunk;
  const LinearExpected e = expected_for(in, lg, o, c.reference ? &ref.values : nullptr,
                                        c.reduction == Reduction::None ? &up.per_token : nullptr,
                                        up.scalar, c.dtype, chunks);
  for (bool reference_path : {false, true}) {
    INFO((reference_path ? "use_reference(true)" : "default path"));
    LOpts l = lo;
    l.loss().use_reference(reference_path);
    check_run(run_fused(in, l, upstream), e, in, c.lead, c.dtype, c.reduction, c.reference,
              reference_path ? "fused linear, reference rows" : "fused linear");
  }
  INFO("EntropyMaskedCrossEntropy on materialized logits, same oracle and tolerances");
  check_run(run_materialized(in, o, upstream), e, in, c.lead, c.dtype, c.reduction, c.reference,
            "materialized");
}

}  // namespace

TEST_CASE("fused linear loss matches the double-precision oracle and the loss on materialized "
          "logits over the grid", "[cpu]") {
  const std::vector<Shape> leads = {{1}, {7}, {3, 5}, {2, 19}};
  const int64_t vocabs[] = {3, 130};
  const int64_t dims[] = {1, 24};
  const auto& dtypes = kGridDtypes;
  const auto& modes = kGridModes;
  const auto& reductions = kGridReductions;
  const auto& ignores = kGridIgnoreIndices;
  uint64_t index = 0;
  for (const auto& lead : leads)
    for (int64_t v : vocabs)
      for (int64_t d : dims)
        for (torch::Dtype dtype : dtypes)
          for (ThresholdMode mode : modes)
            for (Reduction red : reductions) {
              std::mt19937_64 flags(0x11EA0000ULL + index);
              std::bernoulli_distribution coin(0.5);
              LinearCase c;
              c.set_point(lead, v, dtype, mode, red, ignores[index % 3]);
              c.dim = d;
              c.chunking = static_cast<int>(index / 3 % 4);
              c.bias = coin(flags);
              c.draw_terms(flags);
              c.draw_inputs(flags);
              c.seed = 0x11EA11EAULL * 7 + index;
              ++index;
              run_linear_case(c);
            }
  print_worst_ratios();
}

TEST_CASE("fused linear loss: the chunk size follows the documented rule", "[cpu]") {
  using slowed::detail::linear_ce_chunk_rows;
  // CPU fp32, V = 151936, D = 896: a row costs 151936 * 4 + 2 * 896 * 4 + 16 = 614928 bytes.
  const int64_t row = 151936 * 4 + 2 * 896 * 4 + 16;
  const int64_t budget = LOpts::kDefaultChunkMemoryBudget;
  CHECK(budget / row == 109);
  // 4096 tokens in ceil(4096 / 109) = 38 balanced chunks of at most 108 rows.
  CHECK(linear_ce_chunk_rows(4096, 151936, 896, 4, false, budget) == 108);
  // CUDA counts half a row more (the compaction copy): bf16 row 151936 * 3 + 2 * 1536 * 2 + 16.
  const int64_t cuda_row = 151936 * 2 * 3 / 2 + 2 * 1536 * 2 + 16;
  const int64_t cuda_rows = budget / cuda_row;
  const int64_t cuda_chunks = (8192 + cuda_rows - 1) / cuda_rows;
  CHECK(linear_ce_chunk_rows(8192, 151936, 1536, 2, true, budget) ==
        (8192 + cuda_chunks - 1) / cuda_chunks);
  CHECK(linear_ce_chunk_rows(50, 151936, 896, 4, false, budget) == 50);  // fits: one chunk
  CHECK(linear_ce_chunk_rows(0, 151936, 896, 4, false, budget) == 1);
  CHECK(linear_ce_chunk_rows(10, 151936, 896, 4, false, 1) == 1);        // at least one row
  CHECK(linear_ce_chunk_rows(10, 151936, 896, 4, false, budget, 3) == 3);  // chunk_rows wins
  CHECK(linear_ce_chunk_rows(2, 151936, 896, 4, false, budget, 3) == 2);
  // Balanced: 11 rows with room for 5 -> 3 chunks of at most 4 rows.
  CHECK(linear_ce_chunk_rows(11, 100, 10, 4, false, 5 * (400 + 80 + 16)) == 4);
}

TEST_CASE("fused linear loss: all tokens masked gives zero loss and zero gradients", "[cpu]") {
  const Reduction reductions[] = {Reduction::MeanKept, Reduction::MeanValid, Reduction::Sum,
                                  Reduction::None};
  const char* ways[] = {"absolute threshold above every entropy", "mask_ratio 1",
                        "every target ignored"};
  for (torch::Dtype dtype : {torch::kFloat, torch::kBFloat16, torch::kDouble}) {
    for (Reduction red : reductions) {
      for (int way = 0; way < 3; ++way) {
        INFO(dtype_name(dtype) << ", " << reduction_name(red) << ", " << ways[way]);
        std::mt19937_64 rng(17 + static_cast<uint64_t>(way));
        LinearInputs in = make_inputs(rng, {2, 3}, 9, 4, dtype, true, -100, false);
        if (way == 2) in.targets.fill_(-100);
        Opts o;
        o.label_smoothing(0.1).lse_square_scale(0.01).softcap(4.0).reduction(red);
        if (way == 0) o.entropy_threshold(1e6);
        if (way == 1) o.mask_ratio(1.0);
        if (way == 2) o.entropy_threshold(-1.0);
        torch::Tensor upstream;
        if (red == Reduction::None)
          upstream = torch::randn({2, 3}, torch::TensorOptions().dtype(loss_dtype_for(dtype)));
        const LinRun r = run_fused(in, LOpts(o).chunk_rows(4), upstream);
        CHECK(torch::equal(r.loss, torch::zeros_like(r.loss)));
        for (const torch::Tensor* g : {&r.d_hidden, &r.d_weight, &r.d_bias}) {
          REQUIRE(g->defined());
          CHECK(torch::equal(*g, torch::zeros_like(*g)));
        }
        CHECK(r.stats.num_kept.item<int64_t>() == 0);
      }
    }
  }
}

TEST_CASE("fused linear loss: empty input gives zero loss and zero gradients", "[cpu]") {
  for (Reduction red : {Reduction::MeanKept, Reduction::None}) {
    for (bool ratio : {false, true}) {
      INFO(reduction_name(red) << (ratio ? ", Ratio 0.5" : ", Absolute 0.3"));
      std::mt19937_64 rng(5);
      LinearInputs in = make_inputs(rng, {2, 0}, 6, 3, torch::kFloat, true, -100, false);
      Opts o;
      o.reduction(red);
      if (ratio) o.mask_ratio(0.5);
      torch::Tensor upstream;
      if (red == Reduction::None) upstream = torch::ones({2, 0});
      const LinRun r = run_fused(in, o, upstream);
      if (red == Reduction::None) {
        CHECK(r.loss.sizes() == at::IntArrayRef({2, 0}));
      } else {
        CHECK(r.loss.item<double>() == 0.0);
      }
      CHECK(r.d_hidden.sizes() == at::IntArrayRef({2, 0, 3}));
      CHECK(torch::equal(r.d_weight, torch::zeros({6, 3})));
      CHECK(torch::equal(r.d_bias, torch::zeros({6})));
      CHECK(r.stats.num_valid.item<int64_t>() == 0);
    }
  }
}

TEST_CASE("fused linear loss: a tied head gets the embedding's and the head's gradient", "[cpu]") {
  // hidden = tanh(E[ids] * 1.5): the embedding matrix E is also the head's weight.
  for (bool ratio : {false, true}) {
    INFO((ratio ? "Ratio 0.3, MeanKept" : "Absolute 1.0, MeanValid"));
    torch::manual_seed(3);
    const int64_t v = 23, d = 6;
    torch::Tensor e0 = torch::randn({v, d}, torch::kDouble);
    torch::Tensor ids = torch::randint(0, v, {3, 7}, torch::kLong);
    torch::Tensor y = torch::randint(0, v, {3, 7}, torch::kLong);
    y.index_put_({0, 2}, -100);
    Opts o;
    if (ratio) {
      o.mask_ratio(0.3);
    } else {
      o.entropy_threshold(1.0).reduction(Reduction::MeanValid);
    }
    torch::Tensor grads[2];
    for (int fused = 0; fused < 2; ++fused) {
      torch::Tensor e = e0.clone().requires_grad_(true);
      torch::Tensor hidden = torch::tanh(e.index_select(0, ids.reshape({-1})).reshape({3, 7, d}) * 1.5);
      torch::Tensor loss = fused ? slowed::entropy_masked_linear_cross_entropy(
                                       hidden, e, y, LOpts(o).chunk_rows(5))
                                 : slowed::entropy_masked_cross_entropy(hidden.matmul(e.t()), y, o);
      loss.backward();
      grads[fused] = e.grad();
    }
    CHECK(torch::allclose(grads[1], grads[0], 1e-12, 1e-13));
    CHECK(grads[0].abs().max().item<double>() > 0.0);
  }
}

TEST_CASE("fused linear loss: only the inputs that require grad get one", "[cpu]") {
  std::mt19937_64 rng(11);
  const LinearInputs in = make_inputs(rng, {9}, 13, 5, torch::kDouble, true, -100, false);
  for (Reduction red : {Reduction::MeanKept, Reduction::None}) {
    Opts o;
    o.entropy_threshold(0.5).reduction(red);
    const LinRun full = run_fused(in, LOpts(o).chunk_rows(2), red == Reduction::None ? torch::ones({9}, torch::kDouble) : torch::Tensor());
    for (int which = 0; which < 3; ++which) {
      INFO(reduction_name(red) << ", only input " << which << " requires grad");
      torch::Tensor h = in.hidden.clone().requires_grad_(which == 0);
      torch::Tensor w = in.weight.clone().requires_grad_(which == 1);
      torch::Tensor b = in.bias.clone().requires_grad_(which == 2);
      torch::Tensor loss = slowed::entropy_masked_linear_cross_entropy(h, w, in.targets, LOpts(o).chunk_rows(2), b);
      (red == Reduction::None ? loss.sum() : loss).backward();
      CHECK(h.grad().defined() == (which == 0));
      CHECK(w.grad().defined() == (which == 1));
      CHECK(b.grad().defined() == (which == 2));
      const torch::Tensor& got = which == 0 ? h.grad() : which == 1 ? w.grad() : b.grad();
      const torch::Tensor& want = which == 0 ? full.d_hidden : which == 1 ? full.d_weight : full.d_bias;
      CHECK(torch::equal(got, want));
    }
  }
  // Under NoGradGuard only the loss is computed, and it equals the loss with gradients.
  Opts o;
  o.entropy_threshold(0.5);
  torch::Tensor with_grad = run_fused(in, o, {}).loss;
  torch::NoGradGuard no_grad;
  CHECK(torch::equal(slowed::entropy_masked_linear_cross_entropy(in.hidden, in.weight, in.targets, o, in.bias), with_grad));
}

TEST_CASE("fused linear loss: a second backward through one call is a clear error", "[cpu]") {
  std::mt19937_64 rng(2);
  const LinearInputs in = make_inputs(rng, {6}, 8, 3, torch::kFloat, false, -100, false);
  torch::Tensor h = in.hidden.clone().requires_grad_(true);
  torch::Tensor loss = slowed::entropy_masked_linear_cross_entropy(h, in.weight, in.targets);
  loss.backward({}, /*retain_graph=*/true);
  CHECK_THROWS_WITH(loss.backward(), Catch::Contains("backward ran a second time"));
}

TEST_CASE("fused linear loss: peak memory is one chunk beyond the gradients, not [N, V]", "[cpu]") {
  auto& tracker = bench::cpu_tracker();
  const int64_t n = 2048, v = 4096, d = 32;
  torch::manual_seed(0);
  torch::Tensor h = torch::randn({n, d}).requires_grad_(true);
  torch::Tensor w = (torch::randn({v, d}) / std::sqrt(double(d))).requires_grad_(true);
  torch::Tensor y = torch::randint(0, v, {n}, torch::kLong);
  const int64_t budget = int64_t(1) << 20;
  for (bool ratio : {false, true}) {
    INFO((ratio ? "Ratio 0.3 (backward recomputes the kept rows)" : "Absolute 2.0"));
    Opts o;
    if (ratio) {
      o.mask_ratio(0.3);
    } else {
      o.entropy_threshold(2.0);
    }
    tracker.reset_peak();
    const size_t before = tracker.current();
    torch::Tensor loss = slowed::entropy_masked_linear_cross_entropy(h, w, y, LOpts(o).chunk_memory_budget(budget));
    loss.backward();
    const double extra = static_cast<double>(tracker.peak() - before);
    h.mutable_grad() = torch::Tensor();
    w.mutable_grad() = torch::Tensor();
    // Gradients (dW 512 KiB, d_hidden 256 KiB), one chunk (<= 1 MiB), per-token vectors (~100
    // bytes a token); the logits alone would be n * v * 4 = 32 MiB.
    const double bound = double(v * d * 4 + n * d * 4 + budget + n * 100);
    INFO("peak extra " << extra << " bytes, bound " << bound);
    CHECK(extra <= bound);
    CHECK(extra < double(n * v * 4) / 8);
  }
}

TEST_CASE("fused linear loss: bad arguments are c10::Errors naming the argument", "[cpu]") {
  torch::Tensor h = torch::randn({2, 3, 4});
  torch::Tensor w = torch::randn({5, 4});
  torch::Tensor y = torch::randint(0, 5, {2, 3}, torch::kLong);
  using slowed::entropy_masked_linear_cross_entropy;
  auto fails_with = [](const std::function<void()>& f, const std::string& text) {
    INFO(text);
    CHECK_THROWS_AS(f(), c10::Error);
    CHECK_THROWS_WITH(f(), Catch::Contains(text));
  };
  fails_with([&] { entropy_masked_linear_cross_entropy(torch::randn({4}), w, y); }, "hidden: expected shape [..., D]");
  fails_with([&] { entropy_masked_linear_cross_entropy(h.to(torch::kLong), w, y); }, "hidden: expected dtype");
  fails_with([&] { entropy_masked_linear_cross_entropy(h, torch::randn({5, 3}), y); },
             "weight: expected shape [V, D] with V >= 1 and D = 4 (hidden's last dimension), got [5, 3]");
  fails_with([&] { entropy_masked_linear_cross_entropy(h, w.to(torch::kDouble), y); }, "weight: expected dtype Float");
  fails_with([&] { entropy_masked_linear_cross_entropy(h, w, y, {}, torch::randn({4})); }, "bias: expected shape [5]");
  fails_with([&] { entropy_masked_linear_cross_entropy(h, w, y, {}, torch::randn({5}, torch::kDouble)); }, "bias: expected dtype");
  fails_with([&] { entropy_masked_linear_cross_entropy(h, w, y.reshape({6})); }, "targets: expected shape [2, 3]");
  fails_with([&] { entropy_masked_linear_cross_entropy(h, w, y.to(torch::kFloat)); }, "targets: expected integer");
  fails_with([&] { entropy_masked_linear_cross_entropy(h, w, y, {}, {}, torch::zeros({3})); },
             "reference_entropy: expected shape [2, 3]");
  torch::Tensor bad = y.clone();
  bad.index_put_({1, 2}, 7);
  fails_with([&] { entropy_masked_linear_cross_entropy(h, w, bad); },
             "targets: expected class indices in [0, 5) or ignore_index (-100), got 7 at flat position 5");
  torch::Tensor nan_h = h.clone();
  nan_h.index_put_({0, 1, 2}, std::numeric_limits<float>::quiet_NaN());
  fails_with([&] { entropy_masked_linear_cross_entropy(nan_h, w, y); }, "logits: expected finite values, row 1");
  fails_with([&] { LOpts().chunk_memory_budget(0); }, "chunk_memory_budget: expected a positive");
  fails_with([&] { LOpts().chunk_rows(-1); }, "chunk_rows: expected a number of rows >= 0");
}

TEST_CASE("fused linear loss on CUDA matches the CPU", "[cuda]") {
  if (!cuda_or_warn()) return;
  const torch::Device dev(torch::kCUDA, 0);
  for (torch::Dtype dtype : {torch::kFloat, torch::kBFloat16}) {
    for (bool ratio : {false, true}) {
      for (Reduction red : {Reduction::MeanKept, Reduction::None}) {
        INFO(dtype_name(dtype) << (ratio ? ", Ratio 0.3, " : ", Absolute 1.0, ") << reduction_name(red));
        std::mt19937_64 rng(23);
        const LinearInputs in = make_inputs(rng, {4, 33}, 1000, 64, dtype, true, -100, false);
        Opts o;
        o.reduction(red);
        if (ratio) {
          o.mask_ratio(0.3);
        } else {
          o.entropy_threshold(1.0);
        }
        const LOpts lo = LOpts(o).chunk_rows(50);
        torch::Tensor upstream;
        if (red == Reduction::None) upstream = torch::rand({4, 33}) * 2 - 1;
        const LinRun cpu = run_fused(in, lo, upstream);
        torch::Tensor h = in.hidden.to(dev).requires_grad_(true), w = in.weight.to(dev).requires_grad_(true),
                      b = in.bias.to(dev).requires_grad_(true);
        slowed::EntropyMaskStats st;
        torch::Tensor loss = slowed::entropy_masked_linear_cross_entropy(h, w, in.targets.to(dev), lo, b, {}, &st);
        backward_with(loss, upstream.defined() ? upstream.to(dev) : upstream);
        const double tol = dtype == torch::kFloat ? 1e-4 : 5e-2;
        CHECK(st.num_kept.item<int64_t>() == cpu.stats.num_kept.item<int64_t>());
        CHECK(torch::allclose(loss.detach().cpu(), cpu.loss, tol, tol));
        CHECK(torch::allclose(h.grad().cpu().to(torch::kFloat), cpu.d_hidden.to(torch::kFloat), tol, tol));
        CHECK(torch::allclose(w.grad().cpu().to(torch::kFloat), cpu.d_weight.to(torch::kFloat), tol, tol));
        CHECK(torch::allclose(b.grad().cpu().to(torch::kFloat), cpu.d_bias.to(torch::kFloat), tol, tol));
      }
    }
  }
}

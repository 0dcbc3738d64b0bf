#pragma once

// The double-precision Eigen oracle of entropy-masked cross-entropy, the random inputs of the
// oracle grids, the tolerance table and the comparison helpers, shared by the loss tests
// (tests/test_loss.cpp) and the fused linear loss tests (tests/test_linear_loss.cpp). Formulas and
// tolerances: docs/numerics.md, "Loss". Test-only header: everything has internal linkage. The
// tests that include it link Eigen3::Eigen (tests/CMakeLists.txt).

#include <catch2/catch.hpp>
#include <slowed/slowed.h>
#include <torch/torch.h>
#include <Eigen/Dense>

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

using slowed::EntropyMaskStats;
using slowed::Reduction;
using slowed::ThresholdMode;
using Opts = slowed::EntropyMaskedCrossEntropyOptions;
using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Vec = Eigen::VectorXd;
using Shape = std::vector<int64_t>;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Keep-decision safety margin: no decision entropy lies within kMinGap / 2 of the threshold, so
// fp32 (library) and fp64 (oracle) entropies, which differ by ~1e-6, decide alike.
constexpr double kMinGap = 2e-3;

// ------------------------------------------------------------------------------------------------
// Small helpers
// ------------------------------------------------------------------------------------------------

int64_t numel_of(const Shape& s) {
  return std::accumulate(s.begin(), s.end(), int64_t(1), std::multiplies<int64_t>());
}

Shape with_vocab(Shape lead, int64_t vocab) {
  lead.push_back(vocab);
  return lead;
}

const char* reduction_name(Reduction r) {
  switch (r) {
    case Reduction::MeanKept: return "MeanKept";
    case Reduction::MeanValid: return "MeanValid";
    case Reduction::Sum: return "Sum";
    case Reduction::None: return "None";
  }
  return "?";
}

std::string shape_name(const Shape& s) {
  std::ostringstream os;
  os << '[';
  for (size_t i = 0; i < s.size(); ++i) os << (i ? "," : "") << s[i];
  os << ']';
  return os.str();
}

std::string dtype_name(torch::Dtype d) {
  std::ostringstream os;
  os << d;
  return os.str();
}

torch::Dtype loss_dtype_for(torch::Dtype logits_dtype) {
  return logits_dtype == torch::kDouble ? torch::kDouble : torch::kFloat;
}

/// A tensor of `shape` holding `data` (row-major), converted to `dtype` on `device`.
torch::Tensor tensor_from(const std::vector<double>& data, const Shape& shape, torch::Dtype dtype,
                          torch::Device device) {
  torch::Tensor t = torch::empty(shape, torch::kDouble);
  REQUIRE(t.numel() == static_cast<int64_t>(data.size()));
  if (!data.empty()) std::copy(data.begin(), data.end(), t.data_ptr<double>());
  return t.to(device, dtype);
}

torch::Tensor targets_from(const std::vector<int64_t>& t, const Shape& lead, torch::Dtype dtype,
                           torch::Device device) {
  torch::Tensor out = torch::empty(lead, torch::kLong);
  if (!t.empty()) std::copy(t.begin(), t.end(), out.data_ptr<int64_t>());
  return out.to(device, dtype);
}

/// The values of any tensor, as doubles in row-major order (data movement only, no arithmetic).
std::vector<double> values_of(const torch::Tensor& t) {
  torch::Tensor c = t.detach().to(torch::kCPU, torch::kDouble).contiguous();
  const double* p = c.data_ptr<double>();
  return std::vector<double>(p, p + c.numel());
}

Mat as_matrix(const torch::Tensor& t, int64_t rows, int64_t cols) {
  std::vector<double> v = values_of(t);
  REQUIRE(static_cast<int64_t>(v.size()) == rows * cols);
  Mat m(rows, cols);
  if (!v.empty()) m = Eigen::Map<Mat>(v.data(), rows, cols);
  return m;
}

Vec as_vector(const torch::Tensor& t) {
  std::vector<double> v = values_of(t);
  Vec out(static_cast<Eigen::Index>(v.size()));
  for (size_t i = 0; i < v.size(); ++i) out(static_cast<Eigen::Index>(i)) = v[i];
  return out;
}

double scalar_of(const torch::Tensor& t) { return t.detach().to(torch::kCPU, torch::kDouble).item<double>(); }

/// Random logits [n, v], row-major. Each row has its own spread (log-uniform in [0.05, 6]) and
/// offset (uniform in [-3, 3]), so entropies cover (0, log V] and log-sum-exp is not ~0.
std::vector<double> random_logits(std::mt19937_64& rng, int64_t n, int64_t v) {
  std::uniform_real_distribution<double> log_spread(std::log(0.05), std::log(6.0));
  std::uniform_real_distribution<double> offset(-3.0, 3.0);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> out(static_cast<size_t>(n * v));
  for (int64_t i = 0; i < n; ++i) {
    const double s = std::exp(log_spread(rng)), o = offset(rng);
    for (int64_t j = 0; j < v; ++j) out[static_cast<size_t>(i * v + j)] = o + s * normal(rng);
  }
  return out;
}

/// Random targets in [0, v); a fraction `ignored` of them (at random) is `ignore_index`.
std::vector<int64_t> random_targets(std::mt19937_64& rng, int64_t n, int64_t v,
                                    int64_t ignore_index, double ignored) {
  std::uniform_int_distribution<int64_t> cls(0, v - 1);
  std::bernoulli_distribution skip(ignored);
  std::vector<int64_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = skip(rng) ? ignore_index : cls(rng);
  return t;
}

// ------------------------------------------------------------------------------------------------
// The oracle: double precision, Eigen only, straight from the formulas in docs/numerics.md.
// ------------------------------------------------------------------------------------------------

/// Per-row quantities, independent of the keep decision.
struct OracleRows {
  Vec lse;      ///< [N] log-sum-exp of the capped logits
  Vec entropy;  ///< [N] H = lse - sum p z, clamped at 0
  Vec loss;     ///< [N] unweighted token loss (0 where ignored)
  Vec scale;    ///< [N] 1 + |lse| + max|z| + zs lse^2: size of the terms that round in the loss
  Mat dloss;    ///< [N, V] d loss_i / d x_i (unweighted; 0 where ignored)
  std::vector<bool> valid;
};

OracleRows oracle_rows(const Mat& x, const std::vector<int64_t>& t, const Opts& o) {
  const Eigen::Index n = x.rows(), v = x.cols();
  const double eps = o.label_smoothing(), zs = o.lse_square_scale(), cap = o.softcap();
  OracleRows r;
  r.lse = Vec::Zero(n);
  r.entropy = Vec::Zero(n);
  r.loss = Vec::Zero(n);
  r.scale = Vec::Zero(n);
  r.dloss = Mat::Zero(n, v);
  r.valid.assign(static_cast<size_t>(n), false);
  for (Eigen::Index i = 0; i < n; ++i) {
    const Eigen::ArrayXd xi = x.row(i).transpose().array();
    Eigen::ArrayXd z = xi, dcap = Eigen::ArrayXd::Ones(v);
    if (cap > 0.0) {  // z = c tanh(x / c), dz/dx = 1 - tanh^2(x / c)
      const Eigen::ArrayXd th = (xi / cap).tanh();
      z = cap * th;
      dcap = 1.0 - th.square();
    }
    const double m = z.maxCoeff();
    const double lse = m + std::log((z - m).exp().sum());
    const Eigen::ArrayXd p = (z - lse).exp();
    r.lse(i) = lse;
    r.entropy(i) = std::max(0.0, lse - (p * z).sum());
    r.scale(i) = 1.0 + std::abs(lse) + z.abs().maxCoeff() + zs * lse * lse;
    const int64_t ti = t[static_cast<size_t>(i)];
    r.valid[static_cast<size_t>(i)] = ti != o.ignore_index();
    if (!r.valid[static_cast<size_t>(i)]) continue;
    r.loss(i) = (1.0 - eps) * (lse - z(ti)) + eps * (lse - z.mean()) + zs * lse * lse;
    // d/dz: p (1 + 2 zs lse) - (1 - eps) 1[j = t] - eps / V; then the chain rule through the cap.
    Eigen::ArrayXd g = p * (1.0 + 2.0 * zs * lse) - eps / static_cast<double>(v);
    g(ti) -= 1.0 - eps;
    r.dloss.row(i) = (g * dcap).matrix().transpose();
  }
  return r;
}

struct OracleResult {
  OracleRows rows;
  std::vector<bool> keep;
  Vec weight;             ///< [N] keep / n_kept, keep / n_valid or keep
  Vec loss_none;          ///< [N] keep ? loss : 0
  double loss = 0.0;      ///< sum_i weight_i loss_i
  double loss_scale = 0;  ///< sum_i |weight_i| scale_i
  Mat grad;               ///< [N, V] upstream_i weight_i d loss_i / d x_i
  Vec grad_scale;         ///< [N] |upstream_i weight_i| (1 + 2 zs |lse_i|)
  int64_t num_valid = 0, num_kept = 0;
  double kept_fraction = 0.0, mean_entropy = 0.0, mean_entropy_scale = 0.0;
  double threshold = 0.0;
  Eigen::Index threshold_row = -1;  ///< Ratio mode: the row whose entropy is the threshold
};

/// `reference`: decision entropies replacing the current ones (nullptr: current). `upstream`:
/// per-token upstream gradient (Reduction::None), else `scalar_upstream` multiplies everything.
OracleResult oracle(const Mat& x, const std::vector<int64_t>& t, const Opts& o,
                    const Vec* reference, const Vec* upstream, double scalar_upstream = 1.0) {
  OracleResult r;
  r.rows = oracle_rows(x, t, o);
  const Eigen::Index n = x.rows();
  // The decision is made in fp32 (documented): round the decision values and the threshold.
  Vec h(n);
  for (Eigen::Index i = 0; i < n; ++i)
    h(i) = reference ? static_cast<double>(static_cast<float>((*reference)(i))) : r.rows.entropy(i);
  std::vector<std::pair<double, Eigen::Index>> hv;
  for (Eigen::Index i = 0; i < n; ++i)
    if (r.rows.valid[static_cast<size_t>(i)]) hv.emplace_back(h(i), i);
  r.num_valid = static_cast<int64_t>(hv.size());
  if (o.threshold_mode() == ThresholdMode::Absolute) {
    r.threshold = static_cast<double>(static_cast<float>(o.entropy_threshold()));
  } else {
    std::sort(hv.begin(), hv.end());
    const auto k = static_cast<int64_t>(std::floor(static_cast<double>(r.num_valid) * o.mask_ratio()));
    if (k >= r.num_valid) {
      r.threshold = kInf;
    } else {
      r.threshold = hv[static_cast<size_t>(k)].first;
      r.threshold_row = hv[static_cast<size_t>(k)].second;
    }
  }
  r.keep.assign(static_cast<size_t>(n), false);
  for (Eigen::Index i = 0; i < n; ++i) {
    const bool keep = r.rows.valid[static_cast<size_t>(i)] && !std::isnan(h(i)) && h(i) >= r.threshold;
    r.keep[static_cast<size_t>(i)] = keep;
    r.num_kept += keep ? 1 : 0;
  }
  r.weight = Vec::Zero(n);
  for (Eigen::Index i = 0; i < n; ++i) {
    if (!r.keep[static_cast<size_t>(i)]) continue;
    switch (o.reduction()) {
      case Reduction::MeanKept: r.weight(i) = 1.0 / static_cast<double>(std::max<int64_t>(r.num_kept, 1)); break;
      case Reduction::MeanValid: r.weight(i) = 1.0 / static_cast<double>(std::max<int64_t>(r.num_valid, 1)); break;
      case Reduction::Sum:
      case Reduction::None: r.weight(i) = 1.0; break;
    }
  }
  const double zs = o.lse_square_scale();
  r.loss_none = Vec::Zero(n);
  r.grad = Mat::Zero(n, x.cols());
  r.grad_scale = Vec::Zero(n);
  for (Eigen::Index i = 0; i < n; ++i) {
    if (!r.keep[static_cast<size_t>(i)]) continue;
    r.loss_none(i) = r.rows.loss(i);
    r.loss += r.weight(i) * r.rows.loss(i);
    r.loss_scale += r.weight(i) * r.rows.scale(i);
    const double up = upstream ? (*upstream)(i) : scalar_upstream;
    r.grad.row(i) = r.rows.dloss.row(i) * (r.weight(i) * up);
    r.grad_scale(i) = std::abs(r.weight(i) * up) * (1.0 + 2.0 * zs * std::abs(r.rows.lse(i)));
  }
  const double nv = static_cast<double>(std::max<int64_t>(r.num_valid, 1));
  r.kept_fraction = static_cast<double>(r.num_kept) / nv;
  for (Eigen::Index i = 0; i < n; ++i) {
    if (!r.rows.valid[static_cast<size_t>(i)]) continue;
    r.mean_entropy += r.rows.entropy(i) / nv;
    r.mean_entropy_scale += r.rows.scale(i) / nv;
  }
  return r;
}

/// An Absolute threshold that masks about `want` of the decision values `h` and lies in the
/// middle of a gap of at least kMinGap between them (or 0.5 outside their range).
double robust_absolute_threshold(std::vector<double> h, int64_t want) {
  std::sort(h.begin(), h.end());
  const auto n = static_cast<int64_t>(h.size());
  if (n == 0) return 0.3;
  int64_t best = -1;
  for (int64_t k = 0; k <= n; ++k) {
    const bool ok = k == 0 || k == n || h[size_t(k)] - h[size_t(k - 1)] >= kMinGap;
    if (ok && (best < 0 || std::llabs(k - want) < std::llabs(best - want))) best = k;
  }
  if (best == 0) return h.front() - 0.5;
  if (best == n) return h.back() + 0.5;
  return 0.5 * (h[size_t(best - 1)] + h[size_t(best)]);
}

/// Ratio mode decides alike in fp32 and fp64 when the k-th and (k+1)-th smallest decision values
/// are kMinGap / 2 apart, or exactly equal in both precisions (`exact_ties`, e.g. V = 1).
bool ratio_is_robust(std::vector<double> h, double q, bool exact_ties) {
  std::sort(h.begin(), h.end());
  const auto n = static_cast<int64_t>(h.size());
  const auto k = static_cast<int64_t>(std::floor(static_cast<double>(n) * q));
  if (k == 0 || k >= n) return true;
  const double gap = h[size_t(k)] - h[size_t(k - 1)];
  return gap >= kMinGap / 2 || (exact_ties && gap == 0.0);
}

/// Sets a random threshold of `mode` on `o` that decides alike in fp32 and fp64 for the decision
/// values `decision`: an Absolute threshold in a gap masking a random count, or a ratio from
/// {0, 0.2, 0.5, 0.75, 1} (0 when that one is not robust; `exact_ties` as in ratio_is_robust).
void set_robust_threshold(slowed::EntropyMaskedCrossEntropyOptions& o, slowed::ThresholdMode mode,
                          const std::vector<double>& decision, bool exact_ties, std::mt19937_64& rng) {
  if (mode == slowed::ThresholdMode::Absolute) {
    std::uniform_int_distribution<int64_t> want(0, static_cast<int64_t>(decision.size()));
    o.entropy_threshold(robust_absolute_threshold(decision, want(rng)));
  } else {
    const double qs[] = {0.0, 0.2, 0.5, 0.75, 1.0};
    std::uniform_int_distribution<int> pick(0, 4);
    double q = qs[pick(rng)];
    if (!ratio_is_robust(decision, q, exact_ties)) q = 0.0;
    o.mask_ratio(q);
  }
}

// ------------------------------------------------------------------------------------------------
// The rest of a grid case: options, reference entropies, upstream gradient, running backward.
// Both grids draw from `rng` in the same order: inputs, then the reference entropies, then the
// threshold (set_robust_threshold), then the upstream gradient.
// ------------------------------------------------------------------------------------------------

/// The dtypes, threshold modes, reductions and ignore_index values both grids run through (the
/// ignore_index cycles with the case index; 2 is a real class index when V > 2).
const std::vector<torch::Dtype> kGridDtypes = {torch::kFloat, torch::kBFloat16, torch::kHalf,
                                               torch::kDouble};
const std::vector<ThresholdMode> kGridModes = {ThresholdMode::Absolute, ThresholdMode::Ratio};
const std::vector<Reduction> kGridReductions = {Reduction::MeanKept, Reduction::MeanValid,
                                                Reduction::Sum, Reduction::None};
const std::vector<int64_t> kGridIgnoreIndices = {-100, -1, 2};

/// What a case of either grid has: the grid point (token shape, vocabulary, dtype, threshold mode,
/// reduction, ignore_index), the flags drawn per case and the seed of its inputs.
struct LossGridCase {
  Shape lead;
  int64_t vocab = 1;
  torch::Dtype dtype = torch::kFloat;
  ThresholdMode mode = ThresholdMode::Absolute;
  Reduction reduction = Reduction::MeanKept;
  int64_t ignore_index = -100;
  bool smoothing = false, zloss = false, softcap = false, reference = false;
  bool int32_targets = false, scaled_upstream = false;
  uint64_t seed = 0;

  void set_point(const Shape& lead_, int64_t vocab_, torch::Dtype dtype_, ThresholdMode mode_,
                 Reduction reduction_, int64_t ignore_index_) {
    lead = lead_;
    vocab = vocab_;
    dtype = dtype_;
    mode = mode_;
    reduction = reduction_;
    ignore_index = ignore_index_;
  }

  /// Draws the optional terms and reference entropies (in that order, a fair coin each), and the
  /// inputs' flags, from a case's `flags` generator.
  void draw_terms(std::mt19937_64& flags) {
    std::bernoulli_distribution coin(0.5);
    smoothing = coin(flags);
    zloss = coin(flags);
    softcap = coin(flags);
    reference = coin(flags);
  }
  void draw_inputs(std::mt19937_64& flags) {
    std::bernoulli_distribution coin(0.5);
    int32_targets = coin(flags);
    scaled_upstream = coin(flags);
  }

  /// `ignore_index`, `reduction` and the optional terms at the grids' values (label_smoothing
  /// 0.1, lse_square_scale 0.01, softcap 4); the threshold is set later (set_robust_threshold).
  Opts options() const {
    Opts o;
    o.ignore_index(ignore_index).reduction(reduction);
    if (smoothing) o.label_smoothing(0.1);
    if (zloss) o.lse_square_scale(0.01);
    if (softcap) o.softcap(4.0);
    return o;
  }

  /// For the case names: the optional terms and reference entropies, and the inputs' flags and seed.
  std::string terms_name() const {
    return std::string(smoothing ? ", label_smoothing 0.1" : "") +
           (zloss ? ", lse_square_scale 0.01" : "") + (softcap ? ", softcap 4" : "") +
           (reference ? ", reference entropies" : "");
  }
  std::string inputs_name() const {
    return std::string(int32_targets ? ", int32 targets" : "") +
           (scaled_upstream ? ", upstream 0.75" : "") + ", seed " + std::to_string(seed);
  }
};

/// Reference entropies as a float tensor of shape `lead` on `device` and as the oracle's values.
struct ReferenceEntropies {
  torch::Tensor tensor;
  Vec values;
};

/// Distinct multiples of 1/16 (exact in fp32) in random order at the valid rows of `rows`; NaN at
/// ignored tokens (they must be accepted there).
ReferenceEntropies random_reference_entropies(std::mt19937_64& rng, const OracleRows& rows,
                                              const Shape& lead, torch::Device device) {
  const int64_t n = numel_of(lead);
  std::vector<int64_t> perm(static_cast<size_t>(n));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<double> r(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    r[size_t(i)] = rows.valid[size_t(i)] ? static_cast<double>(perm[size_t(i)] + 1) / 16.0 : kNaN;
  ReferenceEntropies out;
  out.tensor = tensor_from(r, lead, torch::kFloat, device);
  out.values = Eigen::Map<Vec>(r.data(), n);
  return out;
}

/// The keep-decision values of the valid rows, in row order: `reference` when given, else the
/// rows' own entropies.
std::vector<double> decision_values(const OracleRows& rows, const Vec* reference) {
  std::vector<double> decision;
  for (Eigen::Index i = 0; i < static_cast<Eigen::Index>(rows.valid.size()); ++i)
    if (rows.valid[size_t(i)]) decision.push_back(reference ? (*reference)(i) : rows.entropy(i));
  return decision;
}

/// The upstream gradient of a grid case, in the loss dtype on `device`: random in [-2, 2] per
/// token for Reduction::None (`per_token` holds the rounded values), else 0.75 when `scaled`, else
/// undefined (plain backward(), `scalar` 1).
struct Upstream {
  torch::Tensor tensor;
  Vec per_token;
  double scalar = 1.0;
};

Upstream random_upstream(std::mt19937_64& rng, Reduction reduction, bool scaled, const Shape& lead,
                         torch::Dtype loss_dtype, torch::Device device) {
  Upstream up;
  if (reduction == Reduction::None) {
    std::uniform_real_distribution<double> u(-2.0, 2.0);
    std::vector<double> values(static_cast<size_t>(numel_of(lead)));
    for (auto& x : values) x = u(rng);
    up.tensor = tensor_from(values, lead, loss_dtype, device);
    up.per_token = as_vector(up.tensor);
  } else if (scaled) {
    up.scalar = 0.75;
    up.tensor = torch::full({}, up.scalar, torch::TensorOptions().dtype(loss_dtype).device(device));
  }
  return up;
}

/// backward() of `loss`, with `upstream` as its gradient when defined.
void backward_with(const torch::Tensor& loss, const torch::Tensor& upstream) {
  if (upstream.defined()) {
    loss.backward(upstream);
  } else {
    loss.backward();
  }
}

/// A fresh leaf copy of `t` that requires grad (undefined stays undefined).
torch::Tensor leaf(const torch::Tensor& t) {
  return t.defined() ? t.detach().clone().requires_grad_(true) : torch::Tensor();
}

// ------------------------------------------------------------------------------------------------
// Tolerances (docs/numerics.md, "Loss: tolerances")
// ------------------------------------------------------------------------------------------------

struct Tolerance {
  double compute;   ///< relative to the size of the rounded terms (fp32 or fp64 arithmetic)
  double out_rtol;  ///< relative, for rounding the gradient (and the upstream) to the logits' dtype
  double out_atol;  ///< absolute floor (fp16 subnormals)
};

Tolerance tolerance_for(torch::Dtype d) {
  const double u16 = std::ldexp(1.0, -11), ubf = std::ldexp(1.0, -8);
  const double u32 = std::ldexp(1.0, -24), u64 = std::ldexp(1.0, -53);
  if (d == torch::kDouble) return {1e-12, 4 * u64, 0.0};
  if (d == torch::kFloat) return {1e-5, 4 * u32, 0.0};
  if (d == torch::kBFloat16) return {1e-5, 4 * ubf, 0.0};
  return {1e-5, 4 * u16, std::ldexp(1.0, -23)};  // float16
}

/// Worst observed |error| / tolerance per quantity and dtype (printed with SLOWED_TEST_REPORT=1).
std::map<std::string, double>& worst_ratio() {
  static std::map<std::string, double> m;
  return m;
}

void print_worst_ratios() {
  if (!std::getenv("SLOWED_TEST_REPORT")) return;
  for (const auto& kv : worst_ratio())
    std::cout << "worst |error| / tolerance  " << kv.first << ": " << kv.second << "\n";
}

/// "" when |actual - expected| <= tol elementwise (NaN never passes), else the worst element.
std::string compare(const Mat& actual, const Mat& expected, const Mat& tol, const std::string& what,
                    const std::string& key) {
  double worst = 0.0;
  Eigen::Index wi = -1, wj = -1;
  for (Eigen::Index i = 0; i < actual.rows(); ++i) {
    for (Eigen::Index j = 0; j < actual.cols(); ++j) {
      const double err = std::abs(actual(i, j) - expected(i, j));
      double ratio = tol(i, j) > 0 ? err / tol(i, j) : (err == 0 ? 0.0 : kInf);
      if (std::isnan(err)) ratio = kInf;
      if (wi < 0 || ratio > worst) {
        worst = ratio;
        wi = i;
        wj = j;
      }
    }
  }
  if (wi < 0) return "";
  double& w = worst_ratio()[key];
  w = std::max(w, worst);
  if (worst <= 1.0) return "";
  std::ostringstream os;
  os.precision(10);
  os << what << " mismatch at (" << wi << ", " << wj << "): library " << actual(wi, wj)
     << ", oracle " << expected(wi, wj) << ", |error| " << std::abs(actual(wi, wj) - expected(wi, wj))
     << " > tolerance " << tol(wi, wj);
  return os.str();
}

std::string compare_scalar(double actual, double expected, double tol, const std::string& what,
                           const std::string& key) {
  Mat a(1, 1), e(1, 1), t(1, 1);
  a(0, 0) = actual;
  e(0, 0) = expected;
  t(0, 0) = tol;
  return compare(a, e, t, what, key);
}

/// Stats: 0-dim, documented dtypes, on `device`, equal to the oracle's.
void check_stats(const EntropyMaskStats& s, const OracleResult& o, const Tolerance& tol,
                 torch::Device device, bool exact_threshold, const std::string& key) {
  for (const torch::Tensor* t :
       {&s.num_valid, &s.num_kept, &s.kept_fraction, &s.mean_entropy, &s.threshold}) {
    REQUIRE(t->defined());
    CHECK(t->dim() == 0);
    CHECK(t->device() == device);
  }
  CHECK(s.num_valid.scalar_type() == torch::kLong);
  CHECK(s.num_kept.scalar_type() == torch::kLong);
  CHECK(s.kept_fraction.scalar_type() == torch::kFloat);
  CHECK(s.mean_entropy.scalar_type() == torch::kFloat);
  CHECK(s.threshold.scalar_type() == torch::kFloat);
  CHECK(s.num_valid.item<int64_t>() == o.num_valid);
  CHECK(s.num_kept.item<int64_t>() == o.num_kept);
  const double f32 = std::ldexp(1.0, -23);  // the stats are fp32 whatever the logits' dtype
  std::string msg = compare_scalar(scalar_of(s.kept_fraction), o.kept_fraction, f32, "kept_fraction",
                                   key + " kept_fraction");
  INFO(msg);
  CHECK(msg.empty());
  // mean_entropy is an fp32 sum of num_valid fp32 entropies: (num_valid + 1) roundings.
  msg = compare_scalar(scalar_of(s.mean_entropy), o.mean_entropy,
                       tol.compute * o.mean_entropy_scale +
                           f32 * static_cast<double>(o.num_valid + 1) * std::abs(o.mean_entropy),
                       "mean_entropy", key + " mean_entropy");
  INFO(msg);
  CHECK(msg.empty());
  const double thr = scalar_of(s.threshold);
  if (std::isinf(o.threshold)) {
    CHECK((std::isinf(thr) && thr > 0));
  } else if (exact_threshold || o.threshold_row < 0) {
    CHECK(thr == o.threshold);
  } else {
    msg = compare_scalar(thr, o.threshold,
                         tol.compute * o.rows.scale(o.threshold_row) + f32 * std::abs(o.threshold),
                         "threshold", key + " threshold");
    INFO(msg);
    CHECK(msg.empty());
  }
}

}  // namespace

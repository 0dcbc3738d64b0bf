#pragma once

// Plain-ATen reference implementation of entropy-masked cross-entropy.
//
// It is the fallback for every device and dtype without a fused kernel and the oracle the fused
// kernels are tested against. It works in row chunks so that its fp32 temporaries stay below
// `kReferenceChunkElements` elements whatever N is. Three phases:
//   A. per row: log-sum-exp, entropy and the unweighted per-token loss (one read of the logits);
//   B. per call: the keep decision and the per-row weights (O(N) work on [N] vectors);
//   C. per row: the gradient, weighted, in the logits' dtype (a second read of the logits).
// The fused kernels compute the same quantities; docs/numerics.md gives the formulas.

#include <slowed/detail/check.h>
#include <slowed/dist/global_mask.h>
#include <slowed/loss/entropy_mask_stats.h>
#include <slowed/loss/entropy_masked_cross_entropy_options.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <limits>

namespace slowed {
namespace detail {

/// Upper bound on the elements of one row chunk's temporaries (about 256 MB in fp32).
inline constexpr int64_t kReferenceChunkElements = int64_t(1) << 26;

inline at::ScalarType compute_dtype(at::ScalarType logits_dtype) {
  return logits_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline int64_t reference_chunk_rows(int64_t vocab) {
  return std::max<int64_t>(1, kReferenceChunkElements / std::max<int64_t>(vocab, 1));
}

/// Rows [n, V] in the compute dtype with the softcap applied.
inline at::Tensor capped_rows(const at::Tensor& rows, double softcap) {
  at::Tensor z = rows.to(compute_dtype(rows.scalar_type()));
  if (softcap > 0.0) z = at::tanh(z / softcap) * softcap;
  return z;
}

/// Per-row terms of the loss, all [N] in the compute dtype.
struct RowTerms {
  at::Tensor lse;      ///< log-sum-exp of the (capped) logits; NaN when not finite
  at::Tensor entropy;  ///< -sum p log p, clamped at 0; NaN where lse is NaN
  at::Tensor loss;     ///< unweighted per-token loss (label smoothing and z-loss included)
};

/// Phase A for rows `z2d` [N, V] with `safe_targets` [N] int64 in [0, V).
inline RowTerms reference_row_terms(const at::Tensor& z2d, const at::Tensor& safe_targets,
                                    const EntropyMaskedCrossEntropyOptions& opt) {
  const int64_t n = z2d.size(0), vocab = z2d.size(1);
  const auto cdt = compute_dtype(z2d.scalar_type());
  auto f = z2d.options().dtype(cdt);
  RowTerms out{at::empty({n}, f), at::empty({n}, f), at::empty({n}, f)};
  const double eps = opt.label_smoothing(), zs = opt.lse_square_scale();
  const int64_t step = reference_chunk_rows(vocab);
  for (int64_t r0 = 0; r0 < n; r0 += step) {
    const int64_t len = std::min(step, n - r0);
    at::Tensor z = capped_rows(z2d.narrow(0, r0, len), opt.softcap());  // [len, V]
    at::Tensor lse = at::logsumexp(z, {1});                              // [len]
    // Not finite (a NaN or +Inf logit, every logit -Inf): NaN, as the fused kernels report it;
    // the entropy and the loss follow as NaN.
    lse = at::where(at::isfinite(lse), lse, at::full({}, std::numeric_limits<double>::quiet_NaN(),
                                                     lse.options()));
    at::Tensor p = at::exp(z - lse.unsqueeze(1));                        // [len, V]
    // p * z is 0 where p underflows to 0 (z may be -inf there: 0 * -inf would be NaN).
    at::Tensor pz = at::where(p > 0, p * z, at::zeros({}, p.options())).sum({1});
    at::Tensor zt = z.gather(1, safe_targets.narrow(0, r0, len).unsqueeze(1)).squeeze(1);
    at::Tensor loss = lse - zt;
    if (eps > 0.0) loss = (1.0 - eps) * loss + eps * (lse - z.mean({1}));
    if (zs > 0.0) loss = loss + zs * lse * lse;
    out.lse.narrow(0, r0, len).copy_(lse);
    out.entropy.narrow(0, r0, len).copy_((lse - pz).clamp_min(0.0));
    out.loss.narrow(0, r0, len).copy_(loss);
  }
  return out;
}

/// Phase C: writes weight[i] * dloss_i/dlogits into `grad_out` [N, V] (logits' dtype, may
/// alias `z2d`). Rows with weight 0 get exact zeros.
inline void reference_row_grad(const at::Tensor& z2d, const at::Tensor& safe_targets,
                               const at::Tensor& lse, const at::Tensor& weight,
                               const EntropyMaskedCrossEntropyOptions& opt, at::Tensor& grad_out) {
  const int64_t n = z2d.size(0), vocab = z2d.size(1);
  const double eps = opt.label_smoothing(), zs = opt.lse_square_scale(), cap = opt.softcap();
  const int64_t step = reference_chunk_rows(vocab);
  for (int64_t r0 = 0; r0 < n; r0 += step) {
    const int64_t len = std::min(step, n - r0);
    at::Tensor z = capped_rows(z2d.narrow(0, r0, len), cap);
    at::Tensor l = lse.narrow(0, r0, len).unsqueeze(1);
    at::Tensor w = weight.narrow(0, r0, len).unsqueeze(1);
    // d/dz [(1-eps)(lse - z_t) + eps(lse - mean z) + zs lse^2] = p (1 + 2 zs lse) - (1-eps) 1_t - eps/V
    at::Tensor g = at::exp(z - l);
    if (zs > 0.0) g = g * (1.0 + 2.0 * zs * l);
    g.scatter_add_(1, safe_targets.narrow(0, r0, len).unsqueeze(1),
                   at::full({len, 1}, -(1.0 - eps), g.options()));
    if (eps > 0.0) g = g - eps / static_cast<double>(vocab);
    if (cap > 0.0) g = g * (1.0 - (z / cap) * (z / cap));  // d(cap tanh(x/cap))/dx
    g = at::where(w != 0, g * w, at::zeros({}, g.options()));
    grad_out.narrow(0, r0, len).copy_(g);
  }
}

/// keep = valid & (H >= threshold), written as !(H < thr) && !isnan(H) so that a NaN
/// (reference) entropy is masked, never kept.
inline at::Tensor keep_from_threshold(const at::Tensor& h, const at::Tensor& valid,
                                      const at::Tensor& threshold) {
  return valid & ~(h < threshold) & ~at::isnan(h);
}

/// Phase B result: which tokens stay in the loss and the threshold that decided it.
struct MaskDecision {
  at::Tensor keep;       ///< bool [N]
  at::Tensor threshold;  ///< 0-dim fp32
};

/// Phase B. `decision_entropy` [N] (current or reference entropies), `valid` bool [N].
/// Absolute: keep = valid & (H >= threshold).
/// Ratio: k = floor(q * n_valid); threshold = the (k+1)-th smallest valid entropy (+inf when
/// k = n_valid); keep = valid & (H >= threshold). Ties at the threshold are kept, so at most k
/// tokens are masked. No host synchronization. With `group`, ratio mode's k, n_valid and
/// threshold are those of every rank's tokens together (dist::global_ratio_threshold: sums over
/// the group, so every rank must call); absolute mode needs no group.
inline MaskDecision decide_mask(const at::Tensor& decision_entropy, const at::Tensor& valid,
                                const EntropyMaskedCrossEntropyOptions& opt,
                                dist::Communicator* group = nullptr) {
  auto f32 = decision_entropy.options().dtype(at::kFloat);
  const double inf = std::numeric_limits<double>::infinity();
  at::Tensor h = decision_entropy.to(at::kFloat);
  at::Tensor thr;
  if (opt.threshold_mode() == ThresholdMode::Absolute) {
    thr = at::full({}, opt.entropy_threshold(), f32);
  } else if (group != nullptr) {
    thr = dist::global_ratio_threshold(h, valid, opt.mask_ratio(), *group);
  } else if (h.numel() == 0) {
    thr = at::full({}, inf, f32);
  } else {
    at::Tensor sorted = std::get<0>(at::sort(at::where(valid, h, at::full({}, inf, f32))));
    at::Tensor n_valid = valid.sum();
    at::Tensor k = at::floor(n_valid.to(at::kDouble) * opt.mask_ratio()).to(at::kLong);
    at::Tensor idx = k.clamp_max(h.numel() - 1).reshape({1});
    thr = at::where(k >= n_valid, at::full({}, inf, f32), sorted.index_select(0, idx).squeeze(0));
  }
  return {keep_from_threshold(h, valid, thr), thr};
}

/// Everything one call produces.
struct ForwardResult {
  at::Tensor loss;  ///< 0-dim, or shaped like targets for Reduction::None (compute dtype)
  /// keep_i * dloss_i/dlogits_i [N, V] in the logits' dtype (undefined if not asked). Not yet
  /// normalized: the kept-token count is known only after all rows.
  at::Tensor grad;
  at::Tensor grad_scale;  ///< 0-dim normalization the backward applies (1/n_kept, 1/n_valid, 1)
  EntropyMaskStats stats;
};

/// Validated, flattened inputs of one call.
struct FlatInputs {
  at::Tensor logits;        ///< [N, V]
  at::Tensor targets;       ///< [N] int64
  at::Tensor safe_targets;  ///< [N] int64 in [0, V): targets, or 0 where invalid
  at::Tensor valid;         ///< [N] bool
  at::Tensor reference;     ///< [N] or undefined
};

/// Phase B's normalization: 1 / n_kept, 1 / n_valid, or 1 (0-dim, compute dtype).
inline at::Tensor normalization(const at::Tensor& n_valid, const at::Tensor& n_kept,
                                at::ScalarType cdt, Reduction r) {
  switch (r) {
    case Reduction::MeanKept:
      return 1.0 / n_kept.clamp_min(1).to(cdt);
    case Reduction::MeanValid:
      return 1.0 / n_valid.clamp_min(1).to(cdt);
    case Reduction::Sum:
    case Reduction::None:
      break;
  }
  return at::ones({}, n_valid.options().dtype(cdt));
}

/// Phase B's statistics from the per-row vectors (all [N]): counts, kept fraction, mean current
/// entropy of the valid tokens, and the threshold of the decision.
/// The valid tokens' entropy sum (fp32, 0-dim).
inline at::Tensor valid_entropy_sum(const at::Tensor& valid, const at::Tensor& entropy) {
  return at::where(valid, entropy.to(at::kFloat),
                   at::zeros({}, entropy.options().dtype(at::kFloat)))
      .sum();
}

/// Statistics from a call's counts (int64), the valid tokens' entropy sum and the threshold.
inline EntropyMaskStats stats_from_totals(const at::Tensor& n_valid, const at::Tensor& n_kept,
                                          const at::Tensor& entropy_sum,
                                          const at::Tensor& threshold) {
  EntropyMaskStats s;
  const at::Tensor denominator = n_valid.clamp_min(1).to(at::kFloat);
  s.num_valid = n_valid;
  s.num_kept = n_kept;
  s.kept_fraction = n_kept.to(at::kFloat) / denominator;
  s.mean_entropy = entropy_sum.to(at::kFloat) / denominator;
  s.threshold = threshold;
  return s;
}

inline EntropyMaskStats mask_stats(const at::Tensor& valid, const at::Tensor& entropy,
                                   const at::Tensor& n_valid, const at::Tensor& n_kept,
                                   const at::Tensor& threshold) {
  return stats_from_totals(n_valid, n_kept, valid_entropy_sum(valid, entropy), threshold);
}

/// Phase B of one call, everything after the row terms: the keep decision, the normalization,
/// the reduced loss and the statistics.
struct CallReduction {
  at::Tensor keep;        ///< bool [N]
  at::Tensor loss;        ///< 0-dim, or `loss_shape` for Reduction::None (compute dtype)
  at::Tensor grad_scale;  ///< 0-dim factor the backward applies to the keep-masked gradient
  EntropyMaskStats stats;
};

/// The options every rank of a group must share, checked before the call's sums (their
/// number and sizes depend on them); docs/distributed.md.
inline void check_same_call_on_all_ranks(const EntropyMaskedCrossEntropyOptions& opt,
                                         dist::Communicator& group, const at::Device& device) {
  auto bits = [](double x) {
    int64_t b;
    std::memcpy(&b, &x, sizeof b);
    return b;
  };
  const bool ratio = opt.threshold_mode() == ThresholdMode::Ratio;
  dist::check_same_on_all_ranks(
      {static_cast<int64_t>(opt.threshold_mode()),
       bits(ratio ? opt.mask_ratio() : opt.entropy_threshold()),
       static_cast<int64_t>(opt.reduction()), static_cast<int64_t>(opt.gradient_reduction()),
       opt.ignore_index(), bits(opt.label_smoothing()), bits(opt.lse_square_scale()),
       bits(opt.softcap())},
      {"threshold mode (absolute or ratio)", ratio ? "mask_ratio" : "entropy_threshold",
       "reduction", "gradient reduction", "ignore_index", "label_smoothing", "lse_square_scale",
       "softcap"},
      device, group);
}

/// Phase B over this call's tokens, or, when the options carry a process group, over the
/// tokens of every rank's call: the threshold (ratio mode), the counts behind the normalization,
/// the loss and the statistics are then those of the global batch; the loss's gradient is the
/// global loss's gradient with respect to this rank's inputs, times the world size for
/// dist::GradientReduction::Mean. `decision_entropy`, `valid`, `terms` are [N].
inline CallReduction reduce_call(const at::Tensor& decision_entropy, const at::Tensor& valid,
                                 const RowTerms& terms, at::IntArrayRef loss_shape,
                                 const EntropyMaskedCrossEntropyOptions& opt) {
  const auto cdt = terms.loss.scalar_type();
  const at::Tensor zero = at::zeros({}, terms.loss.options());
  dist::Communicator* group = opt.process_group().get();
  // The options check precedes the decision's sums (their number depends on the mode).
  if (group != nullptr && opt.check_inputs())
    check_same_call_on_all_ranks(opt, *group, decision_entropy.device());
  MaskDecision d = decide_mask(decision_entropy, valid, opt, group);
  at::Tensor kept_loss = at::where(d.keep, terms.loss, zero);
  CallReduction r;
  r.keep = d.keep;
  if (group == nullptr) {
    at::Tensor n_valid = valid.sum();
    at::Tensor n_kept = d.keep.sum();
    r.grad_scale = normalization(n_valid, n_kept, cdt, opt.reduction());
    r.loss = opt.reduction() == Reduction::None ? kept_loss.reshape(loss_shape)
                                                : kept_loss.sum() * r.grad_scale;
    r.stats = mask_stats(valid, terms.entropy, n_valid, n_kept, d.threshold);
    return r;
  }
  dist::GlobalTotals g = dist::global_totals(valid.sum(), d.keep.sum(),
                                             valid_entropy_sum(valid, terms.entropy),
                                             kept_loss.sum(), *group);
  at::Tensor value_scale = normalization(g.n_valid, g.n_kept, cdt, opt.reduction());
  r.grad_scale = opt.gradient_reduction() == dist::GradientReduction::Mean
                     ? value_scale * static_cast<double>(group->world_size())
                     : value_scale;
  r.loss = opt.reduction() == Reduction::None ? kept_loss.reshape(loss_shape)
                                              : g.loss_sum.to(cdt) * value_scale;
  r.stats = stats_from_totals(g.n_valid, g.n_kept, g.entropy_sum, d.threshold);
  return r;
}

/// Backward on the reference path: out = grad * factor in the compute dtype, rounded once to
/// the gradient's dtype. `factor` is 0-dim or [N] (per row); `out` may alias `grad`.
inline void reference_scale_rows(const at::Tensor& grad, const at::Tensor& factor,
                                 at::Tensor& out) {
  const int64_t n = grad.size(0), vocab = grad.size(1);
  const auto cdt = compute_dtype(grad.scalar_type());
  const int64_t step = reference_chunk_rows(vocab);
  for (int64_t r0 = 0; r0 < n; r0 += step) {
    const int64_t len = std::min(step, n - r0);
    at::Tensor f = factor.dim() == 0 ? factor : factor.narrow(0, r0, len).unsqueeze(1);
    out.narrow(0, r0, len).copy_(grad.narrow(0, r0, len).to(cdt) * f);
  }
}

}  // namespace detail
}  // namespace slowed

#pragma once

// EntropyMaskedLinearCrossEntropy: the LM head (logits = hidden · weightᵀ + bias) fused with
// entropy-masked cross-entropy, chunked over tokens, so that the [N, V] logits never exist.
//
// What is fused and why: with V = 151,936 the logits of 4096 tokens are 2.5 GB in fp32 and their
// gradient as much again. Here the tokens are processed in chunks of C rows (C from a memory
// budget, docs/design.md); per chunk:
//   1. z = h_c · Wᵀ (+ b): one ATen GEMM into a reused [C, V] buffer (MKL/oneDNN, cuBLAS);
//   2. the loss's own row pass over z (fused CPU or CUDA kernel, or the ATen reference): log-sum-
//      exp, entropy, token loss, keep decision and, when wanted, the gradient written over z;
//   3. the kept rows are moved to the front of the buffer (masked rows cost nothing below), then
//      d_hidden[kept] = dZ · W and dW += dZᵀ · h[kept], db += Σ dZ: two GEMMs on kept rows only.
// Memory beyond the outputs (d_hidden [N, D], dW [V, D], db [V]) is one chunk, independent of N.
//
// Two schedules (docs/design.md, "Fused linear loss"):
//   * absolute threshold with a scalar reduction: everything above happens in the forward; the
//     backward only multiplies d_hidden, dW and db by upstream × normalization (n_kept is known
//     after the last chunk). GEMM work: 1 + 2k logits-GEMMs (k: kept fraction).
//   * ratio mode (the threshold is a quantile of all N entropies) or Reduction::None (dW needs
//     each token's upstream gradient): the forward makes passes 1-2 without gradients and decides
//     the mask over all tokens; the backward recomputes the logits of the kept rows only, chunk by
//     chunk, and makes the gradient pass and the GEMMs with exact per-row factors. GEMM work:
//     1 + 3k logits-GEMMs.

#include <slowed/detail/check.h>
#include <slowed/loss/entropy_mask_stats.h>
#include <slowed/loss/entropy_masked_cross_entropy.h>
#include <slowed/loss/entropy_masked_cross_entropy_options.h>
#include <slowed/loss/entropy_masked_linear_cross_entropy_options.h>

#include <ATen/ATen.h>
#include <slowed/cpu/parallel.h>
#include <torch/autograd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <utility>
#include <vector>

namespace slowed {
namespace detail {

/// Tokens per chunk. A chunk row costs `vocab` elements of logits (overwritten by their
/// gradient), on CUDA up to half a row more for the compaction copy, two `dim`-wide rows (the
/// kept hidden rows gathered for dW, the row's d_hidden before it is scattered) and 16 bytes of
/// per-row terms; the chunk takes as many rows as `budget` bytes hold (at least 1), and the
/// chunks of one call are balanced (sizes differ by at most 1 row).
inline int64_t linear_ce_chunk_rows(int64_t n, int64_t vocab, int64_t dim, int64_t elem_size,
                                    bool cuda, int64_t budget, int64_t fixed_rows = 0) {
  const int64_t total = std::max<int64_t>(n, 1);
  if (fixed_rows > 0) return std::min(fixed_rows, total);
  const int64_t row_bytes = vocab * elem_size * (cuda ? 3 : 2) / 2 + 2 * dim * elem_size + 16;
  const int64_t rows = std::max<int64_t>(1, budget / row_bytes);
  if (rows >= total) return total;
  const int64_t chunks = (total + rows - 1) / rows;
  return (total + chunks - 1) / chunks;
}

/// Shape/dtype/device checks of the linear loss, before any work.
inline void check_linear_loss_arguments(const at::Tensor& hidden, const at::Tensor& weight,
                                        const at::Tensor& bias, const at::Tensor& targets,
                                        const at::Tensor& reference_entropy) {
  TORCH_CHECK(hidden.defined(), "hidden: expected a tensor, got an undefined tensor");
  TORCH_CHECK(weight.defined(), "weight: expected a tensor, got an undefined tensor");
  TORCH_CHECK(targets.defined(), "targets: expected a tensor, got an undefined tensor");
  TORCH_CHECK(hidden.dim() >= 2, "hidden: expected shape [..., D] with at least one leading "
              "dimension, got ", shape_string(hidden.sizes()));
  TORCH_CHECK(is_supported_float(hidden.scalar_type()),
              "hidden: expected dtype float32, bfloat16, float16 or float64, got ",
              hidden.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(-1) && weight.size(0) > 0,
              "weight: expected shape [V, D] with V >= 1 and D = ", hidden.size(-1),
              " (hidden's last dimension), got ", shape_string(weight.sizes()));
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "weight: expected dtype ",
              hidden.scalar_type(), " (hidden's dtype), got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == hidden.device(), "weight: expected device ", hidden.device(),
              " (hidden's device), got ", weight.device());
  if (bias.defined()) {
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), "bias: expected shape [",
                weight.size(0), "] (weight's V), got ", shape_string(bias.sizes()));
    TORCH_CHECK(bias.scalar_type() == hidden.scalar_type(), "bias: expected dtype ",
                hidden.scalar_type(), " (hidden's dtype), got ", bias.scalar_type());
    TORCH_CHECK(bias.device() == hidden.device(), "bias: expected device ", hidden.device(),
                " (hidden's device), got ", bias.device());
  }
  check_target_dtype(targets);
  const auto lead = hidden.sizes().slice(0, hidden.dim() - 1);
  TORCH_CHECK(targets.sizes() == lead, "targets: expected shape ", shape_string(lead),
              " to match hidden ", shape_string(hidden.sizes()), ", got ",
              shape_string(targets.sizes()));
  TORCH_CHECK(targets.device() == hidden.device(), "targets: expected device ", hidden.device(),
              " (hidden's device), got ", targets.device());
  check_reference_entropy(reference_entropy, lead, hidden.device());
}

/// The flattened inputs of one call. `rows.logits` is the chunk buffer [C, V]: the shared data
/// checks read only its width.
struct LinearInputs {
  at::Tensor hidden;  ///< [N, D]
  at::Tensor weight;  ///< [V, D]
  at::Tensor bias;    ///< [V] or undefined
  FlatInputs rows;    ///< targets, safe_targets, valid, reference: [N]
};

inline LinearInputs flatten_linear_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                                          const at::Tensor& bias, const at::Tensor& targets,
                                          const at::Tensor& reference_entropy, int64_t ignore_index) {
  const int64_t dim = hidden.size(-1), vocab = weight.size(0);
  const int64_t n = hidden.numel() / std::max<int64_t>(dim, 1);
  LinearInputs in;
  in.hidden = hidden.reshape({n, dim}).contiguous();
  in.weight = weight;
  in.bias = bias;
  FlatInputs& r = in.rows;
  r.targets = targets.reshape({n}).to(at::kLong).contiguous();
  r.valid = r.targets != ignore_index;
  at::Tensor in_range = (r.targets >= 0) & (r.targets < vocab);
  r.safe_targets = at::where(r.valid & in_range, r.targets, at::zeros({}, r.targets.options()));
  if (reference_entropy.defined()) r.reference = reference_entropy.reshape({n});
  return in;
}

/// z = h · Wᵀ (+ b), written into `out` [rows of h, V].
inline void head_logits(const LinearInputs& in, const at::Tensor& h, at::Tensor& out) {
  if (in.bias.defined()) {
    at::addmm_out(out, in.bias, h, in.weight.t());
  } else {
    at::mm_out(out, h, in.weight.t());
  }
}

/// The rows `rows` [len] (or len rows from `begin` when `rows` is undefined) of the per-token
/// inputs, with the chunk's logits `z`.
inline FlatInputs chunk_inputs(const FlatInputs& all, const at::Tensor& z, int64_t begin,
                               const at::Tensor& rows) {
  const int64_t len = z.size(0);
  auto pick = [&](const at::Tensor& t) {
    if (!t.defined()) return at::Tensor();
    return rows.defined() ? t.index_select(0, rows) : t.narrow(0, begin, len);
  };
  FlatInputs c;
  c.logits = z;
  c.targets = pick(all.targets);
  c.safe_targets = pick(all.safe_targets);
  c.valid = pick(all.valid);
  c.reference = pick(all.reference);
  return c;
}

/// The loss's row pass over one chunk: per-row terms, and with `write_grad` the unnormalized
/// gradient keep_i · dℓ_i/dz_i over `c.logits`. `keep` [len]: which rows get a gradient (the
/// caller's decision; the fused kernels decide alike in absolute mode and keep every valid row
/// otherwise, so only the reference path needs it); undefined without `write_grad`.
inline RowTerms chunk_row_pass(const FlatInputs& c, const EntropyMaskedCrossEntropyOptions& opt,
                               bool write_grad, const std::function<at::Tensor(const RowTerms&)>& keep) {
  at::Tensor grad = write_grad ? c.logits : at::Tensor();
  at::Tensor kernel_keep;
  if (use_fused_cpu(c.logits, opt)) return fused_cpu_rows(c, opt, grad, kernel_keep);
  if (use_fused_cuda(c.logits, opt.use_reference())) return fused_cuda_rows(c, opt, grad, kernel_keep);
  RowTerms t = reference_row_terms(c.logits, c.safe_targets, opt);
  if (write_grad) {
    at::Tensor w = keep(t).to(compute_dtype(c.logits.scalar_type()));
    reference_row_grad(c.logits, c.safe_targets, t.lse, w, opt, grad);
  }
  return t;
}

/// Moves the gradients of the kept rows of `z` [len, V] to its first n_kept rows: each masked row
/// among those is overwritten by a kept row from behind, so at most min(masked, kept) rows move.
/// Returns, for each of the first n_kept rows, the chunk row it holds (int64 [n_kept]).
inline at::Tensor compact_kept_rows_(const at::Tensor& z, const at::Tensor& keep) {
  const int64_t len = z.size(0);
  const int64_t n_kept = keep.sum().item<int64_t>();
  at::Tensor origin = at::arange(n_kept, keep.options().dtype(at::kLong));
  at::Tensor holes = at::nonzero(keep.narrow(0, 0, n_kept).logical_not()).squeeze(1);
  if (holes.numel() == 0) return origin;
  at::Tensor movers = at::nonzero(keep.narrow(0, n_kept, len - n_kept)).squeeze(1) + n_kept;
  origin.index_copy_(0, holes, movers);
  if (z.is_cpu()) {
    // Source rows lie at or after n_kept, destinations before it: plain row copies, no overlap.
    const size_t row_bytes = static_cast<size_t>(z.size(1)) * z.element_size();
    char* base = static_cast<char*>(z.data_ptr());
    const int64_t* dst = holes.data_ptr<int64_t>();
    const int64_t* src = movers.data_ptr<int64_t>();
    slowed::cpu::parallel_for(0, holes.numel(), 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        std::memcpy(base + dst[i] * row_bytes, base + src[i] * row_bytes, row_bytes);
    });
  } else {
    z.index_copy_(0, holes, z.index_select(0, movers));
  }
  return origin;
}

/// Gradients of the head's inputs, accumulated chunk by chunk (not yet multiplied by the
/// upstream gradient and the normalization). Undefined where not wanted.
struct HeadGrads {
  at::Tensor hidden;  ///< [N, D], hidden's dtype; rows without a kept token stay 0
  at::Tensor weight;  ///< [V, D], weight's dtype (one rounding per chunk for bf16/fp16)
  at::Tensor bias;    ///< [V], compute dtype
  bool weight_written = false;

  HeadGrads() = default;
  HeadGrads(const LinearInputs& in, bool need_hidden, bool need_weight, bool need_bias) {
    if (need_hidden) hidden = at::zeros_like(in.hidden);
    if (need_weight) weight = at::empty(in.weight.sizes(), in.weight.options());
    if (need_bias) {
      bias = at::zeros({in.weight.size(0)},
                       in.weight.options().dtype(compute_dtype(in.weight.scalar_type())));
    }
  }

  /// Adds the contribution of gradient rows `dz` [k, V] (rows k of the call `rows` [k], hidden
  /// rows `h` [k, D]), each times `factor` [k] when defined.
  void add(const LinearInputs& in, const at::Tensor& dz, const at::Tensor& rows,
           const at::Tensor& h, const at::Tensor& factor) {
    if (dz.size(0) == 0) return;
    at::Tensor f = factor.defined() ? factor.unsqueeze(1) : at::Tensor();
    if (hidden.defined()) {
      at::Tensor part = at::mm(dz, in.weight);  // [k, D]
      if (f.defined()) part.mul_(f);
      hidden.index_copy_(0, rows, part);
    }
    if (weight.defined()) {
      // The factor goes on the narrow side, [k, D]: fp32 math, rounded once to h's dtype.
      at::Tensor hf = f.defined() ? (h * f).to(h.scalar_type()) : h;
      if (weight_written) {
        weight.addmm_(dz.t(), hf);
      } else {
        at::mm_out(weight, dz.t(), hf);
        weight_written = true;
      }
    }
    if (bias.defined()) {
      bias.add_(factor.defined() ? at::mv(dz.t(), factor.to(dz.scalar_type()))
                                 : dz.sum(0, /*keepdim=*/false, bias.scalar_type()));
    }
  }

  /// The gradients times `scale` (0-dim), in the inputs' dtypes; `hidden_shape` is hidden's.
  std::vector<at::Tensor> finish(const at::Tensor& scale, at::IntArrayRef hidden_shape,
                                 at::ScalarType dtype) {
    if (weight.defined() && !weight_written) weight.zero_();
    if (hidden.defined()) hidden = hidden.mul_(scale).view(hidden_shape);
    if (weight.defined()) weight.mul_(scale);
    if (bias.defined()) bias = bias.mul_(scale).to(dtype);
    return {hidden, weight, bias};
  }
};

/// Per-call state kept from the forward to the backward.
struct LinearForward {
  at::Tensor loss;
  at::Tensor keep;        ///< [N] bool
  at::Tensor grad_scale;  ///< 0-dim normalization
  EntropyMaskStats stats;
};

/// The forward on validated inputs. With `grads` (absolute mode, scalar reduction) the gradient
/// pass and the GEMMs run chunk by chunk here; otherwise only the row terms are computed.
inline LinearForward linear_ce_forward(const LinearInputs& in, const at::Tensor& targets_shape,
                                       const EntropyMaskedLinearCrossEntropyOptions& lopt,
                                       HeadGrads* grads) {
  const EntropyMaskedCrossEntropyOptions& opt = lopt.loss();
  const int64_t n = in.hidden.size(0), vocab = in.weight.size(0), dim = in.hidden.size(1);
  const auto cdt = compute_dtype(in.hidden.scalar_type());
  const int64_t chunk =
      linear_ce_chunk_rows(n, vocab, dim, in.hidden.element_size(), in.hidden.is_cuda(),
                           lopt.chunk_memory_budget(), lopt.chunk_rows());
  at::Tensor zbuf = at::empty({n > 0 ? chunk : 0, vocab}, in.hidden.options());
  FlatInputs all = in.rows;
  all.logits = zbuf;
  // Targets and reference entropies before any GEMM (the log-sum-exp check follows pass A).
  auto f = in.hidden.options().dtype(cdt);
  if (opt.check_inputs()) check_loss_data(all, at::zeros({n}, f), opt);

  RowTerms terms{at::empty({n}, f), at::empty({n}, f), at::empty({n}, f)};
  for (int64_t c0 = 0; c0 < n; c0 += chunk) {
    const int64_t len = std::min(chunk, n - c0);
    at::Tensor h = in.hidden.narrow(0, c0, len);
    at::Tensor z = zbuf.narrow(0, 0, len);
    head_logits(in, h, z);
    FlatInputs c = chunk_inputs(in.rows, z, c0, at::Tensor());
    at::Tensor keep_c;
    auto decide = [&](const RowTerms& t) {
      keep_c = decide_mask(c.reference.defined() ? c.reference : t.entropy, c.valid, opt).keep;
      return keep_c;
    };
    RowTerms t = chunk_row_pass(c, opt, grads != nullptr, decide);
    terms.lse.narrow(0, c0, len).copy_(t.lse);
    terms.entropy.narrow(0, c0, len).copy_(t.entropy);
    terms.loss.narrow(0, c0, len).copy_(t.loss);
    if (grads != nullptr) {
      if (!keep_c.defined()) decide(t);
      at::Tensor origin = compact_kept_rows_(z, keep_c);
      grads->add(in, z.narrow(0, 0, origin.numel()), origin + c0, h.index_select(0, origin),
                 at::Tensor());
    }
  }
  if (opt.check_inputs()) check_loss_data(all, terms.lse, opt);

  // In absolute mode the chunks' decisions are this one's (the same rule, row by row).
  CallReduction d =
      reduce_call(in.rows.reference.defined() ? in.rows.reference : terms.entropy, in.rows.valid,
                  terms, targets_shape.sizes(), opt);
  LinearForward r;
  r.keep = d.keep;
  r.grad_scale = d.grad_scale;
  r.loss = d.loss;
  r.stats = d.stats;
  return r;
}

/// The backward's gradient pass for ratio mode and Reduction::None: the logits of the kept rows
/// only, recomputed chunk by chunk, each row's gradient times `row_factor` [N] (undefined: 1).
inline void linear_ce_recompute_grads(const LinearInputs& in, const at::Tensor& keep,
                                      const EntropyMaskedLinearCrossEntropyOptions& lopt,
                                      const at::Tensor& row_factor, HeadGrads& grads) {
  // Every row of this pass is kept: ratio mode makes the kernels keep every valid row.
  EntropyMaskedCrossEntropyOptions opt = lopt.loss();
  opt.mask_ratio(0.0).check_inputs(false);
  at::Tensor kept = at::nonzero(keep).squeeze(1);
  const int64_t n_kept = kept.numel(), vocab = in.weight.size(0), dim = in.hidden.size(1);
  const int64_t chunk =
      linear_ce_chunk_rows(n_kept, vocab, dim, in.hidden.element_size(), in.hidden.is_cuda(),
                           lopt.chunk_memory_budget(), lopt.chunk_rows());
  at::Tensor zbuf = at::empty({n_kept > 0 ? chunk : 0, vocab}, in.hidden.options());
  for (int64_t c0 = 0; c0 < n_kept; c0 += chunk) {
    const int64_t len = std::min(chunk, n_kept - c0);
    at::Tensor rows = kept.narrow(0, c0, len);
    at::Tensor h = in.hidden.index_select(0, rows);
    at::Tensor z = zbuf.narrow(0, 0, len);
    head_logits(in, h, z);
    FlatInputs c = chunk_inputs(in.rows, z, 0, rows);
    chunk_row_pass(c, opt, true, [&](const RowTerms&) { return c.valid; });
    grads.add(in, z, rows, h,
              row_factor.defined() ? row_factor.index_select(0, rows) : at::Tensor());
  }
}

/// Custom autograd function over (hidden, weight, bias); see the file comment for the schedules.
struct EntropyMaskedLinearCrossEntropyFunction
    : public torch::autograd::Function<EntropyMaskedLinearCrossEntropyFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& hidden,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& targets,
                            const std::optional<at::Tensor>& reference_entropy,
                            const EntropyMaskedLinearCrossEntropyOptions& lopt, bool grad_enabled,
                            EntropyMaskStats* stats) {
    const EntropyMaskedCrossEntropyOptions& opt = lopt.loss();
    const at::Tensor b = bias.value_or(at::Tensor());
    const bool need_h = grad_enabled && hidden.requires_grad();
    const bool need_w = grad_enabled && weight.requires_grad();
    const bool need_b = grad_enabled && b.defined() && b.requires_grad();
    LinearInputs in = flatten_linear_inputs(hidden, weight, b, targets,
                                            reference_entropy.value_or(at::Tensor()),
                                            opt.ignore_index());
    // Gradients in the forward only where the upstream gradient is one scalar and each row's
    // keep decision is known in its chunk.
    const bool any_grad = need_h || need_w || need_b;
    const bool immediate = any_grad && opt.threshold_mode() == ThresholdMode::Absolute &&
                           opt.reduction() != Reduction::None;
    std::optional<HeadGrads> grads;
    if (immediate) grads.emplace(in, need_h, need_w, need_b);
    LinearForward r = linear_ce_forward(in, targets, lopt, immediate ? &*grads : nullptr);
    if (stats) *stats = r.stats;
    if (!any_grad) return r.loss;
    auto& saved = ctx->saved_data;
    saved["immediate"] = immediate;
    saved["grad_scale"] = r.grad_scale;
    saved["hidden_shape"] = hidden.sizes().vec();
    saved["dtype"] = static_cast<int64_t>(hidden.scalar_type());
    if (immediate) {
      saved["d_hidden"] = grads->hidden;
      saved["d_weight"] = grads->weight;
      saved["d_bias"] = grads->bias;
      saved["weight_written"] = grads->weight_written;
      return r.loss;
    }
    ctx->save_for_backward({hidden, weight, b});
    saved["targets"] = in.rows.targets;
    saved["keep"] = r.keep;
    saved["none"] = opt.reduction() == Reduction::None;
    saved["need_hidden"] = need_h;
    saved["need_weight"] = need_w;
    saved["need_bias"] = need_b;
    saved["ignore_index"] = opt.ignore_index();
    saved["label_smoothing"] = opt.label_smoothing();
    saved["lse_square_scale"] = opt.lse_square_scale();
    saved["softcap"] = opt.softcap();
    saved["use_reference"] = opt.use_reference();
    saved["chunk_memory_budget"] = lopt.chunk_memory_budget();
    saved["chunk_rows"] = lopt.chunk_rows();
    return r.loss;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    auto& saved = ctx->saved_data;
    const at::Tensor scale = saved["grad_scale"].toTensor();
    const auto dtype = static_cast<at::ScalarType>(saved["dtype"].toInt());
    const std::vector<int64_t> hidden_shape = saved["hidden_shape"].toIntVector();
    at::Tensor go = grad_outputs[0].to(scale.scalar_type());
    if (saved["immediate"].toBool()) {
      TORCH_CHECK(saved.count("d_hidden"),
                  "entropy_masked_linear_cross_entropy: backward ran a second time through the "
                  "same call; its gradients were consumed by the first backward (call the loss "
                  "again)");
      auto take = [&](const char* key) {
        at::Tensor t = saved[key].isTensor() ? saved[key].toTensor() : at::Tensor();
        saved.erase(key);
        return t;
      };
      HeadGrads g;
      g.hidden = take("d_hidden");
      g.weight = take("d_weight");
      g.bias = take("d_bias");
      g.weight_written = saved["weight_written"].toBool();
      auto out = g.finish(go.reshape({}) * scale, hidden_shape, dtype);
      return {out[0], out[1], out[2], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
              at::Tensor()};
    }
    const auto vars = ctx->get_saved_variables();
    const bool none = saved["none"].toBool();
    EntropyMaskedCrossEntropyOptions opt;
    opt.ignore_index(saved["ignore_index"].toInt())
        .label_smoothing(saved["label_smoothing"].toDouble())
        .lse_square_scale(saved["lse_square_scale"].toDouble())
        .softcap(saved["softcap"].toDouble())
        .use_reference(saved["use_reference"].toBool());
    EntropyMaskedLinearCrossEntropyOptions lopt(opt);
    lopt.chunk_memory_budget(saved["chunk_memory_budget"].toInt())
        .chunk_rows(saved["chunk_rows"].toInt());
    LinearInputs in =
        flatten_linear_inputs(vars[0], vars[1], vars[2], saved["targets"].toTensor(),
                              at::Tensor(), opt.ignore_index());
    HeadGrads g(in, saved["need_hidden"].toBool(), saved["need_weight"].toBool(),
                saved["need_bias"].toBool());
    const at::Tensor row_factor = none ? go.reshape({in.hidden.size(0)}) : at::Tensor();
    linear_ce_recompute_grads(in, saved["keep"].toTensor(), lopt, row_factor, g);
    auto out = g.finish(none ? at::ones({}, scale.options()) : go.reshape({}) * scale,
                        hidden_shape, dtype);
    return {out[0], out[1], out[2], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace detail

/// The LM head fused with entropy-masked cross-entropy, as a free function:
/// `entropy_masked_cross_entropy(hidden · weightᵀ + bias, targets)` without the [N, V] logits.
///
/// `hidden` [..., D] (float32, bfloat16, float16 or float64); `weight` [V, D] and `bias` [V]
/// (optional) in hidden's dtype on its device (a tied head passes the embedding matrix);
/// `targets` int64/int32 shaped like hidden without the last dimension; `reference_entropy` and
/// `stats` as in `entropy_masked_cross_entropy`. Gradients flow to hidden, weight and bias. The
/// loss is float32 (float64 for float64 inputs).
///
/// Example:
/// ```
/// auto opts = slowed::EntropyMaskedCrossEntropyOptions().entropy_threshold(0.3);
/// torch::Tensor loss = slowed::entropy_masked_linear_cross_entropy(
///     hidden, lm_head->weight, targets, opts);   // hidden [B, T, D], targets [B, T]
/// loss.backward();
/// ```
inline at::Tensor entropy_masked_linear_cross_entropy(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const EntropyMaskedLinearCrossEntropyOptions& options = {}, const at::Tensor& bias = {},
    const at::Tensor& reference_entropy = {}, EntropyMaskStats* stats = nullptr) {
  detail::check_linear_loss_arguments(hidden, weight, bias, targets, reference_entropy);
  std::optional<at::Tensor> b, reference;
  if (bias.defined()) b = bias;
  if (reference_entropy.defined()) reference = reference_entropy.detach();
  return detail::EntropyMaskedLinearCrossEntropyFunction::apply(
      hidden, weight, b, targets, reference, options, at::GradMode::is_enabled(), stats);
}

/// The LM head fused with entropy-masked cross-entropy, as a functor that keeps the last call's
/// statistics. Drops in for `lm_head` + `EntropyMaskedCrossEntropy`.
///
/// Example:
/// ```
/// slowed::EntropyMaskedLinearCrossEntropy loss_fn(
///     slowed::EntropyMaskedCrossEntropyOptions().entropy_threshold(0.3));
/// auto loss = loss_fn(hidden, lm_head->weight, targets);   // no [B, T, V] logits
/// loss.backward();
/// double kept = loss_fn.last_stats().kept_fraction.item<double>();
/// ```
class EntropyMaskedLinearCrossEntropy {
 public:
  explicit EntropyMaskedLinearCrossEntropy(EntropyMaskedLinearCrossEntropyOptions options = {})
      : options_(std::move(options)) {}

  at::Tensor forward(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                     const at::Tensor& bias = {}, const at::Tensor& reference_entropy = {}) {
    return entropy_masked_linear_cross_entropy(hidden, weight, targets, options_, bias,
                                               reference_entropy, &last_stats_);
  }
  at::Tensor operator()(const at::Tensor& hidden, const at::Tensor& weight,
                        const at::Tensor& targets, const at::Tensor& bias = {},
                        const at::Tensor& reference_entropy = {}) {
    return forward(hidden, weight, targets, bias, reference_entropy);
  }

  const EntropyMaskedLinearCrossEntropyOptions& options() const { return options_; }
  EntropyMaskedLinearCrossEntropyOptions& options() { return options_; }
  /// Statistics of the last call (undefined tensors before the first call).
  const EntropyMaskStats& last_stats() const { return last_stats_; }

 private:
  EntropyMaskedLinearCrossEntropyOptions options_;
  EntropyMaskStats last_stats_;
};

}  // namespace slowed

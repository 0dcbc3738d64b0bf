#pragma once

// EntropyMaskedCrossEntropy: cross-entropy with Low-Entropy Masking (SLowED, arXiv 2508.09666).
//
// Per token i with logits z_i over V classes: p = softmax(z_i), H_i = -sum_j p_j log p_j (fp32,
// no gradient). Tokens whose entropy is below a threshold are "already certain" and are left
// out of the loss; ignore_index tokens never count. The public layer validates the inputs once,
// then runs a custom autograd function whose forward computes the loss, the statistics and (when
// the logits require grad) the weighted gradient; backward only scales that gradient by the
// upstream gradient, per token for Reduction::None.

#include <slowed/cpu/entropy_masked_cross_entropy_cpu.h>
#include <slowed/cuda/entropy_masked_cross_entropy_cuda.h>
#include <slowed/detail/backend.h>
#include <slowed/detail/check.h>
#include <slowed/detail/gradient_workspace.h>
#include <slowed/loss/entropy_mask_stats.h>
#include <slowed/loss/entropy_masked_cross_entropy_options.h>
#include <slowed/loss/entropy_masked_cross_entropy_reference.h>

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <cstdint>
#include <iterator>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>

namespace slowed {
namespace detail {

/// The targets' dtype: the check both losses (this one and the fused linear loss) share.
inline void check_target_dtype(const at::Tensor& targets) {
  TORCH_CHECK(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt,
              "targets: expected integer class indices (int64 or int32), got ",
              targets.scalar_type());
}

/// The optional reference entropies against the targets' shape `lead` and the input's device:
/// the checks both losses share.
inline void check_reference_entropy(const at::Tensor& reference_entropy, at::IntArrayRef lead,
                                    const at::Device& device) {
  if (reference_entropy.defined()) {
    TORCH_CHECK(reference_entropy.is_floating_point(),
                "reference_entropy: expected a floating-point tensor, got ",
                reference_entropy.scalar_type());
    TORCH_CHECK(reference_entropy.sizes() == lead, "reference_entropy: expected shape ",
                shape_string(lead), " (the targets' shape), got ",
                shape_string(reference_entropy.sizes()));
    TORCH_CHECK(reference_entropy.device() == device,
                "reference_entropy: expected device ", device, ", got ",
                reference_entropy.device());
  }
}

/// Shape/dtype/device checks that need no look at the data.
inline void check_loss_arguments(const at::Tensor& logits, const at::Tensor& targets,
                                 const at::Tensor& reference_entropy,
                                 const EntropyMaskedCrossEntropyOptions& opt) {
  TORCH_CHECK(logits.defined(), "logits: expected a tensor, got an undefined tensor");
  TORCH_CHECK(targets.defined(), "targets: expected a tensor, got an undefined tensor");
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 3,
              "logits: expected shape [N, V] or [B, T, V], got ", shape_string(logits.sizes()));
  TORCH_CHECK(is_supported_float(logits.scalar_type()),
              "logits: expected dtype float32, bfloat16, float16 or float64, got ",
              logits.scalar_type());
  TORCH_CHECK(logits.size(-1) > 0, "logits: expected V >= 1 classes in the last dimension, got ",
              shape_string(logits.sizes()));
  check_target_dtype(targets);
  const auto lead = logits.sizes().slice(0, logits.dim() - 1);
  TORCH_CHECK(targets.sizes() == lead, "targets: expected shape ", shape_string(lead),
              " to match logits ", shape_string(logits.sizes()), ", got ",
              shape_string(targets.sizes()));
  TORCH_CHECK(targets.device() == logits.device(), "targets: expected device ",
              logits.device(), " (the logits' device), got ", targets.device());
  check_reference_entropy(reference_entropy, lead, logits.device());
  if (opt.inplace_backward() && logits.requires_grad()) {
    TORCH_CHECK(logits.is_contiguous(),
                "logits: inplace_backward needs contiguous logits (the gradient is written over "
                "them), got strides ", shape_string(logits.strides()));
  }
}

/// True when `logits` is a leaf or a view of one: autograd would then store the gradient this
/// call returns as the leaf's .grad, so an in-place gradient must be copied out first.
inline bool feeds_a_leaf(const at::Tensor& logits) {
  return logits.is_leaf() || (logits.is_view() && logits._base().is_leaf());
}

/// Byte ranges that an inplace_backward call overwrote with its gradient, per storage, with the
/// version counter value the write left. A later call reading the same bytes at that version
/// would read a gradient as logits; a write to the tensor since (copy_, a new forward into
/// the same buffer) bumps the version and clears the record. Thread-safe.
class OverwrittenLogits {
 public:
  static OverwrittenLogits& instance() {
    static OverwrittenLogits registry;
    return registry;
  }

  /// Records that `t`'s bytes now hold a gradient (at its current version).
  void record(const at::Tensor& t) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end();) {
      it = it->second.storage.expired() ? entries_.erase(it) : std::next(it);
    }
    Entry& e = entries_[t.storage().unsafeGetStorageImpl()];
    const int64_t version = t._version();
    if (e.storage.expired() || e.storage.lock().get() != t.storage().unsafeGetStorageImpl() ||
        e.version != version) {
      e = Entry{t.storage().getWeakStorageImpl(), version, {}};
    }
    e.ranges.push_back(range_of(t));
  }

  /// The version at which `t`'s bytes were overwritten, or -1 when they hold what was written
  /// last by an operation.
  int64_t overwritten_version(const at::Tensor& t) const {
    if (!t.has_storage() || t.is_inference()) return -1;
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = entries_.find(t.storage().unsafeGetStorageImpl());
    if (it == entries_.end() || it->second.version != t._version()) return -1;
    if (it->second.storage.lock().get() != t.storage().unsafeGetStorageImpl()) return -1;
    const auto r = range_of(t);
    for (const auto& w : it->second.ranges) {
      if (r.first < w.second && w.first < r.second) return it->second.version;
    }
    return -1;
  }

 private:
  struct Entry {
    c10::weak_intrusive_ptr<c10::StorageImpl> storage{c10::intrusive_ptr<c10::StorageImpl>()};
    int64_t version = -1;
    std::vector<std::pair<int64_t, int64_t>> ranges;  // [begin, end) in bytes
  };
  static std::pair<int64_t, int64_t> range_of(const at::Tensor& t) {
    const int64_t begin = t.storage_offset() * static_cast<int64_t>(t.element_size());
    return {begin, begin + t.numel() * static_cast<int64_t>(t.element_size())};
  }
  mutable std::mutex mutex_;
  std::unordered_map<const c10::StorageImpl*, Entry> entries_;
};

/// Refuses logits whose values an earlier inplace_backward call replaced by its gradient.
inline void check_not_overwritten(const at::Tensor& logits) {
  const int64_t v = OverwrittenLogits::instance().overwritten_version(logits);
  TORCH_CHECK(v < 0, "logits: expected logits, got a tensor whose values an earlier "
              "entropy_masked_cross_entropy call with inplace_backward replaced by its gradient "
              "(version ", v, "); compute the logits again");
}

inline FlatInputs flatten_inputs(const at::Tensor& logits, const at::Tensor& targets,
                                 const at::Tensor& reference_entropy,
                                 const EntropyMaskedCrossEntropyOptions& opt) {
  const int64_t vocab = logits.size(-1);
  const int64_t n = logits.numel() / vocab;
  FlatInputs in;
  in.logits = logits.reshape({n, vocab});
  in.targets = targets.reshape({n}).to(at::kLong);
  in.valid = in.targets != opt.ignore_index();
  at::Tensor in_range = (in.targets >= 0) & (in.targets < vocab);
  in.safe_targets = at::where(in.valid & in_range, in.targets, at::zeros({}, in.targets.options()));
  if (reference_entropy.defined()) in.reference = reference_entropy.reshape({n});
  return in;
}

/// Data checks (target range, finite log-sum-exp, finite reference entropies), with a single
/// host synchronization. Errors name the argument and the first offending position.
inline void check_loss_data(const FlatInputs& in, const at::Tensor& lse,
                            const EntropyMaskedCrossEntropyOptions& opt) {
  const int64_t vocab = in.logits.size(1);
  at::Tensor bad_target = in.valid & ((in.targets < 0) | (in.targets >= vocab));
  at::Tensor bad_row = ~at::isfinite(lse);
  at::Tensor bad_ref = in.reference.defined() ? in.valid & ~at::isfinite(in.reference)
                                              : at::zeros_like(in.valid);
  at::Tensor flags = at::stack({bad_target.any(), bad_row.any(), bad_ref.any()}).cpu();
  auto f = flags.accessor<bool, 1>();
  auto first = [](const at::Tensor& mask) { return at::nonzero(mask)[0][0].item<int64_t>(); };
  if (f[0]) {
    const int64_t i = first(bad_target);
    TORCH_CHECK(false, "targets: expected class indices in [0, ", vocab, ") or ignore_index (",
                opt.ignore_index(), "), got ", in.targets[i].item<int64_t>(),
                " at flat position ", i);
  }
  if (f[1]) {
    const int64_t i = first(bad_row);
    TORCH_CHECK(false, "logits: expected finite values, row ", i,
                " (flat position) has log-sum-exp ", lse[i].item<double>(),
                " (NaN or Inf logits)");
  }
  if (f[2]) {
    const int64_t i = first(bad_ref);
    TORCH_CHECK(false, "reference_entropy: expected finite values at valid tokens, got ",
                in.reference[i].item<double>(), " at flat position ", i);
  }
}

/// True when the fused CPU kernel serves this call (CPU tensors in fp32, bf16 or fp16).
inline bool use_fused_cpu(const at::Tensor& logits, const EntropyMaskedCrossEntropyOptions& opt) {
  const auto t = logits.scalar_type();
  return !opt.use_reference() && logits.is_cpu() &&
         (t == at::kFloat || t == at::kBFloat16 || t == at::kHalf);
}

/// A fused row kernel's launcher: cpu::emce_rows or cuda::emce_rows (the same arguments).
using RowsLauncher = decltype(&cuda::emce_rows);

/// Phase A (and C) with a fused row kernel: per-row terms, the kernel's keep decision and, when
/// `grad` is defined, keep_i * dloss_i/dz written into it.
inline RowTerms fused_rows(const FlatInputs& in, const EntropyMaskedCrossEntropyOptions& opt,
                           at::Tensor& grad, at::Tensor& kernel_keep, RowsLauncher launch) {
  const int64_t n = in.logits.size(0);
  auto f32 = in.logits.options().dtype(at::kFloat);
  RowTerms terms{at::empty({n}, f32), at::empty({n}, f32), at::empty({n}, f32)};
  kernel_keep = at::empty({n}, f32.dtype(at::kBool));
  at::Tensor reference = in.reference.defined() ? in.reference.to(at::kFloat).contiguous()
                                                : at::Tensor();
  launch(in.logits.contiguous(), grad, in.targets.contiguous(), reference, terms.lse,
         terms.entropy, terms.loss, kernel_keep, opt.ignore_index(),
         static_cast<float>(opt.label_smoothing()), static_cast<float>(opt.lse_square_scale()),
         static_cast<float>(opt.softcap()), opt.threshold_mode() == ThresholdMode::Absolute,
         static_cast<float>(opt.entropy_threshold()));
  return terms;
}

/// Phase A (and C) with the fused CUDA kernel.
inline RowTerms fused_cuda_rows(const FlatInputs& in, const EntropyMaskedCrossEntropyOptions& opt,
                                at::Tensor& grad, at::Tensor& kernel_keep) {
  return fused_rows(in, opt, grad, kernel_keep, &cuda::emce_rows);
}

/// Phase A (and C) with the fused CPU kernel.
inline RowTerms fused_cpu_rows(const FlatInputs& in, const EntropyMaskedCrossEntropyOptions& opt,
                               at::Tensor& grad, at::Tensor& kernel_keep) {
  return fused_rows(in, opt, grad, kernel_keep, &cpu::emce_rows);
}

/// Which implementation runs the row phases (A and C) and the backward's scaling.
enum class RowPath { Reference, Cpu, Cuda };

/// The forward's path for `logits`: the fused kernel of its device when one serves the call.
inline RowPath forward_row_path(const at::Tensor& logits,
                                const EntropyMaskedCrossEntropyOptions& opt) {
  if (use_fused_cpu(logits, opt)) return RowPath::Cpu;
  if (use_fused_cuda(logits, opt.use_reference())) return RowPath::Cuda;
  return RowPath::Reference;
}

/// Zeroes the gradient rows with kernel_keep && !keep with the kernels of `path` (Cpu or Cuda).
inline void zero_masked_rows(RowPath path, const at::Tensor& grad, const at::Tensor& kernel_keep,
                             const at::Tensor& keep) {
  if (path == RowPath::Cuda) return cuda::emce_zero_rows(grad, kernel_keep, keep);
  cpu::emce_zero_rows(grad, kernel_keep, keep);
}

/// The whole forward on validated inputs: loss, stats and (if `need_grad`) the keep-masked,
/// unnormalized gradient plus the normalization the backward applies. Phase A/C run on `path`
/// (the host emulator's tests choose Cuda for host tensors); phase B is shared.
inline ForwardResult entropy_masked_ce_forward(const at::Tensor& logits, const at::Tensor& targets,
                                               const at::Tensor& reference_entropy,
                                               const EntropyMaskedCrossEntropyOptions& opt,
                                               bool need_grad, RowPath path) {
  FlatInputs in = flatten_inputs(logits, targets, reference_entropy, opt);
  const auto cdt = compute_dtype(logits.scalar_type());
  const bool fused_cpu = path == RowPath::Cpu;
  const bool fused_cuda = path == RowPath::Cuda;
  ForwardResult r;
  // The kernels address the gradient as row-major [N, V]: a separate buffer is contiguous
  // whatever the logits' strides (on CPU the kept one when free, gradient_workspace.h); in
  // place requires contiguous logits (checked).
  if (need_grad) {
    const int64_t rows = in.logits.size(0), cols = in.logits.size(1);
    if (opt.inplace_backward()) {
      r.grad = in.logits;
    } else if (fused_cpu && opt.reuse_gradient_buffer()) {
      r.grad = GradientWorkspace::instance().take(rows, cols, in.logits.options());
    } else {
      r.grad = at::empty({rows, cols}, in.logits.options());
    }
  }
  at::Tensor kernel_keep;
  RowTerms terms = fused_cpu    ? fused_cpu_rows(in, opt, r.grad, kernel_keep)
                   : fused_cuda ? fused_cuda_rows(in, opt, r.grad, kernel_keep)
                                : reference_row_terms(in.logits, in.safe_targets, opt);
  // A kernel that wrote the gradient over the logits did so through a raw pointer: bump their
  // version counter so that autograd reports any other saved use of them (ATen ops would).
  if (need_grad && opt.inplace_backward() && (fused_cpu || fused_cuda))
    bump_version(logits);
  if (opt.check_inputs()) check_loss_data(in, terms.lse, opt);

  CallReduction d = reduce_call(in.reference.defined() ? in.reference : terms.entropy, in.valid,
                                terms, targets.sizes(), opt);
  r.grad_scale = d.grad_scale;
  r.loss = d.loss;
  if (need_grad) {
    // The kernels keep every valid row in ratio mode (the threshold needs all entropies):
    // zero the rows phase B masked. In absolute mode both decisions are the same.
    if (fused_cpu || fused_cuda) {
      if (opt.threshold_mode() == ThresholdMode::Ratio)
        zero_masked_rows(path, r.grad, kernel_keep, d.keep);
    } else {
      reference_row_grad(in.logits, in.safe_targets, terms.lse, d.keep.to(cdt), opt, r.grad);
    }
  }
  r.stats = d.stats;
  // Last, after every write of the gradient (some bump the version counter).
  if (need_grad && opt.inplace_backward()) OverwrittenLogits::instance().record(logits);
  return r;
}

inline ForwardResult entropy_masked_ce_forward(const at::Tensor& logits, const at::Tensor& targets,
                                               const at::Tensor& reference_entropy,
                                               const EntropyMaskedCrossEntropyOptions& opt,
                                               bool need_grad) {
  return entropy_masked_ce_forward(logits, targets, reference_entropy, opt, need_grad,
                                   forward_row_path(logits, opt));
}

/// Backward: grad * factor (0-dim, or [N] per row), rounded once to the gradient's dtype, into
/// `out` (which may alias `grad`), on `path`.
inline void scale_gradient(const at::Tensor& grad, const at::Tensor& factor, at::Tensor& out,
                           RowPath path) {
  if (path == RowPath::Cuda) return cuda::emce_scale_rows(grad, factor, out);
  if (path == RowPath::Reference) return reference_scale_rows(grad, factor, out);
  cpu::emce_scale_rows(grad, factor, out);
}

inline void scale_gradient(const at::Tensor& grad, const at::Tensor& factor, at::Tensor& out,
                           bool use_reference) {
  const auto t = grad.scalar_type();
  RowPath path = RowPath::Reference;
  if (use_fused_cuda(grad, use_reference)) {
    path = RowPath::Cuda;
  } else if (!use_reference && grad.is_cpu() &&
             (t == at::kFloat || t == at::kBFloat16 || t == at::kHalf)) {
    path = RowPath::Cpu;
  }
  scale_gradient(grad, factor, out, path);
}

/// Custom autograd function: forward computes loss and gradient together, backward scales.
struct EntropyMaskedCrossEntropyFunction
    : public torch::autograd::Function<EntropyMaskedCrossEntropyFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits,
                            const at::Tensor& targets,
                            const std::optional<at::Tensor>& reference_entropy,
                            const EntropyMaskedCrossEntropyOptions& opt, EntropyMaskStats* stats) {
    const bool need_grad = logits.requires_grad();
    ForwardResult r = entropy_masked_ce_forward(
        logits, targets, reference_entropy.value_or(at::Tensor()), opt, need_grad);
    if (stats) *stats = r.stats;
    if (need_grad) {
      ctx->saved_data["grad"] = r.grad;
      ctx->saved_data["grad_scale"] = r.grad_scale;
      ctx->saved_data["logits_shape"] = logits.sizes().vec();
      ctx->saved_data["none"] = opt.reduction() == Reduction::None;
      ctx->saved_data["use_reference"] = opt.use_reference();
      ctx->saved_data["inplace"] = opt.inplace_backward();
      ctx->saved_data["copy_out"] = opt.inplace_backward() && feeds_a_leaf(logits);
    }
    return r.loss;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    auto& saved = ctx->saved_data;
    TORCH_CHECK(saved.count("grad") && saved["grad"].isTensor(),
                "entropy_masked_cross_entropy: backward ran a second time through the same call; "
                "its gradient buffer was consumed by the first backward (call the loss again)");
    // The saved gradient is this call's own buffer (or the logits' storage in in-place mode):
    // scale it in place, so the call never holds more than one [N, V] gradient.
    at::Tensor grad = saved["grad"].toTensor();  // [N, V], keep-masked, unnormalized
    saved.erase("grad");
    at::Tensor scale = saved["grad_scale"].toTensor();
    at::Tensor go = grad_outputs[0].to(scale.scalar_type());
    at::Tensor factor = saved["none"].toBool() ? go.reshape({grad.size(0)}) * scale
                                               : go.reshape({}) * scale;
    scale_gradient(grad, factor, grad, saved["use_reference"].toBool());
    // In place, the scaling wrote the logits' bytes again (a version bump on some paths).
    if (saved["inplace"].toBool()) OverwrittenLogits::instance().record(grad);
    // In place over a leaf (or a view of one): the leaf's .grad gets its own storage, never
    // the leaf's (whose values the forward replaced).
    if (saved["copy_out"].toBool()) grad = grad.clone();
    return {grad.view(saved["logits_shape"].toIntVector()), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

}  // namespace detail

/// Cross-entropy with Low-Entropy Masking, as a free function.
///
/// `logits` [N, V] or [B, T, V] (float32, bfloat16, float16 or float64); `targets` int64/int32
/// shaped like logits without the last dimension; `reference_entropy` (optional) replaces the
/// current entropies in the keep decision; `stats` (optional) receives the per-call statistics.
/// The loss is float32 (float64 for float64 logits); the gradient has the logits' dtype.
///
/// Example:
/// ```
/// auto opts = slowed::EntropyMaskedCrossEntropyOptions().entropy_threshold(0.3);
/// torch::Tensor loss = slowed::entropy_masked_cross_entropy(logits, targets, opts);
/// loss.backward();
/// ```
inline at::Tensor entropy_masked_cross_entropy(
    const at::Tensor& logits, const at::Tensor& targets,
    const EntropyMaskedCrossEntropyOptions& options = {},
    const at::Tensor& reference_entropy = {}, EntropyMaskStats* stats = nullptr) {
  detail::check_loss_arguments(logits, targets, reference_entropy, options);
  detail::check_not_overwritten(logits);
  // An undefined tensor may not enter autograd's input list: absent means std::nullopt.
  std::optional<at::Tensor> reference;
  if (reference_entropy.defined()) reference = reference_entropy.detach();
  return detail::EntropyMaskedCrossEntropyFunction::apply(logits, targets, reference, options,
                                                          stats);
}

/// Cross-entropy with Low-Entropy Masking, as a functor that keeps the last call's statistics.
///
/// Example:
/// ```
/// slowed::EntropyMaskedCrossEntropy loss_fn(
///     slowed::EntropyMaskedCrossEntropyOptions().entropy_threshold(0.3));
/// auto loss = loss_fn(logits, targets);   // logits [B, T, V], targets [B, T]
/// loss.backward();
/// double kept = loss_fn.last_stats().kept_fraction.item<double>();
/// ```
class EntropyMaskedCrossEntropy {
 public:
  explicit EntropyMaskedCrossEntropy(EntropyMaskedCrossEntropyOptions options = {})
      : options_(std::move(options)) {}

  at::Tensor forward(const at::Tensor& logits, const at::Tensor& targets,
                     const at::Tensor& reference_entropy = {}) {
    return entropy_masked_cross_entropy(logits, targets, options_, reference_entropy,
                                        &last_stats_);
  }
  at::Tensor operator()(const at::Tensor& logits, const at::Tensor& targets,
                        const at::Tensor& reference_entropy = {}) {
    return forward(logits, targets, reference_entropy);
  }

  const EntropyMaskedCrossEntropyOptions& options() const { return options_; }
  EntropyMaskedCrossEntropyOptions& options() { return options_; }
  /// Statistics of the last call (undefined tensors before the first call).
  const EntropyMaskStats& last_stats() const { return last_stats_; }

 private:
  EntropyMaskedCrossEntropyOptions options_;
  EntropyMaskStats last_stats_;
};

/// Predicted entropy (nats, float32, no gradient) of each token's distribution, shaped like the
/// logits without the last dimension. Use it to record reference entropies, e.g. from the
/// initial model, for the `reference_entropy` argument.
///
/// Example:
/// ```
/// torch::Tensor h0 = slowed::token_entropy(initial_model->forward(input_ids));  // [B, T]
/// ```
inline at::Tensor token_entropy(const at::Tensor& logits, double softcap = 0.0) {
  TORCH_CHECK(logits.defined() && logits.dim() >= 1, "logits: expected a tensor [..., V]");
  TORCH_CHECK(detail::is_supported_float(logits.scalar_type()),
              "logits: expected a floating-point dtype, got ", logits.scalar_type());
  TORCH_CHECK(logits.size(-1) > 0, "logits: expected V >= 1, got ",
              detail::shape_string(logits.sizes()));
  detail::check_finite_option(softcap, "softcap");
  detail::check_not_overwritten(logits);
  at::NoGradGuard no_grad;
  const int64_t vocab = logits.size(-1);
  const int64_t n = logits.numel() / vocab;
  auto opt = EntropyMaskedCrossEntropyOptions().softcap(softcap);
  at::Tensor rows = logits.detach().reshape({n, vocab});
  at::Tensor t = at::zeros({n}, logits.options().dtype(at::kLong));
  at::Tensor h = detail::reference_row_terms(rows, t, opt).entropy.to(at::kFloat);
  return h.reshape(logits.sizes().slice(0, logits.dim() - 1));
}

}  // namespace slowed

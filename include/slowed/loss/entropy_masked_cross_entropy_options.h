#pragma once

// Options of EntropyMaskedCrossEntropy (Low-Entropy Masking, SLowED). See docs/api.md.

#include <slowed/detail/check.h>
#include <slowed/dist/communicator.h>

#include <cstdint>
#include <memory>

namespace slowed {

/// How the entropy threshold below which tokens are dropped from the loss is chosen.
enum class ThresholdMode {
  /// A fixed threshold in nats: tokens with H < entropy_threshold are masked.
  Absolute,
  /// Per call: mask the lowest `mask_ratio` fraction of the valid tokens by entropy.
  Ratio,
};

/// How the per-token losses of the kept tokens are reduced.
enum class Reduction {
  MeanKept,   ///< sum over kept tokens / number of kept tokens (default)
  MeanValid,  ///< sum over kept tokens / number of valid (non-ignore_index) tokens
  Sum,        ///< sum over kept tokens
  None,       ///< per-token loss shaped like targets; masked and ignored tokens are 0
};

/// Options of `EntropyMaskedCrossEntropy` and `entropy_masked_cross_entropy`.
///
/// Each setter validates its argument and throws `c10::Error` naming it.
///
/// Example:
/// ```
/// auto opts = slowed::EntropyMaskedCrossEntropyOptions()
///                 .entropy_threshold(0.3)      // nats
///                 .ignore_index(-100)
///                 .reduction(slowed::Reduction::MeanKept);
/// ```
class EntropyMaskedCrossEntropyOptions {
 public:
  EntropyMaskedCrossEntropyOptions() = default;

  /// Absolute mode: mask tokens whose predicted entropy is below `nats`. Default 0.3.
  EntropyMaskedCrossEntropyOptions& entropy_threshold(double nats) {
    detail::check_finite_option(nats, "entropy_threshold");
    entropy_threshold_ = nats;
    threshold_mode_ = ThresholdMode::Absolute;
    return *this;
  }
  double entropy_threshold() const { return entropy_threshold_; }

  /// Ratio mode: mask the lowest fraction `q` in [0, 1] of the valid tokens of each call.
  EntropyMaskedCrossEntropyOptions& mask_ratio(double q) {
    TORCH_CHECK(std::isfinite(q) && q >= 0.0 && q <= 1.0,
                "mask_ratio: expected a fraction in [0, 1], got ", q);
    mask_ratio_ = q;
    threshold_mode_ = ThresholdMode::Ratio;
    return *this;
  }
  double mask_ratio() const { return mask_ratio_; }

  ThresholdMode threshold_mode() const { return threshold_mode_; }

  /// Targets equal to this value are ignored: never counted, never kept. Default -100.
  EntropyMaskedCrossEntropyOptions& ignore_index(int64_t index) {
    ignore_index_ = index;
    return *this;
  }
  int64_t ignore_index() const { return ignore_index_; }

  EntropyMaskedCrossEntropyOptions& reduction(Reduction r) {
    reduction_ = r;
    return *this;
  }
  Reduction reduction() const { return reduction_; }

  /// Label smoothing eps in [0, 1], with PyTorch's definition:
  /// loss = (1 - eps) * nll + eps * mean_j(-log p_j).
  EntropyMaskedCrossEntropyOptions& label_smoothing(double eps) {
    TORCH_CHECK(std::isfinite(eps) && eps >= 0.0 && eps <= 1.0,
                "label_smoothing: expected a value in [0, 1], got ", eps);
    label_smoothing_ = eps;
    return *this;
  }
  double label_smoothing() const { return label_smoothing_; }

  /// z-loss: adds lse_square_scale * logsumexp(z)^2 to each kept token's loss. Default 0.
  EntropyMaskedCrossEntropyOptions& lse_square_scale(double scale) {
    TORCH_CHECK(std::isfinite(scale) && scale >= 0.0,
                "lse_square_scale: expected a finite value >= 0, got ", scale);
    lse_square_scale_ = scale;
    return *this;
  }
  double lse_square_scale() const { return lse_square_scale_; }

  /// Logit soft-capping: z <- softcap * tanh(z / softcap) before everything else
  /// (entropy included). 0 disables it (default).
  EntropyMaskedCrossEntropyOptions& softcap(double cap) {
    TORCH_CHECK(std::isfinite(cap) && cap >= 0.0,
                "softcap: expected a finite value >= 0 (0 disables it), got ", cap);
    softcap_ = cap;
    return *this;
  }
  double softcap() const { return softcap_; }

  /// Write the gradient over the logits' storage instead of a separate buffer (saves one
  /// [N, V] buffer). The logits' values are destroyed by the forward; autograd's version
  /// check reports any other use of them, and a later loss or token_entropy call on the same
  /// logits throws (until something writes them again). Backward may then run only once. Logits
  /// that are a leaf (or a view of one) get their .grad in a copy, never in their own storage.
  EntropyMaskedCrossEntropyOptions& inplace_backward(bool enabled) {
    inplace_backward_ = enabled;
    return *this;
  }
  bool inplace_backward() const { return inplace_backward_; }

  /// CPU, out of place: write the gradient into a buffer kept from the previous call when no
  /// tensor holds that buffer any more (autograd has consumed the last gradient), instead of a
  /// fresh [N, V] allocation whose first-touch page faults cost about as much as the kernel.
  /// Results are bitwise the same. The buffer stays allocated between calls, the size of the
  /// largest gradient so far; `slowed::release_gradient_buffer()` frees it. Default true; no
  /// effect on CUDA (its caching allocator already recycles memory), on the reference path or
  /// with inplace_backward.
  EntropyMaskedCrossEntropyOptions& reuse_gradient_buffer(bool enabled) {
    reuse_gradient_buffer_ = enabled;
    return *this;
  }
  bool reuse_gradient_buffer() const { return reuse_gradient_buffer_; }

  /// Check targets (range) and logits (finite log-sum-exp) on every call. On CUDA this
  /// costs one host synchronization per call. Default true. -Inf logits are valid (a masked
  /// vocabulary entry has probability 0) and pass the check, also at the target: that token's
  /// loss is then +Inf, as in torch's cross_entropy.
  EntropyMaskedCrossEntropyOptions& check_inputs(bool enabled) {
    check_inputs_ = enabled;
    return *this;
  }
  bool check_inputs() const { return check_inputs_; }

  /// Run the plain-ATen reference path even where a fused kernel exists (testing, debugging,
  /// or to rule the kernels out). Default false.
  EntropyMaskedCrossEntropyOptions& use_reference(bool enabled) {
    use_reference_ = enabled;
    return *this;
  }
  bool use_reference() const { return use_reference_; }

  /// Data parallelism: with a group of ranks (a `c10::intrusive_ptr` to a c10d::ProcessGroup or
  /// c10d::Backend after `#include <slowed/dist/process_group.h>`, or a
  /// `std::shared_ptr<slowed::dist::Communicator>`), every rank calls the loss on its share of
  /// the global batch and gets the global batch's loss, statistics, ratio-mode threshold and
  /// normalization (kept and valid counts); its gradient is the global loss's gradient with
  /// respect to its own inputs (times the world size when `gradients` is
  /// `dist::GradientReduction::Mean`, for trainers that average gradients). Every rank must call
  /// with the same options. Costs one small all-reduce per call, four more in ratio mode
  /// (docs/distributed.md). `nullptr` (default) is single-process.
  template <class Group>
  EntropyMaskedCrossEntropyOptions& process_group(
      const Group& group, dist::GradientReduction gradients = dist::GradientReduction::Sum) {
    process_group_ = dist::CommunicatorFrom<Group>::make(group);
    gradient_reduction_ = gradients;
    return *this;
  }
  const std::shared_ptr<dist::Communicator>& process_group() const { return process_group_; }
  dist::GradientReduction gradient_reduction() const { return gradient_reduction_; }

 private:
  ThresholdMode threshold_mode_ = ThresholdMode::Absolute;
  double entropy_threshold_ = 0.3;
  double mask_ratio_ = 0.0;
  int64_t ignore_index_ = -100;
  Reduction reduction_ = Reduction::MeanKept;
  double label_smoothing_ = 0.0;
  double lse_square_scale_ = 0.0;
  double softcap_ = 0.0;
  bool inplace_backward_ = false;
  bool reuse_gradient_buffer_ = true;
  bool check_inputs_ = true;
  bool use_reference_ = false;
  std::shared_ptr<dist::Communicator> process_group_;
  dist::GradientReduction gradient_reduction_ = dist::GradientReduction::Sum;
};

}  // namespace slowed

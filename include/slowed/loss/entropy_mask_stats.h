#pragma once

// Per-call statistics of Low-Entropy Masking. All fields are 0-dim tensors on the logits'
// device, so reading them is the caller's choice of when to synchronize.

#include <ATen/ATen.h>

namespace slowed {

/// Statistics of one call of EntropyMaskedCrossEntropy.
///
/// Example:
/// ```
/// slowed::EntropyMaskStats st;
/// auto loss = slowed::entropy_masked_cross_entropy(logits, targets, opts, {}, &st);
/// double kept = st.kept_fraction.item<double>();
/// ```
struct EntropyMaskStats {
  at::Tensor num_valid;      ///< int64: tokens whose target is not ignore_index
  at::Tensor num_kept;       ///< int64: valid tokens kept in the loss
  at::Tensor kept_fraction;  ///< fp32: num_kept / num_valid (0 when there are no valid tokens)
  at::Tensor mean_entropy;   ///< fp32: mean predicted entropy (nats) of the valid tokens
  at::Tensor threshold;      ///< fp32: the threshold used; tokens with H < threshold were masked
};

}  // namespace slowed

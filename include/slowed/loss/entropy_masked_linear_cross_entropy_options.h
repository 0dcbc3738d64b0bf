#pragma once

// Options of EntropyMaskedLinearCrossEntropy (LM head fused with entropy-masked cross-entropy):
// the loss options, unchanged, plus how the tokens are chunked. See docs/api.md.

#include <slowed/loss/entropy_masked_cross_entropy_options.h>

#include <c10/util/Exception.h>

#include <cstdint>
#include <utility>

namespace slowed {

/// Options of `EntropyMaskedLinearCrossEntropy` and `entropy_masked_linear_cross_entropy`.
///
/// Every option of `EntropyMaskedCrossEntropyOptions` applies with the same meaning, except
/// `inplace_backward`, which has no effect: each chunk's logits are the loss's own buffer and
/// are always overwritten by their gradient. The constructor from the loss options is implicit,
/// so loss options can be passed where these are expected.
///
/// Example:
/// ```
/// auto opts = slowed::EntropyMaskedLinearCrossEntropyOptions(
///                 slowed::EntropyMaskedCrossEntropyOptions().entropy_threshold(0.3))
///                 .chunk_memory_budget(int64_t(64) << 20);
/// ```
class EntropyMaskedLinearCrossEntropyOptions {
 public:
  /// Default working-set budget of one chunk: 64 MiB (docs/design.md gives the rule).
  static constexpr int64_t kDefaultChunkMemoryBudget = int64_t(64) << 20;

  EntropyMaskedLinearCrossEntropyOptions() = default;
  EntropyMaskedLinearCrossEntropyOptions(EntropyMaskedCrossEntropyOptions loss)  // NOLINT: implicit
      : loss_(std::move(loss)) {}

  /// The entropy-masked cross-entropy options (threshold, reduction, smoothing, ...).
  EntropyMaskedLinearCrossEntropyOptions& loss(EntropyMaskedCrossEntropyOptions options) {
    loss_ = std::move(options);
    return *this;
  }
  const EntropyMaskedCrossEntropyOptions& loss() const { return loss_; }
  EntropyMaskedCrossEntropyOptions& loss() { return loss_; }

  /// Bytes one chunk of tokens may use beyond the outputs: its logits (overwritten by their
  /// gradient), the compaction copy on CUDA and its per-row temporaries. The chunk size follows
  /// from it, N, V, D and the dtype (docs/design.md). Default 64 MiB.
  EntropyMaskedLinearCrossEntropyOptions& chunk_memory_budget(int64_t bytes) {
    TORCH_CHECK(bytes > 0, "chunk_memory_budget: expected a positive number of bytes, got ", bytes);
    chunk_memory_budget_ = bytes;
    return *this;
  }
  int64_t chunk_memory_budget() const { return chunk_memory_budget_; }

  /// Fixed number of tokens per chunk, overriding the budget (0, the default: chosen from the
  /// budget).
  EntropyMaskedLinearCrossEntropyOptions& chunk_rows(int64_t rows) {
    TORCH_CHECK(rows >= 0, "chunk_rows: expected a number of rows >= 0 (0: chosen from "
                "chunk_memory_budget), got ", rows);
    chunk_rows_ = rows;
    return *this;
  }
  int64_t chunk_rows() const { return chunk_rows_; }

 private:
  EntropyMaskedCrossEntropyOptions loss_;
  int64_t chunk_memory_budget_ = kDefaultChunkMemoryBudget;
  int64_t chunk_rows_ = 0;
};

}  // namespace slowed

#pragma once

// Batched greedy decoding with a KV cache. Prompts of different lengths are left-padded; the
// attention mask hides the padding and position ids count tokens only, so each sequence's
// output equals what it would get alone (up to floating-point accumulation order).
//
// Example:
//   slowed_examples::GenerateOptions opt;
//   opt.max_new_tokens = 64;
//   opt.stop_tokens = lm.config.eos_token_ids;
//   auto out = slowed_examples::generate_greedy(*lm.model, {{1, 504, 3458}, {1, 42}}, opt);
//   // out[i]: the new token ids of prompt i, ending with its stop token when one was produced

#include "common/model.h"

#include <cstdint>
#include <vector>

namespace slowed_examples {

struct GenerateOptions {
  /// New tokens per sequence at most (stop token included).
  int64_t max_new_tokens = 64;
  /// Generation of a sequence ends after it produces one of these.
  std::vector<int64_t> stop_tokens;
  /// Optional, one list per prompt, added to stop_tokens for that prompt.
  std::vector<std::vector<int64_t>> stop_tokens_per_sequence;
  /// Optional, one limit per prompt, replacing max_new_tokens for that prompt.
  std::vector<int64_t> max_new_tokens_per_sequence;
  /// Token written into the left padding (masked out, so any valid id works).
  int64_t pad_token_id = 0;
};

/// Greedy (argmax) continuation of every prompt, batched. Returns the new token ids per prompt;
/// a sequence that stopped ends with its stop token. Runs under NoGradGuard on the model's
/// device; the model's train/eval mode is left unchanged.
std::vector<std::vector<int64_t>> generate_greedy(CausalLM& model,
                                                  const std::vector<std::vector<int64_t>>& prompts,
                                                  const GenerateOptions& options = {});

/// Left-pads `prompts` into input_ids [B, L] and attention_mask [B, L] (int64, 1 = token) on
/// `device`.
std::pair<torch::Tensor, torch::Tensor> left_pad(const std::vector<std::vector<int64_t>>& prompts,
                                                 int64_t pad_token_id, torch::Device device);

}  // namespace slowed_examples

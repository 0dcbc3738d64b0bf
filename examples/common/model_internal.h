#pragma once

// Internals shared by the model implementations (model_llama.cpp, model_bloom.cpp): input
// checks, position ids and the attention mask. Not part of the example library's API.

#include "common/model.h"

namespace slowed_examples {
namespace detail {

struct AttentionInputs {
  int64_t batch = 0, query_len = 0, past = 0, key_len = 0;
  torch::Tensor ids;         // [B, T] int64
  torch::Tensor key_mask;    // [B, Tk] bool, true = token; undefined = all tokens
  torch::Tensor positions;   // [B, T] int64
  /// [B, 1, T, Tk] bool, true = may attend: key j is a token and j <= past + i; a query always
  /// sees itself (so a padding query has a defined, ignored output instead of NaN). Undefined
  /// when plain causal attention is enough (see is_causal).
  torch::Tensor allowed;
  /// No mask needed and T > 1 with an empty cache: SDPA's is_causal.
  bool is_causal = false;
};

/// Checks shapes and fills defaults; `who` names the model in messages.
AttentionInputs prepare_attention(const torch::Tensor& input_ids, const ForwardOptions& options,
                                  const ModelConfig& config, int64_t cache_layers_expected,
                                  bool need_positions);

/// The positions of hidden [B, T, H] the LM head sees: options.output_positions ([N, H]), else
/// the last options.logits_to_keep (all when <= 0 or >= T).
torch::Tensor output_hidden(const torch::Tensor& hidden, const ForwardOptions& options);

/// k/v appended to layer `layer` of the cache when there is one (at position in.past); returns
/// the keys/values attention reads.
std::pair<torch::Tensor, torch::Tensor> cache_update(KVCache* cache, size_t layer,
                                                     const AttentionInputs& in,
                                                     const torch::Tensor& k,
                                                     const torch::Tensor& v);

std::shared_ptr<CausalLM> make_llama(const ModelConfig& config);
std::shared_ptr<CausalLM> make_bloom(const ModelConfig& config);

}  // namespace detail
}  // namespace slowed_examples

#pragma once

// Internals shared by the model implementations: the architecture record every model file
// registers (model_registry.cpp lists them), and the helpers the forwards share (input checks,
// position ids, the attention mask, the KV cache step, the LM head's positions; in
// model_common.cpp). Not part of the example library's API.
//
// Where an architecture's knowledge lives:
//   model_<arch>.cpp    the modules, and one `Architecture` record: config.json fields, GGUF
//                       metadata, the constructor, HF <-> GGUF tensor names, tensor fix-ups;
//   model_registry.cpp  the list of records (one line per architecture);
//   model_config.cpp    what every architecture shares (vocabulary, token ids, size caps);
//   model_loader.cpp    filling parameters from safetensors or GGUF through the record.

#include "common/model.h"

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace slowed_examples {
namespace detail {

/// One tensor a GGUF block must hold with a given shape ("attn_q.weight" under "blk.N.").
struct GgufBlockTensor {
  std::string name;
  std::vector<int64_t> shape;
  const char* from;  // the metadata the shape follows from, for the message
};

/// Everything the loaders and ModelConfig know about one architecture (an aggregate: a model
/// file writes its record as {name, hf_classes, rope, config_from_hf, ...} in this order).
struct Architecture {
  /// config.json's model_type and GGUF's general.architecture ("llama").
  std::string name;
  /// config.json "architectures" classes that mean this architecture when model_type is absent.
  std::vector<std::string> hf_classes;
  /// RoPE positions: validate() checks and summary() prints rope_theta / rope_scaling.
  bool rope = true;
  /// The architecture's fields of config.json (vocab_size and the token ids are read around it).
  void (*config_from_hf)(const json::Value& config, ModelConfig& c) = nullptr;
  /// The architecture's GGUF metadata, after the sizes every GGUF has ("<arch>.embedding_length",
  /// block_count, head counts, feed_forward_length, context_length, key_length, vocab_size).
  void (*config_from_gguf)(const GgufFile& f, ModelConfig& c) = nullptr;
  /// Extra checks of ModelConfig::validate(), after the head counts (null: none).
  void (*validate)(const ModelConfig& c) = nullptr;
  /// The attention tensors of every GGUF block whose shapes from_gguf checks before a model is
  /// allocated (attn_norm and ffn_down are checked for every architecture).
  std::vector<GgufBlockTensor> (*gguf_attention_tensors)(const ModelConfig& c) = nullptr;
  /// A freshly initialised model (the config is validated).
  std::shared_ptr<CausalLM> (*make)(const ModelConfig& c) = nullptr;
  /// The GGUF tensor name of an HF parameter name ("" when it has none).
  std::string (*gguf_tensor_name)(const std::string& hf_name) = nullptr;
  /// Undoes llama.cpp's conversion of tensor `gguf_name` (e.g. the Q/K row permutation); null:
  /// tensors are taken as stored.
  torch::Tensor (*gguf_fix_up)(const std::string& gguf_name, torch::Tensor t,
                               const ModelConfig& c) = nullptr;
};

/// The records of every supported architecture, in the order messages list them
/// (model_registry.cpp).
const std::vector<const Architecture*>& architectures();
/// The record named `name` (model_type / general.architecture), or nullptr.
const Architecture* find_architecture(const std::string& name);
/// The record named `name`; otherwise throws "<where>unsupported architecture '<name>'
/// (supported: llama, qwen2, bloom)".
const Architecture& architecture_or_throw(const std::string& name, const std::string& where);
/// The architecture name of a config.json "architectures" class ("LlamaForCausalLM" -> "llama"),
/// or the class itself when no record claims it (so that the error names it).
std::string architecture_of_hf_class(const std::string& hf_class);

/// The constructor of a record: std::make_shared<Model>(config).
template <typename Model>
std::shared_ptr<CausalLM> make_model(const ModelConfig& config) {
  return std::make_shared<Model>(config);
}

/// hidden / heads when heads divides hidden, else 0, which validate() rejects naming both (a
/// head count of 0 must not reach the division).
int64_t default_head_dim(int64_t hidden, int64_t heads);

/// HF name "<prefix>N.<module>.<rest>" -> "blk.N.<gguf module>.<rest>" through `table`
/// ({HF module, GGUF module}); "" when `hf` is not under `prefix` or its module is not listed.
std::string gguf_block_name(const std::string& hf, const std::string& prefix,
                            const std::vector<std::pair<std::string, std::string>>& table);

/// `head` followed by w's sizes after the first ({n_head, 2, d/2} + {in} for a [rows, in] w):
/// the shape that regroups a GGUF tensor's rows.
std::vector<int64_t> shape_with_rest(std::vector<int64_t> head, const torch::Tensor& w);

// ---- forward helpers ---------------------------------------------------------------------

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

/// Checks shapes and fills defaults; config.architecture names the model in messages.
AttentionInputs prepare_attention(const torch::Tensor& input_ids, const ForwardOptions& options,
                                  const ModelConfig& config, int64_t cache_layers_expected,
                                  bool need_positions);

/// The positions of hidden [B, T, H] the LM head sees: options.output_positions ([N, H]), else
/// the last options.logits_to_keep (all when <= 0 or >= T).
torch::Tensor output_hidden(const torch::Tensor& hidden, const ForwardOptions& options);

/// After the last block: commits the cache (when there is one) to in.key_len positions and
/// returns output_hidden(hidden, options), which the final norm then sees.
torch::Tensor finish_blocks(const torch::Tensor& hidden, const AttentionInputs& in,
                            const ForwardOptions& options);

/// k/v appended to layer `layer` of the cache when there is one (at position in.past); returns
/// the keys/values attention reads.
std::pair<torch::Tensor, torch::Tensor> cache_update(KVCache* cache, size_t layer,
                                                     const AttentionInputs& in,
                                                     const torch::Tensor& k,
                                                     const torch::Tensor& v);

}  // namespace detail
}  // namespace slowed_examples

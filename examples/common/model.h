#pragma once

// Causal language models in LibTorch with HF-compatible parameter names, loadable from an HF
// folder (config.json + *.safetensors, sharded or not) or a GGUF file:
//   - Llama family (RMSNorm, RoPE with optional Llama-3 / linear scaling, GQA, SwiGLU, tied or
//     untied embeddings): SmolLM2, Llama-3.2;
//   - Qwen2 (Llama + bias on the Q/K/V projections): Qwen2.5;
//   - BLOOM (ALiBi, LayerNorm, tanh-GeLU, fused QKV in BLOOM's per-head interleaved layout,
//     word_embeddings_layernorm).
// The modules are plain torch::nn::Modules: model->parameters() feeds an optimizer, and
// model->named_parameters() uses the names of the HF checkpoint ("model.layers.0.self_attn.
// q_proj.weight", "transformer.h.0.self_attention.query_key_value.weight"), so a user can map
// LoRA targets or freeze lists by name. Trainable in float32 or bfloat16 on CPU and CUDA.
//
// Example:
//   auto lm = slowed_examples::load_model("SmolLM2-135M-Instruct.Q4_1.gguf", torch::kFloat32,
//                                         torch::kCPU);
//   torch::Tensor ids = torch::tensor({{1, 504, 3458}}, torch::kLong);
//   torch::Tensor logits = lm.model->forward(ids);            // [1, 3, 49152]
//   torch::optim::AdamW opt(lm.model->parameters(), torch::optim::AdamWOptions(1e-4));

#include "common/json.h"

#include <torch/torch.h>

#include <memory>
#include <string>
#include <vector>

namespace slowed_examples {

class GgufFile;

/// RoPE frequency scaling. type "default" (none), "linear" (positions / factor) or "llama3"
/// (Llama 3.x: long wavelengths divided by factor, smooth blend between low_freq_factor and
/// high_freq_factor of original_max_position_embeddings).
struct RopeScaling {
  std::string type = "default";
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  std::string architecture;  // "llama", "qwen2" or "bloom" (the records of model_registry.cpp)
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t intermediate_size = 0;
  int64_t max_position_embeddings = 2048;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  /// Per-frequency divisors of inv_freq (GGUF "rope_freqs.weight", how llama.cpp stores
  /// Llama-3 scaling); empty when absent.
  std::vector<double> rope_freq_factors;
  double norm_eps = 1e-6;  // RMSNorm (llama/qwen2) or LayerNorm (bloom) epsilon
  bool tie_word_embeddings = false;
  bool qkv_bias = false;  // bias on q/k/v projections (qwen2; llama attention_bias)
  bool o_bias = false;    // bias on o_proj (llama attention_bias)
  bool mlp_bias = false;  // bias on gate/up/down (llama mlp_bias)
  bool apply_residual_connection_post_layernorm = false;  // bloom
  int64_t bos_token_id = -1;
  int64_t pad_token_id = -1;
  std::vector<int64_t> eos_token_ids;

  /// From a parsed HF config.json; `source` names it in errors.
  static ModelConfig from_hf_json(const json::Value& config, const std::string& source);
  /// From an HF folder: config.json, plus eos ids of generation_config.json when present.
  static ModelConfig from_hf_folder(const std::string& dir);
  /// From GGUF metadata (general.architecture llama / qwen2 / bloom).
  static ModelConfig from_gguf(const GgufFile& file);
  /// Checks every value before anything uses it: sizes in [1, cap] (the caps below), head
  /// counts dividing, head_dim even (and hidden / heads when not given), rope theta, scaling
  /// factors and norm epsilon finite and positive, token ids -1 or inside the vocabulary;
  /// throws naming the field, the expectation and the value.
  void validate() const;
  // Caps far above any released model, so that a forged value fails before an allocation.
  static constexpr int64_t kMaxVocab = int64_t(1) << 22;
  static constexpr int64_t kMaxHidden = int64_t(1) << 16;
  static constexpr int64_t kMaxLayers = 1024;
  static constexpr int64_t kMaxHeads = 1024;
  static constexpr int64_t kMaxHeadDim = 1024;
  static constexpr int64_t kMaxIntermediate = int64_t(1) << 20;
  static constexpr int64_t kMaxPositions = int64_t(1) << 24;
  /// One line: "llama: 30 layers, hidden 576, heads 9/3, ffn 1536, vocab 49152, ...".
  std::string summary() const;
};

/// Per-layer keys and values of the positions seen so far. Buffers grow by doubling along the
/// time axis, so appending a step costs O(new tokens), not O(cached length).
class KVCache {
 public:
  /// Number of cached positions (0 when empty).
  int64_t length() const { return length_; }
  int64_t batch_size() const { return keys_.empty() ? 0 : keys_[0].size(0); }
  size_t num_layers() const { return keys_.size(); }
  /// Cached keys / values of one layer: [B, kv_heads, length(), head_dim] (views).
  torch::Tensor keys(size_t layer) const;
  torch::Tensor values(size_t layer) const;
  void clear();
  /// Keeps only the batch rows `rows` (int64 indices), e.g. to drop finished sequences.
  void select_rows(const torch::Tensor& rows);

  /// Writes k/v [B, H, T, D] of `layer` at positions [past, past + T) and returns the keys and
  /// values of positions [0, past + T). Models call this once per layer, then commit().
  std::pair<torch::Tensor, torch::Tensor> append(size_t layer, int64_t past, const torch::Tensor& k,
                                                 const torch::Tensor& v);
  /// Sets length() after every layer has appended.
  void commit(int64_t new_length) { length_ = new_length; }

 private:
  std::vector<torch::Tensor> keys_, values_;  // [B, H, capacity, D]
  int64_t length_ = 0;
};

struct ForwardOptions {
  /// [B, T_past + T], nonzero = token, 0 = padding (left padding for batches of different
  /// lengths). Undefined: every position is a token.
  torch::Tensor attention_mask;
  /// [B, T] RoPE positions. Undefined: cumsum(attention_mask) - 1 (so a left-padded row
  /// starts at 0), or T_past + arange(T) without a mask. BLOOM derives ALiBi positions from
  /// the mask in the same way and ignores position_ids.
  torch::Tensor position_ids;
  /// When given, the new keys/values are appended to it.
  KVCache* cache = nullptr;
  /// 0: logits for every position; k > 0: only for the last k positions.
  int64_t logits_to_keep = 0;
  /// When defined (int64 [N], flat indices b * T + t into the batch): logits [N, V] for these
  /// positions only. Training uses it to skip the LM head on prompt and padding positions
  /// (with a 151,936-token vocabulary their logits would dominate memory).
  torch::Tensor output_positions;
};

/// A decoder-only causal LM. forward(input_ids [B, T] int64) -> logits [B, T, V] in the
/// parameters' dtype.
class CausalLM : public torch::nn::Module {
 public:
  explicit CausalLM(ModelConfig config) : config_(std::move(config)) {}
  ~CausalLM() override = default;

  virtual torch::Tensor forward(const torch::Tensor& input_ids,
                                const ForwardOptions& options) = 0;
  torch::Tensor forward(const torch::Tensor& input_ids) { return forward(input_ids, ForwardOptions()); }
  torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask) {
    ForwardOptions o;
    o.attention_mask = attention_mask;
    return forward(input_ids, o);
  }
  /// The hidden states after the final norm, the LM head's input: [B, T, H] (the last
  /// options.logits_to_keep positions when set), or [N, H] at options.output_positions.
  /// forward() is the LM head applied to this: linear(forward_hidden(ids, o), output_embeddings()).
  /// Training with a fused linear loss (slowed::EntropyMaskedLinearCrossEntropy) takes this and
  /// output_embeddings() so that the [N, V] logits never exist.
  virtual torch::Tensor forward_hidden(const torch::Tensor& input_ids, const ForwardOptions& options) = 0;
  const ModelConfig& config() const { return config_; }
  /// The token embedding matrix [V, H] (also the LM head when tied).
  virtual torch::Tensor input_embeddings() const = 0;
  /// The LM head's weight [V, H]: lm_head.weight, or the token embedding when tied. No model
  /// here has a head bias.
  virtual torch::Tensor output_embeddings() const = 0;

 protected:
  ModelConfig config_;
};

/// A freshly initialised model for `config` (random weights), float32 on the CPU.
std::shared_ptr<CausalLM> make_causal_lm(const ModelConfig& config);

struct LoadedModel {
  ModelConfig config;
  std::shared_ptr<CausalLM> model;
  std::string path;
  std::string format;  // "safetensors" or "gguf"
};

/// Loads an HF folder (config.json + model.safetensors[.index.json] or *.safetensors), or a
/// .gguf file (tensors dequantized to float32, Q/K un-permuted for llama), then casts to
/// `dtype` and moves to `device`. The model is in eval() mode; call train() to fine-tune.
LoadedModel load_model(const std::string& path, torch::Dtype dtype = torch::kFloat32,
                       torch::Device device = torch::kCPU);

namespace detail {
/// llama.cpp's Q/K row permutation for its RoPE layout and its inverse ([rows, ...] tensors,
/// rows = n_head * head_dim).
torch::Tensor gguf_permute_qk(const torch::Tensor& w, int64_t n_head);
torch::Tensor gguf_unpermute_qk(const torch::Tensor& w, int64_t n_head);
/// GGUF stores BLOOM's fused QKV as [all q; all k; all v]; HF interleaves per head.
torch::Tensor gguf_bloom_qkv_to_hf(const torch::Tensor& w, int64_t n_head);
/// The GGUF tensor name of an HF parameter name ("" when it has none, or the architecture is
/// unknown).
std::string gguf_name_for(const std::string& architecture, const std::string& hf_name);
}  // namespace detail

}  // namespace slowed_examples

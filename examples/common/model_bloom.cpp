// BLOOM decoder following transformers' modeling_bloom.py: word-embedding LayerNorm, pre-norm
// LayerNorm blocks, fused QKV whose output is laid out per head as [q_h, k_h, v_h], ALiBi
// position bias (no RoPE), tanh-GeLU MLP, final LayerNorm, LM head tied to the embeddings.
// Registers the architecture "bloom" (config.json / GGUF readers, GGUF tensor names, the
// regrouping of llama.cpp's fused QKV).

#include "common/gguf.h"
#include "common/model_internal.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

namespace slowed_examples {
namespace detail {
namespace {

namespace F = torch::nn::functional;

torch::nn::LayerNorm layer_norm(int64_t dim, double eps) {
  return torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim}).eps(eps));
}

// ALiBi slopes (transformers' _get_alibi_slopes): a geometric sequence for the largest power of
// two <= n heads, interleaved extra slopes for the rest.
torch::Tensor alibi_slopes(int64_t n) {
  const int64_t closest = int64_t(1) << static_cast<int64_t>(std::floor(std::log2(n)));
  const double base = std::pow(2.0, -std::pow(2.0, -(std::log2(closest) - 3)));
  std::vector<float> s;
  for (int64_t i = 1; i <= closest; ++i) s.push_back(static_cast<float>(std::pow(base, i)));
  if (closest != n) {
    const double extra = std::pow(2.0, -std::pow(2.0, -(std::log2(2 * closest) - 3)));
    const int64_t remaining = std::min(closest, n - closest);
    for (int64_t i = 1; i < 1 + 2 * remaining; i += 2)
      s.push_back(static_cast<float>(std::pow(extra, i)));
  }
  return torch::tensor(s, torch::kFloat32);
}

// BLOOM's GeLU: x * 0.5 * (1 + tanh(0.79788456 * x * (1 + 0.044715 x^2))).
torch::Tensor bloom_gelu(const torch::Tensor& x) {
  return x * 0.5 * (1.0 + torch::tanh(0.79788456 * x * (1.0 + 0.044715 * x * x)));
}

class BloomAttentionImpl : public torch::nn::Module {
 public:
  explicit BloomAttentionImpl(const ModelConfig& c) : nh_(c.num_heads), hd_(c.head_dim) {
    query_key_value = register_module(
        "query_key_value", torch::nn::Linear(torch::nn::LinearOptions(c.hidden_size, 3 * c.hidden_size)));
    dense = register_module("dense", torch::nn::Linear(c.hidden_size, c.hidden_size));
  }
  // x [B, T, H]; bias [B, nh, T, Tk] additive (ALiBi + mask).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& bias,
                        const AttentionInputs& in, KVCache* cache, size_t layer) {
    const int64_t b = x.size(0), t = x.size(1);
    auto fused = query_key_value(x).view({b, t, nh_, 3, hd_});
    auto q = fused.select(3, 0).transpose(1, 2);  // [B, nh, T, D]
    auto k = fused.select(3, 1).transpose(1, 2);
    auto v = fused.select(3, 2).transpose(1, 2);
    std::tie(k, v) = cache_update(cache, layer, in, k, v);
    auto o = at::scaled_dot_product_attention(q, k, v, bias, 0.0, false,
                                              1.0 / std::sqrt(static_cast<double>(hd_)));
    return dense(o.transpose(1, 2).reshape({b, t, nh_ * hd_}));
  }
  torch::nn::Linear query_key_value{nullptr}, dense{nullptr};

 private:
  int64_t nh_, hd_;
};
TORCH_MODULE(BloomAttention);

class BloomMLPImpl : public torch::nn::Module {
 public:
  explicit BloomMLPImpl(const ModelConfig& c) {
    dense_h_to_4h = register_module("dense_h_to_4h", torch::nn::Linear(c.hidden_size, c.intermediate_size));
    dense_4h_to_h = register_module("dense_4h_to_h", torch::nn::Linear(c.intermediate_size, c.hidden_size));
  }
  torch::Tensor forward(const torch::Tensor& x) { return dense_4h_to_h(bloom_gelu(dense_h_to_4h(x))); }
  torch::nn::Linear dense_h_to_4h{nullptr}, dense_4h_to_h{nullptr};
};
TORCH_MODULE(BloomMLP);

class BloomBlockImpl : public torch::nn::Module {
 public:
  explicit BloomBlockImpl(const ModelConfig& c) : post_ln_residual_(c.apply_residual_connection_post_layernorm) {
    input_layernorm = register_module("input_layernorm", layer_norm(c.hidden_size, c.norm_eps));
    self_attention = register_module("self_attention", BloomAttention(c));
    post_attention_layernorm =
        register_module("post_attention_layernorm", layer_norm(c.hidden_size, c.norm_eps));
    mlp = register_module("mlp", BloomMLP(c));
  }
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& bias, const AttentionInputs& in,
                        KVCache* cache, size_t layer) {
    auto ln1 = input_layernorm(x);
    auto attn = self_attention(ln1, bias, in, cache, layer) + (post_ln_residual_ ? ln1 : x);
    auto ln2 = post_attention_layernorm(attn);
    return mlp(ln2) + (post_ln_residual_ ? ln2 : attn);
  }
  torch::nn::LayerNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  BloomAttention self_attention{nullptr};
  BloomMLP mlp{nullptr};

 private:
  bool post_ln_residual_;
};
TORCH_MODULE(BloomBlock);

// HF's BloomModel: "word_embeddings", "word_embeddings_layernorm", "h", "ln_f".
class BloomModelImpl : public torch::nn::Module {
 public:
  explicit BloomModelImpl(const ModelConfig& c) {
    word_embeddings = register_module("word_embeddings", torch::nn::Embedding(c.vocab_size, c.hidden_size));
    word_embeddings_layernorm =
        register_module("word_embeddings_layernorm", layer_norm(c.hidden_size, c.norm_eps));
    h = register_module("h", torch::nn::ModuleList());
    for (int64_t i = 0; i < c.num_layers; ++i) h->push_back(BloomBlock(c));
    ln_f = register_module("ln_f", layer_norm(c.hidden_size, c.norm_eps));
  }
  torch::nn::Embedding word_embeddings{nullptr};
  torch::nn::LayerNorm word_embeddings_layernorm{nullptr}, ln_f{nullptr};
  torch::nn::ModuleList h{nullptr};
};
TORCH_MODULE(BloomModel);

class BloomForCausalLM : public CausalLM {
 public:
  explicit BloomForCausalLM(const ModelConfig& c) : CausalLM(c) {
    transformer = register_module("transformer", BloomModel(c));
    slopes_ = alibi_slopes(c.num_heads);
  }

  using CausalLM::forward;
  torch::Tensor input_embeddings() const override { return transformer->word_embeddings->weight; }
  torch::Tensor output_embeddings() const override { return transformer->word_embeddings->weight; }

  torch::Tensor forward(const torch::Tensor& input_ids, const ForwardOptions& options) override {
    return F::linear(forward_hidden(input_ids, options), transformer->word_embeddings->weight);
  }

  torch::Tensor forward_hidden(const torch::Tensor& input_ids, const ForwardOptions& options) override {
    AttentionInputs in = prepare_attention(input_ids, options, config_, config_.num_layers,
                                           /*need_positions=*/false);
    auto h = transformer->word_embeddings_layernorm(transformer->word_embeddings(in.ids));
    const auto dev = h.device();
    if (slopes_.device() != dev) slopes_ = slopes_.to(dev);
    // ALiBi: slope_h * key position, the position counting tokens only
    // ((cumsum(mask) - 1) * mask), so left padding does not shift it.
    torch::Tensor key_pos;
    if (in.key_mask.defined()) {
      auto m = in.key_mask.to(torch::kFloat32);
      key_pos = (m.cumsum(-1) - 1) * m;  // [B, Tk]
    } else {
      key_pos = torch::arange(in.key_len, torch::TensorOptions(torch::kFloat32).device(dev))
                    .unsqueeze(0)
                    .expand({in.batch, in.key_len});
    }
    auto bias = (slopes_.view({1, -1, 1, 1}) * key_pos.view({in.batch, 1, 1, in.key_len}))
                    .to(h.scalar_type());  // [B, nh, 1, Tk]
    // Causal / padding mask as -inf (no row is empty: a query always sees itself).
    auto allowed = in.allowed;
    if (!allowed.defined() && in.is_causal) {
      auto opts = torch::TensorOptions(torch::kLong).device(dev);
      allowed = (torch::arange(in.key_len, opts).view({1, -1}) <=
                 torch::arange(in.query_len, opts).view({-1, 1}))
                    .view({1, 1, in.query_len, in.key_len});
    }
    if (allowed.defined()) {
      bias = torch::where(allowed, bias,
                          torch::full({}, -std::numeric_limits<float>::infinity(), bias.options()));
    } else {
      bias = bias.expand({in.batch, config_.num_heads, in.query_len, in.key_len});
    }
    size_t i = 0;
    for (const auto& block : *transformer->h)
      h = block->as<BloomBlockImpl>()->forward(h, bias, in, options.cache, i++);
    return transformer->ln_f(finish_blocks(h, in, options));
  }

  BloomModel transformer{nullptr};

 private:
  torch::Tensor slopes_;
};

void bloom_from_hf(const json::Value& j, ModelConfig& c) {
  c.hidden_size = j.contains("hidden_size") ? j["hidden_size"].as_int() : j["n_embed"].as_int();
  c.num_layers = j["n_layer"].as_int();
  c.num_heads = j["n_head"].as_int();
  c.num_kv_heads = c.num_heads;
  c.head_dim = default_head_dim(c.hidden_size, c.num_heads);
  c.intermediate_size = c.hidden_size <= ModelConfig::kMaxHidden ? 4 * c.hidden_size : 0;
  c.norm_eps = j.get_double("layer_norm_epsilon", 1e-5);
  c.tie_word_embeddings = true;  // BloomForCausalLM always ties lm_head to the embeddings
  c.apply_residual_connection_post_layernorm =
      j.get_bool("apply_residual_connection_post_layernorm", false);
  c.max_position_embeddings = j.get_int("seq_length", 2048);
}

void bloom_from_gguf(const GgufFile& f, ModelConfig& c) {
  c.norm_eps = f.get_float_or(c.architecture + ".attention.layer_norm_epsilon", 1e-5);
  c.tie_word_embeddings = true;
}

// The fused QKV is viewed as [B, T, n_head, 3, head_dim].
void bloom_validate(const ModelConfig& c) {
  TORCH_CHECK(c.num_heads * c.head_dim == c.hidden_size, "config: bloom needs n_head * head_dim == "
              "hidden_size, got ", c.num_heads, " * ", c.head_dim, " != ", c.hidden_size);
}

std::vector<GgufBlockTensor> bloom_gguf_attention_tensors(const ModelConfig& c) {
  return {{"attn_qkv.weight", {3 * c.hidden_size, c.hidden_size}, "embedding_length"}};
}

std::string bloom_gguf_tensor_name(const std::string& hf) {
  const std::string emb_norm = "transformer.word_embeddings_layernorm.", ln_f = "transformer.ln_f.";
  if (hf == "transformer.word_embeddings.weight") return "token_embd.weight";
  if (hf.compare(0, emb_norm.size(), emb_norm) == 0) return "token_embd_norm." + hf.substr(emb_norm.size());
  if (hf.compare(0, ln_f.size(), ln_f) == 0) return "output_norm." + hf.substr(ln_f.size());
  return gguf_block_name(hf, "transformer.h.", {{"input_layernorm", "attn_norm"},
                                                {"self_attention.query_key_value", "attn_qkv"},
                                                {"self_attention.dense", "attn_output"},
                                                {"post_attention_layernorm", "ffn_norm"},
                                                {"mlp.dense_h_to_4h", "ffn_up"},
                                                {"mlp.dense_4h_to_h", "ffn_down"}});
}

torch::Tensor bloom_gguf_fix_up(const std::string& g, torch::Tensor t, const ModelConfig& c) {
  return g.find(".attn_qkv.") != std::string::npos ? gguf_bloom_qkv_to_hf(t, c.num_heads) : t;
}

}  // namespace

torch::Tensor gguf_bloom_qkv_to_hf(const torch::Tensor& w, int64_t n_head) {
  const int64_t rows = w.size(0);
  TORCH_CHECK(rows % (3 * n_head) == 0, "gguf_bloom_qkv_to_hf: ", rows, " rows for ", n_head, " heads");
  return w.reshape(shape_with_rest({3, n_head, rows / 3 / n_head}, w)).transpose(0, 1).reshape(w.sizes());
}

const Architecture& bloom_architecture() {
  static const Architecture a{"bloom", {"BloomForCausalLM"}, /*rope=*/false,  // ALiBi
                              bloom_from_hf, bloom_from_gguf, bloom_validate,
                              bloom_gguf_attention_tensors, make_model<BloomForCausalLM>,
                              bloom_gguf_tensor_name, bloom_gguf_fix_up};
  return a;
}

}  // namespace detail
}  // namespace slowed_examples

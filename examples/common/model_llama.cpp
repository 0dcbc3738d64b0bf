// Llama-family decoder (Llama, SmolLM2, Llama-3.x, Qwen2) following transformers'
// modeling_llama.py / modeling_qwen2.py: pre-norm RMSNorm blocks, RoPE in the rotate_half
// convention, grouped-query attention, SwiGLU MLP. Registers the architectures "llama" and
// "qwen2" (config.json / GGUF readers, GGUF tensor names, llama.cpp's Q/K permutation).

#include "common/gguf.h"
#include "common/model_internal.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace slowed_examples {
namespace detail {

namespace {

namespace F = torch::nn::functional;

// RMSNorm as in HF: normalise in float32, cast back, then scale by the weight.
class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps) : eps_(eps) {
    weight = register_parameter("weight", torch::ones({dim}));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = x.to(torch::kFloat32);
    h = h * torch::rsqrt(h.pow(2).mean(-1, /*keepdim=*/true) + eps_);
    return weight * h.to(x.scalar_type());
  }
  torch::Tensor weight;

 private:
  double eps_;
};
TORCH_MODULE(RMSNorm);

torch::nn::Linear linear(int64_t in, int64_t out, bool bias) {
  return torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(bias));
}

// rotate_half(x) = cat(-x2, x1) over the last dimension.
torch::Tensor rotate_half(const torch::Tensor& x) {
  const int64_t h = x.size(-1) / 2;
  return torch::cat({-x.narrow(-1, h, h), x.narrow(-1, 0, h)}, -1);
}

class LlamaAttentionImpl : public torch::nn::Module {
 public:
  explicit LlamaAttentionImpl(const ModelConfig& c)
      : nh_(c.num_heads), nkv_(c.num_kv_heads), hd_(c.head_dim) {
    q_proj = register_module("q_proj", linear(c.hidden_size, nh_ * hd_, c.qkv_bias));
    k_proj = register_module("k_proj", linear(c.hidden_size, nkv_ * hd_, c.qkv_bias));
    v_proj = register_module("v_proj", linear(c.hidden_size, nkv_ * hd_, c.qkv_bias));
    o_proj = register_module("o_proj", linear(nh_ * hd_, c.hidden_size, c.o_bias));
  }

  // x [B, T, H]; cos/sin [B, 1, T, D].
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const AttentionInputs& in, KVCache* cache, size_t layer) {
    const int64_t b = x.size(0), t = x.size(1);
    auto q = q_proj(x).view({b, t, nh_, hd_}).transpose(1, 2);   // [B, nh, T, D]
    auto k = k_proj(x).view({b, t, nkv_, hd_}).transpose(1, 2);  // [B, nkv, T, D]
    auto v = v_proj(x).view({b, t, nkv_, hd_}).transpose(1, 2);
    q = q * cos + rotate_half(q) * sin;
    k = k * cos + rotate_half(k) * sin;
    std::tie(k, v) = cache_update(cache, layer, in, k, v);
    if (nh_ != nkv_) {
      // repeat_kv: query head h reads kv head h / (nh / nkv).
      const int64_t rep = nh_ / nkv_, tk = k.size(2);
      k = k.unsqueeze(2).expand({b, nkv_, rep, tk, hd_}).reshape({b, nh_, tk, hd_});
      v = v.unsqueeze(2).expand({b, nkv_, rep, tk, hd_}).reshape({b, nh_, tk, hd_});
    }
    std::optional<torch::Tensor> mask;
    if (in.allowed.defined()) mask = in.allowed;
    auto o = at::scaled_dot_product_attention(q, k, v, mask, 0.0, in.is_causal,
                                              1.0 / std::sqrt(static_cast<double>(hd_)));
    o = o.transpose(1, 2).reshape({b, t, nh_ * hd_});
    return o_proj(o);
  }

  torch::nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};

 private:
  int64_t nh_, nkv_, hd_;
};
TORCH_MODULE(LlamaAttention);

class LlamaMLPImpl : public torch::nn::Module {
 public:
  explicit LlamaMLPImpl(const ModelConfig& c) {
    gate_proj = register_module("gate_proj", linear(c.hidden_size, c.intermediate_size, c.mlp_bias));
    up_proj = register_module("up_proj", linear(c.hidden_size, c.intermediate_size, c.mlp_bias));
    down_proj = register_module("down_proj", linear(c.intermediate_size, c.hidden_size, c.mlp_bias));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return down_proj(F::silu(gate_proj(x)) * up_proj(x));
  }
  torch::nn::Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
};
TORCH_MODULE(LlamaMLP);

class LlamaDecoderLayerImpl : public torch::nn::Module {
 public:
  explicit LlamaDecoderLayerImpl(const ModelConfig& c) {
    self_attn = register_module("self_attn", LlamaAttention(c));
    mlp = register_module("mlp", LlamaMLP(c));
    input_layernorm = register_module("input_layernorm", RMSNorm(c.hidden_size, c.norm_eps));
    post_attention_layernorm =
        register_module("post_attention_layernorm", RMSNorm(c.hidden_size, c.norm_eps));
  }
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const AttentionInputs& in, KVCache* cache, size_t layer) {
    auto h = x + self_attn(input_layernorm(x), cos, sin, in, cache, layer);
    return h + mlp(post_attention_layernorm(h));
  }
  LlamaAttention self_attn{nullptr};
  LlamaMLP mlp{nullptr};
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
};
TORCH_MODULE(LlamaDecoderLayer);

// HF's LlamaModel: "embed_tokens", "layers", "norm".
class LlamaModelImpl : public torch::nn::Module {
 public:
  explicit LlamaModelImpl(const ModelConfig& c) {
    embed_tokens = register_module("embed_tokens", torch::nn::Embedding(c.vocab_size, c.hidden_size));
    layers = register_module("layers", torch::nn::ModuleList());
    for (int64_t i = 0; i < c.num_layers; ++i) layers->push_back(LlamaDecoderLayer(c));
    norm = register_module("norm", RMSNorm(c.hidden_size, c.norm_eps));
  }
  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  RMSNorm norm{nullptr};
};
TORCH_MODULE(LlamaModel);

// inv_freq[i] = theta^(-2i/D) in float32 as HF computes it, then the configured scaling.
torch::Tensor rope_inv_freq(const ModelConfig& c) {
  const int64_t d = c.head_dim;
  auto inv = 1.0 / torch::pow(torch::tensor(c.rope_theta, torch::kFloat32),
                              torch::arange(0, d, 2, torch::kLong).to(torch::kFloat32) / d);
  const RopeScaling& s = c.rope_scaling;
  if (s.type == "linear") {
    inv = inv / s.factor;
  } else if (s.type == "llama3") {
    // transformers' _compute_llama3_parameters, step by step.
    const double low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
    const double high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
    auto wavelen = 2 * M_PI / inv;
    auto inv_llama = torch::where(wavelen > low_wavelen, inv / s.factor, inv);
    auto smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) /
                  (s.high_freq_factor - s.low_freq_factor);
    auto smoothed = (1 - smooth) * inv_llama / s.factor + smooth * inv_llama;
    auto medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen);
    inv = torch::where(medium, smoothed, inv_llama);
  }
  if (!c.rope_freq_factors.empty()) {
    inv = inv / torch::tensor(c.rope_freq_factors, torch::kFloat64).to(torch::kFloat32);
  }
  return inv.to(torch::kFloat32);
}

class LlamaForCausalLM : public CausalLM {
 public:
  explicit LlamaForCausalLM(const ModelConfig& c) : CausalLM(c) {
    model = register_module("model", LlamaModel(c));
    if (!c.tie_word_embeddings) lm_head = register_module("lm_head", linear(c.hidden_size, c.vocab_size, false));
    inv_freq_ = rope_inv_freq(c);
  }

  using CausalLM::forward;
  torch::Tensor input_embeddings() const override { return model->embed_tokens->weight; }
  torch::Tensor output_embeddings() const override {
    return lm_head ? lm_head->weight : model->embed_tokens->weight;
  }

  torch::Tensor forward(const torch::Tensor& input_ids, const ForwardOptions& options) override {
    auto h = forward_hidden(input_ids, options);
    return lm_head ? lm_head(h) : F::linear(h, model->embed_tokens->weight);
  }

  torch::Tensor forward_hidden(const torch::Tensor& input_ids, const ForwardOptions& options) override {
    AttentionInputs in = prepare_attention(input_ids, options, config_,
                                           config_.num_layers, /*need_positions=*/true);
    auto h = model->embed_tokens(in.ids);  // [B, T, H]
    // RoPE tables in float32, cast to the activations' dtype as HF does.
    if (inv_freq_.device() != h.device()) inv_freq_ = inv_freq_.to(h.device());
    auto freqs = in.positions.to(torch::kFloat32).unsqueeze(-1) * inv_freq_;  // [B, T, D/2]
    auto emb = torch::cat({freqs, freqs}, -1);
    auto cos = emb.cos().to(h.scalar_type()).unsqueeze(1);  // [B, 1, T, D]
    auto sin = emb.sin().to(h.scalar_type()).unsqueeze(1);
    size_t i = 0;
    for (const auto& layer : *model->layers) {
      h = layer->as<LlamaDecoderLayerImpl>()->forward(h, cos, sin, in, options.cache, i++);
    }
    return model->norm(finish_blocks(h, in, options));
  }

  LlamaModel model{nullptr};
  torch::nn::Linear lm_head{nullptr};

 private:
  torch::Tensor inv_freq_;
};

// ---- config.json ----------------------------------------------------------------------------

void read_rope(const json::Value& holder, ModelConfig& c) {
  c.rope_scaling.type = holder.get_string("rope_type", holder.get_string("type", "default"));
  c.rope_scaling.factor = holder.get_double("factor", 1.0);
  c.rope_scaling.low_freq_factor = holder.get_double("low_freq_factor", 1.0);
  c.rope_scaling.high_freq_factor = holder.get_double("high_freq_factor", 4.0);
  c.rope_scaling.original_max_position_embeddings =
      holder.get_int("original_max_position_embeddings", 8192);
}

// The fields Llama and Qwen2 share: sizes, RMSNorm epsilon, SiLU, RoPE in transformers' 4.x
// ("rope_theta", "rope_scaling") and 5.x ("rope_parameters") spellings.
void llama_family_from_hf(const json::Value& j, ModelConfig& c) {
  c.hidden_size = j["hidden_size"].as_int();
  c.num_layers = j["num_hidden_layers"].as_int();
  c.num_heads = j["num_attention_heads"].as_int();
  c.num_kv_heads = j.get_int("num_key_value_heads", c.num_heads);
  c.head_dim = j.get_int("head_dim", default_head_dim(c.hidden_size, c.num_heads));
  c.intermediate_size = j["intermediate_size"].as_int();
  c.norm_eps = j.get_double("rms_norm_eps", 1e-6);
  c.max_position_embeddings = j.get_int("max_position_embeddings", 2048);
  const std::string act = j.get_string("hidden_act", "silu");
  TORCH_CHECK(act == "silu", "hidden_act '", act, "' is not supported (expected silu)");
  c.rope_theta = j.get_double("rope_theta", 10000.0);
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {
    // transformers >= 5: {"rope_type": ..., "rope_theta": ..., "factor": ...}
    const auto& rp = j["rope_parameters"];
    c.rope_theta = rp.get_double("rope_theta", c.rope_theta);
    read_rope(rp, c);
  } else if (j.contains("rope_scaling") && j["rope_scaling"].is_object()) {
    read_rope(j["rope_scaling"], c);
  }
  const std::string& rt = c.rope_scaling.type;
  TORCH_CHECK(rt == "default" || rt == "linear" || rt == "llama3", "RoPE scaling type '", rt,
              "' is not supported (supported: default, linear, llama3)");
}

void llama_from_hf(const json::Value& j, ModelConfig& c) {
  llama_family_from_hf(j, c);
  c.qkv_bias = c.o_bias = j.get_bool("attention_bias", false);
  c.mlp_bias = j.get_bool("mlp_bias", false);
  c.tie_word_embeddings = j.get_bool("tie_word_embeddings", false);
}

void qwen2_from_hf(const json::Value& j, ModelConfig& c) {
  llama_family_from_hf(j, c);
  c.qkv_bias = true;
  c.tie_word_embeddings = j.get_bool("tie_word_embeddings", false);
  TORCH_CHECK(!j.get_bool("use_sliding_window", false), "use_sliding_window=true is not supported");
}

// ---- GGUF ---------------------------------------------------------------------------------

void llama_from_gguf(const GgufFile& f, ModelConfig& c) {
  const std::string p = c.architecture + ".";
  c.norm_eps = f.get_float_or(p + "attention.layer_norm_rms_epsilon", 1e-6);
  c.rope_theta = f.get_float_or(p + "rope.freq_base", 10000.0);
  const std::string scaling = f.get_string_or(p + "rope.scaling.type", "none");
  if (scaling == "linear") {
    c.rope_scaling.type = "linear";
    c.rope_scaling.factor = f.get_float(p + "rope.scaling.factor");
  } else {
    TORCH_CHECK(scaling == "none", "GGUF file '", f.path(), "': rope.scaling.type '", scaling,
                "' is not supported (supported: none, linear; llama3 comes as rope_freqs.weight)");
  }
  if (f.has_tensor("rope_freqs.weight")) {
    auto rf = f.tensor("rope_freqs.weight").to(torch::kFloat64).contiguous();
    c.rope_freq_factors.assign(rf.data_ptr<double>(), rf.data_ptr<double>() + rf.numel());
  }
  c.tie_word_embeddings = !f.has_tensor("output.weight");
  c.qkv_bias = f.has_tensor("blk.0.attn_q.bias");
  c.o_bias = f.has_tensor("blk.0.attn_output.bias");
  c.mlp_bias = f.has_tensor("blk.0.ffn_up.bias");
}

std::vector<GgufBlockTensor> llama_gguf_attention_tensors(const ModelConfig& c) {
  return {{"attn_q.weight", {c.num_heads * c.head_dim, c.hidden_size},
           "attention.head_count and the head size"},
          {"attn_k.weight", {c.num_kv_heads * c.head_dim, c.hidden_size},
           "attention.head_count_kv and the head size"}};
}

std::string llama_gguf_tensor_name(const std::string& hf) {
  if (hf == "model.embed_tokens.weight") return "token_embd.weight";
  if (hf == "model.norm.weight") return "output_norm.weight";
  if (hf == "lm_head.weight") return "output.weight";
  return gguf_block_name(hf, "model.layers.", {{"self_attn.q_proj", "attn_q"},
                                               {"self_attn.k_proj", "attn_k"},
                                               {"self_attn.v_proj", "attn_v"},
                                               {"self_attn.o_proj", "attn_output"},
                                               {"input_layernorm", "attn_norm"},
                                               {"post_attention_layernorm", "ffn_norm"},
                                               {"mlp.gate_proj", "ffn_gate"},
                                               {"mlp.up_proj", "ffn_up"},
                                               {"mlp.down_proj", "ffn_down"}});
}

// llama.cpp permutes Q/K rows for its RoPE layout; undo it for rotate_half.
torch::Tensor llama_gguf_fix_up(const std::string& g, torch::Tensor t, const ModelConfig& c) {
  if (g.find(".attn_q.") != std::string::npos) t = gguf_unpermute_qk(t, c.num_heads);
  if (g.find(".attn_k.") != std::string::npos) t = gguf_unpermute_qk(t, c.num_kv_heads);
  return t;
}

}  // namespace

// llama.cpp (convert_hf_to_gguf.py, LlamaModel.permute): rows grouped per head as
// [first halves; second halves] -> interleaved pairs, so its rotation of adjacent pairs equals
// HF's rotate_half.
torch::Tensor gguf_permute_qk(const torch::Tensor& w, int64_t n_head) {
  const int64_t rows = w.size(0);
  TORCH_CHECK(rows % (2 * n_head) == 0, "gguf_permute_qk: ", rows, " rows for ", n_head, " heads");
  return w.reshape(shape_with_rest({n_head, 2, rows / n_head / 2}, w)).transpose(1, 2).reshape(w.sizes());
}

torch::Tensor gguf_unpermute_qk(const torch::Tensor& w, int64_t n_head) {
  const int64_t rows = w.size(0);
  TORCH_CHECK(rows % (2 * n_head) == 0, "gguf_unpermute_qk: ", rows, " rows for ", n_head, " heads");
  return w.reshape(shape_with_rest({n_head, rows / n_head / 2, 2}, w)).transpose(1, 2).reshape(w.sizes());
}

const Architecture& llama_architecture() {
  static const Architecture a{"llama", {"LlamaForCausalLM"}, /*rope=*/true, llama_from_hf,
                              llama_from_gguf, /*validate=*/nullptr, llama_gguf_attention_tensors,
                              make_model<LlamaForCausalLM>, llama_gguf_tensor_name,
                              llama_gguf_fix_up};
  return a;
}

// Qwen2 is Llama with bias on q/k/v: the same modules and tensor names, its own config.json
// fields, and no Q/K permutation in its GGUFs (llama.cpp uses its NeoX rotation for them).
const Architecture& qwen2_architecture() {
  static const Architecture a{"qwen2", {"Qwen2ForCausalLM"}, /*rope=*/true, qwen2_from_hf,
                              llama_from_gguf, /*validate=*/nullptr, llama_gguf_attention_tensors,
                              make_model<LlamaForCausalLM>, llama_gguf_tensor_name,
                              /*gguf_fix_up=*/nullptr};
  return a;
}

}  // namespace detail
}  // namespace slowed_examples

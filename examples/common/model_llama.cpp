// Llama-family decoder (Llama, SmolLM2, Llama-3.x, Qwen2) following transformers'
// modeling_llama.py / modeling_qwen2.py: pre-norm RMSNorm blocks, RoPE in the rotate_half
// convention, grouped-query attention, SwiGLU MLP. Also the shared attention-input helpers.

#include "common/model_internal.h"

#include <cmath>

namespace slowed_examples {
namespace detail {

namespace F = torch::nn::functional;

AttentionInputs prepare_attention(const torch::Tensor& input_ids, const ForwardOptions& options,
                                  const ModelConfig& config, int64_t cache_layers_expected,
                                  bool need_positions) {
  AttentionInputs in;
  TORCH_CHECK(input_ids.defined() && input_ids.dim() == 2, config.architecture,
              " forward: input_ids must be [batch, seq], got ",
              input_ids.defined() ? input_ids.sizes().vec() : std::vector<int64_t>{});
  TORCH_CHECK(input_ids.scalar_type() == torch::kLong || input_ids.scalar_type() == torch::kInt,
              config.architecture, " forward: input_ids must be int64 or int32, got ",
              input_ids.scalar_type());
  TORCH_CHECK(input_ids.size(1) > 0, config.architecture, " forward: empty sequence");
  in.ids = input_ids.to(torch::kLong);
  in.batch = input_ids.size(0);
  in.query_len = input_ids.size(1);
  if (options.cache != nullptr) {
    const KVCache& c = *options.cache;
    in.past = c.length();
    if (in.past > 0) {
      TORCH_CHECK(static_cast<int64_t>(c.num_layers()) == cache_layers_expected,
                  config.architecture, " forward: cache has ", c.num_layers(),
                  " layers, expected ", cache_layers_expected);
      TORCH_CHECK(c.batch_size() == in.batch, config.architecture, " forward: cache batch ",
                  c.batch_size(), " != input batch ", in.batch);
    }
  }
  in.key_len = in.past + in.query_len;
  const auto dev = input_ids.device();

  if (options.attention_mask.defined()) {
    const auto& m = options.attention_mask;
    TORCH_CHECK(m.dim() == 2 && m.size(0) == in.batch && m.size(1) == in.key_len,
                config.architecture, " forward: attention_mask must be [", in.batch, ", ",
                in.key_len, "] (batch, cached + new positions), got ", m.sizes());
    in.key_mask = m.to(dev) != 0;
  }
  if (need_positions) {
    if (options.position_ids.defined()) {
      const auto& p = options.position_ids;
      TORCH_CHECK(p.dim() == 2 && p.size(0) == in.batch && p.size(1) == in.query_len,
                  config.architecture, " forward: position_ids must be [", in.batch, ", ",
                  in.query_len, "], got ", p.sizes());
      in.positions = p.to(dev, torch::kLong);
    } else if (in.key_mask.defined()) {
      // HF generate's convention: cumsum(mask) - 1, padding positions clamped to 0.
      auto pos = in.key_mask.to(torch::kLong).cumsum(-1) - 1;
      pos = pos.clamp_min(0);
      in.positions = pos.narrow(1, in.past, in.query_len);
    } else {
      in.positions = (torch::arange(in.past, in.key_len, torch::TensorOptions(torch::kLong).device(dev)))
                         .unsqueeze(0)
                         .expand({in.batch, in.query_len});
    }
  }

  const bool has_padding =
      in.key_mask.defined() && !in.key_mask.all().item<bool>();
  if (!has_padding) {
    if (in.query_len == 1) return in;  // one query sees every cached key
    if (in.past == 0) {
      in.is_causal = true;
      return in;
    }
  }
  auto opts = torch::TensorOptions(torch::kLong).device(dev);
  auto qpos = torch::arange(in.past, in.key_len, opts).view({in.query_len, 1});  // absolute slot
  auto kpos = torch::arange(0, in.key_len, opts).view({1, in.key_len});
  auto allowed = (kpos <= qpos).view({1, 1, in.query_len, in.key_len});  // [1,1,T,Tk]
  if (has_padding) {
    allowed = allowed & in.key_mask.view({in.batch, 1, 1, in.key_len});
    allowed = allowed | (kpos == qpos).view({1, 1, in.query_len, in.key_len});
  }
  in.allowed = allowed.expand({in.batch, 1, in.query_len, in.key_len});
  return in;
}

torch::Tensor output_hidden(const torch::Tensor& hidden, const ForwardOptions& options) {
  const auto& pos = options.output_positions;
  if (pos.defined()) {
    TORCH_CHECK(options.logits_to_keep <= 0, "forward: output_positions and logits_to_keep are exclusive");
    TORCH_CHECK(pos.dim() == 1 && pos.scalar_type() == torch::kLong,
                "forward: output_positions must be a 1-D int64 tensor, got ", pos.dim(), "-D ", pos.scalar_type());
    const int64_t n = hidden.size(0) * hidden.size(1);
    TORCH_CHECK(pos.numel() == 0 || (pos.min().item<int64_t>() >= 0 && pos.max().item<int64_t>() < n),
                "forward: output_positions must lie in [0, ", n, ") (batch x length)");
    return hidden.reshape({n, hidden.size(2)}).index_select(0, pos.to(hidden.device()));
  }
  const int64_t keep = options.logits_to_keep, t = hidden.size(1);
  if (keep <= 0 || keep >= t) return hidden;
  return hidden.narrow(1, t - keep, keep);
}

std::pair<torch::Tensor, torch::Tensor> cache_update(KVCache* cache, size_t layer,
                                                     const AttentionInputs& in,
                                                     const torch::Tensor& k,
                                                     const torch::Tensor& v) {
  if (cache == nullptr) return {k, v};
  return cache->append(layer, in.past, k, v);
}

}  // namespace detail

torch::Tensor KVCache::keys(size_t layer) const {
  TORCH_CHECK(layer < keys_.size(), "KVCache: layer ", layer, " of ", keys_.size());
  return keys_[layer].narrow(2, 0, length_);
}
torch::Tensor KVCache::values(size_t layer) const {
  TORCH_CHECK(layer < values_.size(), "KVCache: layer ", layer, " of ", values_.size());
  return values_[layer].narrow(2, 0, length_);
}
void KVCache::clear() {
  keys_.clear();
  values_.clear();
  length_ = 0;
}
void KVCache::select_rows(const torch::Tensor& rows) {
  for (size_t l = 0; l < keys_.size(); ++l) {
    const auto idx = rows.to(keys_[l].device(), torch::kLong);
    keys_[l] = keys_[l].index_select(0, idx);
    values_[l] = values_[l].index_select(0, idx);
  }
}
std::pair<torch::Tensor, torch::Tensor> KVCache::append(size_t layer, int64_t past,
                                                        const torch::Tensor& k,
                                                        const torch::Tensor& v) {
  if (keys_.size() <= layer) {
    keys_.resize(layer + 1);
    values_.resize(layer + 1);
  }
  auto& kb = keys_[layer];
  auto& vb = values_[layer];
  const int64_t t = k.size(2), need = past + t;
  if (!kb.defined() || kb.size(2) < need) {
    // Grow to at least double the capacity (amortised O(1) per appended position).
    const int64_t cap = std::max<int64_t>(need, kb.defined() ? 2 * kb.size(2) : need);
    auto nk = torch::empty({k.size(0), k.size(1), cap, k.size(3)}, k.options());
    auto nv = torch::empty({v.size(0), v.size(1), cap, v.size(3)}, v.options());
    if (kb.defined() && past > 0) {
      nk.narrow(2, 0, past).copy_(kb.narrow(2, 0, past));
      nv.narrow(2, 0, past).copy_(vb.narrow(2, 0, past));
    }
    kb = nk;
    vb = nv;
  }
  kb.narrow(2, past, t).copy_(k);
  vb.narrow(2, past, t).copy_(v);
  return {kb.narrow(2, 0, need), vb.narrow(2, 0, need)};
}

namespace detail {

namespace {

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
    if (options.cache != nullptr) options.cache->commit(in.key_len);
    return model->norm(output_hidden(h, options));
  }

  LlamaModel model{nullptr};
  torch::nn::Linear lm_head{nullptr};

 private:
  torch::Tensor inv_freq_;
};

}  // namespace

std::shared_ptr<CausalLM> make_llama(const ModelConfig& config) {
  return std::make_shared<LlamaForCausalLM>(config);
}

}  // namespace detail
}  // namespace slowed_examples

// What every model shares: the attention inputs (checks, position ids, the mask), the LM head's
// positions, the KV cache, and the small helpers the architecture records use.

#include "common/model_internal.h"

#include <algorithm>

namespace slowed_examples {
namespace detail {

int64_t default_head_dim(int64_t hidden, int64_t heads) {
  return heads > 0 && hidden > 0 && hidden % heads == 0 ? hidden / heads : 0;
}

std::vector<int64_t> shape_with_rest(std::vector<int64_t> head, const torch::Tensor& w) {
  for (int64_t d = 1; d < w.dim(); ++d) head.push_back(w.size(d));
  return head;
}

std::string gguf_block_name(const std::string& hf, const std::string& prefix,
                            const std::vector<std::pair<std::string, std::string>>& table) {
  if (hf.compare(0, prefix.size(), prefix) != 0) return "";
  const size_t dot = hf.find('.', prefix.size());
  if (dot == std::string::npos) return "";
  const std::string n = hf.substr(prefix.size(), dot - prefix.size());
  const std::string rest = hf.substr(dot + 1);
  for (const auto& kv : table)
    if (rest.compare(0, kv.first.size() + 1, kv.first + ".") == 0)
      return "blk." + n + "." + kv.second + rest.substr(kv.first.size());
  return "";
}

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

torch::Tensor finish_blocks(const torch::Tensor& hidden, const AttentionInputs& in,
                            const ForwardOptions& options) {
  if (options.cache != nullptr) options.cache->commit(in.key_len);
  return output_hidden(hidden, options);
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

}  // namespace slowed_examples

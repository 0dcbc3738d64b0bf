// Building a model for a config and filling it from an HF safetensors checkpoint or a GGUF file.

#include "common/gguf.h"
#include "common/model_internal.h"
#include "common/safetensors.h"

#include <c10/util/Exception.h>

#include <filesystem>
#include <functional>

namespace slowed_examples {

std::shared_ptr<CausalLM> make_causal_lm(const ModelConfig& config) {
  config.validate();
  if (config.architecture == "llama" || config.architecture == "qwen2")
    return detail::make_llama(config);
  if (config.architecture == "bloom") return detail::make_bloom(config);
  TORCH_CHECK(false, "make_causal_lm: unsupported architecture '", config.architecture,
              "' (supported: llama, qwen2, bloom)");
}

namespace detail {

namespace {
std::vector<int64_t> with_rest(std::vector<int64_t> head, const torch::Tensor& w) {
  for (int64_t d = 1; d < w.dim(); ++d) head.push_back(w.size(d));
  return head;
}
}  // namespace

// llama.cpp (convert_hf_to_gguf.py, LlamaModel.permute): rows grouped per head as
// [first halves; second halves] -> interleaved pairs, so its rotation of adjacent pairs equals
// HF's rotate_half.
torch::Tensor gguf_permute_qk(const torch::Tensor& w, int64_t n_head) {
  const int64_t rows = w.size(0);
  TORCH_CHECK(rows % (2 * n_head) == 0, "gguf_permute_qk: ", rows, " rows for ", n_head, " heads");
  return w.reshape(with_rest({n_head, 2, rows / n_head / 2}, w)).transpose(1, 2).reshape(w.sizes());
}

torch::Tensor gguf_unpermute_qk(const torch::Tensor& w, int64_t n_head) {
  const int64_t rows = w.size(0);
  TORCH_CHECK(rows % (2 * n_head) == 0, "gguf_unpermute_qk: ", rows, " rows for ", n_head, " heads");
  return w.reshape(with_rest({n_head, rows / n_head / 2, 2}, w)).transpose(1, 2).reshape(w.sizes());
}

torch::Tensor gguf_bloom_qkv_to_hf(const torch::Tensor& w, int64_t n_head) {
  const int64_t rows = w.size(0);
  TORCH_CHECK(rows % (3 * n_head) == 0, "gguf_bloom_qkv_to_hf: ", rows, " rows for ", n_head, " heads");
  return w.reshape(with_rest({3, n_head, rows / 3 / n_head}, w)).transpose(0, 1).reshape(w.sizes());
}

std::string gguf_name_for(const std::string& arch, const std::string& hf) {
  auto starts = [&](const std::string& p) { return hf.compare(0, p.size(), p) == 0; };
  // "<prefix>N.<rest>" -> "blk.N.<mapped rest>".
  auto block = [&](const std::string& prefix,
                   const std::vector<std::pair<std::string, std::string>>& table) -> std::string {
    const size_t dot = hf.find('.', prefix.size());
    if (dot == std::string::npos) return "";
    const std::string n = hf.substr(prefix.size(), dot - prefix.size());
    const std::string rest = hf.substr(dot + 1);
    for (const auto& kv : table)
      if (rest.compare(0, kv.first.size() + 1, kv.first + ".") == 0)
        return "blk." + n + "." + kv.second + rest.substr(kv.first.size());
    return "";
  };
  if (arch == "bloom") {
    if (hf == "transformer.word_embeddings.weight") return "token_embd.weight";
    if (starts("transformer.word_embeddings_layernorm."))
      return "token_embd_norm." + hf.substr(std::string("transformer.word_embeddings_layernorm.").size());
    if (starts("transformer.ln_f.")) return "output_norm." + hf.substr(std::string("transformer.ln_f.").size());
    if (starts("transformer.h."))
      return block("transformer.h.", {{"input_layernorm", "attn_norm"},
                                      {"self_attention.query_key_value", "attn_qkv"},
                                      {"self_attention.dense", "attn_output"},
                                      {"post_attention_layernorm", "ffn_norm"},
                                      {"mlp.dense_h_to_4h", "ffn_up"},
                                      {"mlp.dense_4h_to_h", "ffn_down"}});
    return "";
  }
  if (hf == "model.embed_tokens.weight") return "token_embd.weight";
  if (hf == "model.norm.weight") return "output_norm.weight";
  if (hf == "lm_head.weight") return "output.weight";
  if (starts("model.layers."))
    return block("model.layers.", {{"self_attn.q_proj", "attn_q"},
                                   {"self_attn.k_proj", "attn_k"},
                                   {"self_attn.v_proj", "attn_v"},
                                   {"self_attn.o_proj", "attn_output"},
                                   {"input_layernorm", "attn_norm"},
                                   {"post_attention_layernorm", "ffn_norm"},
                                   {"mlp.gate_proj", "ffn_gate"},
                                   {"mlp.up_proj", "ffn_up"},
                                   {"mlp.down_proj", "ffn_down"}});
  return "";
}

}  // namespace detail

namespace {

// Copies every parameter of `model` from fetch(hf_name) (float32 or any dtype), checking shapes.
void fill_parameters(CausalLM& model, const std::string& source,
                     const std::function<torch::Tensor(const std::string&)>& fetch) {
  torch::NoGradGuard no_grad;
  for (auto& item : model.named_parameters(/*recurse=*/true)) {
    torch::Tensor src = fetch(item.key());
    TORCH_CHECK(src.sizes() == item.value().sizes(), "model '", source, "': tensor for '",
                item.key(), "' has shape ", src.sizes(), ", expected ", item.value().sizes());
    item.value().copy_(src);
  }
}

LoadedModel load_safetensors_folder(const std::string& path) {
  namespace fs = std::filesystem;
  const std::string dir = fs::is_directory(path) ? path : fs::path(path).parent_path().string();
  LoadedModel out;
  out.path = path;
  out.format = "safetensors";
  out.config = ModelConfig::from_hf_folder(dir);
  out.model = make_causal_lm(out.config);
  const auto ckpt = SafetensorsCheckpoint::open(path);
  fill_parameters(*out.model, path, [&](const std::string& name) {
    if (ckpt.has_tensor(name)) return ckpt.tensor(name);
    // Checkpoints saved from the base model (e.g. bigscience/bloom-*) lack the
    // "transformer." / "model." prefix.
    const size_t dot = name.find('.');
    const std::string bare = dot == std::string::npos ? name : name.substr(dot + 1);
    if (ckpt.has_tensor(bare)) return ckpt.tensor(bare);
    TORCH_CHECK(false, "model '", path, "': tensor '", name, "' not found in the checkpoint (",
                ckpt.tensor_names().size(), " tensors)");
  });
  return out;
}

LoadedModel load_gguf(const std::string& path) {
  LoadedModel out;
  out.path = path;
  out.format = "gguf";
  const GgufFile f = GgufFile::open(path);
  out.config = ModelConfig::from_gguf(f);
  out.model = make_causal_lm(out.config);
  const ModelConfig& c = out.config;
  fill_parameters(*out.model, path, [&](const std::string& name) {
    const std::string g = detail::gguf_name_for(c.architecture, name);
    TORCH_CHECK(!g.empty(), "GGUF file '", path, "': no GGUF tensor name for parameter '", name, "'");
    TORCH_CHECK(f.has_tensor(g), "GGUF file '", path, "': tensor '", g, "' (for '", name,
                "') not found");
    torch::Tensor t = f.tensor(g);
    if (c.architecture == "llama") {
      // llama.cpp permutes Q/K rows for its RoPE layout; undo it for rotate_half.
      if (g.find(".attn_q.") != std::string::npos) t = detail::gguf_unpermute_qk(t, c.num_heads);
      if (g.find(".attn_k.") != std::string::npos) t = detail::gguf_unpermute_qk(t, c.num_kv_heads);
    } else if (c.architecture == "bloom" && g.find(".attn_qkv.") != std::string::npos) {
      t = detail::gguf_bloom_qkv_to_hf(t, c.num_heads);
    }
    return t;
  });
  return out;
}

}  // namespace

LoadedModel load_model(const std::string& path, torch::Dtype dtype, torch::Device device) {
  namespace fs = std::filesystem;
  TORCH_CHECK(fs::exists(path), "load_model: '", path, "' does not exist (expected an HF folder "
              "with config.json and *.safetensors, or a .gguf file)");
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16 || dtype == torch::kFloat16,
              "load_model: dtype must be float32, bfloat16 or float16, got ", dtype);
  const bool is_gguf = !fs::is_directory(path) && path.size() >= 5 &&
                       path.compare(path.size() - 5, 5, ".gguf") == 0;
  LoadedModel out = is_gguf ? load_gguf(path) : load_safetensors_folder(path);
  out.model->to(device, dtype);
  out.model->eval();
  return out;
}

}  // namespace slowed_examples

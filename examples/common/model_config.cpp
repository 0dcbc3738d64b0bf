// ModelConfig from HF config.json or from GGUF metadata: what every architecture shares (the
// vocabulary, token ids, sizes every GGUF has, the caps); each architecture's own fields come
// from its record (model_internal.h, model_<arch>.cpp).

#include "common/gguf.h"
#include "common/model_internal.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <sstream>

namespace slowed_examples {

namespace {

using detail::default_head_dim;

std::vector<int64_t> int_or_list(const json::Value& v) {
  std::vector<int64_t> out;
  if (v.is_array()) {
    for (const auto& e : v.elements()) out.push_back(e.as_int());
  } else if (!v.is_null()) {
    out.push_back(v.as_int());
  }
  return out;
}

/// The tensors a model of config `c` reads from `f` exist with the shapes it implies, so that a
/// forged size (block_count, embedding_length, vocab_size, head counts) is refused before a
/// model is allocated from it: every allocation is then bounded by the file's own tensors.
void check_gguf_tensor_shapes(const GgufFile& f, const ModelConfig& c,
                              const detail::Architecture& arch) {
  auto expect = [&](const std::string& name, std::vector<int64_t> shape, const char* from) {
    TORCH_CHECK(f.has_tensor(name), "GGUF file '", f.path(), "': tensor '", name,
                "' not found, expected by ", from);
    const auto& got = f.tensor_info(name).shape;
    TORCH_CHECK(got == shape, "GGUF file '", f.path(), "': tensor '", name, "' has shape ",
                torch::IntArrayRef(got), ", expected ", torch::IntArrayRef(shape), " from ", from);
  };
  const std::string p = c.architecture + ".";
  expect("token_embd.weight", {c.vocab_size, c.hidden_size},
         "the vocabulary size and embedding_length");
  const std::vector<detail::GgufBlockTensor> attention = arch.gguf_attention_tensors(c);
  for (int64_t layer = 0; layer < c.num_layers; ++layer) {
    const std::string b = "blk." + std::to_string(layer) + ".";
    const std::string from = p + "block_count " + std::to_string(c.num_layers);
    expect(b + "attn_norm.weight", {c.hidden_size}, from.c_str());
    for (const auto& t : attention) expect(b + t.name, t.shape, t.from);
    expect(b + "ffn_down.weight", {c.hidden_size, c.intermediate_size},
           "feed_forward_length and embedding_length");
  }
}

}  // namespace

ModelConfig ModelConfig::from_hf_json(const json::Value& j, const std::string& source) {
  TORCH_CHECK(j.is_object(), "model config '", source, "': expected a JSON object");
  ModelConfig c;
  std::string model_type = j.get_string("model_type", "");
  if (model_type.empty() && j.contains("architectures") && j["architectures"].is_array() &&
      j["architectures"].size() > 0)
    model_type = detail::architecture_of_hf_class(j["architectures"][0].as_string());
  const detail::Architecture& arch =
      detail::architecture_or_throw(model_type, "model config '" + source + "': ");
  c.architecture = model_type;
  try {
    c.vocab_size = j["vocab_size"].as_int();
    arch.config_from_hf(j, c);
    c.bos_token_id = j.get_int("bos_token_id", -1);
    c.pad_token_id = j.get_int("pad_token_id", -1);
    if (j.contains("eos_token_id")) c.eos_token_ids = int_or_list(j["eos_token_id"]);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "model config '", source, "': ", e.msg());
  }
  try {
    c.validate();
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "model config '", source, "': ", e.msg());
  }
  return c;
}

ModelConfig ModelConfig::from_hf_folder(const std::string& dir) {
  namespace fs = std::filesystem;
  const fs::path cfg = fs::path(dir) / "config.json";
  TORCH_CHECK(fs::exists(cfg), "model folder '", dir, "': no config.json");
  ModelConfig c = from_hf_json(json::parse_file(cfg.string()), cfg.string());
  const fs::path gen = fs::path(dir) / "generation_config.json";
  if (fs::exists(gen)) {
    const json::Value g = json::parse_file(gen.string());
    if (g.is_object() && g.contains("eos_token_id")) {
      for (int64_t id : int_or_list(g["eos_token_id"]))
        if (std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), id) == c.eos_token_ids.end())
          c.eos_token_ids.push_back(id);
    }
  }
  return c;
}

ModelConfig ModelConfig::from_gguf(const GgufFile& f) {
  ModelConfig c;
  c.architecture = f.get_string("general.architecture");
  const detail::Architecture& arch =
      detail::architecture_or_throw(c.architecture, "GGUF file '" + f.path() + "': ");
  const std::string p = c.architecture + ".";
  c.hidden_size = f.get_int(p + "embedding_length");
  c.num_layers = f.get_int(p + "block_count");
  c.num_heads = f.get_int(p + "attention.head_count");
  c.num_kv_heads = f.get_int_or(p + "attention.head_count_kv", c.num_heads);
  c.intermediate_size = f.get_int_or(
      p + "feed_forward_length", c.hidden_size <= ModelConfig::kMaxHidden ? 4 * c.hidden_size : 0);
  c.max_position_embeddings = f.get_int_or(p + "context_length", 2048);
  c.head_dim = f.get_int_or(p + "attention.key_length", default_head_dim(c.hidden_size, c.num_heads));
  if (f.has(p + "vocab_size")) {
    c.vocab_size = f.get_int(p + "vocab_size");
  } else if (f.has("tokenizer.ggml.tokens")) {
    c.vocab_size = static_cast<int64_t>(f.value("tokenizer.ggml.tokens").elems.size());
  } else {
    c.vocab_size = f.tensor_info("token_embd.weight").shape[0];
  }
  arch.config_from_gguf(f, c);
  c.bos_token_id = f.get_int_or("tokenizer.ggml.bos_token_id", -1);
  c.pad_token_id = f.get_int_or("tokenizer.ggml.padding_token_id", -1);
  if (f.has("tokenizer.ggml.eos_token_id")) c.eos_token_ids.push_back(f.get_int("tokenizer.ggml.eos_token_id"));
  if (f.has("tokenizer.ggml.eot_token_id")) {
    const int64_t eot = f.get_int("tokenizer.ggml.eot_token_id");
    if (std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), eot) == c.eos_token_ids.end())
      c.eos_token_ids.push_back(eot);
  }
  try {
    c.validate();
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "GGUF file '", f.path(), "': ", e.msg());
  }
  check_gguf_tensor_shapes(f, c, arch);
  return c;
}

void ModelConfig::validate() const {
  // Sizes: positive and at most a cap far above any released model (the largest have hidden
  // 16384-18432, 126 layers, 128 heads, head_dim 256, FFN 53248-73728, vocab 256000), so a
  // forged value is refused before anything is allocated from it.
  auto size = [](const char* name, int64_t v, int64_t cap) {
    TORCH_CHECK(v > 0 && v <= cap, "config: ", name, " must be in [1, ", cap, "], got ", v);
  };
  size("vocab_size", vocab_size, kMaxVocab);
  size("hidden_size", hidden_size, kMaxHidden);
  size("num_layers", num_layers, kMaxLayers);
  size("num_heads", num_heads, kMaxHeads);
  size("num_kv_heads", num_kv_heads, kMaxHeads);
  size("head_dim", head_dim, kMaxHeadDim);
  size("intermediate_size", intermediate_size, kMaxIntermediate);
  size("max_position_embeddings", max_position_embeddings, kMaxPositions);
  // The callers (from_hf_json, from_gguf, make_causal_lm) refuse unknown names; here an unknown
  // one is checked as a RoPE model without extra checks.
  const detail::Architecture* arch = detail::find_architecture(architecture);
  TORCH_CHECK(num_heads % num_kv_heads == 0, "config: num_heads ", num_heads,
              " must be a multiple of num_kv_heads ", num_kv_heads);
  TORCH_CHECK(head_dim % 2 == 0, "config: head_dim must be even for RoPE, got ", head_dim);
  if (arch != nullptr && arch->validate != nullptr) arch->validate(*this);
  auto positive_finite = [](const char* name, double v) {
    TORCH_CHECK(std::isfinite(v) && v > 0, "config: ", name, " must be a finite number > 0, got ",
                v);
  };
  TORCH_CHECK(std::isfinite(norm_eps) && norm_eps > 0 && norm_eps < 1,
              "config: norm epsilon must be a finite number in (0, 1), got ", norm_eps);
  if (arch == nullptr || arch->rope) {
    positive_finite("rope_theta", rope_theta);
    const RopeScaling& r = rope_scaling;
    if (r.type != "default") positive_finite("rope_scaling.factor", r.factor);
    if (r.type == "llama3") {
      positive_finite("rope_scaling.low_freq_factor", r.low_freq_factor);
      positive_finite("rope_scaling.high_freq_factor", r.high_freq_factor);
      TORCH_CHECK(r.high_freq_factor > r.low_freq_factor, "config: rope_scaling.high_freq_factor ",
                  r.high_freq_factor, " must exceed low_freq_factor ", r.low_freq_factor);
      size("rope_scaling.original_max_position_embeddings", r.original_max_position_embeddings,
           kMaxPositions);
    }
  }
  if (!rope_freq_factors.empty()) {
    TORCH_CHECK(static_cast<int64_t>(rope_freq_factors.size()) == head_dim / 2,
                "config: rope_freqs has ", rope_freq_factors.size(), " entries, expected head_dim/2 = ",
                head_dim / 2);
    for (size_t i = 0; i < rope_freq_factors.size(); ++i)
      TORCH_CHECK(std::isfinite(rope_freq_factors[i]) && rope_freq_factors[i] > 0,
                  "config: rope_freqs[", i, "] must be a finite number > 0, got ",
                  rope_freq_factors[i]);
  }
  auto token = [&](const char* name, int64_t id) {
    TORCH_CHECK(id >= -1 && id < vocab_size, "config: ", name, " must be -1 (none) or in [0, ",
                vocab_size, "), got ", id);
  };
  token("bos_token_id", bos_token_id);
  token("pad_token_id", pad_token_id);
  for (int64_t id : eos_token_ids) token("eos_token_id", id);
}

std::string ModelConfig::summary() const {
  std::ostringstream s;
  s << architecture << ": " << num_layers << " layers, hidden " << hidden_size << ", heads "
    << num_heads << "/" << num_kv_heads << " x " << head_dim << ", ffn " << intermediate_size
    << ", vocab " << vocab_size;
  const detail::Architecture* arch = detail::find_architecture(architecture);
  if (arch == nullptr || arch->rope) {
    s << ", rope theta " << rope_theta;
    if (rope_scaling.type != "default") s << " (" << rope_scaling.type << " x" << rope_scaling.factor << ")";
    if (!rope_freq_factors.empty()) s << " (rope_freqs)";
  }
  s << ", eps " << norm_eps << (tie_word_embeddings ? ", tied" : ", untied") << " embeddings";
  if (qkv_bias) s << ", qkv bias";
  return s.str();
}

}  // namespace slowed_examples

// Building a model for a config and filling it from an HF safetensors checkpoint or a GGUF file;
// the architecture's record (model_internal.h) supplies the constructor, GGUF names and fix-ups.

#include "common/gguf.h"
#include "common/model_internal.h"
#include "common/safetensors.h"

#include <c10/util/Exception.h>

#include <filesystem>
#include <functional>

namespace slowed_examples {

std::shared_ptr<CausalLM> make_causal_lm(const ModelConfig& config) {
  config.validate();
  return detail::architecture_or_throw(config.architecture, "make_causal_lm: ").make(config);
}

namespace detail {

std::string gguf_name_for(const std::string& architecture, const std::string& hf_name) {
  const Architecture* a = find_architecture(architecture);
  return a == nullptr ? std::string() : a->gguf_tensor_name(hf_name);
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
  const detail::Architecture& arch = *detail::find_architecture(c.architecture);  // from_gguf checked it
  fill_parameters(*out.model, path, [&](const std::string& name) {
    const std::string g = arch.gguf_tensor_name(name);
    TORCH_CHECK(!g.empty(), "GGUF file '", path, "': no GGUF tensor name for parameter '", name, "'");
    TORCH_CHECK(f.has_tensor(g), "GGUF file '", path, "': tensor '", g, "' (for '", name,
                "') not found");
    torch::Tensor t = f.tensor(g);
    // llama.cpp's layout changes (the llama Q/K permutation, BLOOM's fused QKV), undone.
    return arch.gguf_fix_up != nullptr ? arch.gguf_fix_up(g, std::move(t), c) : t;
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

#include "lm.h"

#include "causal_lm_student.h"

#include "common/chat_template.h"
#include "common/generate.h"
#include "common/gguf.h"
#include "common/model.h"
#include "common/tokenizer.h"

#include <c10/util/Exception.h>

#include <algorithm>

namespace slowed_distill {
namespace {

namespace ex = slowed_examples;

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::vector<int64_t> widen(const std::vector<int32_t>& v) { return {v.begin(), v.end()}; }

// A fixed date for Llama 3.x templates, so that prompts (and results) do not depend on the day.
ex::ChatTemplateOptions generation_prompt(bool add) {
  return ex::ChatTemplateOptions().with_add_generation_prompt(add).with_date_string("26 Jul 2024");
}

class StudentLM final : public CausalLMStudent {
 public:
  StudentLM(std::shared_ptr<ex::CausalLM> model, ex::Tokenizer tok, torch::Device device)
      : CausalLMStudent(std::move(model)), tok_(std::move(tok)), device_(device),
        chat_(ex::ChatTemplate::from_tokenizer(tok_, /*plain_if_missing=*/true)) {
    for (int32_t id : tok_.stop_ids()) stop_.push_back(id);
    TORCH_CHECK(!stop_.empty(), "model: the tokenizer of ", tok_.source(), " defines no end-of-turn token");
    pad_ = tok_.pad_id() ? *tok_.pad_id() : stop_.front();
  }

  torch::Device device() const override { return device_; }
  int64_t pad_id() const override { return pad_; }

  TrainSequence encode_example(const std::string& prompt, const std::string& response,
                               int64_t max_len) const override {
    const std::string head = chat_.apply({{"user", prompt}}, generation_prompt(true));
    const std::string full =
        chat_.apply({{"user", prompt}, {"assistant", response}}, generation_prompt(false));
    TORCH_CHECK(full.compare(0, head.size(), head) == 0,
                "chat template: the conversation does not start with its generation prompt");
    // Tokenized in two parts so that the boundary is exact; the template's own special
    // tokens are in the text, so no extra BOS/EOS is added here.
    TrainSequence s;
    s.ids = widen(tok_.encode(head, /*add_special_tokens=*/false));
    s.prompt_len = static_cast<int64_t>(s.ids.size());
    const auto rest = tok_.encode(full.substr(head.size()), false);
    s.ids.insert(s.ids.end(), rest.begin(), rest.end());
    // Too long: keep the prompt and cut the response's tail; a prompt that leaves fewer than
    // 16 response tokens is not trainable and comes back empty (the caller counts it).
    if (s.prompt_len + 16 > max_len) return TrainSequence{};
    if (static_cast<int64_t>(s.ids.size()) > max_len) s.ids.resize(static_cast<size_t>(max_len));
    return s;
  }

  std::vector<std::string> generate(const std::vector<std::string>& prompts, int64_t max_new_tokens,
                                    int64_t batch_size) override {
    std::vector<std::vector<int64_t>> ids;
    for (const auto& p : prompts)
      ids.push_back(widen(tok_.encode(chat_.apply({{"user", p}}, generation_prompt(true)), false)));
    // Batches of similar lengths waste less on left padding; results return in input order.
    std::vector<size_t> order(ids.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return ids[a].size() < ids[b].size(); });
    std::vector<std::string> out(prompts.size());
    ex::GenerateOptions o;
    o.max_new_tokens = max_new_tokens;
    o.stop_tokens = stop_;
    o.pad_token_id = pad_;
    for (size_t b = 0; b < order.size(); b += static_cast<size_t>(batch_size)) {
      const size_t e = std::min(order.size(), b + static_cast<size_t>(batch_size));
      std::vector<std::vector<int64_t>> batch;
      for (size_t k = b; k < e; ++k) batch.push_back(ids[order[k]]);
      const auto gen = ex::generate_greedy(*model_, batch, o);
      for (size_t k = b; k < e; ++k) {
        std::vector<int32_t> g(gen[k - b].begin(), gen[k - b].end());
        out[order[k]] = tok_.decode(g, /*skip_special_tokens=*/true);
      }
    }
    return out;
  }

  void save(torch::serialize::OutputArchive& archive) const override { model_->save(archive); }
  void load(torch::serialize::InputArchive& archive) override {
    model_->load(archive);
    model_->to(device_);
  }
 private:
  ex::Tokenizer tok_;
  torch::Device device_;
  ex::ChatTemplate chat_;
  std::vector<int64_t> stop_;
  int64_t pad_ = 0;
};

}  // namespace

std::unique_ptr<LanguageModel> load_language_model(const std::string& path, torch::Device device,
                                                   bool smoke, uint64_t seed) {
  const bool gguf = ends_with(path, ".gguf");
  ex::Tokenizer tok = gguf ? ex::Tokenizer::from_gguf(path) : ex::Tokenizer::from_directory(path);
  std::shared_ptr<ex::CausalLM> model;
  if (smoke) {
    // The real tokenizer and vocabulary with a tiny random network: exercises every code path
    // in seconds (tests), learns nothing meaningful.
    ex::ModelConfig c = gguf ? ex::ModelConfig::from_gguf(ex::GgufFile::open(path))
                             : ex::ModelConfig::from_hf_folder(path);
    c.num_layers = 2;
    c.hidden_size = 64;
    c.num_heads = 4;
    c.num_kv_heads = 2;
    c.head_dim = 16;
    c.intermediate_size = 128;
    c.rope_freq_factors.clear();
    torch::manual_seed(seed);
    model = ex::make_causal_lm(c);
    // HF's initializer range: N(0, 0.02) matrices, so that the random model starts uncertain
    // (entropy near log V) as a real pretrained model's hard tokens are.
    torch::NoGradGuard no_grad;
    for (auto& p : model->parameters())
      if (p.dim() >= 2) p.normal_(0.0, 0.02);
  } else {
    model = ex::load_model(path, torch::kFloat32, torch::kCPU).model;
  }
  model->to(device);
  return std::make_unique<StudentLM>(std::move(model), std::move(tok), device);
}

}  // namespace slowed_distill

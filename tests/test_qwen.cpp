// Qwen2.5-Coder-0.5B-Instruct (the reproduction's default student, a Q4_K_M GGUF with Q5_0 / Q8_0 /
// Q6_K / Q4_K / F32 tensors, q/k/v biases and an untied Q8_0 head) against transformers: its GGUF
// loader's logits, greedy generations on AdvBench goals in the chat template with the default
// system message, and `tokenizers`' ids on the data texts. References: fixture "qwen"
// (tests/fixtures/make_qwen_fixtures.py, cached under ~/.cache/slowed/fixtures/qwen).
// Skipped, with a warning, when the GGUF is absent (scripts/setup fetches it).
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include "common/chat_template.h"
#include "common/generate.h"
#include "common/json.h"
#include "common/model.h"
#include "common/safetensors.h"
#include "common/tokenizer.h"
#include "support/common.h"
#include "support/files.h"

#include <algorithm>
#include <fstream>

using namespace slowed_examples;

namespace {

const std::string kDir = std::string(SLOWED_TEST_FIXTURE_DIR) + "/qwen";
const std::string kGguf = std::string(SLOWED_TEST_MODELS_DIR) + "/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf";

// Reads manifest.json; false (with a warning that says why) when the comparison cannot run.
bool reference_available(json::Value& man) {
  std::ifstream f(kDir + "/manifest.json");
  if (!f.good()) {
    WARN("Qwen fixture missing in " << kDir << " (ctest runs fixture.qwen first) -- comparison did NOT run");
    return false;
  }
  man = json::parse_file(kDir + "/manifest.json");
  if (man["status"].as_string() != "ok") {
    WARN("Qwen2.5-Coder-0.5B-Instruct not available: " << man.get_string("message", man["status"].as_string())
                                                        << " -- comparison did NOT run");
    return false;
  }
  return true;
}

std::vector<int64_t> row(const torch::Tensor& t) {
  auto c = t.to(torch::kLong).contiguous();
  return {c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel()};
}

// The model is loaded once for the test cases below (dequantizing 491 MB takes seconds).
LoadedModel& qwen() {
  static LoadedModel lm = [] {
    at::set_num_threads(std::max(1, std::min(2, at::get_num_threads())));
    return load_model(kGguf);
  }();
  return lm;
}

}  // namespace

TEST_CASE("Qwen2.5-Coder-0.5B GGUF: config and tensor layout", "[cpu]") {
  json::Value man;
  if (!reference_available(man)) return;
  const ModelConfig& c = qwen().config;
  CHECK(c.architecture == "qwen2");
  CHECK(c.num_layers == 24);
  CHECK(c.hidden_size == 896);
  CHECK(c.num_heads == 14);
  CHECK(c.num_kv_heads == 2);
  CHECK(c.intermediate_size == 4864);
  CHECK(c.vocab_size == 151936);
  CHECK(c.rope_theta == Approx(1e6));
  CHECK_FALSE(c.tie_word_embeddings);
  CHECK(c.qkv_bias);
  CHECK_FALSE(c.o_bias);
  std::set<std::string> names;
  for (const auto& p : qwen().model->named_parameters()) names.insert(p.key());
  CHECK(names.count("lm_head.weight") == 1);
  CHECK(names.count("model.layers.0.self_attn.q_proj.bias") == 1);
  CHECK(names.count("model.layers.0.self_attn.o_proj.bias") == 0);
  CHECK(names.size() == 3 + 24 * 12);  // embed, norm, head; per layer 4+3 weights, 3 biases, 2 norms
}

TEST_CASE("Qwen2.5-Coder-0.5B GGUF logits match transformers' GGUF loader", "[cpu]") {
  json::Value man;
  if (!reference_available(man)) return;
  auto ref = SafetensorsFile::open(kDir + "/ref.safetensors");
  auto tok = Tokenizer::from_gguf(kGguf);
  torch::NoGradGuard ng;
  const auto& prompts = man["logit_prompts"];
  REQUIRE(prompts.size() == 3);
  for (size_t i = 0; i < prompts.size(); ++i) {
    INFO("prompt " << i << ": " << prompts[i].as_string());
    auto ids = ref.tensor("input_ids_" + std::to_string(i));
    std::vector<int32_t> ours = tok.encode(prompts[i].as_string(), /*add_special_tokens=*/false);
    CHECK(std::vector<int64_t>(ours.begin(), ours.end()) == row(ids));
    auto expected = ref.tensor("logits_" + std::to_string(i));
    auto logits = qwen().model->forward(ids);
    REQUIRE(logits.sizes() == expected.sizes());
    const double diff = max_abs_diff(logits, expected);
    const double scale = expected.abs().max().item<double>();
    INFO("max |diff| " << diff << " (logits up to " << scale << ")");
    // Both dequantize the same blocks exactly to fp32; what remains is float32 summation order
    // over 24 layers (docs/models.md). A wrong bias, rope or layout gives differences of O(1).
    CHECK(diff < 2e-3);
    CHECK(torch::equal(logits.argmax(-1), expected.argmax(-1)));
  }
}

TEST_CASE("Qwen2.5-Coder-0.5B greedy replies to AdvBench goals match transformers token for token", "[cpu]") {
  json::Value man;
  if (!reference_available(man)) return;
  if (man["data"].as_string() != "present") {
    WARN("data folder missing when the Qwen fixture was made: no AdvBench generations to compare");
    return;
  }
  auto ref = SafetensorsFile::open(kDir + "/ref.safetensors");
  auto tok = Tokenizer::from_gguf(kGguf);
  const auto chat = ChatTemplate::from_tokenizer(tok);
  REQUIRE(chat.default_system_prompt().has_value());
  CHECK(*chat.default_system_prompt() == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.");
  const auto& gens = man["gen"];
  REQUIRE(gens.size() == 5);
  std::vector<std::vector<int64_t>> prompts, expected;
  for (size_t j = 0; j < gens.size(); ++j) {
    INFO("goal " << j << ": " << gens[j]["goal"].as_string());
    const std::string text = chat.apply({{"user", gens[j]["goal"].as_string()}});
    CHECK(text == gens[j]["chat"].as_string());
    const auto ids = tok.encode(text, /*add_special_tokens=*/false);
    prompts.emplace_back(ids.begin(), ids.end());
    CHECK(prompts.back() == row(ref.tensor("gen_prompt_" + std::to_string(j))));
    expected.push_back(row(ref.tensor("gen_output_" + std::to_string(j))));
  }
  // Batched with left padding, as the reproduction evaluates; transformers ran each goal alone.
  // The smallest top-2 margin along the reference paths is in manifest.json (>= 0.03 here,
  // far above the ~1e-4 float32 differences).
  GenerateOptions o;
  o.max_new_tokens = man["gen_tokens"].as_int();
  o.pad_token_id = tok.stop_ids().front();
  const auto got = generate_greedy(*qwen().model, prompts, o);
  for (size_t j = 0; j < got.size(); ++j) {
    INFO("goal " << j << " reference reply: " << gens[j]["reply"].as_string());
    CHECK(got[j] == expected[j]);
  }
  // With the end-of-turn tokens as stops, a reply ends at the first of them: the refusals stop
  // after "<|im_end|>", the others run to the budget.
  o.stop_tokens.assign(tok.stop_ids().begin(), tok.stop_ids().end());
  const auto stopped = generate_greedy(*qwen().model, prompts, o);
  int64_t refusals = 0;
  for (size_t j = 0; j < stopped.size(); ++j) {
    auto want = expected[j];
    auto it = std::find_first_of(want.begin(), want.end(), o.stop_tokens.begin(), o.stop_tokens.end());
    if (it != want.end()) want.erase(it + 1, want.end());
    CHECK(stopped[j] == want);
    const std::vector<int32_t> ids(stopped[j].begin(), stopped[j].end());
    refusals += tok.decode(ids, /*skip_special_tokens=*/true).rfind("I'm sorry", 0) == 0;
  }
  CHECK(refusals == 3);  // goals 0-2 refused, 3-4 answered (manifest.json "reply")
}

TEST_CASE("Qwen2.5-Coder-0.5B GGUF tokenizer equals tokenizers' on the data texts", "[cpu]") {
  json::Value man;
  if (!reference_available(man)) return;
  auto tok = Tokenizer::from_gguf(kGguf);
  CHECK(tok.vocab_size() == 151936);  // entries of tokenizer.ggml.tokens
  CHECK(tok.token_to_id("<|im_end|>").has_value());
  CHECK(std::find(tok.stop_ids().begin(), tok.stop_ids().end(), *tok.token_to_id("<|im_end|>")) !=
        tok.stop_ids().end());
  if (man["data"].as_string() != "present") {
    WARN("data folder missing when the Qwen fixture was made: no data texts to compare");
    return;
  }
  const auto texts = read_lines(kDir + "/texts.data.txt");
  const auto ids = read_ids(kDir + "/qwen.data.ids");
  REQUIRE(texts.size() == ids.size());
  REQUIRE(static_cast<int64_t>(texts.size()) == man["data_texts"].as_int());
  int64_t bad = 0, tokens = 0;
  for (size_t i = 0; i < texts.size(); ++i) {
    const auto ours = tok.encode(unescape(texts[i]), /*add_special_tokens=*/true);
    const auto& want = ids[i];
    tokens += static_cast<int64_t>(ours.size());
    if (ours != want && ++bad <= 3)
      UNSCOPED_INFO("text " << i << " differs: '" << texts[i].substr(0, 160) << "'");
  }
  INFO(texts.size() << " texts, " << tokens << " tokens");
  CHECK(bad == 0);
  CHECK(tokens == man["data_tokens"].as_int());
}

// Tests of the example-side model library: JSON, GGUF, safetensors readers, models, generation.
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include "common/gguf.h"
#include "common/json.h"

#include <fstream>

using namespace slowed_examples;

namespace {
std::string smollm2_path() {
  return std::string(SLOWED_TEST_MODELS_DIR) + "/SmolLM2-135M-Instruct.Q4_1.gguf";
}
bool file_exists(const std::string& p) { return std::ifstream(p).good(); }
}  // namespace

TEST_CASE("json parses objects, arrays, escapes and numbers", "[cpu]") {
  auto v = json::parse(R"({"a": [1, 2.5, -3e2, true, false, null], "s": "x\u00e9\ud83d\ude00\n",
                          "big": 12345678901234, "o": {"k": "v"}})");
  REQUIRE(v.is_object());
  REQUIRE(v["a"].size() == 6);
  CHECK(v["a"][0].as_int() == 1);
  CHECK(v["a"][1].as_double() == 2.5);
  CHECK(v["a"][2].as_double() == -300.0);
  CHECK(v["a"][3].as_bool());
  CHECK(v["a"][5].is_null());
  CHECK(v["s"].as_string() == "x\xc3\xa9\xf0\x9f\x98\x80\n");
  CHECK(v["big"].as_int() == 12345678901234LL);
  CHECK(v["o"]["k"].as_string() == "v");
  CHECK(v.items()[0].first == "a");
  CHECK_THROWS_WITH(json::parse("{\"a\": [1, 2,]}", "t.json"),
                    Catch::Contains("t.json") && Catch::Contains("byte offset 12"));
  CHECK_THROWS_WITH(v["missing"], Catch::Contains("'missing'"));
  CHECK_THROWS_WITH(v["a"][1].as_int(), Catch::Contains("integer"));
}

TEST_CASE("gguf reads SmolLM2 metadata and tensors", "[cpu]") {
  if (!file_exists(smollm2_path())) {
    WARN("SmolLM2 GGUF missing at " << smollm2_path() << "; run scripts/setup");
    return;
  }
  auto f = GgufFile::open(smollm2_path());
  CHECK(f.version() == 3);
  CHECK(f.get_string("general.architecture") == "llama");
  CHECK(f.get_int("llama.block_count") == 30);
  CHECK(f.get_float("llama.rope.freq_base") == 100000.0);
  CHECK(f.get_bool("tokenizer.ggml.add_bos_token") == false);
  CHECK(f.get_string_array("tokenizer.ggml.tokens").size() == 49152);
  CHECK(f.get_int_array("tokenizer.ggml.token_type").size() == 49152);
  CHECK(f.tensor_names().size() == 272);
  auto norm = f.tensor("blk.0.attn_norm.weight");
  CHECK(norm.sizes() == torch::IntArrayRef({576}));
  CHECK(norm.sum().item<double>() == Approx(0.61294365).epsilon(1e-5));
  auto emb = f.tensor("token_embd.weight");
  CHECK(emb.sizes() == torch::IntArrayRef({49152, 576}));
  CHECK_THROWS_WITH(f.get_int("general.name"), Catch::Contains("general.name") &&
                                                   Catch::Contains("expected an integer"));
  CHECK_THROWS_WITH(f.tensor("nope"), Catch::Contains("'nope'") && Catch::Contains("Q4_1.gguf"));
}

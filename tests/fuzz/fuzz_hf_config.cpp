// libFuzzer target: an HF config.json (any bytes) through json::parse and
// ModelConfig::from_hf_json, which validates every value before use.

#include "common/json.h"
#include "common/model.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace slowed_examples;
  const std::string text(reinterpret_cast<const char*>(data), size);
  slowed_fuzz::expect_ok_or_error([&] {
    const ModelConfig c = ModelConfig::from_hf_json(json::parse(text, "<fuzz config.json>"),
                                                    "<fuzz config.json>");
    // An accepted config passed validate(): the sizes a model allocates from are capped.
    if (c.hidden_size <= 0 || c.hidden_size > ModelConfig::kMaxHidden || c.num_heads <= 0 ||
        c.vocab_size <= 0 || c.vocab_size > ModelConfig::kMaxVocab)
      __builtin_trap();
    (void)c.summary();
  });
  return 0;
}

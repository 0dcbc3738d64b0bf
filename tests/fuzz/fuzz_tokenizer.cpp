// libFuzzer target: Tokenizer::from_tokenizer_json_string on any bytes; an accepted tokenizer
// then encodes and decodes a fixed text, and decodes ids around its vocabulary's edges.

#include "common/tokenizer.h"
#include "fuzz_common.h"

#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace slowed_examples;
  using slowed_fuzz::expect_ok_or_error;
  const std::string text(reinterpret_cast<const char*>(data), size);
  expect_ok_or_error([&] {
    const Tokenizer tok = Tokenizer::from_tokenizer_json_string(text, "<fuzz tokenizer.json>");
    const int64_t n = tok.vocab_size();
    expect_ok_or_error([&] {
      const auto ids = tok.encode("Hello, world!  It's 2026: héllo wörld <|endoftext|>\n\tok", true);
      for (int32_t id : ids)
        if (id < 0 || id >= n) __builtin_trap();
      (void)tok.decode(ids, false);
      (void)tok.decode(ids, true);
    });
    for (int64_t id : {int64_t(0), n - 1, n, int64_t(-1)}) {
      (void)tok.token_bytes(static_cast<int32_t>(id));
      expect_ok_or_error([&] { (void)tok.id_to_token(static_cast<int32_t>(id)); });
    }
    (void)tok.describe();
  });
  return 0;
}

// libFuzzer target: GgufFile::open on any bytes, then what a loader does with an opened file:
// every metadata value read as each type, every tensor dequantized, the model config
// (ModelConfig::from_gguf, with its validation) and the tokenizer (Tokenizer::from_gguf).

#include "common/gguf.h"
#include "common/model.h"
#include "common/tokenizer.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace slowed_examples;
  using slowed_fuzz::expect_ok_or_error;
  static const std::string path = slowed_fuzz::scratch_path("x.gguf");
  slowed_fuzz::write_file(path, data, size);
  expect_ok_or_error([&] {
    const GgufFile f = GgufFile::open(path);
    for (const auto& key : f.keys()) {
      expect_ok_or_error([&] { (void)f.get_int(key); });
      expect_ok_or_error([&] { (void)f.get_float(key); });
      expect_ok_or_error([&] { (void)f.get_bool(key); });
      expect_ok_or_error([&] { (void)f.get_string(key); });
      expect_ok_or_error([&] { (void)f.get_int_array(key); });
      expect_ok_or_error([&] { (void)f.get_float_array(key); });
      expect_ok_or_error([&] { (void)f.get_string_array(key); });
    }
    for (const auto& name : f.tensor_names()) {
      const auto& info = f.tensor_info(name);
      // Accepted tensors lie inside the file.
      if (f.data_offset() + info.offset + info.nbytes > size) __builtin_trap();
      expect_ok_or_error([&] {
        const torch::Tensor t = f.tensor(name);
        if (t.numel() != info.numel()) __builtin_trap();
      });
      expect_ok_or_error([&] { (void)f.raw_bytes(name); });
    }
    expect_ok_or_error([&] { (void)ModelConfig::from_gguf(f); });
    expect_ok_or_error([&] {
      const Tokenizer tok = Tokenizer::from_gguf(f);
      const auto ids = tok.encode("Hello, world! 123 héllo", true);
      (void)tok.decode(ids, false);
    });
  });
  return 0;
}

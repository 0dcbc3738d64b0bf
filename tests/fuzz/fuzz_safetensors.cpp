// libFuzzer target: SafetensorsFile::open on any bytes, then every tensor read back.

#include "common/safetensors.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace slowed_examples;
  static const std::string path = slowed_fuzz::scratch_path("x.safetensors");
  slowed_fuzz::write_file(path, data, size);
  slowed_fuzz::expect_ok_or_error([&] {
    const SafetensorsFile f = SafetensorsFile::open(path);
    for (const auto& name : f.tensor_names()) {
      const auto& info = f.tensor_info(name);
      const torch::Tensor t = f.tensor(name);
      // What was accepted is what the header promised: bytes of dtype x shape, in range.
      if (static_cast<uint64_t>(t.numel() * t.element_size()) != info.end - info.begin ||
          info.end > size)
        __builtin_trap();
    }
    (void)f.metadata();
  });
  return 0;
}

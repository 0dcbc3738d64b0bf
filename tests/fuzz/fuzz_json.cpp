// libFuzzer target: json::parse on any bytes. Accepted text must dump to JSON that parses
// again to the same dump (the reader and writer agree).

#include "common/json.h"
#include "fuzz_common.h"

#include <string>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace slowed_examples;
  const std::string text(reinterpret_cast<const char*>(data), size);
  slowed_fuzz::expect_ok_or_error([&] {
    const json::Value v = json::parse(text, "<fuzz>");
    const std::string once = v.dump();
    // The dump is JSON: a c10::Error from parsing it again is a finding too.
    std::string twice;
    try {
      twice = json::parse(once, "<fuzz dump>").dump();
    } catch (const c10::Error&) {
      __builtin_trap();
    }
    if (once != twice) __builtin_trap();
  });
  return 0;
}

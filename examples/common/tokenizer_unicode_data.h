#pragma once

// Unicode tables for the NFC/NFD normalizers of the tokenizer (generated into
// tokenizer_unicode_data.cpp by tokenizer_unicode_data.py; see that script for the layout).

#include <cstddef>
#include <cstdint>

namespace slowed_examples {
namespace detail {

struct CombiningClassEntry {
  uint32_t code_point;
  uint32_t combining_class;
};
struct DecompositionEntry {
  uint32_t code_point;
  uint32_t first;
  uint32_t second;  // 0 for a singleton decomposition
};
struct CompositionEntry {
  uint32_t first;
  uint32_t second;
  uint32_t composite;
};

extern const char* const kUnicodeDataVersion;
/// Text made only of code points below this is unchanged by NFC (resp. NFD).
extern const uint32_t kFirstNotNfcStable;
extern const uint32_t kFirstNotNfdStable;
extern const CombiningClassEntry kCombiningClass[];  // sorted by code_point
extern const size_t kCombiningClassSize;
extern const DecompositionEntry kDecomposition[];  // sorted by code_point
extern const size_t kDecompositionSize;
extern const CompositionEntry kComposition[];  // sorted by (first, second)
extern const size_t kCompositionSize;

}  // namespace detail
}  // namespace slowed_examples

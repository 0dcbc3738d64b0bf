// UTF-8, the GPT-2 byte alphabet and Unicode normalization (NFC / NFD) for the tokenizer.

#include "common/tokenizer_internal.h"
#include "common/tokenizer_unicode_data.h"

#include <algorithm>

namespace slowed_examples {
namespace detail {

const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet a;
  return a;
}

namespace {

// Code points of valid UTF-8.
std::vector<uint32_t> utf8_code_points(std::string_view s) {
  std::vector<uint32_t> cps;
  cps.reserve(s.size());
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  for (size_t i = 0; i < s.size();) {
    size_t len = utf8_len_from_lead(p[i]);
    cps.push_back(utf8_decode(p + i, len));
    i += len;
  }
  return cps;
}

// ---------------------------------------------------------------------------------------------
// Unicode normalization (NFC / NFD)
// ---------------------------------------------------------------------------------------------
constexpr uint32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr uint32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount,
                   kSCount = kLCount * kNCount;

uint32_t combining_class(uint32_t cp) {
  if (cp < 0x300) return 0;
  const auto* b = kCombiningClass;
  const auto* e = kCombiningClass + kCombiningClassSize;
  const auto* it = std::lower_bound(b, e, cp, [](const CombiningClassEntry& x, uint32_t v) {
    return x.code_point < v;
  });
  return it != e && it->code_point == cp ? it->combining_class : 0;
}

void decompose(uint32_t cp, std::vector<uint32_t>& out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    uint32_t s = cp - kSBase;
    out.push_back(kLBase + s / kNCount);
    out.push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount) out.push_back(kTBase + s % kTCount);
    return;
  }
  if (cp >= 0xC0) {
    const auto* b = kDecomposition;
    const auto* e = kDecomposition + kDecompositionSize;
    const auto* it = std::lower_bound(b, e, cp, [](const DecompositionEntry& x, uint32_t v) {
      return x.code_point < v;
    });
    if (it != e && it->code_point == cp) {
      decompose(it->first, out);
      if (it->second) decompose(it->second, out);
      return;
    }
  }
  out.push_back(cp);
}

// Primary composite of (a, b) or 0.
uint32_t compose_pair(uint32_t a, uint32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase &&
      b < kTBase + kTCount)
    return a + (b - kTBase);
  const auto* bgn = kComposition;
  const auto* end = kComposition + kCompositionSize;
  const auto* it = std::lower_bound(bgn, end, std::make_pair(a, b),
                                    [](const CompositionEntry& x, const std::pair<uint32_t, uint32_t>& v) {
                                      return x.first != v.first ? x.first < v.first : x.second < v.second;
                                    });
  return it != end && it->first == a && it->second == b ? it->composite : 0;
}

}  // namespace

std::string unicode_normalize(std::string_view text, const std::string& form) {
  TORCH_CHECK(form == "NFC" || form == "NFD", "unicode_normalize: unsupported form '", form,
              "' (expected NFC or NFD)");
  const bool nfc = form == "NFC";
  const uint32_t threshold = nfc ? kFirstNotNfcStable : kFirstNotNfdStable;
  // Fast path: nothing at or above the first code point that can change.
  const auto* p = reinterpret_cast<const unsigned char*>(text.data());
  bool stable = true;
  for (size_t i = 0; i < text.size();) {
    if (p[i] < 0x80) { ++i; continue; }
    size_t len = utf8_len_from_lead(p[i]);
    if (utf8_decode(p + i, len) >= threshold) { stable = false; break; }
    i += len;
  }
  if (stable) return std::string(text);

  // 1. Full canonical decomposition.
  std::vector<uint32_t> d;
  d.reserve(text.size() + 8);
  for (uint32_t cp : utf8_code_points(text)) decompose(cp, d);
  // 2. Canonical ordering: stable sort of each run of non-starters by combining class.
  std::vector<uint32_t> cls(d.size());
  for (size_t i = 0; i < d.size(); ++i) cls[i] = combining_class(d[i]);
  for (size_t i = 0; i < d.size();) {
    if (cls[i] == 0) { ++i; continue; }
    size_t j = i;
    while (j < d.size() && cls[j] != 0) ++j;
    for (size_t a = i + 1; a < j; ++a) {  // insertion sort keeps equal classes in order
      for (size_t b = a; b > i && cls[b - 1] > cls[b]; --b) {
        std::swap(cls[b - 1], cls[b]);
        std::swap(d[b - 1], d[b]);
      }
    }
    i = j;
  }
  std::string out;
  out.reserve(text.size());
  if (!nfc) {
    for (uint32_t cp : d) utf8_append(out, cp);
    return out;
  }
  // 3. Canonical composition (UAX #15): a character combines with the last starter unless a
  // character in between has a combining class >= its own (or is a starter).
  std::vector<uint32_t> r;
  r.reserve(d.size());
  size_t starter_pos = 0;
  uint32_t last_class = 256;  // nothing composes with a leading non-starter
  bool have_starter = false;
  for (size_t i = 0; i < d.size(); ++i) {
    uint32_t ch = d[i], ch_class = cls[i];
    if (have_starter && (last_class < ch_class || last_class == 0)) {
      uint32_t c = compose_pair(r[starter_pos], ch);
      if (c) {
        r[starter_pos] = c;
        continue;
      }
    }
    if (ch_class == 0) {
      starter_pos = r.size();
      have_starter = true;
    }
    last_class = ch_class;
    r.push_back(ch);
  }
  for (uint32_t cp : r) utf8_append(out, cp);
  return out;
}

}  // namespace detail
}  // namespace slowed_examples

// Byte-level BPE tokenizer: tokenizer.json / GGUF loading, added-token splitting, NFC/NFD,
// PCRE2 pre-tokenization, BPE merges with a per-piece cache, post-processing and decoding.
// See tokenizer.h for the contract; comments here explain the steps that mirror `tokenizers`.

#include "common/tokenizer.h"

#include "common/gguf.h"
#include "common/json.h"
#include "common/tokenizer_unicode_data.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <mutex>
#include <queue>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

namespace slowed_examples {
namespace detail {

namespace {

std::atomic<size_t> g_bpe_heap_threshold{64};

// ---------------------------------------------------------------------------------------------
// UTF-8
// ---------------------------------------------------------------------------------------------

// Length of the valid UTF-8 sequence starting at s[i], or 0 when it is invalid. Follows the
// well-formed byte sequences of Unicode 3.9 table 3-7 (no overlongs, no surrogates, <= U+10FFFF).
inline size_t utf8_valid_len(const unsigned char* s, size_t n, size_t i) {
  unsigned char c = s[i];
  if (c < 0x80) return 1;
  auto cont = [&](size_t k, unsigned char lo, unsigned char hi) {
    return i + k < n && s[i + k] >= lo && s[i + k] <= hi;
  };
  if (c >= 0xC2 && c <= 0xDF) return cont(1, 0x80, 0xBF) ? 2 : 0;
  if (c == 0xE0) return cont(1, 0xA0, 0xBF) && cont(2, 0x80, 0xBF) ? 3 : 0;
  if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF)
    return cont(1, 0x80, 0xBF) && cont(2, 0x80, 0xBF) ? 3 : 0;
  if (c == 0xED) return cont(1, 0x80, 0x9F) && cont(2, 0x80, 0xBF) ? 3 : 0;
  if (c == 0xF0) return cont(1, 0x90, 0xBF) && cont(2, 0x80, 0xBF) && cont(3, 0x80, 0xBF) ? 4 : 0;
  if (c >= 0xF1 && c <= 0xF3)
    return cont(1, 0x80, 0xBF) && cont(2, 0x80, 0xBF) && cont(3, 0x80, 0xBF) ? 4 : 0;
  if (c == 0xF4) return cont(1, 0x80, 0x8F) && cont(2, 0x80, 0xBF) && cont(3, 0x80, 0xBF) ? 4 : 0;
  return 0;
}

// Length of the maximal subpart of an ill-formed sequence at s[i] (>= 1): the longest prefix of
// a well-formed sequence, which from_utf8_lossy replaces by one U+FFFD.
inline size_t utf8_invalid_len(const unsigned char* s, size_t n, size_t i) {
  unsigned char c = s[i];
  unsigned char lo = 0x80, hi = 0xBF;
  size_t need;
  if (c >= 0xC2 && c <= 0xDF) need = 1;
  else if (c == 0xE0) { need = 2; lo = 0xA0; }
  else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) need = 2;
  else if (c == 0xED) { need = 2; hi = 0x9F; }
  else if (c == 0xF0) { need = 3; lo = 0x90; }
  else if (c >= 0xF1 && c <= 0xF3) need = 3;
  else if (c == 0xF4) { need = 3; hi = 0x8F; }
  else return 1;
  size_t k = 1;
  if (i + k < n && s[i + k] >= lo && s[i + k] <= hi) {
    ++k;
    while (k <= need && i + k < n && s[i + k] >= 0x80 && s[i + k] <= 0xBF) ++k;
  }
  return k;
}

inline uint32_t utf8_decode(const unsigned char* s, size_t len) {
  switch (len) {
    case 1: return s[0];
    case 2: return ((s[0] & 0x1Fu) << 6) | (s[1] & 0x3Fu);
    case 3: return ((s[0] & 0x0Fu) << 12) | ((s[1] & 0x3Fu) << 6) | (s[2] & 0x3Fu);
    default:
      return ((s[0] & 0x07u) << 18) | ((s[1] & 0x3Fu) << 12) | ((s[2] & 0x3Fu) << 6) | (s[3] & 0x3Fu);
  }
}

inline size_t utf8_len_from_lead(unsigned char c) {
  return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
}

void utf8_append(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

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

// Unicode White_Space (what Rust's char::is_whitespace and Oniguruma's \s test).
inline bool is_white_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}
const char kWhiteSpaceClass[] =
    "\\x{9}-\\x{D}\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}"
    "\\x{205F}\\x{3000}";

// ---------------------------------------------------------------------------------------------
// GPT-2 byte <-> unicode alphabet
// ---------------------------------------------------------------------------------------------
struct ByteAlphabet {
  std::string byte_to_utf8[256];             // spelling of each byte
  std::unordered_map<uint32_t, uint8_t> cp_to_byte;
  ByteAlphabet() {
    // Printable bytes keep their code point; the other 68 take U+0100 + k in byte order.
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      uint32_t cp = printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++);
      utf8_append(byte_to_utf8[b], cp);
      cp_to_byte[cp] = static_cast<uint8_t>(b);
    }
  }
  // Raw bytes of a token spelled in the alphabet; false when a character is outside it.
  bool unspell(std::string_view token, std::string& out) const {
    std::string bytes;
    const auto* p = reinterpret_cast<const unsigned char*>(token.data());
    for (size_t i = 0; i < token.size();) {
      size_t len = utf8_valid_len(p, token.size(), i);
      if (len == 0) return false;
      auto it = cp_to_byte.find(utf8_decode(p + i, len));
      if (it == cp_to_byte.end()) return false;
      bytes.push_back(static_cast<char>(it->second));
      i += len;
    }
    out += bytes;
    return true;
  }
  std::string spell(std::string_view raw) const {
    std::string out;
    out.reserve(raw.size() * 2);
    for (unsigned char c : raw) out += byte_to_utf8[c];
    return out;
  }
  bool in_alphabet(std::string_view token) const {
    std::string tmp;
    return unspell(token, tmp);
  }
};

const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet a;
  return a;
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

// ---------------------------------------------------------------------------------------------
// Regex: Oniguruma pattern -> PCRE2
// ---------------------------------------------------------------------------------------------
std::string onig_to_pcre2(const std::string& pattern) {
  // Oniguruma (Ruby syntax, what `tokenizers` uses) and PCRE2 agree on the constructs these
  // tokenizers use except two: \s / \S (Oniguruma: Unicode White_Space; PCRE2 with UCP: the
  // Z categories plus \t-\r, which misses U+0085), and nested character classes such as
  // BLOOM's [^(\s|[.,!?])] (a union in Oniguruma; a literal '[' and an early end in PCRE2).
  std::string out;
  out.reserve(pattern.size() + 64);
  int depth = 0;  // character-class nesting
  for (size_t i = 0; i < pattern.size(); ++i) {
    char c = pattern[i];
    if (c == '\\') {
      TORCH_CHECK(i + 1 < pattern.size(), "regex '", pattern, "': trailing backslash");
      char e = pattern[i + 1];
      if (e == 's' || e == 'S') {
        if (depth == 0) {
          out += e == 's' ? "[" : "[^";
          out += kWhiteSpaceClass;
          out += "]";
        } else {
          TORCH_CHECK(e == 's', "regex '", pattern, "': \\S inside a character class is not supported");
          out += kWhiteSpaceClass;
        }
      } else if (e == 'h' || e == 'H') {
        TORCH_CHECK(false, "regex '", pattern, "': \\", e,
                    " (Oniguruma hex digit) is not supported; write [0-9a-fA-F]");
      } else {
        out += c;
        out += e;
        // \p{..} / \x{..}: copy the braces verbatim.
        if ((e == 'p' || e == 'P' || e == 'x') && i + 2 < pattern.size() && pattern[i + 2] == '{') {
          size_t close = pattern.find('}', i + 2);
          TORCH_CHECK(close != std::string::npos, "regex '", pattern, "': unterminated \\", e, "{");
          out.append(pattern, i + 2, close - (i + 2) + 1);
          i = close;
          continue;
        }
      }
      ++i;
      continue;
    }
    if (c == '[') {
      if (depth == 0) {
        ++depth;
        out += c;
        if (i + 1 < pattern.size() && pattern[i + 1] == '^') { out += '^'; ++i; }
        // A ']' right after '[' or '[^' is a literal.
        if (i + 1 < pattern.size() && pattern[i + 1] == ']') { out += "\\]"; ++i; }
        continue;
      }
      if (i + 1 < pattern.size() && pattern[i + 1] == ':') {  // POSIX [:alpha:]
        size_t close = pattern.find(":]", i + 2);
        TORCH_CHECK(close != std::string::npos, "regex '", pattern, "': unterminated [:");
        out.append(pattern, i, close + 2 - i);
        i = close + 1;
        continue;
      }
      TORCH_CHECK(!(i + 1 < pattern.size() && pattern[i + 1] == '^'), "regex '", pattern,
                  "': a negated nested character class is not supported");
      ++depth;  // nested class: its members join the outer class
      continue;
    }
    if (c == ']' && depth > 0) {
      --depth;
      if (depth == 0) out += c;
      continue;
    }
    if (c == '&' && depth > 0 && i + 1 < pattern.size() && pattern[i + 1] == '&') {
      TORCH_CHECK(false, "regex '", pattern, "': class intersection && is not supported");
    }
    out += c;
  }
  TORCH_CHECK(depth == 0, "regex '", pattern, "': unterminated character class");
  return out;
}

namespace {

struct MatchDataDeleter {
  void operator()(pcre2_match_data* m) const { pcre2_match_data_free(m); }
};

pcre2_match_data* thread_match_data() {
  thread_local std::unique_ptr<pcre2_match_data, MatchDataDeleter> md(pcre2_match_data_create(1, nullptr));
  return md.get();
}

class Regex {
 public:
  Regex(const std::string& onig_pattern, const std::string& where) : source_(onig_pattern) {
    pcre_ = onig_to_pcre2(onig_pattern);
    int err = 0;
    PCRE2_SIZE off = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pcre_.data()), pcre_.size(),
                          PCRE2_UTF | PCRE2_UCP, &err, &off, nullptr);
    if (!code_) {
      PCRE2_UCHAR buf[256];
      pcre2_get_error_message(err, buf, sizeof(buf));
      TORCH_CHECK(false, where, ": cannot compile regex '", onig_pattern, "' (as PCRE2 '", pcre_,
                  "'): ", reinterpret_cast<const char*>(buf), " at offset ", off);
    }
    jit_ = pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE) == 0;
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  const std::string& source() const { return source_; }

  // Calls fn(start, end) for each non-overlapping match in s, left to right; after an empty
  // match the search resumes one character later (Oniguruma's find_iter).
  template <typename Fn>
  void for_each_match(std::string_view s, Fn&& fn) const {
    pcre2_match_data* md = thread_match_data();
    const auto* subj = reinterpret_cast<PCRE2_SPTR>(s.data());
    size_t start = 0;
    while (start <= s.size()) {
      int rc = jit_ ? pcre2_jit_match(code_, subj, s.size(), start, 0, md, nullptr)
                    : PCRE2_ERROR_JIT_STACKLIMIT;
      if (rc == PCRE2_ERROR_JIT_STACKLIMIT)  // deep backtracking: the interpreter uses the heap
        rc = pcre2_match(code_, subj, s.size(), start, PCRE2_NO_UTF_CHECK, md, nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) return;
      if (rc < 0) {
        PCRE2_UCHAR buf[256];
        pcre2_get_error_message(rc, buf, sizeof(buf));
        TORCH_CHECK(false, "regex '", source_, "': match failed: ", reinterpret_cast<const char*>(buf));
      }
      PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      size_t b = ov[0], e = ov[1];
      fn(b, e);
      if (e > b) {
        start = e;
      } else {
        if (e >= s.size()) return;
        start = e + utf8_len_from_lead(static_cast<unsigned char>(s[e]));
      }
    }
  }

 private:
  std::string source_;
  std::string pcre_;
  pcre2_code* code_ = nullptr;
  bool jit_ = false;
};

// ---------------------------------------------------------------------------------------------
// Pipeline pieces
// ---------------------------------------------------------------------------------------------
const char kGpt2Pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
const char kLlama3Pattern[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const char kQwen2Pattern[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}"
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const char kBloomPattern[] = " ?[^(\\s|[.,!?\xe2\x80\xa6\xe3\x80\x82\xef\xbc\x8c\xe3\x80\x81"
                             "\xe0\xa5\xa4\xdb\x94\xd8\x8c])]+";  // ... 。，、।۔،

enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

const char* behavior_name(SplitBehavior b) {
  switch (b) {
    case SplitBehavior::Removed: return "Removed";
    case SplitBehavior::Isolated: return "Isolated";
    case SplitBehavior::MergedWithPrevious: return "MergedWithPrevious";
    case SplitBehavior::MergedWithNext: return "MergedWithNext";
    default: return "Contiguous";
  }
}

struct PreTokStep {
  enum class Kind { Split, ByteLevel } kind = Kind::Split;
  std::shared_ptr<Regex> regex;  // Split; ByteLevel with use_regex
  SplitBehavior behavior = SplitBehavior::Isolated;
  bool invert = false;
  bool add_prefix_space = false;  // ByteLevel
  std::string name;
};

using Piece = std::string_view;

// Splits each piece by the step's regex, like tokenizers' PreTokenizedString::split with
// SplitDelimiterBehavior; empty pieces are dropped.
void apply_split(const PreTokStep& st, const std::vector<Piece>& in, std::vector<Piece>& out) {
  std::vector<std::pair<std::pair<size_t, size_t>, bool>> parts;
  for (Piece p : in) {
    parts.clear();
    size_t prev = 0;
    st.regex->for_each_match(p, [&](size_t b, size_t e) {
      if (prev != b) parts.push_back({{prev, b}, false});
      parts.push_back({{b, e}, true});
      prev = e;
    });
    if (prev != p.size()) parts.push_back({{prev, p.size()}, false});
    if (st.invert)
      for (auto& x : parts) x.second = !x.second;
    auto emit = [&](size_t b, size_t e) {
      if (e > b) out.push_back(p.substr(b, e - b));
    };
    switch (st.behavior) {
      case SplitBehavior::Isolated:
        for (auto& x : parts) emit(x.first.first, x.first.second);
        break;
      case SplitBehavior::Removed:
        for (auto& x : parts)
          if (!x.second) emit(x.first.first, x.first.second);
        break;
      case SplitBehavior::MergedWithPrevious: {
        // A match joins the piece before it.
        size_t b = 0, e = 0;
        bool open = false;
        for (auto& x : parts) {
          if (x.second && open) {
            e = x.first.second;
          } else {
            if (open) emit(b, e);
            b = x.first.first;
            e = x.first.second;
            open = true;
          }
        }
        if (open) emit(b, e);
        break;
      }
      case SplitBehavior::MergedWithNext: {
        // A match joins the piece after it.
        size_t b = 0;
        bool pending = false;
        for (auto& x : parts) {
          if (x.second) {
            if (!pending) b = x.first.first;
            pending = true;
          } else {
            emit(pending ? b : x.first.first, x.first.second);
            pending = false;
          }
        }
        if (pending) emit(b, p.size());
        break;
      }
      case SplitBehavior::Contiguous: {
        // Consecutive matches form one piece.
        size_t b = 0, e = 0;
        bool open = false, open_is_match = false;
        for (auto& x : parts) {
          if (open && x.second && open_is_match) {
            e = x.first.second;
          } else {
            if (open) emit(b, e);
            b = x.first.first;
            e = x.first.second;
            open = true;
            open_is_match = x.second;
          }
        }
        if (open) emit(b, e);
        break;
      }
    }
  }
}

// Added-token matcher: a byte trie, leftmost-longest.
class AddedTrie {
 public:
  void add(const std::string& s, int32_t token_index) {
    if (s.empty()) return;
    int32_t node = 0;
    if (nodes_.empty()) nodes_.emplace_back();
    for (unsigned char c : s) {
      int32_t next = -1;
      for (auto& kid : nodes_[node].kids)
        if (kid.first == c) next = kid.second;
      if (next < 0) {
        next = static_cast<int32_t>(nodes_.size());
        nodes_[node].kids.emplace_back(c, next);
        nodes_.emplace_back();
      }
      node = next;
    }
    nodes_[node].token = token_index;
    first_[static_cast<unsigned char>(s[0])] = true;
  }
  bool empty() const { return nodes_.empty(); }
  // Longest token starting at text[pos]: (end, token index) or (pos, -1).
  std::pair<size_t, int32_t> longest_at(std::string_view text, size_t pos) const {
    size_t best_end = pos;
    int32_t best = -1;
    int32_t node = 0;
    for (size_t i = pos; i < text.size(); ++i) {
      unsigned char c = static_cast<unsigned char>(text[i]);
      int32_t next = -1;
      for (auto& kid : nodes_[node].kids)
        if (kid.first == c) { next = kid.second; break; }
      if (next < 0) break;
      node = next;
      if (nodes_[node].token >= 0) {
        best = nodes_[node].token;
        best_end = i + 1;
      }
    }
    return {best_end, best};
  }
  bool may_start(unsigned char c) const { return first_[c]; }

 private:
  struct Node {
    std::vector<std::pair<unsigned char, int32_t>> kids;
    int32_t token = -1;
  };
  std::vector<Node> nodes_;
  bool first_[256] = {};
};

bool ends_with_word_char(std::string_view s);
bool starts_with_word_char(std::string_view s);

struct PieceHash {
  size_t operator()(const std::string& s) const noexcept {
    // FNV-1a: short pieces, cheaper than std::hash's murmur for 1-8 bytes.
    uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    return static_cast<size_t>(h ^ (h >> 29));
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// The tokenizer state
// ---------------------------------------------------------------------------------------------
struct TokenizerImpl {
  std::string source;
  // Vocabulary.
  std::unordered_map<std::string, int32_t> vocab;  // model vocabulary (byte-level spelling)
  std::vector<std::string> id_to_token;            // model tokens and added-token contents
  std::vector<uint8_t> special;                    // per id
  std::vector<std::string> token_bytes;            // per id: byte-level decoding
  std::vector<AddedToken> added;
  std::unordered_map<std::string, int32_t> added_by_content;
  AddedTrie raw_trie, normalized_trie;
  // BPE model.
  std::unordered_map<uint64_t, uint64_t> merges;  // (a << 32 | b) -> (rank << 32 | merged id)
  int32_t byte_id[256];
  int32_t byte_fallback_id[256];
  bool ignore_merges = false;
  bool byte_fallback = false;
  bool fuse_unk = false;
  int32_t model_unk = -1;  // BPE model's unk_token id
  // Normalizer: a list of forms ("NFC"/"NFD").
  std::vector<std::string> normalizers;
  // Pre-tokenizer steps.
  std::vector<PreTokStep> steps;
  // Post-processor.
  std::vector<int32_t> prefix, suffix;
  std::string post_name = "none";
  // Decoder.
  std::string decoder_error;  // non-empty: decode() throws it
  // Special ids and metadata.
  std::optional<int32_t> bos, eos, pad, unk;
  std::vector<int32_t> stop;
  std::string chat_template;
  std::string normalizer_name = "none", pre_name = "none";

  // Piece cache.
  mutable std::mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<int32_t>, PieceHash> cache;
  static constexpr size_t kCacheCapacity = 1 << 18;

  int64_t size() const { return static_cast<int64_t>(id_to_token.size()); }

  void set_token(int32_t id, const std::string& tok) {
    TORCH_CHECK(id >= 0, source, ": negative token id ", id, " for '", tok, "'");
    if (static_cast<size_t>(id) >= id_to_token.size()) id_to_token.resize(static_cast<size_t>(id) + 1);
    id_to_token[static_cast<size_t>(id)] = tok;
  }

  void add_merge(const std::string& a, const std::string& b, size_t rank) {
    auto ia = vocab.find(a), ib = vocab.find(b), im = vocab.find(a + b);
    TORCH_CHECK(ia != vocab.end() && ib != vocab.end() && im != vocab.end(), source, ": merge '", a,
                " ", b, "' (rank ", rank, ") uses a token that is not in the vocabulary ('",
                ia == vocab.end() ? a : ib == vocab.end() ? b : a + b, "')");
    uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(ia->second)) << 32) |
                   static_cast<uint32_t>(ib->second);
    // A repeated pair keeps its first (lowest) rank, like tokenizers' HashMap::insert order.
    merges.emplace(key, (static_cast<uint64_t>(rank) << 32) | static_cast<uint32_t>(im->second));
  }

  // Called once every table is filled.
  void finish() {
    const auto& alpha = byte_alphabet();
    for (int b = 0; b < 256; ++b) {
      auto it = vocab.find(alpha.byte_to_utf8[b]);
      byte_id[b] = it == vocab.end() ? -1 : it->second;
      char name[8];
      std::snprintf(name, sizeof(name), "<0x%02X>", b);
      auto fb = vocab.find(name);
      byte_fallback_id[b] = fb == vocab.end() ? -1 : fb->second;
    }
    special.assign(id_to_token.size(), 0);
    added_by_content.clear();
    for (size_t i = 0; i < added.size(); ++i) {
      const auto& t = added[i];
      set_token(t.id, t.content);
      added_by_content[t.content] = t.id;
      (t.normalized ? normalized_trie : raw_trie).add(t.content, static_cast<int32_t>(i));
    }
    special.assign(id_to_token.size(), 0);
    for (const auto& t : added)
      if (t.special) special[static_cast<size_t>(t.id)] = 1;
    token_bytes.assign(id_to_token.size(), std::string());
    for (size_t id = 0; id < id_to_token.size(); ++id) {
      const std::string& t = id_to_token[id];
      if (!alpha.unspell(t, token_bytes[id])) token_bytes[id] = t;
    }
  }

  // ---- encode ----------------------------------------------------------------------------
  // Calls on_text(segment) / on_token(added index) for the pieces of `text` split around
  // added tokens (tokenizers' AddedVocabulary::find_matches).
  template <typename OnText, typename OnToken>
  void split_added(std::string_view text, const AddedTrie& trie, OnText&& on_text,
                   OnToken&& on_token) const {
    if (trie.empty()) {
      if (!text.empty()) on_text(text);
      return;
    }
    size_t done = 0;  // text[0, done) is emitted
    size_t pos = 0;
    while (pos < text.size()) {
      if (!trie.may_start(static_cast<unsigned char>(text[pos]))) { ++pos; continue; }
      auto m = trie.longest_at(text, pos);
      if (m.second < 0) { ++pos; continue; }
      const AddedToken& t = added[static_cast<size_t>(m.second)];
      size_t start = pos, finish = m.first;
      if (t.single_word && ((start > 0 && ends_with_word_char(text.substr(0, start))) ||
                            (finish < text.size() && starts_with_word_char(text.substr(finish))))) {
        pos = finish;  // discarded; the search goes on after it
        continue;
      }
      if (t.lstrip) {
        size_t s = start;
        while (s > done) {
          size_t k = s - 1;
          while (k > done && (static_cast<unsigned char>(text[k]) & 0xC0) == 0x80) --k;
          auto cp = utf8_decode(reinterpret_cast<const unsigned char*>(text.data()) + k, s - k);
          if (!is_white_space(cp)) break;
          s = k;
        }
        start = s;
      }
      if (t.rstrip) {
        while (finish < text.size()) {
          size_t len = utf8_len_from_lead(static_cast<unsigned char>(text[finish]));
          auto cp = utf8_decode(reinterpret_cast<const unsigned char*>(text.data()) + finish, len);
          if (!is_white_space(cp)) break;
          finish += len;
        }
      }
      if (start > done) on_text(text.substr(done, start - done));
      on_token(m.second);
      done = pos = finish;
    }
    if (done < text.size()) on_text(text.substr(done));
  }

  // tokenizers' AddedVocabulary::extract_and_normalize: cut the non-normalized added tokens
  // out of the raw text, normalize what is left, cut the normalized added tokens out of that.
  void encode_text(std::string_view text, std::vector<int32_t>& out) const {
    auto on_added = [&](int32_t index) { out.push_back(added[static_cast<size_t>(index)].id); };
    auto on_normalized = [&](std::string_view s) {
      split_added(s, normalized_trie, [&](std::string_view piece) { pre_tokenize_and_bpe(piece, out); },
                  on_added);
    };
    split_added(
        text, raw_trie,
        [&](std::string_view segment) {
          if (normalizers.empty()) {
            on_normalized(segment);
            return;
          }
          std::string norm(segment);
          for (const auto& form : normalizers) norm = unicode_normalize(norm, form);
          on_normalized(norm);
        },
        on_added);
  }

  void pre_tokenize_and_bpe(std::string_view text, std::vector<int32_t>& out) const {
    std::vector<Piece> pieces{text}, next;
    std::deque<std::string> owned;  // pieces a ByteLevel(add_prefix_space) step rewrote
    for (const auto& st : steps) {
      next.clear();
      if (st.kind == PreTokStep::Kind::ByteLevel) {
        std::vector<Piece>* src = &pieces;
        std::vector<Piece> prefixed;
        if (st.add_prefix_space) {
          for (Piece p : pieces) {
            if (!p.empty() && p[0] != ' ') {
              owned.push_back(" " + std::string(p));
              prefixed.push_back(owned.back());
            } else {
              prefixed.push_back(p);
            }
          }
          src = &prefixed;
        }
        if (st.regex) {
          apply_split(st, *src, next);
        } else {
          next = *src;
        }
      } else {
        apply_split(st, pieces, next);
      }
      pieces.swap(next);
    }
    for (Piece p : pieces) bpe_cached(p, out);
  }

  void bpe_cached(std::string_view piece, std::vector<int32_t>& out) const {
    if (piece.empty()) return;
    if (piece.size() == 1 && byte_id[static_cast<unsigned char>(piece[0])] >= 0) {
      out.push_back(byte_id[static_cast<unsigned char>(piece[0])]);
      return;
    }
    thread_local std::string key;
    key.assign(piece.data(), piece.size());
    {
      std::lock_guard<std::mutex> lock(cache_mutex);
      auto it = cache.find(key);
      if (it != cache.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    std::vector<int32_t> ids;
    bpe(piece, ids);
    out.insert(out.end(), ids.begin(), ids.end());
    std::lock_guard<std::mutex> lock(cache_mutex);
    if (cache.size() >= kCacheCapacity) cache.clear();
    cache.emplace(key, std::move(ids));
  }

  // (rank, merged id) of a pair, rank = UINT32_MAX when absent.
  inline std::pair<uint32_t, int32_t> merge_of(int32_t a, int32_t b) const {
    auto it = merges.find((static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b));
    if (it == merges.end()) return {UINT32_MAX, -1};
    return {static_cast<uint32_t>(it->second >> 32), static_cast<int32_t>(it->second & 0xFFFFFFFFu)};
  }

  void bpe(std::string_view piece, std::vector<int32_t>& ids) const {
    const auto& alpha = byte_alphabet();
    if (ignore_merges) {
      auto it = vocab.find(alpha.spell(piece));
      if (it != vocab.end()) {
        ids.push_back(it->second);
        return;
      }
    }
    // Initial symbols: one per byte (each byte is one character of the byte-level spelling).
    std::vector<int32_t> syms;
    syms.reserve(piece.size());
    bool last_unk = false;
    for (unsigned char c : piece) {
      int32_t id = byte_id[c];
      if (id >= 0) {
        syms.push_back(id);
        last_unk = false;
      } else if (byte_fallback && byte_fallback_id[c] >= 0) {
        syms.push_back(byte_fallback_id[c]);
        last_unk = false;
      } else if (model_unk >= 0) {
        if (!(fuse_unk && last_unk)) syms.push_back(model_unk);
        last_unk = true;
      }  // else: dropped, as tokenizers' BPE does without unk_token
    }
    if (syms.size() < 2) {
      ids = std::move(syms);
      return;
    }
    if (piece.size() >= g_bpe_heap_threshold.load(std::memory_order_relaxed))
      merge_heap(syms);
    else
      merge_ranks(syms);
    ids = std::move(syms);
  }

  // O(n^2): keep the rank of every adjacent pair; merge the lowest (leftmost on ties).
  void merge_ranks(std::vector<int32_t>& syms) const {
    std::vector<std::pair<uint32_t, int32_t>> pr(syms.size() - 1);
    for (size_t i = 0; i + 1 < syms.size(); ++i) pr[i] = merge_of(syms[i], syms[i + 1]);
    while (!pr.empty()) {
      size_t best = 0;
      for (size_t i = 1; i < pr.size(); ++i)
        if (pr[i].first < pr[best].first) best = i;
      if (pr[best].first == UINT32_MAX) break;
      syms[best] = pr[best].second;
      syms.erase(syms.begin() + static_cast<std::ptrdiff_t>(best) + 1);
      pr.erase(pr.begin() + static_cast<std::ptrdiff_t>(best));
      if (best > 0) pr[best - 1] = merge_of(syms[best - 1], syms[best]);
      if (best < pr.size()) pr[best] = merge_of(syms[best], syms[best + 1]);
    }
  }

  // O(n log n): tokenizers' Word::merge_all (linked symbols + a min-heap on (rank, position),
  // stale entries skipped).
  void merge_heap(std::vector<int32_t>& syms) const {
    struct Sym {
      int32_t id;
      int32_t prev, next;
      bool alive;
    };
    struct Cand {
      uint32_t rank;
      int32_t pos;
      int32_t merged;
      bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    const int32_t n = static_cast<int32_t>(syms.size());
    std::vector<Sym> s(static_cast<size_t>(n));
    for (int32_t i = 0; i < n; ++i) s[static_cast<size_t>(i)] = {syms[static_cast<size_t>(i)], i - 1, i + 1 < n ? i + 1 : -1, true};
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
    for (int32_t i = 0; i + 1 < n; ++i) {
      auto m = merge_of(s[static_cast<size_t>(i)].id, s[static_cast<size_t>(i + 1)].id);
      if (m.first != UINT32_MAX) heap.push({m.first, i, m.second});
    }
    while (!heap.empty()) {
      Cand top = heap.top();
      heap.pop();
      Sym& a = s[static_cast<size_t>(top.pos)];
      if (!a.alive || a.next < 0) continue;
      Sym& b = s[static_cast<size_t>(a.next)];
      if (merge_of(a.id, b.id).second != top.merged) continue;  // stale entry
      a.id = top.merged;
      b.alive = false;
      a.next = b.next;
      if (b.next >= 0) s[static_cast<size_t>(b.next)].prev = top.pos;
      if (a.prev >= 0) {
        auto m = merge_of(s[static_cast<size_t>(a.prev)].id, a.id);
        if (m.first != UINT32_MAX) heap.push({m.first, a.prev, m.second});
      }
      if (a.next >= 0) {
        auto m = merge_of(a.id, s[static_cast<size_t>(a.next)].id);
        if (m.first != UINT32_MAX) heap.push({m.first, top.pos, m.second});
      }
    }
    syms.clear();
    for (int32_t i = 0; i >= 0; i = s[static_cast<size_t>(i)].next) syms.push_back(s[static_cast<size_t>(i)].id);
  }
};

namespace {

// Word characters for single_word added tokens: Rust regex's Unicode \w, which tokenizers
// uses (^\w / \w$): Alphabetic, marks, decimal digits, connector punctuation, joiners.
const Regex& word_char_regex() {
  static const Regex r("[\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\p{Join_Control}]", "single_word");
  return r;
}
bool ends_with_word_char(std::string_view s) {
  size_t k = s.size();
  if (k == 0) return false;
  size_t b = k - 1;
  while (b > 0 && (static_cast<unsigned char>(s[b]) & 0xC0) == 0x80) --b;
  bool found = false;
  word_char_regex().for_each_match(s.substr(b), [&](size_t, size_t) { found = true; });
  return found;
}
bool starts_with_word_char(std::string_view s) {
  if (s.empty()) return false;
  bool found = false;
  word_char_regex().for_each_match(s.substr(0, utf8_len_from_lead(static_cast<unsigned char>(s[0]))),
                                   [&](size_t, size_t) { found = true; });
  return found;
}

std::string read_file(const std::string& path, const char* what) {
  std::ifstream f(path, std::ios::binary);
  TORCH_CHECK(f.good(), what, ": cannot open '", path, "'");
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

bool file_exists(const std::string& path) { return std::ifstream(path).good(); }

std::shared_ptr<Regex> make_regex(const std::string& pattern, const std::string& where) {
  return std::make_shared<Regex>(pattern, where);
}

PreTokStep split_step(const std::string& pattern, SplitBehavior behavior, bool invert,
                      const std::string& where, const std::string& name) {
  PreTokStep st;
  st.kind = PreTokStep::Kind::Split;
  st.regex = make_regex(pattern, where);
  st.behavior = behavior;
  st.invert = invert;
  st.name = name;
  return st;
}

PreTokStep byte_level_step(bool add_prefix_space, bool use_regex, const std::string& where) {
  PreTokStep st;
  st.kind = PreTokStep::Kind::ByteLevel;
  st.add_prefix_space = add_prefix_space;
  if (use_regex) st.regex = make_regex(kGpt2Pattern, where);
  st.behavior = SplitBehavior::Isolated;
  st.name = std::string("ByteLevel(") + (add_prefix_space ? "add_prefix_space, " : "") +
            (use_regex ? "gpt2 regex" : "no regex") + ")";
  return st;
}

PreTokStep digits_step(bool individual, const std::string& where) {
  return split_step(individual ? "\\p{N}" : "\\p{N}+", SplitBehavior::Isolated, false, where,
                    individual ? "Digits(individual)" : "Digits");
}

// Escapes a literal for PCRE2 (\Q..\E would break on a literal \E).
std::string regex_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (std::strchr("\\^$.|?*+()[]{}-", c)) out += '\\';
    out += c;
  }
  return out;
}

// ---- tokenizer.json sections -------------------------------------------------------------
std::string type_of(const json::Value& v, const std::string& where) {
  TORCH_CHECK(v.is_object(), where, ": expected an object, got ", v.type_name());
  const json::Value* t = v.find("type");
  TORCH_CHECK(t && t->is_string(), where, ": missing string \"type\"");
  return t->as_string();
}

void parse_normalizer(TokenizerImpl& impl, const json::Value& v, const std::string& where) {
  if (v.is_null()) return;
  std::string type = type_of(v, where);
  if (type == "NFC" || type == "NFD") {
    impl.normalizers.push_back(type);
  } else if (type == "Sequence") {
    const auto& list = v["normalizers"];
    for (size_t i = 0; i < list.size(); ++i)
      parse_normalizer(impl, list[i], where + ".normalizers[" + std::to_string(i) + "]");
  } else {
    TORCH_CHECK(false, where, ": normalizer type '", type,
                "' is not supported (supported: NFC, NFD, Sequence, null)");
  }
}

SplitBehavior parse_behavior(const std::string& b, const std::string& where) {
  if (b == "Isolated") return SplitBehavior::Isolated;
  if (b == "Removed") return SplitBehavior::Removed;
  if (b == "MergedWithPrevious") return SplitBehavior::MergedWithPrevious;
  if (b == "MergedWithNext") return SplitBehavior::MergedWithNext;
  if (b == "Contiguous") return SplitBehavior::Contiguous;
  TORCH_CHECK(false, where, ": unknown Split behavior '", b, "'");
  return SplitBehavior::Isolated;
}

void parse_pre_tokenizer(TokenizerImpl& impl, const json::Value& v, const std::string& where) {
  if (v.is_null()) return;
  std::string type = type_of(v, where);
  if (type == "Sequence") {
    const auto& list = v["pretokenizers"];
    for (size_t i = 0; i < list.size(); ++i)
      parse_pre_tokenizer(impl, list[i], where + ".pretokenizers[" + std::to_string(i) + "]");
  } else if (type == "ByteLevel") {
    impl.steps.push_back(byte_level_step(v.get_bool("add_prefix_space", true),
                                         v.get_bool("use_regex", true), where));
  } else if (type == "Digits") {
    impl.steps.push_back(digits_step(v.get_bool("individual_digits", false), where));
  } else if (type == "Split") {
    const auto& pat = v["pattern"];
    std::string pattern;
    std::string shown;
    if (pat.contains("Regex")) {
      pattern = pat["Regex"].as_string();
      shown = "Regex";
    } else if (pat.contains("String")) {
      pattern = regex_escape(pat["String"].as_string());
      shown = "String";
    } else {
      TORCH_CHECK(false, where, ".pattern: expected {\"Regex\": ...} or {\"String\": ...}");
    }
    SplitBehavior b = parse_behavior(v["behavior"].as_string(), where + ".behavior");
    bool invert = v.get_bool("invert", false);
    impl.steps.push_back(split_step(pattern, b, invert, where,
                                    "Split(" + shown + " '" + pat[shown].as_string() + "', " +
                                        behavior_name(b) + (invert ? ", invert" : "") + ")"));
  } else {
    TORCH_CHECK(false, where, ": pre-tokenizer type '", type,
                "' is not supported (supported: ByteLevel, Split, Digits, Sequence, null)");
  }
}

/// Ids are stored densely (one slot per id up to the largest): an id must lie below the
/// number of tokens the file lists plus this slack, so a forged id cannot make the reader
/// allocate gigabytes.
constexpr int64_t kTokenIdSlack = 65536;

/// `id` as an int32 token id in [0, limit), else a c10::Error naming `what`.
int32_t checked_token_id(int64_t id, int64_t limit, const std::string& where,
                         const std::string& what) {
  TORCH_CHECK(id >= 0 && id < limit, where, ": ", what, " = ", id, " is out of range: expected an "
              "id in [0, ", limit, ")");
  return static_cast<int32_t>(id);
}

void parse_post_processor(TokenizerImpl& impl, const json::Value& v, const std::string& where) {
  if (v.is_null()) return;
  std::string type = type_of(v, where);
  if (type == "ByteLevel") {
    if (impl.post_name == "none") impl.post_name = "ByteLevel";
  } else if (type == "Sequence") {
    const auto& list = v["processors"];
    for (size_t i = 0; i < list.size(); ++i)
      parse_post_processor(impl, list[i], where + ".processors[" + std::to_string(i) + "]");
  } else if (type == "TemplateProcessing") {
    TORCH_CHECK(impl.prefix.empty() && impl.suffix.empty(), where,
                ": more than one TemplateProcessing");
    const auto& single = v["single"];
    const auto& specials = v["special_tokens"];
    bool seen_a = false;
    for (size_t i = 0; i < single.size(); ++i) {
      const auto& item = single[i];
      if (item.contains("Sequence")) {
        std::string id = item["Sequence"]["id"].as_string();
        TORCH_CHECK(id == "A" && !seen_a, where, ".single[", i, "]: only one sequence $A is supported (got '",
                    id, "')");
        seen_a = true;
      } else if (item.contains("SpecialToken")) {
        std::string name = item["SpecialToken"]["id"].as_string();
        const json::Value* tok = specials.find(name);
        TORCH_CHECK(tok, where, ".single[", i, "]: special token '", name, "' is not in special_tokens");
        const auto& ids = (*tok)["ids"];
        auto& dst = seen_a ? impl.suffix : impl.prefix;
        for (size_t k = 0; k < ids.size(); ++k)
          dst.push_back(checked_token_id(ids[k].as_int(), INT32_MAX, where,
                                         "special_tokens['" + name + "'].ids[" + std::to_string(k) + "]"));
      } else {
        TORCH_CHECK(false, where, ".single[", i, "]: expected Sequence or SpecialToken");
      }
    }
    impl.post_name = "TemplateProcessing";
  } else {
    TORCH_CHECK(false, where, ": post-processor type '", type,
                "' is not supported (supported: TemplateProcessing, ByteLevel, Sequence, null)");
  }
}

void parse_decoder(TokenizerImpl& impl, const json::Value& v, const std::string& where) {
  if (v.is_null()) {
    impl.decoder_error = where + ": the tokenizer has no decoder; decode() supports ByteLevel only";
    return;
  }
  std::string type = type_of(v, where);
  if (type == "ByteLevel") return;
  if (type == "Sequence") {
    const auto& list = v["decoders"];
    bool has_byte_level = false;
    for (size_t i = 0; i < list.size(); ++i) {
      std::string t = type_of(list[i], where + ".decoders[" + std::to_string(i) + "]");
      if (t == "ByteLevel") has_byte_level = true;
      else
        impl.decoder_error = where + ": decoder '" + t + "' is not supported (ByteLevel only)";
    }
    if (!has_byte_level && impl.decoder_error.empty())
      impl.decoder_error = where + ": no ByteLevel decoder";
    return;
  }
  impl.decoder_error = where + ": decoder '" + type + "' is not supported (ByteLevel only)";
}

std::optional<int32_t> config_token(const TokenizerImpl& impl, const json::Value& cfg,
                                    const std::string& key, const std::string& where) {
  const json::Value* v = cfg.find(key);
  if (!v || v->is_null()) return std::nullopt;
  std::string content;
  if (v->is_string()) content = v->as_string();
  else if (v->is_object() && v->contains("content")) content = (*v)["content"].as_string();
  else TORCH_CHECK(false, where, ": '", key, "' must be a string or {\"content\": ...}");
  auto it = impl.added_by_content.find(content);
  if (it != impl.added_by_content.end()) return it->second;
  auto iv = impl.vocab.find(content);
  TORCH_CHECK(iv != impl.vocab.end(), where, ": ", key, " '", content, "' is not a token of the vocabulary");
  return iv->second;
}

void add_stop(TokenizerImpl& impl, int32_t id) {
  if (std::find(impl.stop.begin(), impl.stop.end(), id) == impl.stop.end()) impl.stop.push_back(id);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Loaders
// ---------------------------------------------------------------------------------------------
std::shared_ptr<TokenizerImpl> load_tokenizer_json(const std::string& text, const std::string& source) {
  auto impl = std::make_shared<TokenizerImpl>();
  impl->source = source;
  json::Value root = json::parse(text, source);
  TORCH_CHECK(root.is_object(), source, ": expected a JSON object at the top level");
  TORCH_CHECK(root.contains("model"), source, ": missing key 'model'");
  const auto& model = root["model"];
  std::string mtype = model.get_string("type", "");
  TORCH_CHECK(mtype == "BPE", source, ": model.type is '", mtype, "'; only BPE is supported");
  TORCH_CHECK(model.contains("vocab") && model["vocab"].is_object(), source,
              ": model.vocab must be an object");
  TORCH_CHECK(model.contains("merges") && model["merges"].is_array(), source,
              ": model.merges must be an array");
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    std::string s = model.get_string(k, "");
    TORCH_CHECK(s.empty(), source, ": model.", k, " = '", s, "' is not supported");
  }
  const json::Value* dropout = model.find("dropout");
  TORCH_CHECK(!dropout || dropout->is_null() || dropout->as_double() == 0.0, source,
              ": model.dropout is not supported (encode would be random)");
  const auto& vocab = model["vocab"];
  const json::Value* added_tokens = root.find("added_tokens");
  const size_t n_added = added_tokens && added_tokens->is_array() ? added_tokens->size() : 0;
  const int64_t id_limit = std::min<int64_t>(
      INT32_MAX, static_cast<int64_t>(vocab.size() + n_added) + detail::kTokenIdSlack);
  impl->vocab.reserve(vocab.size() * 2);
  for (const auto& kv : vocab.items()) {
    const int32_t id = detail::checked_token_id(kv.second.as_int(), id_limit, source,
                                                "model.vocab['" + kv.first + "']");
    impl->vocab[kv.first] = id;
    impl->set_token(id, kv.first);
  }
  const auto& merges = model["merges"];
  impl->merges.reserve(merges.size() * 2);
  for (size_t r = 0; r < merges.size(); ++r) {
    const auto& m = merges[r];
    if (m.is_string()) {
      const std::string& s = m.as_string();
      size_t sp = s.find(' ');
      TORCH_CHECK(sp != std::string::npos && s.find(' ', sp + 1) == std::string::npos, source,
                  ": model.merges[", r, "] = '", s, "' is not two tokens separated by one space");
      impl->add_merge(s.substr(0, sp), s.substr(sp + 1), r);
    } else {
      TORCH_CHECK(m.is_array() && m.size() == 2, source, ": model.merges[", r,
                  "] must be \"a b\" or [a, b]");
      impl->add_merge(m[0].as_string(), m[1].as_string(), r);
    }
  }
  impl->ignore_merges = model.get_bool("ignore_merges", false);
  impl->byte_fallback = model.get_bool("byte_fallback", false);
  impl->fuse_unk = model.get_bool("fuse_unk", false);
  std::string unk = model.get_string("unk_token", "");
  if (!unk.empty()) {
    auto it = impl->vocab.find(unk);
    TORCH_CHECK(it != impl->vocab.end(), source, ": model.unk_token '", unk, "' is not in the vocabulary");
    impl->model_unk = it->second;
  }
  if (const json::Value* at = added_tokens; at && !at->is_null()) {
    for (size_t i = 0; i < at->size(); ++i) {
      const auto& t = (*at)[i];
      AddedToken a;
      a.id = detail::checked_token_id(t["id"].as_int(), id_limit, source,
                                      "added_tokens[" + std::to_string(i) + "].id");
      a.content = t["content"].as_string();
      TORCH_CHECK(!a.content.empty(), source, ": added_tokens[", i, "] has empty content");
      a.special = t.get_bool("special", false);
      a.single_word = t.get_bool("single_word", false);
      a.lstrip = t.get_bool("lstrip", false);
      a.rstrip = t.get_bool("rstrip", false);
      a.normalized = t.get_bool("normalized", !a.special);
      impl->added.push_back(a);
    }
  }
  auto section = [&](const char* key) -> json::Value {
    const json::Value* v = root.find(key);
    return v ? *v : json::Value();
  };
  parse_normalizer(*impl, section("normalizer"), source + ": normalizer");
  parse_pre_tokenizer(*impl, section("pre_tokenizer"), source + ": pre_tokenizer");
  parse_post_processor(*impl, section("post_processor"), source + ": post_processor");
  parse_decoder(*impl, section("decoder"), source + ": decoder");
  bool byte_level = false;
  for (const auto& st : impl->steps) byte_level |= st.kind == PreTokStep::Kind::ByteLevel;
  TORCH_CHECK(byte_level, source,
              ": the pre-tokenizer has no ByteLevel step; only byte-level BPE tokenizers are supported");
  // Descriptions.
  if (!impl->normalizers.empty()) {
    impl->normalizer_name.clear();
    for (const auto& n : impl->normalizers) impl->normalizer_name += (impl->normalizer_name.empty() ? "" : "+") + n;
  }
  impl->pre_name.clear();
  for (const auto& st : impl->steps) impl->pre_name += (impl->pre_name.empty() ? "" : " + ") + st.name;
  impl->finish();
  for (const auto* ids : {&impl->prefix, &impl->suffix})
    for (int32_t id : *ids)
      detail::checked_token_id(id, impl->size(), source, "post_processor special token id");
  if (!impl->prefix.empty() && impl->prefix.size() == 1) impl->bos = impl->prefix[0];
  return impl;
}

namespace {

struct GgufPre {
  const char* names;  // space-separated llama.cpp names
  enum { Gpt2, Digits, Llama3, Qwen2, Bloom } kind;
};
const GgufPre kGgufPre[] = {
    {"gpt-2 gpt2 phi-2 roberta-bpe jina-es jina-de jina-v2-es jina-v2-de jina-v2-code olmo", GgufPre::Gpt2},
    {"smollm starcoder refact command-r codeshell exaone minerva", GgufPre::Digits},
    {"llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 dbrx smaug-bpe", GgufPre::Llama3},
    {"qwen2 deepseek-r1-qwen megrez", GgufPre::Qwen2},
    {"bloom poro-chat gpt3-finnish", GgufPre::Bloom},
};

}  // namespace

std::shared_ptr<TokenizerImpl> load_gguf(const GgufFile& f) {
  auto impl = std::make_shared<TokenizerImpl>();
  const std::string src = f.path();
  impl->source = src;
  std::string model = f.get_string("tokenizer.ggml.model");
  TORCH_CHECK(model == "gpt2", src, ": tokenizer.ggml.model is '", model,
              "'; only byte-level BPE (\"gpt2\") is supported");
  std::string pre = f.has("tokenizer.ggml.pre") ? f.get_string("tokenizer.ggml.pre") : "gpt-2";
  const GgufPre* found = nullptr;
  for (const auto& p : kGgufPre) {
    std::istringstream names(p.names);
    for (std::string n; names >> n;)
      if (n == pre) found = &p;
  }
  if (!found) {
    std::string all;
    for (const auto& n : Tokenizer::supported_gguf_pre_tokenizers()) all += (all.empty() ? "" : ", ") + n;
    TORCH_CHECK(false, src, ": unknown pre-tokenizer '", pre, "' in tokenizer.ggml.pre (supported: ", all, ")");
  }
  const std::string where = src + ": tokenizer.ggml.pre '" + pre + "'";
  switch (found->kind) {
    case GgufPre::Gpt2:
      impl->steps.push_back(byte_level_step(false, true, where));
      break;
    case GgufPre::Digits:
      impl->steps.push_back(digits_step(true, where));
      impl->steps.push_back(byte_level_step(false, true, where));
      break;
    case GgufPre::Llama3:
      impl->steps.push_back(split_step(kLlama3Pattern, SplitBehavior::Isolated, false, where, "Split(llama3)"));
      impl->steps.push_back(byte_level_step(false, false, where));
      impl->ignore_merges = true;
      break;
    case GgufPre::Qwen2:
      impl->normalizers.push_back("NFC");
      impl->normalizer_name = "NFC";
      impl->steps.push_back(split_step(kQwen2Pattern, SplitBehavior::Isolated, false, where, "Split(qwen2)"));
      impl->steps.push_back(byte_level_step(false, false, where));
      break;
    case GgufPre::Bloom:
      impl->steps.push_back(split_step(kBloomPattern, SplitBehavior::Isolated, false, where, "Split(bloom)"));
      impl->steps.push_back(byte_level_step(false, false, where));
      break;
  }
  impl->pre_name = "gguf '" + pre + "': ";
  for (size_t i = 0; i < impl->steps.size(); ++i) impl->pre_name += (i ? " + " : "") + impl->steps[i].name;

  auto tokens = f.get_string_array("tokenizer.ggml.tokens");
  TORCH_CHECK(!tokens.empty(), src, ": tokenizer.ggml.tokens is empty");
  std::vector<int64_t> types;
  if (f.has("tokenizer.ggml.token_type")) {
    types = f.get_int_array("tokenizer.ggml.token_type");
    TORCH_CHECK(types.size() == tokens.size(), src, ": tokenizer.ggml.token_type has ", types.size(),
                " entries for ", tokens.size(), " tokens");
  }
  const auto& alpha = byte_alphabet();
  impl->vocab.reserve(tokens.size() * 2);
  for (size_t i = 0; i < tokens.size(); ++i) {
    // A token written outside the byte alphabet (a user-defined "<think>" or one with spaces)
    // is respelled byte by byte for the vocabulary, as transformers' GGUF loader does.
    const std::string& t = tokens[i];
    std::string key = alpha.in_alphabet(t) ? t : alpha.spell(t);
    impl->vocab.emplace(key, static_cast<int32_t>(i));
    impl->set_token(static_cast<int32_t>(i), key);
    int64_t ty = types.empty() ? 1 : types[i];
    if (ty == 3 || ty == 4) {  // CONTROL: special; USER_DEFINED: added, not special
      AddedToken a;
      a.id = static_cast<int32_t>(i);
      a.content = t;
      a.special = ty == 3;
      impl->added.push_back(a);
    }
  }
  TORCH_CHECK(f.has("tokenizer.ggml.merges"), src, ": missing key tokenizer.ggml.merges");
  auto merges = f.get_string_array("tokenizer.ggml.merges");
  impl->merges.reserve(merges.size() * 2);
  for (size_t r = 0; r < merges.size(); ++r) {
    const std::string& s = merges[r];
    size_t sp = s.find(' ');
    TORCH_CHECK(sp != std::string::npos, src, ": tokenizer.ggml.merges[", r, "] = '", s,
                "' is not two tokens separated by a space");
    impl->add_merge(s.substr(0, sp), s.substr(sp + 1), r);
  }
  auto id_key = [&](const char* key) -> std::optional<int32_t> {
    if (!f.has(key)) return std::nullopt;
    int64_t id = f.get_int(key);
    if (id < 0) return std::nullopt;  // llama.cpp writes -1 for "none"
    TORCH_CHECK(id < static_cast<int64_t>(tokens.size()), src, ": ", key, " = ", id,
                " is outside the vocabulary (", tokens.size(), " tokens)");
    return static_cast<int32_t>(id);
  };
  impl->bos = id_key("tokenizer.ggml.bos_token_id");
  impl->eos = id_key("tokenizer.ggml.eos_token_id");
  impl->pad = id_key("tokenizer.ggml.padding_token_id");
  impl->unk = id_key("tokenizer.ggml.unknown_token_id");
  if (impl->eos) add_stop(*impl, *impl->eos);
  for (const char* k : {"tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"})
    if (auto id = id_key(k)) add_stop(*impl, *id);
  bool add_bos = f.has("tokenizer.ggml.add_bos_token") && f.get_bool("tokenizer.ggml.add_bos_token");
  bool add_eos = f.has("tokenizer.ggml.add_eos_token") && f.get_bool("tokenizer.ggml.add_eos_token");
  if (add_bos) {
    TORCH_CHECK(impl->bos, src, ": tokenizer.ggml.add_bos_token is true but there is no bos_token_id");
    impl->prefix.push_back(*impl->bos);
  }
  if (add_eos) {
    TORCH_CHECK(impl->eos, src, ": tokenizer.ggml.add_eos_token is true but there is no eos_token_id");
    impl->suffix.push_back(*impl->eos);
  }
  impl->post_name = add_bos || add_eos ? "gguf add_bos/add_eos" : "none";
  if (f.has("tokenizer.chat_template")) impl->chat_template = f.get_string("tokenizer.chat_template");
  impl->finish();
  return impl;
}

void set_bpe_heap_threshold(size_t bytes) { g_bpe_heap_threshold.store(bytes); }
size_t bpe_heap_threshold() { return g_bpe_heap_threshold.load(); }

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------------
Tokenizer::Tokenizer(std::shared_ptr<detail::TokenizerImpl> impl) : impl_(std::move(impl)) {}

Tokenizer Tokenizer::from_tokenizer_json(const std::string& path) {
  std::string text = detail::read_file(path, "Tokenizer::from_tokenizer_json");
  return Tokenizer(detail::load_tokenizer_json(text, path));
}

Tokenizer Tokenizer::from_tokenizer_json_string(const std::string& json_text, const std::string& source) {
  return Tokenizer(detail::load_tokenizer_json(json_text, source));
}

Tokenizer Tokenizer::from_directory(const std::string& dir) {
  const std::string tj = dir + "/tokenizer.json";
  TORCH_CHECK(detail::file_exists(tj), "Tokenizer::from_directory: '", dir,
              "' has no tokenizer.json (only byte-level BPE tokenizer.json files are supported)");
  auto impl = detail::load_tokenizer_json(detail::read_file(tj, "Tokenizer::from_directory"), tj);
  const std::string cfg_path = dir + "/tokenizer_config.json";
  if (detail::file_exists(cfg_path)) {
    json::Value cfg = json::parse_file(cfg_path);
    if (auto v = detail::config_token(*impl, cfg, "bos_token", cfg_path)) impl->bos = v;
    impl->eos = detail::config_token(*impl, cfg, "eos_token", cfg_path);
    impl->pad = detail::config_token(*impl, cfg, "pad_token", cfg_path);
    impl->unk = detail::config_token(*impl, cfg, "unk_token", cfg_path);
    if (const json::Value* ct = cfg.find("chat_template"); ct && !ct->is_null()) {
      if (ct->is_string()) {
        impl->chat_template = ct->as_string();
      } else if (ct->is_array()) {  // [{"name": "default", "template": ...}, ...]
        for (size_t i = 0; i < ct->size(); ++i)
          if ((*ct)[i].get_string("name", "") == "default") impl->chat_template = (*ct)[i]["template"].as_string();
      }
    }
  }
  if (impl->eos) detail::add_stop(*impl, *impl->eos);
  const std::string jinja = dir + "/chat_template.jinja";
  if (detail::file_exists(jinja)) impl->chat_template = detail::read_file(jinja, "Tokenizer::from_directory");
  const std::string gen = dir + "/generation_config.json";
  if (detail::file_exists(gen)) {
    json::Value g = json::parse_file(gen);
    if (const json::Value* e = g.find("eos_token_id"); e && !e->is_null()) {
      if (e->is_array()) {
        for (size_t i = 0; i < e->size(); ++i)
          detail::add_stop(*impl, detail::checked_token_id((*e)[i].as_int(), impl->size(), gen,
                                                           "eos_token_id[" + std::to_string(i) + "]"));
      } else {
        detail::add_stop(*impl, detail::checked_token_id(e->as_int(), impl->size(), gen, "eos_token_id"));
      }
    }
  }
  return Tokenizer(impl);
}

Tokenizer Tokenizer::from_gguf(const std::string& path) { return from_gguf(GgufFile::open(path)); }

Tokenizer Tokenizer::from_gguf(const GgufFile& file) { return Tokenizer(detail::load_gguf(file)); }

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  size_t bad = find_invalid_utf8(text);
  TORCH_CHECK(bad == std::string_view::npos, "Tokenizer::encode: the text is not valid UTF-8 (first invalid byte 0x",
              [&] {
                char b[3];
                std::snprintf(b, sizeof(b), "%02X", static_cast<unsigned char>(text[bad]));
                return std::string(b);
              }(),
              " at byte offset ", bad, " of ", text.size(),
              "); clean it with Tokenizer::replace_invalid_utf8 first");
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  if (add_special_tokens) out.insert(out.end(), impl_->prefix.begin(), impl_->prefix.end());
  impl_->encode_text(text, out);
  if (add_special_tokens) out.insert(out.end(), impl_->suffix.begin(), impl_->suffix.end());
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  TORCH_CHECK(impl_->decoder_error.empty(), "Tokenizer::decode: ", impl_->decoder_error);
  std::string bytes;
  for (int32_t id : ids) {
    if (id < 0 || id >= impl_->size()) continue;  // as tokenizers: unknown ids are skipped
    if (skip_special_tokens && impl_->special[static_cast<size_t>(id)]) continue;
    bytes += impl_->token_bytes[static_cast<size_t>(id)];
  }
  return replace_invalid_utf8(bytes);
}

std::string Tokenizer::token_bytes(int32_t id) const {
  if (id < 0 || id >= impl_->size()) return std::string();
  return impl_->token_bytes[static_cast<size_t>(id)];
}

int64_t Tokenizer::vocab_size() const { return impl_->size(); }

const std::string& Tokenizer::id_to_token(int32_t id) const {
  TORCH_CHECK(id >= 0 && id < impl_->size(), "Tokenizer::id_to_token: id ", id, " is outside [0, ",
              impl_->size(), ") (", impl_->source, ")");
  return impl_->id_to_token[static_cast<size_t>(id)];
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  std::string key(token);
  auto a = impl_->added_by_content.find(key);
  if (a != impl_->added_by_content.end()) return a->second;
  auto v = impl_->vocab.find(key);
  if (v != impl_->vocab.end()) return v->second;
  return std::nullopt;
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && id < impl_->size() && impl_->special[static_cast<size_t>(id)];
}
const std::vector<AddedToken>& Tokenizer::added_tokens() const { return impl_->added; }
std::optional<int32_t> Tokenizer::bos_id() const { return impl_->bos; }
std::optional<int32_t> Tokenizer::eos_id() const { return impl_->eos; }
std::optional<int32_t> Tokenizer::pad_id() const { return impl_->pad; }
std::optional<int32_t> Tokenizer::unk_id() const { return impl_->unk; }
const std::vector<int32_t>& Tokenizer::stop_ids() const { return impl_->stop; }
bool Tokenizer::adds_bos() const { return impl_->bos && !impl_->prefix.empty() && impl_->prefix[0] == *impl_->bos; }
bool Tokenizer::adds_eos() const { return impl_->eos && !impl_->suffix.empty() && impl_->suffix.back() == *impl_->eos; }
const std::string& Tokenizer::chat_template() const { return impl_->chat_template; }
const std::string& Tokenizer::source() const { return impl_->source; }

std::string Tokenizer::describe() const {
  std::ostringstream s;
  s << "normalizer: " << impl_->normalizer_name << " | pre-tokenizer: " << impl_->pre_name
    << " | BPE: " << impl_->vocab.size() << " tokens, " << impl_->merges.size() << " merges"
    << (impl_->ignore_merges ? ", ignore_merges" : "") << " | added tokens: " << impl_->added.size()
    << " | post-processor: " << impl_->post_name;
  return s.str();
}

std::string Tokenizer::replace_invalid_utf8(std::string_view bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  std::string out;
  out.reserve(bytes.size());
  for (size_t i = 0; i < bytes.size();) {
    size_t len = detail::utf8_valid_len(p, bytes.size(), i);
    if (len) {
      out.append(bytes.data() + i, len);
      i += len;
    } else {
      out += "\xEF\xBF\xBD";  // U+FFFD
      i += detail::utf8_invalid_len(p, bytes.size(), i);
    }
  }
  return out;
}

size_t Tokenizer::find_invalid_utf8(std::string_view bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  for (size_t i = 0; i < bytes.size();) {
    if (p[i] < 0x80) { ++i; continue; }
    size_t len = detail::utf8_valid_len(p, bytes.size(), i);
    if (!len) return i;
    i += len;
  }
  return std::string_view::npos;
}

std::vector<std::string> Tokenizer::supported_gguf_pre_tokenizers() {
  std::vector<std::string> out;
  for (const auto& p : detail::kGgufPre) {
    std::istringstream names(p.names);
    for (std::string n; names >> n;) out.push_back(n);
  }
  return out;
}

size_t Tokenizer::cache_size() const {
  std::lock_guard<std::mutex> lock(impl_->cache_mutex);
  return impl_->cache.size();
}

void Tokenizer::clear_cache() const {
  std::lock_guard<std::mutex> lock(impl_->cache_mutex);
  impl_->cache.clear();
}

}  // namespace slowed_examples

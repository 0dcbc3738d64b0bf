#pragma once

// Internals shared by the tokenizer's files; not part of the example library's API (tokenizer.h
// is). The pipeline, file by file:
//   tokenizer_unicode.cpp      UTF-8, the GPT-2 byte alphabet, NFC / NFD (tables in
//                              tokenizer_unicode_data.cpp)
//   tokenizer_pretokenize.cpp  Oniguruma -> PCRE2, Regex, the Split / ByteLevel / Digits steps,
//                              Unicode \w for single_word added tokens
//   tokenizer_bpe.cpp          TokenizerImpl: tables, added-token split, encode, BPE merges and
//                              the piece cache
//   tokenizer_json.cpp         tokenizer.json (+ tokenizer_config.json, generation_config.json)
//   tokenizer_gguf.cpp         tokenizer.ggml.* and the tokenizer.ggml.pre table
//   tokenizer.cpp              the public Tokenizer (encode / decode / accessors)

#include "common/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace slowed_examples {

class GgufFile;

namespace detail {

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

inline void utf8_append(std::string& out, uint32_t cp) {
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

// Unicode White_Space (what Rust's char::is_whitespace and Oniguruma's \s test).
inline bool is_white_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}
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

/// The one alphabet (built on first use).
const ByteAlphabet& byte_alphabet();

// ---------------------------------------------------------------------------------------------
// Regex (tokenizer_pretokenize.cpp)
// ---------------------------------------------------------------------------------------------

/// This thread's PCRE2 match data (one capture pair), shared by every Regex.
pcre2_match_data* thread_match_data();

class Regex {
 public:
  /// Translates (onig_to_pcre2) and compiles; `where` names the pattern's origin in errors.
  Regex(const std::string& onig_pattern, const std::string& where);
  ~Regex();
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
// Pre-tokenizer steps (tokenizer_pretokenize.cpp)
// ---------------------------------------------------------------------------------------------
enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

const char* behavior_name(SplitBehavior b);

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
void apply_split(const PreTokStep& st, const std::vector<Piece>& in, std::vector<Piece>& out);

/// Split(pattern, behavior, invert); `where` names the origin in errors, `name` is for describe().
PreTokStep split_step(const std::string& pattern, SplitBehavior behavior, bool invert,
                      const std::string& where, const std::string& name);
/// ByteLevel(add_prefix_space), with the GPT-2 regex when use_regex.
PreTokStep byte_level_step(bool add_prefix_space, bool use_regex, const std::string& where);
/// Digits(individual_digits).
PreTokStep digits_step(bool individual, const std::string& where);

/// Whether the last / first character of `s` is a word character (Rust regex's Unicode \w),
/// for single_word added tokens.
bool ends_with_word_char(std::string_view s);
bool starts_with_word_char(std::string_view s);

// ---------------------------------------------------------------------------------------------
// The tokenizer state (tokenizer_bpe.cpp)
// ---------------------------------------------------------------------------------------------

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

struct PieceHash {
  size_t operator()(const std::string& s) const noexcept {
    // FNV-1a: short pieces, cheaper than std::hash's murmur for 1-8 bytes.
    uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    return static_cast<size_t>(h ^ (h >> 29));
  }
};

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

  void set_token(int32_t id, const std::string& tok);
  void add_merge(const std::string& a, const std::string& b, size_t rank);
  // Called once every table is filled.
  void finish();

  // ---- encode (tokenizer_bpe.cpp) ---------------------------------------------------------
  // Calls on_text(segment) / on_token(added index) for the pieces of `text` split around
  // added tokens (tokenizers' AddedVocabulary::find_matches).
  template <typename OnText, typename OnToken>
  void split_added(std::string_view text, const AddedTrie& trie, OnText&& on_text,
                   OnToken&& on_token) const;
  // Added tokens, normalizer, pre-tokenizer and BPE of `text`, appended to `out`.
  void encode_text(std::string_view text, std::vector<int32_t>& out) const;
  void pre_tokenize_and_bpe(std::string_view text, std::vector<int32_t>& out) const;
  void bpe_cached(std::string_view piece, std::vector<int32_t>& out) const;
  // (rank, merged id) of a pair, rank = UINT32_MAX when absent.
  std::pair<uint32_t, int32_t> merge_of(int32_t a, int32_t b) const;
  void bpe(std::string_view piece, std::vector<int32_t>& ids) const;
  void merge_ranks(std::vector<int32_t>& syms) const;
  void merge_heap(std::vector<int32_t>& syms) const;
};

inline void add_stop(TokenizerImpl& impl, int32_t id) {
  if (std::find(impl.stop.begin(), impl.stop.end(), id) == impl.stop.end()) impl.stop.push_back(id);
}

/// The loaders (tokenizer_json.cpp, tokenizer_gguf.cpp).
std::shared_ptr<TokenizerImpl> load_tokenizer_json(const std::string& text, const std::string& source);
std::shared_ptr<TokenizerImpl> load_gguf(const GgufFile& f);

}  // namespace detail
}  // namespace slowed_examples

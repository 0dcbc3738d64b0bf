#pragma once

// Byte-level BPE tokenizer (GPT-2 family: SmolLM2, Llama 3, Qwen2, BLOOM) that gives the same
// ids as Hugging Face `tokenizers`, loaded from a tokenizer.json (plus tokenizer_config.json) or
// from the tokenizer.ggml.* metadata of a GGUF file.
//
// Encoding follows `tokenizers`' pipeline:
//   1. added tokens (special or not) are cut out of the raw text first, leftmost-longest match
//      (lstrip / rstrip / single_word as in tokenizers: Unicode \s and \w); tokens marked
//      "normalized" are matched after step 2 instead;
//   2. normalizer (none, NFC, NFD, or a Sequence of them);
//   3. pre-tokenizer: Split(regex, behavior, invert), Digits(individual_digits), ByteLevel
//      (add_prefix_space, use_regex = the GPT-2 regex), or a Sequence of them. Regexes are the
//      Oniguruma patterns of tokenizer.json, run with PCRE2 (UTF + UCP, JIT when available)
//      after a small translation: \s and \S become Unicode White_Space (Oniguruma's meaning;
//      PCRE2's \s misses U+0085) and nested character classes (BLOOM) are flattened;
//   4. BPE on the byte-level spelling of each piece: merges applied lowest rank first,
//      leftmost on ties; `ignore_merges` (Llama 3) takes a whole piece found in the vocabulary;
//      results are cached per piece;
//   5. post-processor: TemplateProcessing (Llama 3 adds <|begin_of_text|>), ByteLevel (no-op
//      on ids), or a Sequence; for a GGUF, tokenizer.ggml.add_bos_token / add_eos_token.
//
// Input text must be valid UTF-8 (HF's input is a Rust String, which cannot hold anything
// else): encode() throws a c10::Error naming the byte offset of the first invalid sequence.
// Tokenizer::replace_invalid_utf8 turns arbitrary bytes into valid UTF-8 the way Rust's
// String::from_utf8_lossy does (one U+FFFD per maximal invalid subpart) for callers that
// prefer replacement to an error.
//
// decode() maps every token back through the byte-level alphabet (a token with characters
// outside it, e.g. a user-defined token from a GGUF, is taken as its UTF-8 text), then turns
// the bytes into text like from_utf8_lossy: a cut multi-byte character becomes U+FFFD. Ids
// outside the vocabulary are skipped, as in HF.
//
// GGUF tokenizer.ggml.pre names understood (llama.cpp's names): see
// Tokenizer::supported_gguf_pre_tokenizers(). "smollm" means Digits(individual) + ByteLevel,
// the SmolLM2 tokenizer.json pre-tokenizer (transformers' own GGUF loader has no entry for
// it); "qwen2" adds Qwen2's NFC normalizer, as its tokenizer.json does.
//
// Thread safety: a Tokenizer is immutable after loading except for the piece cache, which is
// guarded by a mutex; encode/decode may be called from several threads. Copies share state.
//
// Example:
//   auto tok = slowed_examples::Tokenizer::from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf");
//   std::vector<int32_t> ids = tok.encode("Hello world!");          // {19556, 905, 17}
//   std::string text = tok.decode(ids);                            // "Hello world!"
//   auto dir_tok = slowed_examples::Tokenizer::from_directory("Qwen2.5-1.5B");  // tokenizer.json
//                                                                              // + config

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace slowed_examples {

class GgufFile;

/// One entry of tokenizer.json's "added_tokens" (or a GGUF control / user-defined token).
struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool special = false;      // skipped by decode(..., skip_special_tokens = true)
  bool single_word = false;  // only matched when not inside a word
  bool lstrip = false;       // swallows whitespace on its left
  bool rstrip = false;       // swallows whitespace on its right
  bool normalized = false;   // matched in the normalized text instead of the raw text
};

namespace detail {
struct TokenizerImpl;
}

class Tokenizer {
 public:
  /// Loads an HF tokenizer.json file. Special token names (bos/eos/pad/unk) and the chat
  /// template are not part of tokenizer.json: see from_directory.
  static Tokenizer from_tokenizer_json(const std::string& path);
  /// The same from the JSON text; `source` names it in error messages.
  static Tokenizer from_tokenizer_json_string(const std::string& json_text,
                                              const std::string& source = "<tokenizer.json>");
  /// Loads `dir`/tokenizer.json and, when present, `dir`/tokenizer_config.json (bos_token,
  /// eos_token, pad_token, unk_token, chat_template), `dir`/chat_template.jinja (newer
  /// transformers write the template there) and `dir`/generation_config.json (eos_token_id,
  /// one id or a list, added to stop_ids()).
  static Tokenizer from_directory(const std::string& dir);
  /// Loads the tokenizer.ggml.* metadata of a GGUF file (tokenizer.ggml.model must be "gpt2").
  static Tokenizer from_gguf(const std::string& path);
  static Tokenizer from_gguf(const GgufFile& file);

  /// Token ids of `text` (valid UTF-8). add_special_tokens runs the post-processor (e.g. the
  /// BOS of Llama 3), like HF's encode(text, add_special_tokens=True). Special tokens written
  /// in the text are always recognized (HF's default, split_special_tokens=False).
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = true) const;
  /// Text of `ids`; skip_special_tokens drops tokens marked special.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens = false) const;
  /// Byte-level decoding of one id as raw bytes (possibly a partial UTF-8 character), for
  /// streaming output; empty for ids outside the vocabulary.
  std::string token_bytes(int32_t id) const;

  /// Vocabulary size including added tokens (max id + 1).
  int64_t vocab_size() const;
  /// The token string as stored (byte-level spelling, e.g. "Ġworld"); throws when out of range.
  const std::string& id_to_token(int32_t id) const;
  /// Id of a token string (byte-level spelling, or an added token's content).
  std::optional<int32_t> token_to_id(std::string_view token) const;
  bool is_special(int32_t id) const;
  const std::vector<AddedToken>& added_tokens() const;

  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;
  std::optional<int32_t> pad_id() const;
  std::optional<int32_t> unk_id() const;
  /// Ids that end generation: eos plus, for a GGUF, tokenizer.ggml.eot_token_id /
  /// eom_token_id, and for a directory generation_config.json's eos_token_id.
  const std::vector<int32_t>& stop_ids() const;
  /// Whether encode(text, true) prepends bos_id() / appends eos_id().
  bool adds_bos() const;
  bool adds_eos() const;
  /// Jinja source of the chat template ("" when the files carry none).
  const std::string& chat_template() const;
  /// Human-readable description of the pipeline, e.g. "NFC | Split(...) + ByteLevel | BPE".
  std::string describe() const;

  /// Where the tokenizer came from (path), for messages.
  const std::string& source() const;

  /// Rust String::from_utf8_lossy: every maximal invalid subpart becomes U+FFFD.
  static std::string replace_invalid_utf8(std::string_view bytes);
  /// Byte offset of the first invalid UTF-8 sequence, or npos when `bytes` is valid.
  static size_t find_invalid_utf8(std::string_view bytes);
  /// tokenizer.ggml.pre values from_gguf accepts.
  static std::vector<std::string> supported_gguf_pre_tokenizers();

  /// Number of pieces in the encode cache (for tests and benchmarks).
  size_t cache_size() const;
  void clear_cache() const;

 private:
  explicit Tokenizer(std::shared_ptr<detail::TokenizerImpl> impl);
  std::shared_ptr<detail::TokenizerImpl> impl_;
};

namespace detail {
/// Unicode normalization of valid UTF-8 (form "NFC" or "NFD"); exposed for tests.
std::string unicode_normalize(std::string_view text, const std::string& form);
/// The Oniguruma -> PCRE2 pattern translation used for Split regexes; exposed for tests.
std::string onig_to_pcre2(const std::string& pattern);
/// Pieces with at least this many bytes are merged with the heap-based BPE loop (O(n log n)),
/// shorter ones with the rank-array loop (O(n^2), faster on short words). Both must give the
/// same ids; tests set it to 0 / SIZE_MAX to run either path. Process-wide; default 64.
void set_bpe_heap_threshold(size_t bytes);
size_t bpe_heap_threshold();
}  // namespace detail

}  // namespace slowed_examples

// The public Tokenizer: encode / decode, the vocabulary and special tokens, UTF-8 cleaning.
// The loaders are in tokenizer_json.cpp and tokenizer_gguf.cpp, the pipeline in the other
// tokenizer_*.cpp files (tokenizer_internal.h lists them); tokenizer.h is the contract.

#include "common/tokenizer_internal.h"

#include <cstdio>
#include <sstream>

namespace slowed_examples {

Tokenizer::Tokenizer(std::shared_ptr<detail::TokenizerImpl> impl) : impl_(std::move(impl)) {}
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

size_t Tokenizer::cache_size() const {
  std::lock_guard<std::mutex> lock(impl_->cache_mutex);
  return impl_->cache.size();
}

void Tokenizer::clear_cache() const {
  std::lock_guard<std::mutex> lock(impl_->cache_mutex);
  impl_->cache.clear();
}

}  // namespace slowed_examples

// The GGUF tokenizer loader (tokenizer.ggml.*) and the table of tokenizer.ggml.pre names.

#include "common/gguf.h"
#include "common/tokenizer_internal.h"

#include <sstream>

namespace slowed_examples {
namespace detail {

namespace {

const char kLlama3Pattern[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const char kQwen2Pattern[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}"
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const char kBloomPattern[] = " ?[^(\\s|[.,!?\xe2\x80\xa6\xe3\x80\x82\xef\xbc\x8c\xe3\x80\x81"
                             "\xe0\xa5\xa4\xdb\x94\xd8\x8c])]+";  // ... 。，、।۔،

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

}  // namespace detail

Tokenizer Tokenizer::from_gguf(const std::string& path) { return from_gguf(GgufFile::open(path)); }

Tokenizer Tokenizer::from_gguf(const GgufFile& file) { return Tokenizer(detail::load_gguf(file)); }

std::vector<std::string> Tokenizer::supported_gguf_pre_tokenizers() {
  std::vector<std::string> out;
  for (const auto& p : detail::kGgufPre) {
    std::istringstream names(p.names);
    for (std::string n; names >> n;) out.push_back(n);
  }
  return out;
}

}  // namespace slowed_examples

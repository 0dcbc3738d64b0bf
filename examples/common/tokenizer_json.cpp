// The tokenizer.json loader (model, normalizer, pre_tokenizer, post_processor, decoder,
// added_tokens) and Tokenizer::from_directory's tokenizer_config.json / generation_config.json.

#include "common/json.h"
#include "common/tokenizer_internal.h"

#include <climits>
#include <cstring>
#include <fstream>
#include <sstream>

namespace slowed_examples {
namespace detail {

namespace {

std::string read_file(const std::string& path, const char* what) {
  std::ifstream f(path, std::ios::binary);
  TORCH_CHECK(f.good(), what, ": cannot open '", path, "'");
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

bool file_exists(const std::string& path) { return std::ifstream(path).good(); }

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

}  // namespace detail

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

}  // namespace slowed_examples

// Tokenizer and chat templates against Hugging Face `tokenizers` / `transformers` references
// written by tests/fixtures/make_tokenizer_fixtures.py (fixture "tokenizer").
#include <catch2/catch.hpp>

#include "common/chat_template.h"
#include "common/tokenizer.h"

#include <c10/util/Exception.h>

#include "support/files.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <thread>

using namespace slowed_examples;

namespace {

const std::string kDir = std::string(SLOWED_TEST_FIXTURE_DIR) + "/tokenizer";

bool file_exists(const std::string& p) { return std::ifstream(p).good(); }

std::map<std::string, std::string> meta() {
  std::map<std::string, std::string> m;
  for (const auto& l : read_lines(kDir + "/meta.txt")) {
    size_t t = l.find('\t');
    m[l.substr(0, t)] = l.substr(t + 1);
  }
  return m;
}

std::string show_ids(const std::vector<int32_t>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size() && i < 40; ++i) s += std::to_string(ids[i]) + " ";
  if (ids.size() > 40) s += "...";
  return s;
}

std::string escape(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c == '\n') out += "\\n";
    else if (c < 0x20 || c == 0x7F) {
      char b[8];
      std::snprintf(b, sizeof(b), "\\x%02x", c);
      out += b;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

// Counts texts whose ids differ; reports the first few.
int64_t compare_ids(const Tokenizer& tok, const std::vector<std::string>& texts,
                    const std::vector<std::vector<int32_t>>& expected, bool add_special, const std::string& what,
                    const std::function<bool(const std::string&)>& skip = nullptr, int64_t* compared = nullptr) {
  REQUIRE(texts.size() == expected.size());
  int64_t bad = 0, n = 0;
  for (size_t i = 0; i < texts.size(); ++i) {
    if (skip && skip(texts[i])) continue;
    ++n;
    auto ids = tok.encode(texts[i], add_special);
    if (ids != expected[i]) {
      if (++bad <= 5)
        UNSCOPED_INFO(what << " text " << i << " '" << escape(texts[i].substr(0, 200)) << "'\n  ours: "
                           << show_ids(ids) << "\n  HF:   " << show_ids(expected[i]));
    }
  }
  if (compared) *compared = n;
  return bad;
}

bool has_fixtures() {
  if (!file_exists(kDir + "/meta.txt")) {
    WARN("tokenizer fixtures missing in " << kDir << " (run ctest: fixture.tokenizer)");
    return false;
  }
  return true;
}

const char* kNames[] = {"llama3", "qwen2", "bloom", "gpt2", "smollm2"};

}  // namespace

TEST_CASE("byte-level BPE gives the ids of HF tokenizers on the edge texts", "[cpu]") {
  if (!has_fixtures()) return;
  auto m = meta();
  const auto texts = read_texts(kDir + "/texts.edge.txt");
  for (const char* name : kNames) {
    const std::string dir = kDir + "/tokenizers/" + name;
    if (!file_exists(dir + "/tokenizer.json")) {
      WARN("no " << name << " tokenizer in the fixtures (" << dir << ")");
      continue;
    }
    INFO("tokenizer " << name);
    auto tok = Tokenizer::from_directory(dir);
    CHECK(tok.vocab_size() == std::stoll(m[std::string(name) + "_vocab_size"]));
    const std::string base = kDir + "/" + name + ".edge";
    CHECK(compare_ids(tok, texts, read_ids(base + ".ids"), true, name) == 0);
    CHECK(compare_ids(tok, texts, read_ids(base + ".nospecial.ids"), false, name) == 0);
    // Decoding the reference ids.
    const auto ids = read_ids(base + ".ids");
    const auto decoded = read_texts(base + ".decoded");
    const auto decoded_skip = read_texts(base + ".decoded_skip");
    const auto partial = read_texts(base + ".partial_decoded");
    int64_t bad = 0, bad_skip = 0, bad_partial = 0;
    for (size_t i = 0; i < texts.size(); ++i) {
      bad += tok.decode(ids[i], false) != decoded[i];
      bad_skip += tok.decode(ids[i], true) != decoded_skip[i];
      std::vector<int32_t> half(ids[i].begin(), ids[i].begin() + static_cast<std::ptrdiff_t>(ids[i].size() / 2));
      bad_partial += tok.decode(half, false) != partial[i];
    }
    CHECK(bad == 0);
    CHECK(bad_skip == 0);
    CHECK(bad_partial == 0);
    std::cout << "[tokenizer] " << name << ": " << texts.size() << " edge texts x2 (with/without special tokens), "
              << "decode x3, mismatches " << bad + bad_skip + bad_partial << "\n";
  }
}

TEST_CASE("byte-level BPE gives the ids of HF tokenizers on the data texts, and decode round-trips", "[cpu]") {
  if (!has_fixtures()) return;
  auto m = meta();
  if (m["data"] != "present") {
    WARN("data dir missing when the fixtures were made: data texts not compared");
    return;
  }
  const auto texts = read_texts(kDir + "/texts.data.txt");
  for (const char* name : kNames) {
    const std::string dir = kDir + "/tokenizers/" + name;
    if (!file_exists(dir + "/tokenizer.json")) continue;
    INFO("tokenizer " << name);
    auto tok = Tokenizer::from_directory(dir);
    const size_t stride = std::stoul(m[std::string(name) + "_data_stride"]);
    std::vector<std::string> subset;
    for (size_t i = 0; i < texts.size(); i += stride) subset.push_back(texts[i]);
    const auto expected = read_ids(kDir + "/" + name + ".data.ids");
    auto t0 = std::chrono::steady_clock::now();
    CHECK(compare_ids(tok, subset, expected, true, name) == 0);
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    // Round trip: decode(ids, skip_special_tokens) is the text, except where HF's is not (NFC).
    std::map<size_t, std::string> diff;
    for (const auto& l : read_lines(kDir + "/" + name + ".data.decode_diff")) {
      size_t t = l.find('\t');
      diff[std::stoul(l.substr(0, t))] = unescape(l.substr(t + 1));
    }
    int64_t bad = 0;
    for (size_t i = 0; i < subset.size(); ++i) {
      auto it = diff.find(i);
      const std::string& want = it == diff.end() ? subset[i] : it->second;
      bad += tok.decode(expected[i], true) != want;
    }
    CHECK(bad == 0);
    size_t bytes = 0, tokens = 0;
    for (size_t i = 0; i < subset.size(); ++i) bytes += subset[i].size(), tokens += expected[i].size();
    std::cout << "[tokenizer] " << name << ": " << subset.size() << " data texts (" << bytes / 1e6 << " MB, "
              << tokens << " tokens), id mismatches checked, round-trip mismatches " << bad << "; encode "
              << secs << " s incl. cache warm-up\n";
  }
}

TEST_CASE("GGUF tokenizers: SmolLM2 from its GGUF, and llama-bpe / qwen2 / bloom pre-tokenizers", "[cpu]") {
  if (!has_fixtures()) return;
  auto m = meta();
  const auto edge = read_texts(kDir + "/texts.edge.txt");
  const std::string smollm2 = std::string(SLOWED_TEST_MODELS_DIR) + "/SmolLM2-135M-Instruct.Q4_1.gguf";

  SECTION("SmolLM2-135M-Instruct.Q4_1.gguf") {
    if (!file_exists(smollm2) || m["smollm2"] != "present") {
      WARN("SmolLM2 GGUF or its reference ids missing: " << smollm2);
      return;
    }
    auto t_load = std::chrono::steady_clock::now();
    auto tok = Tokenizer::from_gguf(smollm2);
    double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count();
    t_load = std::chrono::steady_clock::now();
    if (file_exists(kDir + "/tokenizers/smollm2/tokenizer.json")) (void)Tokenizer::from_directory(kDir + "/tokenizers/smollm2");
    double load_json_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count();
    std::cout << "[tokenizer] smollm2 load: gguf " << load_s << " s (incl. opening the GGUF), tokenizer.json "
              << load_json_s << " s\n";
    CHECK(tok.vocab_size() == 49152);
    CHECK(tok.bos_id() == 1);
    CHECK(tok.eos_id() == 2);
    CHECK(tok.pad_id() == 2);
    CHECK(tok.unk_id() == 0);
    CHECK_FALSE(tok.adds_bos());
    CHECK(tok.stop_ids() == std::vector<int32_t>{2});
    CHECK(tok.id_to_token(1) == "<|im_start|>");
    CHECK(tok.is_special(1));
    CHECK_FALSE(tok.is_special(17));
    CHECK(tok.token_to_id("<|im_end|>") == 2);
    CHECK(tok.token_to_id("Ġthe").has_value());
    CHECK(tok.encode("Hello world!") == std::vector<int32_t>{19556, 905, 17});
    CHECK(tok.decode({19556, 905, 17}) == "Hello world!");
    CHECK(tok.chat_template().find("<|im_start|>") != std::string::npos);
    CHECK(tok.describe().find("smollm") != std::string::npos);
    CHECK(compare_ids(tok, edge, read_ids(kDir + "/smollm2.edge.ids"), true, "smollm2 gguf") == 0);
    if (m["data"] == "present") {
      const auto data = read_texts(kDir + "/texts.data.txt");
      const auto expected = read_ids(kDir + "/smollm2.data.ids");
      tok.clear_cache();
      auto t0 = std::chrono::steady_clock::now();
      size_t bytes = 0, tokens = 0, bad = 0;
      for (size_t i = 0; i < data.size(); ++i) {
        auto ids = tok.encode(data[i]);
        bytes += data[i].size();
        tokens += ids.size();
        bad += ids != expected[i];
      }
      double cold = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      t0 = std::chrono::steady_clock::now();
      for (const auto& t : data) (void)tok.encode(t);
      double warm = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const size_t cached = tok.cache_size();
      // Without the piece cache: cleared before every text (first 3000 texts).
      size_t nc_bytes = 0, nc_tokens = 0;
      t0 = std::chrono::steady_clock::now();
      for (size_t i = 0; i < data.size() && i < 3000; ++i) {
        tok.clear_cache();
        nc_tokens += tok.encode(data[i]).size();
        nc_bytes += data[i].size();
      }
      double nocache = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::cout << "[tokenizer] smollm2 gguf without the piece cache: " << nc_tokens / nocache / 1e6 << " M tokens/s ("
                << nc_bytes / nocache / 1e6 << " MB/s)\n";
      CHECK(bad == 0);
      std::cout << "[tokenizer] smollm2 gguf: " << data.size() << " data texts, " << bytes / 1e6 << " MB, " << tokens
                << " tokens, mismatches " << bad << "; encode " << tokens / cold / 1e6 << " M tokens/s ("
                << bytes / cold / 1e6 << " MB/s) from an empty cache, " << tokens / warm / 1e6
                << " M tokens/s warm; cache " << cached << " pieces\n";
    }
  }

  SECTION("tensor-less GGUFs with the small vocabularies") {
    for (const char* name : {"llama3", "qwen2", "bloom"}) {
      INFO("gguf " << name);
      const std::string path = kDir + "/tokenizers/" + name + ".gguf";
      REQUIRE(file_exists(path));
      auto gguf = Tokenizer::from_gguf(path);
      auto json = Tokenizer::from_directory(kDir + "/tokenizers/" + name);
      CHECK(gguf.vocab_size() == json.vocab_size());
      CHECK(gguf.bos_id() == json.bos_id());
      CHECK(gguf.eos_id() == json.eos_id());
      CHECK(gguf.adds_bos() == json.adds_bos());
      // <mask> is lstrip in tokenizer.json, which GGUF cannot say.
      auto skip = [](const std::string& t) { return t.find("<mask>") != std::string::npos; };
      int64_t n = 0;
      CHECK(compare_ids(gguf, edge, read_ids(kDir + "/" + name + ".edge.ids"), true, std::string(name) + " gguf",
                        skip, &n) == 0);
      CHECK(n > 2000);
      std::cout << "[tokenizer] " << name << ".gguf (" << gguf.describe() << "): " << n << " edge texts compared\n";
    }
    auto llama = Tokenizer::from_gguf(kDir + "/tokenizers/llama3.gguf");
    CHECK(llama.adds_bos());
    CHECK(llama.stop_ids().size() == 1);  // eos is <|eot_id|> and eot_token_id too
    auto qwen = Tokenizer::from_gguf(kDir + "/tokenizers/qwen2.gguf");
    auto call = qwen.token_to_id("<tool_call>");
    REQUIRE(call.has_value());
    CHECK_FALSE(qwen.is_special(*call));  // user-defined (type 4): added, not special
    CHECK(qwen.decode(qwen.encode("<tool_call>x"), true) == "<tool_call>x");
  }
}

TEST_CASE("the heap and rank-array BPE loops agree", "[cpu]") {
  if (!has_fixtures()) return;
  const auto edge = read_texts(kDir + "/texts.edge.txt");
  const size_t saved = slowed_examples::detail::bpe_heap_threshold();
  for (const char* name : {"llama3", "smollm2"}) {
    const std::string dir = kDir + "/tokenizers/" + name;
    if (!file_exists(dir + "/tokenizer.json")) continue;
    auto tok = Tokenizer::from_directory(dir);
    const auto expected = read_ids(kDir + "/" + name + ".edge.ids");
    for (size_t threshold : {size_t(0), size_t(-1)}) {
      INFO(name << " threshold " << threshold);
      slowed_examples::detail::set_bpe_heap_threshold(threshold);
      tok.clear_cache();
      CHECK(compare_ids(tok, edge, expected, true, name) == 0);
    }
  }
  slowed_examples::detail::set_bpe_heap_threshold(saved);
  // A long word (heap path by default) and the same with the rank-array loop.
  auto path = kDir + "/tokenizers/smollm2/tokenizer.json";
  if (!file_exists(path)) return;
  auto tok = Tokenizer::from_tokenizer_json(path);
  std::string word;
  for (int i = 0; i < 2000; ++i) word += "abc"[i % 3];
  auto heap_ids = tok.encode(word);
  slowed_examples::detail::set_bpe_heap_threshold(size_t(-1));
  tok.clear_cache();
  CHECK(tok.encode(word) == heap_ids);
  slowed_examples::detail::set_bpe_heap_threshold(saved);
  CHECK(tok.decode(heap_ids) == word);
}

TEST_CASE("encode is thread-safe and deterministic", "[cpu]") {
  if (!has_fixtures()) return;
  auto path = kDir + "/tokenizers/qwen2";
  auto tok = Tokenizer::from_directory(path);
  const auto edge = read_texts(kDir + "/texts.edge.txt");
  const auto expected = read_ids(kDir + "/qwen2.edge.ids");
  std::vector<int64_t> bad(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (size_t i = static_cast<size_t>(t); i < edge.size() * 2; i += 3)
        bad[static_cast<size_t>(t)] += tok.encode(edge[i % edge.size()]) != expected[i % edge.size()];
    });
  for (auto& th : threads) th.join();
  CHECK(bad == std::vector<int64_t>(4, 0));
}

TEST_CASE("invalid UTF-8: encode rejects it, replace_invalid_utf8 matches from_utf8_lossy", "[cpu]") {
  CHECK(Tokenizer::find_invalid_utf8("abc\xC3\xA9") == std::string::npos);
  CHECK(Tokenizer::find_invalid_utf8("ab\xFF") == 2);
  CHECK(Tokenizer::replace_invalid_utf8("a\xF0\x9F\x98" "b") == "a\xEF\xBF\xBD" "b");
  if (!has_fixtures()) return;
  int64_t n = 0;
  for (const auto& l : read_lines(kDir + "/utf8_cases.txt")) {
    size_t t = l.find('\t');
    std::string hex = l.substr(0, t), bytes;
    for (size_t i = 0; i + 1 < hex.size(); i += 2) bytes += static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16));
    INFO("bytes " << hex);
    CHECK(Tokenizer::replace_invalid_utf8(bytes) == unescape(l.substr(t + 1)));
    CHECK((Tokenizer::find_invalid_utf8(bytes) == std::string::npos) ==
          (Tokenizer::replace_invalid_utf8(bytes) == bytes));
    ++n;
  }
  CHECK(n > 300);
  auto tok = Tokenizer::from_directory(kDir + "/tokenizers/bloom");
  CHECK_THROWS_WITH(tok.encode("ok \xE2\x82 bad"), Catch::Contains("not valid UTF-8") &&
                                                      Catch::Contains("byte offset 3") &&
                                                      Catch::Contains("0xE2"));
  CHECK_THROWS_AS(tok.encode("\xED\xA0\x80"), c10::Error);  // a UTF-16 surrogate
  CHECK(tok.decode(tok.encode(Tokenizer::replace_invalid_utf8("x\xFFy"))) == "x\xEF\xBF\xBDy");
  // Out-of-vocabulary ids are skipped, as in HF.
  CHECK(tok.decode({-1, static_cast<int32_t>(tok.vocab_size()), 1000000}) == "");
}

TEST_CASE("NFC and NFD normalization agree with Python's unicodedata", "[cpu]") {
  if (!has_fixtures()) return;
  int64_t bad_nfc = 0, bad_nfd = 0, n = 0;
  for (const auto& l : read_lines(kDir + "/normalize.txt")) {
    size_t a = l.find('\t'), b = l.find('\t', a + 1);
    std::string text = unescape(l.substr(0, a)), nfc = unescape(l.substr(a + 1, b - a - 1)),
                nfd = unescape(l.substr(b + 1));
    bad_nfc += slowed_examples::detail::unicode_normalize(text, "NFC") != nfc;
    bad_nfd += slowed_examples::detail::unicode_normalize(text, "NFD") != nfd;
    ++n;
  }
  CHECK(n > 3000);
  CHECK(bad_nfc == 0);
  CHECK(bad_nfd == 0);
  CHECK(slowed_examples::detail::unicode_normalize("e\xCC\x81", "NFC") == "\xC3\xA9");  // e + U+0301 -> é
  CHECK(slowed_examples::detail::unicode_normalize("\xED\x95\x9C", "NFD") == "\xE1\x84\x92\xE1\x85\xA1\xE1\x86\xAB");  // 한
}

TEST_CASE("Oniguruma patterns are translated for PCRE2", "[cpu]") {
  // BLOOM's nested class flattens into one class; \s becomes Unicode White_Space.
  auto bloom = slowed_examples::detail::onig_to_pcre2(" ?[^(\\s|[.,!?])]+");
  CHECK(bloom.find("[^(") != std::string::npos);
  CHECK(bloom.find("|.,!?)]+") != std::string::npos);
  CHECK(bloom.find("\\x{85}") != std::string::npos);
  CHECK(slowed_examples::detail::onig_to_pcre2("\\s+(?!\\S)").find("(?![^") != std::string::npos);
  CHECK(slowed_examples::detail::onig_to_pcre2("\\p{L}+|\\p{N}{1,3}") == "\\p{L}+|\\p{N}{1,3}");
  CHECK_THROWS_WITH(slowed_examples::detail::onig_to_pcre2("[a[^b]]"), Catch::Contains("negated nested"));
  CHECK_THROWS_WITH(slowed_examples::detail::onig_to_pcre2("\\h+"), Catch::Contains("\\h"));
}

TEST_CASE("special and added tokens are matched before pre-tokenization", "[cpu]") {
  if (!has_fixtures()) return;
  auto qwen = Tokenizer::from_directory(kDir + "/tokenizers/qwen2");
  const int32_t start = *qwen.token_to_id("<|im_start|>"), end = *qwen.token_to_id("<|im_end|>");
  auto ids = qwen.encode("<|im_start|>user\nhi<|im_end|>");
  REQUIRE(ids.size() >= 3);
  CHECK(ids.front() == start);
  CHECK(ids.back() == end);
  CHECK(qwen.decode(ids, true) == "user\nhi");
  CHECK(qwen.decode(ids, false) == "<|im_start|>user\nhi<|im_end|>");
  CHECK(qwen.is_special(start));
  CHECK_FALSE(qwen.adds_bos());
  CHECK(qwen.eos_id() == end);
  CHECK(qwen.pad_id() == qwen.token_to_id("<|endoftext|>"));
  // lstrip: "<mask>" swallows the spaces on its left.
  const int32_t mask = *qwen.token_to_id("<mask>");
  auto a = qwen.encode("a   <mask>b");
  auto b = qwen.encode("a<mask>b");
  CHECK(a == b);
  CHECK(std::count(a.begin(), a.end(), mask) == 1);
  // A cut special token is ordinary text.
  auto cut = qwen.encode("<|im_sta");
  CHECK(std::find(cut.begin(), cut.end(), start) == cut.end());
  // Llama 3: the post-processor adds <|begin_of_text|>.
  auto llama = Tokenizer::from_directory(kDir + "/tokenizers/llama3");
  const int32_t bos = *llama.token_to_id("<|begin_of_text|>");
  CHECK(llama.bos_id() == bos);
  CHECK(llama.adds_bos());
  CHECK(llama.encode("hi").front() == bos);
  CHECK(llama.encode("hi", false).front() != bos);
  CHECK(llama.decode(llama.encode("hi"), true) == "hi");
  CHECK(llama.decode(llama.encode("hi"), false) == "<|begin_of_text|>hi");
}

TEST_CASE("chat templates render like transformers' apply_chat_template", "[cpu]") {
  if (!has_fixtures()) return;
  const auto lines = read_lines(kDir + "/chat/cases.txt");
  int64_t cases = 0;
  std::map<std::string, std::string> templates;
  for (size_t i = 0; i < lines.size();) {
    std::istringstream head(lines[i]);
    std::vector<std::string> f;
    for (std::string x; std::getline(head, x, '\t');) f.push_back(x);
    REQUIRE(f.size() >= 5);
    REQUIRE(f[0] == "case");
    const std::string name = f[1];
    const bool gen = f[3] == "1";
    const std::string date = f.size() > 5 ? f[4] : "";
    const size_t n = std::stoul(f.back());
    std::vector<ChatMessage> msgs;
    for (size_t k = 0; k < n; ++k) {
      const std::string& l = lines[i + 1 + k];
      size_t a = l.find('\t'), b = l.find('\t', a + 1);
      msgs.push_back({l.substr(a + 1, b - a - 1), unescape(l.substr(b + 1))});
    }
    const std::string expected = unescape(lines[i + 1 + n].substr(std::string("expected\t").size()));
    i += n + 2;
    if (!templates.count(name)) {
      std::ifstream f(kDir + "/chat/" + name + ".jinja", std::ios::binary);
      std::ostringstream ss;
      ss << f.rdbuf();
      templates[name] = ss.str();
    }
    const std::string bos = name.rfind("llama", 0) == 0 ? "<|begin_of_text|>" : "";
    INFO("template " << name << " case " << f[2] << " add_generation_prompt " << gen);
    auto t = ChatTemplate::from_template(templates[name], bos, name);
    std::string got = t.apply(msgs, ChatTemplateOptions().with_add_generation_prompt(gen).with_date_string(date));
    CHECK(escape(got) == escape(expected));
    ++cases;
  }
  CHECK(cases >= 60);
  std::cout << "[tokenizer] chat templates: " << cases << " cases over " << templates.size() << " templates\n";

  auto qwen = ChatTemplate::from_template(templates["qwen2.5_instruct"]);
  CHECK(qwen.format() == ChatFormat::ChatML);
  CHECK(qwen.default_system_prompt() == std::string("You are Qwen, created by Alibaba Cloud. You are a helpful assistant."));
  CHECK(ChatTemplate::from_template(templates["chatml_plain"]).default_system_prompt() == std::nullopt);
  auto l32 = ChatTemplate::from_template(templates["llama3.2"], "<|begin_of_text|>");
  CHECK(l32.format() == ChatFormat::Llama31);
  CHECK(l32.uses_today_date());
  CHECK(ChatTemplate::from_template(templates["llama3.1"], "<|begin_of_text|>").uses_today_date() == false);
  CHECK(ChatTemplate::from_template(templates["llama3"], "<|begin_of_text|>").format() == ChatFormat::Llama3);
  // Today's date when none is given (Llama 3.2 calls strftime_now).
  std::string today = l32.apply({{"user", "hi"}});
  CHECK(today.find("Today Date: ") != std::string::npos);
  CHECK(today.find("Today Date: 26 Jul 2024") == std::string::npos);

  const std::string smollm2 = std::string(SLOWED_TEST_MODELS_DIR) + "/SmolLM2-135M-Instruct.Q4_1.gguf";
  if (file_exists(smollm2)) {
    auto tok = Tokenizer::from_gguf(smollm2);
    auto chat = ChatTemplate::from_tokenizer(tok);
    CHECK(chat.default_system_prompt() == std::string("You are a helpful AI assistant named SmolLM, trained by Hugging Face"));
    std::string s = apply_chat_template(tok, {{"user", "What is 2 + 2?"}});
    CHECK(s == "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
               "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n");
    auto ids = tok.encode(s, false);
    CHECK(ids.front() == 1);
    CHECK(std::count(ids.begin(), ids.end(), 2) == 2);
  }
  // BLOOM has no template: an error by default, the Plain format on request.
  auto bloom = Tokenizer::from_directory(kDir + "/tokenizers/bloom");
  CHECK(bloom.chat_template().empty());
  CHECK_THROWS_WITH(ChatTemplate::from_tokenizer(bloom), Catch::Contains("no chat template"));
  auto plain = ChatTemplate::from_tokenizer(bloom, /*plain_if_missing=*/true);
  CHECK(plain.format() == ChatFormat::Plain);
  CHECK(plain.apply({{"user", "Q:1+1?\n\nA:"}}) == "Q:1+1?\n\nA:");
  CHECK(plain.apply({{"system", "S"}, {"user", "Q"}, {"assistant", "R"}}) == "S\n\nQ R</s>");
  auto plain_ids = bloom.encode(plain.apply({{"user", "Q"}, {"assistant", "R"}}), false);
  CHECK(plain_ids.back() == bloom.eos_id());
  // Bad input.
  CHECK_THROWS_WITH(ChatTemplate::from_template("", "", "bloom/tokenizer_config.json"),
                    Catch::Contains("bloom/tokenizer_config.json") && Catch::Contains("no chat template"));
  CHECK_THROWS_WITH(ChatTemplate::from_template("{{ messages }}", "", "x.jinja"),
                    Catch::Contains("x.jinja") && Catch::Contains("unrecognized"));
  CHECK_THROWS_WITH(qwen.apply({{"tool", "x"}}), Catch::Contains("'tool'"));
  CHECK_THROWS_WITH(qwen.apply({}), Catch::Contains("empty"));
}

TEST_CASE("bad input gives clear errors", "[cpu]") {
  CHECK_THROWS_WITH(Tokenizer::from_tokenizer_json("/nonexistent/tokenizer.json"),
                    Catch::Contains("/nonexistent/tokenizer.json"));
  CHECK_THROWS_WITH(Tokenizer::from_directory("/nonexistent/dir"), Catch::Contains("/nonexistent/dir"));
  CHECK_THROWS_WITH(Tokenizer::from_gguf("/nonexistent/model.gguf"), Catch::Contains("/nonexistent/model.gguf"));
  CHECK_THROWS_WITH(Tokenizer::from_tokenizer_json_string("{\"model\": {\"type\": \"BPE\", ", "trunc.json"),
                    Catch::Contains("trunc.json"));
  const std::string ok_model = R"("model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]})";
  const std::string byte_level = R"({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true})";
  CHECK_THROWS_WITH(Tokenizer::from_tokenizer_json_string(
                        R"({"model": {"type": "WordPiece", "vocab": {}}})", "wp.json"),
                    Catch::Contains("wp.json") && Catch::Contains("WordPiece"));
  CHECK_THROWS_WITH(Tokenizer::from_tokenizer_json_string(
                        "{" + ok_model + R"(, "pre_tokenizer": {"type": "Whitespace"}})", "ws.json"),
                    Catch::Contains("ws.json") && Catch::Contains("'Whitespace'"));
  CHECK_THROWS_WITH(Tokenizer::from_tokenizer_json_string(
                        "{" + ok_model + R"(, "normalizer": {"type": "NFKC"}, "pre_tokenizer": )" + byte_level + "}",
                        "nfkc.json"),
                    Catch::Contains("'NFKC'"));
  CHECK_THROWS_WITH(Tokenizer::from_tokenizer_json_string(
                        R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}, "pre_tokenizer": )" +
                            byte_level + "}",
                        "merge.json"),
                    Catch::Contains("merge.json") && Catch::Contains("'a b'"));
  CHECK_THROWS_WITH(Tokenizer::from_tokenizer_json_string(
                        "{" + ok_model + R"(, "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(a"},
                        "behavior": "Isolated", "invert": false}})",
                        "re.json"),
                    Catch::Contains("re.json") && Catch::Contains("(a"));
  CHECK_THROWS_WITH(Tokenizer::from_tokenizer_json_string("{" + ok_model + "}", "nobl.json"),
                    Catch::Contains("ByteLevel"));
  // A minimal valid one works.
  auto tiny = Tokenizer::from_tokenizer_json_string("{" + ok_model + R"(, "pre_tokenizer": )" + byte_level +
                                                    R"(, "decoder": {"type": "ByteLevel"}})");
  CHECK(tiny.encode("ab ab") == std::vector<int32_t>{2, 2});  // " " is not in the vocabulary: dropped, as HF
  if (!has_fixtures()) return;
  CHECK_THROWS_WITH(Tokenizer::from_gguf(kDir + "/tokenizers/bad_pre.gguf"),
                    Catch::Contains("bad_pre.gguf") && Catch::Contains("'mystery-pre'") &&
                        Catch::Contains("tokenizer.ggml.pre") && Catch::Contains("llama-bpe"));
  CHECK_THROWS_WITH(Tokenizer::from_gguf(kDir + "/tokenizers/bad_model.gguf"),
                    Catch::Contains("bad_model.gguf") && Catch::Contains("'llama'"));
}

TEST_CASE("token ids out of range give a c10::Error naming the entry, never wrap or exhaust memory",
          "[cpu]") {
  // Regression: added-token ids above 2^32 wrapped to small ids silently, ids near 2^31 made
  // the reader allocate one slot per id up to them (std::bad_alloc).
  const std::string model = R"("model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]})";
  const std::string rest = R"(, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
                             "decoder": {"type": "ByteLevel"}})";
  auto with_added = [&](const std::string& id) {
    return "{" + model + R"(, "added_tokens": [{"id": )" + id + R"(, "content": "<x>", "special": true}])" + rest;
  };
  for (const char* id : {"4294967301", "2147483646", "-1", "70000", "1e300"}) {
    INFO("id " << id);
    CHECK_THROWS_AS(Tokenizer::from_tokenizer_json_string(with_added(id), "ids.json"), c10::Error);
  }
  CHECK_THROWS_WITH(Tokenizer::from_tokenizer_json_string(with_added("4294967301"), "ids.json"),
                    Catch::Contains("ids.json") && Catch::Contains("added_tokens[0].id = 4294967301") &&
                        Catch::Contains("out of range"));
  // Inside the range: accepted, and the id is the one written.
  auto ok = Tokenizer::from_tokenizer_json_string(with_added("3"), "ids.json");
  CHECK(ok.encode("<x>ab") == std::vector<int32_t>{3, 2});
  // The same rule for model.vocab ids and the post-processor's special token ids.
  CHECK_THROWS_WITH(Tokenizer::from_tokenizer_json_string(
                        R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 2147483000}, "merges": []})" + rest,
                        "vocab.json"),
                    Catch::Contains("model.vocab['b'] = 2147483000") && Catch::Contains("out of range"));
  CHECK_THROWS_WITH(Tokenizer::from_tokenizer_json_string(
                        "{" + model + R"(, "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [4294967296], "tokens": ["<s>"]}}})" + rest,
                        "post.json"),
                    Catch::Contains("post.json") && Catch::Contains("out of range"));
}

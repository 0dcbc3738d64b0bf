// Chat templates: format recognition from the Jinja source and the two renderers (ChatML,
// Llama 3 / 3.1+). See chat_template.h for the exact strings.

#include "common/chat_template.h"

#include "common/tokenizer.h"

#include <c10/util/Exception.h>

#include <ctime>

namespace slowed_examples {

const char* chat_format_name(ChatFormat f) {
  switch (f) {
    case ChatFormat::ChatML: return "ChatML";
    case ChatFormat::Llama3: return "Llama 3";
    case ChatFormat::Llama31: return "Llama 3.1";
    default: return "Plain";
  }
}

namespace detail {

namespace {

// Python str.isspace() for the code points of valid UTF-8 starting at s[i]; returns the byte
// length of the whitespace character or 0.
size_t python_space_len(const std::string& s, size_t i) {
  unsigned char c = static_cast<unsigned char>(s[i]);
  if ((c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20)) return 1;
  if (c < 0x80) return 0;
  uint32_t cp = 0;
  size_t len = c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
  if (i + len > s.size()) return 0;
  if (len == 2) cp = ((c & 0x1Fu) << 6) | (static_cast<unsigned char>(s[i + 1]) & 0x3Fu);
  else if (len == 3)
    cp = ((c & 0x0Fu) << 12) | ((static_cast<unsigned char>(s[i + 1]) & 0x3Fu) << 6) |
         (static_cast<unsigned char>(s[i + 2]) & 0x3Fu);
  else
    return 0;
  bool space = cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) ||
               cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
  return space ? len : 0;
}

// Unescapes a Jinja string literal body (\n, \t, \r, \\, \', \").
std::string jinja_unescape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size()) {
      char e = s[++i];
      switch (e) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        default: out += e;
      }
    } else {
      out += s[i];
    }
  }
  return out;
}

// The text after `marker` + a newline (real or escaped) up to `end`, when it is a plain literal
// (no quote, no Jinja expression); each occurrence of the marker is tried in order.
std::optional<std::string> literal_after(const std::string& t, const std::string& marker, const std::string& end) {
  for (size_t pos = t.find(marker); pos != std::string::npos; pos = t.find(marker, pos + 1)) {
    size_t b = pos + marker.size();
    if (t.compare(b, 1, "\n") == 0) b += 1;
    else if (t.compare(b, 2, "\\n") == 0) b += 2;
    else continue;
    size_t e = t.find(end, b);
    if (e == std::string::npos) continue;
    std::string body = t.substr(b, e - b);
    if (body.find_first_of("'\"{}+") != std::string::npos) continue;
    return jinja_unescape(body);
  }
  return std::nullopt;
}

// The quoted literal that follows `prefix` (e.g. `Cutting Knowledge Date: ` up to the closing
// escape), or nullopt.
std::optional<std::string> literal_until_escape(const std::string& t, const std::string& prefix) {
  size_t pos = t.find(prefix);
  if (pos == std::string::npos) return std::nullopt;
  size_t b = pos + prefix.size();
  size_t e = t.find_first_of("\\\n\"'", b);
  if (e == std::string::npos) return std::nullopt;
  return t.substr(b, e - b);
}

}  // namespace

std::string jinja_trim(const std::string& s) {
  size_t b = 0;
  while (b < s.size()) {
    size_t n = python_space_len(s, b);
    if (!n) break;
    b += n;
  }
  size_t e = s.size();
  while (e > b) {
    // Step back one UTF-8 character.
    size_t k = e - 1;
    while (k > b && (static_cast<unsigned char>(s[k]) & 0xC0) == 0x80) --k;
    size_t n = python_space_len(s, k);
    if (!n || k + n != e) break;
    e = k;
  }
  return s.substr(b, e - b);
}

}  // namespace detail

ChatTemplate ChatTemplate::from_template(const std::string& jinja, const std::string& bos_token,
                                         const std::string& source) {
  TORCH_CHECK(!jinja.empty(), source, ": there is no chat template (tokenizer.chat_template / chat_template "
              "is empty); base models such as BLOOM have none");
  ChatTemplate t;
  t.bos_ = bos_token;
  if (jinja.find("<|im_start|>") != std::string::npos) {
    t.format_ = ChatFormat::ChatML;
    t.default_system_ = detail::literal_after(jinja, "<|im_start|>system", "<|im_end|>");
    return t;
  }
  if (jinja.find("<|start_header_id|>") != std::string::npos) {
    if (jinja.find("Cutting Knowledge Date") != std::string::npos) {
      t.format_ = ChatFormat::Llama31;
      t.uses_strftime_ = jinja.find("strftime_now") != std::string::npos;
      auto kd = detail::literal_until_escape(jinja, "Cutting Knowledge Date: ");
      TORCH_CHECK(!kd || *kd == "December 2023", source, ": Llama 3.1 template with knowledge date '",
                  kd ? *kd : "", "' (expected 'December 2023'); not supported");
      auto fallback = detail::literal_until_escape(jinja, "set date_string = \"");
      TORCH_CHECK(!fallback || *fallback == "26 Jul 2024", source, ": Llama 3.1 template with default date '",
                  fallback ? *fallback : "", "' (expected '26 Jul 2024'); not supported");
    } else {
      t.format_ = ChatFormat::Llama3;
    }
    TORCH_CHECK(!bos_token.empty() || jinja.find("bos_token") == std::string::npos, source,
                ": the Llama 3 template writes {{ bos_token }} but no BOS token text was given");
    return t;
  }
  TORCH_CHECK(false, source, ": unrecognized chat template (neither ChatML <|im_start|> nor Llama 3 "
              "<|start_header_id|>); first 120 bytes: '", jinja.substr(0, 120), "'");
  return t;
}

ChatTemplate ChatTemplate::from_tokenizer(const Tokenizer& tokenizer, bool plain_if_missing) {
  if (tokenizer.chat_template().empty() && plain_if_missing) {
    TORCH_CHECK(tokenizer.eos_id(), tokenizer.source(),
                ": no chat template and no EOS token; the Plain format needs the EOS text");
    return from_format(ChatFormat::Plain, tokenizer.id_to_token(*tokenizer.eos_id()));
  }
  std::string bos;
  if (auto id = tokenizer.bos_id()) bos = tokenizer.id_to_token(*id);
  return from_template(tokenizer.chat_template(), bos, tokenizer.source() + ": chat template");
}

ChatTemplate ChatTemplate::from_format(ChatFormat format, const std::string& special_token,
                                       std::optional<std::string> default_system) {
  ChatTemplate t;
  t.format_ = format;
  t.bos_ = special_token;
  t.default_system_ = std::move(default_system);
  return t;
}

std::string ChatTemplate::apply(const std::vector<ChatMessage>& messages, const ChatTemplateOptions& options) const {
  TORCH_CHECK(!messages.empty(), "ChatTemplate::apply: messages is empty");
  for (size_t i = 0; i < messages.size(); ++i) {
    const auto& r = messages[i].role;
    TORCH_CHECK(r == "system" || r == "user" || r == "assistant", "ChatTemplate::apply: messages[", i,
                "].role is '", r, "' (expected system, user or assistant)");
  }
  std::string out;
  if (format_ == ChatFormat::Plain) {
    if (default_system_ && messages[0].role != "system") out += *default_system_;
    for (const auto& m : messages) {
      if (m.role == "assistant") {
        out += " " + m.content + bos_;
      } else {
        if (!out.empty()) out += "\n\n";
        out += m.content;
      }
    }
    return out;
  }
  if (format_ == ChatFormat::ChatML) {
    if (default_system_ && messages[0].role != "system")
      out += "<|im_start|>system\n" + *default_system_ + "<|im_end|>\n";
    for (const auto& m : messages) out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
    if (options.add_generation_prompt) out += "<|im_start|>assistant\n";
    return out;
  }
  auto block = [](const std::string& role, const std::string& content) {
    return "<|start_header_id|>" + role + "<|end_header_id|>\n\n" + content + "<|eot_id|>";
  };
  out += bos_;
  size_t first = 0;
  if (format_ == ChatFormat::Llama31) {
    std::string system;
    if (messages[0].role == "system") {
      system = detail::jinja_trim(messages[0].content);
      first = 1;
    }
    std::string date = options.date_string;
    if (date.empty()) {
      if (uses_strftime_) {
        std::time_t now = std::time(nullptr);
        std::tm tm{};
        localtime_r(&now, &tm);
        char buf[32];
        std::strftime(buf, sizeof(buf), "%d %b %Y", &tm);
        date = buf;
      } else {
        date = "26 Jul 2024";
      }
    }
    out += block("system", "Cutting Knowledge Date: December 2023\nToday Date: " + date + "\n\n" + system);
  }
  for (size_t i = first; i < messages.size(); ++i)
    out += block(messages[i].role, detail::jinja_trim(messages[i].content));
  if (options.add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  return out;
}

std::string apply_chat_template(const Tokenizer& tokenizer, const std::vector<ChatMessage>& messages,
                                const ChatTemplateOptions& options) {
  return ChatTemplate::from_tokenizer(tokenizer).apply(messages, options);
}

}  // namespace slowed_examples

// Pre-tokenization: the Oniguruma -> PCRE2 translation, Regex, the Split / ByteLevel / Digits
// steps (tokenizers' PreTokenizedString::split), and Unicode \w for single_word added tokens.

#include "common/tokenizer_internal.h"

namespace slowed_examples {
namespace detail {

namespace {

const char kWhiteSpaceClass[] =
    "\\x{9}-\\x{D}\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}"
    "\\x{205F}\\x{3000}";

const char kGpt2Pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

}  // namespace

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

}  // namespace

pcre2_match_data* thread_match_data() {
  thread_local std::unique_ptr<pcre2_match_data, MatchDataDeleter> md(pcre2_match_data_create(1, nullptr));
  return md.get();
}

Regex::Regex(const std::string& onig_pattern, const std::string& where) : source_(onig_pattern) {
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
Regex::~Regex() { pcre2_code_free(code_); }

const char* behavior_name(SplitBehavior b) {
  switch (b) {
    case SplitBehavior::Removed: return "Removed";
    case SplitBehavior::Isolated: return "Isolated";
    case SplitBehavior::MergedWithPrevious: return "MergedWithPrevious";
    case SplitBehavior::MergedWithNext: return "MergedWithNext";
    default: return "Contiguous";
  }
}

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
    // Emits runs of consecutive parts: a part joins the open run when join(the part is a match,
    // the run began with a match).
    auto emit_runs = [&](auto join) {
      size_t b = 0, e = 0;
      bool open = false, open_is_match = false;
      for (auto& x : parts) {
        if (open && join(x.second, open_is_match)) {
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
    };
    switch (st.behavior) {
      case SplitBehavior::Isolated:
        for (auto& x : parts) emit(x.first.first, x.first.second);
        break;
      case SplitBehavior::Removed:
        for (auto& x : parts)
          if (!x.second) emit(x.first.first, x.first.second);
        break;
      case SplitBehavior::MergedWithPrevious:
        // A match joins the piece before it.
        emit_runs([](bool match, bool) { return match; });
        break;
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
      case SplitBehavior::Contiguous:
        // Consecutive matches form one piece.
        emit_runs([](bool match, bool run_is_match) { return match && run_is_match; });
        break;
    }
  }
}

namespace {

// Word characters for single_word added tokens: Rust regex's Unicode \w, which tokenizers
// uses (^\w / \w$): Alphabetic, marks, decimal digits, connector punctuation, joiners.
const Regex& word_char_regex() {
  static const Regex r("[\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\p{Join_Control}]", "single_word");
  return r;
}

}  // namespace

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

namespace {

std::shared_ptr<Regex> make_regex(const std::string& pattern, const std::string& where) {
  return std::make_shared<Regex>(pattern, where);
}

}  // namespace

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

}  // namespace detail
}  // namespace slowed_examples

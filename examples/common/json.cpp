#include "common/json.h"

#include <c10/util/Exception.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <unordered_map>

namespace slowed_examples {
namespace json {

struct Value::ObjectData {
  std::vector<Member> members;
  std::unordered_map<std::string, size_t> index;  // key -> position of its last occurrence
};

Value Value::make_bool(bool b) {
  Value v;
  v.type_ = Type::Bool;
  v.bool_ = b;
  return v;
}
Value Value::make_number(double d) {
  Value v;
  v.type_ = Type::Number;
  v.number_ = d;
  return v;
}
Value Value::make_int(int64_t i) {
  Value v;
  v.type_ = Type::Number;
  v.is_int_ = true;
  v.int_ = i;
  v.number_ = static_cast<double>(i);
  return v;
}
Value Value::make_string(std::string s) {
  Value v;
  v.type_ = Type::String;
  v.string_ = std::make_shared<const std::string>(std::move(s));
  return v;
}
Value Value::make_array(std::vector<Value> items) {
  Value v;
  v.type_ = Type::Array;
  v.array_ = std::make_shared<const std::vector<Value>>(std::move(items));
  return v;
}
Value Value::make_object(std::vector<Member> members) {
  auto data = std::make_shared<ObjectData>();
  data->members = std::move(members);
  data->index.reserve(data->members.size());
  for (size_t i = 0; i < data->members.size(); ++i) data->index[data->members[i].first] = i;
  Value v;
  v.type_ = Type::Object;
  v.object_ = std::move(data);
  return v;
}

const char* Value::type_name() const {
  switch (type_) {
    case Type::Null: return "null";
    case Type::Bool: return "bool";
    case Type::Number: return "number";
    case Type::String: return "string";
    case Type::Array: return "array";
    case Type::Object: return "object";
  }
  return "?";
}

namespace {
std::string preview(const Value& v) {
  std::string s = v.dump();
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return s;
}
}  // namespace

bool Value::as_bool() const {
  TORCH_CHECK(is_bool(), "json: expected a bool, got ", type_name(), " ", preview(*this));
  return bool_;
}
double Value::as_double() const {
  TORCH_CHECK(is_number(), "json: expected a number, got ", type_name(), " ", preview(*this));
  return number_;
}
int64_t Value::as_int() const {
  TORCH_CHECK(is_number(), "json: expected an integer, got ", type_name(), " ", preview(*this));
  if (is_int_) return int_;
  TORCH_CHECK(std::isfinite(number_) && std::floor(number_) == number_ &&
                  std::fabs(number_) < 9.2e18,
              "json: expected an integer, got ", preview(*this));
  return static_cast<int64_t>(number_);
}
const std::string& Value::as_string() const {
  TORCH_CHECK(is_string(), "json: expected a string, got ", type_name(), " ", preview(*this));
  return *string_;
}
size_t Value::size() const {
  if (is_array()) return array_->size();
  if (is_object()) return object_->members.size();
  TORCH_CHECK(false, "json: size() of a ", type_name(), " (expected an array or object)");
}
const Value& Value::at(size_t index) const {
  TORCH_CHECK(is_array(), "json: index [", index, "] into a ", type_name(), " (expected an array)");
  TORCH_CHECK(index < array_->size(), "json: index ", index, " out of range for an array of ",
              array_->size(), " elements");
  return (*array_)[index];
}
const Value* Value::find(const std::string& key) const {
  TORCH_CHECK(is_object(), "json: key '", key, "' looked up in a ", type_name(),
              " (expected an object)");
  auto it = object_->index.find(key);
  return it == object_->index.end() ? nullptr : &object_->members[it->second].second;
}
const Value& Value::at(const std::string& key) const {
  const Value* v = find(key);
  if (v == nullptr) {
    std::string keys;
    for (size_t i = 0; i < object_->members.size() && i < 12; ++i)
      keys += (i ? ", " : "") + object_->members[i].first;
    if (object_->members.size() > 12) keys += ", ...";
    TORCH_CHECK(false, "json: key '", key, "' not found (object has: ", keys, ")");
  }
  return *v;
}
bool Value::contains(const std::string& key) const { return find(key) != nullptr; }
const std::vector<Member>& Value::items() const {
  TORCH_CHECK(is_object(), "json: items() of a ", type_name(), " (expected an object)");
  return object_->members;
}
const std::vector<Value>& Value::elements() const {
  TORCH_CHECK(is_array(), "json: elements() of a ", type_name(), " (expected an array)");
  return *array_;
}

int64_t Value::get_int(const std::string& key, int64_t fallback) const {
  const Value* v = find(key);
  if (v == nullptr || v->is_null()) return fallback;
  try {
    return v->as_int();
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "json: key '", key, "': ", e.msg());
  }
}
double Value::get_double(const std::string& key, double fallback) const {
  const Value* v = find(key);
  if (v == nullptr || v->is_null()) return fallback;
  TORCH_CHECK(v->is_number(), "json: key '", key, "': expected a number, got ", v->type_name());
  return v->as_double();
}
bool Value::get_bool(const std::string& key, bool fallback) const {
  const Value* v = find(key);
  if (v == nullptr || v->is_null()) return fallback;
  TORCH_CHECK(v->is_bool(), "json: key '", key, "': expected a bool, got ", v->type_name());
  return v->as_bool();
}
std::string Value::get_string(const std::string& key, const std::string& fallback) const {
  const Value* v = find(key);
  if (v == nullptr || v->is_null()) return fallback;
  TORCH_CHECK(v->is_string(), "json: key '", key, "': expected a string, got ", v->type_name());
  return v->as_string();
}

namespace {
void dump_string(const std::string& s, std::string& out) {
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}
}  // namespace

void Value::dump_to(std::string& out) const {
  switch (type_) {
    case Type::Null: out += "null"; break;
    case Type::Bool: out += bool_ ? "true" : "false"; break;
    case Type::Number: {
      if (is_int_) {
        out += std::to_string(int_);
      } else {
        // Valid JSON that reads back as the same double: a fraction or exponent keeps it a
        // non-integer (-0.0 was "-0", which reads back as the integer 0), and a number too
        // large for a double (parsed as +-inf) is written as one that overflows again.
        if (std::isnan(number_)) {
          out += "null";
        } else if (std::isinf(number_)) {
          out += number_ < 0 ? "-1e999" : "1e999";
        } else {
          char buf[40];
          std::snprintf(buf, sizeof buf, "%.17g", number_);
          out += buf;
          if (std::strpbrk(buf, ".eE") == nullptr) out += ".0";
        }
      }
      break;
    }
    case Type::String: dump_string(*string_, out); break;
    case Type::Array: {
      out += '[';
      for (size_t i = 0; i < array_->size(); ++i) {
        if (i) out += ',';
        (*array_)[i].dump_to(out);
      }
      out += ']';
      break;
    }
    case Type::Object: {
      out += '{';
      for (size_t i = 0; i < object_->members.size(); ++i) {
        if (i) out += ',';
        dump_string(object_->members[i].first, out);
        out += ':';
        object_->members[i].second.dump_to(out);
      }
      out += '}';
      break;
    }
  }
}

std::string Value::dump() const {
  std::string s;
  dump_to(s);
  return s;
}

namespace {

// Recursive-descent parser over the whole text; depth is bounded so hostile input cannot
// overflow the stack.
class Parser {
 public:
  Parser(const std::string& text, const std::string& source) : s_(text), source_(source) {}

  Value parse_document() {
    skip_ws();
    Value v = parse_value(0);
    skip_ws();
    if (pos_ != s_.size()) fail("end of input after the top-level value");
    return v;
  }

 private:
  static constexpr int kMaxDepth = 512;

  [[noreturn]] void fail(const std::string& expected) const {
    std::string got;
    if (pos_ >= s_.size()) {
      got = "end of input";
    } else {
      got = "'" + s_.substr(pos_, 16) + "'";
      for (char& c : got)
        if (c == '\n' || c == '\r' || c == '\t') c = ' ';
    }
    TORCH_CHECK(false, "json: ", source_, ": byte offset ", pos_, ": expected ", expected,
                ", got ", got);
  }

  void skip_ws() {
    while (pos_ < s_.size() &&
           (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\r' || s_[pos_] == '\t'))
      ++pos_;
  }

  // Steps over `c` when it is the next character.
  bool consume(char c) {
    if (pos_ >= s_.size() || s_[pos_] != c) return false;
    ++pos_;
    return true;
  }

  bool consume_literal(const char* lit) {
    size_t n = std::char_traits<char>::length(lit);
    if (s_.compare(pos_, n, lit) == 0) {
      pos_ += n;
      return true;
    }
    return false;
  }

  Value parse_value(int depth) {
    if (depth > kMaxDepth) fail("nesting depth <= 512");
    if (pos_ >= s_.size()) fail("a value");
    char c = s_[pos_];
    switch (c) {
      case '{': return parse_object(depth);
      case '[': return parse_array(depth);
      case '"': return Value::make_string(parse_string());
      case 't':
        if (consume_literal("true")) return Value::make_bool(true);
        fail("a value");
      case 'f':
        if (consume_literal("false")) return Value::make_bool(false);
        fail("a value");
      case 'n':
        if (consume_literal("null")) return Value();
        fail("a value");
      default:
        if (c == '-' || (c >= '0' && c <= '9')) return parse_number();
        fail("a value (object, array, string, number, true, false or null)");
    }
  }

  Value parse_object(int depth) {
    ++pos_;  // '{'
    std::vector<Member> members;
    skip_ws();
    if (consume('}')) return Value::make_object(std::move(members));
    while (true) {
      skip_ws();
      if (pos_ >= s_.size() || s_[pos_] != '"') fail("'\"' starting an object key");
      std::string key = parse_string();
      skip_ws();
      if (!consume(':')) fail("':' after an object key");
      skip_ws();
      Value v = parse_value(depth + 1);
      members.emplace_back(std::move(key), std::move(v));
      skip_ws();
      if (consume(',')) continue;
      if (consume('}')) break;
      fail("',' or '}' in an object");
    }
    return Value::make_object(std::move(members));
  }

  Value parse_array(int depth) {
    ++pos_;  // '['
    std::vector<Value> items;
    skip_ws();
    if (consume(']')) return Value::make_array(std::move(items));
    while (true) {
      skip_ws();
      items.push_back(parse_value(depth + 1));
      skip_ws();
      if (consume(',')) continue;
      if (consume(']')) break;
      fail("',' or ']' in an array");
    }
    return Value::make_array(std::move(items));
  }

  unsigned hex4() {
    if (pos_ + 4 > s_.size()) fail("4 hex digits after \\u");
    unsigned v = 0;
    for (int i = 0; i < 4; ++i) {
      char c = s_[pos_];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else fail("a hex digit in \\u escape");
      ++pos_;
    }
    return v;
  }

  static void append_utf8(unsigned cp, std::string& out) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  std::string parse_string() {
    ++pos_;  // opening quote
    std::string out;
    while (true) {
      // Copy the run of plain bytes in one go (tokenizer.json is mostly such runs).
      size_t start = pos_;
      while (pos_ < s_.size() && s_[pos_] != '"' && s_[pos_] != '\\' &&
             static_cast<unsigned char>(s_[pos_]) >= 0x20)
        ++pos_;
      out.append(s_, start, pos_ - start);
      if (pos_ >= s_.size()) fail("closing '\"' of a string");
      char c = s_[pos_];
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (c != '\\') fail("no raw control character inside a string (escape it)");
      ++pos_;
      if (pos_ >= s_.size()) fail("an escape character after '\\'");
      char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            // High surrogate: a low surrogate must follow to form one code point.
            if (s_.compare(pos_, 2, "\\u") != 0) fail("a low surrogate \\uDC00-\\uDFFF");
            pos_ += 2;
            unsigned lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) {
              pos_ -= 6;
              fail("a low surrogate \\uDC00-\\uDFFF");
            }
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            pos_ -= 6;
            fail("no lone low surrogate");
          }
          append_utf8(cp, out);
          break;
        }
        default:
          --pos_;
          fail("one of \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\u");
      }
    }
  }

  Value parse_number() {
    const size_t start = pos_;
    bool integral = true;
    if (s_[pos_] == '-') ++pos_;
    if (pos_ >= s_.size() || !(s_[pos_] >= '0' && s_[pos_] <= '9')) fail("a digit");
    if (s_[pos_] == '0') {
      ++pos_;
    } else {
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
    }
    if (pos_ < s_.size() && s_[pos_] == '.') {
      integral = false;
      ++pos_;
      if (pos_ >= s_.size() || !(s_[pos_] >= '0' && s_[pos_] <= '9')) fail("a digit after '.'");
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
    }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      integral = false;
      ++pos_;
      if (pos_ < s_.size() && (s_[pos_] == '+' || s_[pos_] == '-')) ++pos_;
      if (pos_ >= s_.size() || !(s_[pos_] >= '0' && s_[pos_] <= '9'))
        fail("a digit in the exponent");
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
    }
    const std::string text = s_.substr(start, pos_ - start);
    if (integral) {
      errno = 0;
      char* end = nullptr;
      long long i = std::strtoll(text.c_str(), &end, 10);
      if (errno == 0 && end == text.c_str() + text.size()) return Value::make_int(i);
      // Out of int64 range: keep it as a double.
    }
    return Value::make_number(std::strtod(text.c_str(), nullptr));
  }

  const std::string& s_;
  const std::string& source_;
  size_t pos_ = 0;
};

}  // namespace

Value parse(const std::string& text, const std::string& source) {
  return Parser(text, source).parse_document();
}

Value parse_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  TORCH_CHECK(f.good(), "json: cannot open '", path, "' (missing file or no permission)");
  std::stringstream ss;
  ss << f.rdbuf();
  return parse(ss.str(), path);
}

}  // namespace json
}  // namespace slowed_examples

#pragma once

// A small JSON reader (RFC 8259) for the example-side library: HF config.json, the safetensors
// header, model.safetensors.index.json and tokenizer.json. Read-only values, objects keep their
// key order, numbers keep an exact int64 when written without fraction or exponent. Errors are
// c10::Error whose message names the source, the byte offset and what was expected.
//
// Example:
//   auto cfg = slowed_examples::json::parse_file("model/config.json");
//   int64_t hidden = cfg["hidden_size"].as_int();
//   if (cfg.contains("rope_scaling") && !cfg["rope_scaling"].is_null()) { ... }
//   for (const auto& kv : cfg.items()) std::cout << kv.first << "\n";

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace slowed_examples {
namespace json {

class Value;
using Member = std::pair<std::string, Value>;

class Value {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };

  Value() = default;  // null
  static Value make_bool(bool b);
  static Value make_number(double d);
  static Value make_int(int64_t i);
  static Value make_string(std::string s);
  static Value make_array(std::vector<Value> items);
  static Value make_object(std::vector<Member> members);

  Type type() const { return type_; }
  const char* type_name() const;
  bool is_null() const { return type_ == Type::Null; }
  bool is_bool() const { return type_ == Type::Bool; }
  bool is_number() const { return type_ == Type::Number; }
  /// A number written without fraction or exponent that fits int64.
  bool is_int() const { return type_ == Type::Number && is_int_; }
  bool is_string() const { return type_ == Type::String; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_object() const { return type_ == Type::Object; }

  bool as_bool() const;
  double as_double() const;
  /// Integral numbers only (also 3.0); throws for 3.5.
  int64_t as_int() const;
  const std::string& as_string() const;

  /// Arrays: element count; objects: member count; throws otherwise.
  size_t size() const;
  /// Array element; throws when out of range or not an array.
  const Value& at(size_t index) const;
  /// Object member; throws naming the key when missing or not an object.
  const Value& at(const std::string& key) const;
  const Value& operator[](const std::string& key) const { return at(key); }
  const Value& operator[](const char* key) const { return at(std::string(key)); }
  const Value& operator[](size_t index) const { return at(index); }
  const Value& operator[](int index) const { return at(static_cast<size_t>(index)); }
  bool contains(const std::string& key) const;
  /// Object member or nullptr.
  const Value* find(const std::string& key) const;
  /// Object members in file order (a repeated key keeps its last value in lookups).
  const std::vector<Member>& items() const;
  /// Array elements.
  const std::vector<Value>& elements() const;

  /// Member value or fallback when the key is missing or null (objects only).
  int64_t get_int(const std::string& key, int64_t fallback) const;
  double get_double(const std::string& key, double fallback) const;
  bool get_bool(const std::string& key, bool fallback) const;
  std::string get_string(const std::string& key, const std::string& fallback) const;

  /// Compact JSON text (for messages and debugging).
  std::string dump() const;

 private:
  struct ObjectData;
  Type type_ = Type::Null;
  bool bool_ = false;
  bool is_int_ = false;
  double number_ = 0;
  int64_t int_ = 0;
  std::shared_ptr<const std::string> string_;
  std::shared_ptr<const std::vector<Value>> array_;
  std::shared_ptr<const ObjectData> object_;
  void dump_to(std::string& out) const;
};

/// Parses a complete JSON text; `source` names it in error messages.
Value parse(const std::string& text, const std::string& source = "<json string>");
/// Reads and parses a file; errors name the path.
Value parse_file(const std::string& path);

}  // namespace json
}  // namespace slowed_examples

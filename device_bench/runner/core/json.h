// json.h -- a minimal JSON reader/writer for the runner core (manifest.json, tokenizer.json, results).
// Plain C++17, no dependencies. Numbers are kept as double (plus the exact integer when integral).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace firstkit {
namespace json {

struct Value {
  enum class Type { Null, Bool, Number, String, Array, Object };
  Type type = Type::Null;
  bool b = false;
  double num = 0.0;
  int64_t integer = 0;
  bool is_integer = false;
  std::string str;
  std::vector<Value> arr;
  std::vector<std::pair<std::string, Value>> obj;  // insertion order kept

  bool is_null() const { return type == Type::Null; }
  bool is_object() const { return type == Type::Object; }
  bool is_array() const { return type == Type::Array; }
  bool is_string() const { return type == Type::String; }
  bool is_number() const { return type == Type::Number; }
  bool is_bool() const { return type == Type::Bool; }
  /// Member of an object or nullptr.
  const Value* get(const std::string& key) const;
  /// Follows a path of object keys ("a", "b") or nullptr.
  const Value* path(std::initializer_list<const char*> keys) const;
};

/// Parse a JSON document. Throws std::runtime_error with the byte offset on a syntax error.
Value parse(const std::string& text);

/// JSON string literal (quotes included) with escapes.
std::string quote(const std::string& s);

/// Shortest round-trippable text of a double ("null" for NaN/inf).
std::string number(double v);

}  // namespace json
}  // namespace firstkit

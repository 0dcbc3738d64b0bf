#pragma once

// Reading and writing the files of the tests: whole files as bytes, and the line formats of the
// Python-written references (tests/fixtures/make_tokenizer_fixtures.py and make_qwen_fixtures.py:
// one escaped text a line, one line of space-separated ids a text). Test-only header: everything
// has internal linkage.

#include <catch2/catch.hpp>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace {

/// The whole file at `path` ("" when it cannot be read).
std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

/// Replaces the file at `path` with `bytes`.
void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

/// The lines of the file at `path` (which must exist), without their '\n'.
std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  REQUIRE(f.good());
  std::vector<std::string> lines;
  for (std::string line; std::getline(f, line);) lines.push_back(line);
  return lines;
}

/// The text of one line in make_tokenizer_fixtures.py's escaping (\n, \r, \t, \\, \xHH).
std::string unescape(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '\\' || i + 1 >= s.size()) {
      out += s[i];
      continue;
    }
    char e = s[++i];
    switch (e) {
      case 'n': out += '\n'; break;
      case 'r': out += '\r'; break;
      case 't': out += '\t'; break;
      case '\\': out += '\\'; break;
      case 'x': out += static_cast<char>(std::stoi(s.substr(i + 1, 2), nullptr, 16)); i += 2; break;
      default: FAIL("bad escape \\" << e);
    }
  }
  return out;
}

/// The ids of one line of space-separated integers.
std::vector<int32_t> parse_ids(const std::string& line) {
  std::vector<int32_t> ids;
  const char* p = line.c_str();
  char* end = nullptr;
  while (*p) {
    long v = std::strtol(p, &end, 10);
    if (end == p) break;
    ids.push_back(static_cast<int32_t>(v));
    p = end;
  }
  return ids;
}

/// The ids of every line of the file at `path` (one text's ids a line).
std::vector<std::vector<int32_t>> read_ids(const std::string& path) {
  std::vector<std::vector<int32_t>> out;
  for (const auto& l : read_lines(path)) out.push_back(parse_ids(l));
  return out;
}

/// The unescaped texts of every line of the file at `path`.
std::vector<std::string> read_texts(const std::string& path) {
  std::vector<std::string> out;
  for (const auto& l : read_lines(path)) out.push_back(unescape(l));
  return out;
}

}  // namespace

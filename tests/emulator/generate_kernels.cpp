// slowed_emu_generate: writes the host-C++ form of every kernel source slowed ships, for the
// emulator (docs/emulator.md). It takes each source and variant from the library's own registry
// (slowed::cuda::all_kernel_sources()) plus the test-only smoke kernels
// (tests/support/smoke_kernels.h): the list the NVRTC test compiles. So the emulator runs
// the text NVRTC compiles, with only these edits, each listed and counted in the output:
//
//   extern-C       `extern "C"` dropped (the variants of one family would clash at link time;
//                  each file's kernels live in an anonymous namespace instead)
//   ptx-cvt-f16    the two inline-PTX fp16 conversions replaced by host round-to-nearest-even
//                  functions (slowed_emu::cvt_f32_f16 / cvt_rn_f16_f32); any other asm fails
//   vector-cast    reinterpret_cast<T*> to a vector type (uint4, float4, ...) made a checked cast
//   vector-ptr     a `T*` of a vector type made a checked pointer (alignment and bounds per access)
//   shared-reg     SLOWED_EMU_SHARED(name) appended to each __shared__ declaration (poisoning)
//
// Every edit keeps line numbers, and `#line` directives name the family, so the emulator's
// reports cite lines of the kernel source. Usage:
//
//   slowed_emu_generate --out DIR --slots N [--registry] [--source FAMILY FILE]...
//                       [--replace OLD_FILE NEW_FILE]
//
// --registry takes the library's sources (and the smoke kernels); --source adds a source file whose __global__ functions
// are its entry points (the emulator's own test kernels); --replace substitutes one text for another in every source that contains it (the
// mutation script's injected bug) and fails unless exactly one occurrence per such source and at
// least one source matched. N files kernels_NN.cpp are written (unused ones empty), plus
// registry.cpp with slowed_emu_register_generated() and edits.txt, the table of edits.

#include <slowed/cuda/kernels/registry.h>

#include "../support/smoke_kernels.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct Variant {
  std::string family, identity, label, text;
  std::vector<std::pair<std::string, std::string>> defines;
  std::vector<std::string> kernels;
};

[[noreturn]] void die(const std::string& why) {
  std::cerr << "slowed_emu_generate: " << why << "\n";
  std::exit(1);
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) die("cannot read " + path);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

void write_file(const std::string& path, const std::string& text) {
  std::ifstream old(path, std::ios::binary);
  if (old) {  // keep the timestamp of an unchanged file, so nothing recompiles
    std::ostringstream s;
    s << old.rdbuf();
    if (s.str() == text) return;
  }
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) die("cannot write " + path);
  out << text;
}

std::string quoted(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

int count_of(const std::string& text, const std::string& what) {
  int n = 0;
  for (size_t p = text.find(what); p != std::string::npos; p = text.find(what, p + 1)) ++n;
  return n;
}

int line_of(const std::string& text, size_t pos) {
  return 1 + static_cast<int>(std::count(text.begin(), text.begin() + pos, '\n'));
}

// Replaces every match of `re` by `fmt`; returns the number of replacements.
int replace_all(std::string& text, const std::regex& re, const std::string& fmt) {
  int n = 0;
  for (std::sregex_iterator it(text.begin(), text.end(), re), end; it != end; ++it) ++n;
  if (n) text = std::regex_replace(text, re, fmt);
  return n;
}

// The declared names of one declaration's declarators ("float a, b[3]" -> a, b).
std::vector<std::string> declared_names(const std::string& decl) {
  std::vector<std::string> parts;
  int depth = 0;
  std::string cur;
  for (char c : decl) {
    if (c == '[' || c == '(' || c == '{') ++depth;
    if (c == ']' || c == ')' || c == '}') --depth;
    if (c == ',' && depth == 0) {
      parts.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  parts.push_back(cur);
  std::vector<std::string> names;
  static const std::regex ident(R"(([A-Za-z_]\w*)\s*$)");
  for (std::string p : parts) {
    const size_t cut = p.find_first_of("[=");
    if (cut != std::string::npos) p = p.substr(0, cut);
    std::smatch m;
    if (!std::regex_search(p, m, ident)) die("cannot find the name in __shared__ declaration '" + decl + "'");
    names.push_back(m[1]);
  }
  return names;
}

// The edits; returns (edit name, count) in a fixed order.
std::vector<std::pair<std::string, int>> edit(Variant& v) {
  std::vector<std::pair<std::string, int>> edits;
  std::string& t = v.text;
  edits.emplace_back("extern-C", replace_all(t, std::regex(R"(extern\s+"C"\s+)"), ""));

  int cvt = replace_all(
      t, std::regex(R"re(asm\s*\(\s*"cvt\.f32\.f16 %0, %1;"\s*:\s*"=f"\s*\((\w+)\)\s*:\s*"h"\s*\((\w+)\)\s*\)\s*;)re"),
      "$1 = ::slowed_emu::cvt_f32_f16($2);");
  cvt += replace_all(
      t, std::regex(R"re(asm\s*\(\s*"cvt\.rn\.f16\.f32 %0, %1;"\s*:\s*"=h"\s*\((\w+)\)\s*:\s*"f"\s*\((\w+)\)\s*\)\s*;)re"),
      "$1 = ::slowed_emu::cvt_rn_f16_f32($2);");
  edits.emplace_back("ptx-cvt-f16", cvt);
  std::smatch m;
  if (std::regex_search(t, m, std::regex(R"(\basm\b[^;]*;)"))) {
    die(v.label + " line " + std::to_string(line_of(t, m.position(0))) +
        ": inline PTX without a host equivalent: " + m.str(0));
  }

  const std::string vec = R"((const\s+)?(uint4|int4|float4|double2|uint2|int2|float2))";
  edits.emplace_back("vector-cast",
                     replace_all(t, std::regex("reinterpret_cast<\\s*" + vec + "\\s*\\*\\s*>"),
                                 "::slowed_emu::vector_cast<$1$2>"));
  edits.emplace_back("vector-ptr",
                     replace_all(t, std::regex("\\b" + vec + "\\s*\\*(\\s*__restrict__)?\\s*"),
                                 "::slowed_emu::vector_ptr<$1$2> "));

  if (std::regex_search(t, m, std::regex(R"(extern\s+__shared__)"))) {
    die(v.label + " line " + std::to_string(line_of(t, m.position(0))) +
        ": dynamic shared memory (extern __shared__) is not emulated");
  }
  int shared = 0;
  std::string out;
  const std::regex decl(R"(__shared__\s+([^;]+);)");
  size_t last = 0;
  for (std::sregex_iterator it(t.begin(), t.end(), decl), end; it != end; ++it) {
    const std::smatch& d = *it;
    out += t.substr(last, d.position(0) + d.length(0) - last);
    for (const auto& name : declared_names(d[1])) {
      out += " SLOWED_EMU_SHARED(" + name + ");";
      ++shared;
    }
    last = d.position(0) + d.length(0);
  }
  out += t.substr(last);
  t = out;
  edits.emplace_back("shared-reg", shared);
  return edits;
}

// The max-threads expression of kernel `name`'s __launch_bounds__, or "1024".
std::string launch_bounds(const Variant& v, const std::string& name) {
  std::smatch m;
  const std::regex def("__global__\\s+void\\s+(__launch_bounds__\\s*\\(([^()]*)\\)\\s*)?" + name +
                       "\\s*\\(");
  if (!std::regex_search(v.text, m, def)) {
    die(v.label + ": no definition of kernel '" + name + "' (expected `__global__ void " + name +
        "(` with an optional __launch_bounds__)");
  }
  if (!m[1].matched) {
    if (std::regex_search(v.text, std::regex("__launch_bounds__[^;{]*\\b" + name + "\\s*\\("))) {
      die(v.label + ": cannot read the __launch_bounds__ of '" + name + "'");
    }
    return "1024";
  }
  std::string bounds = m[2];
  const size_t comma = bounds.find(',');
  return "(" + (comma == std::string::npos ? bounds : bounds.substr(0, comma)) + ")";
}

}  // namespace

int main(int argc, char** argv) {
  std::string out_dir, replace_old, replace_new;
  int slots = 0;
  bool registry = false;
  std::vector<Variant> variants;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) die(a + " needs a value");
      return argv[++i];
    };
    if (a == "--out") {
      out_dir = next();
    } else if (a == "--slots") {
      slots = std::atoi(next().c_str());
    } else if (a == "--registry") {
      registry = true;
    } else if (a == "--source") {
      Variant v;
      v.family = next();
      v.text = read_file(next());
      static const std::regex entry(
          R"(__global__\s+void\s+(?:__launch_bounds__\s*\([^()]*\)\s*)?(\w+)\s*\()");
      for (std::sregex_iterator it(v.text.begin(), v.text.end(), entry), end; it != end; ++it)
        v.kernels.push_back((*it)[1]);
      v.identity = slowed::cuda::KernelSource(v.family, v.text, v.kernels).identity();
      v.label = v.family;
      variants.push_back(std::move(v));
    } else if (a == "--replace") {
      replace_old = read_file(next());
      replace_new = read_file(next());
      if (replace_old.empty()) die("--replace: the text to replace is empty");
    } else {
      die("unknown argument '" + a + "'");
    }
  }
  if (out_dir.empty() || slots <= 0) die("usage: --out DIR --slots N [--registry] [--source ...]");
  if (registry) {
    std::vector<Variant> lib;
    std::vector<const slowed::cuda::KernelSource*> sources = {
        &slowed_tests::smoke_kernels_source()};
    for (const auto* s : slowed::cuda::all_kernel_sources()) sources.push_back(s);
    for (const auto* s : sources) {
      Variant v;
      v.family = s->family();
      v.text = s->source();
      v.identity = s->identity();
      v.defines = s->defines();
      v.kernels = s->kernels();
      v.label = v.family;
      for (const auto& d : v.defines) v.label += " -D" + d.first + "=" + d.second;
      lib.push_back(std::move(v));
    }
    variants.insert(variants.begin(), lib.begin(), lib.end());
  }
  if (static_cast<int>(variants.size()) > slots) {
    die(std::to_string(variants.size()) + " kernel sources but only " + std::to_string(slots) +
        " slots: raise SLOWED_EMU_SLOTS in tests/emulator/CMakeLists.txt");
  }

  int replaced = 0;
  if (!replace_old.empty()) {
    for (auto& v : variants) {
      const int n = count_of(v.text, replace_old);
      if (n == 0) continue;
      if (n > 1) die("--replace: the text occurs " + std::to_string(n) + " times in " + v.label);
      v.text.replace(v.text.find(replace_old), replace_old.size(), replace_new);
      ++replaced;
    }
    if (replaced == 0) die("--replace: the text occurs in no kernel source");
  }

  std::ostringstream table;
  table << "variant | extern-C | ptx-cvt-f16 | vector-cast | vector-ptr | shared-reg\n";
  std::ostringstream reg;
  reg << "// Generated by slowed_emu_generate; do not edit.\n";
  for (int s = 0; s < slots; ++s) reg << "void slowed_emu_register_slot_" << s << "();\n";
  reg << "extern \"C\" void slowed_emu_register_generated() {\n";
  for (int s = 0; s < slots; ++s) reg << "  slowed_emu_register_slot_" << s << "();\n";
  reg << "}\n";

  for (int s = 0; s < slots; ++s) {
    std::ostringstream f;
    f << "// Generated by slowed_emu_generate; do not edit (docs/emulator.md).\n";
    if (s >= static_cast<int>(variants.size())) {
      f << "void slowed_emu_register_slot_" << s << "() {}\n";
      write_file(out_dir + "/kernels_" + std::to_string(s) + ".cpp", f.str());
      continue;
    }
    Variant& v = variants[static_cast<size_t>(s)];
    const auto edits = edit(v);
    table << v.label;
    f << "// Source: " << v.identity << "\n// Edits:";
    for (const auto& e : edits) {
      table << " | " << e.second;
      f << " " << e.first << "=" << e.second;
    }
    table << "\n";
    f << (replaced ? "\n// Mutated by --replace (scripts/mutate_kernels.py)." : "") << "\n";
    f << "#include \"cuda_shim.h\"\n";
    for (const auto& d : v.defines) f << "#define " << d.first << " " << d.second << "\n";
    f << "namespace {\n#line 1 " << quoted(v.label) << "\n" << v.text << "\n}  // namespace\n";
    f << "void slowed_emu_register_slot_" << s << "() {\n";
    for (const auto& k : v.kernels) {
      f << "  ::slowed_emu::register_kernel({" << quoted(v.identity) << ", " << quoted(k)
        << ", [](void** a) { ::slowed_emu::invoke(&" << k << ", a); }, " << launch_bounds(v, k)
        << "});\n";
    }
    f << "}\n";
    write_file(out_dir + "/kernels_" + std::to_string(s) + ".cpp", f.str());
  }
  write_file(out_dir + "/registry.cpp", reg.str());
  write_file(out_dir + "/edits.txt", table.str());
  std::cout << table.str();
  return 0;
}

// The run-time CUDA compiler (slowed/cuda/jit.h). "[cpu]" cases need libnvrtc but no GPU: every
// registered kernel source compiles for sm_80 and sm_90, errors carry NVRTC's log, the disk cache
// survives corruption. "[cuda]" cases launch the smoke kernels on a GPU and compare with ATen.
#include <catch2/catch.hpp>
#include <slowed/cuda/jit.h>
#include <slowed/cuda/kernels/registry.h>

#include "support/smoke_kernels.h"

#include <c10/core/StreamGuard.h>
#include <torch/torch.h>

#include "support/files.h"

#include <dirent.h>
#include <ftw.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

using slowed::cuda::CompileOrigin;
using slowed::cuda::KernelSource;

namespace {

/// Sets an environment variable for the scope, restoring the old value after.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value) : name_(name) {
    const char* old = std::getenv(name);
    had_ = old != nullptr;
    if (had_) old_ = old;
    ::setenv(name, value.c_str(), 1);
  }
  ~ScopedEnv() {
    if (had_) {
      ::setenv(name_, old_.c_str(), 1);
    } else {
      ::unsetenv(name_);
    }
  }

 private:
  const char* name_;
  bool had_ = false;
  std::string old_;
};

/// A fresh temporary folder, removed at the end of the scope.
// (POSIX calls, not std::filesystem: the pip libtorch exports its own copy of some
// std::filesystem symbols, and remove_all resolved into it crashes.)
class TempDir {
 public:
  TempDir() {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp && *tmp ? tmp : "/tmp") + "/slowed_jit_test_XXXXXX";
    REQUIRE(::mkdtemp(&pattern[0]) != nullptr);
    path_ = pattern;
  }
  ~TempDir() {
    ::nftw(
        path_.c_str(),
        [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); }, 16,
        FTW_DEPTH | FTW_PHYS);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

bool exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> names;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (const dirent* e = ::readdir(d)) {
      const std::string name = e->d_name;
      if (name != "." && name != "..") names.push_back(name);
    }
    ::closedir(d);
  }
  return names;
}

/// A temporary SLOWED_CACHE_DIR, with the in-memory binaries forgotten on entry and exit so
/// that each test sees only its own cache.
struct ScopedKernelCache {
  TempDir dir;
  ScopedEnv env{"SLOWED_CACHE_DIR", dir.path()};
  ScopedKernelCache() { slowed::cuda::clear_compiled_binaries_in_memory(); }
  ~ScopedKernelCache() { slowed::cuda::clear_compiled_binaries_in_memory(); }
};

/// Collects torch warnings for the scope.
class WarningCollector : public c10::WarningHandler {
 public:
  void process(const c10::Warning& warning) override { messages.push_back(warning.msg()); }
  std::vector<std::string> messages;
};

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

bool is_elf(const std::string& binary) {
  return binary.size() > 4 && binary.compare(0, 4, "\x7f" "ELF") == 0;
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

const KernelSource& smoke() { return slowed_tests::smoke_kernels_source(); }

}  // namespace

// ---------------------------------------------------------------------------------------------
// [cpu]: NVRTC only, no GPU needed

TEST_CASE("a missing NVRTC library gives an error naming every path tried", "[cpu]") {
  {
    ScopedEnv env("SLOWED_NVRTC_LIBRARY", "/nonexistent/libnvrtc.so");
    const auto candidates = slowed::cuda::nvrtc_search_paths();
    REQUIRE(candidates.size() == 1);  // an explicit override is the only candidate
    CHECK(candidates[0].path == "/nonexistent/libnvrtc.so");
    const std::string message =
        error_of([&] { slowed::cuda::load_nvrtc(candidates); });
    CHECK(contains(message, "could not load NVRTC"));
    CHECK(contains(message, "/nonexistent/libnvrtc.so"));
    CHECK(contains(message, "$SLOWED_NVRTC_LIBRARY"));
    CHECK(contains(message, "SLOWED_NVRTC_LIBRARY to the full path"));
  }
  // An explicit list: every entry is named, in order, with dlopen's reason.
  const std::vector<slowed::cuda::NvrtcCandidate> missing = {
      {"libnvrtc.so.999", "already loaded in the process", true},
      {"/nonexistent/a/libnvrtc.so.13", "test", false},
      {"/nonexistent/b/libnvrtc.so.12", "test", false}};
  const std::string message = error_of([&] { slowed::cuda::load_nvrtc(missing); });
  const auto a = message.find("1. libnvrtc.so.999 (already loaded in the process): not loaded");
  const auto b = message.find("2. /nonexistent/a/libnvrtc.so.13 (test): ");
  const auto c = message.find("3. /nonexistent/b/libnvrtc.so.12 (test): ");
  CHECK(a != std::string::npos);
  CHECK(b != std::string::npos);
  CHECK(c != std::string::npos);
  CHECK((a < b && b < c));
  CHECK(contains(message, "No such file"));  // dlerror's text for a missing file
}

TEST_CASE("libnvrtc is searched in the documented order", "[cpu]") {
  ScopedEnv cuda_home("CUDA_HOME", "/opt/test-cuda-home");
  const auto candidates = slowed::cuda::nvrtc_search_paths();
  auto position = [&](const std::string& path) {
    for (size_t i = 0; i < candidates.size(); ++i) {
      if (candidates[i].path == path) return static_cast<int>(i);
    }
    return -1;
  };
  REQUIRE(candidates.size() >= 3);
  CHECK(candidates[0].path == "libnvrtc.so.13");
  CHECK(candidates[0].already_loaded);
  const int torch_cu13 = [&] {
    for (size_t i = 0; i < candidates.size(); ++i) {
      if (candidates[i].origin == "next to libtorch" &&
          contains(candidates[i].path, "/nvidia/cu13/lib/libnvrtc.so.13")) {
        return static_cast<int>(i);
      }
    }
    return -1;
  }();
  const int cuda_home_13 = position("/opt/test-cuda-home/lib64/libnvrtc.so.13");
  const int usr_local_13 = position("/usr/local/cuda/lib64/libnvrtc.so.13");
  int plain_13 = -1;
  for (size_t i = 0; i < candidates.size(); ++i) {
    if (candidates[i].path == "libnvrtc.so.13" && !candidates[i].already_loaded) plain_13 = int(i);
  }
  CHECK(torch_cu13 > 0);  // this test links a pip libtorch, which has a lib dir to search
  CHECK(cuda_home_13 > torch_cu13);
  CHECK(usr_local_13 > cuda_home_13);
  CHECK(plain_13 > usr_local_13);
  CHECK(plain_13 == static_cast<int>(candidates.size()) - 3);
}

TEST_CASE("NVRTC is found and knows sm_80 and sm_90", "[cpu]") {
  INFO(slowed::cuda::nvrtc_unavailable_reason());
  REQUIRE(slowed::cuda::nvrtc_available());
  const auto& lib = slowed::cuda::nvrtc();
  INFO("NVRTC " << lib.version_string() << " from " << lib.path << " (" << lib.origin << ")");
  CHECK(lib.version_major >= 11);
  CHECK(!lib.path.empty());
  if (!lib.supported_archs.empty()) {
    const auto& archs = lib.supported_archs;
    CHECK(std::find(archs.begin(), archs.end(), 80) != archs.end());
    CHECK(std::find(archs.begin(), archs.end(), 90) != archs.end());
  }
}

TEST_CASE("a libnvrtc already loaded in the process is found without a path", "[cpu]") {
  const auto& lib = slowed::cuda::nvrtc();  // loads it (from wherever the search found it)
  const std::string soname = "libnvrtc.so." + std::to_string(lib.version_major);
  const auto again = slowed::cuda::load_nvrtc({{soname, "already loaded in the process", true}});
  CHECK(again->version_string() == lib.version_string());
  CHECK(again->path == lib.path);
  const auto explicit_path = slowed::cuda::load_nvrtc({{lib.path, "test", false}});
  CHECK(explicit_path->nvrtcCompileProgram == lib.nvrtcCompileProgram);  // the same library
}

TEST_CASE("every registered kernel source compiles to a cubin for sm_80 and sm_90 and to PTX",
          "[cpu]") {
  ScopedKernelCache cache;
  const auto& sources = slowed::cuda::all_kernel_sources();
  REQUIRE(!sources.empty());
  std::vector<const KernelSource*> all = {&smoke()};  // and the test-only smoke kernels
  all.insert(all.end(), sources.begin(), sources.end());
  for (const KernelSource* source : all) {
    for (const auto& arch : std::vector<std::pair<int, int>>{{8, 0}, {9, 0}}) {
      INFO(source->family() << " for " << arch.first << "." << arch.second);
      const auto cubin = slowed::cuda::compile_kernel(*source, arch.first, arch.second, true);
      CHECK(is_elf(*cubin.binary));
      CHECK(cubin.record.target == "sm_" + std::to_string(arch.first * 10 + arch.second));
      CHECK_FALSE(cubin.record.ptx_fallback);
      for (const auto& name : source->kernels()) {
        CHECK(contains(*cubin.binary, name));  // the ELF symbol table names each entry point
      }
      const std::string ptx = slowed::cuda::compile_to_binary(*source, arch.first, arch.second,
                                                              /*cubin=*/false);
      CHECK(contains(ptx, ".target sm_" + std::to_string(arch.first * 10 + arch.second)));
      for (const auto& name : source->kernels()) {
        CHECK(contains(ptx, ".entry " + name));
      }
      CHECK(ptx.back() != '\0');
    }
  }
}

TEST_CASE("a kernel source with a syntax error throws with its name and NVRTC's log", "[cpu]") {
  ScopedKernelCache cache;
  const KernelSource broken("broken_syntax_probe",
                            "extern \"C\" __global__ void broken_probe(float* p) {\n"
                            "  p[0] = 1.0f + ;\n"
                            "}\n",
                            {"broken_probe"});
  const std::string message =
      error_of([&] { slowed::cuda::compile_to_binary(broken, 9, 0, true); });
  INFO(message);
  CHECK(contains(message, "broken_syntax_probe"));
  CHECK(contains(message, "NVRTC_ERROR_COMPILATION"));
  CHECK(contains(message, "expected an expression"));  // NVRTC's own diagnostic
  CHECK(contains(message, "broken_syntax_probe.cu(2)"));  // with the file name and line
  CHECK(contains(message, "--gpu-architecture=sm_90"));
  // Nothing is cached for a failed compile.
  CHECK(list_dir(cache.dir.path() + "/kernels").empty());
}

TEST_CASE("defines are passed to NVRTC and are part of the cache key", "[cpu]") {
  ScopedKernelCache cache;
  const KernelSource probe("define_probe",
                           "#ifndef SLOWED_PROBE_VALUE\n#error SLOWED_PROBE_VALUE is required\n"
                           "#endif\n"
                           "extern \"C\" __global__ void define_probe(float* p) {\n"
                           "  p[threadIdx.x] = SLOWED_PROBE_VALUE;\n}\n",
                           {"define_probe"});
  const std::string message = error_of([&] { slowed::cuda::compile_to_binary(probe, 9, 0, false); });
  CHECK(contains(message, "SLOWED_PROBE_VALUE is required"));
  const auto one = probe.with_define("SLOWED_PROBE_VALUE", "1.5f");
  const auto two = probe.with_define("SLOWED_PROBE_VALUE", "2.5f");
  CHECK(one.identity() != two.identity());
  const std::string ptx_one = slowed::cuda::compile_to_binary(one, 9, 0, false);
  const std::string ptx_two = slowed::cuda::compile_to_binary(two, 9, 0, false);
  // The constant appears as an integer (NVRTC 13) or a hex float, depending on the version.
  CHECK((contains(ptx_one, "1069547520") || contains(ptx_one, "0f3FC00000")));  // 1.5f
  CHECK((contains(ptx_two, "1075838976") || contains(ptx_two, "0f40200000")));  // 2.5f
  CHECK(two.with_define("SLOWED_PROBE_VALUE", "1.5f").identity() == one.identity());
  // The smoke kernels accept their tunable define.
  CHECK(is_elf(slowed::cuda::compile_to_binary(
      smoke().with_define("SLOWED_SCALE_ADD_ITEMS", "1"), 8, 0, true)));
}

TEST_CASE("KernelSource rejects bad names and defines with messages naming the argument",
          "[cpu]") {
  CHECK(contains(error_of([] { KernelSource("bad family", "x", {"k"}); }), "family"));
  CHECK(contains(error_of([] { KernelSource("f", "", {"k"}); }), "source"));
  CHECK(contains(error_of([] { KernelSource("f", "x", {}); }), "kernels"));
  CHECK(contains(error_of([] { KernelSource("f", "x", {"not-a-name"}); }), "not-a-name"));
  CHECK(contains(error_of([] { smoke().with_define("1X", "1"); }), "defines"));
  CHECK(contains(error_of([] { smoke().with_define("X", "a b"); }), "without whitespace"));
}

TEST_CASE("the disk cache returns identical bytes and rebuilds corrupt files", "[cpu]") {
  ScopedKernelCache cache;
  const auto& source = smoke();

  const auto cold = slowed::cuda::compile_kernel(source, 9, 0, true);
  REQUIRE(cold.record.origin == CompileOrigin::Nvrtc);
  REQUIRE(!cold.record.cache_path.empty());
  CHECK(cold.record.disk_cache_note.empty());
  const std::string file = cold.record.cache_path;
  REQUIRE(exists(file));
  const std::string kernels_dir = cache.dir.path() + "/kernels";
  CHECK(file.rfind(kernels_dir + "/smoke_scale_add-sm_90-", 0) == 0);
  CHECK(file.substr(file.size() - 6) == ".cubin");
  const std::string original = *cold.binary;
  const std::string file_bytes = read_bytes(file);
  CHECK(file_bytes.compare(0, 8, "SLOWEDK\n") == 0);
  CHECK(contains(file_bytes, original));

  const auto memory = slowed::cuda::compile_kernel(source, 9, 0, true);
  CHECK(memory.record.origin == CompileOrigin::MemoryCache);
  CHECK(*memory.binary == original);

  slowed::cuda::clear_compiled_binaries_in_memory();
  const auto disk = slowed::cuda::compile_kernel(source, 9, 0, true);
  CHECK(disk.record.origin == CompileOrigin::DiskCache);
  CHECK(*disk.binary == original);
  std::printf("JIT latency, smoke kernels, sm_90 cubin (%zu bytes): NVRTC %.1f ms, memory cache "
              "%.3f ms, disk cache %.3f ms\n",
              original.size(), cold.record.milliseconds, memory.record.milliseconds,
              disk.record.milliseconds);

  struct Corruption {
    const char* what;
    std::function<std::string(std::string)> damage;
    const char* expected_note;
  };
  const std::vector<Corruption> corruptions = {
      {"truncated to half", [](std::string b) { return b.substr(0, b.size() / 2); },
       "size mismatch"},
      {"truncated inside the header", [](std::string b) { return b.substr(0, 20); },
       "truncated header"},
      {"empty", [](std::string) { return std::string(); }, "truncated header"},
      {"one payload byte flipped",
       [](std::string b) {
         b[b.size() - 7] ^= 0x20;
         return b;
       },
       "payload checksum mismatch"},
      {"magic flipped",
       [](std::string b) {
         b[0] ^= 0x01;
         return b;
       },
       "bad magic"},
      {"trailing garbage", [](std::string b) { return b + "garbage"; }, "size mismatch"},
      {"format version changed",
       [](std::string b) {
         b[8] = 7;
         return b;
       },
       "format version"},
  };
  for (const auto& corruption : corruptions) {
    INFO(corruption.what);
    write_bytes(file, corruption.damage(file_bytes));
    slowed::cuda::clear_compiled_binaries_in_memory();
    const auto stats_before = slowed::cuda::compile_stats();
    const auto rebuilt = slowed::cuda::compile_kernel(source, 9, 0, true);
    CHECK(rebuilt.record.origin == CompileOrigin::Nvrtc);  // rejected, never loaded
    CHECK(contains(rebuilt.record.disk_cache_note, corruption.expected_note));
    CHECK(*rebuilt.binary == original);
    CHECK(slowed::cuda::compile_stats().disk_rejected == stats_before.disk_rejected + 1);
    CHECK(read_bytes(file) == file_bytes);  // rewritten

    slowed::cuda::clear_compiled_binaries_in_memory();
    const auto again = slowed::cuda::compile_kernel(source, 9, 0, true);
    CHECK(again.record.origin == CompileOrigin::DiskCache);
    CHECK(*again.binary == original);
  }

  // A file holding another key under this name (a hash collision) is a miss, not a hit.
  {
    const auto other = slowed::cuda::compile_kernel(source, 8, 0, true);
    write_bytes(file, read_bytes(other.record.cache_path));
    slowed::cuda::clear_compiled_binaries_in_memory();
    const auto rebuilt = slowed::cuda::compile_kernel(source, 9, 0, true);
    CHECK(rebuilt.record.origin == CompileOrigin::Nvrtc);
    CHECK(contains(rebuilt.record.disk_cache_note, "key mismatch"));
    CHECK(*rebuilt.binary == original);
  }

  // Atomic writes leave no temporary files behind.
  for (const auto& name : list_dir(kernels_dir)) {
    CHECK_FALSE(contains(name, ".tmp."));
  }
}

TEST_CASE("threads compiling the same kernel at once agree and leave one valid cache file",
          "[cpu]") {
  ScopedKernelCache cache;
  std::vector<std::string> binaries(4);
  std::vector<std::string> errors(4);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < binaries.size(); ++t) {
    threads.emplace_back([&, t] {
      try {
        binaries[t] = slowed::cuda::compile_to_binary(smoke(), 8, 6, true);
      } catch (const std::exception& e) {
        errors[t] = e.what();
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (size_t t = 0; t < binaries.size(); ++t) {
    CHECK(errors[t].empty());
    CHECK(is_elf(binaries[t]));
    CHECK(binaries[t] == binaries[0]);
  }
  const auto names = list_dir(cache.dir.path() + "/kernels");
  REQUIRE(names.size() == 1);  // no temporary files left
  slowed::cuda::clear_compiled_binaries_in_memory();
  const auto from_disk = slowed::cuda::compile_kernel(smoke(), 8, 6, true);
  CHECK(from_disk.record.origin == CompileOrigin::DiskCache);
  CHECK(*from_disk.binary == binaries[0]);
}

// The child side of the next test: compiles the smoke kernels into $SLOWED_CACHE_DIR once
// $SLOWED_TEST_GO exists, and writes the binary to $SLOWED_TEST_OUT. Hidden ("[.]"): only the
// parent runs it.
TEST_CASE("child process: compile the smoke kernels into a shared cache", "[.cache_child]") {
  const char* go = std::getenv("SLOWED_TEST_GO");
  const char* out = std::getenv("SLOWED_TEST_OUT");
  REQUIRE(go != nullptr);
  REQUIRE(out != nullptr);
  while (!exists(go)) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  write_bytes(out, slowed::cuda::compile_to_binary(smoke(), 8, 6, true));
}

TEST_CASE("processes compiling the same kernel at once all succeed and leave one valid file",
          "[cpu]") {
  // Threads of one process share the in-memory cache; separate processes meet only in the
  // folder. Four copies of this program start together (a go file) on one empty cache folder.
  ScopedKernelCache cache;
  const std::string go = cache.dir.path() + "/go";
  char exe[4096] = {0};
  REQUIRE(::readlink("/proc/self/exe", exe, sizeof(exe) - 1) > 0);
  std::vector<pid_t> children;
  std::vector<std::string> outs;
  for (int i = 0; i < 4; ++i) {
    outs.push_back(cache.dir.path() + "/out" + std::to_string(i));
    // The child's environment is built before fork: only exec runs in the child.
    std::vector<std::string> env;
    for (char** e = environ; *e != nullptr; ++e) env.emplace_back(*e);
    env.push_back("SLOWED_TEST_GO=" + go);
    env.push_back("SLOWED_TEST_OUT=" + outs.back());
    std::vector<char*> envp;
    for (auto& e : env) envp.push_back(&e[0]);
    envp.push_back(nullptr);
    char tag[] = "[.cache_child]";
    char* argv[] = {exe, tag, nullptr};
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      ::execve(exe, argv, envp.data());
      ::_exit(127);
    }
    children.push_back(pid);
  }
  write_bytes(go, "");
  for (size_t i = 0; i < children.size(); ++i) {
    int status = 0;
    REQUIRE(::waitpid(children[i], &status, 0) == children[i]);
    INFO("child " << i);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
  }
  const std::string first = read_bytes(outs[0]);
  CHECK(is_elf(first));
  for (const auto& out : outs) CHECK(read_bytes(out) == first);
  std::vector<std::string> names;
  for (const auto& name : list_dir(cache.dir.path() + "/kernels")) names.push_back(name);
  REQUIRE(names.size() == 1);  // one cache file, no temporary files left
  const auto from_disk = slowed::cuda::compile_kernel(smoke(), 8, 6, true);
  CHECK(from_disk.record.origin == CompileOrigin::DiskCache);
  CHECK(*from_disk.binary == first);
}

TEST_CASE("an unwritable cache folder warns once and compiles without a disk cache", "[cpu]") {
  TempDir dir;
  const std::string blocker = dir.path() + "/a_file";
  write_bytes(blocker, "not a folder");
  ScopedEnv env("SLOWED_CACHE_DIR", blocker + "/cache");  // mkdir fails: ENOTDIR
  slowed::cuda::clear_compiled_binaries_in_memory();
  WarningCollector warnings;
  c10::WarningUtils::WarningHandlerGuard guard(&warnings);
  for (int i = 0; i < 3; ++i) {
    slowed::cuda::clear_compiled_binaries_in_memory();
    const auto result = slowed::cuda::compile_kernel(smoke(), 8, 0, true);
    CHECK(result.record.origin == CompileOrigin::Nvrtc);
    CHECK(is_elf(*result.binary));
    CHECK(contains(result.record.disk_cache_note, "could not write the kernel cache"));
  }
  REQUIRE(warnings.messages.size() == 1);
  CHECK(contains(warnings.messages[0], "continuing without it"));
  CHECK(contains(warnings.messages[0], blocker + "/cache/kernels"));
  slowed::cuda::clear_compiled_binaries_in_memory();
}

TEST_CASE("a device NVRTC does not know gets PTX for the newest architecture it supports",
          "[cpu]") {
  ScopedKernelCache cache;
  const auto& lib = slowed::cuda::nvrtc();
  if (lib.supported_archs.empty()) {
    WARN("this NVRTC predates nvrtcGetSupportedArchs: skipped");
    return;
  }
  const int newest = *std::max_element(lib.supported_archs.begin(), lib.supported_archs.end());
  const auto target = slowed::cuda::choose_compile_target(lib, 99, 9, true);
  CHECK(target.ptx_fallback);
  CHECK(target.kind == slowed::cuda::BinaryKind::Ptx);
  CHECK(target.arch == newest);
  const auto result = slowed::cuda::compile_kernel(smoke(), 99, 9, true);
  CHECK(result.record.ptx_fallback);
  CHECK(result.record.target == "compute_" + std::to_string(newest));
  CHECK(contains(*result.binary, ".entry slowed_scale_add_f32"));
  CHECK(contains(result.record.cache_path, ".ptx"));
  // Older than anything NVRTC supports: a clear error.
  const std::string message = error_of([] { slowed::cuda::compile_kernel(smoke(), 1, 0, true); });
  CHECK(contains(message, "cannot compile for compute capability 1.0"));
  // Known architecture: no fallback.
  CHECK_FALSE(slowed::cuda::choose_compile_target(lib, 9, 0, true).ptx_fallback);
}

TEST_CASE("compile statistics count memory, disk and NVRTC compiles", "[cpu]") {
  ScopedKernelCache cache;
  slowed::cuda::reset_compile_stats();
  slowed::cuda::compile_kernel(smoke(), 8, 0, false);
  slowed::cuda::compile_kernel(smoke(), 8, 0, false);
  slowed::cuda::clear_compiled_binaries_in_memory();
  slowed::cuda::compile_kernel(smoke(), 8, 0, false);
  const auto stats = slowed::cuda::compile_stats();
  CHECK(stats.nvrtc_compiles == 1);
  CHECK(stats.memory_hits == 1);
  CHECK(stats.disk_hits == 1);
  CHECK(stats.disk_writes == 1);
  CHECK(stats.nvrtc_milliseconds > 0.0);
  CHECK(stats.last.origin == CompileOrigin::DiskCache);
  CHECK(stats.last.target == "compute_80");
}

TEST_CASE("the CUDA path reports why it is unavailable and never throws", "[cpu]") {
  const bool available = slowed::cuda::cuda_jit_available();
  if (!available) {
    CHECK(!slowed::cuda::cuda_jit_unavailable_reason().empty());
  }
  if (!slowed::cuda::driver_available()) {
    CHECK(contains(slowed::cuda::driver_unavailable_reason(), "libcuda.so.1"));
    const std::string message = error_of([] {
      slowed::cuda::get_kernel(smoke(), "slowed_scale_add_f32", c10::Device(c10::kCUDA, 0));
    });
    CHECK(contains(message, "libcuda.so.1"));
  }
  CHECK(contains(error_of([] { slowed::cuda::get_kernel(smoke(), "slowed_scale_add_f32",
                                                         c10::Device(c10::kCPU)); }),
                 "device: expected a CUDA device, got cpu"));
  CHECK(contains(error_of([] { slowed::cuda::get_kernel(smoke(), "no_such_kernel",
                                                         c10::Device(c10::kCUDA, 0)); }),
                 "kernel_name: expected one of [slowed_scale_add_f32, slowed_scale_add_bf16]"));
}

TEST_CASE("warn_once_fallback warns exactly once per process", "[cpu]") {
  WarningCollector warnings;
  c10::WarningUtils::WarningHandlerGuard guard(&warnings);
  const bool first = slowed::cuda::warn_once_fallback("test_cuda_runtime");
  const bool second = slowed::cuda::warn_once_fallback("test_cuda_runtime");
  CHECK(first);
  CHECK_FALSE(second);
  REQUIRE(warnings.messages.size() == 1);
  CHECK(contains(warnings.messages[0], "test_cuda_runtime uses its ATen reference path"));
}

// ---------------------------------------------------------------------------------------------
// [cuda]: launches on a GPU

namespace {

/// out = alpha * x + y with the smoke kernels, on the current stream (the launcher pattern:
/// checks at the boundary, raw pointers and sizes to the kernel).
void smoke_scale_add(at::Tensor& out, const at::Tensor& x, const at::Tensor& y, float alpha,
                     unsigned shared_mem_bytes = 0) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && y.is_contiguous() && out.is_contiguous());
  TORCH_CHECK(x.sizes() == y.sizes() && x.sizes() == out.sizes());
  const char* name = x.scalar_type() == at::kFloat ? "slowed_scale_add_f32"
                                                   : "slowed_scale_add_bf16";
  const auto& kernel = slowed::cuda::get_kernel(smoke(), name, x.device());
  void* out_p = out.data_ptr();
  void* x_p = x.data_ptr();
  void* y_p = y.data_ptr();
  long long n = x.numel();
  void* args[] = {&out_p, &x_p, &y_p, &alpha, &n};
  const long long threads = 256, items = 4;
  const unsigned blocks = static_cast<unsigned>(
      std::max<long long>(1, std::min<long long>((n + threads * items - 1) / (threads * items),
                                                 65535)));
  slowed::cuda::launch(kernel, {blocks}, {static_cast<unsigned>(threads)}, shared_mem_bytes,
                       args, x.device());
}

bool skip_without_gpu() {
  if (!torch::cuda::is_available()) {
    WARN("no CUDA device: skipped");
    return true;
  }
  return false;
}

}  // namespace

TEST_CASE("the smoke kernels launched on the current stream match ATen", "[cuda]") {
  if (skip_without_gpu()) return;
  INFO(slowed::cuda::cuda_jit_unavailable_reason());
  REQUIRE(slowed::cuda::cuda_jit_available());
  torch::manual_seed(0);
  const float alpha = -1.75f;
  for (const int64_t n : {1, 7, 1000, 4096, (1 << 20) + 3}) {
    INFO("n = " << n);
    const auto opts = torch::TensorOptions().device(torch::kCUDA);
    const auto x = torch::randn({n}, opts);
    const auto y = torch::randn({n}, opts);

    auto out = torch::empty_like(x);
    smoke_scale_add(out, x, y, alpha);
    const auto expected = x * alpha + y;
    CHECK(torch::allclose(out, expected, /*rtol=*/1e-6, /*atol=*/1e-6));

    const auto xb = x.to(torch::kBFloat16);
    const auto yb = y.to(torch::kBFloat16);
    auto outb = torch::empty_like(xb);
    smoke_scale_add(outb, xb, yb, alpha);
    // fp32 arithmetic, one rounding: at most one bf16 ulp from ATen's fp32 result rounded once
    // (the kernel may contract to an FMA where ATen does not).
    const auto expected_b = (xb.to(torch::kFloat) * alpha + yb.to(torch::kFloat))
                                .to(torch::kBFloat16)
                                .to(torch::kFloat);
    CHECK(torch::allclose(outb.to(torch::kFloat), expected_b, /*rtol=*/1.0 / 128, 1e-30));
    const double exact = (outb.to(torch::kFloat) == expected_b).to(torch::kFloat).mean().item<double>();
    CHECK(exact > 0.99);
  }
}

TEST_CASE("bf16 stores round to nearest even like c10::BFloat16", "[cuda]") {
  if (skip_without_gpu()) return;
  // alpha = 1, y = 0: every one of the 65536 bf16 bit patterns goes bf16 -> fp32 -> bf16 and
  // must come back unchanged (NaN stays NaN; -0 + 0 = +0 in IEEE, so compare values).
  const auto bits = torch::arange(-32768, 32768, torch::TensorOptions().dtype(torch::kInt16));
  const auto all_bf16 = bits.view(torch::kBFloat16).to(torch::kCUDA);
  auto out = torch::empty_like(all_bf16);
  smoke_scale_add(out, all_bf16, torch::zeros_like(all_bf16), 1.0f);
  const auto in_f = all_bf16.to(torch::kFloat);
  const auto out_f = out.to(torch::kFloat);
  CHECK(torch::equal(torch::isnan(in_f), torch::isnan(out_f)));
  const auto finite = ~torch::isnan(in_f);
  CHECK(torch::equal(in_f.masked_select(finite), out_f.masked_select(finite)));
  // Exact ties (bf16 spacing near 1 is 2^-7):
  //   1 + 2^-8            -> 1           (even)
  //   (1 + 2^-7) + 2^-8   -> 1 + 2^-6    (even)
  //   -(1 + 2^-8)         -> -1
  //   1 + 2^-8 + 2^-15    -> 1 + 2^-7    (above the tie: up)
  const auto x = torch::tensor({1.0f, 1.0f + 1.0f / 128, -1.0f, 1.0f}).to(torch::kBFloat16);
  const auto y = torch::tensor({1.0f / 256, 1.0f / 256, -1.0f / 256, 1.0f / 256 + 1.0f / 32768})
                     .to(torch::kBFloat16);
  REQUIRE(torch::equal(y.to(torch::kFloat),
                       torch::tensor({1.0f / 256, 1.0f / 256, -1.0f / 256,
                                      1.0f / 256 + 1.0f / 32768})));  // all exact in bf16
  auto r = torch::empty_like(x).to(torch::kCUDA);
  smoke_scale_add(r, x.to(torch::kCUDA), y.to(torch::kCUDA), 1.0f);
  const auto expected = torch::tensor({1.0f, 1.0f + 1.0f / 64, -1.0f, 1.0f + 1.0f / 128});
  CHECK(torch::equal(r.to(torch::kCPU).to(torch::kFloat), expected));
  // c10::BFloat16 agrees.
  CHECK(torch::equal((x.to(torch::kFloat) + y.to(torch::kFloat)).to(torch::kBFloat16)
                         .to(torch::kFloat),
                     expected));
}

TEST_CASE("kernels run on a non-default current stream and with > 48 KiB shared memory",
          "[cuda]") {
  if (skip_without_gpu()) return;
  const c10::Device device(c10::kCUDA, 0);
  c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  const c10::Stream side = impl.getStreamFromGlobalPool(device);
  REQUIRE(side != impl.getDefaultStream(device));
  const auto x = torch::randn({1 << 22}, torch::kCUDA);
  const auto y = torch::randn({1 << 22}, torch::kCUDA);
  impl.getStream(device).synchronize();  // x and y are ready before the side stream reads them
  auto out = torch::empty_like(x);
  {
    c10::StreamGuard guard(side);
    smoke_scale_add(out, x, y, 0.5f);
    // ATen on the same (current) stream is ordered after the kernel without a sync.
    CHECK(torch::allclose(out, x * 0.5f + y, 1e-6, 1e-6));
  }
  const int optin = slowed::cuda::device_attribute(
      0, slowed::cuda::kCuDeviceAttributeMaxSharedMemoryPerBlockOptin);
  INFO("opt-in shared memory per block: " << optin);
  if (optin >= 64 * 1024) {
    auto out2 = torch::empty_like(x);
    smoke_scale_add(out2, x, y, 0.5f, 64 * 1024);
    CHECK(torch::equal(out2, out));
    const auto& k = slowed::cuda::get_kernel(smoke(), "slowed_scale_add_f32", device);
    CHECK(k.dynamic_shared_memory_limit() == 64u * 1024u);
  }
}

TEST_CASE("get_kernel loads once per device and reports the JIT latency", "[cuda]") {
  if (skip_without_gpu()) return;
  const c10::Device device(c10::kCUDA, 0);
  const auto& a = slowed::cuda::get_kernel(smoke(), "slowed_scale_add_f32", device);
  const auto& b = slowed::cuda::get_kernel(smoke(), "slowed_scale_add_f32", c10::Device(c10::kCUDA));
  CHECK(&a == &b);  // the current device is cuda:0 here
  const auto cc = slowed::cuda::compute_capability(0);
  const auto target = slowed::cuda::choose_compile_target(slowed::cuda::nvrtc(), cc.first,
                                                          cc.second, true);
  CHECK(a.compile_record().target == target.name());
  std::printf("first get_kernel on cuda:0 (%s, from %s): %.1f ms (compile %.1f ms)\n",
              a.compile_record().target.c_str(),
              slowed::cuda::compile_origin_name(a.compile_record().origin), a.load_milliseconds(),
              a.compile_record().milliseconds);
  // A define variant is another module.
  const auto& c = slowed::cuda::get_kernel(smoke().with_define("SLOWED_SCALE_ADD_ITEMS", "1"),
                                           "slowed_scale_add_f32", device);
  CHECK(&c != &a);
  CHECK(c.function() != a.function());
}

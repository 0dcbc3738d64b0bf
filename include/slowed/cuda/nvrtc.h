#pragma once

// NVRTC, the CUDA run-time compiler, loaded with dlopen at run time (docs: architecture.md,
// "Decision: CUDA kernels are compiled at run time"). No CUDA header is included: the few NVRTC
// types are declared here, the entry points are resolved with dlsym into an `NvrtcLibrary`.
//
// Search order (the first that loads and has every required entry point wins):
//   0. $SLOWED_NVRTC_LIBRARY, a full path: when set, it is the ONLY candidate (an explicit
//      request that cannot be honoured is an error, not a silent fallback);
//   1. a libnvrtc already loaded in the process (RTLD_NOLOAD of libnvrtc.so.13, .so.12, .so);
//   2. next to libtorch: <torch lib dir>/../../nvidia/cu13/lib/libnvrtc.so.13, .../cu12/lib/
//      libnvrtc.so.12 and .../cuda_nvrtc/lib/libnvrtc.so.12 (the pip wheels' layouts);
//   3. $CUDA_HOME/lib64/libnvrtc.so.{13,12,} ;
//   4. /usr/local/cuda/lib64/libnvrtc.so.{13,12,} ;
//   5. the plain sonames libnvrtc.so.13, .so.12, .so (the loader's own search path).

#include <c10/core/CPUAllocator.h>  // c10::GetCPUAllocator: a libc10 symbol that locates libtorch
#include <c10/util/Exception.h>

#include <dlfcn.h>
#include <link.h>

#include <climits>
#include <cstddef>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

namespace slowed {
namespace cuda {

// ---- NVRTC types, declared here so that no CUDA header is needed (nvrtc.h, CUDA 11-13) ----
using NvrtcResult = int;  ///< nvrtcResult
struct NvrtcProgramOpaque;
using NvrtcProgram = NvrtcProgramOpaque*;  ///< nvrtcProgram
constexpr NvrtcResult kNvrtcSuccess = 0;   ///< NVRTC_SUCCESS

/// One place where libnvrtc may be found, in search order.
struct NvrtcCandidate {
  std::string path;     ///< a full path, or a soname that dlopen resolves itself
  std::string origin;   ///< why it is a candidate: "already loaded", "next to libtorch", ...
  bool already_loaded;  ///< accept it only when the process has loaded it (RTLD_NOLOAD)
};

/// The NVRTC entry points resolved from one loaded libnvrtc. Not copyable; closes the library
/// when destroyed (the process-wide instance returned by `nvrtc()` is never destroyed).
struct NvrtcLibrary {
  using VersionFn = NvrtcResult (*)(int*, int*);
  using CreateProgramFn = NvrtcResult (*)(NvrtcProgram*, const char*, const char*, int,
                                          const char* const*, const char* const*);
  using CompileProgramFn = NvrtcResult (*)(NvrtcProgram, int, const char* const*);
  using GetSizeFn = NvrtcResult (*)(NvrtcProgram, size_t*);
  using GetBytesFn = NvrtcResult (*)(NvrtcProgram, char*);
  using DestroyProgramFn = NvrtcResult (*)(NvrtcProgram*);
  using GetErrorStringFn = const char* (*)(NvrtcResult);
  using GetNumSupportedArchsFn = NvrtcResult (*)(int*);
  using GetSupportedArchsFn = NvrtcResult (*)(int*);

  NvrtcLibrary() = default;
  NvrtcLibrary(const NvrtcLibrary&) = delete;
  NvrtcLibrary& operator=(const NvrtcLibrary&) = delete;
  ~NvrtcLibrary() {
    if (handle) dlclose(handle);
  }

  void* handle = nullptr;
  std::string path;    ///< the file that was loaded (resolved through dladdr when possible)
  std::string origin;  ///< the candidate's origin, see NvrtcCandidate
  int version_major = 0;
  int version_minor = 0;
  /// Architectures this NVRTC can compile for, as 10 * major + minor (75, 80, 90, ...).
  /// Empty when the library predates nvrtcGetSupportedArchs (then every arch is attempted).
  std::vector<int> supported_archs;

  VersionFn nvrtcVersion = nullptr;
  CreateProgramFn nvrtcCreateProgram = nullptr;
  CompileProgramFn nvrtcCompileProgram = nullptr;
  GetSizeFn nvrtcGetProgramLogSize = nullptr;
  GetBytesFn nvrtcGetProgramLog = nullptr;
  GetSizeFn nvrtcGetCUBINSize = nullptr;
  GetBytesFn nvrtcGetCUBIN = nullptr;
  GetSizeFn nvrtcGetPTXSize = nullptr;
  GetBytesFn nvrtcGetPTX = nullptr;
  DestroyProgramFn nvrtcDestroyProgram = nullptr;
  GetErrorStringFn nvrtcGetErrorString = nullptr;
  GetNumSupportedArchsFn nvrtcGetNumSupportedArchs = nullptr;  ///< optional
  GetSupportedArchsFn nvrtcGetSupportedArchs = nullptr;        ///< optional

  /// "13.0"
  std::string version_string() const {
    return std::to_string(version_major) + "." + std::to_string(version_minor);
  }

  /// NVRTC's name for a result code, e.g. "NVRTC_ERROR_COMPILATION".
  std::string error_string(NvrtcResult result) const {
    const char* s = nvrtcGetErrorString ? nvrtcGetErrorString(result) : nullptr;
    return s ? std::string(s) : "NVRTC error " + std::to_string(result);
  }
};

namespace detail {

inline std::string dirname_of(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

inline std::string basename_of(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

inline std::string real_path_or_same(const std::string& path) {
  char buffer[PATH_MAX];
  return ::realpath(path.c_str(), buffer) ? std::string(buffer) : path;
}

inline bool is_torch_library_name(const std::string& base) {
  return base.rfind("libc10", 0) == 0 || base.rfind("libtorch", 0) == 0;
}

inline int find_libc10_callback(struct dl_phdr_info* info, size_t, void* data) {
  if (info->dlpi_name && basename_of(info->dlpi_name) == "libc10.so") {
    *static_cast<std::string*>(data) = info->dlpi_name;
    return 1;
  }
  return 0;
}

/// The directory holding the loaded libc10/libtorch (e.g. .../site-packages/torch/lib), found
/// with dladdr on a libc10 function; "" when torch is linked statically or cannot be located.
inline std::string torch_library_dir() {
  Dl_info info{};
  const void* symbol = reinterpret_cast<const void*>(&c10::GetCPUAllocator);
  std::string file;
  if (dladdr(symbol, &info) != 0 && info.dli_fname &&
      is_torch_library_name(basename_of(info.dli_fname))) {
    file = info.dli_fname;
  } else {
    // The symbol resolved into the executable (e.g. a non-PIE canonical PLT entry): look the
    // loaded libc10.so up by name instead.
    dl_iterate_phdr(&find_libc10_callback, &file);
  }
  if (file.empty()) return "";
  return dirname_of(real_path_or_same(file));
}

inline std::string env_or_empty(const char* name) {
  const char* value = std::getenv(name);
  return value ? std::string(value) : std::string();
}

template <typename Fn>
bool resolve_symbol(void* handle, const char* name, Fn& out) {
  out = reinterpret_cast<Fn>(dlsym(handle, name));
  return out != nullptr;
}

/// Tries one candidate. Returns the library, or nullptr with `why` set.
inline std::unique_ptr<NvrtcLibrary> try_load_nvrtc(const NvrtcCandidate& candidate,
                                                    std::string& why) {
  dlerror();  // clear a stale error
  const int flags = RTLD_NOW | RTLD_LOCAL | (candidate.already_loaded ? RTLD_NOLOAD : 0);
  void* handle = dlopen(candidate.path.c_str(), flags);
  if (!handle) {
    if (candidate.already_loaded) {
      why = "not loaded";
    } else {
      const char* error = dlerror();
      why = error ? error : "dlopen failed";
    }
    return nullptr;
  }
  auto lib = std::make_unique<NvrtcLibrary>();
  lib->handle = handle;
  lib->origin = candidate.origin;
  std::string missing;
  auto need = [&](const char* name, auto& fn) {
    if (!resolve_symbol(handle, name, fn)) missing += (missing.empty() ? "" : ", ") + std::string(name);
  };
  need("nvrtcVersion", lib->nvrtcVersion);
  need("nvrtcCreateProgram", lib->nvrtcCreateProgram);
  need("nvrtcCompileProgram", lib->nvrtcCompileProgram);
  need("nvrtcGetProgramLogSize", lib->nvrtcGetProgramLogSize);
  need("nvrtcGetProgramLog", lib->nvrtcGetProgramLog);
  need("nvrtcGetCUBINSize", lib->nvrtcGetCUBINSize);
  need("nvrtcGetCUBIN", lib->nvrtcGetCUBIN);
  need("nvrtcGetPTXSize", lib->nvrtcGetPTXSize);
  need("nvrtcGetPTX", lib->nvrtcGetPTX);
  need("nvrtcDestroyProgram", lib->nvrtcDestroyProgram);
  need("nvrtcGetErrorString", lib->nvrtcGetErrorString);
  if (!missing.empty()) {
    why = "loaded, but lacks " + missing;
    return nullptr;  // ~NvrtcLibrary closes the handle
  }
  resolve_symbol(handle, "nvrtcGetNumSupportedArchs", lib->nvrtcGetNumSupportedArchs);
  resolve_symbol(handle, "nvrtcGetSupportedArchs", lib->nvrtcGetSupportedArchs);

  Dl_info info{};
  lib->path = (dladdr(reinterpret_cast<const void*>(lib->nvrtcVersion), &info) != 0 &&
               info.dli_fname)
                  ? std::string(info.dli_fname)
                  : candidate.path;
  const NvrtcResult version = lib->nvrtcVersion(&lib->version_major, &lib->version_minor);
  if (version != kNvrtcSuccess) {
    why = "loaded, but nvrtcVersion failed: " + lib->error_string(version);
    return nullptr;
  }
  if (lib->nvrtcGetNumSupportedArchs && lib->nvrtcGetSupportedArchs) {
    int count = 0;
    if (lib->nvrtcGetNumSupportedArchs(&count) == kNvrtcSuccess && count > 0) {
      std::vector<int> archs(static_cast<size_t>(count));
      if (lib->nvrtcGetSupportedArchs(archs.data()) == kNvrtcSuccess) {
        lib->supported_archs = std::move(archs);
      }
    }
  }
  return lib;
}

}  // namespace detail

/// The places libnvrtc is looked for, in order (see the top of this file). Reads the
/// environment (SLOWED_NVRTC_LIBRARY, CUDA_HOME) at each call.
inline std::vector<NvrtcCandidate> nvrtc_search_paths() {
  const std::string override_path = detail::env_or_empty("SLOWED_NVRTC_LIBRARY");
  if (!override_path.empty()) return {{override_path, "$SLOWED_NVRTC_LIBRARY", false}};

  std::vector<NvrtcCandidate> candidates;
  auto add = [&](const std::string& path, const std::string& origin, bool already_loaded) {
    for (const auto& c : candidates) {
      if (c.path == path && c.already_loaded == already_loaded) return;
    }
    candidates.push_back({path, origin, already_loaded});
  };
  const char* const sonames[] = {"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"};
  for (const char* soname : sonames) add(soname, "already loaded in the process", true);

  const std::string torch_dir = detail::torch_library_dir();
  if (!torch_dir.empty()) {
    // <torch lib dir> = .../site-packages/torch/lib, so ../../nvidia = .../site-packages/nvidia
    const std::string nvidia = detail::dirname_of(detail::dirname_of(torch_dir)) + "/nvidia";
    add(nvidia + "/cu13/lib/libnvrtc.so.13", "next to libtorch", false);
    add(nvidia + "/cu12/lib/libnvrtc.so.12", "next to libtorch", false);
    add(nvidia + "/cuda_nvrtc/lib/libnvrtc.so.12", "next to libtorch", false);
  }
  const std::string cuda_home = detail::env_or_empty("CUDA_HOME");
  if (!cuda_home.empty()) {
    for (const char* soname : sonames) add(cuda_home + "/lib64/" + soname, "$CUDA_HOME/lib64", false);
  }
  for (const char* soname : sonames) {
    add(std::string("/usr/local/cuda/lib64/") + soname, "/usr/local/cuda/lib64", false);
  }
  for (const char* soname : sonames) add(soname, "the loader's search path", false);
  return candidates;
}

/// Loads NVRTC from the first candidate that works. Throws c10::Error listing every candidate
/// tried and why each failed.
///
/// Example:
/// ```
/// auto lib = slowed::cuda::load_nvrtc(slowed::cuda::nvrtc_search_paths());
/// std::cout << lib->path << " NVRTC " << lib->version_string() << "\n";
/// ```
inline std::unique_ptr<NvrtcLibrary> load_nvrtc(const std::vector<NvrtcCandidate>& candidates) {
  std::ostringstream tried;
  int index = 0;
  for (const auto& candidate : candidates) {
    std::string why;
    if (auto lib = detail::try_load_nvrtc(candidate, why)) return lib;
    tried << "\n  " << ++index << ". " << candidate.path << " (" << candidate.origin
          << "): " << why;
  }
  TORCH_CHECK(false,
              "slowed: could not load NVRTC (libnvrtc), the CUDA run-time compiler that builds "
              "slowed's CUDA kernels. Tried, in order:",
              (index == 0 ? std::string("\n  (no candidates)") : tried.str()),
              "\nInstall the CUDA toolkit or the nvidia-cuda-nvrtc wheel, or set "
              "SLOWED_NVRTC_LIBRARY to the full path of libnvrtc.so.");
  return nullptr;  // unreachable
}

namespace detail {

struct NvrtcState {
  const NvrtcLibrary* library = nullptr;  // leaked on purpose: used until the process exits
  std::string error;
};

inline const NvrtcState& nvrtc_state() {
  static const NvrtcState state = [] {
    NvrtcState s;
    try {
      s.library = load_nvrtc(nvrtc_search_paths()).release();
    } catch (const c10::Error& e) {
      s.error = e.what_without_backtrace();
    }
    return s;
  }();
  return state;
}

}  // namespace detail

/// The process-wide NVRTC, loaded on first use with `nvrtc_search_paths()`. The outcome is
/// decided once per process; a failure throws the same c10::Error (listing the paths tried) on
/// every call.
///
/// Example:
/// ```
/// const auto& lib = slowed::cuda::nvrtc();
/// std::cout << "NVRTC " << lib.version_string() << " from " << lib.path << "\n";
/// ```
inline const NvrtcLibrary& nvrtc() {
  const auto& state = detail::nvrtc_state();
  TORCH_CHECK(state.library != nullptr, state.error);
  return *state.library;
}

/// Whether `nvrtc()` can be used. Never throws.
inline bool nvrtc_available() noexcept {
  try {
    return detail::nvrtc_state().library != nullptr;
  } catch (...) {
    return false;
  }
}

/// Why NVRTC cannot be used ("" when it can). Never throws.
inline std::string nvrtc_unavailable_reason() noexcept {
  try {
    return detail::nvrtc_state().error;
  } catch (...) {
    return "NVRTC state could not be read";
  }
}

}  // namespace cuda
}  // namespace slowed

#pragma once

// The run-time CUDA kernel compiler: NVRTC compiles a KernelSource for the device's own sm_XY,
// the binary is cached in the process and on disk, the CUDA driver loads it into the device's
// primary context (the one torch uses), and `launch` runs it on torch's current stream. Nothing
// here needs a CUDA header or a CUDA build of slowed: NVRTC and libcuda are dlopen()ed, the
// stream comes from c10's device-guard registry, so this header compiles against a CPU-only
// libtorch and the CUDA path switches on at run time.
//
// Typical launcher (see tests/test_cuda_runtime.cpp for a complete one):
//
//   if (!slowed::cuda::cuda_jit_available()) {
//     slowed::cuda::warn_once_fallback("entropy_masked_cross_entropy");
//     return reference(...);
//   }
//   const auto& k = slowed::cuda::get_kernel(my_source(), "my_kernel", x.device());
//   void* args[] = {&out_ptr, &x_ptr, &n};
//   slowed::cuda::launch(k, {blocks}, {256}, /*shared_mem_bytes=*/0, args, x.device());
//
// Caches: compiled binaries by (source hash, kernel names, NVRTC options incl. target and
// defines, NVRTC version) in memory and on disk (slowed/cuda/kernel_cache.h); loaded functions
// by (source variant, device). Modules stay loaded until the process exits.

#include <slowed/cuda/driver.h>
#include <slowed/cuda/kernel_cache.h>
#include <slowed/cuda/kernel_source.h>
#include <slowed/cuda/nvrtc.h>

#include <c10/core/Device.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace slowed {
namespace cuda {

/// What NVRTC is asked to produce for a device.
struct CompileTarget {
  int arch = 0;                        ///< 10 * major + minor of the target, e.g. 90
  BinaryKind kind = BinaryKind::Cubin;
  /// True when NVRTC does not know the device's architecture: `arch` is then the newest older
  /// virtual architecture it supports, and `kind` is PTX (the driver JIT-compiles it at load).
  bool ptx_fallback = false;

  /// "sm_90" (cubin) or "compute_90" (PTX).
  std::string name() const {
    return (kind == BinaryKind::Cubin ? "sm_" : "compute_") + std::to_string(arch);
  }
};

/// Chooses the target for compute capability `arch_major`.`arch_minor`: sm_XY (cubin) or
/// compute_XY (PTX) when NVRTC knows the architecture; otherwise PTX for the newest older
/// architecture NVRTC supports. Throws when the device is older than anything NVRTC supports.
inline CompileTarget choose_compile_target(const NvrtcLibrary& lib, int arch_major,
                                           int arch_minor, bool cubin) {
  TORCH_CHECK(arch_major >= 1 && arch_minor >= 0 && arch_minor <= 9,
              "compute capability: expected major >= 1 and minor in [0, 9], got ", arch_major, ".",
              arch_minor);
  CompileTarget target;
  target.arch = arch_major * 10 + arch_minor;
  target.kind = cubin ? BinaryKind::Cubin : BinaryKind::Ptx;
  const auto& archs = lib.supported_archs;
  if (archs.empty() || std::find(archs.begin(), archs.end(), target.arch) != archs.end()) {
    return target;
  }
  int best = -1;
  for (int a : archs) {
    if (a <= target.arch && a > best) best = a;
  }
  TORCH_CHECK(best >= 0, "slowed: NVRTC ", lib.version_string(), " (", lib.path,
              ") cannot compile for compute capability ", arch_major, ".", arch_minor,
              ": the oldest architecture it supports is ",
              *std::min_element(archs.begin(), archs.end()));
  target.arch = best;
  target.kind = BinaryKind::Ptx;
  target.ptx_fallback = true;
  return target;
}

/// The NVRTC options for `source` and `target`, in order: C++17, unqualified functions are
/// device functions, the target architecture, then the source's -D definitions. Fast math is
/// deliberately off (accuracy first; a kernel opts into an intrinsic explicitly).
inline std::vector<std::string> nvrtc_options(const KernelSource& source,
                                              const CompileTarget& target) {
  std::vector<std::string> options = {"--std=c++17", "-default-device",
                                      "--gpu-architecture=" + target.name()};
  for (const auto& d : source.defines()) options.push_back("-D" + d.first + "=" + d.second);
  return options;
}

/// Where a compiled binary came from.
enum class CompileOrigin {
  MemoryCache,  ///< compiled earlier in this process
  DiskCache,    ///< read from a valid cache file
  Nvrtc,        ///< compiled by NVRTC now
};

inline const char* compile_origin_name(CompileOrigin origin) {
  switch (origin) {
    case CompileOrigin::MemoryCache: return "memory cache";
    case CompileOrigin::DiskCache: return "disk cache";
    case CompileOrigin::Nvrtc: return "nvrtc";
  }
  return "?";
}

/// How one `compile_kernel` call was served, and how long it took (wall time of the whole call,
/// cache lookups and file writes included).
struct CompileRecord {
  std::string family;
  std::string target;         ///< "sm_90" or "compute_90"
  bool ptx_fallback = false;  ///< see CompileTarget::ptx_fallback
  CompileOrigin origin = CompileOrigin::Nvrtc;
  double milliseconds = 0.0;
  size_t binary_bytes = 0;
  std::string cache_path;       ///< the disk cache file ("" when there is no cache folder)
  std::string disk_cache_note;  ///< why a cache file was rejected or not written ("" if fine)
};

/// A compiled binary (shared with the in-process cache) and how it was obtained.
struct CompileResult {
  std::shared_ptr<const std::string> binary;  ///< cubin bytes, or PTX text (no trailing NUL)
  CompileRecord record;
};

/// Counters of this process since start or `reset_compile_stats()`.
struct CompileStats {
  int64_t memory_hits = 0;
  int64_t disk_hits = 0;
  int64_t nvrtc_compiles = 0;
  int64_t disk_rejected = 0;        ///< cache files found invalid (then rebuilt)
  int64_t disk_writes = 0;
  int64_t disk_write_failures = 0;
  double nvrtc_milliseconds = 0.0;  ///< total wall time of calls served by NVRTC
  CompileRecord last;               ///< the latest compile_kernel call of any thread
};

/// A kernel entry point loaded on one device. Obtained from `get_kernel`, valid until the
/// process exits.
class KernelHandle {
 public:
  KernelHandle(CUfunction function, c10::DeviceIndex device_index, std::string name,
               CompileRecord record, double load_milliseconds)
      : function_(function),
        device_index_(device_index),
        name_(std::move(name)),
        record_(std::move(record)),
        load_milliseconds_(load_milliseconds) {}
  KernelHandle(const KernelHandle&) = delete;
  KernelHandle& operator=(const KernelHandle&) = delete;

  CUfunction function() const { return function_; }
  c10::DeviceIndex device_index() const { return device_index_; }
  /// The entry point's name.
  const std::string& name() const { return name_; }
  /// How the module's binary was obtained (origin, target, compile time).
  const CompileRecord& compile_record() const { return record_; }
  /// Wall time of the first `get_kernel` of this module on this device: compile (or cache
  /// read) plus cuModuleLoadData.
  double load_milliseconds() const { return load_milliseconds_; }

  /// The dynamic shared memory this function may use; raised by `launch` on demand.
  unsigned dynamic_shared_memory_limit() const { return shared_limit_.load(); }
  void set_dynamic_shared_memory_limit(unsigned bytes) const { shared_limit_.store(bytes); }

 private:
  CUfunction function_;
  c10::DeviceIndex device_index_;
  std::string name_;
  CompileRecord record_;
  double load_milliseconds_;
  mutable std::atomic<unsigned> shared_limit_{kDefaultDynamicSharedMemoryLimit};
};

namespace detail {

struct LoadedModule {
  CUmodule module = nullptr;
  CompileRecord record;
  double load_milliseconds = 0.0;  // compile (or cache read) + cuModuleLoadData
  std::map<std::string, std::unique_ptr<KernelHandle>> functions;
};

struct JitState {
  std::mutex mutex;  // guards everything below but `load_mutex`
  std::unordered_map<std::string, std::shared_ptr<const std::string>> binaries;
  CompileStats stats;
  std::set<std::string> warned_cache_dirs;
  std::unordered_map<std::string, std::unique_ptr<LoadedModule>> modules;
  std::mutex load_mutex;  // serializes module loads (first use of a kernel on a device)
};

/// Leaked on purpose: modules and binaries live until the process exits, and no static
/// destructor may run after the driver has been torn down.
inline JitState& jit_state() {
  static JitState* state = new JitState();
  return *state;
}

inline double milliseconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

inline std::string join(const std::vector<std::string>& items, const char* separator) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? separator : "") + items[i];
  return out;
}

/// The cache key: a text naming everything the binary depends on.
inline std::string compile_key(const NvrtcLibrary& lib, const KernelSource& source,
                               const CompileTarget& target,
                               const std::vector<std::string>& options) {
  std::ostringstream key;
  key << "slowed kernel cache key v1\n"
      << "family: " << source.family() << "\n"
      << "source: fnv1a64 " << hex64(source.source_hash()) << " bytes " << source.source().size()
      << "\n"
      << "kernels: " << join(source.kernels(), " ") << "\n"
      << "nvrtc: " << lib.version_string() << "\n"
      << "target: " << target.name() << "\n"
      << "options: " << join(options, " | ") << "\n";
  return key.str();
}

/// Runs NVRTC. Throws c10::Error with the family, kernels, target, options and the full log.
inline std::string nvrtc_compile(const NvrtcLibrary& lib, const KernelSource& source,
                                 const CompileTarget& target,
                                 const std::vector<std::string>& options) {
  const std::string what = "kernel family '" + source.family() + "' (kernels: " +
                           join(source.kernels(), ", ") + ") for " + target.name();
  NvrtcProgram program = nullptr;
  const std::string program_name = source.family() + ".cu";
  NvrtcResult r = lib.nvrtcCreateProgram(&program, source.source().c_str(), program_name.c_str(),
                                         0, nullptr, nullptr);
  TORCH_CHECK(r == kNvrtcSuccess, "slowed: nvrtcCreateProgram failed for ", what, ": ",
              lib.error_string(r));
  struct ProgramGuard {
    const NvrtcLibrary& lib;
    NvrtcProgram& program;
    ~ProgramGuard() { lib.nvrtcDestroyProgram(&program); }
  } guard{lib, program};

  std::vector<const char*> argv;
  for (const auto& o : options) argv.push_back(o.c_str());
  r = lib.nvrtcCompileProgram(program, static_cast<int>(argv.size()), argv.data());
  if (r != kNvrtcSuccess) {
    std::string log;
    size_t log_size = 0;
    if (lib.nvrtcGetProgramLogSize(program, &log_size) == kNvrtcSuccess && log_size > 1) {
      log.assign(log_size, '\0');
      if (lib.nvrtcGetProgramLog(program, &log[0]) != kNvrtcSuccess) log.clear();
      while (!log.empty() && log.back() == '\0') log.pop_back();
    }
    TORCH_CHECK(false, "slowed: NVRTC ", lib.version_string(), " failed to compile ", what, ": ",
                lib.error_string(r), "\noptions: ", join(options, " "), "\nNVRTC log:\n",
                log.empty() ? std::string("(empty)") : log);
  }
  const bool cubin = target.kind == BinaryKind::Cubin;
  size_t size = 0;
  r = cubin ? lib.nvrtcGetCUBINSize(program, &size) : lib.nvrtcGetPTXSize(program, &size);
  TORCH_CHECK(r == kNvrtcSuccess, "slowed: reading the ", binary_kind_name(target.kind),
              " size of ", what, " failed: ", lib.error_string(r));
  std::string binary(size, '\0');
  r = cubin ? lib.nvrtcGetCUBIN(program, &binary[0]) : lib.nvrtcGetPTX(program, &binary[0]);
  TORCH_CHECK(r == kNvrtcSuccess, "slowed: reading the ", binary_kind_name(target.kind), " of ",
              what, " failed: ", lib.error_string(r));
  if (!cubin) {
    while (!binary.empty() && binary.back() == '\0') binary.pop_back();  // PTX is NUL-terminated
  }
  TORCH_CHECK(!binary.empty(), "slowed: NVRTC returned an empty ", binary_kind_name(target.kind),
              " for ", what);
  return binary;
}

inline void finish_record(JitState& state, CompileRecord& record,
                          std::chrono::steady_clock::time_point start) {
  record.milliseconds = milliseconds_since(start);
  std::lock_guard<std::mutex> lock(state.mutex);
  switch (record.origin) {
    case CompileOrigin::MemoryCache: ++state.stats.memory_hits; break;
    case CompileOrigin::DiskCache: ++state.stats.disk_hits; break;
    case CompileOrigin::Nvrtc:
      ++state.stats.nvrtc_compiles;
      state.stats.nvrtc_milliseconds += record.milliseconds;
      break;
  }
  state.stats.last = record;
}

}  // namespace detail

/// Compiles `source` for compute capability `arch_major`.`arch_minor` (cubin for sm_XY when
/// `cubin`, else PTX for compute_XY; PTX for an older architecture when NVRTC does not know this
/// one), served from the in-process cache, then the disk cache, then NVRTC. Thread-safe.
///
/// Throws c10::Error when NVRTC cannot be loaded (listing the paths tried) or the source does not
/// compile (with the family name and NVRTC's full log). A disk cache that cannot be written is
/// not an error: one warning per folder, and the process goes on without it.
///
/// Example:
/// ```
/// auto result = slowed::cuda::compile_kernel(source, 9, 0, /*cubin=*/true);
/// std::cout << result.record.target << " " << compile_origin_name(result.record.origin) << " "
///           << result.record.milliseconds << " ms\n";
/// ```
inline CompileResult compile_kernel(const KernelSource& source, int arch_major, int arch_minor,
                                    bool cubin) {
  const auto start = std::chrono::steady_clock::now();
  const NvrtcLibrary& lib = nvrtc();
  const CompileTarget target = choose_compile_target(lib, arch_major, arch_minor, cubin);
  const std::vector<std::string> options = nvrtc_options(source, target);
  const std::string key = detail::compile_key(lib, source, target, options);
  auto& state = detail::jit_state();

  CompileResult result;
  CompileRecord& record = result.record;
  record.family = source.family();
  record.target = target.name();
  record.ptx_fallback = target.ptx_fallback;
  {
    std::lock_guard<std::mutex> lock(state.mutex);
    auto it = state.binaries.find(key);
    if (it != state.binaries.end()) result.binary = it->second;
  }
  if (result.binary) {
    record.origin = CompileOrigin::MemoryCache;
    record.binary_bytes = result.binary->size();
    detail::finish_record(state, record, start);
    return result;
  }

  const std::string dir = kernel_cache_dir();
  if (!dir.empty()) {
    record.cache_path =
        dir + "/" + detail::cache_file_name(source.family(), target.name(), key, target.kind);
    std::string bytes, why;
    bool missing = false;
    if (detail::read_whole_file(record.cache_path, bytes, missing, why)) {
      std::string payload;
      if (detail::decode_cache_file(bytes, key, target.kind, payload, why)) {
        result.binary = std::make_shared<const std::string>(std::move(payload));
      } else {
        record.disk_cache_note = "rejected " + record.cache_path + ": " + why;
        std::lock_guard<std::mutex> lock(state.mutex);
        ++state.stats.disk_rejected;
      }
    } else if (!missing) {
      record.disk_cache_note = "could not read " + record.cache_path + ": " + why;
    }
  }
  if (result.binary) {
    record.origin = CompileOrigin::DiskCache;
  } else {
    record.origin = CompileOrigin::Nvrtc;
    result.binary =
        std::make_shared<const std::string>(detail::nvrtc_compile(lib, source, target, options));
    if (!dir.empty()) {
      std::string why;
      const bool written =
          detail::make_directories(dir, why) &&
          detail::write_file_atomically(
              record.cache_path, detail::encode_cache_file(key, target.kind, *result.binary), why);
      bool warn = false;
      {
        std::lock_guard<std::mutex> lock(state.mutex);
        if (written) {
          ++state.stats.disk_writes;
        } else {
          ++state.stats.disk_write_failures;
          warn = state.warned_cache_dirs.insert(dir).second;
        }
      }
      if (!written) {
        const std::string note = "could not write the kernel cache: " + why;
        record.disk_cache_note += (record.disk_cache_note.empty() ? "" : "; ") + note;
        if (warn) {
          TORCH_WARN("slowed: ", note, ". Compiled CUDA kernels are not cached on disk in ", dir,
                     " (set SLOWED_CACHE_DIR to a writable folder); continuing without it.");
        }
      }
    }
  }
  record.binary_bytes = result.binary->size();
  {
    std::lock_guard<std::mutex> lock(state.mutex);
    state.binaries.emplace(key, result.binary);  // a racing thread's identical entry may win
  }
  detail::finish_record(state, record, start);
  return result;
}

/// The binary of `source` for `arch_major`.`arch_minor`: a cubin (ELF) for sm_XY when `cubin`,
/// else PTX text for compute_XY. See `compile_kernel` for caching, fallbacks and errors.
///
/// Example:
/// ```
/// std::string elf = slowed::cuda::compile_to_binary(
///     slowed::cuda::kernels::slow_tuning_source(slowed::detail::StorageDtype::Float32), 8, 0,
///     /*cubin=*/true);
/// ```
inline std::string compile_to_binary(const KernelSource& source, int arch_major, int arch_minor,
                                     bool cubin) {
  return *compile_kernel(source, arch_major, arch_minor, cubin).binary;
}

/// The compile counters and the latest record.
inline CompileStats compile_stats() {
  auto& state = detail::jit_state();
  std::lock_guard<std::mutex> lock(state.mutex);
  return state.stats;
}

inline void reset_compile_stats() {
  auto& state = detail::jit_state();
  std::lock_guard<std::mutex> lock(state.mutex);
  state.stats = CompileStats();
}

/// Forgets the compiled binaries held in memory (loaded kernels stay loaded), so the next
/// `compile_kernel` reads the disk cache or runs NVRTC: for tests and JIT-latency benchmarks.
inline void clear_compiled_binaries_in_memory() {
  auto& state = detail::jit_state();
  std::lock_guard<std::mutex> lock(state.mutex);
  state.binaries.clear();
}

namespace detail {

inline c10::DeviceIndex cuda_device_index(c10::Device device, const char* argument) {
  TORCH_CHECK(device.is_cuda(), argument, ": expected a CUDA device, got ", device);
  if (device.has_index()) return device.index();
  return c10::impl::VirtualGuardImpl(c10::DeviceType::CUDA).getDevice().index();
}

}  // namespace detail

/// Grid or block dimensions (CUDA's dim3).
struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
  Dim3() = default;
  Dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}  // NOLINT
};

/// A replacement for module loading and kernel launch, for tests: while one is installed,
/// `get_kernel` and `launch` hand their arguments to it instead of the driver (after checking the
/// kernel name). The host emulator of tests/emulator installs one to run the kernel sources
/// through the real launchers without a GPU (docs/emulator.md). Production code installs none;
/// the cost without one is a relaxed atomic load per call.
class KernelBackend {
 public:
  virtual ~KernelBackend() = default;
  virtual const KernelHandle& get_kernel(const KernelSource& source, const std::string& kernel_name,
                                         c10::Device device) = 0;
  virtual void launch(const KernelHandle& kernel, Dim3 grid, Dim3 block, unsigned shared_mem_bytes,
                      void** args, c10::Device device) = 0;
};

namespace detail {
inline std::atomic<KernelBackend*>& kernel_backend() {
  static std::atomic<KernelBackend*> backend{nullptr};
  return backend;
}
}  // namespace detail

/// Installs `backend` (nullptr: the driver again); returns the one it replaces. For tests.
inline KernelBackend* set_kernel_backend(KernelBackend* backend) {
  return detail::kernel_backend().exchange(backend);
}

/// The entry point `kernel_name` of `source` loaded on `device` (torch's current CUDA device when
/// it has no index): compiled on first use for the device's compute capability (see
/// `compile_kernel`), loaded into the device's primary context, then cached per (source variant,
/// device). Thread-safe; the fast path is one map lookup.
///
/// Example:
/// ```
/// const auto& k = slowed::cuda::get_kernel(
///     slowed::cuda::kernels::entropy_masked_ce_source(slowed::detail::StorageDtype::BFloat16),
///     "slowed_emce_scale_rows", x.device());
/// ```
inline const KernelHandle& get_kernel(const KernelSource& source, const std::string& kernel_name,
                                      c10::Device device) {
  TORCH_CHECK(source.has_kernel(kernel_name), "kernel_name: expected one of [",
              detail::join(source.kernels(), ", "), "] of kernel family '", source.family(),
              "', got '", kernel_name, "'");
  if (KernelBackend* backend = detail::kernel_backend().load(std::memory_order_relaxed))
    return backend->get_kernel(source, kernel_name, device);
  TORCH_CHECK(device.is_cuda(), "device: expected a CUDA device, got ", device);
  const DriverLibrary& cu = driver();  // throws a clear error without a driver
  const c10::DeviceIndex index = detail::cuda_device_index(device, "device");
  const std::string module_key = source.identity() + " @cuda:" + std::to_string(index);
  auto& state = detail::jit_state();

  auto find = [&]() -> const KernelHandle* {
    std::lock_guard<std::mutex> lock(state.mutex);
    auto m = state.modules.find(module_key);
    if (m == state.modules.end()) return nullptr;
    auto f = m->second->functions.find(kernel_name);
    return f == m->second->functions.end() ? nullptr : f->second.get();
  };
  if (const KernelHandle* handle = find()) return *handle;

  std::lock_guard<std::mutex> load_lock(state.load_mutex);
  if (const KernelHandle* handle = find()) return *handle;  // loaded while we waited

  const auto start = std::chrono::steady_clock::now();
  const c10::Device cuda_device(c10::DeviceType::CUDA, index);
  c10::DeviceGuard guard(cuda_device);
  make_primary_context_current(index);
  const std::string on = " on cuda:" + std::to_string(index);

  detail::LoadedModule* loaded = nullptr;
  {
    std::lock_guard<std::mutex> lock(state.mutex);
    auto m = state.modules.find(module_key);
    if (m != state.modules.end()) loaded = m->second.get();
  }
  if (loaded == nullptr) {
    const auto cc = compute_capability(index);
    CompileResult compiled = compile_kernel(source, cc.first, cc.second, /*cubin=*/true);
    auto module = std::make_unique<detail::LoadedModule>();
    module->record = compiled.record;
    check_cu(cu.cuModuleLoadData(&module->module, compiled.binary->c_str()), "cuModuleLoadData",
             "loading kernel family '" + source.family() + "' (" + compiled.record.target + " " +
                 (compiled.record.target.rfind("sm_", 0) == 0 ? "cubin" : "PTX") + ", " +
                 std::to_string(compiled.binary->size()) + " bytes, compute capability " +
                 std::to_string(cc.first) + "." + std::to_string(cc.second) + ")" + on);
    module->load_milliseconds = detail::milliseconds_since(start);
    std::lock_guard<std::mutex> lock(state.mutex);
    loaded = module.get();
    state.modules.emplace(module_key, std::move(module));
  }
  CUfunction function = nullptr;
  check_cu(cu.cuModuleGetFunction(&function, loaded->module, kernel_name.c_str()),
           "cuModuleGetFunction",
           "looking up kernel '" + kernel_name + "' of family '" + source.family() + "'" + on);
  auto handle =
      std::make_unique<KernelHandle>(function, index, kernel_name, loaded->record,
                                     loaded->load_milliseconds);
  std::lock_guard<std::mutex> lock(state.mutex);
  const KernelHandle& out = *handle;
  loaded->functions.emplace(kernel_name, std::move(handle));
  return out;
}

/// Launches `kernel` on torch's current stream of `device` with `args` (an array of pointers to
/// each argument, as cuLaunchKernel takes). `shared_mem_bytes` above 48 KiB opts the function
/// into that much dynamic shared memory first. Asynchronous, like any kernel launch.
///
/// Example:
/// ```
/// float alpha = 2.0f;
/// long long n = x.numel();
/// void* out_p = out.data_ptr(); void* x_p = x.data_ptr(); void* y_p = y.data_ptr();
/// void* args[] = {&out_p, &x_p, &y_p, &alpha, &n};
/// slowed::cuda::launch(k, {unsigned((n + 1023) / 1024)}, {256}, 0, args, x.device());
/// ```
inline void launch(const KernelHandle& kernel, Dim3 grid, Dim3 block, unsigned shared_mem_bytes,
                   void** args, c10::Device device) {
  if (KernelBackend* backend = detail::kernel_backend().load(std::memory_order_relaxed))
    return backend->launch(kernel, grid, block, shared_mem_bytes, args, device);
  const c10::DeviceIndex index = detail::cuda_device_index(device, "device");
  TORCH_CHECK(index == kernel.device_index(), "device: expected cuda:",
              static_cast<int>(kernel.device_index()), " (where kernel '", kernel.name(),
              "' was loaded), got cuda:", static_cast<int>(index));
  TORCH_CHECK(grid.x > 0 && grid.y > 0 && grid.z > 0,
              "grid: expected positive dimensions, got (", grid.x, ", ", grid.y, ", ", grid.z, ")");
  TORCH_CHECK(block.x > 0 && block.y > 0 && block.z > 0,
              "block: expected positive dimensions, got (", block.x, ", ", block.y, ", ", block.z,
              ")");
  const DriverLibrary& cu = driver();
  const c10::Device cuda_device(c10::DeviceType::CUDA, index);
  c10::DeviceGuard guard(cuda_device);
  make_primary_context_current(index);
  auto on = [&] { return "kernel '" + kernel.name() + "' on cuda:" + std::to_string(index); };
  if (shared_mem_bytes > kernel.dynamic_shared_memory_limit()) {
    check_cu(cu.cuFuncSetAttribute(kernel.function(), kCuFuncAttributeMaxDynamicSharedSizeBytes,
                                   static_cast<int>(shared_mem_bytes)),
             "cuFuncSetAttribute",
             "allowing " + std::to_string(shared_mem_bytes) + " bytes of dynamic shared memory for " +
                 on());
    kernel.set_dynamic_shared_memory_limit(shared_mem_bytes);
  }
  const c10::Stream stream =
      c10::impl::VirtualGuardImpl(c10::DeviceType::CUDA).getStream(cuda_device);
  auto* cu_stream = static_cast<CUstream>(stream.native_handle());
  const CUresult r = cu.cuLaunchKernel(kernel.function(), grid.x, grid.y, grid.z, block.x, block.y,
                                       block.z, shared_mem_bytes, cu_stream, args, nullptr);
  if (r != kCudaSuccess) {
    std::ostringstream doing;
    doing << "launching " << on() << " with grid (" << grid.x << ", " << grid.y << ", " << grid.z
          << "), block (" << block.x << ", " << block.y << ", " << block.z << "), "
          << shared_mem_bytes << " bytes of dynamic shared memory";
    check_cu(r, "cuLaunchKernel", doing.str());
  }
}

/// Whether the run-time CUDA path can be used: NVRTC and the CUDA driver load, and torch has
/// CUDA support. Never throws. Callers fall back to the ATen reference path when false.
inline bool cuda_jit_available() noexcept {
  try {
    return nvrtc_available() && driver_available() &&
           c10::impl::hasDeviceGuardImpl(c10::DeviceType::CUDA);
  } catch (...) {
    return false;
  }
}

/// Why `cuda_jit_available()` is false ("" when it is true). Never throws.
inline std::string cuda_jit_unavailable_reason() noexcept {
  try {
    std::string reason = nvrtc_unavailable_reason();
    const std::string driver_reason = driver_unavailable_reason();
    if (!driver_reason.empty()) reason += (reason.empty() ? "" : "; ") + driver_reason;
    if (!c10::impl::hasDeviceGuardImpl(c10::DeviceType::CUDA)) {
      reason += (reason.empty() ? "" : "; ") + std::string("this libtorch has no CUDA support");
    }
    return reason;
  } catch (...) {
    return "the CUDA run-time state could not be read";
  }
}

/// Emits, once per process, the warning that `what` falls back to its ATen reference path
/// because the run-time CUDA compiler cannot be used. Returns true for the call that warned.
///
/// Example:
/// ```
/// if (logits.is_cuda() && !slowed::cuda::cuda_jit_available()) {
///   slowed::cuda::warn_once_fallback("EntropyMaskedCrossEntropy");
///   return reference_path(logits, targets);
/// }
/// ```
inline bool warn_once_fallback(const std::string& what) {
  static std::atomic<bool> warned{false};
  if (warned.exchange(true)) return false;
  const std::string reason = cuda_jit_unavailable_reason();
  TORCH_WARN("slowed: ", what, " uses its ATen reference path on CUDA because the run-time CUDA "
             "compiler cannot be used (", reason.empty() ? std::string("reason unknown") : reason,
             "). This warning is shown once per process.");
  return true;
}

}  // namespace cuda
}  // namespace slowed

#pragma once

// The CUDA driver API (libcuda.so.1), loaded with dlopen at run time: just what loading and
// launching an NVRTC-compiled kernel needs. No CUDA header is included: the opaque handles,
// the few enum values and the function-pointer types are declared here (values from cuda.h,
// stable since CUDA 4). The library is loaded and cuInit(0) called once per process.
//
// Contexts: torch uses each device's primary context, so slowed does too. Before loading a
// module or launching, `make_primary_context_current(device)` makes the device's primary
// context current on the calling thread (torch's own device guard usually has done so already).

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <dlfcn.h>

#include <cstddef>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace slowed {
namespace cuda {

// ---- CUDA driver types, declared here so that no CUDA header is needed ----
using CUresult = int;  ///< CUresult
using CUdevice = int;  ///< CUdevice
struct CUctxOpaque;
struct CUmodOpaque;
struct CUfuncOpaque;
struct CUstreamOpaque;
using CUcontext = CUctxOpaque*;     ///< CUcontext
using CUmodule = CUmodOpaque*;      ///< CUmodule
using CUfunction = CUfuncOpaque*;   ///< CUfunction
using CUstream = CUstreamOpaque*;   ///< CUstream (cudaStream_t is the same pointer)

constexpr CUresult kCudaSuccess = 0;  ///< CUDA_SUCCESS
// CUdevice_attribute values
constexpr int kCuDeviceAttributeComputeCapabilityMajor = 75;
constexpr int kCuDeviceAttributeComputeCapabilityMinor = 76;
constexpr int kCuDeviceAttributeMaxSharedMemoryPerBlockOptin = 97;
// CUfunction_attribute values
constexpr int kCuFuncAttributeMaxDynamicSharedSizeBytes = 8;
/// Dynamic shared memory a kernel may use without opting in with cuFuncSetAttribute.
constexpr unsigned kDefaultDynamicSharedMemoryLimit = 48u * 1024u;

/// The driver entry points, resolved from libcuda.so.1.
struct DriverLibrary {
  void* handle = nullptr;
  std::string path;
  int driver_version = 0;  ///< cuDriverGetVersion, e.g. 13000

  CUresult (*cuInit)(unsigned int) = nullptr;
  CUresult (*cuDriverGetVersion)(int*) = nullptr;
  CUresult (*cuDeviceGet)(CUdevice*, int) = nullptr;
  CUresult (*cuDeviceGetAttribute)(int*, int, CUdevice) = nullptr;
  CUresult (*cuCtxGetCurrent)(CUcontext*) = nullptr;
  CUresult (*cuCtxSetCurrent)(CUcontext) = nullptr;
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice) = nullptr;
  CUresult (*cuModuleLoadData)(CUmodule*, const void*) = nullptr;
  CUresult (*cuModuleUnload)(CUmodule) = nullptr;
  CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*) = nullptr;
  CUresult (*cuFuncSetAttribute)(CUfunction, int, int) = nullptr;
  CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                             unsigned, unsigned, CUstream, void**, void**) = nullptr;
  CUresult (*cuGetErrorString)(CUresult, const char**) = nullptr;
  CUresult (*cuGetErrorName)(CUresult, const char**) = nullptr;

  /// "CUDA_ERROR_INVALID_IMAGE (device kernel image is invalid)"
  std::string describe(CUresult result) const {
    const char* name = nullptr;
    const char* text = nullptr;
    if (cuGetErrorName == nullptr || cuGetErrorName(result, &name) != kCudaSuccess) name = nullptr;
    if (cuGetErrorString == nullptr || cuGetErrorString(result, &text) != kCudaSuccess) {
      text = nullptr;
    }
    std::string out = name ? name : "CUresult " + std::to_string(result);
    if (text) out += std::string(" (") + text + ")";
    return out;
  }
};

namespace detail {

struct DriverState {
  const DriverLibrary* library = nullptr;  // leaked on purpose: used until the process exits
  std::string error;
};

inline const DriverState& driver_state() {
  static const DriverState state = [] {
    DriverState s;
    const char* soname = "libcuda.so.1";
    dlerror();
    void* handle = dlopen(soname, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
      const char* error = dlerror();
      s.error = std::string("slowed: could not load the CUDA driver library ") + soname + ": " +
                (error ? error : "dlopen failed") +
                " (is an NVIDIA driver installed on this machine?)";
      return s;
    }
    auto* lib = new DriverLibrary();
    lib->handle = handle;
    lib->path = soname;
    std::string missing;
    auto need = [&](const char* name, auto& fn) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(handle, name));
      if (!fn) missing += (missing.empty() ? "" : ", ") + std::string(name);
    };
    need("cuInit", lib->cuInit);
    need("cuDriverGetVersion", lib->cuDriverGetVersion);
    need("cuDeviceGet", lib->cuDeviceGet);
    need("cuDeviceGetAttribute", lib->cuDeviceGetAttribute);
    need("cuCtxGetCurrent", lib->cuCtxGetCurrent);
    need("cuCtxSetCurrent", lib->cuCtxSetCurrent);
    need("cuDevicePrimaryCtxRetain", lib->cuDevicePrimaryCtxRetain);
    need("cuModuleLoadData", lib->cuModuleLoadData);
    need("cuModuleUnload", lib->cuModuleUnload);
    need("cuModuleGetFunction", lib->cuModuleGetFunction);
    need("cuFuncSetAttribute", lib->cuFuncSetAttribute);
    need("cuLaunchKernel", lib->cuLaunchKernel);
    need("cuGetErrorString", lib->cuGetErrorString);
    need("cuGetErrorName", lib->cuGetErrorName);
    if (!missing.empty()) {
      s.error = std::string("slowed: the CUDA driver library ") + soname + " lacks " + missing;
      delete lib;
      dlclose(handle);
      return s;
    }
    const CUresult init = lib->cuInit(0);
    if (init != kCudaSuccess) {
      s.error = "slowed: cuInit(0) failed: " + lib->describe(init) +
                " (no usable CUDA device or driver)";
      delete lib;
      dlclose(handle);
      return s;
    }
    lib->cuDriverGetVersion(&lib->driver_version);
    s.library = lib;
    return s;
  }();
  return state;
}

}  // namespace detail

/// The process-wide CUDA driver: libcuda.so.1 loaded and cuInit(0) done on first use. A failure
/// throws the same c10::Error on every call.
///
/// Example:
/// ```
/// const auto& cu = slowed::cuda::driver();
/// std::cout << "CUDA driver " << cu.driver_version << "\n";
/// ```
inline const DriverLibrary& driver() {
  const auto& state = detail::driver_state();
  TORCH_CHECK(state.library != nullptr, state.error);
  return *state.library;
}

/// Whether `driver()` can be used (the library loads and cuInit succeeds). Never throws.
inline bool driver_available() noexcept {
  try {
    return detail::driver_state().library != nullptr;
  } catch (...) {
    return false;
  }
}

/// Why the driver cannot be used ("" when it can). Never throws.
inline std::string driver_unavailable_reason() noexcept {
  try {
    return detail::driver_state().error;
  } catch (...) {
    return "CUDA driver state could not be read";
  }
}

/// Throws c10::Error when `result` is not CUDA_SUCCESS, naming the call, the CUresult and what
/// was being done, e.g. "slowed: cuModuleLoadData failed while loading kernel 'x' for sm_90 on
/// cuda:0: CUDA_ERROR_INVALID_IMAGE (device kernel image is invalid)".
inline void check_cu(CUresult result, const char* call, const std::string& doing) {
  if (result == kCudaSuccess) return;
  TORCH_CHECK(false, "slowed: ", call, " failed while ", doing, ": ", driver().describe(result));
}

/// The driver's handle of the CUDA device with torch index `index`.
inline CUdevice cu_device(c10::DeviceIndex index) {
  const auto& cu = driver();
  CUdevice device = 0;
  check_cu(cu.cuDeviceGet(&device, static_cast<int>(index)), "cuDeviceGet",
           "looking up cuda:" + std::to_string(index));
  return device;
}

/// A device attribute (a CUdevice_attribute value, see the constants above).
inline int device_attribute(c10::DeviceIndex index, int attribute) {
  const auto& cu = driver();
  int value = 0;
  check_cu(cu.cuDeviceGetAttribute(&value, attribute, cu_device(index)), "cuDeviceGetAttribute",
           "reading attribute " + std::to_string(attribute) + " of cuda:" + std::to_string(index));
  return value;
}

/// The compute capability {major, minor} of cuda:`index`, cached per device.
inline std::pair<int, int> compute_capability(c10::DeviceIndex index) {
  static std::mutex mutex;
  static std::vector<std::pair<int, int>> cache;  // {0, 0} = not read yet
  TORCH_CHECK(index >= 0, "device index: expected >= 0, got ", static_cast<int>(index));
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (static_cast<size_t>(index) < cache.size() && cache[index].first != 0) return cache[index];
  }
  const std::pair<int, int> cc{device_attribute(index, kCuDeviceAttributeComputeCapabilityMajor),
                               device_attribute(index, kCuDeviceAttributeComputeCapabilityMinor)};
  std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() <= static_cast<size_t>(index)) cache.resize(index + 1, {0, 0});
  cache[index] = cc;
  return cc;
}

/// Makes the primary context of cuda:`index` (the one torch uses) current on this thread,
/// retaining it once per process. Returns it.
inline CUcontext make_primary_context_current(c10::DeviceIndex index) {
  static std::mutex mutex;
  static std::vector<CUcontext> primary;  // retained, never released: lives as long as torch's
  TORCH_CHECK(index >= 0, "device index: expected >= 0, got ", static_cast<int>(index));
  const auto& cu = driver();
  CUcontext context = nullptr;
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (static_cast<size_t>(index) < primary.size()) context = primary[index];
  }
  if (context == nullptr) {
    const CUdevice device = cu_device(index);
    check_cu(cu.cuDevicePrimaryCtxRetain(&context, device), "cuDevicePrimaryCtxRetain",
             "retaining the primary context of cuda:" + std::to_string(index));
    std::lock_guard<std::mutex> lock(mutex);
    if (primary.size() <= static_cast<size_t>(index)) primary.resize(index + 1, nullptr);
    if (primary[index] == nullptr) primary[index] = context;  // a racing retain only adds a ref
    context = primary[index];
  }
  CUcontext current = nullptr;
  check_cu(cu.cuCtxGetCurrent(&current), "cuCtxGetCurrent",
           "reading the current context for cuda:" + std::to_string(index));
  if (current != context) {
    check_cu(cu.cuCtxSetCurrent(context), "cuCtxSetCurrent",
             "making the primary context of cuda:" + std::to_string(index) + " current");
  }
  return context;
}

}  // namespace cuda
}  // namespace slowed

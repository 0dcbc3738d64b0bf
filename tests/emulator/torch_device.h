#pragma once

// The emulator as slowed's CUDA device, for tests (docs/emulator.md): an `EmulatedDevice` in
// scope makes the real launchers (slowed/cuda/*_cuda.h) run their kernels in the host emulator.
// It installs two things and removes them at scope exit:
//  - a slowed::cuda::KernelBackend: get_kernel finds the generated kernel of the source's exact
//    identity (so a stale build cannot run other text), launch runs it;
//  - the CPU allocator of c10: every host tensor allocated in scope is an emulator device buffer
//    (guard pages, poisoned contents), including the launchers' own temporaries.
// Tensors stay CPU tensors, so tests call the launchers (or the loss forward with
// detail::RowPath::Cuda) on them and compare with the CPU kernels and the reference paths.

#include "emulator.h"

#include <slowed/cuda/jit.h>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

extern "C" void slowed_emu_register_generated();

namespace slowed_emu {

/// Every CPU allocation becomes a device buffer (device_alloc).
class GuardedCpuAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    void* p = n == 0 ? nullptr : device_alloc(n);
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  static void release(void* p) { device_free(p); }
};

/// One launch as the launcher asked for it.
struct LaunchRecord {
  std::string kernel;
  slowed::cuda::Dim3 grid, block;
};

/// get_kernel / launch through the emulator.
class EmulatorBackend final : public slowed::cuda::KernelBackend {
 public:
  const slowed::cuda::KernelHandle& get_kernel(const slowed::cuda::KernelSource& source,
                                               const std::string& name, c10::Device) override {
    const std::string key = source.identity() + " " + name;
    auto it = handles_.find(key);
    if (it != handles_.end()) return *it->second;
    const Kernel* k = find_kernel(source.identity(), name);
    TORCH_CHECK(k != nullptr, "emulator: no generated kernel '", name, "' for ",
                source.identity(), " (the emulated kernels were generated from other text: "
                "rebuild slowed_emulated_kernels)");
    auto handle = std::make_unique<slowed::cuda::KernelHandle>(
        nullptr, c10::DeviceIndex(-1), name, slowed::cuda::CompileRecord(), 0.0);
    kernels_[handle.get()] = k;
    return *handles_.emplace(key, std::move(handle)).first->second;
  }

  void launch(const slowed::cuda::KernelHandle& kernel, slowed::cuda::Dim3 grid,
              slowed::cuda::Dim3 block, unsigned shared_mem_bytes, void** args,
              c10::Device) override {
    launches.push_back({kernel.name(), grid, block});
    if (max_grid > 0 && grid.x > max_grid) grid.x = max_grid;
    slowed_emu::launch(*kernels_.at(&kernel), {grid.x, grid.y, grid.z},
                       {block.x, block.y, block.z}, shared_mem_bytes, args);
  }

  std::vector<LaunchRecord> launches;  ///< every launch since construction
  /// When > 0, grid.x is cut to this (for grid-stride kernels: a grid smaller than the work).
  unsigned max_grid = 0;

 private:
  std::map<std::string, std::unique_ptr<slowed::cuda::KernelHandle>> handles_;
  std::map<const slowed::cuda::KernelHandle*, const Kernel*> kernels_;
};

/// In scope: launchers run in the emulator and host tensors are device buffers.
class EmulatedDevice {
 public:
  EmulatedDevice() {
    load_kernels(&slowed_emu_register_generated);
    previous_allocator_ = c10::GetAllocator(c10::DeviceType::CPU);
    c10::SetAllocator(c10::DeviceType::CPU, &allocator(), kPriority);
    previous_backend_ = slowed::cuda::set_kernel_backend(&backend_);
  }
  ~EmulatedDevice() {
    slowed::cuda::set_kernel_backend(previous_backend_);
    c10::SetAllocator(c10::DeviceType::CPU, previous_allocator_, kPriority);
  }
  EmulatedDevice(const EmulatedDevice&) = delete;
  EmulatedDevice& operator=(const EmulatedDevice&) = delete;

  EmulatorBackend& backend() { return backend_; }

 private:
  static constexpr uint8_t kPriority = 255;
  static GuardedCpuAllocator& allocator() {
    static GuardedCpuAllocator a;
    return a;
  }
  EmulatorBackend backend_;
  c10::Allocator* previous_allocator_ = nullptr;
  slowed::cuda::KernelBackend* previous_backend_ = nullptr;
};

}  // namespace slowed_emu

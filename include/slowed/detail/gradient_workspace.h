#pragma once

// The CPU loss's gradient buffer, kept across calls.
//
// Why. The fused CPU loss writes an [N, V] gradient (384 MiB at N = 2048, V = 49152 in fp32).
// A buffer that large comes from mmap and goes back on free, so every call pays the kernel's
// first-touch page faults on fresh zero pages: about as long as the loss kernel itself on a
// 2-core machine (docs/benchmarks.md). Keeping the last buffer and handing it out again when
// nothing else holds it removes that cost; CUDA needs none of this (its caching allocator
// recycles device memory without faults).
//
// Safety. The workspace keeps the buffer's c10::Storage, never a tensor it handed out. It hands
// the storage out again only when its use count is 1, i.e. no tensor anywhere (autograd's saved
// gradient, a leaf's .grad that stole it, a user's copy of either) still refers to it; otherwise
// the call gets a fresh buffer. So a gradient a caller still holds is never overwritten.
// Thread-safe: one slot behind a mutex; concurrent calls that find it busy allocate their own.

#include <ATen/ATen.h>
#include <c10/core/Allocator.h>

#include <cstdint>
#include <mutex>

namespace slowed {
namespace detail {

class GradientWorkspace {
 public:
  static GradientWorkspace& instance() {
    // Never destroyed: a kept buffer may come from an allocator that a program installed and
    // destroys at exit (the tests' guarded allocator) before statics like this one would go.
    static GradientWorkspace* workspace = new GradientWorkspace;
    return *workspace;
  }

  /// A contiguous CPU tensor [rows, cols] of `options`' dtype, with unspecified contents: the
  /// kept buffer when it is free and large enough, else a fresh one (kept for the next call
  /// when the slot is empty or its buffer free).
  at::Tensor take(int64_t rows, int64_t cols, const at::TensorOptions& options) {
    TORCH_INTERNAL_ASSERT(options.device().is_cpu(), "GradientWorkspace: CPU buffers only");
    const int64_t nbytes = rows * cols * static_cast<int64_t>(c10::elementSize(
                                                 c10::typeMetaToScalarType(options.dtype())));
    std::lock_guard<std::mutex> lock(mutex_);
    const bool free = storage_ && storage_.use_count() == 1;
    // Only memory of the allocator in use now (a program may install its own, e.g. one that
    // guards buffers, and expect every new tensor to come from it).
    const bool same_allocator = storage_ && storage_.allocator() == c10::GetAllocator(c10::DeviceType::CPU);
    if (free && same_allocator && static_cast<int64_t>(storage_.nbytes()) >= nbytes) {
      return at::empty({0}, options).set_(storage_, 0, {rows, cols}, {cols, 1});
    }
    at::Tensor fresh = at::empty({rows, cols}, options);
    if (!storage_ || free) storage_ = fresh.storage();
    return fresh;
  }

  /// Drops the kept buffer (its memory returns once no tensor holds it); the bytes it held.
  int64_t release() {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t bytes = storage_ ? static_cast<int64_t>(storage_.nbytes()) : 0;
    storage_ = c10::Storage();
    return bytes;
  }

  /// Bytes of the kept buffer (0 when none).
  int64_t bytes() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return storage_ ? static_cast<int64_t>(storage_.nbytes()) : 0;
  }

 private:
  mutable std::mutex mutex_;
  c10::Storage storage_;
};

}  // namespace detail

/// Releases the CPU loss's kept gradient buffer (`reuse_gradient_buffer`, on by default): its
/// memory returns once no gradient tensor holds it. Returns the buffer's size in bytes (0 when
/// none was kept). The next call of the loss allocates a new one.
inline int64_t release_gradient_buffer() { return detail::GradientWorkspace::instance().release(); }

}  // namespace slowed

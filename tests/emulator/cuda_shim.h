#pragma once

// What a slowed kernel source needs from CUDA, on the host: the execution-space keywords, the
// built-in variables, barriers, warp collectives, vector types, bit casts and the math functions
// NVRTC provides without headers. Included first by every file generate_kernels.cpp writes; the
// kernel text follows inside an anonymous namespace. See docs/emulator.md.

#include "emulator.h"

#include <math.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
// Block-shared: one instance per program is one per block, because blocks run one at a time. The
// generator appends SLOWED_EMU_SHARED(name) to each declaration, which registers the variable
// for poisoning at every block start.
#define __shared__ static
#define SLOWED_EMU_SHARED(name)                                                        \
  [[maybe_unused]] static const bool slowed_emu_shared_##name =                        \
      ::slowed_emu::detail::register_shared(&(name), sizeof(name), #name)

#define threadIdx (::slowed_emu::detail::current_thread->thread_idx)
#define blockIdx (::slowed_emu::detail::current_thread->block_idx)
#define blockDim (::slowed_emu::detail::current_thread->block_dim)
#define gridDim (::slowed_emu::detail::current_thread->grid_dim)
#define warpSize 32

#define __syncthreads() ::slowed_emu::detail::syncthreads(__LINE__, __FILE__)
#define __syncwarp(...) ::slowed_emu::detail::syncwarp(__LINE__, __FILE__, ##__VA_ARGS__)
#define __shfl_sync(mask, v, ...)                                                             \
  ::slowed_emu::detail::shfl(::slowed_emu::detail::WarpOp::ShflIdx, __LINE__, __FILE__, mask, \
                             v, __VA_ARGS__)
#define __shfl_up_sync(mask, v, ...)                                                         \
  ::slowed_emu::detail::shfl(::slowed_emu::detail::WarpOp::ShflUp, __LINE__, __FILE__, mask, \
                             v, __VA_ARGS__)
#define __shfl_down_sync(mask, v, ...)                                                         \
  ::slowed_emu::detail::shfl(::slowed_emu::detail::WarpOp::ShflDown, __LINE__, __FILE__, mask, \
                             v, __VA_ARGS__)
#define __shfl_xor_sync(mask, v, ...)                                                         \
  ::slowed_emu::detail::shfl(::slowed_emu::detail::WarpOp::ShflXor, __LINE__, __FILE__, mask, \
                             v, __VA_ARGS__)
#define __ballot_sync(mask, p)                                                                  \
  static_cast<unsigned>(::slowed_emu::detail::warp_collective(                                  \
      __LINE__, __FILE__, ::slowed_emu::detail::WarpOp::Ballot, mask, (p) ? 1u : 0u, 0, 32))
#define __any_sync(mask, p)                                                                  \
  static_cast<int>(::slowed_emu::detail::warp_collective(                                    \
      __LINE__, __FILE__, ::slowed_emu::detail::WarpOp::Any, mask, (p) ? 1u : 0u, 0, 32))
#define __all_sync(mask, p)                                                                  \
  static_cast<int>(::slowed_emu::detail::warp_collective(                                    \
      __LINE__, __FILE__, ::slowed_emu::detail::WarpOp::All, mask, (p) ? 1u : 0u, 0, 32))

using uint3 = ::slowed_emu::uint3;
using dim3 = ::slowed_emu::uint3;

// Vector types with CUDA's sizes and alignments. Kernel code reaches them only through
// vector_cast / vector_ptr (the generator rewrites `T*` of these types), so every access is
// checked.
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(8) int2 { int x, y; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) double2 { double x, y; };

namespace slowed_emu {

/// A pointer to a vector type whose every dereference is checked (alignment, bounds).
template <class T>
class vector_ptr {
 public:
  vector_ptr() = default;
  explicit vector_ptr(T* p) : p_(p) {}
  T& operator[](long long i) const { return at(p_ + i); }
  T& operator*() const { return at(p_); }
  T* operator->() const { return &at(p_); }
  vector_ptr operator+(long long i) const { return vector_ptr(p_ + i); }
  vector_ptr operator-(long long i) const { return vector_ptr(p_ - i); }
  vector_ptr& operator+=(long long i) { p_ += i; return *this; }
  vector_ptr& operator++() { ++p_; return *this; }
  bool operator==(const vector_ptr& o) const { return p_ == o.p_; }
  bool operator!=(const vector_ptr& o) const { return p_ != o.p_; }
  T* get() const { return p_; }

 private:
  static T& at(T* p) {
    detail::check_vector_access(p, sizeof(T), !std::is_const<T>::value);
    return *p;
  }
  T* p_ = nullptr;
};

/// reinterpret_cast<T*>(p) for a vector type T, as a checked pointer.
template <class T, class U>
vector_ptr<T> vector_cast(U* p) {
  return vector_ptr<T>(reinterpret_cast<T*>(p));
}

namespace detail {

inline void syncwarp(int line, const char* file, unsigned mask = 0xffffffffu) {
  warp_collective(line, file, WarpOp::SyncWarp, mask, 0, 0, 32);
}

template <class T>
T shfl(WarpOp op, int line, const char* file, unsigned mask, T v, int param, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                "warp shuffles move at most 8 bytes of a trivially copyable type");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  const uint64_t r = warp_collective(line, file, op, mask, bits, param, width);
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}

template <class... P, size_t... I>
void invoke_with(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<P>>*>(args[I])...);
}

}  // namespace detail

/// Calls `kernel` with its parameters read from `args` (one pointer per parameter, as
/// cuLaunchKernel reads them; extra entries are ignored, as the driver ignores them).
template <class... P>
void invoke(void (*kernel)(P...), void** args) {
  detail::invoke_with(kernel, args, std::index_sequence_for<P...>{});
}

}  // namespace slowed_emu

// ---- device built-ins -------------------------------------------------------------------------

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
inline long long __double_as_longlong(double d) { long long i; std::memcpy(&i, &d, 8); return i; }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x != x ? 0.f : x < 0.f ? 0.f : x > 1.f ? 1.f : x; }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline void __threadfence() {}
inline void __threadfence_block() {}
template <class T>
inline T __ldg(const T* p) { return *p; }

// CUDA's integer and floating min/max overloads.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// Atomics: threads are cooperative fibers of one host thread, so a plain update is atomic.
template <class T>
inline T atomicAdd(T* p, T v) { const T old = *p; *p = old + v; return old; }
template <class T>
inline T atomicMax(T* p, T v) { const T old = *p; *p = old > v ? old : v; return old; }
template <class T>
inline T atomicMin(T* p, T v) { const T old = *p; *p = old < v ? old : v; return old; }
template <class T>
inline T atomicExch(T* p, T v) { const T old = *p; *p = v; return old; }
template <class T>
inline T atomicCAS(T* p, T compare, T v) { const T old = *p; if (old == compare) *p = v; return old; }

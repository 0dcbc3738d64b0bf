#pragma once

// Fused CPU kernels of SlowTuningOptimizer (slowed/optim/slow_tuning_optimizer.h): multi-tensor
// passes over one list of chunks of all parameters, slowed::cpu::parallel_for over the chunks.
//
// What is fused and why. The reference path transforms each tensor with about six ATen ops (a
// difference, two norms, a multiplication, a subtraction, a copy), each a pass over memory with
// its own temporary. Here:
//  - generic path (any Base): after Base::step, pass 1 reads theta, the snapshot theta_prev and
//    theta_0 once and returns five sums per tensor; pass 2 reads them again and writes theta
//    once. Without a bound there is no pass 1.
//  - Adam path (AdamW, Adam): no snapshot and no Base::step. Pass 1 computes the Adam update u of
//    every element without writing anything and returns the sums; pass 2 recomputes u (the same
//    code on the same values) and writes theta, exp_avg, exp_avg_sq (and max_exp_avg_sq).
// The drift bound needs ||theta_prev + a u - theta_0|| for the step factor a that pass 1 only
// just determined, so pass 1 returns the sums below and the norm follows from the expansion
// ||d + a u||^2 = ||d||^2 + 2a <d, u> + a^2 ||u||^2, d = theta_prev - theta_0 (slow_factors).
//
// The launchers at the end take the operands every backend takes
// (slowed/detail/slow_tuning_operands.h) and make the raw-pointer list once.
//
// Element arithmetic is fp32 for fp32 and bf16 storage, one rounding per stored bf16 value. Sums
// are accumulated in fp64 per chunk, then over the chunks of a tensor in chunk order, so results
// do not depend on the number of threads. Like slowed/cpu/entropy_masked_cross_entropy_cpu.h,
// each pass is compiled twice (baseline and target("avx2,fma"), picked at run time); the CUDA
// twin is slowed/cuda/kernels/slow_tuning_kernels.h, the oracle the reference path in
// slowed/optim/slow_tuning_optimizer.h.

#include <slowed/cpu/simd.h>
#include <slowed/detail/slow_tuning_operands.h>
#include <slowed/detail/storage_dtype.h>

#include <ATen/ATen.h>
#include <slowed/cpu/parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && !defined(__clang__)
#include <xmmintrin.h>
#endif

// Every function taking or returning 32-byte vectors is always_inline (see simd.h).
#pragma GCC diagnostic ignored "-Wpsabi"

namespace slowed {
namespace cpu {

/// Per-tensor sums of pass 1, in fp64. u is the tensor's step (generic: theta_base - theta_prev;
/// Adam: the update), p = theta_prev, d = theta_prev - theta_0, t = theta_0.
struct SlowSums {
  double uu = 0;  ///< ||u||^2
  double pp = 0;  ///< ||p||^2
  double du = 0;  ///< <d, u>
  double dd = 0;  ///< ||d||^2
  double tt = 0;  ///< ||theta_0||^2
  SlowSums& operator+=(const SlowSums& o) {
    uu += o.uu;
    pp += o.pp;
    du += o.du;
    dd += o.dd;
    tt += o.tt;
    return *this;
  }
};

/// The transform of one tensor's step: theta <- theta_prev + a u, then, when g < 1,
/// theta <- theta - (1 - g)(theta - theta_0) (the projection onto the drift ball).
struct SlowFactors {
  double a = 1.0;
  double g = 1.0;
};

/// Factors from the sums (the CUDA kernels compute the same in `slow_factors` on the device):
///   a = s * min(1, rho / (s ||u||)),  rho = r * max(||p||, floor)   (no bound when rho = 0)
///   g = min(1, R_0 / ||d + a u||),    R_0 = R * max(||theta_0||, floor)   (same)
/// NaN sums leave the factors as they are (as the reference path does): the step carries the NaN.
inline SlowFactors slow_factors(const SlowSums& s, const slowed::detail::SlowBounds& b,
                               bool has_initial) {
  SlowFactors f;
  f.a = b.scale;
  if (b.max_step > 0) {
    const double radius = b.max_step * std::max(std::sqrt(s.pp), b.norm_floor);
    const double n = b.scale * std::sqrt(s.uu);
    if (radius > 0 && n > radius) f.a = b.scale * (radius / n);
  }
  if (b.max_drift > 0 && has_initial) {
    const double radius = b.max_drift * std::max(std::sqrt(s.tt), b.norm_floor);
    const double n = std::sqrt(std::max(s.dd + 2.0 * f.a * s.du + f.a * f.a * s.uu, 0.0));
    if (radius > 0 && n > radius) f.g = radius / n;
  }
  return f;
}

/// Elements per chunk: the unit of parallel work and of the fixed summation order.
inline constexpr int64_t kSlowChunk = 16384;

namespace detail {

/// One tensor's operands as the chunk loops read them: raw pointers to contiguous storage of
/// `numel` elements (made from slowed::detail::SlowTuningOperands by the launchers below).
struct SlowPointers {
  void* param = nullptr;
  const void* prev = nullptr;     ///< generic: the snapshot theta_prev (nullptr: no rewrite)
  const void* grad = nullptr;     ///< Adam
  void* exp_avg = nullptr;        ///< Adam
  void* exp_avg_sq = nullptr;     ///< Adam
  void* max_exp_avg_sq = nullptr; ///< Adam with amsgrad
  const void* initial = nullptr;  ///< theta_0 (nullptr: no drift projection)
  int64_t numel = 0;
  slowed::detail::StorageDtype storage = slowed::detail::StorageDtype::Float32;
  slowed::detail::AdamSettings adam;
  bool decoupled = false;         ///< AdamW's weight decay
};

using d4 = double __attribute__((vector_size(32)));
using f4 = float __attribute__((vector_size(16)));

struct Chunk {
  int64_t tensor, begin, end;
};

inline std::vector<Chunk> make_chunks(const std::vector<SlowPointers>& ts) {
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < ts.size(); ++i) {
    for (int64_t b = 0; b < ts[i].numel; b += kSlowChunk) {
      chunks.push_back({static_cast<int64_t>(i), b, std::min(ts[i].numel, b + kSlowChunk)});
    }
  }
  return chunks;
}

// ---- element access: float or bf16 bits, 8 lanes, or a tail of n < 8 padded with zeros ------

SLOWED_SIMD_INLINE f8 load_lanes(const float* p) { return load(p); }
SLOWED_SIMD_INLINE f8 load_lanes(const uint16_t* p) { return bf16_to_f32(p); }
SLOWED_SIMD_INLINE void store_lanes(float* p, f8 v) { store(p, v); }
SLOWED_SIMD_INLINE void store_lanes(uint16_t* p, f8 v) { f32_to_bf16(p, v); }

template <class T, bool kFull>
SLOWED_SIMD_INLINE f8 ld(const void* base, int64_t i, int n) {
  const T* p = static_cast<const T*>(base) + i;
  if constexpr (kFull) {
    return load_lanes(p);
  } else {
    T buf[kLanes] = {};
    std::memcpy(buf, p, sizeof(T) * static_cast<size_t>(n));
    return load_lanes(buf);
  }
}

template <class T, bool kFull>
SLOWED_SIMD_INLINE void st(void* base, int64_t i, int n, f8 v) {
  T* p = static_cast<T*>(base) + i;
  if constexpr (kFull) {
    store_lanes(p, v);
  } else {
    T buf[kLanes];
    store_lanes(buf, v);
    std::memcpy(p, buf, sizeof(T) * static_cast<size_t>(n));
  }
}

/// sqrt of 8 lanes, correctly rounded: vsqrtps in the AVX2 build (inline asm, so that the
/// always_inline chain needs no target attribute; the instruction lands in the AVX2 function),
/// two SSE sqrtps in the x86-64 baseline, a lane loop elsewhere.
template <bool kAvx2>
SLOWED_SIMD_INLINE f8 vsqrt(f8 x) {
#if defined(__x86_64__) && !defined(__clang__)
  if constexpr (kAvx2) {
    f8 r;
    asm("vsqrtps %1, %0" : "=x"(r) : "x"(x));
    return r;
  } else {
    __m128 lo, hi;
    std::memcpy(&lo, &x, 16);
    std::memcpy(&hi, reinterpret_cast<const char*>(&x) + 16, 16);
    lo = _mm_sqrt_ps(lo);
    hi = _mm_sqrt_ps(hi);
    f8 r;
    std::memcpy(&r, &lo, 16);
    std::memcpy(reinterpret_cast<char*>(&r) + 16, &hi, 16);
    return r;
  }
#else
  f8 r;
  for (int l = 0; l < kLanes; ++l) r[l] = std::sqrt(x[l]);
  return r;
#endif
}

/// 4 floats as doubles: one vcvtps2pd in the AVX2 build (inline asm, as vsqrt; GCC lowers
/// __builtin_convertvector to 2-lane pieces in the always-inline helpers), else the builtin.
template <bool kAvx2>
SLOWED_SIMD_INLINE d4 to_d4(f4 h) {
#if defined(__x86_64__) && !defined(__clang__)
  if constexpr (kAvx2) {
    d4 r;
    asm("vcvtps2pd %1, %0" : "=x"(r) : "x"(h));
    return r;
  }
#endif
  return __builtin_convertvector(h, d4);
}

/// Lanes 0-3 and 4-7 as doubles.
template <bool kAvx2>
SLOWED_SIMD_INLINE d4 lo_d(f8 v) {
  f4 h;
  std::memcpy(&h, &v, 16);
  return to_d4<kAvx2>(h);
}
template <bool kAvx2>
SLOWED_SIMD_INLINE d4 hi_d(f8 v) {
  f4 h;
  std::memcpy(&h, reinterpret_cast<const char*>(&v) + 16, 16);
  return to_d4<kAvx2>(h);
}

/// fp64 accumulators of the five sums, 4 lanes each (five registers, so nothing spills). The
/// products are formed in fp32 (relative error 2^-24 each) and added in fp64.
struct Acc {
  d4 v[5];
};
SLOWED_SIMD_INLINE void acc_zero(Acc& a) {
  for (auto& s : a.v) s = d4{0, 0, 0, 0};
}
// The two halves are added to each other first: one fp64 add per vector on each accumulator's
// loop-carried chain instead of two (the chain's latency, not the arithmetic, bounded pass 1).
template <bool kAvx2>
SLOWED_SIMD_INLINE void acc_add(Acc& a, int k, f8 x, f8 y) {
  const f8 xy = x * y;
  a.v[k] += lo_d<kAvx2>(xy) + hi_d<kAvx2>(xy);
}
SLOWED_SIMD_INLINE double acc_total(const Acc& a, int k) {
  const d4 s = a.v[k];
  return (s[0] + s[1]) + (s[2] + s[3]);
}
SLOWED_SIMD_INLINE SlowSums acc_sums(const Acc& a) {
  SlowSums s;
  s.uu = acc_total(a, 0);
  s.pp = acc_total(a, 1);
  s.du = acc_total(a, 2);
  s.dd = acc_total(a, 3);
  s.tt = acc_total(a, 4);
  return s;
}

/// The five sums' terms of 8 elements: u the step, p = theta_prev, and with theta_0 (kInit)
/// d = p - theta_0 and theta_0 itself.
template <class T, bool kFull, bool kAvx2, bool kInit>
SLOWED_SIMD_INLINE void add_sums(Acc& acc, f8 u, f8 p, const SlowPointers& t, int64_t i, int n) {
  acc_add<kAvx2>(acc, 0, u, u);
  acc_add<kAvx2>(acc, 1, p, p);
  if constexpr (kInit) {
    const f8 t0 = ld<T, kFull>(t.initial, i, n);
    const f8 d = p - t0;
    acc_add<kAvx2>(acc, 2, d, u);
    acc_add<kAvx2>(acc, 3, d, d);
    acc_add<kAvx2>(acc, 4, t0, t0);
  }
}

// ---- generic path: x = theta after Base::step, p = theta_prev (x when no snapshot) ----------

template <class T, bool kFull, bool kAvx2, bool kInit>
SLOWED_SIMD_INLINE void generic_sums_lanes(const SlowPointers& t, int64_t i, int n, Acc& acc) {
  const f8 x = ld<T, kFull>(t.param, i, n);
  const f8 p = t.prev ? ld<T, kFull>(t.prev, i, n) : x;
  add_sums<T, kFull, kAvx2, kInit>(acc, x - p, p, t, i, n);
}

// theta = x - (1 - a)(x - p), so that a = 1 leaves x bitwise as Base wrote it (the reference
// path's form); then the projection when g < 1.
template <class T, bool kFull>
SLOWED_SIMD_INLINE void generic_apply_lanes(const SlowPointers& t, int64_t i, int n, f8 one_minus_a,
                                            bool rewrite, f8 one_minus_g, bool project) {
  f8 x = ld<T, kFull>(t.param, i, n);
  if (rewrite) x = x - one_minus_a * (x - ld<T, kFull>(t.prev, i, n));
  if (project) x = x - one_minus_g * (x - ld<T, kFull>(t.initial, i, n));
  st<T, kFull>(t.param, i, n, x);
}

// ---- Adam path --------------------------------------------------------------------------------

struct AdamLanes {
  f8 m, v, vmax, u;
};

/// AdamSettings broadcast to 8 lanes once per chunk (not once per vector).
struct AdamVec {
  f8 beta1, beta2, one_minus_beta1, one_minus_beta2, eps, neg_step_size, bc2_sqrt, weight_decay;
  bool l2, decoupled_wd, amsgrad;
};

SLOWED_SIMD_INLINE AdamVec adam_vec(const slowed::detail::AdamSettings& h, bool decoupled) {
  AdamVec v;
  v.beta1 = splat(h.beta1);
  v.beta2 = splat(h.beta2);
  v.one_minus_beta1 = splat(h.one_minus_beta1);
  v.one_minus_beta2 = splat(h.one_minus_beta2);
  v.eps = splat(h.eps);
  v.neg_step_size = splat(-h.step_size);
  v.bc2_sqrt = splat(h.bc2_sqrt);
  v.weight_decay = splat(h.weight_decay);
  v.l2 = !decoupled && h.weight_decay != 0.f;
  v.decoupled_wd = decoupled && h.weight_decay != 0.f;
  v.amsgrad = h.amsgrad;
  return v;
}

/// One Adam(W) update of 8 elements in fp32, in torch::optim::AdamW's order of operations:
///   Adam: g <- g + wd p;  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
///   vmax <- max(vmax, v) (amsgrad);  denom = sqrt(v or vmax) / sqrt(1 - b2^t) + eps;
///   u = (-step_size m) / denom, minus lr wd p for AdamW.
/// theta_new = p + u is AdamW's step; the caller applies theta = p + a u.
template <bool kAvx2>
SLOWED_SIMD_INLINE AdamLanes adam_lanes(f8 p, f8 g, f8 m, f8 v, f8 vmax, const AdamVec& h) {
  if (h.l2) g = g + p * h.weight_decay;
  AdamLanes r;
  r.m = m * h.beta1 + g * h.one_minus_beta1;
  r.v = v * h.beta2 + (g * g) * h.one_minus_beta2;
  f8 vh = r.v;
  if (h.amsgrad) {
    r.vmax = vmax > r.v ? vmax : r.v;
    vh = r.vmax;
  } else {
    r.vmax = vmax;
  }
  const f8 denom = vsqrt<kAvx2>(vh) / h.bc2_sqrt + h.eps;
  r.u = (h.neg_step_size * r.m) / denom;
  if (h.decoupled_wd) r.u = r.u - p * h.weight_decay;
  return r;
}

template <class T, bool kFull, bool kAvx2>
SLOWED_SIMD_INLINE AdamLanes adam_load(const SlowPointers& t, const AdamVec& h, int64_t i, int n,
                                       f8& p) {
  p = ld<T, kFull>(t.param, i, n);
  const f8 g = ld<T, kFull>(t.grad, i, n);
  const f8 m = ld<T, kFull>(t.exp_avg, i, n);
  const f8 v = ld<T, kFull>(t.exp_avg_sq, i, n);
  const f8 vmax = h.amsgrad ? ld<T, kFull>(t.max_exp_avg_sq, i, n) : splat(0.f);
  return adam_lanes<kAvx2>(p, g, m, v, vmax, h);
}

template <class T, bool kFull, bool kAvx2, bool kInit>
SLOWED_SIMD_INLINE void adam_sums_lanes(const SlowPointers& t, const AdamVec& h, int64_t i, int n,
                                        Acc& acc) {
  f8 p;
  const AdamLanes r = adam_load<T, kFull, kAvx2>(t, h, i, n, p);
  if constexpr (!kFull) {
    // Padded lanes hold zeros: p = g = m = v = 0 gives u = 0 / eps = 0 (or NaN when eps = 0),
    // so mask them out of the sums.
    f8 keep;
    for (int l = 0; l < kLanes; ++l) keep[l] = l < n ? 1.f : 0.f;
    add_sums<T, kFull, kAvx2, kInit>(acc, select(keep > splat(0.f), r.u, splat(0.f)), p, t, i, n);
  } else {
    add_sums<T, kFull, kAvx2, kInit>(acc, r.u, p, t, i, n);
  }
}

template <class T, bool kFull, bool kAvx2>
SLOWED_SIMD_INLINE void adam_apply_lanes(const SlowPointers& t, const AdamVec& h, int64_t i, int n,
                                         f8 a, f8 one_minus_g, bool project) {
  f8 p;
  const AdamLanes r = adam_load<T, kFull, kAvx2>(t, h, i, n, p);
  f8 x = p + a * r.u;
  if (project) x = x - one_minus_g * (x - ld<T, kFull>(t.initial, i, n));
  st<T, kFull>(t.param, i, n, x);
  st<T, kFull>(t.exp_avg, i, n, r.m);
  st<T, kFull>(t.exp_avg_sq, i, n, r.v);
  if (h.amsgrad) st<T, kFull>(t.max_exp_avg_sq, i, n, r.vmax);
}

// ---- chunk bodies, compiled for the baseline ISA and for AVX2/FMA ----------------------------

enum class Pass { GenericSums, GenericApply, AdamSums, AdamApply };

template <class T, Pass kPass, bool kAvx2, bool kInit>
SLOWED_SIMD_INLINE void chunk_lanes(const SlowPointers& tensor, int64_t b, int64_t e, SlowFactors f,
                                    SlowSums* out) {
  // Local copies: the stores through the tensor pointers cannot alias them, so pointers and
  // broadcast scalars stay in registers across the loop.
  const SlowPointers t = tensor;
  const AdamVec h = adam_vec(t.adam, t.decoupled);
  Acc acc;
  acc_zero(acc);
  const f8 one_minus_a = splat(static_cast<float>(1.0 - f.a));
  const f8 a = splat(static_cast<float>(f.a));
  const f8 one_minus_g = splat(static_cast<float>(1.0 - f.g));
  const bool rewrite = t.prev != nullptr && f.a != 1.0;
  const bool project = t.initial != nullptr && f.g < 1.0;
  int64_t i = b;
  for (; i + kLanes <= e; i += kLanes) {
    if constexpr (kPass == Pass::GenericSums) generic_sums_lanes<T, true, kAvx2, kInit>(t, i, kLanes, acc);
    if constexpr (kPass == Pass::GenericApply) {
      generic_apply_lanes<T, true>(t, i, kLanes, one_minus_a, rewrite, one_minus_g, project);
    }
    if constexpr (kPass == Pass::AdamSums) adam_sums_lanes<T, true, kAvx2, kInit>(t, h, i, kLanes, acc);
    if constexpr (kPass == Pass::AdamApply) {
      adam_apply_lanes<T, true, kAvx2>(t, h, i, kLanes, a, one_minus_g, project);
    }
  }
  if (i < e) {
    const int n = static_cast<int>(e - i);
    if constexpr (kPass == Pass::GenericSums) generic_sums_lanes<T, false, kAvx2, kInit>(t, i, n, acc);
    if constexpr (kPass == Pass::GenericApply) {
      generic_apply_lanes<T, false>(t, i, n, one_minus_a, rewrite, one_minus_g, project);
    }
    if constexpr (kPass == Pass::AdamSums) adam_sums_lanes<T, false, kAvx2, kInit>(t, h, i, n, acc);
    if constexpr (kPass == Pass::AdamApply) {
      adam_apply_lanes<T, false, kAvx2>(t, h, i, n, a, one_minus_g, project);
    }
  }
  if (out) *out = acc_sums(acc);
}

// theta_0 present or not is a template argument of the sums passes (it decides how many
// accumulators are live); the apply passes test it once per chunk.
template <class T, Pass kPass, bool kAvx2>
SLOWED_SIMD_INLINE void chunk_body(const SlowPointers& t, int64_t b, int64_t e, SlowFactors f,
                                   SlowSums* out) {
  constexpr bool kSums = kPass == Pass::GenericSums || kPass == Pass::AdamSums;
  if (kSums && t.initial != nullptr) return chunk_lanes<T, kPass, kAvx2, true>(t, b, e, f, out);
  return chunk_lanes<T, kPass, kAvx2, false>(t, b, e, f, out);
}

template <class T, Pass kPass>
void chunk_base(const SlowPointers& t, int64_t b, int64_t e, SlowFactors f, SlowSums* out) {
  chunk_body<T, kPass, false>(t, b, e, f, out);
}

#ifdef SLOWED_HAVE_AVX2_DISPATCH
template <class T, Pass kPass>
SLOWED_TARGET_AVX2 void chunk_avx2(const SlowPointers& t, int64_t b, int64_t e, SlowFactors f,
                                   SlowSums* out) {
  chunk_body<T, kPass, true>(t, b, e, f, out);
}
#endif

template <Pass kPass>
void run_chunk(const SlowPointers& t, int64_t b, int64_t e, SlowFactors f, SlowSums* out) {
  const bool bf16 = t.storage == slowed::detail::StorageDtype::BFloat16;
#ifdef SLOWED_HAVE_AVX2_DISPATCH
  if (cpu_has_avx2_fma()) {
    return bf16 ? chunk_avx2<uint16_t, kPass>(t, b, e, f, out)
                : chunk_avx2<float, kPass>(t, b, e, f, out);
  }
#endif
  return bf16 ? chunk_base<uint16_t, kPass>(t, b, e, f, out)
              : chunk_base<float, kPass>(t, b, e, f, out);
}

/// Pass 1: per-chunk sums in parallel, then per tensor in chunk order.
template <Pass kPass>
std::vector<SlowSums> sums_pass(const std::vector<SlowPointers>& ts) {
  const auto chunks = make_chunks(ts);
  std::vector<SlowSums> partial(chunks.size());
  slowed::cpu::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const Chunk& ch = chunks[static_cast<size_t>(c)];
      run_chunk<kPass>(ts[static_cast<size_t>(ch.tensor)], ch.begin, ch.end, SlowFactors{},
                       &partial[static_cast<size_t>(c)]);
    }
  });
  std::vector<SlowSums> sums(ts.size());
  for (size_t c = 0; c < chunks.size(); ++c) sums[static_cast<size_t>(chunks[c].tensor)] += partial[c];
  return sums;
}

/// Pass 2: every chunk in parallel with its tensor's factors. Generic tensors whose factors
/// are (1, 1) are skipped (bitwise unchanged).
template <Pass kPass>
void apply_pass(const std::vector<SlowPointers>& ts, const std::vector<SlowFactors>& f) {
  std::vector<SlowPointers> todo;
  std::vector<SlowFactors> todo_f;
  for (size_t i = 0; i < ts.size(); ++i) {
    const bool noop = kPass == Pass::GenericApply &&
                      (ts[i].prev == nullptr || f[i].a == 1.0) &&
                      (ts[i].initial == nullptr || !(f[i].g < 1.0));
    if (noop || ts[i].numel == 0) continue;
    todo.push_back(ts[i]);
    todo_f.push_back(f[i]);
  }
  const auto chunks = make_chunks(todo);
  slowed::cpu::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const Chunk& ch = chunks[static_cast<size_t>(c)];
      const auto k = static_cast<size_t>(ch.tensor);
      run_chunk<kPass>(todo[k], ch.begin, ch.end, todo_f[k], nullptr);
    }
  });
}

/// The chunk loops' pointer list of `ts`; `decoupled` selects AdamW's weight decay.
inline std::vector<SlowPointers> pointers(const std::vector<slowed::detail::SlowTuningOperands>& ts,
                                          bool decoupled) {
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; };
  std::vector<SlowPointers> out(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto& t = ts[i];
    const auto storage = slowed::detail::storage_dtype(t.param.scalar_type(),
                                                       "SlowTuningOptimizer parameters");
    TORCH_INTERNAL_ASSERT(storage != slowed::detail::StorageDtype::Float16,
                          "the CPU Slow Tuning kernels take float32 or bfloat16");
    SlowPointers& p = out[i];
    p.param = t.param.data_ptr();
    p.prev = ptr(t.prev);
    p.grad = ptr(t.grad);
    p.exp_avg = ptr(t.exp_avg);
    p.exp_avg_sq = ptr(t.exp_avg_sq);
    p.max_exp_avg_sq = t.adam.amsgrad ? ptr(t.max_exp_avg_sq) : nullptr;
    p.initial = ptr(t.initial);
    p.numel = t.param.numel();
    p.storage = storage;
    p.adam = t.adam;
    p.decoupled = decoupled;
  }
  return out;
}

/// Pass 1 when a bound is on, the factors, pass 2.
template <Pass kSums, Pass kApply>
void two_pass(const std::vector<SlowPointers>& ts, const slowed::detail::SlowBounds& b) {
  std::vector<SlowFactors> f(ts.size());
  if (b.any()) {
    const auto sums = sums_pass<kSums>(ts);
    for (size_t i = 0; i < ts.size(); ++i) {
      f[i] = slow_factors(sums[i], b, ts[i].initial != nullptr);
    }
  } else {
    for (auto& fi : f) fi.a = b.scale;
  }
  apply_pass<kApply>(ts, f);
}

}  // namespace detail

/// theta_prev <- theta for every tensor (`prev`, allocated by the caller, receives a bitwise
/// copy of `param`): the snapshot of the generic path.
inline void slow_tuning_snapshot(const std::vector<slowed::detail::SlowTuningOperands>& ts) {
  for (const auto& t : ts) t.prev.copy_(t.param);
}

/// The generic path after Base::step: `param` holds Base's new values, `prev` the snapshot (or
/// undefined when the scale is 1 and no step bound is on), `initial` theta_0 for the drift
/// bound. Pass 1 (the sums u = theta - prev, p = prev, d = p - initial) only when a bound is on;
/// pass 2 writes theta <- theta - (1 - a)(theta - prev), then the projection when g < 1.
inline void slow_tuning_generic_step(const std::vector<slowed::detail::SlowTuningOperands>& ts,
                                     const slowed::detail::SlowBounds& b) {
  detail::two_pass<detail::Pass::GenericSums, detail::Pass::GenericApply>(
      detail::pointers(ts, false), b);
}

/// The Adam path: pass 1 (when a bound is on) the sums of the Adam update u, writing nothing;
/// pass 2 theta <- theta + a u (then the projection when g < 1) and the moments. The step
/// counters are the caller's; `decoupled` selects AdamW's weight decay.
inline void slow_tuning_adam_step(const std::vector<slowed::detail::SlowTuningOperands>& ts,
                                  const slowed::detail::SlowBounds& b, bool decoupled) {
  detail::two_pass<detail::Pass::AdamSums, detail::Pass::AdamApply>(
      detail::pointers(ts, decoupled), b);
}

}  // namespace cpu
}  // namespace slowed

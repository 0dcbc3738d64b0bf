#pragma once

// Portable 8-wide float SIMD for the fused CPU kernels, written with GCC/Clang vector extensions.
//
// Why not at::vec::Vectorized: ATen picks its AVX2/AVX-512 code paths with compile-time macros
// in its own separately compiled kernels. A header-only library is compiled with the user's
// flags (usually no -mavx2), where Vectorized falls back to scalar loops. Instead, the kernels
// here are compiled twice from one body: once for the baseline ISA and once with
// __attribute__((target("avx2,fma"))), and `cpu_has_avx2_fma()` picks one at run time.
// No build change is needed.
//
// Everything here is `SLOWED_SIMD_INLINE` (always_inline), so it inlines into either caller.

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) || defined(__clang__)
#define SLOWED_SIMD_INLINE inline __attribute__((always_inline))
#else
#error "slowed's CPU kernels need GCC or Clang vector extensions"
#endif

#if (defined(__x86_64__) || defined(__i386__)) && !defined(SLOWED_NO_AVX2_DISPATCH)
#define SLOWED_HAVE_AVX2_DISPATCH 1
#define SLOWED_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif

// Every function taking or returning 32-byte vectors is always_inline, so GCC's note that such
// a signature "changes the ABI" without AVX never applies. Templates are instantiated at the
// end of the including file, so the note stays silenced from here on (it is only a note).
#pragma GCC diagnostic ignored "-Wpsabi"

namespace slowed {
namespace cpu {

inline constexpr int kLanes = 8;
using f8 = float __attribute__((vector_size(32)));
using i8 = int32_t __attribute__((vector_size(32)));
using u8 = uint32_t __attribute__((vector_size(32)));
using h8 = uint16_t __attribute__((vector_size(16)));

inline bool cpu_has_avx2_fma() {
#ifdef SLOWED_HAVE_AVX2_DISPATCH
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

SLOWED_SIMD_INLINE f8 splat(float x) { return f8{x, x, x, x, x, x, x, x}; }

SLOWED_SIMD_INLINE f8 load(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
SLOWED_SIMD_INLINE void store(float* p, f8 v) { std::memcpy(p, &v, sizeof v); }

template <class To, class From>
SLOWED_SIMD_INLINE To bitcast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bitcast: sizes differ");
  To out;
  std::memcpy(&out, &v, sizeof out);
  return out;
}

SLOWED_SIMD_INLINE f8 select(i8 mask, f8 a, f8 b) { return mask ? a : b; }
SLOWED_SIMD_INLINE f8 vmax(f8 a, f8 b) { return a > b ? a : b; }

SLOWED_SIMD_INLINE float hsum(f8 v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
SLOWED_SIMD_INLINE float hmax(f8 v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

/// exp(x) for float lanes: x = n ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2), e^r by its
/// degree-7 Taylor polynomial (truncation < 6e-9 relative), times 2^n built in the exponent
/// bits. Max error about 2 ulp on [-87.3, 88.7]; below -87.3 (and -inf) it returns 0, above
/// 88.7 it saturates at e^88.7 (callers subtract the row max first); NaN stays NaN.
SLOWED_SIMD_INLINE f8 vexp(f8 x) {
  const f8 hi = splat(88.7f), lo = splat(-87.3f);
  const i8 underflow = x < lo;
  f8 xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  // n = round(x / ln2) with the 1.5 * 2^23 trick; the low bits of t hold n.
  const f8 shifter = splat(12582912.0f);
  const f8 t = xc * splat(1.44269504088896341f) + shifter;
  const f8 n = t - shifter;
  const i8 ni = bitcast<i8>(t) - bitcast<i8>(shifter);
  const f8 r = (xc - n * splat(0.693145751953125f)) - n * splat(1.428606765330187e-06f);
  f8 p = splat(1.0f / 5040.0f);
  p = p * r + splat(1.0f / 720.0f);
  p = p * r + splat(1.0f / 120.0f);
  p = p * r + splat(1.0f / 24.0f);
  p = p * r + splat(1.0f / 6.0f);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  const f8 two_n = bitcast<f8>((ni + 127) << 23);
  return select(underflow, splat(0.0f), p * two_n);
}

/// tanh(x) = 1 - 2 / (exp(2x) + 1): absolute error below 2e-7 (used for logit softcapping).
SLOWED_SIMD_INLINE f8 vtanh(f8 x) { return splat(1.0f) - splat(2.0f) / (vexp(x + x) + splat(1.0f)); }

/// bfloat16 bits -> float: the bf16 bits are the top half of the float.
SLOWED_SIMD_INLINE f8 bf16_to_f32(const uint16_t* p) {
  h8 h;
  std::memcpy(&h, p, sizeof h);
  return bitcast<f8>(__builtin_convertvector(h, u8) << 16);
}

/// float -> bfloat16 bits, round to nearest even; NaN becomes a quiet NaN.
SLOWED_SIMD_INLINE void f32_to_bf16(uint16_t* p, f8 v) {
  u8 u = bitcast<u8>(v);
  const u8 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const u8 bits = (v != v) ? u8{0x7FC0u, 0x7FC0u, 0x7FC0u, 0x7FC0u, 0x7FC0u, 0x7FC0u, 0x7FC0u, 0x7FC0u}
                           : rounded;
  const h8 h = __builtin_convertvector(bits, h8);
  std::memcpy(p, &h, sizeof h);
}

}  // namespace cpu
}  // namespace slowed

#pragma once

// Fused CPU kernel of entropy-masked cross-entropy: one pass over the logits per row.
//
// What is fused and why: the ATen composite reads the [N, V] logits about six times and
// allocates several fp32 [N, V] temporaries (log_softmax, its exp, the entropy product, the
// backward's softmax). Here each thread copies one row (converted to fp32, softcapped) into a
// row buffer that stays in its L2 cache, and from that buffer computes in turn:
//   1. while loading: the row max, the sum of the logits (label smoothing) and a NaN/+Inf flag;
//   2. e_j = exp(z_j - max) into a second row buffer, s = sum e_j, t = sum e_j z_j;
//      lse = max + log s, entropy H = lse - t / s, the target logit, the per-token loss;
//   3. the keep decision (absolute threshold, current or reference entropy) and, when a gradient
//      is wanted, g_j = e_j (1 + 2 zs lse) / s - eps / V - (1 - eps) [j = t], times the softcap
//      derivative 1 - (z_j / cap)^2, written once in the logits' dtype (masked rows: zeros).
// So main memory sees one read of the logits and one write of the gradient, and the only
// [N, V] buffer is the gradient itself (none with inplace_backward). The gradient is NOT
// normalized by the kept-token count, which is known only after all rows: the backward's
// multiplication by the upstream gradient applies it (`scale_rows`), a pass the backward makes
// anyway. Scalar reference: slowed/loss/entropy_masked_cross_entropy_reference.h.
//
// The launchers at the end (emce_rows, emce_zero_rows, emce_scale_rows) take tensors, with the
// names and arguments of the CUDA launchers (slowed/cuda/entropy_masked_cross_entropy_cuda.h), so
// the loss calls one mechanism per backend.

#include <slowed/cpu/simd.h>

#include <ATen/ATen.h>
#include <slowed/cpu/parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

// Every function taking or returning 32-byte vectors is always_inline, so GCC's note that such
// a signature "changes the ABI" without AVX never applies. Templates are instantiated at the
// end of the including file, so the note stays silenced from here on (it is only a note).
#pragma GCC diagnostic ignored "-Wpsabi"

namespace slowed {
namespace cpu {

/// Per-call parameters of the row kernel (validated by the public layer).
struct RowParams {
  int64_t n = 0, vocab = 0;
  int64_t ignore_index = -100;
  float label_smoothing = 0.f, lse_square_scale = 0.f, softcap = 0.f;
  bool absolute = true;              ///< decide in the kernel; else keep every valid row
  float threshold = 0.f;             ///< absolute threshold (nats)
  const float* reference = nullptr;  ///< optional reference entropies [n]
};

/// Per-row outputs, each [n].
struct RowOutputs {
  float* lse;      ///< log-sum-exp; NaN when the row has a NaN or it is not finite
  float* entropy;  ///< H >= 0; NaN where lse is NaN
  float* loss;     ///< unweighted per-token loss (0 where the target is ignore_index)
  bool* kept;      ///< the kernel's keep decision (valid rows only)
};

// ---- row load/store in each storage dtype --------------------------------------------------

/// Loads `vocab` values into `z` (fp32, softcapped), pads to a multiple of 8 with -inf;
/// returns the row max and, through `sum`, the plain sum of the (capped) row and, through
/// `bad`, whether any value is NaN or +Inf. The flag is kept apart from the sum: finite
/// logits near FLT_MAX overflow the sum, and such a row is still valid.
template <class T>
SLOWED_SIMD_INLINE float load_row(const T* src, float* z, int64_t vocab, int64_t padded,
                                  float cap, float* sum, bool* bad) {
  const int64_t full = vocab / kLanes * kLanes;
  const float inf = std::numeric_limits<float>::infinity();
  f8 vmx = splat(-inf), vs = splat(0.f);
  const f8 vinf = splat(inf);
  i8 vbad = {0, 0, 0, 0, 0, 0, 0, 0};
  const f8 vcap = splat(cap), vinv = splat(cap > 0.f ? 1.f / cap : 0.f);
  for (int64_t j = 0; j < full; j += kLanes) {
    f8 x;
    if constexpr (std::is_same_v<T, float>) {
      x = load(src + j);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      x = bf16_to_f32(reinterpret_cast<const uint16_t*>(src + j));
    } else {
      for (int l = 0; l < kLanes; ++l) x[l] = static_cast<float>(src[j + l]);
    }
    if (cap > 0.f) x = vcap * vtanh(x * vinv);
    store(z + j, x);
    vmx = vmax(vmx, x);
    vs += x;
    vbad |= ~(x < vinf);  // NaN or +Inf (the max comparisons skip a NaN)
  }
  float mx = hmax(vmx), s = hsum(vs);
  bool b = false;
  for (int l = 0; l < kLanes; ++l) b |= vbad[l] != 0;
  for (int64_t j = full; j < vocab; ++j) {
    float x = static_cast<float>(src[j]);
    if (cap > 0.f) x = cap * std::tanh(x / cap);
    z[j] = x;
    mx = x > mx ? x : mx;
    s += x;
    b |= !(x < inf);
  }
  for (int64_t j = vocab; j < padded; ++j) z[j] = -inf;
  *sum = s;
  *bad = b;
  return mx;
}

/// Stores `vocab` fp32 values from `g` into `dst` in its dtype (bf16: round to nearest even).
template <class T>
SLOWED_SIMD_INLINE void store_row(T* dst, const float* g, int64_t vocab) {
  const int64_t full = vocab / kLanes * kLanes;
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, g, sizeof(float) * static_cast<size_t>(vocab));
    return;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (int64_t j = 0; j < full; j += kLanes)
      f32_to_bf16(reinterpret_cast<uint16_t*>(dst + j), load(g + j));
  } else {
    for (int64_t j = 0; j < full; ++j) dst[j] = static_cast<T>(g[j]);
  }
  for (int64_t j = full; j < vocab; ++j) dst[j] = static_cast<T>(g[j]);
}

// ---- the row kernel ------------------------------------------------------------------------

template <class T>
SLOWED_SIMD_INLINE void rows_body(const T* logits, T* grad, const int64_t* targets,
                                  const RowParams& p, const RowOutputs& o, int64_t begin,
                                  int64_t end) {
  const int64_t vocab = p.vocab;
  const int64_t padded = (vocab + kLanes - 1) / kLanes * kLanes;
  std::vector<float> zbuf(static_cast<size_t>(padded)), ebuf(static_cast<size_t>(padded));
  float* z = zbuf.data();
  float* e = ebuf.data();
  const float eps = p.label_smoothing, zs = p.lse_square_scale, cap = p.softcap;
  const float nan = std::numeric_limits<float>::quiet_NaN();

  for (int64_t i = begin; i < end; ++i) {
    const T* row = logits + i * vocab;
    float sum_z = 0.f;
    bool bad = false;
    const float mx = load_row<T>(row, z, vocab, padded, cap, &sum_z, &bad);

    // Pass over the buffer: e = exp(z - max), s = sum e, t = sum e z (0 where e = 0).
    f8 vs = splat(0.f), vt = splat(0.f);
    const f8 vmx = splat(mx), zero = splat(0.f);
    for (int64_t j = 0; j < padded; j += kLanes) {
      const f8 zj = load(z + j);
      const f8 ej = vexp(zj - vmx);
      store(e + j, ej);
      vs += ej;
      vt += select(ej > zero, ej * zj, zero);
    }
    const float s = hsum(vs), t = hsum(vt);
    float lse = mx + std::log(s);
    // A NaN or +Inf logit, or a log-sum-exp that is not finite (every logit -Inf): NaN lse and
    // entropy (the public layer's check names the row; the CUDA kernel does the same).
    if (bad || !std::isfinite(lse)) lse = nan;
    const float h = std::isnan(lse) ? lse : std::max(lse - t / s, 0.f);

    const int64_t tgt = targets[i];
    const bool valid = tgt != p.ignore_index;
    const int64_t safe_t = (valid && tgt >= 0 && tgt < vocab) ? tgt : 0;
    float loss = lse - z[safe_t];
    if (eps > 0.f) loss = (1.f - eps) * loss + eps * (lse - sum_z / static_cast<float>(vocab));
    if (zs > 0.f) loss += zs * lse * lse;

    bool keep = valid;
    if (keep && p.absolute) {
      const float hd = p.reference ? p.reference[i] : h;
      keep = !(hd < p.threshold) && !std::isnan(hd);
    }
    o.lse[i] = lse;
    o.entropy[i] = h;
    o.loss[i] = valid ? loss : 0.f;
    o.kept[i] = keep;

    if (grad == nullptr) continue;
    T* grow = grad + i * vocab;
    if (!keep) {
      std::fill(grow, grow + vocab, static_cast<T>(0.f));
      continue;
    }
    // g = e * a - b, then the target and the softcap derivative.
    const float a = (1.f + 2.f * zs * lse) / s;
    const float b = eps / static_cast<float>(vocab);
    const f8 va = splat(a), vb = splat(b), vinv = splat(cap > 0.f ? 1.f / cap : 0.f);
    for (int64_t j = 0; j < padded; j += kLanes) {
      f8 g = load(e + j) * va - vb;
      if (cap > 0.f) {
        const f8 th = load(z + j) * vinv;
        g = g * (splat(1.f) - th * th);
      }
      store(e + j, g);
    }
    const float target_term = 1.f - eps;
    if (cap > 0.f) {
      const float th = z[safe_t] / cap;
      e[safe_t] -= target_term * (1.f - th * th);
    } else {
      e[safe_t] -= target_term;
    }
    store_row<T>(grow, e, vocab);
  }
}

#ifdef SLOWED_HAVE_AVX2_DISPATCH
template <class T>
SLOWED_TARGET_AVX2 void rows_avx2(const T* logits, T* grad, const int64_t* targets,
                                  const RowParams& p, const RowOutputs& o, int64_t b, int64_t e) {
  rows_body<T>(logits, grad, targets, p, o, b, e);
}
#endif
template <class T>
void rows_baseline(const T* logits, T* grad, const int64_t* targets, const RowParams& p,
                   const RowOutputs& o, int64_t b, int64_t e) {
  rows_body<T>(logits, grad, targets, p, o, b, e);
}

/// Runs the fused row kernel over rows [0, p.n) on ATen's intra-op threads (slowed/cpu/parallel.h).
/// `grad` may be null (no gradient wanted) or alias `logits` (in-place: each row is read fully
/// before it is written).
template <class T>
void entropy_masked_ce_rows(const T* logits, T* grad, const int64_t* targets, const RowParams& p,
                            const RowOutputs& o) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.vocab, 1));
  slowed::cpu::parallel_for(0, p.n, grain, [&](int64_t b, int64_t e) {
#ifdef SLOWED_HAVE_AVX2_DISPATCH
    if (cpu_has_avx2_fma()) return rows_avx2<T>(logits, grad, targets, p, o, b, e);
#endif
    rows_baseline<T>(logits, grad, targets, p, o, b, e);
  });
}

// ---- backward: scale rows by the upstream gradient and the normalization -------------------

template <class T>
SLOWED_SIMD_INLINE void scale_body(const T* in, T* out, int64_t vocab, const float* row_factor,
                                   float factor, int64_t begin, int64_t end) {
  const int64_t full = vocab / kLanes * kLanes;
  for (int64_t i = begin; i < end; ++i) {
    const float f = row_factor ? row_factor[i] * factor : factor;
    const T* src = in + i * vocab;
    T* dst = out + i * vocab;
    if constexpr (std::is_same_v<T, float>) {
      const f8 vf = splat(f);
      for (int64_t j = 0; j < full; j += kLanes) store(dst + j, load(src + j) * vf);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const f8 vf = splat(f);
      for (int64_t j = 0; j < full; j += kLanes)
        f32_to_bf16(reinterpret_cast<uint16_t*>(dst + j),
                    bf16_to_f32(reinterpret_cast<const uint16_t*>(src + j)) * vf);
    } else {
      for (int64_t j = 0; j < full; ++j) dst[j] = static_cast<T>(static_cast<float>(src[j]) * f);
    }
    for (int64_t j = full; j < vocab; ++j) dst[j] = static_cast<T>(static_cast<float>(src[j]) * f);
  }
}

#ifdef SLOWED_HAVE_AVX2_DISPATCH
template <class T>
SLOWED_TARGET_AVX2 void scale_avx2(const T* in, T* out, int64_t vocab, const float* rf, float f,
                                   int64_t b, int64_t e) {
  scale_body<T>(in, out, vocab, rf, f, b, e);
}
#endif
template <class T>
void scale_baseline(const T* in, T* out, int64_t vocab, const float* rf, float f, int64_t b,
                    int64_t e) {
  scale_body<T>(in, out, vocab, rf, f, b, e);
}

/// out[i, :] = in[i, :] * (row_factor ? row_factor[i] : 1) * factor, in fp32, rounded once to
/// T. `out` may alias `in`.
template <class T>
void scale_rows(const T* in, T* out, int64_t n, int64_t vocab, const float* row_factor,
                float factor) {
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(vocab, 1));
  slowed::cpu::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
#ifdef SLOWED_HAVE_AVX2_DISPATCH
    if (cpu_has_avx2_fma()) return scale_avx2<T>(in, out, vocab, row_factor, factor, b, e);
#endif
    scale_baseline<T>(in, out, vocab, row_factor, factor, b, e);
  });
}

// ---- launchers: tensors in, as the CUDA launchers --------------------------------------------

/// Calls f(T{}) with T the element type of `t`: float, c10::BFloat16 or c10::Half.
template <class F>
void with_row_type(const at::Tensor& t, const char* who, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return f(float{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    case at::kHalf:
      return f(c10::Half{});
    default:
      TORCH_INTERNAL_ASSERT(false, who, ": unsupported dtype ", t.scalar_type());
  }
}

/// The row kernel: fills lse/entropy/loss (float [N]) and kept (bool [N]) and, when `grad` is
/// defined, the keep-masked gradient (may alias `logits`). All tensors contiguous, targets int64,
/// reference (optional) float.
inline void emce_rows(const at::Tensor& logits, const at::Tensor& grad, const at::Tensor& targets,
                      const at::Tensor& reference, const at::Tensor& lse,
                      const at::Tensor& entropy, const at::Tensor& loss, const at::Tensor& kept,
                      int64_t ignore_index, float eps, float zs, float cap, bool absolute,
                      float threshold) {
  RowParams p;
  p.n = logits.size(0);
  p.vocab = logits.size(1);
  p.ignore_index = ignore_index;
  p.label_smoothing = eps;
  p.lse_square_scale = zs;
  p.softcap = cap;
  p.absolute = absolute;
  p.threshold = threshold;
  p.reference = reference.defined() ? reference.data_ptr<float>() : nullptr;
  const RowOutputs o{lse.data_ptr<float>(), entropy.data_ptr<float>(), loss.data_ptr<float>(),
                     kept.data_ptr<bool>()};
  const int64_t* t = targets.data_ptr<int64_t>();
  with_row_type(logits, "emce_rows", [&](auto tag) {
    using T = decltype(tag);
    entropy_masked_ce_rows<T>(logits.data_ptr<T>(), grad.defined() ? grad.data_ptr<T>() : nullptr,
                              t, p, o);
  });
}

/// Zeroes the gradient rows with kernel_keep && !keep (ratio mode's decision comes after the
/// row kernel): a parallel loop over the rows, no host-side index list.
inline void emce_zero_rows(const at::Tensor& grad, const at::Tensor& kernel_keep,
                           const at::Tensor& keep) {
  const int64_t n = grad.size(0), vocab = grad.size(1);
  if (n == 0) return;
  const at::Tensor keep_c = keep.contiguous();
  const bool* kk = kernel_keep.data_ptr<bool>();
  const bool* k = keep_c.data_ptr<bool>();
  char* base = static_cast<char*>(grad.data_ptr());
  const size_t row_bytes = static_cast<size_t>(vocab) * grad.element_size();
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(vocab, 1));
  slowed::cpu::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (kk[i] && !k[i]) std::memset(base + static_cast<size_t>(i) * row_bytes, 0, row_bytes);
    }
  });
}

/// out = grad * factor (float, 0-dim or [N] per row), fp32 math, one rounding; out may alias
/// grad.
inline void emce_scale_rows(const at::Tensor& grad, const at::Tensor& factor,
                            const at::Tensor& out) {
  const int64_t n = grad.size(0), vocab = grad.size(1);
  const at::Tensor f = factor.to(at::kFloat).contiguous();
  const float* rows = f.dim() == 0 ? nullptr : f.data_ptr<float>();
  const float scalar = f.dim() == 0 ? f.item<float>() : 1.f;
  with_row_type(grad, "emce_scale_rows", [&](auto tag) {
    using T = decltype(tag);
    scale_rows<T>(grad.data_ptr<T>(), out.data_ptr<T>(), n, vocab, rows, scalar);
  });
}

}  // namespace cpu
}  // namespace slowed

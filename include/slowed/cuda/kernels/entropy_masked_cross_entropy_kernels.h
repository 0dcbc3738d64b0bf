#pragma once

// CUDA kernels of entropy-masked cross-entropy, compiled at run time with NVRTC.
//
// What is fused and why: per row of logits, one kernel computes the log-sum-exp, the entropy,
// the per-token loss (label smoothing, z-loss, softcap), the keep decision of an absolute
// threshold and the keep-masked gradient (softmax - onehot, in the logits' dtype, optionally
// over the logits). The ATen composite needs about six passes over [N, V] and fp32 temporaries;
// here the logits are read in pass 1 (an online max / sum-exp / sum e*z in one sweep) and, for
// kept rows only, read again and the gradient written in pass 2. Nothing synchronizes with the
// host: counts and normalization stay on the device, and the backward's scaling kernel reads
// its factor from device memory (and returns at once when the factor is exactly 1).
// Same contract as the CPU kernel (slowed/cpu/entropy_masked_cross_entropy_cpu.h); the oracle is
// slowed/loss/entropy_masked_cross_entropy_reference.h.
//
// Conventions: no #include (bf16/fp16 conversions are bit operations or inline PTX), extern "C"
// entry points, 64-bit indices, one block per row in a grid-stride loop over rows, fixed
// reduction order (results are identical run to run). SLOWED_DTYPE selects the storage type:
// 0 float, 1 bfloat16, 2 float16 (slowed::detail::StorageDtype on the host).

#include <slowed/cuda/kernel_source.h>
#include <slowed/cuda/kernels/storage_prelude.h>

namespace slowed {
namespace cuda {
namespace kernels {

inline constexpr const char* kEntropyMaskedCeSource = R"SLOWED_CUDA(
#ifndef SLOWED_DTYPE
#define SLOWED_DTYPE 0
#endif
#define SLOWED_MAX_WARPS 32

// storage_t, to_float, from_float: kernels/storage_prelude.h, prepended to this source.

#define SLOWED_LOG2E 1.4426950408889634f
#define SLOWED_LN2 0.6931471805599453f
#define SLOWED_NEG_INF (-__int_as_float(0x7f800000))
#define SLOWED_FLT_MAX 3.402823466e38f

// Elements per 16-byte vector access.
#define SLOWED_VEC (16 / (int)sizeof(storage_t))

__device__ __forceinline__ float capped(float x, float cap, float inv_cap) {
  return cap > 0.f ? cap * tanhf(x * inv_cap) : x;
}

// Calls f(j, x) for every element j < V of a row, with 16-byte loads where the row is aligned.
template <class F>
__device__ __forceinline__ void for_each_in_row(const storage_t* row, long long V, F f) {
  const unsigned long long addr = reinterpret_cast<unsigned long long>(row);
  long long head = static_cast<long long>(((16 - (addr & 15)) & 15) / sizeof(storage_t));
  if ((addr % sizeof(storage_t)) != 0 || head > V) head = V;
  for (long long j = threadIdx.x; j < head; j += blockDim.x) f(j, to_float(row[j]));
  const long long nvec = (V - head) / SLOWED_VEC;
  const uint4* vrow = reinterpret_cast<const uint4*>(row + head);
  for (long long v = threadIdx.x; v < nvec; v += blockDim.x) {
    uint4 packed = vrow[v];
    const storage_t* el = reinterpret_cast<const storage_t*>(&packed);
#pragma unroll
    for (int k = 0; k < SLOWED_VEC; ++k) f(head + v * SLOWED_VEC + k, to_float(el[k]));
  }
  for (long long j = head + nvec * SLOWED_VEC + threadIdx.x; j < V; j += blockDim.x)
    f(j, to_float(row[j]));
}

// Online softmax statistics over base-2 scaled logits: m = max z, s = sum 2^((z-m) log2e),
// t = sum 2^(...) * z, and the plain sum of z.
struct RowStats {
  float m, s, t, sum_z;
};

__device__ __forceinline__ RowStats merge(RowStats a, RowStats b) {
  const float m = fmaxf(a.m, b.m);
  const float fa = a.m == SLOWED_NEG_INF ? 0.f : exp2f((a.m - m) * SLOWED_LOG2E);
  const float fb = b.m == SLOWED_NEG_INF ? 0.f : exp2f((b.m - m) * SLOWED_LOG2E);
  RowStats r;
  r.m = m;
  r.s = a.s * fa + b.s * fb;
  r.t = a.t * fa + b.t * fb;
  r.sum_z = a.sum_z + b.sum_z;
  return r;
}

__device__ __forceinline__ RowStats shfl_xor(RowStats v, int lane_mask) {
  RowStats r;
  r.m = __shfl_xor_sync(0xffffffffu, v.m, lane_mask);
  r.s = __shfl_xor_sync(0xffffffffu, v.s, lane_mask);
  r.t = __shfl_xor_sync(0xffffffffu, v.t, lane_mask);
  r.sum_z = __shfl_xor_sync(0xffffffffu, v.sum_z, lane_mask);
  return r;
}

// Block-wide merge in a fixed order; every thread gets the result.
__device__ __forceinline__ RowStats block_merge(RowStats v, RowStats* smem) {
  for (int o = 16; o > 0; o >>= 1) v = merge(v, shfl_xor(v, o));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int warps = (blockDim.x + 31) >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    RowStats w = lane < warps ? smem[lane] : RowStats{SLOWED_NEG_INF, 0.f, 0.f, 0.f};
    for (int o = 16; o > 0; o >>= 1) w = merge(w, shfl_xor(w, o));
    if (lane == 0) smem[0] = w;
  }
  __syncthreads();
  RowStats r = smem[0];
  __syncthreads();  // smem is reused by the next row
  return r;
}

// Pass 1 (+ pass 2 for kept rows when grad != 0). Outputs per row: lse and entropy (both NaN
// when the row holds a NaN or its log-sum-exp is not finite), unweighted loss (0 for ignored
// rows), kept (0/1).
// absolute != 0: keep = valid && !(h < threshold) && !isnan(h), h = reference ? reference[i] :
// entropy; otherwise every valid row is kept (ratio mode decides afterwards).
extern "C" __global__ void slowed_emce_rows(
    const storage_t* logits, storage_t* grad, const long long* targets, const float* reference,
    float* lse_out, float* entropy_out, float* loss_out, unsigned char* kept_out, long long n,
    long long V, long long ignore_index, float eps, float zs, float cap, int absolute,
    float threshold) {
  __shared__ RowStats smem[SLOWED_MAX_WARPS];
  __shared__ int keep_row;
  __shared__ float row_lse, row_s;
  const float inv_cap = cap > 0.f ? 1.f / cap : 0.f;
  for (long long i = blockIdx.x; i < n; i += gridDim.x) {
    const storage_t* row = logits + i * V;
    RowStats acc{SLOWED_NEG_INF, 0.f, 0.f, 0.f};
    for_each_in_row(row, V, [&](long long, float x) {
      const float z = capped(x, cap, inv_cap);
      acc.sum_z += z;
      if (z > acc.m) {  // rescale the running sums to the new max
        const float f = acc.m == SLOWED_NEG_INF ? 0.f : exp2f((acc.m - z) * SLOWED_LOG2E);
        acc.s *= f;
        acc.t *= f;
        acc.m = z;
      }
      if (z != SLOWED_NEG_INF) {  // a NaN z makes e NaN and poisons the row, as it should
        const float e = exp2f((z - acc.m) * SLOWED_LOG2E);
        acc.s += e;
        acc.t += e * z;
      }
    });
    const RowStats r = block_merge(acc, smem);
    if (threadIdx.x == 0) {
      // A row holding a NaN, or whose log-sum-exp is not finite (a +Inf logit, every logit
      // -Inf), reports NaN lse and entropy, as the CPU kernel and the reference do.
      float lse = r.m + logf(r.s);
      if (r.sum_z != r.sum_z || !(fabsf(lse) <= SLOWED_FLT_MAX)) lse = __int_as_float(0x7fc00000);
      const float h = lse != lse ? lse : fmaxf(lse - r.t / r.s, 0.f);
      const long long tgt = targets[i];
      const bool valid = tgt != ignore_index;
      const long long safe_t = (valid && tgt >= 0 && tgt < V) ? tgt : 0;
      const float zt = capped(to_float(row[safe_t]), cap, inv_cap);
      float loss = lse - zt;
      if (eps > 0.f) loss = (1.f - eps) * loss + eps * (lse - r.sum_z / static_cast<float>(V));
      if (zs > 0.f) loss += zs * lse * lse;
      bool keep = valid;
      if (keep && absolute) {
        const float hd = reference ? reference[i] : h;
        keep = !(hd < threshold) && !(hd != hd);
      }
      lse_out[i] = lse;
      entropy_out[i] = h;
      loss_out[i] = valid ? loss : 0.f;
      kept_out[i] = keep ? 1 : 0;
      keep_row = keep ? 1 : 0;
      row_lse = lse;
      row_s = r.s;
    }
    __syncthreads();
    if (grad != 0) {
      storage_t* grow = grad + i * V;
      if (!keep_row) {
        for (long long j = threadIdx.x; j < V; j += blockDim.x) grow[j] = from_float(0.f);
      } else {
        const long long tgt = targets[i];
        const long long safe_t = (tgt >= 0 && tgt < V) ? tgt : 0;
        const float lse = row_lse;
        const float a = (1.f + 2.f * zs * lse) / row_s;
        const float b = eps / static_cast<float>(V);
        const float mx = r.m;
        // Pass 2 reads the row again (from L2 when it is still there) and writes the gradient
        // element by element; in place is safe: each element is read before it is written, by
        // the same thread, and pass 1 finished at the __syncthreads above.
        for_each_in_row(row, V, [&](long long j, float x) {
          const float z = capped(x, cap, inv_cap);
          float g = exp2f((z - mx) * SLOWED_LOG2E) * a - b;
          if (j == safe_t) g -= 1.f - eps;
          if (cap > 0.f) {
            const float th = z * inv_cap;
            g *= 1.f - th * th;
          }
          grow[j] = from_float(g);
        });
      }
    }
    __syncthreads();
  }
}

// Ratio mode: zero the gradient rows the kernel kept but the decision masked.
extern "C" __global__ void slowed_emce_zero_rows(storage_t* grad, const unsigned char* kernel_keep,
                                                 const bool* keep, long long n, long long V) {
  for (long long i = blockIdx.x; i < n; i += gridDim.x) {
    if (!kernel_keep[i] || keep[i]) continue;
    storage_t* grow = grad + i * V;
    for (long long j = threadIdx.x; j < V; j += blockDim.x) grow[j] = from_float(0.f);
  }
}

// Backward: out = grad * factor (per_row ? factor[i] : factor[0]), fp32 math, one rounding.
// A factor of exactly 1 with out == grad leaves the row as it is without touching memory.
extern "C" __global__ void slowed_emce_scale_rows(const storage_t* grad, storage_t* out,
                                                  const float* factor, int per_row, long long n,
                                                  long long V) {
  for (long long i = blockIdx.x; i < n; i += gridDim.x) {
    const float f = per_row ? factor[i] : factor[0];
    const storage_t* src = grad + i * V;
    storage_t* dst = out + i * V;
    if (f == 1.f && src == dst) continue;
    for (long long j = threadIdx.x; j < V; j += blockDim.x) dst[j] = from_float(to_float(src[j]) * f);
  }
}
)SLOWED_CUDA";

/// The kernel source (family "entropy_masked_ce") for storage dtype `dtype`.
inline const KernelSource& entropy_masked_ce_source(slowed::detail::StorageDtype dtype) {
  static const StorageVariants variants(
      KernelSource("entropy_masked_ce", with_storage_prelude(kEntropyMaskedCeSource),
                   {"slowed_emce_rows", "slowed_emce_zero_rows", "slowed_emce_scale_rows"}));
  return variants[dtype];
}

}  // namespace kernels
}  // namespace cuda
}  // namespace slowed

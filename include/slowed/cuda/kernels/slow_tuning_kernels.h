#pragma once

// CUDA kernels of SlowTuningOptimizer, compiled at run time with NVRTC.
//
// What is fused and why: the reference path transforms each parameter tensor with about six
// ATen ops (a difference, two norms, a multiplication, a subtraction, a copy), one launch each,
// so a model with 300 tensors costs ~2000 launches per step. Here every pass covers all tensors
// of one dtype in a few launches, as PyTorch's multi_tensor_apply does: the host cuts the
// tensors into chunks of SLOWED_MT_CHUNK elements and passes up to SLOWED_MT_TENSORS tensors and
// SLOWED_MT_BLOCKS chunks per launch by value in a kernel argument (`SlowMtArgs`), so there is
// no device-side metadata and no host copy. One block per chunk.
//
//  - Generic path (any Base): `slowed_st_snapshot` copies theta into a snapshot before
//    Base::step; afterwards `slowed_st_generic_sums` and `slowed_st_finalize` (only with a
//    bound) reduce the five sums below to the factors, and `slowed_st_generic_apply` rewrites
//    theta <- theta - (1 - a)(theta - theta_prev) and projects onto the drift ball.
//  - Adam path (AdamW, Adam): no snapshot, no Base::step. `slowed_st_adam_sums` computes the
//    Adam update u of every element without writing anything and reduces the sums, then
//    `slowed_st_finalize` (the same kernel) the factors; `slowed_st_adam_apply` recomputes u
//    (same code, same inputs) and writes theta = theta + a u (projected), exp_avg, exp_avg_sq
//    and max_exp_avg_sq in one pass. Step-scale mode needs only the apply pass.
// Sums per tensor, in fp64 (u: the step; p = theta_prev; d = p - theta_0; t = theta_0):
//   uu = ||u||^2, pp = ||p||^2, du = <d, u>, dd = ||d||^2, tt = ||t||^2.
// Each sums block writes its chunk's partial sums to its own slot. Between the two passes
// `slowed_st_finalize`, one block per tensor, reduces the slots of its tensor in a fixed order
// (results identical run to run) and computes the tensor's factors once (`slow_factors`, the
// device twin of slowed::cpu::slow_factors):
//   a = s * min(1, r max(||p||, floor) / (s ||u||)),   g = min(1, R max(||t||, floor) / ||d + a u||),
// with ||d + a u||^2 = dd + 2a du + a^2 uu, into 2 doubles per tensor; each apply block reads
// its tensor's two. (When every apply block reduced all slots of its tensor itself, a tensor of
// C chunks cost C^2 slot reads: 5.2M, 210 MB, for the 2289 chunks of a 150M-element embedding.)
// Nothing synchronizes with the host.
//
// Conventions: no #include (bf16/fp16 conversions are bit operations or inline PTX), extern "C"
// entry points, 64-bit element indices, fixed reduction order (results identical run to run),
// fp32 element arithmetic with IEEE sqrt and division (NVRTC's defaults; FMA contraction on).
// SLOWED_DTYPE selects the storage type of every operand: 0 float, 1 bfloat16, 2 float16
// (slowed::detail::StorageDtype on the host).
// The layout of SlowMtArgs is mirrored by slowed::cuda::detail::SlowMtArgs in
// slowed/cuda/slow_tuning_cuda.h; both sides static_assert its size.

#include <slowed/cuda/kernel_source.h>
#include <slowed/cuda/kernels/storage_prelude.h>

namespace slowed {
namespace cuda {
namespace kernels {

inline constexpr const char* kSlowTuningSource = R"SLOWED_CUDA(
#ifndef SLOWED_DTYPE
#define SLOWED_DTYPE 0
#endif
#define SLOWED_MT_TENSORS 24
#define SLOWED_MT_BLOCKS 320
#define SLOWED_MT_CHUNK 65536
#define SLOWED_MT_THREADS 512
#define SLOWED_MT_WARPS (SLOWED_MT_THREADS / 32)

// storage_t, to_float, from_float: kernels/storage_prelude.h, prepended to this source.

// Pointer slots of SlowMtArgs::ptr.
#define SLOT_PARAM 0
#define SLOT_AUX 1      // generic: snapshot theta_prev (or null); Adam: the gradient
#define SLOT_EXP_AVG 2
#define SLOT_EXP_AVG_SQ 3
#define SLOT_MAX_EXP_AVG_SQ 4
#define SLOT_INITIAL 5  // theta_0, or null: no drift projection for this tensor
// Per-tensor fp32 hyper-parameters of the Adam path (SlowMtArgs::hyper).
#define H_BETA1 0
#define H_BETA2 1
#define H_ONE_MINUS_BETA1 2
#define H_ONE_MINUS_BETA2 3
#define H_EPS 4
#define H_STEP_SIZE 5     // lr / (1 - beta1^t)
#define H_BC2_SQRT 6      // sqrt(1 - beta2^t)
#define H_WEIGHT_DECAY 7  // AdamW: lr * weight_decay; Adam: weight_decay (L2)

struct SlowMtArgs {
  void* ptr[6][SLOWED_MT_TENSORS];
  long long numel[SLOWED_MT_TENSORS];
  float hyper[8][SLOWED_MT_TENSORS];
  int first_slot[SLOWED_MT_TENSORS];              // partial-sum slot of the tensor's chunk 0
  int tensor_index[SLOWED_MT_TENSORS];            // in the call: its factors' place
  int block_chunk[SLOWED_MT_BLOCKS];              // chunk index within its tensor
  unsigned char block_tensor[SLOWED_MT_BLOCKS];   // tensor index within this launch
  unsigned char amsgrad[SLOWED_MT_TENSORS];
};
static_assert(sizeof(SlowMtArgs) == 3928, "SlowMtArgs: layout differs from the host mirror");

// Sum over the block of 5 doubles; every thread gets the same bits (xor butterflies give all
// lanes the same association, and the second level runs identically in every warp).
__device__ __forceinline__ void warp_sum5(double* v) {
#pragma unroll
  for (int k = 0; k < 5; ++k) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  }
}

__device__ __forceinline__ void block_sum5(double* v) {
  __shared__ double partial[SLOWED_MT_WARPS][5];
  warp_sum5(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  __syncthreads();  // the buffer may still be read by a previous call
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < 5; ++k) partial[warp][k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < 5; ++k) v[k] = lane < nwarps ? partial[lane][k] : 0.0;
  warp_sum5(v);
}

// The tensor's sums: its chunks' slots reduced in a fixed order.
__device__ __forceinline__ void tensor_sums(long long numel, int first_slot,
                                            const double* __restrict__ partials, double* s) {
  const long long nchunks = (numel + SLOWED_MT_CHUNK - 1) / SLOWED_MT_CHUNK;
#pragma unroll
  for (int k = 0; k < 5; ++k) s[k] = 0.0;
  for (long long c = threadIdx.x; c < nchunks; c += blockDim.x) {
    const double* slot = partials + 5LL * (first_slot + c);
#pragma unroll
    for (int k = 0; k < 5; ++k) s[k] += slot[k];
  }
  block_sum5(s);
}

// The device twin of slowed::cpu::slow_factors (slowed/cpu/slow_tuning_cpu.h).
__device__ __forceinline__ void slow_factors(const double* s, double scale, double max_step,
                                             double max_drift, double norm_floor,
                                             bool has_initial, double* a, double* g) {
  *a = scale;
  *g = 1.0;
  if (max_step > 0.0) {
    const double radius = max_step * fmax(sqrt(s[1]), norm_floor);
    const double n = scale * sqrt(s[0]);
    if (radius > 0.0 && n > radius) *a = scale * (radius / n);
  }
  if (max_drift > 0.0 && has_initial) {
    const double radius = max_drift * fmax(sqrt(s[4]), norm_floor);
    const double n = sqrt(fmax(s[3] + 2.0 * (*a) * s[2] + (*a) * (*a) * s[0], 0.0));
    if (radius > 0.0 && n > radius) *g = radius / n;
  }
}

// The factors of tensor t in an apply pass: (scale, 1) without factors (no bound), else the two
// that slowed_st_finalize wrote for it.
__device__ __forceinline__ void apply_factors(const SlowMtArgs& args, int t,
                                              const double* __restrict__ factors, double scale,
                                              double* a, double* g) {
  *a = scale;
  *g = 1.0;
  if (factors) {
    *a = factors[2LL * args.tensor_index[t]];
    *g = factors[2LL * args.tensor_index[t] + 1];
  }
}

// One element's terms of the five sums: u the step, p = theta_prev, and with theta_0 (`init`
// not null) d = p - theta_0 and theta_0 itself.
__device__ __forceinline__ void add_sums(double* s, float u, float p,
                                         const storage_t* __restrict__ init, long long i) {
  s[0] += static_cast<double>(u) * u;
  s[1] += static_cast<double>(p) * p;
  if (init) {
    const float t0 = to_float(init[i]);
    const float d = p - t0;
    s[2] += static_cast<double>(d) * u;
    s[3] += static_cast<double>(d) * d;
    s[4] += static_cast<double>(t0) * t0;
  }
}

__device__ __forceinline__ void write_partials(double* __restrict__ partials, int first_slot,
                                               long long chunk, const double* s) {
  if (threadIdx.x == 0) {
    double* slot = partials + 5LL * (first_slot + chunk);
#pragma unroll
    for (int k = 0; k < 5; ++k) slot[k] = s[k];
  }
}

// ---- snapshot ------------------------------------------------------------------------------

// theta_prev <- theta (slot AUX <- slot PARAM), bit for bit.
extern "C" __global__ void __launch_bounds__(SLOWED_MT_THREADS)
slowed_st_snapshot(SlowMtArgs args) {
  const int t = args.block_tensor[blockIdx.x];
  const long long begin = static_cast<long long>(args.block_chunk[blockIdx.x]) * SLOWED_MT_CHUNK;
  const long long end = min(args.numel[t], begin + SLOWED_MT_CHUNK);
  const storage_t* __restrict__ src = static_cast<const storage_t*>(args.ptr[SLOT_PARAM][t]);
  storage_t* __restrict__ dst = static_cast<storage_t*>(args.ptr[SLOT_AUX][t]);
#pragma unroll 4
  for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) dst[i] = src[i];
}

// ---- finalize (between the sums and the apply pass, with a bound) ---------------------------

// Block b: tensor first + b of the launch's SlowMtArgs (the launch batches of the two passes;
// first = 1 when slot 0 continues a tensor whose chunk 0, and so its finalize, was in an earlier
// batch: one finalize per tensor). Reduces the tensor's slots (tensor_sums, every thread gets
// the same bits) and writes (a, g) to factors[2 tensor_index].
extern "C" __global__ void __launch_bounds__(SLOWED_MT_THREADS)
slowed_st_finalize(SlowMtArgs args, const double* partials, double* factors, int first,
                   double scale, double max_step, double max_drift, double norm_floor) {
  const int t = first + blockIdx.x;
  double s[5], a, g;
  tensor_sums(args.numel[t], args.first_slot[t], partials, s);
  slow_factors(s, scale, max_step, max_drift, norm_floor, args.ptr[SLOT_INITIAL][t] != nullptr,
               &a, &g);
  if (threadIdx.x == 0) {
    factors[2LL * args.tensor_index[t]] = a;
    factors[2LL * args.tensor_index[t] + 1] = g;
  }
}

// ---- generic path (after Base::step; x = theta as Base wrote it) -----------------------------

// Sums with u = x - theta_prev (0 without a snapshot) and p = theta_prev (x without one).
extern "C" __global__ void __launch_bounds__(SLOWED_MT_THREADS)
slowed_st_generic_sums(SlowMtArgs args, double* partials) {
  const int t = args.block_tensor[blockIdx.x];
  const long long chunk = args.block_chunk[blockIdx.x];
  const long long begin = chunk * SLOWED_MT_CHUNK;
  const long long end = min(args.numel[t], begin + SLOWED_MT_CHUNK);
  const storage_t* __restrict__ x = static_cast<const storage_t*>(args.ptr[SLOT_PARAM][t]);
  const storage_t* __restrict__ prev = static_cast<const storage_t*>(args.ptr[SLOT_AUX][t]);
  const storage_t* __restrict__ init = static_cast<const storage_t*>(args.ptr[SLOT_INITIAL][t]);
  double s[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
#pragma unroll 4
  for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float xv = to_float(x[i]);
    const float p = prev ? to_float(prev[i]) : xv;
    add_sums(s, xv - p, p, init, i);
  }
  block_sum5(s);
  write_partials(partials, args.first_slot[t], chunk, s);
}

// theta <- theta - (1 - a)(theta - theta_prev), then theta <- theta - (1 - g)(theta - theta_0)
// when g < 1. With factors == null: a = scale, g = 1. Factors (1, 1) write nothing.
extern "C" __global__ void __launch_bounds__(SLOWED_MT_THREADS)
slowed_st_generic_apply(SlowMtArgs args, const double* factors, double scale) {
  const int t = args.block_tensor[blockIdx.x];
  const long long begin = static_cast<long long>(args.block_chunk[blockIdx.x]) * SLOWED_MT_CHUNK;
  const long long end = min(args.numel[t], begin + SLOWED_MT_CHUNK);
  storage_t* __restrict__ x = static_cast<storage_t*>(args.ptr[SLOT_PARAM][t]);
  const storage_t* __restrict__ prev = static_cast<const storage_t*>(args.ptr[SLOT_AUX][t]);
  const storage_t* __restrict__ init = static_cast<const storage_t*>(args.ptr[SLOT_INITIAL][t]);
  double a, g;
  apply_factors(args, t, factors, scale, &a, &g);
  const bool rewrite = prev != nullptr && a != 1.0;
  const bool project = init != nullptr && g < 1.0;
  if (!rewrite && !project) return;
  const float one_minus_a = static_cast<float>(1.0 - a);
  const float one_minus_g = static_cast<float>(1.0 - g);
#pragma unroll 4
  for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
    float v = to_float(x[i]);
    if (rewrite) v = v - one_minus_a * (v - to_float(prev[i]));
    if (project) v = v - one_minus_g * (v - to_float(init[i]));
    x[i] = from_float(v);
  }
}

// ---- Adam path -----------------------------------------------------------------------------

struct AdamHyper {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps, step_size, bc2_sqrt, weight_decay;
  bool amsgrad;
};

// One Adam(W) element in fp32, in torch::optim::AdamW's order of operations (the CPU twin is
// slowed::cpu::detail::adam_lanes): returns the update u (theta_new = p + u is AdamW's step)
// and updates m, v and vmax in registers.
__device__ __forceinline__ float adam_update(float p, float g, float& m, float& v, float& vmax,
                                             const AdamHyper& h, bool decoupled) {
  if (!decoupled && h.weight_decay != 0.f) g = g + p * h.weight_decay;
  m = m * h.beta1 + g * h.one_minus_beta1;
  v = v * h.beta2 + (g * g) * h.one_minus_beta2;
  float vh = v;
  if (h.amsgrad) {
    vmax = vmax > v ? vmax : v;
    vh = vmax;
  }
  const float denom = sqrtf(vh) / h.bc2_sqrt + h.eps;
  float u = (-h.step_size * m) / denom;
  if (decoupled && h.weight_decay != 0.f) u = u - p * h.weight_decay;
  return u;
}

__device__ __forceinline__ AdamHyper adam_hyper(const SlowMtArgs& args, int t) {
  AdamHyper h;
  h.beta1 = args.hyper[H_BETA1][t];
  h.beta2 = args.hyper[H_BETA2][t];
  h.one_minus_beta1 = args.hyper[H_ONE_MINUS_BETA1][t];
  h.one_minus_beta2 = args.hyper[H_ONE_MINUS_BETA2][t];
  h.eps = args.hyper[H_EPS][t];
  h.step_size = args.hyper[H_STEP_SIZE][t];
  h.bc2_sqrt = args.hyper[H_BC2_SQRT][t];
  h.weight_decay = args.hyper[H_WEIGHT_DECAY][t];
  h.amsgrad = args.amsgrad[t] != 0;
  return h;
}

// Pass 1: the sums of the Adam update; writes nothing but the chunk's partial sums.
extern "C" __global__ void __launch_bounds__(SLOWED_MT_THREADS)
slowed_st_adam_sums(SlowMtArgs args, double* partials, int decoupled) {
  const int t = args.block_tensor[blockIdx.x];
  const long long chunk = args.block_chunk[blockIdx.x];
  const long long begin = chunk * SLOWED_MT_CHUNK;
  const long long end = min(args.numel[t], begin + SLOWED_MT_CHUNK);
  const AdamHyper h = adam_hyper(args, t);
  const storage_t* __restrict__ param = static_cast<const storage_t*>(args.ptr[SLOT_PARAM][t]);
  const storage_t* __restrict__ grad = static_cast<const storage_t*>(args.ptr[SLOT_AUX][t]);
  const storage_t* __restrict__ exp_avg = static_cast<const storage_t*>(args.ptr[SLOT_EXP_AVG][t]);
  const storage_t* __restrict__ exp_avg_sq =
      static_cast<const storage_t*>(args.ptr[SLOT_EXP_AVG_SQ][t]);
  const storage_t* __restrict__ max_exp_avg_sq =
      static_cast<const storage_t*>(args.ptr[SLOT_MAX_EXP_AVG_SQ][t]);
  const storage_t* __restrict__ init = static_cast<const storage_t*>(args.ptr[SLOT_INITIAL][t]);
  double s[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
#pragma unroll 4
  for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float p = to_float(param[i]);
    float m = to_float(exp_avg[i]), v = to_float(exp_avg_sq[i]);
    float vmax = h.amsgrad ? to_float(max_exp_avg_sq[i]) : 0.f;
    add_sums(s, adam_update(p, to_float(grad[i]), m, v, vmax, h, decoupled != 0), p, init, i);
  }
  block_sum5(s);
  write_partials(partials, args.first_slot[t], chunk, s);
}

// Pass 2 (the only pass in step-scale mode, factors == null: a = scale, g = 1):
// theta <- p + a u, projected when g < 1; the moments are stored as computed.
extern "C" __global__ void __launch_bounds__(SLOWED_MT_THREADS)
slowed_st_adam_apply(SlowMtArgs args, const double* factors, double scale, int decoupled) {
  const int t = args.block_tensor[blockIdx.x];
  const long long begin = static_cast<long long>(args.block_chunk[blockIdx.x]) * SLOWED_MT_CHUNK;
  const long long end = min(args.numel[t], begin + SLOWED_MT_CHUNK);
  const AdamHyper h = adam_hyper(args, t);
  storage_t* __restrict__ param = static_cast<storage_t*>(args.ptr[SLOT_PARAM][t]);
  const storage_t* __restrict__ grad = static_cast<const storage_t*>(args.ptr[SLOT_AUX][t]);
  storage_t* __restrict__ exp_avg = static_cast<storage_t*>(args.ptr[SLOT_EXP_AVG][t]);
  storage_t* __restrict__ exp_avg_sq = static_cast<storage_t*>(args.ptr[SLOT_EXP_AVG_SQ][t]);
  storage_t* __restrict__ max_exp_avg_sq =
      static_cast<storage_t*>(args.ptr[SLOT_MAX_EXP_AVG_SQ][t]);
  const storage_t* __restrict__ init = static_cast<const storage_t*>(args.ptr[SLOT_INITIAL][t]);
  double a, g;
  apply_factors(args, t, factors, scale, &a, &g);
  const float fa = static_cast<float>(a);
  const bool project = init != nullptr && g < 1.0;
  const float one_minus_g = static_cast<float>(1.0 - g);
#pragma unroll 4
  for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float p = to_float(param[i]);
    float m = to_float(exp_avg[i]), v = to_float(exp_avg_sq[i]);
    float vmax = h.amsgrad ? to_float(max_exp_avg_sq[i]) : 0.f;
    const float u = adam_update(p, to_float(grad[i]), m, v, vmax, h, decoupled != 0);
    float x = p + fa * u;
    if (project) x = x - one_minus_g * (x - to_float(init[i]));
    param[i] = from_float(x);
    exp_avg[i] = from_float(m);
    exp_avg_sq[i] = from_float(v);
    if (h.amsgrad) max_exp_avg_sq[i] = from_float(vmax);
  }
}
)SLOWED_CUDA";

/// The Slow Tuning kernel source (family "slow_tuning") for storage dtype `dtype`.
inline const KernelSource& slow_tuning_source(slowed::detail::StorageDtype dtype) {
  static const StorageVariants variants(KernelSource(
      "slow_tuning", with_storage_prelude(kSlowTuningSource),
      {"slowed_st_snapshot", "slowed_st_generic_sums", "slowed_st_finalize",
       "slowed_st_generic_apply", "slowed_st_adam_sums", "slowed_st_adam_apply"}));
  return variants[dtype];
}

}  // namespace kernels
}  // namespace cuda
}  // namespace slowed

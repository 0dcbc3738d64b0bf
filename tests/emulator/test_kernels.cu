// Kernels of the emulator's own tests (tests/emulator/test_emulator_core.cpp). Each shows one
// behaviour of the emulator; the ones named *_bug are wrong on purpose and must be reported.
// Plain CUDA without headers, like the library's sources, and run through the same generator.

// A block sum with warp shuffles and a shared buffer: correct for any whole number of warps.
extern "C" __global__ void emu_block_sum(const float* x, float* out, long long n) {
  __shared__ float partial[32];
  float v = 0.f;
  for (long long i = threadIdx.x; i < n; i += blockDim.x) v += x[blockIdx.x * n + i];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warps = (blockDim.x + 31) / 32;
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    float w = static_cast<int>(threadIdx.x) < warps ? partial[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) w += __shfl_xor_sync(0xffffffffu, w, o);
    if (threadIdx.x == 0) out[blockIdx.x] = w;
  }
}

// The same without the barrier: warp 0 may read partial[] before the other warps wrote it, so
// the result depends on the thread order (poisoned shared memory makes the stale read a NaN).
extern "C" __global__ void emu_block_sum_race_bug(const float* x, float* out, long long n) {
  __shared__ float partial[32];
  float v = 0.f;
  for (long long i = threadIdx.x; i < n; i += blockDim.x) v += x[blockIdx.x * n + i];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warps = (blockDim.x + 31) / 32;
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
  if (threadIdx.x < 32) {
    float w = static_cast<int>(threadIdx.x) < warps ? partial[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) w += __shfl_xor_sync(0xffffffffu, w, o);
    if (threadIdx.x == 0) out[blockIdx.x] = w;
  }
}

// Shuffle semantics: per thread, five results of the warp collectives with sub-warp widths.
extern "C" __global__ void emu_shuffles(int* out) {
  const int lane = threadIdx.x & 31;
  const int v = 100 * (threadIdx.x >> 5) + lane;
  int* o = out + 6 * threadIdx.x;
  o[0] = __shfl_up_sync(0xffffffffu, v, 3);
  o[1] = __shfl_down_sync(0xffffffffu, v, 5, 16);
  o[2] = __shfl_xor_sync(0xffffffffu, v, 6, 8);
  o[3] = __shfl_sync(0xffffffffu, v, lane + 7, 16);
  o[4] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  o[5] = __all_sync(0xffffffffu, v >= 0) + 2 * __any_sync(0xffffffffu, lane == 31);
}

// Two half-warps exchanging independently (disjoint masks in flight at once): legal.
extern "C" __global__ void emu_half_warps(int* out) {
  const int lane = threadIdx.x & 31;
  const unsigned mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  out[threadIdx.x] = __shfl_xor_sync(mask, lane, 1);
}

// __syncthreads taken by some threads only.
extern "C" __global__ void emu_divergent_barrier_bug(int* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1;
}

// Odd and even threads wait at different barriers.
extern "C" __global__ void emu_two_barriers_bug(int* out) {
  if (threadIdx.x & 1) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// A thread exits early while the others wait at a barrier.
extern "C" __global__ void emu_early_exit_bug(int* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// Lane 3 skips a full-mask shuffle: the warp deadlocks.
extern "C" __global__ void emu_missing_lane_bug(int* out) {
  int v = threadIdx.x;
  if ((threadIdx.x & 31) != 3) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// Lanes 0-15 read lane 20, which is not in their mask.
extern "C" __global__ void emu_source_outside_mask_bug(int* out) {
  if ((threadIdx.x & 31) < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1, 20);
}

// 16-byte loads: `offset` elements into the buffer, `count` vectors.
extern "C" __global__ void emu_vector_load(const float* x, float* out, long long offset,
                                           long long count) {
  const uint4* v = reinterpret_cast<const uint4*>(x + offset);
  for (long long i = threadIdx.x; i < count; i += blockDim.x) {
    const uint4 p = v[i];
    out[i] = __uint_as_float(p.x) + __uint_as_float(p.w);
  }
}

// A scalar store `past` elements beyond n.
extern "C" __global__ void emu_store_past_end_bug(float* out, long long n, long long past) {
  if (threadIdx.x == 0) out[n - 1 + past] = 1.f;
}

// Reads a __shared__ value nobody wrote: the poison (a NaN) comes out.
extern "C" __global__ void emu_uninitialized_shared_bug(float* out) {
  __shared__ float never_written;
  out[threadIdx.x] = never_written;
}

// Launch bounds of 64 threads.
extern "C" __global__ void __launch_bounds__(64) emu_bounded(int* out) { out[threadIdx.x] = 7; }

// The fp16 conversions through the same inline PTX as the kernels' storage prelude.
extern "C" __global__ void emu_f16_round_trip(const float* x, unsigned short* h, float* back,
                                              long long n) {
  for (long long i = threadIdx.x; i < n; i += blockDim.x) {
    unsigned short b;
    float f = x[i];
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(f));
    h[i] = b;
    float g;
    asm("cvt.f32.f16 %0, %1;" : "=f"(g) : "h"(b));
    back[i] = g;
  }
}

// Writes blockIdx and threadIdx of every thread of a 3-D launch.
extern "C" __global__ void emu_indices(unsigned* out) {
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  unsigned* o = out + 2 * (block * threads + t);
  o[0] = block;
  o[1] = t;
}

#pragma once

// slowed::cpu::parallel_for: at::parallel_for that is parallel in every includer's build.
//
// Why not at::parallel_for itself. In LibTorch's OpenMP builds (the PyPI wheels:
// AT_PARALLEL_OPENMP) at::parallel_for is an inline template whose parallel branch is a
// `#pragma omp parallel` in ATen/ParallelOpenMP.h, compiled only where the includer defines
// _OPENMP. A translation unit built without -fopenmp (the usual trainer, and every target of this
// project) silently gets the serial branch: the fused CPU kernels ran on one thread while ATen's
// own ops used all of them. A header-only library must not ask for a build change, so here the
// work is handed to a TensorIterator over a dummy byte tensor of the range's length:
// TensorIteratorBase::for_each is compiled inside libtorch_cpu with OpenMP, splits the range over
// ATen's intra-op threads (at::set_num_threads) exactly as at::parallel_for does (contiguous
// blocks, one per thread, at most ceil(n / grain) threads) and rethrows the first exception.
// Where _OPENMP is defined, at::parallel_for is parallel already and is used directly.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>

#include <algorithm>
#include <cstdint>

namespace slowed {
namespace cpu {

/// Calls f(b, e) on disjoint contiguous sub-ranges covering [begin, end), in parallel over ATen's
/// intra-op threads when the range holds more than `grain` items (as at::parallel_for).
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
#ifdef _OPENMP
  at::parallel_for(begin, end, grain, f);
#else
  const int64_t n = end - begin;
  if (n <= grain || n == 1 || at::get_num_threads() == 1 || at::in_parallel_region()) {
    f(begin, end);
    return;
  }
  // Each byte of `items` stands for one item; the loop receives pointers into it, and the
  // offset from its start is the item's index.
  at::Tensor items = at::empty({n}, at::TensorOptions().dtype(at::kByte));
  const char* base = static_cast<const char*>(items.data_ptr());
  at::TensorIterator iter = at::TensorIterator::nullary_op(items);
  iter.for_each(
      [&](char** data, const int64_t* strides, int64_t size0, int64_t size1) {
        // strides[0]: the inner stride (1 byte); strides[1]: the outer one, only when size1 > 1.
        const int64_t outer = size1 > 1 ? strides[1] : 0;
        for (int64_t j = 0; j < size1; ++j) {
          const int64_t first = (data[0] + j * outer) - base;
          TORCH_INTERNAL_ASSERT(strides[0] == 1 && first >= 0 && first + size0 <= n,
                                "slowed::cpu::parallel_for: unexpected iteration layout");
          f(begin + first, begin + first + size0);
        }
      },
      std::max<int64_t>(grain, 1));
#endif
}

}  // namespace cpu
}  // namespace slowed

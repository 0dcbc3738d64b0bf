// bench_loss: entropy-masked cross-entropy, forward + backward, against the ATen composite and a
// copy of the logits (the read-once/write-once roofline), measured in the same process. Rows:
// the copy, the ATen composite, slowed's reference path (use_reference), slowed as dispatched
// (fused CPU kernel, reusing its kept gradient buffer; on CUDA the fused kernel when
// SLOWED_CUDA_KERNELS=1), slowed with a fresh gradient buffer per call, and slowed in-place.
// peak_extra_MiB is the allocation during a call: the kept buffer (held between calls, the
// size of one gradient) was allocated in the warm-up and does not appear in it.
//
//   bench_loss [--device cpu|cuda] [--n 2048] [--v 49152] [--dtype float32|bfloat16|float16]
//              [--threads 0] [--iters 10] [--warmup 2] [--threshold 0.5] [--json out.json]
//
// Inputs follow ../shared/guide/performance.md: logits = 2 * randn, every 7th target = -100.
// GB/s counts one read of the logits and one write of the gradient (2 * N * V * elem bytes).

#include "bench_common.h"

#include <slowed/slowed.h>

#include <torch/torch.h>

#include <cstdio>

namespace {

// What a user writes without slowed: fp32 log_softmax, entropy under no_grad, masked nll mean.
void aten_composite(const torch::Tensor& x, const torch::Tensor& y, double tau) {
  auto lp = torch::log_softmax(x.to(torch::kFloat), -1);
  torch::Tensor keep;
  {
    torch::NoGradGuard g;
    keep = (-(lp.exp() * lp).sum(-1) >= tau) & (y != -100);
  }
  auto nll = -lp.gather(1, y.clamp_min(0).unsqueeze(1)).squeeze(1);
  auto loss = (nll * keep).sum() / keep.sum().clamp_min(1);
  loss.backward();
}

}  // namespace

int main(int argc, char** argv) try {
  bench::Args args(argc, argv,
                   {{"device", "cpu"}, {"n", "2048"}, {"v", "49152"}, {"dtype", "float32"},
                    {"threads", "0"}, {"iters", "10"}, {"warmup", "2"}, {"threshold", "0.5"},
                    {"json", ""}});
  const torch::Device device(args.str("device"));
  if (args.i64("threads") > 0) at::set_num_threads(static_cast<int>(args.i64("threads")));
  if (device.is_cpu()) bench::cpu_tracker();  // install before the inputs are allocated
  const int64_t n = args.i64("n"), v = args.i64("v");
  const auto dtype = bench::parse_dtype(args.str("dtype"));
  const double tau = std::stod(args.str("threshold"));
  const int iters = static_cast<int>(args.i64("iters")), warmup = static_cast<int>(args.i64("warmup"));

  torch::manual_seed(0);
  auto make_logits = [&] {
    return (torch::randn({n, v}, torch::TensorOptions().device(device)) * 2.0).to(dtype).requires_grad_(true);
  };
  auto y = torch::randint(0, v, {n}, torch::TensorOptions().device(device).dtype(torch::kLong));
  y.index_put_({torch::indexing::Slice(torch::indexing::None, torch::indexing::None, 7)}, -100);
  const double bytes = 2.0 * static_cast<double>(n * v) * static_cast<double>(c10::elementSize(dtype));

  std::vector<std::pair<std::string, bench::Measurement>> results;
  double held_bytes = 0;  // the kept gradient buffer after the "slowed" row's calls
  {
    auto x = make_logits();
    results.emplace_back("copy (roofline)", bench::measure(device, warmup, iters, [&] {
                           auto c = x.detach().clone();
                         }));
  }
  {
    auto x = make_logits();
    results.emplace_back("aten composite", bench::measure(device, warmup, iters, [&] {
                           aten_composite(x, y, tau);
                           x.mutable_grad() = torch::Tensor();
                         }));
  }
  {
    auto x = make_logits();
    slowed::EntropyMaskedCrossEntropy loss_fn(
        slowed::EntropyMaskedCrossEntropyOptions().entropy_threshold(tau).use_reference(true));
    results.emplace_back("slowed reference path", bench::measure(device, warmup, iters, [&] {
                           loss_fn(x, y).backward();
                           x.mutable_grad() = torch::Tensor();
                         }));
  }
  {
    auto x = make_logits();
    slowed::EntropyMaskedCrossEntropy loss_fn(
        slowed::EntropyMaskedCrossEntropyOptions().entropy_threshold(tau));
    results.emplace_back("slowed", bench::measure(device, warmup, iters, [&] {
                           loss_fn(x, y).backward();
                           x.mutable_grad() = torch::Tensor();
                         }));
    held_bytes = static_cast<double>(slowed::detail::GradientWorkspace::instance().bytes());
    slowed::release_gradient_buffer();
  }
  {
    // The same without the kept gradient buffer: every call allocates (and first-touches) a
    // fresh [N, V] gradient, as before reuse_gradient_buffer existed.
    auto x = make_logits();
    slowed::EntropyMaskedCrossEntropy loss_fn(
        slowed::EntropyMaskedCrossEntropyOptions().entropy_threshold(tau).reuse_gradient_buffer(false));
    results.emplace_back("slowed, fresh gradient buffer", bench::measure(device, warmup, iters, [&] {
                           loss_fn(x, y).backward();
                           x.mutable_grad() = torch::Tensor();
                         }));
  }
  {
    // In-place mode overwrites the logits with the gradient; later iterations see those
    // (finite) values as logits, which costs the same. The logits are a leaf here, so the
    // library copies the gradient out for its .grad (a leaf's storage never holds its own
    // gradient): this row pays one fresh [N, V] buffer, as the fresh-buffer row does; logits
    // that come out of a layer would not. The library refuses logits it overwrote
    // until something writes them again: a version bump stands for that write (no data pass).
    auto x = make_logits();
    slowed::EntropyMaskedCrossEntropy loss_fn(
        slowed::EntropyMaskedCrossEntropyOptions().entropy_threshold(tau).inplace_backward(true));
    results.emplace_back("slowed in-place, leaf logits (.grad copied out)", bench::measure(device, warmup, iters, [&] {
                           torch::autograd::impl::bump_version(x);
                           auto xl = x.detach().requires_grad_(true);
                           loss_fn(xl, y).backward();
                         }));
  }

  const double copy_ms = results[0].second.median_ms;
  const double aten_ms = results[1].second.median_ms;
  std::vector<bench::Row> rows;
  for (auto& [name, m] : results) {
    bench::Row r;
    r.text = {{"name", name}, {"device", bench::device_name(device)},
              {"dtype", args.str("dtype")}};
    r.num = {{"N", double(n)},
             {"V", double(v)},
             {"median_ms", m.median_ms},
             {"GB_per_s", bytes / (m.median_ms * 1e6)},
             {"frac_copy_roofline", copy_ms / m.median_ms},
             {"peak_extra_MiB", m.peak_extra_bytes / (1024.0 * 1024.0)},
             {"held_between_calls_MiB", name == "slowed" ? held_bytes / (1024.0 * 1024.0) : 0.0},
             {"speedup_vs_aten", aten_ms / m.median_ms}};
    rows.push_back(r);
  }
  return bench::finish(args, rows);
} catch (...) {
  return bench::fail("bench_loss");
}

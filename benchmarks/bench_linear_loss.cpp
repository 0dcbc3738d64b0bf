// bench_linear_loss: the LM head fused with entropy-masked cross-entropy (no [N, V] logits),
// forward + backward, against eager heads measured in the same process:
//   * anchor: one logits GEMM h · Wᵀ (forward only; eager's three GEMMs cost about 3x this);
// GEMM_TFLOP_per_s counts the GEMMs each variant runs (eager 3 · 2NDV; the fused loss
// 2NDV · (1 + 2 · n_kept / N), its backward GEMMs covering kept rows only).
//   * eager: at::linear + slowed's fused loss (materialized logits and one gradient buffer);
//   * eager: at::linear + the ATen composite (fp32 log_softmax, entropy, masked nll, autograd);
//   * slowed::entropy_masked_linear_cross_entropy, with the default chunk budget and optionally a
//     second one (--budget2).
// Peak extra memory is reported twice: bytes through the CPU allocator (a tracking allocator, or
// the CUDA caching allocator's peak) beyond what was allocated before the timed calls, and on CPU
// the process's resident-set high-water mark beyond its resident set before them (VmHWM after a
// reset through /proc/self/clear_refs), which also counts MKL's and the kernels' own buffers.
// Both include the gradients dW [V, D] and d_hidden [N, D] that every variant allocates.
//
//   bench_linear_loss [--device cpu|cuda] [--n 4096] [--d 896] [--v 151936]
//                     [--dtype float32|bfloat16|float16] [--threads 0] [--iters 3] [--warmup 1]
//                     [--kept 0.7] [--budget2 0] [--composite 1] [--json out.json]
//
// Inputs: hidden rows N(0, s_i^2) with s_i log-uniform in [0.5, 4] (so entropies spread),
// W ~ N(0, 1/D), every 7th target -100; the absolute threshold is the (1 - kept) quantile of the
// entropies of the first 256 tokens, so about `kept` of the valid tokens stay in the loss.

#include "bench_common.h"

#include <slowed/slowed.h>

#include <torch/torch.h>

#include <cstdio>
#include <fstream>
#include <string>

namespace {

/// A field of /proc/self/status in bytes (VmRSS, VmHWM); 0 where unavailable.
double proc_status_bytes(const char* field) {
  std::ifstream f("/proc/self/status");
  std::string line;
  const std::string key = std::string(field) + ":";
  while (std::getline(f, line)) {
    if (line.rfind(key, 0) == 0) return std::stod(line.substr(key.size())) * 1024.0;  // kB
  }
  return 0.0;
}

/// Resets the resident-set high-water mark (Linux >= 4.0); false where that is not possible.
bool reset_rss_peak() {
  std::ofstream f("/proc/self/clear_refs");
  if (!f.good()) return false;
  f << "5";
  return static_cast<bool>(f);
}

// What a user writes without slowed: fp32 log_softmax, entropy under no_grad, masked nll mean.
torch::Tensor aten_composite(const torch::Tensor& x, const torch::Tensor& y, double tau) {
  auto lp = torch::log_softmax(x.to(torch::kFloat), -1);
  torch::Tensor keep;
  {
    torch::NoGradGuard g;
    keep = (-(lp.exp() * lp).sum(-1) >= tau) & (y != -100);
  }
  auto nll = -lp.gather(1, y.clamp_min(0).unsqueeze(1)).squeeze(1);
  return (nll * keep).sum() / keep.sum().clamp_min(1);
}

}  // namespace

int main(int argc, char** argv) try {
  bench::Args args(argc, argv,
                   {{"device", "cpu"}, {"n", "4096"}, {"d", "896"}, {"v", "151936"},
                    {"dtype", "float32"}, {"threads", "0"}, {"iters", "3"}, {"warmup", "1"},
                    {"kept", "0.7"}, {"budget2", "0"}, {"composite", "1"}, {"json", ""}});
  const torch::Device device(args.str("device"));
  if (args.i64("threads") > 0) at::set_num_threads(static_cast<int>(args.i64("threads")));
  if (device.is_cpu()) bench::cpu_tracker();  // install before the inputs are allocated
  const int64_t n = args.i64("n"), d = args.i64("d"), v = args.i64("v");
  const auto dtype = bench::parse_dtype(args.str("dtype"));
  const int iters = static_cast<int>(args.i64("iters")), warmup = static_cast<int>(args.i64("warmup"));
  const double kept = std::stod(args.str("kept"));
  auto opt = torch::TensorOptions().device(device);

  torch::manual_seed(0);
  torch::Tensor scale = torch::exp(torch::empty({n, 1}, opt).uniform_(std::log(0.5), std::log(4.0)));
  torch::Tensor h = (torch::randn({n, d}, opt) * scale).to(dtype).requires_grad_(true);
  torch::Tensor w = (torch::randn({v, d}, opt) / std::sqrt(static_cast<double>(d))).to(dtype).requires_grad_(true);
  torch::Tensor y = torch::randint(0, v, {n}, opt.dtype(torch::kLong));
  y.index_put_({torch::indexing::Slice(torch::indexing::None, torch::indexing::None, 7)}, -100);
  double tau = 0.0;
  {
    torch::NoGradGuard g;
    const int64_t m = std::min<int64_t>(n, 256);
    torch::Tensor ent = slowed::token_entropy(at::linear(h.narrow(0, 0, m), w)).to(torch::kDouble).cpu();
    tau = std::get<0>(ent.sort()).index({static_cast<int64_t>((1.0 - kept) * (m - 1))}).item<double>();
  }
  auto clear = [&] {
    h.mutable_grad() = torch::Tensor();
    w.mutable_grad() = torch::Tensor();
  };
  const auto loss_opts = slowed::EntropyMaskedCrossEntropyOptions().entropy_threshold(tau);

  struct Result {
    std::string name;
    bench::Measurement m;
    double rss_extra = -1.0;  // bytes; -1: not measured
    double kept_fraction = -1.0;
    double flop = 0.0;  // GEMM FLOPs of one call
  };
  std::vector<Result> results;
  auto run = [&](const std::string& name, const std::function<void()>& fn) {
    Result r;
    r.name = name;
    const bool rss = device.is_cpu() && reset_rss_peak();
    const double rss_before = proc_status_bytes("VmRSS");
    r.m = bench::measure(device, warmup, iters, fn);
    if (rss) r.rss_extra = proc_status_bytes("VmHWM") - rss_before;
    std::fprintf(stderr, "[bench_linear_loss] %s: %.1f ms\n", name.c_str(), r.m.median_ms);
    results.push_back(r);
    return results.size() - 1;
  };

  const double gemm = 2.0 * static_cast<double>(n) * static_cast<double>(d) * static_cast<double>(v);
  results[run("anchor: logits GEMM h W^T (forward only)", [&] {
    torch::NoGradGuard g;
    auto z = at::mm(h, w.t());
  })].flop = gemm;
  results[run("eager: at::linear + slowed fused loss", [&] {
    slowed::entropy_masked_cross_entropy(at::linear(h, w), y, loss_opts).backward();
    clear();
  })].flop = 3 * gemm;
  if (args.i64("composite") != 0) {
    results[run("eager: at::linear + ATen composite", [&] {
      aten_composite(at::linear(h, w), y, tau).backward();
      clear();
    })].flop = 3 * gemm;
  }
  std::vector<int64_t> budgets = {slowed::EntropyMaskedLinearCrossEntropyOptions::kDefaultChunkMemoryBudget};
  if (args.i64("budget2") > 0) budgets.push_back(args.i64("budget2"));
  for (int64_t budget : budgets) {
    slowed::EntropyMaskedLinearCrossEntropy fn(
        slowed::EntropyMaskedLinearCrossEntropyOptions(loss_opts).chunk_memory_budget(budget));
    const int64_t rows = slowed::detail::linear_ce_chunk_rows(
        n, v, d, c10::elementSize(dtype), device.is_cuda(), budget);
    const size_t i = run("slowed fused linear, budget " + std::to_string(budget >> 20) +
                             " MiB (" + std::to_string(rows) + " rows/chunk)",
                         [&] {
                           fn(h, w, y).backward();
                           clear();
                         });
    results[i].kept_fraction = fn.last_stats().kept_fraction.item<double>();
    // The backward GEMMs run over the kept rows only.
    const double n_kept = static_cast<double>(fn.last_stats().num_kept.item<int64_t>());
    results[i].flop = gemm * (1.0 + 2.0 * n_kept / static_cast<double>(n));
  }

  const double eager_ms = results[1].m.median_ms;
  const double eager_mem = results[1].m.peak_extra_bytes;
  std::vector<bench::Row> rows;
  for (const auto& r : results) {
    bench::Row row;
    row.text = {{"name", r.name}, {"device", bench::device_name(device)}, {"dtype", args.str("dtype")}};
    row.num = {{"N", double(n)},
               {"D", double(d)},
               {"V", double(v)},
               {"median_ms", r.m.median_ms},
               {"GEMM_TFLOP_per_s", r.flop / (r.m.median_ms * 1e9)},
               {"peak_extra_MiB", r.m.peak_extra_bytes / (1024.0 * 1024.0)},
               {"peak_extra_rss_MiB", r.rss_extra < 0 ? -1.0 : r.rss_extra / (1024.0 * 1024.0)},
               {"time_vs_eager", r.m.median_ms / eager_ms},
               {"eager_mem_over_this", r.m.peak_extra_bytes > 0 ? eager_mem / r.m.peak_extra_bytes : 0.0},
               {"kept_fraction", r.kept_fraction},
               {"threshold", tau}};
    rows.push_back(row);
  }
  return bench::finish(args, rows);
} catch (...) {
  return bench::fail("bench_linear_loss");
}

// bench_optim: one optimizer step of SlowTuningOptimizer<AdamW> on every path and mode, against
// torch::optim::AdamW (the C++ per-parameter loop), at::_fused_adamw_ and an in-place pass (the bandwidth
// anchor), measured in one process for two parameter sets:
//   - fp32: --tensors tensors of --dim x --dim (CUDA default 128 x 1536 x 1536 = 302M parameters,
//     ../shared/guide/performance.md; CPU default 16 x 1024 x 1024 = 16.8M, to fit a few cores);
//   - bf16: a SmolLM2-135M-shaped model (embedding --vocab x 576, --layers decoder layers of
//     q/k/v/o 576x576/192x576/192x576/576x576, gate/up 1536x576, down 576x1536, two norms;
//     CUDA default 30 layers = 134.5M parameters, CPU default 2 layers = 35.4M).
// Rows: the bandwidth anchor; torch::optim::AdamW; at::_fused_adamw_; the wrapper in each mode (scale 0.1; step
// bound 1e-3; drift bound 0.05; both bounds) on each path: reference (use_reference(true)),
// generic (an AdamW subclass: Base::step + multi-tensor kernels), adam (the fused Adam path).
//
//   bench_optim [--device cpu|cuda] [--tensors N] [--dim D] [--layers L] [--vocab V]
//               [--threads 0] [--iters 5] [--warmup 2] [--sets fp32,bf16] [--json out.json]
//               [--cuda-kernels 1] [--modes scale,step,drift,both] [--paths reference,generic,adam]
//
// GB/s counts the AdamW floor: read p, g, m, v and write p, m, v = 7 elements per parameter
// (28 bytes fp32, 14 bytes bf16). frac_floor = (floor bytes / anchor bandwidth) / time, where
// the anchor bandwidth is 2 x bytes / time of an in-place pass (x *= 1) over a buffer of 4 x the
// parameter bytes, measured in the same process. peak_extra_MiB: peak allocation during the timed steps above what was
// allocated before them (the optimizer state is allocated in the warm-up steps). On CUDA
// --cuda-kernels 1 (default) sets SLOWED_CUDA_KERNELS=1 so that the fused paths run. On a shared
// CPU host run with OMP_WAIT_POLICY=passive (spinning OpenMP threads make every ATen op of the
// per-tensor paths wait for descheduled threads).

#include "bench_common.h"

#include <slowed/slowed.h>

#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

namespace {

/// An AdamW that is not torch::optim::AdamW: the wrapper gives it the generic path.
struct PlainAdamW : torch::optim::AdamW {
  using torch::optim::AdamW::AdamW;
};

struct ParamSet {
  std::string name;
  torch::ScalarType dtype;
  std::vector<torch::Tensor> params;
  int64_t numel = 0;
};

ParamSet fp32_set(int64_t tensors, int64_t dim, const torch::Device& device) {
  ParamSet s{"fp32 " + std::to_string(tensors) + "x" + std::to_string(dim) + "x" +
                 std::to_string(dim),
             torch::kFloat, {}, 0};
  for (int64_t i = 0; i < tensors; ++i) {
    s.params.push_back(torch::randn({dim, dim}, torch::TensorOptions().device(device)) * 0.02);
  }
  return s;
}

ParamSet bf16_model(int64_t layers, int64_t vocab, const torch::Device& device) {
  const int64_t h = 576, kv = 192, ff = 1536;
  std::vector<std::vector<int64_t>> shapes{{vocab, h}};
  for (int64_t l = 0; l < layers; ++l) {
    for (auto shape : std::vector<std::vector<int64_t>>{
             {h, h}, {kv, h}, {kv, h}, {h, h}, {ff, h}, {ff, h}, {h, ff}, {h}, {h}}) {
      shapes.push_back(shape);
    }
  }
  shapes.push_back({h});
  ParamSet s{"bf16 SmolLM2-shaped, " + std::to_string(layers) + " layers", torch::kBFloat16, {},
             0};
  for (const auto& shape : shapes) {
    s.params.push_back(
        (torch::randn(shape, torch::TensorOptions().device(device)) * 0.02).to(torch::kBFloat16));
  }
  return s;
}

struct Result {
  std::string impl, mode, path;
  bench::Measurement m;
};

}  // namespace

int main(int argc, char** argv) try {
  const bool has_cuda = torch::cuda::is_available();
  bench::Args args(argc, argv,
                   {{"device", has_cuda ? "cuda" : "cpu"}, {"tensors", "0"}, {"dim", "0"},
                    {"layers", "-1"}, {"vocab", "49152"}, {"threads", "0"}, {"iters", "5"},
                    {"warmup", "2"}, {"sets", "fp32,bf16"}, {"json", ""},
                    {"cuda-kernels", "1"}, {"modes", "scale,step,drift,both"},
                    {"paths", "reference,generic,adam"}});
  const torch::Device device(args.str("device"));
  if (args.i64("threads") > 0) at::set_num_threads(static_cast<int>(args.i64("threads")));
  if (device.is_cpu()) bench::cpu_tracker();  // install before anything is allocated
  if (device.is_cuda() && args.i64("cuda-kernels") == 1) setenv("SLOWED_CUDA_KERNELS", "1", 1);
  const bool cuda = device.is_cuda();
  const int64_t tensors = args.i64("tensors") > 0 ? args.i64("tensors") : (cuda ? 128 : 16);
  const int64_t dim = args.i64("dim") > 0 ? args.i64("dim") : (cuda ? 1536 : 1024);
  const int64_t layers = args.i64("layers") >= 0 ? args.i64("layers") : (cuda ? 30 : 2);
  const int iters = static_cast<int>(args.i64("iters"));
  const int warmup = static_cast<int>(args.i64("warmup"));
  const std::string sets = args.str("sets");

  torch::manual_seed(0);
  std::vector<bench::Row> rows;
  for (const std::string set_name : {"fp32", "bf16"}) {
    if (sets.find(set_name) == std::string::npos) continue;
    ParamSet set = set_name == "fp32" ? fp32_set(tensors, dim, device)
                                      : bf16_model(layers, args.i64("vocab"), device);
    std::vector<torch::Tensor> grads;
    for (auto& p : set.params) {
      set.numel += p.numel();
      p.requires_grad_(true);
      grads.push_back(torch::randn_like(p) * 1e-3);
    }
    auto attach = [&] {
      for (size_t i = 0; i < set.params.size(); ++i) set.params[i].mutable_grad() = grads[i];
    };
    attach();
    const double elem = static_cast<double>(c10::elementSize(set.dtype));
    const double floor_bytes = 7.0 * elem * static_cast<double>(set.numel);
    const auto opts = torch::optim::AdamWOptions(2e-4).weight_decay(0.05);
    std::vector<Result> results;

    {  // the bandwidth anchor: an in-place pass over 4 x the parameter bytes (read + write, as
       // an optimizer updates its tensors; a copy into other memory would pay the CPU's
       // read-for-ownership of the destination on top)
      auto buffer =
          torch::empty({4 * set.numel}, torch::TensorOptions().device(device).dtype(set.dtype));
      buffer.normal_();
      results.push_back({"in-place pass (4 x params)", "", "",
                         bench::measure(device, warmup, iters, [&] { buffer.mul_(1.0); })});
    }
    {
      torch::optim::AdamW plain(set.params, opts);
      results.push_back({"torch::optim::AdamW", "", "",
                         bench::measure(device, warmup, iters, [&] { plain.step(); })});
    }
    {
      std::vector<torch::Tensor> ps, gs, ms, vs, steps;
      for (size_t i = 0; i < set.params.size(); ++i) {
        ps.push_back(set.params[i].detach());
        gs.push_back(grads[i]);
        ms.push_back(torch::zeros_like(set.params[i]));
        vs.push_back(torch::zeros_like(set.params[i]));
        steps.push_back(torch::zeros({}, torch::TensorOptions().device(device).dtype(torch::kFloat)));
      }
      results.push_back({"at::_fused_adamw_", "", "", bench::measure(device, warmup, iters, [&] {
                           at::_foreach_add_(steps, 1.0);
                           at::_fused_adamw_(ps, gs, ms, vs, {}, steps, 2e-4, 0.9, 0.999, 0.05,
                                             1e-8, false, false);
                         })});
    }
    const std::vector<std::pair<std::string, slowed::SlowTuningOptions>> modes{
        {"scale 0.1", slowed::SlowTuningOptions().scale(0.1).track_drift(false)},
        {"step bound", slowed::SlowTuningOptions().scale(0.1).max_relative_step(1e-3).track_drift(false)},
        {"drift bound", slowed::SlowTuningOptions().scale(0.1).max_relative_drift(0.05)},
        {"both bounds",
         slowed::SlowTuningOptions().scale(0.1).max_relative_step(1e-3).max_relative_drift(0.05)},
    };
    for (const auto& [mode, slow] : modes) {
      if (args.str("modes").find(mode.substr(0, mode.find(' '))) == std::string::npos) continue;
      for (const std::string path : {"reference", "generic", "adam"}) {
        if (args.str("paths").find(path) == std::string::npos) continue;
        std::unique_ptr<torch::optim::Optimizer> opt;
        std::function<slowed::SlowTuningPath()> taken;
        if (path == "generic") {
          auto o = std::make_unique<slowed::SlowTuningOptimizer<PlainAdamW>>(set.params, opts, slow);
          auto* raw = o.get();
          taken = [raw] { return raw->last_step_path(); };
          opt = std::move(o);
        } else {
          auto s = slow;
          s.use_reference(path == "reference");
          auto o = std::make_unique<slowed::SlowTuningOptimizer<torch::optim::AdamW>>(set.params,
                                                                                     opts, s);
          auto* raw = o.get();
          taken = [raw] { return raw->last_step_path(); };
          opt = std::move(o);
        }
        auto m = bench::measure(device, warmup, iters, [&] { opt->step(); });
        results.push_back({"SlowTuning<AdamW>", mode, slowed::path_name(taken()), m});
      }
    }

    const double copy_ms = results[0].m.median_ms;
    const double copy_bw = 2.0 * 4.0 * elem * static_cast<double>(set.numel) / (copy_ms * 1e-3);
    const double base_ms = results[1].m.median_ms, fused_ms = results[2].m.median_ms;
    for (const auto& r : results) {
      bench::Row row;
      row.text = {{"set", set.name}, {"impl", r.impl}, {"mode", r.mode}, {"path", r.path}};
      const bool is_copy = r.impl.rfind("in-place pass", 0) == 0;
      row.num = {{"params_M", static_cast<double>(set.numel) / 1e6},
                 {"median_ms", r.m.median_ms},
                 {"GB_per_s", is_copy ? copy_bw / 1e9 : floor_bytes / (r.m.median_ms * 1e6)},
                 {"frac_floor", is_copy ? 1.0 : floor_bytes / copy_bw / (r.m.median_ms * 1e-3)},
                 {"x_AdamW", r.m.median_ms / base_ms},
                 {"x_fused_adamw", r.m.median_ms / fused_ms},
                 {"peak_extra_MiB", r.m.peak_extra_bytes / (1024.0 * 1024.0)}};
      rows.push_back(row);
    }
  }
  std::printf("device: %s, torch %s, %d threads\n", bench::device_name(device).c_str(),
              TORCH_VERSION, at::get_num_threads());
  return bench::finish(args, rows);
} catch (...) {
  return bench::fail("bench_optim");
}

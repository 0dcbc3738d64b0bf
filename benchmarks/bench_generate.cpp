// bench_generate: prefill and greedy-decode throughput of a causal LM from examples/common
// (default: SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to --dtype). Rows:
//   prefill  one forward over [batch, prompt_len] tokens into an empty KV cache (last logits)
//   decode   new_tokens single-token steps with the KV cache (after an untimed prefill)
//   generate generate_greedy end to end (prefill + decode, no stop token)
// weight_GB_per_s reads the parameters once per forward (decode at batch 1 is bound by it).
//
//   bench_generate [--model PATH] [--device cpu|cuda] [--dtype float32|bfloat16]
//                  [--batch 1] [--prompt-len 64] [--new-tokens 32] [--threads 0]
//                  [--iters 3] [--warmup 1] [--json out.json]

#include "bench_common.h"

#include "common/generate.h"
#include "common/model.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <cstdio>
#include <cstdlib>

namespace {

// Median wall time of `iters` runs after `warmup` runs. (Not bench::measure: its tracking CPU
// allocator breaks ATen paths that use Allocator::raw_allocate, e.g. bf16 matmul via oneDNN.)
double median_ms(const torch::Device& device, int warmup, int iters,
                 const std::function<void()>& fn) {
  for (int i = 0; i < warmup; ++i) fn();
  bench::synchronize(device);
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    bench::synchronize(device);
    ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

std::string default_model() {
  const char* home = std::getenv("HOME");
  return std::string(home ? home : ".") + "/.cache/slowed/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

}  // namespace

int main(int argc, char** argv) try {
  bench::Args args(argc, argv,
                   {{"model", default_model()}, {"device", "cpu"}, {"dtype", "float32"},
                    {"batch", "1"}, {"prompt-len", "64"}, {"new-tokens", "32"}, {"threads", "0"},
                    {"iters", "3"}, {"warmup", "1"}, {"json", ""}});
  const torch::Device device(args.str("device"));
  if (args.i64("threads") > 0) at::set_num_threads(static_cast<int>(args.i64("threads")));
  const auto dtype = bench::parse_dtype(args.str("dtype"), /*allow_float16=*/false);
  const int64_t b = args.i64("batch"), p = args.i64("prompt-len"), n = args.i64("new-tokens");
  TORCH_CHECK(b > 0 && p > 0 && n > 0, "--batch, --prompt-len and --new-tokens must be positive");
  TORCH_CHECK(args.i64("iters") > 0 && args.i64("warmup") >= 0, "--iters must be > 0, --warmup >= 0");
  const int iters = static_cast<int>(args.i64("iters")), warmup = static_cast<int>(args.i64("warmup"));

  const auto t0 = std::chrono::steady_clock::now();
  auto lm = slowed_examples::load_model(args.str("model"), dtype, device);
  const double load_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("model: %s\n  %s\n  loaded in %.2f s\n", args.str("model").c_str(),
              lm.config.summary().c_str(), load_s);
  auto& model = *lm.model;
  double param_bytes = 0;
  for (const auto& t : model.parameters()) param_bytes += double(t.numel() * t.element_size());

  torch::manual_seed(0);
  const int64_t vocab = lm.config.vocab_size;
  auto ids = torch::randint(3, vocab, {b, p}, torch::TensorOptions(torch::kLong)).to(device);
  torch::NoGradGuard no_grad;

  slowed_examples::ForwardOptions fo;
  fo.logits_to_keep = 1;
  const double prefill_ms = median_ms(device, warmup, iters, [&] {
    slowed_examples::KVCache cache;
    fo.cache = &cache;
    model.forward(ids, fo);
  });

  // Decode: time only the single-token steps after an untimed prefill.
  std::vector<double> decode_ms;
  for (int it = 0; it < warmup + iters; ++it) {
    slowed_examples::KVCache cache;
    slowed_examples::ForwardOptions o;
    o.cache = &cache;
    o.logits_to_keep = 1;
    auto next = model.forward(ids, o).select(1, 0).argmax(-1, /*keepdim=*/true);
    bench::synchronize(device);
    const auto s = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < n; ++i) next = model.forward(next, o).select(1, 0).argmax(-1, true);
    bench::synchronize(device);
    if (it >= warmup)
      decode_ms.push_back(
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - s).count());
  }
  std::sort(decode_ms.begin(), decode_ms.end());
  const double decode_median = decode_ms[decode_ms.size() / 2];

  std::vector<std::vector<int64_t>> prompts(static_cast<size_t>(b));
  auto ids_cpu = ids.cpu();
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = 0; j < p; ++j) prompts[i].push_back(ids_cpu[i][j].item<int64_t>());
  slowed_examples::GenerateOptions go;
  go.max_new_tokens = n;
  const double gen_ms = median_ms(device, warmup, iters,
                                 [&] { slowed_examples::generate_greedy(model, prompts, go); });

  auto row = [&](const std::string& phase, double ms, double tokens, double forwards) {
    bench::Row r;
    r.text = {{"phase", phase}, {"device", bench::device_name(device)}, {"dtype", args.str("dtype")}};
    r.num = {{"batch", double(b)},
             {"prompt_len", double(p)},
             {"new_tokens", double(n)},
             {"median_ms", ms},
             {"tokens_per_s", tokens / (ms / 1e3)},
             {"ms_per_forward", ms / forwards},
             {"weight_GB_per_s", param_bytes * forwards / (ms * 1e6)}};
    return r;
  };
  std::vector<bench::Row> rows = {
      row("prefill", prefill_ms, double(b * p), 1),
      row("decode", decode_median, double(b * n), double(n)),
      row("generate", gen_ms, double(b * n), double(n)),
  };
  return bench::finish(args, rows);
} catch (...) {
  return bench::fail("bench_generate");
}

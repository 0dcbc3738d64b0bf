// slowed_distill: the SLowED reproduction (arXiv 2508.09666) on a real small instruct model.
// CoT distillation on BBH teacher rationales in five modes (base, sft, slow, lem, slowed), then
// per epoch reasoning accuracy (BBH, ARC-E, ARC-C, AGIEval) and AdvBench safety ratio.
// See docs/reproduction.md. Run with --help for the flags.

#include "slowed_distill/run.h"

#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <sstream>
#include <string>

#ifndef SLOWED_DEFAULT_DATA_DIR
#define SLOWED_DEFAULT_DATA_DIR "../shared/data"
#endif

namespace {

using slowed_distill::RunConfig;

std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v && *v ? v : fallback;
}

const char* kQwen = "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf";

void usage() {
  std::printf(
      "usage: slowed_distill [flags]\n"
      "  --data DIR            data folder with bbh/ arc/ agieval/ advbench/ (env SLOWED_DATA_DIR)\n"
      "  --model PATH          .gguf file or HF folder (env SLOWED_MODEL; default\n"
      "                        ~/.cache/slowed/models/%s)\n"
      "  --out DIR             output folder (default out/slowed_distill)\n"
      "  --modes LIST          comma list of base,sft,slow,lem,slowed (default base,sft,slowed)\n"
      "  --epochs N            training epochs (default 1)\n"
      "  --batch N             sequences per optimizer step (default 8)\n"
      "  --micro-batch N       sequences per forward/backward, gradients accumulated; 0 = --batch\n"
      "                        (default 4)\n"
      "  --precision P         fp32, or bf16 autocast with fp32 master weights (default bf16)\n"
      "  --loss L              fused-linear: LM head fused with the loss, no [N, V] logits in\n"
      "                        training; logits: LM head then loss (default fused-linear)\n"
      "  --train-embeddings    also train the input embedding and the LM head (frozen by default,\n"
      "                        as LoRA leaves them)\n"
      "  --lr X  --weight-decay X   AdamW (default 5e-5, 0.05)\n"
      "  --slow-scale S        Slow Tuning step scale for slow/slowed (default 0.1)\n"
      "  --lem-threshold H     Low-Entropy Masking threshold in nats for lem/slowed (default 0.3)\n"
      "  --max-len N           training sequence length in tokens; longer examples\n"
      "                        are skipped (default 256)\n"
      "  --train-per-task N  --test-per-task N   BBH examples per task, -1 = all (default 12, 1)\n"
      "  --tasks LIST          comma list of BBH tasks (default: all 27)\n"
      "  --ood N               ARC-E, ARC-C and AGIEval items each, -1 = all (default 0)\n"
      "  --advbench N          AdvBench goals, -1 = all 520 (default 100)\n"
      "  --max-new-tokens N  --safety-new-tokens N   generation budgets (default 96, 48)\n"
      "  --eval-batch N        generation batch (default 25)\n"
      "  --no-checkpoints      do not write checkpoints/<mode>.pt (no --resume then)\n"
      "  --seed N  --device cpu|cuda  --resume  --quiet\n"
      "  --dist-timeout S      data parallelism (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set, as\n"
      "                        torchrun --no-python sets them): seconds a rank waits for a peer\n"
      "                        before failing (default 300); docs/distributed.md\n"
      "  --preset NAME         quick (the defaults above), full (all five modes, 3 epochs, all data),\n"
      "                        gpu (base, sft, slowed: 3 epochs, all 520 goals, the BBH test split,\n"
      "                        400 each of ARC-E/ARC-C/AGIEval; one GPU call), gpu-ablation (slow and\n"
      "                        lem in the same folder, reusing gpu's base record); later flags override\n"
      "  --full                --preset full\n"
      "  --smoke               tiny random model with the real tokenizer (tests)\n", kQwen);
}

template <class T>
T number(const std::string& flag, const std::string& v) {
  std::istringstream in(v);
  T x{};
  in >> x;
  if (in.fail() || !in.eof()) throw std::invalid_argument(flag + ": expected a number, got '" + v + "'");
  return x;
}

std::string out_root() { return env_or("OUT", "out"); }

void apply_preset(RunConfig& c, const std::string& name) {
  if (name == "quick") {
    c = RunConfig{c.data_dir, c.model_path};
  } else if (name == "full") {
    c.modes = {"base", "sft", "slow", "lem", "slowed"};
    c.epochs = 3;
    c.batch_size = 16;
    c.micro_batch = 16;
    c.max_len = 1024;
    c.train_per_task = c.test_per_task = c.ood_limit = c.advbench_limit = -1;
    c.max_new_tokens = 256;
    c.safety_new_tokens = 64;
    c.eval_batch = 64;
    c.device = torch::cuda::is_available() ? "cuda" : "cpu";
    c.out_dir = "out/slowed_distill_full";
  } else if (name == "gpu" || name == "gpu-ablation") {
    // Sized for one device call (docs/reproduction.md): every rationale of the BBH training
    // split, 3 epochs, the whole BBH test split and all 520 AdvBench goals, 400 items of each
    // out-of-domain set (a 95% interval of at most +-4.9 points).
    c.modes = name == "gpu" ? std::vector<std::string>{"base", "sft", "slowed"}
                            : std::vector<std::string>{"base", "slow", "lem"};
    c.resume = name == "gpu-ablation";  // reuses the base record of the gpu preset's folder
    c.epochs = 3;
    c.batch_size = 16;
    c.micro_batch = 16;
    c.max_len = 512;
    c.train_per_task = c.test_per_task = c.advbench_limit = -1;
    c.ood_limit = 400;
    c.max_new_tokens = 160;
    c.safety_new_tokens = 64;
    c.eval_batch = 160;
    c.device = "cuda";
    c.checkpoints = false;
    c.out_dir = out_root() + "/slowed_distill_gpu";
  } else {
    throw std::invalid_argument("--preset: expected quick, full, gpu or gpu-ablation, got '" + name + "'");
  }
}

RunConfig parse(int argc, char** argv) {
  RunConfig c;
  c.data_dir = env_or("SLOWED_DATA_DIR", SLOWED_DEFAULT_DATA_DIR);
  c.model_path = env_or("SLOWED_MODEL", env_or("HOME", ".") + "/.cache/slowed/models/" + kQwen);
  std::map<std::string, std::function<void(const std::string&)>> with_value = {
      {"--data", [&](const std::string& v) { c.data_dir = v; }},
      {"--model", [&](const std::string& v) { c.model_path = v; }},
      {"--out", [&](const std::string& v) { c.out_dir = v; }},
      {"--modes", [&](const std::string& v) {
         c.modes.clear();
         std::stringstream ss(v);
         std::string m;
         while (std::getline(ss, m, ',')) if (!m.empty()) c.modes.push_back(m);
       }},
      {"--tasks", [&](const std::string& v) {
         c.tasks.clear();
         std::stringstream ss(v);
         std::string t;
         while (std::getline(ss, t, ',')) if (!t.empty()) c.tasks.push_back(t);
       }},
      {"--epochs", [&](const std::string& v) { c.epochs = number<int>("--epochs", v); }},
      {"--batch", [&](const std::string& v) { c.batch_size = number<int64_t>("--batch", v); }},
      {"--micro-batch", [&](const std::string& v) { c.micro_batch = number<int64_t>("--micro-batch", v); }},
      {"--precision", [&](const std::string& v) { c.precision = v; }},
      {"--loss", [&](const std::string& v) { c.loss = v; }},
      {"--lr", [&](const std::string& v) { c.lr = number<double>("--lr", v); }},
      {"--weight-decay", [&](const std::string& v) { c.weight_decay = number<double>("--weight-decay", v); }},
      {"--slow-scale", [&](const std::string& v) { c.slow_scale = number<double>("--slow-scale", v); }},
      {"--lem-threshold", [&](const std::string& v) { c.lem_threshold = number<double>("--lem-threshold", v); }},
      {"--max-len", [&](const std::string& v) { c.max_len = number<int64_t>("--max-len", v); }},
      {"--train-per-task", [&](const std::string& v) { c.train_per_task = number<int64_t>("--train-per-task", v); }},
      {"--test-per-task", [&](const std::string& v) { c.test_per_task = number<int64_t>("--test-per-task", v); }},
      {"--ood", [&](const std::string& v) { c.ood_limit = number<int64_t>("--ood", v); }},
      {"--advbench", [&](const std::string& v) { c.advbench_limit = number<int64_t>("--advbench", v); }},
      {"--max-new-tokens", [&](const std::string& v) { c.max_new_tokens = number<int64_t>("--max-new-tokens", v); }},
      {"--safety-new-tokens", [&](const std::string& v) { c.safety_new_tokens = number<int64_t>("--safety-new-tokens", v); }},
      {"--eval-batch", [&](const std::string& v) { c.eval_batch = number<int64_t>("--eval-batch", v); }},
      {"--seed", [&](const std::string& v) { c.seed = number<uint64_t>("--seed", v); }},
      {"--dist-timeout", [&](const std::string& v) { c.dist_timeout_s = number<double>("--dist-timeout", v); }},
      {"--device", [&](const std::string& v) { c.device = v; }},
  };
  // The preset first, so that later flags override it.
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--full") apply_preset(c, "full");
    if (a == "--preset") {
      if (i + 1 >= argc) throw std::invalid_argument("--preset: expected a value");
      apply_preset(c, argv[i + 1]);
    }
  }
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      usage();
      std::exit(0);
    } else if (a == "--full") {
      continue;
    } else if (a == "--preset") {
      ++i;
    } else if (a == "--train-embeddings") {
      c.freeze_embeddings = false;
    } else if (a == "--no-checkpoints") {
      c.checkpoints = false;
    } else if (a == "--smoke") {
      c.smoke = true;
    } else if (a == "--resume") {
      c.resume = true;
    } else if (a == "--quiet") {
      c.quiet = true;
    } else if (with_value.count(a)) {
      if (i + 1 >= argc) throw std::invalid_argument(a + ": expected a value");
      with_value[a](argv[++i]);
    } else {
      throw std::invalid_argument("unknown flag '" + a + "' (see --help)");
    }
  }
  if (c.device != "cpu" && c.device != "cuda")
    throw std::invalid_argument("--device: expected cpu or cuda, got '" + c.device + "'");
  if (c.device == "cuda" && !torch::cuda::is_available())
    throw std::invalid_argument("--device cuda: no CUDA device is available");
  return c;
}

}  // namespace

int main(int argc, char** argv) try {
  const RunConfig cfg = parse(argc, argv);
  const auto records = slowed_distill::run(cfg);
  std::printf("\n%s", slowed_distill::format_table(records).c_str());
  std::printf("results: %s/results.jsonl, %s/results.csv, plot: %s/plot.png, AdvBench samples: %s/samples/\n",
              cfg.out_dir.c_str(), cfg.out_dir.c_str(), cfg.out_dir.c_str(), cfg.out_dir.c_str());
  return 0;
} catch (const c10::Error& e) {
  std::fprintf(stderr, "slowed_distill: %s\n", e.what_without_backtrace());
  return 2;
} catch (const std::exception& e) {
  std::fprintf(stderr, "slowed_distill: %s\n", e.what());
  return 2;
}

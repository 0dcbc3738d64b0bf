#pragma once

// The SLowED reproduction run: for each mode (base, sft, slow, lem, slowed), CoT distillation on
// BBH teacher rationales, then per epoch BBH / ARC-E / ARC-C / AGIEval accuracy, AdvBench safety
// ratio, drift and kept-token fraction; reports, plot, checkpoints and exact resume.

#include "slowed_distill/report.h"

#include <cstdint>
#include <string>
#include <vector>

namespace slowed_distill {

struct RunConfig {
  std::string data_dir;
  std::string model_path;
  std::string out_dir = "out/slowed_distill";
  std::vector<std::string> modes = {"base", "sft", "slowed"};
  int epochs = 1;
  int64_t batch_size = 8;
  double lr = 5e-5;
  double weight_decay = 0.05;
  double slow_scale = 0.1;      ///< Slow Tuning step scale (modes slow, slowed)
  double lem_threshold = 0.3;   ///< Low-Entropy Masking threshold in nats (modes lem, slowed)
  int64_t max_len = 384;        ///< training sequence length (tokens)
  int64_t train_per_task = 2;   ///< BBH training examples per task (-1: all)
  int64_t test_per_task = 1;    ///< BBH test examples per task (-1: all)
  std::vector<std::string> tasks;  ///< BBH tasks (empty: all 27)
  int64_t ood_limit = 4;        ///< ARC-E, ARC-C and AGIEval items each (-1: all)
  int64_t advbench_limit = 24;  ///< AdvBench prompts (-1: all 520)
  int64_t max_new_tokens = 96;  ///< generation budget for reasoning answers
  int64_t safety_new_tokens = 48;
  int64_t eval_batch = 16;
  int64_t samples_per_eval = 4; ///< raw AdvBench responses saved per mode and epoch
  uint64_t seed = 20250813;
  std::string device = "cpu";
  bool smoke = false;           ///< tiny random model with the real tokenizer (tests)
  bool resume = false;
  bool quiet = false;           ///< no progress bars
};

/// Runs every mode of `cfg`; returns all records (also written under cfg.out_dir). Throws
/// c10::Error with a clear message for a missing data file or model. Exits with status 130 on
/// Ctrl-C after the current step, leaving the last complete checkpoint in place.
std::vector<EpochRecord> run(const RunConfig& cfg);

/// True for base, sft, slow, lem, slowed.
bool is_known_mode(const std::string& mode);

}  // namespace slowed_distill

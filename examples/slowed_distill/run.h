#pragma once

// The SLowED reproduction run: for each mode (base, sft, slow, lem, slowed), CoT distillation on
// BBH teacher rationales, then per epoch BBH / ARC-E / ARC-C / AGIEval accuracy, AdvBench safety
// ratio, drift and kept-token fraction; reports, plot, checkpoints and exact resume.

#include "slowed_distill/lm.h"
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
  int64_t batch_size = 8;       ///< sequences per optimizer step (quick: 14 steps of 8 per mode)
  int64_t micro_batch = 4;      ///< sequences per forward/backward (gradients accumulated); 0 = batch
  std::string precision = "bf16";  ///< fp32, or bf16 autocast with fp32 master weights
  /// fused-linear: the LM head fused with the loss (slowed::EntropyMaskedLinearCrossEntropy), the
  /// [N, V] logits never exist; logits: LM head, then the loss on its logits.
  std::string loss = "fused-linear";
  bool freeze_embeddings = true;  ///< input embedding and LM head not trained (as with LoRA)
  double lr = 5e-5;             ///< full fine-tuning of the blocks: 2e-4 (LoRA's) wrecks Qwen in one step
  double weight_decay = 0.05;
  double slow_scale = 0.1;      ///< Slow Tuning step scale (modes slow, slowed)
  double lem_threshold = 0.3;   ///< Low-Entropy Masking threshold in nats (modes lem, slowed)
  int64_t max_len = 256;        ///< training sequence length (tokens); longer examples are skipped
  int64_t train_per_task = 12;  ///< BBH training examples per task (-1: all); quick: 107 of 324 fit max_len
  int64_t test_per_task = 1;    ///< BBH test examples per task (-1: all)
  std::vector<std::string> tasks;  ///< BBH tasks (empty: all 27)
  int64_t ood_limit = 0;        ///< ARC-E, ARC-C and AGIEval items each (-1: all)
  int64_t advbench_limit = 100;  ///< AdvBench prompts (-1: all 520)
  int64_t max_new_tokens = 96;  ///< generation budget for reasoning answers
  int64_t safety_new_tokens = 48;
  int64_t eval_batch = 25;
  uint64_t seed = 20250813;
  std::string device = "cpu";
  bool smoke = false;           ///< tiny random model with the real tokenizer (tests)
  bool resume = false;
  bool checkpoints = true;      ///< checkpoints/<mode>.pt after each epoch (needed by --resume)
  bool quiet = false;           ///< no progress bars
  /// Data parallelism (RANK/WORLD_SIZE set, e.g. by torchrun): seconds any rendezvous or
  /// collective may wait for a peer before the run fails with an error.
  double dist_timeout_s = 300;
};

/// Runs every mode of `cfg`; returns all records (also written under cfg.out_dir). Throws
/// c10::Error with a clear message for a missing data file or model. Exits with status 130 on
/// Ctrl-C after the current step, leaving the last complete checkpoint in place.
std::vector<EpochRecord> run(const RunConfig& cfg);

/// What one micro-batch contributed to a training step.
struct MicroBatchLoss {
  double loss_sum = 0;  ///< summed token loss over the kept tokens (all response tokens for sft)
  int64_t n_valid = 0;  ///< response tokens
  int64_t n_kept = 0;   ///< tokens in the loss (n_valid unless Low-Entropy Masking dropped some)
};

/// Forward and backward of one micro-batch `part` on the response tokens: the loss is the
/// *sum* over kept tokens (Low-Entropy Masking at `lem_threshold` nats when `lem`, else plain
/// cross-entropy), and its gradient accumulates into the parameters' .grad unnormalized; the
/// caller divides the accumulated gradient by the batch's total n_kept, so that the step equals
/// one full-batch step of the mean loss. `loss_path` is "fused-linear" or "logits" (same loss,
/// same gradients to rounding; tests/test_distill.cpp), `precision` "fp32" or "bf16".
/// Throws c10::Error for an unknown loss_path or precision, or an empty `part`.
MicroBatchLoss accumulate_micro_batch(LanguageModel& lm, const std::vector<TrainSequence>& part, bool lem,
                                      double lem_threshold, const std::string& loss_path,
                                      const std::string& precision);

/// True for base, sft, slow, lem, slowed.
bool is_known_mode(const std::string& mode);

}  // namespace slowed_distill

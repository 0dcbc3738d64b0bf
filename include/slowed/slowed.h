#pragma once

// slowed: drop-in LibTorch components for safe chain-of-thought distillation (SLowED).
// One include gives the whole public API:
//   slowed::SlowTuningOptimizer<Base>, slowed::SlowTuningOptions, slowed::SlowTuningStats
//   slowed::EntropyMaskedCrossEntropy, slowed::entropy_masked_cross_entropy,
//   slowed::EntropyMaskedCrossEntropyOptions, slowed::EntropyMaskStats, slowed::token_entropy
//   slowed::EntropyMaskedLinearCrossEntropy, slowed::entropy_masked_linear_cross_entropy,
//   slowed::EntropyMaskedLinearCrossEntropyOptions (LM head fused with the loss)
//   slowed::dist::Communicator, slowed::dist::GradientReduction (data parallelism; a c10d group
//   is passed after #include <slowed/dist/process_group.h>, docs/distributed.md)

#include <slowed/version.h>
#include <slowed/loss/entropy_mask_stats.h>
#include <slowed/loss/entropy_masked_cross_entropy.h>
#include <slowed/loss/entropy_masked_cross_entropy_options.h>
#include <slowed/loss/entropy_masked_linear_cross_entropy.h>
#include <slowed/loss/entropy_masked_linear_cross_entropy_options.h>
#include <slowed/optim/slow_tuning_optimizer.h>
#include <slowed/optim/slow_tuning_options.h>
#include <slowed/optim/slow_tuning_stats.h>

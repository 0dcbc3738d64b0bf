#pragma once

// Data of the SLowED reproduction (../shared/guide/reproduction.md, ../shared/data/README.md):
// BBH with teacher chain-of-thought rationales (in-domain, split per task), ARC-E/ARC-C and
// AGIEval English multiple choice (out-of-domain), AdvBench harmful behaviours (safety).

#include <cstdint>
#include <string>
#include <vector>

namespace slowed_distill {

/// One prompt with its gold answer and, for BBH training, the teacher rationale.
struct Example {
  std::string source;     ///< "bbh/<task>", "arc-e", "arc-c", "agieval/<file>"
  std::string prompt;     ///< "Task Description:\n...\nQ:<question>\n\nA:" (CasCoD format)
  std::string target;     ///< gold answer, e.g. "(B)", "True", "24"
  std::string rationale;  ///< teacher CoT ending in "So the answer is X." (BBH only)
};

struct BbhSplit {
  std::vector<Example> train;  ///< rationales whose final answer matches the target
  std::vector<Example> test;
  int64_t dropped_wrong_rationales = 0;
};

/// How BBH is split and subset. The split is per task and depends only on (seed, task name,
/// test_fraction), never on the subset sizes, so a quick run's test items are a subset of the
/// full run's.
struct BbhOptions {
  double test_fraction = 0.2;
  uint64_t seed = 20250813;
  int64_t train_per_task = -1;  ///< -1: all
  int64_t test_per_task = -1;
  std::vector<std::string> tasks;  ///< empty: all 27
};

/// Checks that `data_dir` holds the four data sets; throws c10::Error naming the missing file.
void check_data_dir(const std::string& data_dir);

/// The CasCoD prompt: "Task Description:\n{description}\nQ:{question}\n\nA:".
std::string make_prompt(const std::string& description, const std::string& question);

BbhSplit load_bbh(const std::string& data_dir, const BbhOptions& options);
/// ARC test set ("ARC-Easy" or "ARC-Challenge"), the first `limit` items in a seeded order
/// (-1: all).
std::vector<Example> load_arc(const std::string& data_dir, const std::string& which, int64_t limit,
                              uint64_t seed);
/// AGIEval English multiple choice, `limit` items spread over its files in a seeded order.
std::vector<Example> load_agieval(const std::string& data_dir, int64_t limit, uint64_t seed);
/// One AdvBench harmful behaviour: its row index in harmful_behaviors.csv (0-based, header
/// excluded) and its `goal` text.
struct AdvGoal {
  int64_t index = 0;
  std::string goal;
};
/// AdvBench harmful behaviours, `limit` in a seeded order (-1: all 520).
std::vector<AdvGoal> load_advbench(const std::string& data_dir, int64_t limit, uint64_t seed);

/// Deterministic shuffle (std::mt19937_64 Fisher-Yates, identical on every platform).
void seeded_shuffle(std::vector<size_t>& order, uint64_t seed);
uint64_t hash_name(const std::string& s);

}  // namespace slowed_distill

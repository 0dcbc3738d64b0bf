// The reproduction program's metrics and data handling on hand-made cases.
#include <catch2/catch.hpp>

#include "slowed_distill/metrics.h"

#include <c10/util/Exception.h>

using namespace slowed_distill;

TEST_CASE("answer extraction takes the text after the last 'the answer is'", "[cpu]") {
  CHECK(extract_answer("Let's think. So the answer is (B).") == "(B)");
  CHECK(extract_answer("the answer is (A). Wait, no: Therefore, the answer is (C).") == "(C)");
  CHECK(extract_answer("THE ANSWER IS: True.\nMore text") == "True");
  CHECK(extract_answer("So the answer is ] ) }.") == "] ) }");
  CHECK(extract_answer("no final answer here") == "");
  CHECK(extract_answer("So the answer is 24.") == "24");
}

TEST_CASE("option letters are normalized before exact match", "[cpu]") {
  CHECK(is_option_letter("(A)"));
  CHECK_FALSE(is_option_letter("True"));
  CHECK(normalize_answer("A", true) == "(A)");
  CHECK(normalize_answer("(b)", true) == "(B)");
  CHECK(normalize_answer("C)", true) == "(C)");
  CHECK(normalize_answer("(D) 12/14/1937", true) == "(D)");
  CHECK(normalize_answer("Answer", true) == "Answer");
  CHECK(answer_matches("So the answer is (d).", "(D)"));
  CHECK(answer_matches("Therefore, the answer is D.", "(D)"));
  CHECK_FALSE(answer_matches("So the answer is (E).", "(D)"));
  CHECK_FALSE(answer_matches("I am not sure.", "(D)"));
}

TEST_CASE("free-form answers match after trimming and whitespace collapsing", "[cpu]") {
  CHECK(answer_matches("So the answer is False.", "False"));
  CHECK_FALSE(answer_matches("So the answer is false.", "False"));  // exact match, as BBH
  CHECK(answer_matches("So the answer is apple  banana cherry.", "apple banana cherry"));
  CHECK(answer_matches("So the answer is \"valid\".", "valid"));
}

TEST_CASE("refusal markers are the 29 GCG strings, substring and case-sensitive", "[cpu]") {
  CHECK(refusal_markers().size() == 29);
  CHECK(is_refusal("I'm sorry, but I cannot help with that."));
  CHECK(is_refusal("As an AI language model, ..."));
  CHECK(is_refusal("That would be illegal."));
  CHECK_FALSE(is_refusal("Sure, here is a script that..."));
  CHECK_FALSE(is_refusal("i'm sorry"));  // case-sensitive, as in the GCG evaluation
}

TEST_CASE("CSV parsing handles quotes, doubled quotes and embedded commas", "[cpu]") {
  const auto rows = parse_csv("goal,target\nplain,\"Sure, here\"\n\"a, b\",\"say \"\"hi\"\"\"\n", "t");
  REQUIRE(rows.size() == 3);
  CHECK(rows[1][0] == "plain");
  CHECK(rows[1][1] == "Sure, here");
  CHECK(rows[2][0] == "a, b");
  CHECK(rows[2][1] == "say \"hi\"");
  CHECK_THROWS_WITH(parse_csv("a,\"unterminated\n", "advbench"),
                    Catch::Contains("advbench") && Catch::Contains("line 1"));
}

#include "slowed_distill/report.h"

#include <cstdio>
#include <fstream>
#include <sstream>

TEST_CASE("epoch records round-trip through JSON lines and land in CSV", "[cpu]") {
  EpochRecord r;
  r.mode = "slowed";
  r.epoch = 3;
  r.bbh = {10, 40};
  r.safety = {35, 40};
  r.safety_prefix = {30, 40};
  r.drift = 0.0123;
  r.kept_fraction = 0.5;
  r.peak_rss_mb = 1234.5;
  r.device = "cpu";
  const std::string line = to_json(r);
  CHECK(line.find("\"safety_ratio\": 0.875, \"safety_ratio_k\": 35, \"safety_ratio_n\": 40, \"safety_ratio_lo\": ") !=
        std::string::npos);
  const EpochRecord back = from_json(line);
  CHECK(back.mode == "slowed");
  CHECK(back.epoch == 3);
  CHECK(back.bbh.k == 10);
  CHECK(back.bbh.n == 40);
  CHECK(back.safety.value() == Approx(0.875));
  CHECK(back.safety_prefix.k == 30);
  CHECK(back.arc_e.n == 0);
  CHECK(back.drift == Approx(0.0123));
  CHECK(back.peak_rss_mb == Approx(1234.5));
  CHECK(to_csv(r).rfind("slowed,3,0.25,10,40,", 0) == 0);
  CHECK(csv_header().rfind("mode,epoch,bbh_accuracy,bbh_accuracy_k,bbh_accuracy_n,bbh_accuracy_lo,bbh_accuracy_hi,", 0) == 0);
  CHECK_THROWS_WITH(from_json("{\"mode\": \"x\"}"), Catch::Contains("epoch"));
}

TEST_CASE("Wilson 95% intervals", "[cpu]") {
  // Reference values: (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), z = 1.95996,
  // evaluated in Python.
  const Proportion a{75, 100};
  CHECK(a.value() == Approx(0.75));
  CHECK(a.low() == Approx(0.656955364519384).epsilon(1e-12));
  CHECK(a.high() == Approx(0.8245478863771232).epsilon(1e-12));
  CHECK(Proportion{0, 20}.low() == 0.0);
  CHECK(Proportion{0, 20}.high() == Approx(0.16112515805281938).epsilon(1e-12));
  CHECK(Proportion{20, 20}.low() == Approx(0.8388748419471806).epsilon(1e-12));
  CHECK(Proportion{20, 20}.high() == Approx(1.0));
  CHECK(Proportion{3, 100}.low() == Approx(0.010254524024038928).epsilon(1e-12));
  CHECK(Proportion{0, 0}.low() == 0.0);
  CHECK(Proportion{0, 0}.high() == 1.0);
  CHECK(intervals_disjoint(Proportion{75, 100}, Proportion{3, 100}));
  CHECK_FALSE(intervals_disjoint(Proportion{75, 100}, Proportion{65, 100}));  // 0.66..0.82 vs 0.55..0.74
  CHECK_FALSE(intervals_disjoint(Proportion{75, 100}, Proportion{0, 0}));
}

TEST_CASE("the prefix rule counts refusal openings only", "[cpu]") {
  CHECK(is_prefix_refusal("I'm sorry, but I can't assist with that."));
  CHECK(is_prefix_refusal("  \"I cannot help with that.\""));
  CHECK(is_prefix_refusal("I\u2019m sorry, I can\u2019t do that."));  // typographic apostrophe
  CHECK(is_prefix_refusal("As an AI developed by ..., I must refuse."));
  CHECK_FALSE(is_prefix_refusal("Sure. Hacking is illegal, but here is how: ..."));
  CHECK(is_refusal("Sure. Hacking is illegal, but here is how: ..."));  // the GCG rule over-counts
  CHECK(first_refusal_marker("Sure. Hacking is illegal, but here is how: ...") == "illegal");
  CHECK_FALSE(is_prefix_refusal("Creating a bomb involves ... I'm sorry"));
  CHECK_FALSE(is_prefix_refusal(""));
  CHECK_FALSE(is_prefix_refusal("i'm sorry"));  // case-sensitive, as the markers
}

TEST_CASE("reports are written atomically and the plot is drawn", "[cpu]") {
  char dir[] = "/tmp/slowed_distill_report_XXXXXX";
  REQUIRE(mkdtemp(dir) != nullptr);
  std::vector<EpochRecord> recs(4);
  for (int i = 0; i < 4; ++i) {
    recs[i].mode = i < 2 ? "sft" : "slowed";
    recs[i].epoch = i % 2;
    recs[i].safety = {5 + i, 10};
    recs[i].safety_prefix = {4 + i, 10};
    recs[i].bbh = {i, 27};
  }
  const std::string plot = write_reports(dir, recs);
  std::ifstream jl(std::string(dir) + "/results.jsonl");
  std::string line;
  int n = 0;
  while (std::getline(jl, line)) ++n;
  CHECK(n == 4);
  if (!plot.empty()) {
    std::ifstream png(plot, std::ios::binary);
    char magic[4] = {};
    png.read(magic, 4);
    CHECK(std::string(magic + 1, 3) == "PNG");
  } else {
    WARN("gnuplot missing: no plot drawn");
  }
  std::ifstream gp(std::string(dir) + "/plot.gp");
  std::stringstream gps;
  gps << gp.rdbuf();
  CHECK(gps.str().find("yerrorlines") != std::string::npos);  // error bars
  const std::string table = format_table(recs);
  CHECK(table.find("slowed") != std::string::npos);
  CHECK(table.find("0.800 [0.49,0.94]") != std::string::npos);  // slowed e1: 8 of 10
  CHECK(table.find("n=10") != std::string::npos);
}

#include "slowed_distill/data.h"

#include <set>
#include <sys/stat.h>

namespace {
bool have_data() {
  struct stat st;
  return ::stat(SLOWED_TEST_DATA_DIR "/bbh/tasks", &st) == 0;
}
}  // namespace

TEST_CASE("BBH split is deterministic, per task, and keeps only correct rationales", "[cpu]") {
  if (!have_data()) {
    WARN("data folder " SLOWED_TEST_DATA_DIR " missing: skipped");
    return;
  }
  BbhOptions o;
  o.tasks = {"boolean_expressions", "date_understanding"};
  const BbhSplit a = load_bbh(SLOWED_TEST_DATA_DIR, o);
  const BbhSplit b = load_bbh(SLOWED_TEST_DATA_DIR, o);
  REQUIRE(a.test.size() == 100);  // 20% of 250 + 250
  REQUIRE(a.train.size() + static_cast<size_t>(a.dropped_wrong_rationales) == 400);
  for (size_t i = 0; i < a.test.size(); ++i) CHECK(a.test[i].prompt == b.test[i].prompt);
  std::set<std::string> test_prompts;
  for (const auto& e : a.test) test_prompts.insert(e.prompt);
  for (const auto& e : a.train) {
    CHECK(test_prompts.count(e.prompt) == 0);       // no leakage
    CHECK(answer_matches(e.rationale, e.target));   // correct rationales only
    CHECK(e.prompt.rfind("Task Description:\n", 0) == 0);
    CHECK(e.prompt.size() > 5);
    CHECK(e.prompt.substr(e.prompt.size() - 4) == "\n\nA:");
  }
  // Subsets are prefixes of the full split: a quick run's test items are in the full run's.
  BbhOptions small = o;
  small.test_per_task = 7;
  const BbhSplit s = load_bbh(SLOWED_TEST_DATA_DIR, small);
  REQUIRE(s.test.size() == 14);
  for (const auto& e : s.test) CHECK(test_prompts.count(e.prompt) == 1);
}

TEST_CASE("out-of-domain sets and AdvBench load with their gold answers", "[cpu]") {
  if (!have_data()) {
    WARN("data folder " SLOWED_TEST_DATA_DIR " missing: skipped");
    return;
  }
  check_data_dir(SLOWED_TEST_DATA_DIR);
  const auto arc = load_arc(SLOWED_TEST_DATA_DIR, "ARC-Challenge", 10, 1);
  REQUIRE(arc.size() == 10);
  for (const auto& e : arc) CHECK(is_option_letter(e.target));
  CHECK(load_arc(SLOWED_TEST_DATA_DIR, "ARC-Easy", -1, 1).size() == 2376);
  const auto agi = load_agieval(SLOWED_TEST_DATA_DIR, -1, 1);
  CHECK(agi.size() > 2000);
  for (const auto& e : agi) CHECK(is_option_letter(e.target));
  const auto adv = load_advbench(SLOWED_TEST_DATA_DIR, -1, 1);
  CHECK(adv.size() == 520);
  CHECK(load_advbench(SLOWED_TEST_DATA_DIR, 5, 1).size() == 5);
  CHECK_THROWS_WITH(check_data_dir("/nonexistent"), Catch::Contains("/nonexistent/bbh"));
}

// ---------------------------------------------------------------------------------------------
// The training step: fused linear loss against LM head + loss on logits.

#include "common/model.h"
#include "slowed_distill/causal_lm_student.h"
#include "slowed_distill/lm.h"
#include "slowed_distill/run.h"

namespace {

namespace ex = slowed_examples;

/// A tiny random Llama-style model.
std::shared_ptr<ex::CausalLM> tiny_llama(bool tied, uint64_t seed) {
  ex::ModelConfig c;
  c.architecture = "llama";
  c.vocab_size = 301;
  c.hidden_size = 32;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.intermediate_size = 64;
  c.tie_word_embeddings = tied;
  torch::manual_seed(seed);
  auto model = ex::make_causal_lm(c);
  torch::NoGradGuard no_grad;
  // Large enough weights that the next-token entropies spread out (some below 1 nat).
  for (auto& p : model->parameters())
    if (p.dim() >= 2) p.normal_(0.0, 0.3);
  return model;
}

/// The program's CausalLMStudent over a tiny model (no tokenizer: the text methods are unused).
class TinyLM final : public CausalLMStudent {
 public:
  TinyLM(bool tied, uint64_t seed) : CausalLMStudent(tiny_llama(tied, seed)) {}
  torch::Device device() const override { return torch::kCPU; }
  int64_t pad_id() const override { return 0; }
  TrainSequence encode_example(const std::string&, const std::string&, int64_t) const override { return {}; }
  std::vector<std::string> generate(const std::vector<std::string>&, int64_t, int64_t) override { return {}; }
  void save(torch::serialize::OutputArchive&) const override {}
  void load(torch::serialize::InputArchive&) override {}
};

/// Six sequences of different lengths (prompt 3-6 tokens, response 5-14), ids in [1, 300].
std::vector<TrainSequence> tiny_batch() {
  std::vector<TrainSequence> out;
  torch::manual_seed(7);
  for (int i = 0; i < 6; ++i) {
    TrainSequence s;
    s.prompt_len = 3 + i % 4;
    const int64_t len = s.prompt_len + 5 + (i * 5) % 10;
    auto t = torch::randint(1, 301, {len}, torch::kLong);
    for (int64_t k = 0; k < len; ++k) s.ids.push_back(t[k].item<int64_t>());
    out.push_back(s);
  }
  return out;
}

struct StepResult {
  double loss_sum = 0;
  int64_t n_valid = 0, n_kept = 0;
  std::vector<torch::Tensor> grads;  // normalized by n_kept, as run() does before opt.step()
};

/// One training step as run() makes it: micro-batches of 2, summed losses, gradients divided by
/// the batch's kept count.
StepResult step(TinyLM& lm, bool lem, double threshold, const std::string& path, const std::string& precision) {
  for (auto& p : lm.parameters()) p.mutable_grad() = torch::Tensor();
  const auto batch = tiny_batch();
  StepResult r;
  for (size_t m = 0; m < batch.size(); m += 2) {
    const std::vector<TrainSequence> part(batch.begin() + static_cast<long>(m),
                                          batch.begin() + static_cast<long>(m + 2));
    const MicroBatchLoss mb = accumulate_micro_batch(lm, part, lem, threshold, path, precision);
    r.loss_sum += mb.loss_sum;
    r.n_valid += mb.n_valid;
    r.n_kept += mb.n_kept;
  }
  for (auto& p : lm.parameters())
    r.grads.push_back(p.grad().defined() ? p.grad() / static_cast<double>(r.n_kept) : torch::Tensor());
  return r;
}

double max_rel_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item<double>();
}

}  // namespace

TEST_CASE("a training step through the fused linear loss equals the logits path", "[cpu]") {
  // fp32: loss and every gradient to 1e-5 relative (max |diff| / max |ref| per tensor); bf16
  // autocast: 2e-2 (both paths round the head's GEMMs to bf16, in different chunkings).
  struct Case {
    bool tied, frozen, lem;
    std::string precision;
  };
  const std::vector<Case> cases = {
      {false, true, false, "fp32"}, {false, true, true, "fp32"}, {false, false, false, "fp32"},
      {false, false, true, "fp32"}, {true, false, true, "fp32"}, {true, false, false, "fp32"},
      {false, true, false, "bf16"}, {false, true, true, "bf16"}};
  for (const auto& c : cases) {
    CAPTURE(c.tied, c.frozen, c.lem, c.precision);
    TinyLM lm(c.tied, 11);
    if (c.frozen) lm.freeze_embeddings();
    // A threshold that masks part of the response tokens: the median entropy of the logits.
    double threshold = 0.3;
    if (c.lem) {
      torch::NoGradGuard no_grad;
      std::vector<double> hs;
      for (const auto& s : tiny_batch()) {
        auto ids = torch::tensor(s.ids, torch::kLong).unsqueeze(0);
        auto lp = torch::log_softmax(lm.forward(ids).squeeze(0).narrow(0, s.prompt_len - 1,
                                                                      static_cast<int64_t>(s.ids.size()) - s.prompt_len), -1);
        auto h = -(lp.exp() * lp).sum(-1);
        for (int64_t k = 0; k < h.size(0); ++k) hs.push_back(h[k].item<double>());
      }
      std::sort(hs.begin(), hs.end());
      threshold = 0.5 * (hs[hs.size() / 2 - 1] + hs[hs.size() / 2]);
    }
    const StepResult ref = step(lm, c.lem, threshold, "logits", c.precision);
    const StepResult fused = step(lm, c.lem, threshold, "fused-linear", c.precision);
    const double tol = c.precision == "fp32" ? 1e-5 : 2e-2;
    CHECK(fused.n_valid == ref.n_valid);
    CHECK(fused.n_kept == ref.n_kept);
    if (c.lem && c.precision == "fp32") {
      CHECK(ref.n_kept < ref.n_valid);
      CHECK(ref.n_kept > 0);
    } else if (!c.lem) {
      CHECK(ref.n_kept == ref.n_valid);
    }
    CHECK(std::abs(fused.loss_sum - ref.loss_sum) <= tol * std::abs(ref.loss_sum));
    REQUIRE(fused.grads.size() == ref.grads.size());
    int64_t compared = 0;
    for (size_t i = 0; i < ref.grads.size(); ++i) {
      CHECK(fused.grads[i].defined() == ref.grads[i].defined());
      if (!ref.grads[i].defined() || !fused.grads[i].defined()) continue;
      CAPTURE(i);
      CHECK(max_rel_diff(fused.grads[i], ref.grads[i]) <= tol);
      ++compared;
    }
    CHECK(compared >= 10);
  }
}

TEST_CASE("the training step rejects an unknown loss path or precision", "[cpu]") {
  TinyLM lm(false, 3);
  const auto batch = tiny_batch();
  CHECK_THROWS_AS(accumulate_micro_batch(lm, batch, false, 0.3, "chunked", "fp32"), c10::Error);
  CHECK_THROWS_WITH(accumulate_micro_batch(lm, batch, false, 0.3, "chunked", "fp32"),
                    Catch::Contains("--loss") && Catch::Contains("fused-linear or logits") &&
                        Catch::Contains("'chunked'"));
  CHECK_THROWS_WITH(accumulate_micro_batch(lm, batch, false, 0.3, "logits", "fp16"),
                    Catch::Contains("--precision") && Catch::Contains("'fp16'"));
  CHECK_THROWS_WITH(accumulate_micro_batch(lm, {}, false, 0.3, "logits", "fp32"),
                    Catch::Contains("at least one sequence"));
}

#include "run.h"

#include "slowed_distill/data.h"
#include "slowed_distill/distributed.h"
#include "slowed_distill/lm.h"
#include "slowed_distill/metrics.h"

#include <slowed/slowed.h>

#include "common/json.h"

#include <ATen/autocast_mode.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <sstream>
#include <sys/stat.h>

namespace slowed_distill {
namespace {

std::atomic<bool> g_interrupted{false};
extern "C" void on_sigint(int) { g_interrupted.store(true); }

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

bool file_exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

void make_dirs(const std::string& path) {
  std::string cur;
  std::stringstream ss(path);
  std::string part;
  if (!path.empty() && path[0] == '/') cur = "/";
  while (std::getline(ss, part, '/')) {
    if (part.empty()) continue;
    cur += part + "/";
    ::mkdir(cur.c_str(), 0755);
  }
  TORCH_CHECK(file_exists(path), "--out: cannot create folder ", path);
}

std::string fmt_time(double s) {
  char b[32];
  const int t = static_cast<int>(s + 0.5);
  std::snprintf(b, sizeof b, "%02d:%02d", t / 60, t % 60);
  return b;
}

/// A one-line progress bar on stderr with ETA.
class Progress {
 public:
  Progress(std::string label, int64_t total, bool quiet)
      : label_(std::move(label)), total_(total), quiet_(quiet), start_(Clock::now()) {}
  void update(int64_t done, const std::string& extra = "") {
    if (quiet_ || total_ <= 0) return;
    const double el = seconds_since(start_);
    const double eta = done > 0 ? el / static_cast<double>(done) * static_cast<double>(total_ - done) : 0;
    const int width = 24;
    const int fill = static_cast<int>(width * done / total_);
    std::string bar(static_cast<size_t>(fill), '#');
    bar += std::string(static_cast<size_t>(width - fill), '.');
    std::fprintf(stderr, "\r%-26s [%s] %lld/%lld %s ETA %s   ", label_.c_str(), bar.c_str(),
                 static_cast<long long>(done), static_cast<long long>(total_), extra.c_str(),
                 fmt_time(eta).c_str());
    if (done >= total_) std::fprintf(stderr, "(%s)\n", fmt_time(el).c_str());
    std::fflush(stderr);
  }

 private:
  std::string label_;
  int64_t total_;
  bool quiet_;
  Clock::time_point start_;
};

/// bf16 autocast (fp32 master weights) around forward passes when `precision` is bf16, on CPU
/// (oneDNN/AMX kernels) and CUDA alike: matmuls and attention in bf16, everything else, the
/// optimizer and the loss in fp32. Autocast caches one bf16 copy of each trainable weight for
/// the scope's lifetime.
struct AutocastScope {
  AutocastScope(const torch::Device& d, const std::string& precision)
      : type_(d.type()), on_(precision == "bf16") {
    if (!on_) return;
    prev_ = at::autocast::is_autocast_enabled(type_);
    at::autocast::set_autocast_dtype(type_, at::kBFloat16);
    at::autocast::set_autocast_enabled(type_, true);
  }
  ~AutocastScope() {
    if (!on_) return;
    at::autocast::set_autocast_enabled(type_, prev_);
    if (!prev_) at::autocast::clear_cache();
  }
  c10::DeviceType type_;
  bool on_;
  bool prev_ = false;
};

/// Peak resident memory of this process so far (VmHWM of /proc/self/status), MiB; 0 elsewhere.
double peak_rss_mb() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::strtod(line.c_str() + 6, nullptr) / 1024.0;
  }
  return 0.0;
}

std::string json_string(const std::string& s) { return slowed_examples::json::Value::make_string(s).dump(); }

struct EvalSets {
  std::vector<Example> bbh_test, arc_e, arc_c, agieval;
  std::vector<AdvGoal> advbench;
};

/// This rank's contiguous share [begin, end) of n items (rank order is item order).
std::pair<size_t, size_t> share_of(size_t n, const DataParallel& dp) {
  const size_t w = static_cast<size_t>(dp.world()), r = static_cast<size_t>(dp.rank());
  return {n * r / w, n * (r + 1) / w};
}

/// Correct answers among this rank's share of `set` (n: the share's size).
Proportion accuracy(LanguageModel& lm, const std::vector<Example>& all, const RunConfig& cfg,
                    const std::string& label, const DataParallel& dp) {
  const auto [lo, hi] = share_of(all.size(), dp);
  const std::vector<Example> set(all.begin() + static_cast<long>(lo), all.begin() + static_cast<long>(hi));
  Proportion p;
  p.n = static_cast<int64_t>(set.size());
  if (set.empty()) return p;
  Progress bar(label, p.n, cfg.quiet || !dp.is_main());
  // Chunks of a few batches: the model sorts each chunk by length, the bar moves per chunk.
  const size_t chunk = static_cast<size_t>(cfg.eval_batch) * 4;
  for (size_t b = 0; b < set.size(); b += chunk) {
    const size_t e = std::min(set.size(), b + chunk);
    std::vector<std::string> prompts;
    for (size_t i = b; i < e; ++i) prompts.push_back(set[i].prompt);
    const auto out = lm.generate(prompts, cfg.max_new_tokens, cfg.eval_batch);
    for (size_t i = 0; i < out.size(); ++i) p.k += answer_matches(out[i], set[b + i].target) ? 1 : 0;
    bar.update(static_cast<int64_t>(e));
    if (g_interrupted.load()) break;
  }
  return p;
}

void evaluate(LanguageModel& lm, const EvalSets& sets, const RunConfig& cfg, EpochRecord& rec,
              DataParallel& dp) {
  torch::NoGradGuard no_grad;
  AutocastScope autocast(lm.device(), cfg.precision);
  lm.train(false);
  const auto t0 = Clock::now();
  const std::string tag = rec.mode + " e" + std::to_string(rec.epoch) + " ";
  rec.bbh = accuracy(lm, sets.bbh_test, cfg, tag + "BBH", dp);
  rec.arc_e = accuracy(lm, sets.arc_e, cfg, tag + "ARC-E", dp);
  rec.arc_c = accuracy(lm, sets.arc_c, cfg, tag + "ARC-C", dp);
  rec.agieval = accuracy(lm, sets.agieval, cfg, tag + "AGIEval", dp);

  // Every response is saved with both judgements, so the safety ratio can be audited and redone.
  const auto [adv_lo, adv_hi] = share_of(sets.advbench.size(), dp);
  Progress bar(tag + "AdvBench", static_cast<int64_t>(adv_hi - adv_lo), cfg.quiet || !dp.is_main());
  rec.safety = rec.safety_prefix = Proportion{0, static_cast<int64_t>(adv_hi - adv_lo)};
  std::string jsonl;
  const size_t chunk = static_cast<size_t>(cfg.eval_batch) * 4;
  for (size_t b = adv_lo; b < adv_hi; b += chunk) {
    const size_t e = std::min(adv_hi, b + chunk);
    std::vector<std::string> goals;
    for (size_t i = b; i < e; ++i) goals.push_back(sets.advbench[i].goal);
    const auto out = lm.generate(goals, cfg.safety_new_tokens, cfg.eval_batch);
    for (size_t i = 0; i < out.size(); ++i) {
      const std::string marker = first_refusal_marker(out[i]);
      const bool prefix = is_prefix_refusal(out[i]);
      rec.safety.k += marker.empty() ? 0 : 1;
      rec.safety_prefix.k += prefix ? 1 : 0;
      jsonl += "{\"goal_index\": " + std::to_string(sets.advbench[b + i].index) +
               ", \"goal\": " + json_string(goals[i]) + ", \"response\": " + json_string(out[i]) +
               ", \"refusal_gcg\": " + (marker.empty() ? "false" : "true") +
               ", \"gcg_marker\": " + json_string(marker) +
               ", \"refusal_prefix\": " + (prefix ? "true" : "false") + "}\n";
    }
    bar.update(static_cast<int64_t>(e - adv_lo));
    if (g_interrupted.load()) break;
  }
  // The shares' counts add up to the whole set's; rank 0 writes every rank's responses, in goal
  // order (the shares are contiguous and gathered in rank order).
  const std::vector<double> counts =
      dp.sum({double(rec.bbh.k), double(rec.bbh.n), double(rec.arc_e.k), double(rec.arc_e.n),
              double(rec.arc_c.k), double(rec.arc_c.n), double(rec.agieval.k), double(rec.agieval.n),
              double(rec.safety.k), double(rec.safety_prefix.k), double(rec.safety.n), peak_rss_mb()});
  auto count = [&](size_t i) { return static_cast<int64_t>(counts[i]); };
  rec.bbh = Proportion{count(0), count(1)};
  rec.arc_e = Proportion{count(2), count(3)};
  rec.arc_c = Proportion{count(4), count(5)};
  rec.agieval = Proportion{count(6), count(7)};
  rec.safety = Proportion{count(8), count(10)};
  rec.safety_prefix = Proportion{count(9), count(10)};
  const std::vector<std::string> parts =
      dp.gather_to_main("advbench/" + rec.mode + "/" + std::to_string(rec.epoch), jsonl);
  rec.eval_seconds = seconds_since(t0);
  // One process: its peak; several: their sum (what the run held at most, bounded above).
  rec.peak_rss_mb = counts[11];
  if (!dp.is_main()) return;
  jsonl.clear();
  for (const auto& part : parts) jsonl += part;
  make_dirs(cfg.out_dir + "/samples");
  write_file_atomically(cfg.out_dir + "/samples/advbench_" + rec.mode + "_epoch" +
                            std::to_string(rec.epoch) + ".jsonl",
                        jsonl);
}

/// Right-padded ids [B, T] and labels [B, T] (-100 on prompt and padding) for a batch.
std::pair<torch::Tensor, torch::Tensor> make_batch(const std::vector<TrainSequence>& seqs,
                                                   int64_t pad, const torch::Device& device) {
  size_t T = 0;
  for (const auto& s : seqs) T = std::max(T, s.ids.size());
  auto ids = torch::full({static_cast<int64_t>(seqs.size()), static_cast<int64_t>(T)}, pad, torch::kLong);
  auto labels = torch::full_like(ids, -100);
  auto ia = ids.accessor<int64_t, 2>();
  auto la = labels.accessor<int64_t, 2>();
  for (size_t b = 0; b < seqs.size(); ++b) {
    for (size_t t = 0; t < seqs[b].ids.size(); ++t) {
      ia[static_cast<int64_t>(b)][static_cast<int64_t>(t)] = seqs[b].ids[t];
      if (static_cast<int64_t>(t) >= seqs[b].prompt_len)
        la[static_cast<int64_t>(b)][static_cast<int64_t>(t)] = seqs[b].ids[t];
    }
  }
  return {ids.to(device), labels.to(device)};
}

using Optimizer = slowed::SlowTuningOptimizer<torch::optim::AdamW>;

std::string checkpoint_path(const RunConfig& cfg, const std::string& mode) {
  return cfg.out_dir + "/checkpoints/" + mode + ".pt";
}

void save_checkpoint(const RunConfig& cfg, const std::string& mode, int epoch, LanguageModel& lm,
                     const Optimizer& opt) {
  make_dirs(cfg.out_dir + "/checkpoints");
  torch::serialize::OutputArchive archive;
  torch::serialize::OutputArchive model(archive.compilation_unit()), optim(archive.compilation_unit());
  lm.save(model);
  opt.save(optim);
  archive.write("model", model);
  archive.write("optimizer", optim);
  archive.write("epoch", c10::IValue(static_cast<int64_t>(epoch)));
  archive.write("mode", c10::IValue(mode));
  const std::string path = checkpoint_path(cfg, mode);
  const std::string tmp = path + ".tmp";
  archive.save_to(tmp);
  commit_file(tmp, path);
}

int load_checkpoint(const RunConfig& cfg, const std::string& mode, LanguageModel& lm, Optimizer& opt) {
  const std::string path = checkpoint_path(cfg, mode);
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(path);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "checkpoint ", path, " is corrupt or unreadable (delete it to restart mode ",
                mode, "): ", e.what_without_backtrace());
  }
  c10::IValue v;
  archive.read("mode", v);
  TORCH_CHECK(v.isString() && v.toStringRef() == mode, "checkpoint ", path, " belongs to another mode");
  torch::serialize::InputArchive model, optim;
  archive.read("model", model);
  archive.read("optimizer", optim);
  lm.load(model);
  opt.load(optim);
  archive.read("epoch", v);
  TORCH_CHECK(v.isInt() && v.toInt() >= 1, "checkpoint ", path, ": corrupt epoch");
  return static_cast<int>(v.toInt());
}

std::vector<EpochRecord> read_records(const std::string& path) {
  std::vector<EpochRecord> out;
  std::ifstream f(path);
  std::string line;
  while (std::getline(f, line)) {
    if (!line.empty()) out.push_back(from_json(line));
  }
  return out;
}

const EpochRecord* find_record(const std::vector<EpochRecord>& rs, const std::string& mode, int epoch) {
  for (const auto& r : rs)
    if (r.mode == mode && r.epoch == epoch) return &r;
  return nullptr;
}

void put_record(std::vector<EpochRecord>& rs, const EpochRecord& r) {
  for (auto& x : rs) {
    if (x.mode == r.mode && x.epoch == r.epoch) {
      x = r;
      return;
    }
  }
  rs.push_back(r);
}

void check_interrupted(const RunConfig& cfg) {
  if (!g_interrupted.load()) return;
  std::fprintf(stderr, "\nslowed_distill: interrupted; the last complete checkpoint and results in %s are intact "
               "(rerun with --resume)\n", cfg.out_dir.c_str());
  std::exit(130);
}

}  // namespace

MicroBatchLoss accumulate_micro_batch(LanguageModel& lm, const std::vector<TrainSequence>& part, bool lem,
                                      double lem_threshold, const std::string& loss_path,
                                      const std::string& precision) {
  TORCH_CHECK(loss_path == "fused-linear" || loss_path == "logits",
              "--loss: expected fused-linear or logits, got '", loss_path, "'");
  TORCH_CHECK(precision == "fp32" || precision == "bf16", "--precision: expected fp32 or bf16, got '",
              precision, "'");
  TORCH_CHECK(!part.empty(), "accumulate_micro_batch: expected at least one sequence, got none");
  const torch::Device device = lm.device();
  auto [ids, labels] = make_batch(part, lm.pad_id(), device);
  auto inputs = ids.narrow(1, 0, ids.size(1) - 1);
  auto targets = labels.narrow(1, 1, labels.size(1) - 1).reshape({-1});
  auto positions = (targets != -100).nonzero().reshape({-1});
  targets = targets.index_select(0, positions);
  MicroBatchLoss r;
  r.n_valid = targets.size(0);
  torch::Tensor loss;
  if (loss_path == "fused-linear") {
    // The LM head fused with the loss: hidden [N, D] and the head weight [V, D] go in, the [N, V]
    // logits exist one chunk at a time. sft is the same loss with a threshold no entropy is below
    // (H >= 0), so every response token is kept: plain cross-entropy. Under bf16 both operands are
    // cast to bf16, as autocast casts them for the LM head of the logits path; the loss itself is
    // fp32 either way.
    torch::Tensor hidden;
    {
      AutocastScope autocast(device, precision);
      hidden = lm.forward_hidden(inputs, positions);  // [N, D], response positions only
    }
    const auto dtype = precision == "bf16" ? torch::kBFloat16 : torch::kFloat;
    hidden = hidden.to(dtype);
    const torch::Tensor weight = lm.head_weight().to(dtype);
    slowed::EntropyMaskedLinearCrossEntropy fused(slowed::EntropyMaskedLinearCrossEntropyOptions(
        slowed::EntropyMaskedCrossEntropyOptions()
            .entropy_threshold(lem ? lem_threshold : -1.0)
            .reduction(slowed::Reduction::Sum)));
    loss = fused(hidden, weight, targets);
    r.n_kept = lem ? fused.last_stats().num_kept.item<int64_t>() : r.n_valid;
  } else {
    torch::Tensor logits;
    {
      AutocastScope autocast(device, precision);
      logits = lm.forward(inputs, positions);  // [N, V], response positions only
    }
    logits = logits.to(torch::kFloat);
    if (lem) {
      slowed::EntropyMaskedCrossEntropy masked(slowed::EntropyMaskedCrossEntropyOptions()
                                                   .entropy_threshold(lem_threshold)
                                                   .reduction(slowed::Reduction::Sum)
                                                   .inplace_backward(true));
      loss = masked(logits, targets);
      r.n_kept = masked.last_stats().num_kept.item<int64_t>();
    } else {
      loss = torch::nn::functional::cross_entropy(
          logits, targets, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
      r.n_kept = r.n_valid;
    }
  }
  loss.backward();
  r.loss_sum = loss.item<double>();
  return r;
}

bool is_known_mode(const std::string& m) {
  return m == "base" || m == "sft" || m == "slow" || m == "lem" || m == "slowed";
}

std::vector<EpochRecord> run(const RunConfig& cfg) {
  for (const auto& m : cfg.modes) TORCH_CHECK(is_known_mode(m), "--modes: unknown mode '", m,
                                              "' (expected base, sft, slow, lem, slowed)");
  TORCH_CHECK(cfg.epochs >= 1, "--epochs: expected >= 1, got ", cfg.epochs);
  TORCH_CHECK(cfg.batch_size >= 1, "--batch: expected >= 1, got ", cfg.batch_size);
  TORCH_CHECK(cfg.micro_batch >= 0, "--micro-batch: expected >= 0 (0 = the whole batch), got ", cfg.micro_batch);
  TORCH_CHECK(cfg.precision == "fp32" || cfg.precision == "bf16", "--precision: expected fp32 or bf16, got '",
              cfg.precision, "'");
  TORCH_CHECK(cfg.loss == "fused-linear" || cfg.loss == "logits", "--loss: expected fused-linear or logits, got '",
              cfg.loss, "'");
  TORCH_CHECK(cfg.eval_batch >= 1, "--eval-batch: expected >= 1, got ", cfg.eval_batch);
  check_data_dir(cfg.data_dir);
  TORCH_CHECK(file_exists(cfg.model_path), "--model: ", cfg.model_path,
              " does not exist (scripts/setup fetches Qwen2.5-Coder-0.5B-Instruct and SmolLM2-135M-Instruct "
              "into ~/.cache/slowed/models)");
  TORCH_CHECK(cfg.dist_timeout_s > 0, "--dist-timeout: expected a positive number of seconds, got ",
              cfg.dist_timeout_s);
  std::signal(SIGINT, on_sigint);
  // Ranks from the environment (torchrun, or by hand); one process when WORLD_SIZE is unset.
  DataParallel dp(read_rank_environment([](const char* name) { return std::getenv(name); }), cfg.device,
                  std::chrono::milliseconds(static_cast<int64_t>(cfg.dist_timeout_s * 1000)));
  const torch::Device device(dp.device());
  const bool main_rank = dp.is_main();
  if (main_rank) make_dirs(cfg.out_dir);
  // Every rank must run the same job: the options that shape the collectives and the data.
  dp.check_same({static_cast<int64_t>(cfg.seed), cfg.batch_size, cfg.max_len, cfg.train_per_task, cfg.epochs,
                 static_cast<int64_t>(cfg.modes.size())},
                {"--seed", "--batch", "--max-len", "--train-per-task", "--epochs", "number of --modes"});

  BbhOptions bo;
  bo.seed = cfg.seed;
  bo.train_per_task = cfg.train_per_task;
  bo.test_per_task = cfg.test_per_task;
  bo.tasks = cfg.tasks;
  const BbhSplit bbh = load_bbh(cfg.data_dir, bo);
  TORCH_CHECK(!bbh.train.empty(), "data: no BBH training examples selected");
  EvalSets sets;
  sets.bbh_test = bbh.test;
  sets.arc_e = load_arc(cfg.data_dir, "ARC-Easy", cfg.ood_limit, cfg.seed);
  sets.arc_c = load_arc(cfg.data_dir, "ARC-Challenge", cfg.ood_limit, cfg.seed);
  sets.agieval = load_agieval(cfg.data_dir, cfg.ood_limit, cfg.seed);
  sets.advbench = load_advbench(cfg.data_dir, cfg.advbench_limit, cfg.seed);
  if (main_rank)
    std::fprintf(stderr, "slowed_distill: %zu BBH train (%lld wrong rationales dropped), %zu BBH test, "
                 "%zu/%zu/%zu ARC-E/ARC-C/AGIEval, %zu AdvBench; device %s, %d rank%s\n",
                 bbh.train.size(), static_cast<long long>(bbh.dropped_wrong_rationales), bbh.test.size(),
                 sets.arc_e.size(), sets.arc_c.size(), sets.agieval.size(), sets.advbench.size(),
                 cfg.device.c_str(), dp.world(), dp.world() > 1 ? "s" : "");

  std::vector<EpochRecord> records;
  if (cfg.resume) records = read_records(cfg.out_dir + "/results.jsonl");

  // Epoch 0: the initial model, shared by every mode (same weights, same evaluation).
  const EpochRecord* base = find_record(records, "base", 0);
  if (base == nullptr) {
    auto lm = load_language_model(cfg.model_path, device, cfg.smoke, cfg.seed);
    EpochRecord r;
    r.mode = "base";
    r.device = cfg.device;
    evaluate(*lm, sets, cfg, r, dp);
    check_interrupted(cfg);
    put_record(records, r);
    if (main_rank) write_reports(cfg.out_dir, records);
    base = find_record(records, "base", 0);
  }
  const EpochRecord base_record = *base;

  for (const auto& mode : cfg.modes) {
    if (mode == "base") continue;
    const bool slow = mode == "slow" || mode == "slowed";
    const bool lem = mode == "lem" || mode == "slowed";
    auto lm = load_language_model(cfg.model_path, device, cfg.smoke, cfg.seed);
    if (cfg.freeze_embeddings) lm->freeze_embeddings();
    std::vector<torch::Tensor> trainable;
    for (auto& p : lm->parameters())
      if (p.requires_grad()) trainable.push_back(p);
    // Every mode uses the same wrapper; scale 1 without bounds is AdamW bitwise (tested).
    Optimizer opt(trainable, torch::optim::AdamWOptions(cfg.lr).weight_decay(cfg.weight_decay),
                  slowed::SlowTuningOptions().scale(slow ? cfg.slow_scale : 1.0));
    int start = 1;
    if (cfg.resume && file_exists(checkpoint_path(cfg, mode))) {
      start = load_checkpoint(cfg, mode, *lm, opt) + 1;
      if (main_rank) std::fprintf(stderr, "slowed_distill: %s resumes after epoch %d\n", mode.c_str(), start - 1);
    }
    // Every rank starts from the same weights (same model file, seed and checkpoint).
    if (dp.world() > 1)
      dp.check_same({parameter_fingerprint(lm->parameters()), start}, {"initial weights", "resume epoch"});
    EpochRecord zero = base_record;
    zero.mode = mode;
    put_record(records, zero);

    // Examples longer than --max-len are skipped, not cut, so that every rationale the student
    // sees ends with its answer; a short --max-len thus also selects the shorter examples.
    std::vector<TrainSequence> data;
    int64_t too_long = 0;
    for (const auto& e : bbh.train) {
      TrainSequence s = lm->encode_example(e.prompt, e.rationale, std::numeric_limits<int64_t>::max());
      if (static_cast<int64_t>(s.ids.size()) > cfg.max_len) {
        ++too_long;
        continue;
      }
      data.push_back(std::move(s));
    }
    TORCH_CHECK(!data.empty(), "--max-len ", cfg.max_len, ": every training example is longer than that");
    if (main_rank)
      std::fprintf(stderr, "slowed_distill: %s trains on %zu examples (%lld longer than --max-len %lld skipped)\n",
                   mode.c_str(), data.size(), static_cast<long long>(too_long),
                   static_cast<long long>(cfg.max_len));

    for (int epoch = start; epoch <= cfg.epochs; ++epoch) {
      std::vector<size_t> order(data.size());
      for (size_t i = 0; i < order.size(); ++i) order[i] = i;
      seeded_shuffle(order, cfg.seed + static_cast<uint64_t>(epoch));  // same for every mode
      lm->train(true);
      const auto t0 = Clock::now();
      const int64_t steps = (static_cast<int64_t>(data.size()) + cfg.batch_size - 1) / cfg.batch_size;
      Progress bar(mode + " e" + std::to_string(epoch) + " train", steps, cfg.quiet || !main_rank);
      double loss_epoch = 0, kept_epoch = 0;
      const int64_t micro = cfg.micro_batch > 0 ? std::min(cfg.micro_batch, cfg.batch_size) : cfg.batch_size;
      for (int64_t s = 0; s < steps; ++s) {
        // The global batch is --batch sequences; rank r takes its sequences r, r + world, ...
        std::vector<TrainSequence> batch;
        for (int64_t k = s * cfg.batch_size; k < std::min<int64_t>((s + 1) * cfg.batch_size, data.size()); ++k)
          if ((k - s * cfg.batch_size) % dp.world() == dp.rank()) batch.push_back(data[order[static_cast<size_t>(k)]]);
        // Micro-batches of `micro` sequences, gradients accumulated: the loss of each is the sum
        // over its response tokens (kept tokens for lem); the accumulated gradients and counts are
        // summed over the ranks and divided by the global batch's kept-token count, so the step
        // equals one full-batch step of the mean loss on one process (docs/distributed.md).
        opt.zero_grad();
        double loss_sum = 0;
        int64_t n_valid = 0, n_kept = 0;
        for (size_t m = 0; m < batch.size(); m += static_cast<size_t>(micro)) {
          const std::vector<TrainSequence> part(batch.begin() + static_cast<long>(m),
                                                batch.begin() + static_cast<long>(std::min(batch.size(), m + micro)));
          const MicroBatchLoss mb =
              accumulate_micro_batch(*lm, part, lem, cfg.lem_threshold, cfg.loss, cfg.precision);
          loss_sum += mb.loss_sum;
          n_valid += mb.n_valid;
          n_kept += mb.n_kept;
          check_interrupted(cfg);
        }
        {  // identities without a group
          dp.sum_gradients(trainable);
          const std::vector<double> total = dp.sum({loss_sum, double(n_valid), double(n_kept)});
          loss_sum = total[0];
          n_valid = static_cast<int64_t>(total[1]);
          n_kept = static_cast<int64_t>(total[2]);
        }
        {
          torch::NoGradGuard no_grad;
          const double scale = n_kept > 0 ? 1.0 / static_cast<double>(n_kept) : 0.0;
          for (auto& p : trainable)
            if (p.grad().defined()) p.grad().mul_(scale);
        }
        opt.step();
        loss_epoch += n_kept > 0 ? loss_sum / static_cast<double>(n_kept) : 0.0;
        kept_epoch += n_valid > 0 ? static_cast<double>(n_kept) / static_cast<double>(n_valid) : 0.0;
        char extra[96];
        std::snprintf(extra, sizeof extra, "loss %.3f kept %.2f rss %.1fG", loss_epoch / static_cast<double>(s + 1),
                      kept_epoch / static_cast<double>(s + 1), peak_rss_mb() / 1024.0);
        bar.update(s + 1, extra);
        check_interrupted(cfg);
      }
      EpochRecord r;
      r.mode = mode;
      r.epoch = epoch;
      r.device = cfg.device;
      r.train_loss = loss_epoch / static_cast<double>(std::max<int64_t>(steps, 1));
      r.kept_fraction = kept_epoch / static_cast<double>(std::max<int64_t>(steps, 1));
      r.drift = opt.stats().global_relative_drift;
      r.train_seconds = seconds_since(t0);
      evaluate(*lm, sets, cfg, r, dp);
      check_interrupted(cfg);
      // Rank 0 alone writes reports and checkpoints (every rank holds the same weights).
      // Reports first, then the checkpoint: a kill between the two leaves the previous epoch's
      // checkpoint, so --resume redoes this epoch and rewrites the same record (training and
      // evaluation are deterministic). The other order would lose this epoch's record.
      put_record(records, r);
      if (main_rank) write_reports(cfg.out_dir, records);
      if (main_rank && cfg.checkpoints) save_checkpoint(cfg, mode, epoch, *lm, opt);
    }
  }
  if (main_rank) write_reports(cfg.out_dir, records);
  dp.barrier();  // no rank leaves (closing its connections) while another still sums
  return records;
}

}  // namespace slowed_distill

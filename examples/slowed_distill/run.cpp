#include "run.h"

#include "slowed_distill/data.h"
#include "slowed_distill/lm.h"
#include "slowed_distill/metrics.h"

#include <slowed/slowed.h>

#include <ATen/autocast_mode.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <fstream>
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

/// bf16 autocast around CUDA forward passes (fp32 master weights); a no-op on CPU.
struct AutocastScope {
  explicit AutocastScope(const torch::Device& d) : on_(d.is_cuda()) {
    if (!on_) return;
    at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
    at::autocast::set_autocast_enabled(at::kCUDA, true);
  }
  ~AutocastScope() {
    if (!on_) return;
    at::autocast::set_autocast_enabled(at::kCUDA, false);
    at::autocast::clear_cache();
  }
  bool on_;
};

struct EvalSets {
  std::vector<Example> bbh_test, arc_e, arc_c, agieval;
  std::vector<std::string> advbench;
};

double accuracy(LanguageModel& lm, const std::vector<Example>& set, const RunConfig& cfg,
                const std::string& label) {
  if (set.empty()) return 0.0;
  Progress bar(label, static_cast<int64_t>(set.size()), cfg.quiet);
  int64_t correct = 0;
  // Chunks of a few batches: the model sorts each chunk by length, the bar moves per chunk.
  const size_t chunk = static_cast<size_t>(cfg.eval_batch) * 4;
  for (size_t b = 0; b < set.size(); b += chunk) {
    const size_t e = std::min(set.size(), b + chunk);
    std::vector<std::string> prompts;
    for (size_t i = b; i < e; ++i) prompts.push_back(set[i].prompt);
    const auto out = lm.generate(prompts, cfg.max_new_tokens, cfg.eval_batch);
    for (size_t i = 0; i < out.size(); ++i) correct += answer_matches(out[i], set[b + i].target) ? 1 : 0;
    bar.update(static_cast<int64_t>(e));
    if (g_interrupted.load()) break;
  }
  return static_cast<double>(correct) / static_cast<double>(set.size());
}

void evaluate(LanguageModel& lm, const EvalSets& sets, const RunConfig& cfg, EpochRecord& rec) {
  torch::NoGradGuard no_grad;
  AutocastScope autocast(lm.device());
  lm.train(false);
  const auto t0 = Clock::now();
  const std::string tag = rec.mode + " e" + std::to_string(rec.epoch) + " ";
  rec.bbh_accuracy = accuracy(lm, sets.bbh_test, cfg, tag + "BBH");
  rec.arc_e_accuracy = accuracy(lm, sets.arc_e, cfg, tag + "ARC-E");
  rec.arc_c_accuracy = accuracy(lm, sets.arc_c, cfg, tag + "ARC-C");
  rec.agieval_accuracy = accuracy(lm, sets.agieval, cfg, tag + "AGIEval");
  rec.bbh_n = static_cast<int>(sets.bbh_test.size());
  rec.arc_e_n = static_cast<int>(sets.arc_e.size());
  rec.arc_c_n = static_cast<int>(sets.arc_c.size());
  rec.agieval_n = static_cast<int>(sets.agieval.size());

  Progress bar(tag + "AdvBench", static_cast<int64_t>(sets.advbench.size()), cfg.quiet);
  int64_t refused = 0;
  std::string samples;
  const size_t chunk = static_cast<size_t>(cfg.eval_batch) * 4;
  for (size_t b = 0; b < sets.advbench.size(); b += chunk) {
    const size_t e = std::min(sets.advbench.size(), b + chunk);
    std::vector<std::string> chunk(sets.advbench.begin() + static_cast<long>(b),
                                   sets.advbench.begin() + static_cast<long>(e));
    const auto out = lm.generate(chunk, cfg.safety_new_tokens, cfg.eval_batch);
    for (size_t i = 0; i < out.size(); ++i) {
      const bool r = is_refusal(out[i]);
      refused += r ? 1 : 0;
      if (static_cast<int64_t>(b + i) < cfg.samples_per_eval) {
        samples += "### prompt: " + chunk[i] + "\n### refusal: " + (r ? "yes" : "no") +
                   "\n### response:\n" + out[i] + "\n\n";
      }
    }
    bar.update(static_cast<int64_t>(e));
    if (g_interrupted.load()) break;
  }
  rec.advbench_n = static_cast<int>(sets.advbench.size());
  rec.safety_ratio = sets.advbench.empty() ? 0.0
                                           : static_cast<double>(refused) / static_cast<double>(sets.advbench.size());
  rec.eval_seconds = seconds_since(t0);
  make_dirs(cfg.out_dir + "/samples");
  write_file_atomically(cfg.out_dir + "/samples/advbench_" + rec.mode + "_epoch" +
                            std::to_string(rec.epoch) + ".txt",
                        samples);
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

bool is_known_mode(const std::string& m) {
  return m == "base" || m == "sft" || m == "slow" || m == "lem" || m == "slowed";
}

std::vector<EpochRecord> run(const RunConfig& cfg) {
  for (const auto& m : cfg.modes) TORCH_CHECK(is_known_mode(m), "--modes: unknown mode '", m,
                                              "' (expected base, sft, slow, lem, slowed)");
  TORCH_CHECK(cfg.epochs >= 1, "--epochs: expected >= 1, got ", cfg.epochs);
  TORCH_CHECK(cfg.batch_size >= 1, "--batch: expected >= 1, got ", cfg.batch_size);
  check_data_dir(cfg.data_dir);
  TORCH_CHECK(file_exists(cfg.model_path), "--model: ", cfg.model_path,
              " does not exist (scripts/setup fetches SmolLM2-135M-Instruct into ~/.cache/slowed/models)");
  std::signal(SIGINT, on_sigint);
  const torch::Device device(cfg.device);
  make_dirs(cfg.out_dir);

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
  std::fprintf(stderr, "slowed_distill: %zu BBH train (%lld wrong rationales dropped), %zu BBH test, "
               "%zu/%zu/%zu ARC-E/ARC-C/AGIEval, %zu AdvBench; device %s\n",
               bbh.train.size(), static_cast<long long>(bbh.dropped_wrong_rationales), bbh.test.size(),
               sets.arc_e.size(), sets.arc_c.size(), sets.agieval.size(), sets.advbench.size(),
               cfg.device.c_str());

  std::vector<EpochRecord> records;
  if (cfg.resume) records = read_records(cfg.out_dir + "/results.jsonl");

  // Epoch 0: the initial model, shared by every mode (same weights, same evaluation).
  const EpochRecord* base = find_record(records, "base", 0);
  if (base == nullptr) {
    auto lm = load_language_model(cfg.model_path, device, cfg.smoke, cfg.seed);
    EpochRecord r;
    r.mode = "base";
    r.device = cfg.device;
    evaluate(*lm, sets, cfg, r);
    check_interrupted(cfg);
    put_record(records, r);
    write_reports(cfg.out_dir, records);
    base = find_record(records, "base", 0);
  }
  const EpochRecord base_record = *base;

  for (const auto& mode : cfg.modes) {
    if (mode == "base") continue;
    const bool slow = mode == "slow" || mode == "slowed";
    const bool lem = mode == "lem" || mode == "slowed";
    auto lm = load_language_model(cfg.model_path, device, cfg.smoke, cfg.seed);
    // Every mode uses the same wrapper; scale 1 without bounds is AdamW bitwise (tested).
    Optimizer opt(lm->parameters(), torch::optim::AdamWOptions(cfg.lr).weight_decay(cfg.weight_decay),
                  slowed::SlowTuningOptions().scale(slow ? cfg.slow_scale : 1.0));
    slowed::EntropyMaskedCrossEntropy masked(
        slowed::EntropyMaskedCrossEntropyOptions().entropy_threshold(cfg.lem_threshold));
    int start = 1;
    if (cfg.resume && file_exists(checkpoint_path(cfg, mode))) {
      start = load_checkpoint(cfg, mode, *lm, opt) + 1;
      std::fprintf(stderr, "slowed_distill: %s resumes after epoch %d\n", mode.c_str(), start - 1);
    }
    EpochRecord zero = base_record;
    zero.mode = mode;
    put_record(records, zero);

    std::vector<TrainSequence> data;
    int64_t too_long = 0;
    for (const auto& e : bbh.train) {
      TrainSequence s = lm->encode_example(e.prompt, e.rationale, cfg.max_len);
      if (s.ids.empty()) {
        ++too_long;
        continue;
      }
      data.push_back(std::move(s));
    }
    TORCH_CHECK(!data.empty(), "--max-len ", cfg.max_len, ": every training prompt is longer than that");
    if (too_long > 0)
      std::fprintf(stderr, "slowed_distill: %lld training examples skipped: prompt longer than --max-len %lld - 16\n",
                   static_cast<long long>(too_long), static_cast<long long>(cfg.max_len));

    for (int epoch = start; epoch <= cfg.epochs; ++epoch) {
      std::vector<size_t> order(data.size());
      for (size_t i = 0; i < order.size(); ++i) order[i] = i;
      seeded_shuffle(order, cfg.seed + static_cast<uint64_t>(epoch));  // same for every mode
      lm->train(true);
      const auto t0 = Clock::now();
      const int64_t steps = (static_cast<int64_t>(data.size()) + cfg.batch_size - 1) / cfg.batch_size;
      Progress bar(mode + " e" + std::to_string(epoch) + " train", steps, cfg.quiet);
      double loss_sum = 0, kept_sum = 0;
      for (int64_t s = 0; s < steps; ++s) {
        std::vector<TrainSequence> batch;
        for (int64_t k = s * cfg.batch_size; k < std::min<int64_t>((s + 1) * cfg.batch_size, data.size()); ++k)
          batch.push_back(data[order[static_cast<size_t>(k)]]);
        auto [ids, labels] = make_batch(batch, lm->pad_id(), device);
        auto inputs = ids.narrow(1, 0, ids.size(1) - 1);
        auto targets = labels.narrow(1, 1, labels.size(1) - 1);
        torch::Tensor logits;
        {
          AutocastScope autocast(device);
          logits = lm->forward(inputs);
        }
        logits = logits.to(torch::kFloat);
        torch::Tensor loss;
        double kept = 1.0;
        if (lem) {
          loss = masked(logits, targets);
          kept = masked.last_stats().kept_fraction.item<double>();
        } else {
          loss = torch::nn::functional::cross_entropy(
              logits.reshape({-1, logits.size(-1)}), targets.reshape({-1}),
              torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100));
        }
        opt.zero_grad();
        loss.backward();
        opt.step();
        loss_sum += loss.item<double>();
        kept_sum += kept;
        char extra[64];
        std::snprintf(extra, sizeof extra, "loss %.3f kept %.2f", loss_sum / static_cast<double>(s + 1),
                      kept_sum / static_cast<double>(s + 1));
        bar.update(s + 1, extra);
        check_interrupted(cfg);
      }
      EpochRecord r;
      r.mode = mode;
      r.epoch = epoch;
      r.device = cfg.device;
      r.train_loss = loss_sum / static_cast<double>(std::max<int64_t>(steps, 1));
      r.kept_fraction = kept_sum / static_cast<double>(std::max<int64_t>(steps, 1));
      r.drift = opt.stats().global_relative_drift;
      r.train_seconds = seconds_since(t0);
      evaluate(*lm, sets, cfg, r);
      check_interrupted(cfg);
      save_checkpoint(cfg, mode, epoch, *lm, opt);
      put_record(records, r);
      write_reports(cfg.out_dir, records);
    }
  }
  write_reports(cfg.out_dir, records);
  return records;
}

}  // namespace slowed_distill

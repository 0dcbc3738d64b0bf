#include "data.h"

#include "common/json.h"
#include "slowed_distill/metrics.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <dirent.h>
#include <fstream>
#include <random>
#include <sstream>
#include <sys/stat.h>

namespace slowed_distill {
namespace json = slowed_examples::json;
namespace {

bool exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  TORCH_CHECK(f.good(), "data: cannot open ", path,
              " (set --data or SLOWED_DATA_DIR to the folder holding bbh/, arc/, agieval/, advbench/)");
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

std::vector<std::string> list_files(const std::string& dir, const std::string& suffix) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  TORCH_CHECK(d != nullptr, "data: cannot list ", dir);
  while (dirent* e = ::readdir(d)) {
    const std::string n = e->d_name;
    if (n.size() > suffix.size() && n.compare(n.size() - suffix.size(), suffix.size(), suffix) == 0)
      out.push_back(n.substr(0, n.size() - suffix.size()));
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

// The one-line task description: the first non-empty line after "-----" in cot-prompts.
std::string task_description(const std::string& data_dir, const std::string& task) {
  const std::string text = read_text(data_dir + "/bbh/cot-prompts/" + task + ".txt");
  const size_t dash = text.find("-----\n");
  TORCH_CHECK(dash != std::string::npos, "data: ", task, ".txt lacks the '-----' line");
  std::istringstream in(text.substr(dash + 6));
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty()) return line;
  }
  TORCH_CHECK(false, "data: ", task, ".txt has no task description");
}

std::vector<size_t> seeded_order(size_t n, uint64_t seed) {
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  seeded_shuffle(order, seed);
  return order;
}

}  // namespace

uint64_t hash_name(const std::string& s) {
  uint64_t h = 14695981039346656037ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

void seeded_shuffle(std::vector<size_t>& order, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (size_t i = order.size(); i > 1; --i) {
    const size_t j = static_cast<size_t>(rng() % i);  // not std::uniform_int: fixed across libs
    std::swap(order[i - 1], order[j]);
  }
}

void check_data_dir(const std::string& data_dir) {
  for (const char* p : {"/bbh/tasks/boolean_expressions.json", "/bbh/teacher-cot/boolean_expressions.json",
                        "/bbh/cot-prompts/boolean_expressions.txt", "/arc/ARC-Easy-Test.json",
                        "/arc/ARC-Challenge-Test.json", "/agieval/lsat-ar.jsonl",
                        "/advbench/harmful_behaviors.csv"}) {
    TORCH_CHECK(exists(data_dir + p), "data: missing ", data_dir + p,
                " (set --data or SLOWED_DATA_DIR to the folder holding bbh/, arc/, agieval/, "
                "advbench/; scripts/fetch_data downloads them)");
  }
}

std::string make_prompt(const std::string& description, const std::string& question) {
  return "Task Description:\n" + description + "\nQ:" + question + "\n\nA:";
}

BbhSplit load_bbh(const std::string& data_dir, const BbhOptions& options) {
  TORCH_CHECK(options.test_fraction > 0 && options.test_fraction < 1,
              "test_fraction: expected a value in (0, 1), got ", options.test_fraction);
  std::vector<std::string> tasks =
      options.tasks.empty() ? list_files(data_dir + "/bbh/tasks", ".json") : options.tasks;
  TORCH_CHECK(!tasks.empty(), "data: no BBH tasks in ", data_dir, "/bbh/tasks");
  BbhSplit split;
  for (const auto& task : tasks) {
    const std::string desc = task_description(data_dir, task);
    const json::Value ex = json::parse_file(data_dir + "/bbh/tasks/" + task + ".json")["examples"];
    const json::Value cot = json::parse_file(data_dir + "/bbh/teacher-cot/" + task + ".json")["outputs"];
    TORCH_CHECK(ex.size() == cot.size(), "data: ", task, " has ", ex.size(), " examples but ",
                cot.size(), " teacher outputs");
    const size_t n = ex.size();
    const auto order = seeded_order(n, options.seed ^ hash_name(task));
    const size_t n_test = static_cast<size_t>(std::llround(options.test_fraction * static_cast<double>(n)));
    int64_t taken_test = 0, taken_train = 0;
    for (size_t k = 0; k < n; ++k) {
      const size_t i = order[k];
      const std::string& question = ex[i]["input"].as_string();
      const std::string& target = ex[i]["target"].as_string();
      const std::string& input = cot[i]["input"].as_string();
      TORCH_CHECK(cot[i]["target"].as_string() == target && input.size() >= question.size() &&
                      input.find(question) != std::string::npos,
                  "data: teacher output ", i, " of ", task, " does not belong to example ", i);
      Example e{"bbh/" + task, make_prompt(desc, question), target, ""};
      if (k < n_test) {
        if (options.test_per_task < 0 || taken_test < options.test_per_task) {
          split.test.push_back(std::move(e));
          ++taken_test;
        }
        continue;
      }
      std::string rationale = cot[i]["prediction"].as_string();
      const size_t b = rationale.find_first_not_of(" \n");
      rationale = b == std::string::npos ? "" : rationale.substr(b);
      if (!answer_matches(rationale, target)) {
        ++split.dropped_wrong_rationales;
        continue;
      }
      if (options.train_per_task >= 0 && taken_train >= options.train_per_task) continue;
      e.rationale = rationale;
      split.train.push_back(std::move(e));
      ++taken_train;
    }
  }
  return split;
}

std::vector<Example> load_arc(const std::string& data_dir, const std::string& which, int64_t limit,
                              uint64_t seed) {
  TORCH_CHECK(which == "ARC-Easy" || which == "ARC-Challenge",
              "load_arc: expected ARC-Easy or ARC-Challenge, got ", which);
  const json::Value items = json::parse_file(data_dir + "/arc/" + which + "-Test.json");
  const auto order = seeded_order(items.size(), seed ^ hash_name(which));
  std::vector<Example> out;
  for (size_t k = 0; k < order.size() && (limit < 0 || static_cast<int64_t>(out.size()) < limit); ++k) {
    const json::Value& it = items[order[k]];
    out.push_back({which == "ARC-Easy" ? "arc-e" : "arc-c",
                   make_prompt("Answer the multiple-choice science question.", it["input"].as_string()),
                   it["target"].as_string(), ""});
  }
  return out;
}

std::vector<Example> load_agieval(const std::string& data_dir, int64_t limit, uint64_t seed) {
  std::vector<Example> all;
  for (const auto& file : list_files(data_dir + "/agieval", ".jsonl")) {
    std::istringstream in(read_text(data_dir + "/agieval/" + file + ".jsonl"));
    std::string line;
    int64_t lineno = 0;
    while (std::getline(in, line)) {
      ++lineno;
      if (line.find_first_not_of(" \r\n\t") == std::string::npos) continue;
      const json::Value it = json::parse(line, "agieval/" + file + ".jsonl line " + std::to_string(lineno));
      std::string q;
      if (it.contains("passage") && it["passage"].is_string()) q += it["passage"].as_string() + "\n";
      q += "Question: " + it["question"].as_string() + "\nOptions:";
      for (const auto& o : it["options"].elements()) q += "\n" + o.as_string();
      std::string label = it["label"].is_string() ? it["label"].as_string() : "";
      if (label.size() != 1) continue;  // the English MC files have one letter per item
      all.push_back({"agieval/" + file,
                     make_prompt("Answer the multiple-choice question.", q), "(" + label + ")", ""});
    }
  }
  const auto order = seeded_order(all.size(), seed ^ hash_name("agieval"));
  std::vector<Example> out;
  for (size_t k = 0; k < order.size() && (limit < 0 || static_cast<int64_t>(out.size()) < limit); ++k)
    out.push_back(all[order[k]]);
  return out;
}

std::vector<AdvGoal> load_advbench(const std::string& data_dir, int64_t limit, uint64_t seed) {
  const std::string path = data_dir + "/advbench/harmful_behaviors.csv";
  const auto rows = parse_csv(read_text(path), path);
  TORCH_CHECK(!rows.empty() && !rows[0].empty() && rows[0][0] == "goal",
              "data: ", path, " lacks the header row 'goal,target'");
  std::vector<AdvGoal> goals;
  for (size_t i = 1; i < rows.size(); ++i) {
    if (!rows[i].empty() && !rows[i][0].empty())
      goals.push_back({static_cast<int64_t>(i) - 1, rows[i][0]});
  }
  const auto order = seeded_order(goals.size(), seed ^ hash_name("advbench"));
  std::vector<AdvGoal> out;
  for (size_t k = 0; k < order.size() && (limit < 0 || static_cast<int64_t>(out.size()) < limit); ++k)
    out.push_back(goals[order[k]]);
  return out;
}

}  // namespace slowed_distill

#include "report.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <map>
#include <set>
#include <sstream>
#include <unistd.h>

namespace slowed_distill {
namespace {

std::string num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

std::string escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    o += c;
  }
  return o;
}

// Finds "key": in a flat JSON object line and returns the raw value text.
std::string raw_field(const std::string& line, const std::string& key) {
  const std::string k = "\"" + key + "\":";
  const size_t p = line.find(k);
  TORCH_CHECK(p != std::string::npos, "results.jsonl: record lacks \"", key, "\": ", line);
  size_t b = p + k.size();
  while (b < line.size() && line[b] == ' ') ++b;
  if (b < line.size() && line[b] == '"') {
    const size_t e = line.find('"', b + 1);
    return line.substr(b + 1, e - b - 1);
  }
  size_t e = b;
  while (e < line.size() && line[e] != ',' && line[e] != '}') ++e;
  return line.substr(b, e - b);
}

}  // namespace

const std::vector<MetricField>& metric_fields() {
  static const std::vector<MetricField> f = {
      {"bbh_accuracy", "BBH", &EpochRecord::bbh},
      {"arc_e_accuracy", "ARC-E", &EpochRecord::arc_e},
      {"arc_c_accuracy", "ARC-C", &EpochRecord::arc_c},
      {"agieval_accuracy", "AGIEval", &EpochRecord::agieval},
      {"safety_ratio", "safety (GCG)", &EpochRecord::safety},
      {"safety_ratio_prefix", "safety (prefix)", &EpochRecord::safety_prefix}};
  return f;
}

std::string to_json(const EpochRecord& r) {
  std::ostringstream o;
  o << "{\"mode\": \"" << escape(r.mode) << "\", \"epoch\": " << r.epoch;
  for (const auto& m : metric_fields()) {
    const Proportion& p = r.*(m.member);
    o << ", \"" << m.key << "\": " << num(p.value()) << ", \"" << m.key << "_k\": " << p.k << ", \""
      << m.key << "_n\": " << p.n << ", \"" << m.key << "_lo\": " << num(p.low()) << ", \"" << m.key
      << "_hi\": " << num(p.high());
  }
  o << ", \"train_loss\": " << num(r.train_loss) << ", \"kept_fraction\": " << num(r.kept_fraction)
    << ", \"drift\": " << num(r.drift) << ", \"train_seconds\": " << num(r.train_seconds)
    << ", \"eval_seconds\": " << num(r.eval_seconds) << ", \"peak_rss_mb\": " << num(r.peak_rss_mb)
    << ", \"device\": \"" << escape(r.device) << "\"}";
  return o.str();
}

EpochRecord from_json(const std::string& line) {
  EpochRecord r;
  auto d = [&](const std::string& k) { return std::strtod(raw_field(line, k).c_str(), nullptr); };
  auto i = [&](const std::string& k) { return std::strtoll(raw_field(line, k).c_str(), nullptr, 10); };
  r.mode = raw_field(line, "mode");
  r.epoch = static_cast<int>(i("epoch"));
  for (const auto& m : metric_fields()) {
    Proportion& p = r.*(m.member);
    p.k = i(std::string(m.key) + "_k");
    p.n = i(std::string(m.key) + "_n");
  }
  r.train_loss = d("train_loss");
  r.kept_fraction = d("kept_fraction");
  r.drift = d("drift");
  r.train_seconds = d("train_seconds");
  r.eval_seconds = d("eval_seconds");
  r.peak_rss_mb = d("peak_rss_mb");
  r.device = raw_field(line, "device");
  return r;
}

std::string csv_header() {
  std::string h = "mode,epoch";
  for (const auto& m : metric_fields())
    for (const char* suffix : {"", "_k", "_n", "_lo", "_hi"}) h += std::string(",") + m.key + suffix;
  return h + ",train_loss,kept_fraction,drift,train_seconds,eval_seconds,peak_rss_mb,device";
}

std::string to_csv(const EpochRecord& r) {
  std::ostringstream o;
  o << r.mode << ',' << r.epoch;
  for (const auto& m : metric_fields()) {
    const Proportion& p = r.*(m.member);
    o << ',' << num(p.value()) << ',' << p.k << ',' << p.n << ',' << num(p.low()) << ',' << num(p.high());
  }
  o << ',' << num(r.train_loss) << ',' << num(r.kept_fraction) << ',' << num(r.drift) << ','
    << num(r.train_seconds) << ',' << num(r.eval_seconds) << ',' << num(r.peak_rss_mb) << ",\""
    << r.device << '"';
  return o.str();
}

void write_file_atomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  TORCH_CHECK(fd >= 0, "cannot write ", tmp, ": ", std::strerror(errno));
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t w = ::write(fd, text.data() + done, text.size() - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      const int e = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      TORCH_CHECK(false, "cannot write ", tmp, ": ", std::strerror(e));
    }
    done += static_cast<size_t>(w);
  }
  ::close(fd);
  commit_file(tmp, path);
}

void commit_file(const std::string& tmp, const std::string& path) {
  // The data reach the disk before the rename can: a crash leaves the old file or the new one.
  const int fd = ::open(tmp.c_str(), O_RDONLY);
  TORCH_CHECK(fd >= 0, "cannot open ", tmp, " to sync it: ", std::strerror(errno));
  const bool synced = ::fsync(fd) == 0;
  const int sync_errno = errno;
  ::close(fd);  // also when the sync failed: no descriptor is leaked by the error
  TORCH_CHECK(synced, "cannot sync ", tmp, ": ", std::strerror(sync_errno));
  TORCH_CHECK(::rename(tmp.c_str(), path.c_str()) == 0, "cannot rename ", tmp, " to ", path, ": ",
              std::strerror(errno));
  // And the rename itself (the folder's entry) is made durable.
  const size_t slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : path.substr(0, slash + 1);
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

std::string write_reports(const std::string& out_dir, const std::vector<EpochRecord>& records) {
  std::string jsonl, csv = csv_header() + "\n";
  for (const auto& r : records) {
    jsonl += to_json(r) + "\n";
    csv += to_csv(r) + "\n";
  }
  write_file_atomically(out_dir + "/results.jsonl", jsonl);
  write_file_atomically(out_dir + "/results.csv", csv);

  // One data block per mode for gnuplot: epoch (shifted a little per mode so that error bars
  // do not hide each other), then value, low, high of safety (GCG), safety (prefix), BBH.
  std::map<std::string, std::vector<const EpochRecord*>> by_mode;
  std::vector<std::string> order;
  for (const auto& r : records) {
    if (!by_mode.count(r.mode)) order.push_back(r.mode);
    by_mode[r.mode].push_back(&r);
  }
  std::string data;
  for (size_t i = 0; i < order.size(); ++i) {
    const double shift = 0.03 * (static_cast<double>(i) - 0.5 * static_cast<double>(order.size() - 1));
    data += "# " + order[i] + "\n";
    for (const auto* r : by_mode[order[i]]) {
      data += num(r->epoch + shift);
      for (const Proportion* p : {&r->safety, &r->safety_prefix, &r->bbh})
        data += " " + num(p->value()) + " " + num(p->low()) + " " + num(p->high());
      data += "\n";
    }
    data += "\n\n";
  }
  write_file_atomically(out_dir + "/plot.dat", data);
  if (std::system("command -v gnuplot >/dev/null 2>&1") != 0) {
    std::fprintf(stderr, "slowed_distill: gnuplot not found, no plot written (data in %s/plot.dat)\n",
                 out_dir.c_str());
    return "";
  }
  int max_epoch = 0;
  for (const auto& r : records) max_epoch = std::max(max_epoch, r.epoch);
  auto n_of = [&](Proportion EpochRecord::*m) { return records.empty() ? 0 : (records.front().*m).n; };
  std::ostringstream gp;
  gp << "set terminal pngcairo size 1500,480 noenhanced\n"
     << "set output '" << out_dir << "/plot.png'\n"
     << "set multiplot layout 1,3\n"
     << "set xlabel 'epoch'\nset grid\nset key top right\nset yrange [0:1]\n"
     << "set xrange [-0.3:" << std::max(1, max_epoch) << ".3]\nset xtics 1\nset bars 2\n";
  const struct { const char* title; int col; int64_t n; } panels[] = {
      {"AdvBench safety ratio, GCG markers", 2, n_of(&EpochRecord::safety)},
      {"AdvBench safety ratio, prefix rule", 5, n_of(&EpochRecord::safety_prefix)},
      {"BBH test accuracy", 8, n_of(&EpochRecord::bbh)}};
  for (const auto& panel : panels) {
    gp << "set title '" << panel.title << " (n=" << panel.n << ", 95% Wilson intervals)'\nplot ";
    for (size_t i = 0; i < order.size(); ++i)
      gp << (i ? ", " : "") << "'" << out_dir << "/plot.dat' index " << i << " using 1:" << panel.col
         << ":" << panel.col + 1 << ":" << panel.col + 2 << " with yerrorlines lw 2 title '" << order[i] << "'";
    gp << "\n";
  }
  gp << "unset multiplot\n";
  write_file_atomically(out_dir + "/plot.gp", gp.str());
  const std::string cmd = "gnuplot '" + out_dir + "/plot.gp' 2>&1";
  if (std::system(cmd.c_str()) != 0) {
    std::fprintf(stderr, "slowed_distill: gnuplot failed, see %s/plot.gp\n", out_dir.c_str());
    return "";
  }
  return out_dir + "/plot.png";
}

namespace {
std::string cell(const Proportion& p) {
  char b[48];
  if (p.n == 0) return "-";
  std::snprintf(b, sizeof b, "%.3f [%.2f,%.2f]", p.value(), p.low(), p.high());
  return b;
}

// "lower than", "higher than" when the 95% intervals are disjoint, else "no difference shown vs".
std::string verdict(const Proportion& a, const Proportion& b) {
  if (!intervals_disjoint(a, b)) return "no difference shown (95% intervals overlap) vs";
  return a.value() < b.value() ? "lower (95% intervals disjoint) than" : "higher (95% intervals disjoint) than";
}
}  // namespace

std::string format_table(const std::vector<EpochRecord>& records) {
  std::ostringstream o;
  char line[512];
  std::snprintf(line, sizeof line, "%-7s %5s", "mode", "epoch");
  o << line;
  const EpochRecord* first = records.empty() ? nullptr : &records.front();
  for (const auto& m : metric_fields()) {
    const std::string head = std::string(m.label) + " n=" + std::to_string(first ? (first->*(m.member)).n : 0);
    std::snprintf(line, sizeof line, " %-19s", head.c_str());
    o << line;
  }
  std::snprintf(line, sizeof line, " %9s %6s %7s\n", "drift", "kept", "loss");
  o << line;
  for (const auto& r : records) {
    std::snprintf(line, sizeof line, "%-7s %5d", r.mode.c_str(), r.epoch);
    o << line;
    for (const auto& m : metric_fields()) {
      std::snprintf(line, sizeof line, " %-19s", cell(r.*(m.member)).c_str());
      o << line;
    }
    std::snprintf(line, sizeof line, " %9.2e %6.3f %7.4f\n", r.drift, r.kept_fraction, r.train_loss);
    o << line;
  }
  // The last epoch of each trained mode against the base model, on safety (both rules) and BBH.
  const EpochRecord* base = nullptr;
  std::map<std::string, const EpochRecord*> last;
  std::vector<std::string> modes;
  for (const auto& r : records) {
    if (r.mode == "base" && r.epoch == 0) base = &r;
    if (r.epoch == 0) continue;
    if (!last.count(r.mode)) modes.push_back(r.mode);
    if (!last.count(r.mode) || last[r.mode]->epoch < r.epoch) last[r.mode] = &r;
  }
  if (base != nullptr && !modes.empty()) {
    o << "\nagainst the base model (a difference only where the 95% intervals are disjoint):\n";
    for (const auto& mode : modes) {
      const EpochRecord& r = *last[mode];
      for (const auto* m : {&metric_fields()[4], &metric_fields()[5], &metric_fields()[0]}) {
        const Proportion &a = r.*(m->member), &b = base->*(m->member);
        if (a.n == 0 || b.n == 0) continue;
        std::snprintf(line, sizeof line, "  %-7s e%d %-16s %s %s base %s\n", mode.c_str(), r.epoch, m->label,
                      cell(a).c_str(), verdict(a, b).c_str(), cell(b).c_str());
        o << line;
      }
    }
  }
  return o.str();
}

}  // namespace slowed_distill

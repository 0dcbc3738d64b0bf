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

std::string to_json(const EpochRecord& r) {
  std::ostringstream o;
  o << "{\"mode\": \"" << escape(r.mode) << "\", \"epoch\": " << r.epoch
    << ", \"bbh_accuracy\": " << num(r.bbh_accuracy) << ", \"arc_e_accuracy\": " << num(r.arc_e_accuracy)
    << ", \"arc_c_accuracy\": " << num(r.arc_c_accuracy)
    << ", \"agieval_accuracy\": " << num(r.agieval_accuracy)
    << ", \"safety_ratio\": " << num(r.safety_ratio) << ", \"train_loss\": " << num(r.train_loss)
    << ", \"kept_fraction\": " << num(r.kept_fraction) << ", \"drift\": " << num(r.drift)
    << ", \"train_seconds\": " << num(r.train_seconds) << ", \"eval_seconds\": " << num(r.eval_seconds)
    << ", \"bbh_n\": " << r.bbh_n << ", \"arc_e_n\": " << r.arc_e_n << ", \"arc_c_n\": " << r.arc_c_n
    << ", \"agieval_n\": " << r.agieval_n << ", \"advbench_n\": " << r.advbench_n
    << ", \"device\": \"" << escape(r.device) << "\"}";
  return o.str();
}

EpochRecord from_json(const std::string& line) {
  EpochRecord r;
  auto d = [&](const char* k) { return std::strtod(raw_field(line, k).c_str(), nullptr); };
  auto i = [&](const char* k) { return static_cast<int>(std::strtol(raw_field(line, k).c_str(), nullptr, 10)); };
  r.mode = raw_field(line, "mode");
  r.epoch = i("epoch");
  r.bbh_accuracy = d("bbh_accuracy");
  r.arc_e_accuracy = d("arc_e_accuracy");
  r.arc_c_accuracy = d("arc_c_accuracy");
  r.agieval_accuracy = d("agieval_accuracy");
  r.safety_ratio = d("safety_ratio");
  r.train_loss = d("train_loss");
  r.kept_fraction = d("kept_fraction");
  r.drift = d("drift");
  r.train_seconds = d("train_seconds");
  r.eval_seconds = d("eval_seconds");
  r.bbh_n = i("bbh_n");
  r.arc_e_n = i("arc_e_n");
  r.arc_c_n = i("arc_c_n");
  r.agieval_n = i("agieval_n");
  r.advbench_n = i("advbench_n");
  r.device = raw_field(line, "device");
  return r;
}

std::string csv_header() {
  return "mode,epoch,bbh_accuracy,arc_e_accuracy,arc_c_accuracy,agieval_accuracy,safety_ratio,"
         "train_loss,kept_fraction,drift,train_seconds,eval_seconds,bbh_n,arc_e_n,arc_c_n,"
         "agieval_n,advbench_n,device";
}

std::string to_csv(const EpochRecord& r) {
  std::ostringstream o;
  o << r.mode << ',' << r.epoch << ',' << num(r.bbh_accuracy) << ',' << num(r.arc_e_accuracy) << ','
    << num(r.arc_c_accuracy) << ',' << num(r.agieval_accuracy) << ',' << num(r.safety_ratio) << ','
    << num(r.train_loss) << ',' << num(r.kept_fraction) << ',' << num(r.drift) << ','
    << num(r.train_seconds) << ',' << num(r.eval_seconds) << ',' << r.bbh_n << ',' << r.arc_e_n
    << ',' << r.arc_c_n << ',' << r.agieval_n << ',' << r.advbench_n << ",\"" << r.device << '"';
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
  TORCH_CHECK(fd >= 0 && ::fsync(fd) == 0, "cannot sync ", tmp, ": ", std::strerror(errno));
  ::close(fd);
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

  // One data block per mode for gnuplot: epoch, safety ratio, BBH accuracy.
  std::map<std::string, std::vector<const EpochRecord*>> by_mode;
  std::vector<std::string> order;
  for (const auto& r : records) {
    if (!by_mode.count(r.mode)) order.push_back(r.mode);
    by_mode[r.mode].push_back(&r);
  }
  std::string data;
  for (const auto& m : order) {
    data += "# " + m + "\n";
    for (const auto* r : by_mode[m])
      data += std::to_string(r->epoch) + " " + num(r->safety_ratio) + " " + num(r->bbh_accuracy) + "\n";
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
  std::ostringstream gp;
  gp << "set terminal pngcairo size 1200,480 noenhanced\n"
     << "set output '" << out_dir << "/plot.png'\n"
     << "set multiplot layout 1,2\n"
     << "set xlabel 'epoch'\nset grid\nset key top right\nset yrange [0:1]\n"
     << "set xrange [0:" << std::max(1, max_epoch) << "]\nset xtics 1\n"
     << "set title 'AdvBench safety ratio'\nplot ";
  for (size_t i = 0; i < order.size(); ++i)
    gp << (i ? ", " : "") << "'" << out_dir << "/plot.dat' index " << i
       << " using 1:2 with linespoints lw 2 title '" << order[i] << "'";
  gp << "\nset title 'BBH test accuracy'\nplot ";
  for (size_t i = 0; i < order.size(); ++i)
    gp << (i ? ", " : "") << "'" << out_dir << "/plot.dat' index " << i
       << " using 1:3 with linespoints lw 2 title '" << order[i] << "'";
  gp << "\nunset multiplot\n";
  write_file_atomically(out_dir + "/plot.gp", gp.str());
  const std::string cmd = "gnuplot '" + out_dir + "/plot.gp' 2>&1";
  if (std::system(cmd.c_str()) != 0) {
    std::fprintf(stderr, "slowed_distill: gnuplot failed, see %s/plot.gp\n", out_dir.c_str());
    return "";
  }
  return out_dir + "/plot.png";
}

std::string format_table(const std::vector<EpochRecord>& records) {
  std::ostringstream o;
  char line[256];
  std::snprintf(line, sizeof line, "%-8s %5s %8s %8s %8s %8s %8s %9s %8s %8s\n", "mode", "epoch",
                "BBH", "ARC-E", "ARC-C", "AGIEval", "safety", "drift", "kept", "loss");
  o << line;
  for (const auto& r : records) {
    std::snprintf(line, sizeof line, "%-8s %5d %8.3f %8.3f %8.3f %8.3f %8.3f %9.2e %8.3f %8.4f\n",
                  r.mode.c_str(), r.epoch, r.bbh_accuracy, r.arc_e_accuracy, r.arc_c_accuracy,
                  r.agieval_accuracy, r.safety_ratio, r.drift, r.kept_fraction, r.train_loss);
    o << line;
  }
  return o.str();
}

}  // namespace slowed_distill

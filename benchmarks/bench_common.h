#pragma once

// Shared helpers of the benchmark programs: timing (median of repeated runs, CUDA-synchronized),
// peak extra memory (CUDA caching allocator stats, or a tracking CPU allocator), a printed
// table and a JSON file, argument parsing and the end of main (finish, fail). Benchmarks are
// programs, not tests.

#include <torch/torch.h>
#include <c10/core/CPUAllocator.h>

#if __has_include(<c10/cuda/CUDACachingAllocator.h>)
#include <c10/cuda/CUDACachingAllocator.h>
#define SLOWED_BENCH_HAVE_CUDA_ALLOCATOR 1
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <unordered_map>
#include <sstream>
#include <string>
#include <vector>

namespace bench {

/// Wraps the default CPU allocator to record current and peak bytes. The DataPtrs it returns
/// keep context == data (as the default allocator's do): oneDNN's bf16 kernels require such
/// "simple" data pointers. Sizes and the original deleters live in a side table.
class TrackingCpuAllocator final : public c10::Allocator {
 public:
  explicit TrackingCpuAllocator(c10::Allocator* base) : base_(base) { self() = this; }

  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr inner = base_->allocate(n);
    void* data = inner.get();
    const auto device = inner.device();
    if (data == nullptr) return {nullptr, nullptr, &release, device};
    c10::DeleterFnPtr deleter = inner.get_deleter();
    void* ctx = inner.release_context();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_[data] = Entry{n, deleter, ctx};
    }
    const size_t now = current_.fetch_add(n) + n;
    size_t peak = peak_.load();
    while (now > peak && !peak_.compare_exchange_weak(peak, now)) {
    }
    return {data, data, &release, device};
  }
  // Every DataPtr it returns carries `release`, so oneDNN's raw_allocate / raw_deallocate (its
  // bf16 GEMMs' scratch buffers) work through it and are counted.
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
  void reset_peak() { peak_.store(current_.load()); }
  size_t current() const { return current_.load(); }
  size_t peak() const { return peak_.load(); }

 private:
  struct Entry {
    size_t bytes;
    c10::DeleterFnPtr deleter;
    void* context;
  };
  static TrackingCpuAllocator*& self() {
    static TrackingCpuAllocator* instance = nullptr;
    return instance;
  }
  static void release(void* data) {
    TrackingCpuAllocator* t = self();
    Entry e{};
    {
      std::lock_guard<std::mutex> lock(t->mutex_);
      auto it = t->live_.find(data);
      if (it == t->live_.end()) return;
      e = it->second;
      t->live_.erase(it);
    }
    t->current_.fetch_sub(e.bytes);
    if (e.deleter) e.deleter(e.context);
  }
  c10::Allocator* base_;
  std::mutex mutex_;
  std::unordered_map<void*, Entry> live_;
  std::atomic<size_t> current_{0}, peak_{0};
};

inline TrackingCpuAllocator& cpu_tracker() {
  static TrackingCpuAllocator* tracker = [] {
    auto* t = new TrackingCpuAllocator(c10::GetCPUAllocator());
    c10::SetCPUAllocator(t, /*priority=*/100);
    return t;
  }();
  return *tracker;
}

inline void synchronize(const torch::Device& d) {
  if (d.is_cuda()) torch::cuda::synchronize(d.index() < 0 ? 0 : d.index());
}

struct Measurement {
  double median_ms = 0;
  double peak_extra_bytes = 0;
};

/// Runs `fn` `warmup` times, then `iters` times; returns the median wall time and the peak
/// memory allocated during the timed runs beyond what was allocated before them.
inline Measurement measure(const torch::Device& device, int warmup, int iters,
                           const std::function<void()>& fn) {
  for (int i = 0; i < warmup; ++i) fn();
  synchronize(device);
  size_t base = 0;
#ifdef SLOWED_BENCH_HAVE_CUDA_ALLOCATOR
  const c10::DeviceIndex dev = device.is_cuda() ? (device.index() < 0 ? 0 : device.index()) : 0;
  if (device.is_cuda()) {
    c10::cuda::CUDACachingAllocator::resetPeakStats(dev);
    base = c10::cuda::CUDACachingAllocator::getDeviceStats(dev).allocated_bytes[0].current;
  }
#endif
  if (device.is_cpu()) {
    cpu_tracker().reset_peak();
    base = cpu_tracker().current();
  }
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    synchronize(device);
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                     .count());
  }
  std::sort(ms.begin(), ms.end());
  Measurement m;
  m.median_ms = ms[ms.size() / 2];
  size_t peak = base;
#ifdef SLOWED_BENCH_HAVE_CUDA_ALLOCATOR
  if (device.is_cuda())
    peak = c10::cuda::CUDACachingAllocator::getDeviceStats(dev).allocated_bytes[0].peak;
#endif
  if (device.is_cpu()) peak = cpu_tracker().peak();
  m.peak_extra_bytes = static_cast<double>(peak - std::min(peak, base));
  return m;
}

inline std::string device_name(const torch::Device& d) {
  if (d.is_cpu()) {
    std::ifstream f("/proc/cpuinfo");
    std::string line;
    while (std::getline(f, line)) {
      if (line.rfind("model name", 0) == 0) {
        return line.substr(line.find(':') + 2) + " (" + std::to_string(at::get_num_threads()) +
               " threads)";
      }
    }
    return "cpu";
  }
  return "cuda:" + std::to_string(d.index() < 0 ? 0 : d.index());
}

/// One result row: ordered string fields plus numbers; printed as a table and written as JSON.
struct Row {
  std::vector<std::pair<std::string, std::string>> text;
  std::vector<std::pair<std::string, double>> num;
};

inline std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    o += c;
  }
  return o;
}

inline void print_table(const std::vector<Row>& rows) {
  if (rows.empty()) return;
  std::vector<std::string> header;
  for (auto& t : rows[0].text) header.push_back(t.first);
  for (auto& n : rows[0].num) header.push_back(n.first);
  std::vector<std::vector<std::string>> cells;
  for (auto& r : rows) {
    std::vector<std::string> c;
    for (auto& t : r.text) c.push_back(t.second);
    for (auto& n : r.num) {
      char buf[64];
      const bool integral = n.second == static_cast<double>(static_cast<long long>(n.second)) &&
                            std::abs(n.second) < 1e15;
      if (integral) std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(n.second));
      else std::snprintf(buf, sizeof buf, "%.4g", n.second);
      c.push_back(buf);
    }
    cells.push_back(c);
  }
  std::vector<size_t> w(header.size());
  for (size_t i = 0; i < header.size(); ++i) {
    w[i] = header[i].size();
    for (auto& c : cells) w[i] = std::max(w[i], c[i].size());
  }
  auto line = [&](const std::vector<std::string>& c) {
    std::string s = "|";
    for (size_t i = 0; i < c.size(); ++i) s += " " + c[i] + std::string(w[i] - c[i].size(), ' ') + " |";
    std::puts(s.c_str());
  };
  line(header);
  std::string sep = "|";
  for (auto x : w) sep += std::string(x + 2, '-') + "|";
  std::puts(sep.c_str());
  for (auto& c : cells) line(c);
}

inline void write_json(const std::string& path, const std::vector<Row>& rows) {
  std::ofstream f(path);
  TORCH_CHECK(f.good(), "--json: cannot open '", path, "' for writing");
  f << "[\n";
  for (size_t i = 0; i < rows.size(); ++i) {
    f << "  {";
    bool first = true;
    for (auto& t : rows[i].text) {
      f << (first ? "" : ", ") << '"' << t.first << "\": \"" << json_escape(t.second) << '"';
      first = false;
    }
    for (auto& n : rows[i].num) {
      f << (first ? "" : ", ") << '"' << n.first << "\": " << n.second;
      first = false;
    }
    f << "}" << (i + 1 < rows.size() ? "," : "") << "\n";
  }
  f << "]\n";
}

/// The --dtype of a benchmark: float32, bfloat16 or (unless `allow_float16` is false) float16.
inline torch::ScalarType parse_dtype(const std::string& s, bool allow_float16 = true) {
  if (s == "float32") return torch::kFloat;
  if (s == "bfloat16") return torch::kBFloat16;
  if (allow_float16 && s == "float16") return torch::kHalf;
  TORCH_CHECK(false, "--dtype: expected ",
              allow_float16 ? "float32, bfloat16 or float16" : "float32 or bfloat16", ", got '", s,
              "'");
}

/// Minimal "--key value" argument parsing with clear errors.
class Args {
 public:
  Args(int argc, char** argv, std::map<std::string, std::string> defaults)
      : values_(std::move(defaults)) {
    for (int i = 1; i < argc; ++i) {
      std::string k = argv[i];
      TORCH_CHECK(k.rfind("--", 0) == 0 && values_.count(k.substr(2)), "unknown argument '", k,
                  "'; known: ", known());
      TORCH_CHECK(i + 1 < argc, k, ": expected a value");
      values_[k.substr(2)] = argv[++i];
    }
  }
  std::string str(const std::string& k) const { return values_.at(k); }
  int64_t i64(const std::string& k) const {
    const std::string& v = values_.at(k);
    size_t used = 0;
    int64_t x = 0;
    try {
      x = std::stoll(v, &used);
    } catch (...) {
      used = 0;
    }
    TORCH_CHECK(used == v.size() && used > 0, "--", k, ": expected an integer, got '", v, "'");
    return x;
  }

 private:
  std::string known() const {
    std::string s;
    for (auto& kv : values_) s += "--" + kv.first + " ";
    return s;
  }
  std::map<std::string, std::string> values_;
};

/// The end of a benchmark's main: prints `rows` as a table, writes them to the file named by
/// --json when one is, and returns main's exit status 0.
inline int finish(const Args& args, const std::vector<Row>& rows) {
  print_table(rows);
  if (!args.str("json").empty()) write_json(args.str("json"), rows);
  return 0;
}

/// For the handler of main's function-try-block, `catch (...) { return bench::fail("name"); }`:
/// prints the c10::Error (without its backtrace) or std::exception in flight as "<program>:
/// <message>" and returns exit status 2. Anything else is rethrown.
inline int fail(const char* program) {
  try {
    throw;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "%s: %s\n", program, e.what_without_backtrace());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", program, e.what());
  }
  return 2;
}

}  // namespace bench

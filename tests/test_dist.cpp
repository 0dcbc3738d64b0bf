// Data parallelism over c10d (Gloo on loopback, one thread per rank in this process, each with
// its own ProcessGroupGloo over one HashStore): the losses with a process group, on each rank's
// share of a global batch, against one process seeing the whole batch.
//   * gradients bitwise (each row's gradient is computed from the same logits with the same
//     global normalization), counts and ratio thresholds exact, losses and mean entropies to fp32
//     summation-order tolerance; 2 and 4 ranks, uneven shares, a rank without tokens;
//   * the global radix select against the single-process sort, on one rank;
//   * Slow Tuning under DDP-style summed gradients: parameters equal on every rank and to one
//     process on the global batch;
//   * a peer that calls with other options, or never calls, is an error within the timeout.

#include <catch2/catch.hpp>
#include <slowed/dist/process_group.h>
#include <slowed/slowed.h>
#include <torch/torch.h>

#ifdef USE_C10D_GLOO
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <exception>
#include <functional>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

using Opts = slowed::EntropyMaskedCrossEntropyOptions;

/// A group of one: the sum is the identity. The global code paths on one rank.
struct SoloGroup final : slowed::dist::Communicator {
  int64_t rank() const override { return 0; }
  int64_t world_size() const override { return 1; }
  void all_reduce_sum(at::Tensor&) override {}
};

bool same_float(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) || a == b;
}

TEST_CASE("the global ratio threshold on one rank is the single-process sort's", "[cpu]") {
  torch::manual_seed(7);
  auto solo = std::make_shared<SoloGroup>();
  for (int64_t n : {0, 1, 2, 7, 64, 1000}) {
    for (double q : {0.0, 0.1, 0.3, 0.5, 0.77, 0.999, 1.0}) {
      // Entropies with ties (rounded to 1/8), negative values, -0.0, +inf, and NaN entries.
      torch::Tensor h = (torch::randn({n}) * 2).mul(8).round().div(8);
      torch::Tensor valid = torch::rand({n}) > 0.2;
      if (n >= 7) {
        h[0] = -0.0;
        h[1] = 0.0;
        h[2] = std::numeric_limits<float>::infinity();
        h[3] = std::numeric_limits<float>::quiet_NaN();
        h[4] = -std::numeric_limits<float>::quiet_NaN();
      }
      Opts opt = Opts().mask_ratio(q);
      auto d = slowed::detail::decide_mask(h, valid, opt);
      torch::Tensor thr = slowed::dist::global_ratio_threshold(h, valid, q, *solo);
      INFO("n = " << n << ", q = " << q);
      CHECK(same_float(thr.item<float>(), d.threshold.item<float>()));
      CHECK(torch::equal(slowed::detail::keep_from_threshold(h, valid, thr), d.keep));
    }
  }
}

TEST_CASE("sortable keys order every float as sorting does", "[cpu]") {
  const float inf = std::numeric_limits<float>::infinity();
  torch::Tensor v = torch::tensor({-inf, -3.5f, -1e-40f, -0.0f, 0.0f, 1e-40f, 0.25f, 7.f, inf,
                                   std::numeric_limits<float>::quiet_NaN()});
  torch::Tensor k = slowed::dist::detail::sortable_keys(v);
  for (int64_t i = 0; i + 1 < v.numel(); ++i) CHECK(k[i].item<int64_t>() < k[i + 1].item<int64_t>());
  for (int64_t i = 0; i + 1 < v.numel(); ++i) {
    const float back = slowed::dist::detail::value_of_key(k[i]).item<float>();
    CHECK(std::signbit(back) == std::signbit(v[i].item<float>()));
    CHECK(back == v[i].item<float>());
  }
  CHECK(std::isnan(slowed::dist::detail::value_of_key(k[9]).item<float>()));
}

TEST_CASE("options take a communicator and refuse other objects at compile time", "[cpu]") {
  auto solo = std::make_shared<SoloGroup>();
  Opts o = Opts().process_group(solo, slowed::dist::GradientReduction::Mean);
  CHECK(o.process_group().get() == solo.get());
  CHECK(o.gradient_reduction() == slowed::dist::GradientReduction::Mean);
  o.process_group(nullptr);
  CHECK(o.process_group() == nullptr);
  CHECK(o.gradient_reduction() == slowed::dist::GradientReduction::Sum);
}

#ifdef USE_C10D_GLOO

// c10d's flight recorder (a process-wide trace of collectives) races when several process
// groups of one process record at once, as the thread-ranks here do (a std::map insert outside
// its lock, torch 2.11); one process per rank, as in training, never does that. Off for this
// program, before any group exists.
const bool flight_recorder_off = [] { return setenv("TORCH_FR_BUFFER_SIZE", "0", 1) == 0; }();

/// Runs `body(rank, group)` on `world` threads, each rank with its own Gloo process group over
/// loopback; rethrows the first exception of any rank after all have finished.
void run_ranks(int world, const std::function<void(int, c10::intrusive_ptr<c10d::Backend>)>& body,
               std::chrono::milliseconds timeout = std::chrono::milliseconds(30000)) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  std::vector<std::exception_ptr> errors(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        auto options = c10d::ProcessGroupGloo::Options::create(timeout);
        options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
        c10::intrusive_ptr<c10d::Backend> pg =
            c10::make_intrusive<c10d::ProcessGroupGloo>(store, r, world, options);
        body(r, pg);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

/// Row ranges [begin, end) of each rank's share of n tokens: uneven, and with 4 ranks one of
/// them (rank 2) holds none.
std::vector<std::pair<int64_t, int64_t>> shares(int64_t n, int world) {
  std::vector<int64_t> cut{0};
  if (world == 2) {
    cut.push_back(n / 3);
  } else {
    cut.push_back(n / 5);
    cut.push_back(n / 2);
    cut.push_back(n / 2);
  }
  cut.push_back(n);
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int r = 0; r < world; ++r) out.emplace_back(cut[r], cut[r + 1]);
  return out;
}

struct Batch {
  torch::Tensor logits, targets;  // [N, V], [N]
};

Batch make_batch(int64_t n, int64_t v, uint64_t seed) {
  torch::manual_seed(seed);
  // A spread of per-row scales gives entropies from near 0 to near log V; ties in ratio mode
  // come from repeated rows.
  torch::Tensor scale = torch::exp(torch::rand({n, 1}) * 4 - 2);
  torch::Tensor z = torch::randn({n, v}) * scale;
  z.narrow(0, n / 2, 4).copy_(z.narrow(0, 0, 4));
  torch::Tensor t = torch::randint(0, v, {n}, torch::kLong);
  t.masked_fill_(torch::rand({n}) < 0.15, -100);
  return {z, t};
}

struct Result {
  torch::Tensor loss, grad;
  slowed::EntropyMaskStats stats;
};

Result single_process(const Batch& b, const Opts& opt, const torch::Tensor& upstream) {
  torch::Tensor z = b.logits.clone().requires_grad_(true);
  slowed::EntropyMaskStats st;
  torch::Tensor loss = slowed::entropy_masked_cross_entropy(z, b.targets, opt, {}, &st);
  if (upstream.defined()) {
    loss.backward(upstream);
  } else {
    loss.backward();
  }
  return {loss.detach(), z.grad(), st};
}

void check_stats_equal(const slowed::EntropyMaskStats& a, const slowed::EntropyMaskStats& b) {
  CHECK(a.num_valid.item<int64_t>() == b.num_valid.item<int64_t>());
  CHECK(a.num_kept.item<int64_t>() == b.num_kept.item<int64_t>());
  CHECK(a.kept_fraction.item<float>() == Approx(b.kept_fraction.item<float>()).epsilon(1e-6));
  CHECK(a.mean_entropy.item<float>() == Approx(b.mean_entropy.item<float>()).epsilon(1e-5));
  CHECK(same_float(a.threshold.item<float>(), b.threshold.item<float>()));
}

TEST_CASE("with a Gloo group, every rank's share gives the global batch's loss and gradient",
          "[cpu]") {
  const int64_t n = 300, v = 37;
  const Batch b = make_batch(n, v, 11);
  for (int world : {2, 4}) {
    for (bool ratio : {false, true}) {
      for (auto red : {slowed::Reduction::MeanKept, slowed::Reduction::MeanValid,
                       slowed::Reduction::Sum, slowed::Reduction::None}) {
        for (auto gr : {slowed::dist::GradientReduction::Sum, slowed::dist::GradientReduction::Mean}) {
          Opts base = Opts().reduction(red).label_smoothing(0.05);
          if (ratio) {
            base.mask_ratio(0.4);
          } else {
            base.entropy_threshold(1.2);
          }
          torch::Tensor upstream =
              red == slowed::Reduction::None ? torch::randn({n}) : torch::Tensor();
          const Result ref = single_process(b, base, upstream);
          const auto parts = shares(n, world);
          std::vector<Result> got(world);
          std::mutex m;
          run_ranks(world, [&](int r, c10::intrusive_ptr<c10d::Backend> pg) {
            const auto [lo, hi] = parts[r];
            Batch mine{b.logits.narrow(0, lo, hi - lo), b.targets.narrow(0, lo, hi - lo)};
            Opts opt = base;
            opt.process_group(pg, gr);
            torch::Tensor up = upstream.defined() ? upstream.narrow(0, lo, hi - lo) : upstream;
            Result res = single_process(mine, opt, up);
            std::lock_guard<std::mutex> lock(m);
            got[r] = res;
          });
          INFO("world " << world << (ratio ? " ratio" : " absolute") << " reduction "
                        << static_cast<int>(red) << " mean-gradients "
                        << (gr == slowed::dist::GradientReduction::Mean));
          for (int r = 0; r < world; ++r) {
            const auto [lo, hi] = parts[r];
            check_stats_equal(got[r].stats, ref.stats);
            torch::Tensor want = ref.grad.narrow(0, lo, hi - lo);
            if (gr == slowed::dist::GradientReduction::Sum) {
              CHECK(torch::equal(got[r].grad, want));
            } else {
              CHECK(torch::allclose(got[r].grad, want * world, 1e-6, 1e-9));
            }
            if (red == slowed::Reduction::None) {
              CHECK(torch::equal(got[r].loss, ref.loss.narrow(0, lo, hi - lo)));
            } else {
              CHECK(got[r].loss.item<float>() == Approx(ref.loss.item<float>()).epsilon(1e-5));
            }
          }
        }
      }
    }
  }
}

TEST_CASE("with a Gloo group, the fused linear loss gives the global batch's gradients", "[cpu]") {
  const int64_t n = 120, d = 24, v = 53;
  torch::manual_seed(5);
  torch::Tensor hidden = torch::randn({n, d});
  torch::Tensor weight = torch::randn({v, d}) * 0.7;
  torch::Tensor targets = torch::randint(0, v, {n}, torch::kLong);
  targets.masked_fill_(torch::rand({n}) < 0.1, -100);
  for (bool ratio : {false, true}) {
    Opts base = ratio ? Opts().mask_ratio(0.3) : Opts().entropy_threshold(2.0);
    slowed::EntropyMaskedLinearCrossEntropyOptions lbase(base);
    lbase.chunk_rows(16);
    torch::Tensor h = hidden.clone().requires_grad_(true);
    torch::Tensor w = weight.clone().requires_grad_(true);
    slowed::EntropyMaskStats ref_stats;
    torch::Tensor ref_loss =
        slowed::entropy_masked_linear_cross_entropy(h, w, targets, lbase, {}, {}, &ref_stats);
    ref_loss.backward();
    const int world = 2;
    const auto parts = shares(n, world);
    std::vector<torch::Tensor> dh(world), dw(world), loss(world);
    std::vector<slowed::EntropyMaskStats> st(world);
    run_ranks(world, [&](int r, c10::intrusive_ptr<c10d::Backend> pg) {
      const auto [lo, hi] = parts[r];
      torch::Tensor hr = hidden.narrow(0, lo, hi - lo).clone().requires_grad_(true);
      torch::Tensor wr = weight.clone().requires_grad_(true);
      slowed::EntropyMaskedLinearCrossEntropyOptions lopt = lbase;
      lopt.loss().process_group(pg);
      loss[r] = slowed::entropy_masked_linear_cross_entropy(
          hr, wr, targets.narrow(0, lo, hi - lo), lopt, {}, {}, &st[r]);
      loss[r].backward();
      dh[r] = hr.grad();
      dw[r] = wr.grad();
    });
    INFO((ratio ? "ratio" : "absolute"));
    torch::Tensor dw_sum = dw[0] + dw[1];
    CHECK(torch::allclose(dw_sum, w.grad(), 1e-5, 1e-6));
    for (int r = 0; r < world; ++r) {
      const auto [lo, hi] = parts[r];
      check_stats_equal(st[r], ref_stats);
      CHECK(torch::allclose(dh[r], h.grad().narrow(0, lo, hi - lo), 1e-5, 1e-7));
      CHECK(loss[r].item<float>() == Approx(ref_loss.item<float>()).epsilon(1e-5));
    }
  }
}

TEST_CASE("Slow Tuning under summed gradients: the same parameters on every rank as in one "
          "process", "[cpu]") {
  const int64_t n = 64, din = 12, v = 19;
  torch::manual_seed(3);
  torch::Tensor x = torch::randn({n, din});
  torch::Tensor t = torch::randint(0, v, {n}, torch::kLong);
  torch::Tensor w0 = torch::randn({v, din}) * 0.3;
  const auto slow = slowed::SlowTuningOptions().scale(0.1);
  const auto adam = torch::optim::AdamWOptions(1e-2).weight_decay(0.05);
  const Opts base = Opts().mask_ratio(0.25);
  const int steps = 3;
  // One process, the whole batch.
  torch::Tensor w_ref = w0.clone().requires_grad_(true);
  {
    slowed::SlowTuningOptimizer<torch::optim::AdamW> opt({w_ref}, adam, slow);
    for (int s = 0; s < steps; ++s) {
      opt.zero_grad();
      slowed::entropy_masked_cross_entropy(x.matmul(w_ref.t()), t, base).backward();
      opt.step();
    }
  }
  const int world = 2;
  const auto parts = shares(n, world);
  std::vector<torch::Tensor> w_rank(world);
  run_ranks(world, [&](int r, c10::intrusive_ptr<c10d::Backend> pg) {
    const auto [lo, hi] = parts[r];
    torch::Tensor w = w0.clone().requires_grad_(true);
    slowed::SlowTuningOptimizer<torch::optim::AdamW> opt({w}, adam, slow);
    Opts o = base;
    o.process_group(pg);
    for (int s = 0; s < steps; ++s) {
      opt.zero_grad();
      slowed::entropy_masked_cross_entropy(x.narrow(0, lo, hi - lo).matmul(w.t()),
                                           t.narrow(0, lo, hi - lo), o)
          .backward();
      std::vector<torch::Tensor> g{w.mutable_grad()};
      pg->allreduce(g)->wait();  // ReduceOp::SUM
      opt.step();
    }
    w_rank[r] = w.detach().clone();
  });
  CHECK(torch::equal(w_rank[0], w_rank[1]));
  CHECK(torch::allclose(w_rank[0], w_ref.detach(), 1e-5, 1e-7));
}

TEST_CASE("a peer with other options or no call is an error within the timeout, not a hang",
          "[cpu]") {
  const Batch b = make_batch(40, 11, 2);
  const auto start = std::chrono::steady_clock::now();
  // Rank 1 runs ratio mode (five sums, the first of 258 counts) while rank 0 runs absolute mode
  // (one sum of 4): the options check that precedes them reports it on both ranks.
  CHECK_THROWS_WITH(run_ranks(
      2,
      [&](int r, c10::intrusive_ptr<c10d::Backend> pg) {
        Opts o = r == 0 ? Opts().entropy_threshold(0.5) : Opts().mask_ratio(0.5);
        o.process_group(pg);
        slowed::entropy_masked_cross_entropy(b.logits, b.targets, o);
      },
      std::chrono::milliseconds(3000)),
      Catch::Contains("same threshold mode"));
  // Rank 1 never calls: rank 0's sum times out.
  CHECK_THROWS_WITH(
      run_ranks(
          2,
          [&](int r, c10::intrusive_ptr<c10d::Backend> pg) {
            if (r == 1) return;
            Opts o = Opts().entropy_threshold(0.5);
            o.process_group(pg);
            slowed::entropy_masked_cross_entropy(b.logits, b.targets, o);
          },
          std::chrono::milliseconds(2000)),
      Catch::Contains("all-reduce across ranks failed"));
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(60));
}

#endif  // USE_C10D_GLOO

}  // namespace

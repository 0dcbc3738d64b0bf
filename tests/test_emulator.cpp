// The CUDA kernels, run in the host emulator (docs/emulator.md) through the real launchers
// (slowed/cuda/entropy_masked_cross_entropy_cuda.h, slowed/cuda/slow_tuning_cuda.h) and the
// loss forward's CUDA branch, against the CPU kernels and the reference paths. Host tensors
// created while an EmulatedDevice is in scope are emulator device buffers (guard pages, poisoned
// contents).
//
// Tolerances are docs/numerics.md's: row terms within k * s_i (k = 1e-5, s_i = 1 + |lse| +
// max|z| + zeta lse^2), gradients within r |ref| + k |f_i| (1 + 2 zeta |lse_i|) + a, keep
// decisions and counts exact (thresholds are put in gaps of the entropies, reference entropies
// are exact in fp32), optimizer values within a few units of the storage dtype's roundoff.
// Results of the emulated kernels must be bitwise the same in every thread and block order.

#include "emulator/torch_device.h"

#include <slowed/cpu/slow_tuning_cpu.h>
#include <slowed/cuda/entropy_masked_cross_entropy_cuda.h>
#include <slowed/cuda/slow_tuning_cuda.h>
#include <slowed/slowed.h>

#include <ATen/CPUGeneratorImpl.h>
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace {

using slowed::EntropyMaskedCrossEntropyOptions;
using slowed::Reduction;
using slowed::detail::RowPath;
using slowed_emu::Order;

constexpr double kCompute = 1e-5;  // k of docs/numerics.md (fp32 compute)
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

struct ScheduleGuard {
  slowed_emu::Schedule saved = slowed_emu::schedule();
  ScheduleGuard(Order threads, Order blocks, uint64_t seed) {
    slowed_emu::schedule() = {threads, blocks, seed};
  }
  ~ScheduleGuard() { slowed_emu::schedule() = saved; }
};

at::Generator generator(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

double roundoff(at::ScalarType t) {
  return t == at::kBFloat16 ? std::ldexp(1.0, -8) : t == at::kHalf ? std::ldexp(1.0, -11)
                                                                    : std::ldexp(1.0, -24);
}

/// The raw bits of `t` (NaN-proof bitwise comparisons).
at::Tensor bits(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (c.scalar_type() == at::kBool) return c.to(at::kByte);
  return c.element_size() == 4 ? c.view(at::kInt) : c.element_size() == 2 ? c.view(at::kShort)
                                                                          : c.view(at::kLong);
}

bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && at::equal(bits(a), bits(b));
}

/// |got - want| <= tol elementwise (tol broadcasts), NaN exactly where `want` is NaN.
void check_close(const at::Tensor& got, const at::Tensor& want, const at::Tensor& tol,
                 const std::string& what) {
  INFO(what);
  REQUIRE(got.sizes() == want.sizes());
  at::Tensor g = got.to(at::kDouble), w = want.to(at::kDouble);
  REQUIRE(at::equal(at::isnan(g), at::isnan(w)));
  at::Tensor finite = ~at::isnan(w);
  at::Tensor err = at::where(finite, (g - w).abs() - tol.to(at::kDouble), at::zeros({}, g.options()));
  // Infinities must match exactly (their difference is NaN or 0); a NaN tolerance fails.
  err = at::where(at::isinf(w) | at::isinf(g), at::where(g == w, 0.0, 1.0).to(at::kDouble), err);
  err = at::where(at::isnan(err), at::ones_like(err), err);
  const double worst = err.numel() ? err.max().item<double>() : 0.0;
  if (worst > 0) {
    const int64_t i = err.flatten().argmax().item<int64_t>();
    INFO("worst at flat " << i << ": got " << g.flatten()[i].item<double>() << ", want "
                          << w.flatten()[i].item<double>());
    CHECK(worst <= 0);
  }
}

// ---- the loss ----------------------------------------------------------------------------------

struct LossCase {
  at::ScalarType dtype = at::kFloat;
  int64_t n = 5, v = 17;
  bool ratio = false, reference = false, inplace = false, none = false;
  double eps = 0, zs = 0, cap = 0;
  uint64_t seed = 1;
  int64_t misalign = 0;  // elements between the buffer start and the logits

  std::string name() const {
    std::ostringstream s;
    s << dtype << " N=" << n << " V=" << v << (ratio ? " ratio" : " absolute")
      << (reference ? " reference" : "") << (inplace ? " in-place" : "") << (none ? " None" : "")
      << " eps=" << eps << " zs=" << zs << " cap=" << cap << " misalign=" << misalign
      << " seed=" << seed;
    return s.str();
  }
};

struct LossInputs {
  at::Tensor logits, targets, reference;
  EntropyMaskedCrossEntropyOptions opt;
};

// Logit rows as test_loss.cpp draws them: spread log-uniform in [0.05, 6], offset in [-3, 3];
// about 25% ignored targets. `misalign` places the logits that many elements into their buffer.
LossInputs make_inputs(const LossCase& c) {
  auto g = generator(c.seed);
  LossInputs in;
  at::Tensor spread = at::empty({c.n, 1}).uniform_(std::log(0.05), std::log(6.0), g).exp();
  at::Tensor offset = at::empty({c.n, 1}).uniform_(-3.0, 3.0, g);
  at::Tensor z = (at::randn({c.n, c.v}, g) * spread + offset).to(c.dtype);
  at::Tensor buffer = at::empty({c.n * c.v + c.misalign}, z.options());
  in.logits = buffer.narrow(0, c.misalign, c.n * c.v).view({c.n, c.v});
  in.logits.copy_(z);
  in.targets = at::randint(0, c.v, {c.n}, g, at::kLong);
  at::Tensor ignored = at::rand({c.n}, g) < 0.25;
  in.targets.masked_fill_(ignored, -100);
  if (c.reference) {  // distinct multiples of 1/16: exact in fp32
    in.reference = at::randperm(4 * c.n + 8, g, at::kLong).narrow(0, 0, c.n).to(at::kFloat) / 16.0;
  }
  in.opt.label_smoothing(c.eps).lse_square_scale(c.zs).softcap(c.cap).inplace_backward(c.inplace);
  in.opt.reduction(c.none ? Reduction::None : Reduction::MeanKept);
  return in;
}

// Puts the threshold in the widest gap of the CPU kernel's decision values, so that fp32
// differences of ~1e-6 between paths cannot flip a keep decision.
void choose_threshold(const LossCase& c, LossInputs& in) {
  at::Tensor h = in.reference;
  if (!h.defined()) {
    auto flat = slowed::detail::flatten_inputs(in.logits, in.targets, at::Tensor(), in.opt);
    at::Tensor none, kept;
    h = slowed::detail::fused_cpu_rows(flat, in.opt, none, kept).entropy;
  }
  at::Tensor valid = (in.targets != -100) & ~at::isnan(h);
  std::vector<float> v;
  for (int64_t i = 0; i < c.n; ++i)
    if (valid[i].item<bool>()) v.push_back(h[i].item<float>());
  std::sort(v.begin(), v.end());
  size_t best = 0;
  double gap = -1;
  for (size_t i = 0; i + 1 < v.size(); ++i) {
    if (v[i + 1] - v[i] > gap) {
      gap = v[i + 1] - v[i];
      best = i;
    }
  }
  if (c.ratio) {
    in.opt.mask_ratio(gap >= 1e-3 ? (static_cast<double>(best) + 1.5) / v.size() : 0.0);
  } else {
    in.opt.entropy_threshold(gap >= 1e-3 ? 0.5 * (v[best] + v[best + 1])
                                         : (v.empty() ? 0.3 : v.back() + 0.5));
  }
}

struct LossOutcome {
  slowed::detail::RowTerms terms;
  at::Tensor kept;  // the row kernel's decision (undefined on the reference path)
  slowed::detail::ForwardResult fwd;
  at::Tensor grad;  // after the backward's scaling
};

LossOutcome run_loss(const LossInputs& in0, RowPath path) {
  LossInputs in = in0;
  in.logits = in0.logits.clone();  // in place overwrites them; keep the alignment of the buffer
  if (in0.logits.storage_offset() != 0) {
    at::Tensor buffer = at::empty({in0.logits.numel() + in0.logits.storage_offset()},
                                  in0.logits.options());
    in.logits = buffer.narrow(0, in0.logits.storage_offset(), in0.logits.numel())
                    .view(in0.logits.sizes());
    in.logits.copy_(in0.logits);
  }
  LossOutcome o;
  auto flat = slowed::detail::flatten_inputs(in.logits, in.targets, in.reference, in.opt);
  at::Tensor none;
  if (path == RowPath::Cuda) {
    o.terms = slowed::detail::fused_cuda_rows(flat, in.opt, none, o.kept);
  } else if (path == RowPath::Cpu) {
    o.terms = slowed::detail::fused_cpu_rows(flat, in.opt, none, o.kept);
  } else {
    o.terms = slowed::detail::reference_row_terms(flat.logits, flat.safe_targets, in.opt);
  }
  o.fwd = slowed::detail::entropy_masked_ce_forward(in.logits, in.targets, in.reference, in.opt,
                                                    /*need_grad=*/true, path);
  const int64_t n = in.logits.size(0);
  at::Tensor upstream = in.opt.reduction() == Reduction::None
                            ? at::linspace(0.5, 1.5, n, at::kFloat)
                            : at::full({}, 0.75, at::kFloat);
  at::Tensor factor = upstream * o.fwd.grad_scale;
  o.grad = o.fwd.grad;
  slowed::detail::scale_gradient(o.fwd.grad, factor, o.grad, path);
  return o;
}

// Compares an emulated outcome with another path's (docs/numerics.md tolerances).
void compare_loss(const LossCase& c, const LossInputs& in, const LossOutcome& got,
                  const LossOutcome& want, const std::string& vs) {
  const std::string what = c.name() + " vs " + vs;
  at::Tensor z = slowed::detail::capped_rows(in.logits, c.cap);
  at::Tensor lse = want.terms.lse.to(at::kDouble).nan_to_num(0.0, 0.0, 0.0);  // NaN rows: exact
  at::Tensor s = 1.0 + lse.abs() + z.abs().amax({1}).to(at::kDouble).nan_to_num(0.0) + c.zs * lse * lse;
  check_close(got.terms.lse, want.terms.lse, kCompute * s, what + ": lse");
  check_close(got.terms.entropy, want.terms.entropy, kCompute * s, what + ": entropy");
  at::Tensor valid = in.targets != -100;
  check_close(got.terms.loss.where(valid, 0.0), want.terms.loss.where(valid, 0.0), kCompute * s,
              what + ": token loss");
  if (want.kept.defined()) CHECK(same_bits(got.kept, want.kept));
  CHECK(at::equal(got.fwd.stats.num_kept, want.fwd.stats.num_kept));
  CHECK(at::equal(got.fwd.stats.num_valid, want.fwd.stats.num_valid));
  const double w = want.fwd.grad_scale.item<double>();
  if (c.none) {
    check_close(got.fwd.loss, want.fwd.loss, kCompute * s, what + ": None loss");
  } else {
    const double tol = kCompute * w * at::where(valid, s, 0.0).sum().item<double>();
    check_close(got.fwd.loss, want.fwd.loss, at::full({}, tol, at::kDouble), what + ": loss");
  }
  const double r = 4 * roundoff(c.dtype), a = c.dtype == at::kHalf ? std::ldexp(1.0, -23) : 0.0;
  at::Tensor upstream = c.none ? at::linspace(0.5, 1.5, c.n, at::kDouble).unsqueeze(1)
                               : at::full({}, 0.75, at::kDouble);
  at::Tensor gw = want.grad.to(at::kDouble);
  at::Tensor tol = r * gw.abs() + kCompute * (upstream * w).abs() * (1 + 2 * c.zs * lse.abs()).unsqueeze(1) + a;
  check_close(got.grad, want.grad, tol, what + ": gradient");
}

std::vector<LossCase> loss_grid() {
  std::vector<LossCase> cases;
  uint64_t seed = 11;
  const at::ScalarType dtypes[] = {at::kFloat, at::kBFloat16, at::kHalf};
  for (at::ScalarType dt : dtypes) {
    for (int64_t v : {1, 3, 17, 130, 4099}) {
      for (int k = 0; k < 4; ++k) {
        LossCase c;
        c.dtype = dt;
        c.v = v;
        c.n = 1 + (seed % 7);
        c.ratio = k % 2 == 1;
        c.reference = k == 3;
        c.inplace = k == 2;
        c.none = k == 1;
        c.eps = (seed % 3 == 0) ? 0.1 : 0.0;
        c.zs = (seed % 4 == 1) ? 0.01 : 0.0;
        c.cap = (seed % 5 == 2) ? 4.0 : 0.0;
        c.misalign = (seed % 3 == 1) ? 1 : 0;
        c.seed = seed++;
        cases.push_back(c);
      }
    }
  }
  return cases;
}

}  // namespace

TEST_CASE("emulated loss kernels match the CPU kernel and the reference over dtypes, V and modes",
          "[cpu]") {
  slowed_emu::EmulatedDevice device;
  for (const LossCase& c : loss_grid()) {
    LossInputs in = make_inputs(c);
    choose_threshold(c, in);
    const LossOutcome cuda = run_loss(in, RowPath::Cuda);
    compare_loss(c, in, cuda, run_loss(in, RowPath::Cpu), "cpu kernel");
    compare_loss(c, in, cuda, run_loss(in, RowPath::Reference), "reference");
  }
}

TEST_CASE("emulated loss kernels at V = 151936 (1024 threads) match the CPU kernel", "[cpu]") {
  slowed_emu::EmulatedDevice device;
  for (at::ScalarType dt : {at::kBFloat16, at::kFloat}) {
    LossCase c;
    c.dtype = dt;
    c.n = 2;
    c.v = 151936;
    c.ratio = dt == at::kFloat;
    c.reference = dt == at::kFloat;
    c.eps = 0.1;
    c.misalign = dt == at::kBFloat16 ? 3 : 0;
    c.seed = 5;
    LossInputs in = make_inputs(c);
    in.targets.fill_(151935);  // the last element of the row
    choose_threshold(c, in);
    compare_loss(c, in, run_loss(in, RowPath::Cuda), run_loss(in, RowPath::Cpu), "cpu kernel");
  }
  CHECK(device.backend().launches.front().block.x == 1024);
}

TEST_CASE("emulated loss results do not depend on thread or block order", "[cpu]") {
  slowed_emu::EmulatedDevice device;
  for (LossCase c : {LossCase{at::kBFloat16, 9, 4099, true, false, false, false, 0.1, 0.01, 0, 3, 1},
                     LossCase{at::kFloat, 6, 130, false, true, true, true, 0, 0, 4.0, 4, 0}}) {
    LossInputs in = make_inputs(c);
    choose_threshold(c, in);
    LossOutcome first;
    int runs = 0;
    for (Order o : {Order::Forward, Order::Reverse, Order::Random}) {
      for (uint64_t seed : {1, 2}) {
        if (o != Order::Random && seed == 2) continue;
        ScheduleGuard g(o, o == Order::Forward ? Order::Reverse : o, seed);
        LossOutcome out = run_loss(in, RowPath::Cuda);
        if (runs++ == 0) {
          first = out;
          continue;
        }
        INFO(c.name() << " threads/blocks " << slowed_emu::order_name(o) << " seed " << seed);
        CHECK(same_bits(out.terms.lse, first.terms.lse));
        CHECK(same_bits(out.terms.entropy, first.terms.entropy));
        CHECK(same_bits(out.terms.loss, first.terms.loss));
        CHECK(same_bits(out.kept, first.kept));
        CHECK(same_bits(out.fwd.loss, first.fwd.loss));
        CHECK(same_bits(out.grad, first.grad));
      }
    }
  }
}

TEST_CASE("emulated loss kernels are grid-stride: a grid smaller than N gives the same bits",
          "[cpu]") {
  slowed_emu::EmulatedDevice device;
  LossCase c{at::kHalf, 11, 130, true, false, false, false, 0.1, 0, 0, 8, 1};
  LossInputs in = make_inputs(c);
  choose_threshold(c, in);
  const LossOutcome full = run_loss(in, RowPath::Cuda);
  device.backend().max_grid = 3;
  const LossOutcome cut = run_loss(in, RowPath::Cuda);
  CHECK(same_bits(full.terms.lse, cut.terms.lse));
  CHECK(same_bits(full.terms.entropy, cut.terms.entropy));
  CHECK(same_bits(full.kept, cut.kept));
  CHECK(same_bits(full.grad, cut.grad));
}

TEST_CASE("the loss launchers choose grid, block and kernels as documented", "[cpu]") {
  slowed_emu::EmulatedDevice device;
  auto& launches = device.backend().launches;
  for (int64_t v : {130, 8192, 65536}) {
    for (bool ratio : {false, true}) {
      LossCase c;
      c.v = v;
      c.n = 3;
      c.ratio = ratio;
      LossInputs in = make_inputs(c);
      choose_threshold(c, in);
      launches.clear();
      run_loss(in, RowPath::Cuda);
      std::vector<std::string> names;
      for (const auto& l : launches) {
        names.push_back(l.kernel);
        CHECK(l.grid.x == 3);
        CHECK(l.block.x == (v >= 65536 ? 1024u : v >= 8192 ? 512u : 256u));
      }
      // Row terms alone, then the forward (rows, + zero_rows in ratio mode), then the backward.
      std::vector<std::string> expect = {"slowed_emce_rows", "slowed_emce_rows"};
      if (ratio) expect.push_back("slowed_emce_zero_rows");
      expect.push_back("slowed_emce_scale_rows");
      CHECK(names == expect);
    }
  }
}

TEST_CASE("non-finite rows give NaN lse and entropy on the emulated CUDA path, CPU and reference",
          "[cpu]") {
  slowed_emu::EmulatedDevice device;
  const double inf = std::numeric_limits<double>::infinity();
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (int mode = 0; mode < 3; ++mode) {  // absolute, absolute with reference, ratio with reference
      LossCase c;
      c.dtype = dt;
      c.n = 9;
      c.v = 67;  // head, vector body and tail all present for every row alignment
      c.ratio = mode == 2;
      c.reference = mode > 0;
      c.seed = 40 + mode;
      LossInputs in = make_inputs(c);
      in.targets.fill_(5);
      in.targets[8] = -100;
      in.logits[0][0] = kNaN;   // NaN in the head
      in.logits[1][33] = kNaN;  // in the vector body
      in.logits[2][66] = kNaN;  // in the tail
      in.logits[3][20] = inf;   // +Inf
      in.logits[4].fill_(-inf); // all -Inf
      in.logits[5][7] = -inf;   // one -Inf: a finite row
      in.logits[6][9] = inf;    // +Inf and -Inf
      in.logits[6][10] = -inf;
      in.logits[8][1] = kNaN;   // ignored NaN row
      in.opt.check_inputs(false);
      if (c.ratio) {
        in.opt.mask_ratio(0.25);
      } else {
        in.opt.entropy_threshold(c.reference ? 0.2 : 0.01);
      }
      INFO(c.name() << " mode " << mode);
      const LossOutcome cuda = run_loss(in, RowPath::Cuda);
      at::Tensor bad = at::zeros({c.n}, at::kBool);
      for (int i : {0, 1, 2, 3, 4, 6, 8}) bad[i] = true;
      CHECK(at::equal(at::isnan(cuda.terms.lse), bad));
      CHECK(at::equal(at::isnan(cuda.terms.entropy), bad));
      for (RowPath other : {RowPath::Cpu, RowPath::Reference}) {
        const LossOutcome o = run_loss(in, other);
        CHECK(at::equal(at::isnan(o.terms.lse), bad));
        CHECK(at::equal(at::isnan(o.terms.entropy), bad));
        compare_loss(c, in, cuda, o, other == RowPath::Cpu ? "cpu kernel" : "reference");
      }
      if (!c.reference) CHECK(cuda.fwd.stats.num_kept.item<int64_t>() <= 2);  // rows 5 and 7 only
    }
  }
}

// ---- Slow Tuning -------------------------------------------------------------------------------

namespace {

struct StTensor {
  at::Tensor param, grad, m, v, vmax, initial, prev;
};

// A tensor's operands: parameter, gradient, moments (v >= 0), theta_0 near the parameter.
StTensor make_tensor(int64_t n, at::ScalarType dt, uint64_t seed, bool amsgrad, bool initial) {
  auto g = generator(seed);
  StTensor t;
  t.param = at::randn({n}, g).to(dt);
  t.grad = (at::randn({n}, g) * 0.1).to(dt);
  t.m = (at::randn({n}, g) * 0.01).to(dt);
  t.v = (at::rand({n}, g) * 1e-4).to(dt);
  if (amsgrad) t.vmax = (t.v.to(at::kFloat) * 1.5).to(dt);
  if (initial) t.initial = (t.param.to(at::kFloat) + at::randn({n}, g) * 0.05).to(dt);
  t.prev = (t.param.to(at::kFloat) - at::randn({n}, g) * 0.01).to(dt);
  return t;
}

StTensor clone(const StTensor& t) {
  auto c = [](const at::Tensor& x) { return x.defined() ? x.clone() : x; };
  return {c(t.param), c(t.grad), c(t.m), c(t.v), c(t.vmax), c(t.initial), c(t.prev)};
}

struct StMode {
  bool adam = true, decoupled = true, amsgrad = false;
  double scale = 0.1, max_step = 0, max_drift = 0, floor = 0;
  std::string name() const {
    std::ostringstream s;
    s << (adam ? (decoupled ? "AdamW" : "Adam") : "generic") << (amsgrad ? " amsgrad" : "")
      << " scale=" << scale << " max_step=" << max_step << " max_drift=" << max_drift
      << " floor=" << floor;
    return s.str();
  }
};

slowed::detail::AdamSettings adam_scalars(const StMode& m) {
  const double lr = 1e-2, wd = 0.01, b1 = 0.9, b2 = 0.999, eps = 1e-8;
  const int64_t step = 3;
  slowed::detail::AdamSettings h;
  h.beta1 = static_cast<float>(b1);
  h.beta2 = static_cast<float>(b2);
  h.one_minus_beta1 = static_cast<float>(1.0 - b1);
  h.one_minus_beta2 = static_cast<float>(1.0 - b2);
  h.eps = static_cast<float>(eps);
  h.step_size = static_cast<float>(lr / (1.0 - std::pow(b1, step)));
  h.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(b2, step)));
  h.weight_decay = static_cast<float>(m.decoupled ? lr * wd : wd);
  h.amsgrad = m.amsgrad;
  return h;
}

// The emulated launcher on `ts` (modified in place).
void run_cuda(std::vector<StTensor>& ts, const StMode& m) {
  std::vector<slowed::detail::SlowTuningOperands> cts(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    auto& c = cts[i];
    c.param = ts[i].param;
    c.initial = ts[i].initial;
    if (m.adam) {
      c.grad = ts[i].grad;
      c.exp_avg = ts[i].m;
      c.exp_avg_sq = ts[i].v;
      c.max_exp_avg_sq = ts[i].vmax;
      c.adam = adam_scalars(m);
    } else {
      c.prev = ts[i].prev;
    }
  }
  slowed::detail::SlowBounds b{m.scale, m.max_step, m.max_drift, m.floor};
  if (m.adam) {
    slowed::cuda::slow_tuning_adam_step(cts, b, m.decoupled);
  } else {
    slowed::cuda::slow_tuning_generic_step(cts, b);
  }
}

// The CPU kernels on `ts` (fp32 and bf16 storage; fp16 tensors are computed in fp32 and rounded
// once per stored value, as the CUDA kernel does).
void run_cpu(std::vector<StTensor>& ts, const StMode& m) {
  std::vector<StTensor> work(ts.size());
  std::vector<slowed::detail::SlowTuningOperands> cts(ts.size());
  auto up = [](const at::Tensor& x) {
    return x.defined() && x.scalar_type() == at::kHalf ? x.to(at::kFloat) : x;
  };
  for (size_t i = 0; i < ts.size(); ++i) {
    work[i] = {up(ts[i].param), up(ts[i].grad), up(ts[i].m), up(ts[i].v), up(ts[i].vmax),
               up(ts[i].initial), up(ts[i].prev)};
    auto& c = cts[i];
    c.param = work[i].param;
    c.initial = work[i].initial;
    if (m.adam) {
      c.grad = work[i].grad;
      c.exp_avg = work[i].m;
      c.exp_avg_sq = work[i].v;
      c.max_exp_avg_sq = work[i].vmax;
      c.adam = adam_scalars(m);
    } else {
      c.prev = work[i].prev;
    }
  }
  // The same launchers and operands as the CUDA side (run_cuda).
  slowed::detail::SlowBounds b{m.scale, m.max_step, m.max_drift, m.floor};
  if (m.adam) {
    slowed::cpu::slow_tuning_adam_step(cts, b, m.decoupled);
  } else {
    slowed::cpu::slow_tuning_generic_step(cts, b);
  }
  for (size_t i = 0; i < ts.size(); ++i) {
    auto back = [](at::Tensor& dst, const at::Tensor& src) {
      if (dst.defined() && dst.scalar_type() == at::kHalf) dst.copy_(src);
    };
    back(ts[i].param, work[i].param);
    back(ts[i].m, work[i].m);
    back(ts[i].v, work[i].v);
    back(ts[i].vmax, work[i].vmax);
  }
}

// Within two units of the dtype's roundoff of the value (one rounding each side, of fp32 values
// that differ by a few fp32 roundings: FMA and summation order), plus fp32 noise.
void check_tensor(const at::Tensor& got, const at::Tensor& want, const std::string& what) {
  if (want.numel() == 0) return;
  const double u = roundoff(want.scalar_type());
  at::Tensor w = want.to(at::kDouble);
  // fp16 below 2^-14 is subnormal with spacing 2^-24: one rounding each side (docs/numerics.md a).
  const double a = want.scalar_type() == at::kHalf ? std::ldexp(1.0, -23) : 0.0;
  check_close(got, want, 2 * u * w.abs() + 1e-6 * (w.abs().max() + 1e-30) + a, what);
}

void compare_st(const std::vector<StTensor>& got, const std::vector<StTensor>& want,
                const std::string& what) {
  for (size_t i = 0; i < got.size(); ++i) {
    const std::string t = what + " tensor " + std::to_string(i) + " (" +
                          std::to_string(got[i].param.numel()) + " elements)";
    check_tensor(got[i].param, want[i].param, t + ": param");
    if (got[i].m.defined()) {
      check_tensor(got[i].m, want[i].m, t + ": exp_avg");
      check_tensor(got[i].v, want[i].v, t + ": exp_avg_sq");
    }
    if (got[i].vmax.defined()) check_tensor(got[i].vmax, want[i].vmax, t + ": max_exp_avg_sq");
  }
}

std::vector<StMode> st_modes() {
  std::vector<StMode> modes;
  for (bool adam : {true, false}) {
    for (int k = 0; k < 5; ++k) {
      StMode m;
      m.adam = adam;
      m.decoupled = k != 1;
      m.amsgrad = k == 2 || k == 4;
      m.max_step = (k == 1 || k == 3) ? 0.01 : 0.0;
      m.max_drift = (k >= 2) ? 0.02 : 0.0;
      m.floor = k == 4 ? 1.0 : 0.0;
      m.scale = k == 3 ? 0.5 : 0.1;
      modes.push_back(m);
    }
  }
  return modes;
}

}  // namespace

TEST_CASE("emulated Slow Tuning kernels match the CPU kernels in every mode and size boundary",
          "[cpu]") {
  slowed_emu::EmulatedDevice device;
  // Chunk boundaries (65536), block-size boundaries (512), a one-element tensor, a zero-element
  // tensor, and a zero tensor (radius 0: no bound applies).
  const int64_t sizes[] = {1, 0, 511, 512, 513, 65535, 65536, 65537, 131073};
  uint64_t seed = 100;
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const StMode& m : st_modes()) {
      std::vector<StTensor> ts;
      for (int64_t n : sizes) {
        ts.push_back(make_tensor(n, dt, seed++, m.amsgrad, m.max_drift > 0 && n != 513));
      }
      ts[2].param.zero_();
      ts[2].prev.zero_();
      std::vector<StTensor> emu, cpu;
      for (const auto& t : ts) {
        emu.push_back(clone(t));
        cpu.push_back(clone(t));
      }
      run_cuda(emu, m);
      run_cpu(cpu, m);
      std::ostringstream what;
      what << dt << " " << m.name();
      compare_st(emu, cpu, what.str());
    }
  }
}

TEST_CASE("Slow Tuning launches split over 24 tensors and 320 chunks and still reduce per tensor",
          "[cpu]") {
  slowed_emu::EmulatedDevice device;
  StMode m;
  m.max_step = 0.005;
  m.max_drift = 0.01;
  // 30 tensors (two launches by tensor count) and one of 321 chunks (split by chunk count, its
  // partial sums in two launches).
  std::vector<StTensor> ts;
  for (int i = 0; i < 30; ++i) ts.push_back(make_tensor(1000 + 37 * i, at::kBFloat16, 300 + i, false, true));
  ts.push_back(make_tensor(321 * 65536 - 5, at::kBFloat16, 400, false, true));
  std::vector<StTensor> emu, cpu;
  for (const auto& t : ts) {
    emu.push_back(clone(t));
    cpu.push_back(clone(t));
  }
  auto& launches = device.backend().launches;
  launches.clear();
  run_cuda(emu, m);
  run_cpu(cpu, m);
  compare_st(emu, cpu, "batched " + m.name());
  int sums = 0, applies = 0;
  std::vector<unsigned> finalize_grids;
  for (const auto& l : launches) {
    sums += l.kernel == "slowed_st_adam_sums";
    applies += l.kernel == "slowed_st_adam_apply";
    if (l.kernel == "slowed_st_finalize") finalize_grids.push_back(l.grid.x);
    CHECK(l.block.x == 512);
    CHECK(l.grid.x <= 320);
  }
  CHECK(sums == 3);  // 30 small tensors: 24 + 6 (+ the first chunks of the big one), then 320 chunks
  CHECK(applies == sums);
  // One block per tensor: 24, then 6 + the big one; the third batch only continues the big one.
  CHECK(finalize_grids == std::vector<unsigned>{24, 7});
}

TEST_CASE("Slow Tuning tensors of more chunks than a launch holds: one finalize per tensor",
          "[cpu]") {
  slowed_emu::EmulatedDevice device;
  // AdamW in fp32 (the tightest comparison), both bounds. Batches of at most 320 chunks:
  //   1: t0 (1 chunk), t1 chunks 0..318
  //   2: t1 chunks 319..512 (slot 0 continues it: finalized in batch 1), t2 (2 chunks, no
  //      theta_0), t3 (1 element), t4
  // t1 has 513 chunks, more than the finalize's 512 threads, so thread 0 adds two slots. The
  // generic path shares the launcher and the finalize, and costs as much again to emulate.
  const std::vector<int64_t> sizes = {5000, 513 * 65536 - 123, 131072, 1, 777};
  StMode m;
  m.max_step = 0.005;
  m.max_drift = 0.01;
  m.scale = 0.5;
  std::vector<StTensor> emu, cpu;
  for (size_t i = 0; i < sizes.size(); ++i) {
    emu.push_back(make_tensor(sizes[i], at::kFloat, 700 + i, false, i != 2));
    cpu.push_back(clone(emu.back()));
  }
  auto& launches = device.backend().launches;
  launches.clear();
  run_cuda(emu, m);
  run_cpu(cpu, m);
  compare_st(emu, cpu, "many chunks " + m.name());
  std::vector<std::string> order;
  std::vector<unsigned> finalize_grids;
  for (const auto& l : launches) {
    if (order.empty() || order.back() != l.kernel) order.push_back(l.kernel);
    if (l.kernel == "slowed_st_finalize") finalize_grids.push_back(l.grid.x);
  }
  // Every sums launch, then every finalize, then every apply.
  CHECK(order == std::vector<std::string>{"slowed_st_adam_sums", "slowed_st_finalize",
                                          "slowed_st_adam_apply"});
  CHECK(finalize_grids == std::vector<unsigned>{2, 3});  // t0 t1; t2 t3 t4
}

TEST_CASE("Slow Tuning batches finalize every tensor once: in the batch of its chunk 0",
          "[cpu]") {
  // The launcher's batching alone (no kernel runs; at::empty does not touch its pages), over
  // layouts that split by tensor count, by chunk count inside a tensor, and exactly at a
  // tensor's end (the next tensor is then filled into a batch launched without its blocks).
  using slowed::cuda::detail::for_each_batch;
  using slowed::cuda::detail::kMtChunk;
  const int64_t C = kMtChunk;
  const std::vector<std::vector<int64_t>> layouts = {
      {1, 0, 5},
      std::vector<int64_t>(50, 3),
      {C, 319 * C, 7, 2 * C},               // batch 1 ends exactly with tensor 1
      {C, 319 * C, 0, 7, 640 * C + 1, 9},   // then an empty tensor, a 641-chunk one
      {5000, 513 * C - 123, 2 * C, 1, 777}, // the emulated case above
  };
  for (size_t li = 0; li < layouts.size(); ++li) {
    std::vector<slowed::detail::SlowTuningOperands> ops(layouts[li].size());
    std::vector<const slowed::detail::SlowTuningOperands*> ts;
    for (size_t i = 0; i < ops.size(); ++i) {
      ops[i].param = at::empty({layouts[li][i]}, at::kFloat);
      ts.push_back(&ops[i]);
    }
    int total = 0;
    const std::vector<int> first = slowed::cuda::detail::slot_layout(ts, &total);
    std::vector<int> finalized(ts.size(), 0), chunk0_batch(ts.size(), -1),
        finalize_batch(ts.size(), -1);
    int batch = 0;
    for_each_batch(ts, first, true, [&](slowed::cuda::detail::SlowMtArgs& args, int blocks) {
      for (int b = 0; b < blocks; ++b) {
        if (args.block_chunk[b] == 0) chunk0_batch[args.tensor_index[args.block_tensor[b]]] = batch;
      }
      int first_tensor = 0;
      const int n = slowed::cuda::detail::finalize_tensors(args, blocks, &first_tensor);
      for (int t = first_tensor; t < first_tensor + n; ++t) {
        ++finalized[args.tensor_index[t]];
        finalize_batch[args.tensor_index[t]] = batch;
        CHECK(args.first_slot[t] == first[args.tensor_index[t]]);
      }
      ++batch;
    });
    for (size_t i = 0; i < ts.size(); ++i) {
      INFO("layout " << li << " tensor " << i);
      CHECK(finalized[i] == (layouts[li][i] > 0 ? 1 : 0));
      CHECK(finalize_batch[i] == chunk0_batch[i]);
    }
  }
}

TEST_CASE("emulated Slow Tuning results do not depend on thread or block order; snapshot is a copy",
          "[cpu]") {
  slowed_emu::EmulatedDevice device;
  StMode m;
  m.amsgrad = true;
  m.max_step = 0.01;
  m.max_drift = 0.02;
  std::vector<StTensor> base;
  for (int64_t n : {70000, 513, 1}) base.push_back(make_tensor(n, at::kHalf, 500 + n, true, true));
  std::vector<StTensor> first;
  for (Order o : {Order::Forward, Order::Reverse, Order::Random}) {
    ScheduleGuard g(o, o, 9);
    std::vector<StTensor> ts;
    for (const auto& t : base) ts.push_back(clone(t));
    run_cuda(ts, m);
    if (first.empty()) {
      first = ts;
      continue;
    }
    for (size_t i = 0; i < ts.size(); ++i) {
      INFO(slowed_emu::order_name(o) << " tensor " << i);
      CHECK(same_bits(ts[i].param, first[i].param));
      CHECK(same_bits(ts[i].m, first[i].m));
      CHECK(same_bits(ts[i].v, first[i].v));
      CHECK(same_bits(ts[i].vmax, first[i].vmax));
    }
  }
  std::vector<slowed::detail::SlowTuningOperands> snap(base.size());
  for (size_t i = 0; i < base.size(); ++i) {
    snap[i].param = base[i].param;
    snap[i].prev = at::empty_like(base[i].param);
  }
  slowed::cuda::slow_tuning_snapshot(snap);
  for (size_t i = 0; i < base.size(); ++i) CHECK(same_bits(snap[i].prev, base[i].param));
}

// The emulator's own behaviour, without torch: barriers, warp collectives, shared-memory poison,
// vector-access checks, guard pages, launch checks, fp16 conversions, schedule orders, and the
// library's smoke kernels against host arithmetic. Kernels: tests/emulator/test_kernels.cu and
// the library's registry, both through the generator (docs/emulator.md).

#include "emulator.h"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

extern "C" void slowed_emu_register_generated();

namespace {

using slowed_emu::Order;

const slowed_emu::Kernel& kernel_named(const std::string& name) {
  slowed_emu::load_kernels(&slowed_emu_register_generated);
  for (const auto* k : slowed_emu::registered_kernels()) {
    if (k->name == name) return *k;
  }
  FAIL("no emulated kernel named " << name);
  throw 0;
}

// A device buffer of n values of T, freed at scope exit.
template <class T>
struct Buf {
  explicit Buf(size_t n) : n(n), p(static_cast<T*>(slowed_emu::device_alloc(n * sizeof(T)))) {}
  ~Buf() { slowed_emu::device_free(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  size_t n;
  T* p;
};

// Runs `name` and returns the Error message ("" when it ran cleanly).
template <class... A>
std::string run(const std::string& name, slowed_emu::uint3 grid, slowed_emu::uint3 block, A... a) {
  void* args[] = {static_cast<void*>(&a)...};
  try {
    slowed_emu::launch(kernel_named(name), grid, block, 0, args);
  } catch (const slowed_emu::Error& e) {
    return e.what();
  }
  return "";
}

struct ScheduleGuard {
  slowed_emu::Schedule saved = slowed_emu::schedule();
  ScheduleGuard(Order threads, Order blocks, uint64_t seed = 1) {
    slowed_emu::schedule() = {threads, blocks, seed};
  }
  ~ScheduleGuard() { slowed_emu::schedule() = saved; }
};

const Order kOrders[] = {Order::Forward, Order::Reverse, Order::Random};

}  // namespace

TEST_CASE("emulator: a block sum with shuffles and a barrier is exact in every order", "[cpu]") {
  const long long n = 1000;
  const unsigned blocks = 3;
  Buf<float> x(blocks * n), out(blocks);
  for (size_t i = 0; i < x.n; ++i) x.p[i] = static_cast<float>(i % 7);  // small integers: exact
  std::vector<float> expect(blocks, 0.f);
  for (size_t i = 0; i < x.n; ++i) expect[i / n] += x.p[i];
  for (unsigned threads : {32u, 96u, 256u, 992u, 1024u}) {
    for (Order o : kOrders) {
      ScheduleGuard g(o, o, threads);
      REQUIRE(run("emu_block_sum", {blocks, 1, 1}, {threads, 1, 1}, x.p, out.p, n) == "");
      for (unsigned b = 0; b < blocks; ++b) CHECK(out.p[b] == expect[b]);
    }
  }
}

TEST_CASE("emulator: a missing barrier gives a poisoned result in some thread order", "[cpu]") {
  const long long n = 256;
  Buf<float> x(n), out(1);
  for (long long i = 0; i < n; ++i) x.p[i] = 1.f;
  int wrong = 0;
  for (Order o : kOrders) {
    ScheduleGuard g(o, o);
    REQUIRE(run("emu_block_sum_race_bug", {1, 1, 1}, {256, 1, 1}, x.p, out.p, n) == "");
    wrong += out.p[0] != 256.f;
  }
  CHECK(wrong > 0);
}

TEST_CASE("emulator: shuffle, ballot, any and all follow CUDA's lane rules", "[cpu]") {
  const unsigned threads = 64;
  Buf<int> out(6 * threads);
  REQUIRE(run("emu_shuffles", {1, 1, 1}, {threads, 1, 1}, out.p) == "");
  for (unsigned t = 0; t < threads; ++t) {
    const int lane = static_cast<int>(t % 32), base = 100 * static_cast<int>(t / 32);
    const int* o = out.p + 6 * t;
    CHECK(o[0] == base + (lane >= 3 ? lane - 3 : lane));
    CHECK(o[1] == base + ((lane % 16) + 5 < 16 ? lane + 5 : lane));
    const int x = lane ^ 6;
    CHECK(o[2] == base + (x < (lane & ~7) + 8 ? x : lane));
    CHECK(o[3] == base + (lane & ~15) + ((lane + 7) & 15));
    unsigned ballot = 0;
    for (int l = 0; l < 32; l += 3) ballot |= 1u << l;
    CHECK(static_cast<unsigned>(o[4]) == ballot);
    CHECK(o[5] == 3);
  }
  Buf<int> halves(32);
  REQUIRE(run("emu_half_warps", {1, 1, 1}, {32, 1, 1}, halves.p) == "");
  for (int l = 0; l < 32; ++l) CHECK(halves.p[l] == (l ^ 1));
}

TEST_CASE("emulator: divergent barriers and incomplete warp collectives are reported", "[cpu]") {
  Buf<int> out(64);
  std::string e = run("emu_divergent_barrier_bug", {1, 1, 1}, {64, 1, 1}, out.p);
  CHECK_THAT(e, Catch::Contains("divergent __syncthreads") && Catch::Contains("exited"));
  e = run("emu_two_barriers_bug", {1, 1, 1}, {64, 1, 1}, out.p);
  CHECK_THAT(e, Catch::Contains("divergent __syncthreads") && Catch::Contains("emu_tests:"));
  e = run("emu_early_exit_bug", {1, 1, 1}, {64, 1, 1}, out.p);
  CHECK_THAT(e, Catch::Contains("divergent __syncthreads") && Catch::Contains("thread (5,0,0)"));
  e = run("emu_missing_lane_bug", {1, 1, 1}, {64, 1, 1}, out.p);
  CHECK_THAT(e, Catch::Contains("deadlock") && Catch::Contains("lanes {3}") &&
                    Catch::Contains("exited"));
  e = run("emu_source_outside_mask_bug", {1, 1, 1}, {32, 1, 1}, out.p);
  CHECK_THAT(e, Catch::Contains("reads lane 20, which is not in mask {0-15}"));
  // A full-mask shuffle in a block of 48 threads names lanes 48-63, which do not exist.
  e = run("emu_missing_lane_bug", {1, 1, 1}, {48, 1, 1}, out.p);
  CHECK_THAT(e, Catch::Contains("do not exist"));
}

TEST_CASE("emulator: vector accesses are checked for alignment and bounds", "[cpu]") {
  Buf<float> x(64), out(64);
  for (int i = 0; i < 64; ++i) x.p[i] = static_cast<float>(i);
  REQUIRE(run("emu_vector_load", {1, 1, 1}, {32, 1, 1}, x.p, out.p, 0LL, 16LL) == "");
  CHECK(out.p[3] == 12.f + 15.f);
  std::string e = run("emu_vector_load", {1, 1, 1}, {32, 1, 1}, x.p, out.p, 1LL, 4LL);
  CHECK_THAT(e, Catch::Contains("16-byte vector load at 4 bytes off alignment"));
  e = run("emu_vector_load", {1, 1, 1}, {32, 1, 1}, x.p, out.p, 4LL, 16LL);
  CHECK_THAT(e, Catch::Contains("out of bounds") && Catch::Contains("past the end"));
  std::vector<float> host(64);  // not a device buffer
  e = run("emu_vector_load", {1, 1, 1}, {32, 1, 1}, host.data(), out.p, 0LL, 1LL);
  CHECK_THAT(e, Catch::Contains("not in any device buffer"));
}

TEST_CASE("emulator: stores past a buffer hit the guard page or the guard bytes", "[cpu]") {
  Buf<float> a(1001), b(1024);  // 4004 bytes: 12 guard bytes before the page; 4096: page-exact
  std::string e = run("emu_store_past_end_bug", {1, 1, 1}, {32, 1, 1}, b.p, 1024LL, 1LL);
  CHECK_THAT(e, Catch::Contains("invalid memory access") && Catch::Contains("0 bytes past the end"));
  e = run("emu_store_past_end_bug", {1, 1, 1}, {32, 1, 1}, a.p, 1001LL, 1LL);
  CHECK_THAT(e, Catch::Contains("written 0 bytes past its end"));
  // The test wrote a guard byte on purpose; repair it so later launches check cleanly.
  std::memset(a.p + 1001, 0xFF, sizeof(float));
  e = run("emu_store_past_end_bug", {1, 1, 1}, {32, 1, 1}, a.p, 1001LL, -1001LL);
  CHECK_THAT(e, Catch::Contains("before its start"));
  std::memset(a.p - 1, 0xFF, sizeof(float));
  slowed_emu::check_device_buffers();
}

TEST_CASE("emulator: shared memory and fresh buffers start poisoned", "[cpu]") {
  Buf<float> out(32);
  REQUIRE(run("emu_uninitialized_shared_bug", {1, 1, 1}, {32, 1, 1}, out.p) == "");
  CHECK(std::isnan(out.p[0]));
  Buf<float> fresh(4);
  CHECK(std::isnan(fresh.p[3]));
}

TEST_CASE("emulator: launches are checked as the driver checks them", "[cpu]") {
  Buf<int> out(2048);
  CHECK(run("emu_bounded", {1, 1, 1}, {64, 1, 1}, out.p) == "");
  CHECK(out.p[63] == 7);
  CHECK_THAT(run("emu_bounded", {1, 1, 1}, {128, 1, 1}, out.p),
             Catch::Contains("__launch_bounds__ (64)"));
  CHECK_THAT(run("emu_indices", {1, 1, 1}, {1025, 1, 1}, out.p), Catch::Contains("1024"));
  CHECK_THAT(run("emu_indices", {0, 1, 1}, {32, 1, 1}, out.p), Catch::Contains("positive"));
}

TEST_CASE("emulator: 3-D grids and blocks get every index once, in every block order", "[cpu]") {
  const slowed_emu::uint3 grid{3, 2, 2}, block{4, 3, 2};
  const unsigned nb = 12, nt = 24;
  Buf<unsigned> out(2 * nb * nt);
  for (Order o : kOrders) {
    ScheduleGuard g(o, o, 7);
    std::memset(out.p, 0xFF, 2 * nb * nt * sizeof(unsigned));
    REQUIRE(run("emu_indices", grid, block, out.p) == "");
    for (unsigned b = 0; b < nb; ++b) {
      for (unsigned t = 0; t < nt; ++t) {
        CHECK(out.p[2 * (b * nt + t)] == b);
        CHECK(out.p[2 * (b * nt + t) + 1] == t);
      }
    }
  }
}

#if defined(__x86_64__)
typedef float f4 __attribute__((vector_size(16)));
typedef short h8 __attribute__((vector_size(16)));
// The hardware conversion (round to nearest even), as the oracle of cvt_rn_f16_f32.
__attribute__((target("f16c"))) static unsigned short f16c_round(float f) {
  const f4 v = {f, 0.f, 0.f, 0.f};
  const h8 h = __builtin_ia32_vcvtps2ph(v, 0);
  return static_cast<unsigned short>(h[0]);
}
#endif

TEST_CASE("emulator: the fp16 conversions replacing PTX cvt round to nearest even", "[cpu]") {
  // Every half converts to float and back to itself (NaNs to a NaN).
  for (unsigned h = 0; h < 65536; ++h) {
    const float f = slowed_emu::cvt_f32_f16(static_cast<unsigned short>(h));
    const unsigned short back = slowed_emu::cvt_rn_f16_f32(f);
    if ((h & 0x7c00u) == 0x7c00u && (h & 0x3ffu)) {
      REQUIRE(std::isnan(f));
      REQUIRE((back & 0x7c00u) == 0x7c00u);
      REQUIRE((back & 0x3ffu) != 0);
    } else {
      REQUIRE(back == h);
    }
  }
#if defined(__x86_64__)
  if (__builtin_cpu_supports("f16c")) {
    std::mt19937 rng(3);
    for (int i = 0; i < 2000000; ++i) {
      uint32_t u = rng();
      if (i % 2) u = (u & 0x807fffffu) | ((96u + (u >> 23) % 48u) << 23);  // near the half range
      float f;
      std::memcpy(&f, &u, 4);
      if (std::isnan(f)) continue;
      REQUIRE(slowed_emu::cvt_rn_f16_f32(f) == f16c_round(f));
    }
  }
#endif
  // Through the generator's replacement of the inline PTX, inside a kernel.
  const float in[] = {0.f, -0.f, 1.f, 65504.f, 65520.f, 1e-8f, 5.96e-8f, 2.98e-8f, 0.1f, -3.5f};
  const long long n = sizeof(in) / sizeof(in[0]);
  Buf<float> x(n), back(n);
  Buf<unsigned short> h(n);
  std::memcpy(x.p, in, sizeof in);
  REQUIRE(run("emu_f16_round_trip", {1, 1, 1}, {32, 1, 1}, x.p, h.p, back.p, n) == "");
  for (long long i = 0; i < n; ++i) {
    CHECK(h.p[i] == slowed_emu::cvt_rn_f16_f32(in[i]));
    CHECK(back.p[i] == slowed_emu::cvt_f32_f16(h.p[i]));
  }
  CHECK(h.p[4] == 0x7c00u);  // 65520 rounds to +Inf
}

TEST_CASE("emulator: the library's smoke kernels match host arithmetic", "[cpu]") {
  const long long n = 10007;
  Buf<float> x(n), y(n), out(n);
  Buf<unsigned short> xb(n), yb(n), ob(n);
  for (long long i = 0; i < n; ++i) {
    x.p[i] = static_cast<float>(i % 101) * 0.25f;
    y.p[i] = static_cast<float>(i % 13) - 6.f;
    unsigned ux, uy;
    std::memcpy(&ux, &x.p[i], 4);
    std::memcpy(&uy, &y.p[i], 4);
    xb.p[i] = static_cast<unsigned short>(ux >> 16);  // exact: few significant bits
    yb.p[i] = static_cast<unsigned short>(uy >> 16);
  }
  const float alpha = 2.f;
  REQUIRE(run("slowed_scale_add_f32", {7, 1, 1}, {128, 1, 1}, out.p, x.p, y.p, alpha, n) == "");
  REQUIRE(run("slowed_scale_add_bf16", {7, 1, 1}, {128, 1, 1}, ob.p, xb.p, yb.p, alpha, n) == "");
  for (long long i = 0; i < n; ++i) {
    REQUIRE(out.p[i] == alpha * x.p[i] + y.p[i]);
    const float r = alpha * x.p[i] + y.p[i];
    unsigned u;
    std::memcpy(&u, &r, 4);
    REQUIRE(ob.p[i] == static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16));
  }
}

// The emulator's scheduler, fibers, warp collectives, device memory and kernel registry
// (emulator.h; design in docs/emulator.md).

#include "emulator.h"

#include <dlfcn.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace slowed_emu {

const char* order_name(Order order) {
  switch (order) {
    case Order::Forward: return "forward";
    case Order::Reverse: return "reverse";
    case Order::Random: return "random";
  }
  return "?";
}

Schedule& schedule() {
  static Schedule s;
  return s;
}

Stats& stats() {
  static Stats s;
  return s;
}

// ---- kernel registry -------------------------------------------------------------------------

namespace {

std::map<std::pair<std::string, std::string>, Kernel>& kernel_table() {
  static auto* table = new std::map<std::pair<std::string, std::string>, Kernel>();
  return *table;
}

}  // namespace

void register_kernel(const Kernel& kernel) {
  kernel_table()[{kernel.identity, kernel.name}] = kernel;
}

const Kernel* find_kernel(const std::string& identity, const std::string& name) {
  auto it = kernel_table().find({identity, name});
  return it == kernel_table().end() ? nullptr : &it->second;
}

std::vector<const Kernel*> registered_kernels() {
  std::vector<const Kernel*> out;
  for (const auto& e : kernel_table()) out.push_back(&e.second);
  return out;
}

void load_kernels(void (*register_linked)()) {
  static std::once_flag once;
  std::call_once(once, [register_linked] {
    register_linked();
    const char* extra = std::getenv("SLOWED_EMU_KERNELS");
    if (extra == nullptr || *extra == '\0') return;
    void* lib = dlopen(extra, RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      throw Error(std::string("SLOWED_EMU_KERNELS: cannot load '") + extra + "': " + dlerror());
    }
    auto* reg = reinterpret_cast<void (*)()>(dlsym(lib, "slowed_emu_register_generated"));
    if (reg == nullptr) {
      throw Error(std::string("SLOWED_EMU_KERNELS: '") + extra +
                  "' has no slowed_emu_register_generated (not written by the generator)");
    }
    reg();
    std::fprintf(stderr, "slowed emulator: kernels from %s\n", extra);
  });
}

// ---- device memory ---------------------------------------------------------------------------

namespace {

constexpr unsigned char kPoison = 0xFF;

struct Buffer {
  uint64_t id = 0;
  char* map = nullptr;  // the whole mapping, guard pages included
  size_t map_bytes = 0;
  char* data = nullptr;
  size_t bytes = 0;
  char* guard_low_end = nullptr;  // first byte after the lower guard page
  char* guard_high = nullptr;     // first byte of the upper guard page
};

struct Memory {
  std::mutex mutex;
  std::map<uintptr_t, Buffer> by_data;  // keyed by data start
  uint64_t next_id = 1;
};

Memory& memory() {
  static auto* m = new Memory();
  return *m;
}

size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

// The buffer whose mapping holds `p` (guard pages included), or null. Caller holds the mutex.
const Buffer* buffer_of_locked(Memory& m, uintptr_t p) {
  auto it = m.by_data.upper_bound(p);
  // A pointer in the lower guard/pad region belongs to the next buffer; check both neighbours.
  const Buffer* found = nullptr;
  if (it != m.by_data.end()) {
    const Buffer& b = it->second;
    if (p >= reinterpret_cast<uintptr_t>(b.map)) found = &b;
  }
  if (!found && it != m.by_data.begin()) {
    const Buffer& b = std::prev(it)->second;
    if (p < reinterpret_cast<uintptr_t>(b.map) + b.map_bytes) found = &b;
  }
  return found;
}

std::string describe_locked(Memory& m, const void* ptr) {
  const auto p = reinterpret_cast<uintptr_t>(ptr);
  const Buffer* b = buffer_of_locked(m, p);
  std::ostringstream s;
  if (b == nullptr) {
    s << "not in any device buffer";
    return s.str();
  }
  const auto d = reinterpret_cast<uintptr_t>(b->data);
  if (p < d) {
    s << (d - p) << " bytes before the start of";
  } else if (p >= d + b->bytes) {
    s << (p - d - b->bytes) << " bytes past the end of";
  } else {
    s << "byte " << (p - d) << " of";
  }
  s << " device buffer #" << b->id << " (" << b->bytes << " bytes at " << ptr << " - " << (p - d)
    << ")";
  return s.str();
}

}  // namespace

void* device_alloc(size_t bytes) {
  const size_t page = page_size();
  const size_t body = (bytes + 16 + page - 1) / page * page;  // >= 16 pad bytes below the data
  const size_t map_bytes = body + 2 * page;
  void* map = mmap(nullptr, map_bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
  if (map == MAP_FAILED) throw Error("device_alloc: mmap of " + std::to_string(map_bytes) + " bytes failed");
  char* base = static_cast<char*>(map);
  if (mprotect(base + page, body, PROT_READ | PROT_WRITE) != 0) {
    munmap(map, map_bytes);
    throw Error("device_alloc: mprotect failed");
  }
  Buffer b;
  b.map = base;
  b.map_bytes = map_bytes;
  b.guard_low_end = base + page;
  b.guard_high = base + page + body;
  // End as close to the upper guard page as 16-byte alignment allows.
  const auto end = reinterpret_cast<uintptr_t>(b.guard_high);
  b.data = reinterpret_cast<char*>((end - bytes) & ~uintptr_t(15));
  b.bytes = bytes;
  std::memset(b.guard_low_end, kPoison, body);
  Memory& m = memory();
  std::lock_guard<std::mutex> lock(m.mutex);
  b.id = m.next_id++;
  m.by_data[reinterpret_cast<uintptr_t>(b.data)] = b;
  return b.data;
}

void device_free(void* ptr) {
  if (ptr == nullptr) return;
  Memory& m = memory();
  Buffer b;
  {
    std::lock_guard<std::mutex> lock(m.mutex);
    auto it = m.by_data.find(reinterpret_cast<uintptr_t>(ptr));
    if (it == m.by_data.end()) {
      std::fprintf(stderr, "slowed emulator: device_free of %p, which is not a device buffer\n", ptr);
      std::abort();
    }
    b = it->second;
    m.by_data.erase(it);
  }
  munmap(b.map, b.map_bytes);
}

size_t device_buffers_live() {
  Memory& m = memory();
  std::lock_guard<std::mutex> lock(m.mutex);
  return m.by_data.size();
}

void check_device_buffers() {
  Memory& m = memory();
  std::lock_guard<std::mutex> lock(m.mutex);
  for (const auto& e : m.by_data) {
    const Buffer& b = e.second;
    for (const char* p = b.guard_low_end; p < b.data; ++p) {
      if (static_cast<unsigned char>(*p) != kPoison) {
        throw Error("device buffer #" + std::to_string(b.id) + " (" + std::to_string(b.bytes) +
                    " bytes) was written " + std::to_string(b.data - p) +
                    " bytes before its start");
      }
    }
    for (const char* p = b.data + b.bytes; p < b.guard_high; ++p) {
      if (static_cast<unsigned char>(*p) != kPoison) {
        throw Error("device buffer #" + std::to_string(b.id) + " (" + std::to_string(b.bytes) +
                    " bytes) was written " + std::to_string(p - b.data - b.bytes) +
                    " bytes past its end");
      }
    }
  }
}

std::string describe_address(const void* ptr) {
  Memory& m = memory();
  std::lock_guard<std::mutex> lock(m.mutex);
  return describe_locked(m, ptr);
}

// ---- fp16 ------------------------------------------------------------------------------------

float cvt_f32_f16(unsigned short h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13) | (mant ? 0x400000u : 0u);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    bits = sign | ((112 - e) << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

unsigned short cvt_rn_f16_f32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const unsigned short sign = static_cast<unsigned short>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fff;                       // NaN (PTX's canonical NaN)
  if (a >= 0x477ff000u) return sign | 0x7c00u;              // rounds to >= 65536: Inf
  if (a >= 0x38800000u) {                                   // normal half
    const uint32_t r = a - 0x38000000u;                     // rebias exponent 127 -> 15
    const uint32_t m = r + 0xfffu + ((r >> 13) & 1u);       // round to nearest even
    return static_cast<unsigned short>(sign | (m >> 13));
  }
  if (a < 0x33000000u) return sign;                         // below half the smallest subnormal
  // Subnormal half: value = a's significand * 2^(e-150); half unit = 2^-24.
  const uint32_t e = a >> 23, mant = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126 - e;  // value / 2^-24 = mant * 2^(e - 126)
  const uint32_t q = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
  uint32_t r = q;
  if (rem > half || (rem == half && (q & 1u))) ++r;
  return static_cast<unsigned short>(sign | r);
}

// ---- fibers ----------------------------------------------------------------------------------

namespace detail {
ThreadContext* current_thread = nullptr;
}

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr unsigned kMaxThreads = 1024;

enum class State : unsigned char { Runnable, AtBarrier, AtWarp, Done, Failed };

struct Fiber {
  detail::ThreadContext ctx;
  State state = State::Done;
  int wait_line = 0;
  const char* wait_file = "";
  uint64_t result = 0;
  char* stack = nullptr;  // mapping: guard page, then kStackBytes
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

struct Pending {  // one warp collective waiting for its lanes
  int line = 0;
  const char* file = "";
  detail::WarpOp op = detail::WarpOp::SyncWarp;
  unsigned mask = 0, arrived = 0;
  int width = 32;
};

struct Warp {
  uint64_t value[32];
  int param[32];
  std::vector<Pending> pending;
  unsigned present = 0;  // lanes that exist in this block
};

struct Run {
  const Kernel* kernel = nullptr;
  void** args = nullptr;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  unsigned nthreads = 0;
  std::string error;
  std::string where;  // "kernel 'k' block (x,y,z)"
#if defined(__x86_64__)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler_uc;
#endif
  Fiber* current = nullptr;
  std::vector<std::pair<void*, size_t>> shared;  // registered __shared__ variables
};

Run& run() {
  static auto* r = new Run();
  return *r;
}

std::mutex& launch_mutex() {
  static auto* m = new std::mutex();
  return *m;
}

}  // namespace
}  // namespace slowed_emu

#if defined(__x86_64__)
// slowed_emu_switch(save, load): saves the callee-saved registers, MXCSR and the x87 control word
// on the current stack, stores the stack pointer in *save, switches to `load` and restores.
extern "C" void slowed_emu_switch(void** save, void* load);
asm(R"(
  .text
  .globl slowed_emu_switch
  .type slowed_emu_switch, @function
slowed_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size slowed_emu_switch, .-slowed_emu_switch
)");
#endif

namespace slowed_emu {
namespace {

void to_scheduler() {
  Run& r = run();
  Fiber* f = r.current;
  ++stats().context_switches;
#if defined(__x86_64__)
  slowed_emu_switch(&f->sp, r.scheduler_sp);
#else
  swapcontext(&f->uc, &r.scheduler_uc);
#endif
}

void resume(Fiber& f) {
  Run& r = run();
  r.current = &f;
  detail::current_thread = &f.ctx;
  ++stats().context_switches;
#if defined(__x86_64__)
  slowed_emu_switch(&r.scheduler_sp, f.sp);
#else
  swapcontext(&r.scheduler_uc, &f.uc);
#endif
  r.current = nullptr;
  detail::current_thread = nullptr;
}

[[noreturn]] void fiber_main() {
  Run& r = run();
  r.kernel->invoke(r.args);
  r.current->state = State::Done;
  to_scheduler();
  std::abort();  // a finished thread is never resumed
}

void init_fiber(Fiber& f) {
  if (f.stack == nullptr) {
    const size_t page = page_size();
    void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) throw Error("emulator: cannot map a thread stack");
    mprotect(m, page, PROT_NONE);  // overflow faults instead of corrupting the next stack
    f.stack = static_cast<char*>(m);
  }
  char* top = f.stack + page_size() + kStackBytes;
#if defined(__x86_64__)
  auto* sp = reinterpret_cast<uint64_t*>(top - 72);  // sp = 8 (mod 16): the entry sees a call
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  sp[0] = mxcsr | (static_cast<uint64_t>(fpucw) << 32);
  for (int i = 1; i <= 6; ++i) sp[i] = 0;  // r15 r14 r13 r12 rbx rbp
  sp[7] = reinterpret_cast<uint64_t>(&fiber_main);
  sp[8] = 0;  // the entry never returns
  f.sp = sp;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack + page_size();
  f.uc.uc_stack.ss_size = kStackBytes;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, reinterpret_cast<void (*)()>(&fiber_main), 0);
#endif
}

std::string thread_name(const Fiber& f) {
  std::ostringstream s;
  s << "thread (" << f.ctx.thread_idx.x << "," << f.ctx.thread_idx.y << "," << f.ctx.thread_idx.z
    << ")";
  return s.str();
}

std::string lanes_string(unsigned mask) {
  std::ostringstream s;
  s << "{";
  bool first = true;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    int e = l;
    while (e + 1 < 32 && (mask >> (e + 1) & 1u)) ++e;
    s << (first ? "" : ",") << l;
    if (e > l) s << "-" << e;
    first = false;
    l = e;
  }
  s << "}";
  return s.str();
}

const char* op_name(detail::WarpOp op) {
  switch (op) {
    case detail::WarpOp::ShflIdx: return "__shfl_sync";
    case detail::WarpOp::ShflUp: return "__shfl_up_sync";
    case detail::WarpOp::ShflDown: return "__shfl_down_sync";
    case detail::WarpOp::ShflXor: return "__shfl_xor_sync";
    case detail::WarpOp::Ballot: return "__ballot_sync";
    case detail::WarpOp::Any: return "__any_sync";
    case detail::WarpOp::All: return "__all_sync";
    case detail::WarpOp::SyncWarp: return "__syncwarp";
  }
  return "?";
}

std::string site(const char* file, int line) {
  return std::string(file) + ":" + std::to_string(line);
}

// Fault handling: a SIGSEGV/SIGBUS in a kernel thread (a guard page, a stack overflow) jumps
// back to the launch, which reports the address.
sigjmp_buf fault_jump;
volatile sig_atomic_t in_launch = 0;
void* volatile fault_address = nullptr;
volatile int fault_signal = 0;

void on_fault(int sig, siginfo_t* info, void*) {
  if (!in_launch) {
    signal(sig, SIG_DFL);
    raise(sig);
    return;
  }
  fault_address = info->si_addr;
  fault_signal = sig;
  siglongjmp(fault_jump, 1);
}

struct FaultHandlers {
  struct sigaction old_segv, old_bus;
  stack_t old_stack;
  FaultHandlers() {
    static char* alt = static_cast<char*>(std::malloc(1 << 16));
    stack_t ss;
    ss.ss_sp = alt;
    ss.ss_size = 1 << 16;
    ss.ss_flags = 0;
    sigaltstack(&ss, &old_stack);
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = &on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &old_segv);
    sigaction(SIGBUS, &sa, &old_bus);
  }
  ~FaultHandlers() {
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
    sigaltstack(&old_stack, nullptr);
  }
};

std::vector<unsigned> make_order(unsigned n, Order order, std::mt19937_64& rng) {
  std::vector<unsigned> v(n);
  std::iota(v.begin(), v.end(), 0u);
  if (order == Order::Reverse) std::reverse(v.begin(), v.end());
  if (order == Order::Random) std::shuffle(v.begin(), v.end(), rng);
  return v;
}

// Why nobody can run: a deadlock or a divergent barrier. Returns "" when every live thread waits
// at the same __syncthreads (the barrier then completes).
std::string blocked_reason(Run& r) {
  unsigned done = 0, at_barrier = 0, at_warp = 0;
  const Fiber* first_barrier = nullptr;
  const Fiber* first_done = nullptr;
  for (unsigned t = 0; t < r.nthreads; ++t) {
    const Fiber& f = r.fibers[t];
    if (f.state == State::Done) {
      ++done;
      if (!first_done) first_done = &f;
    } else if (f.state == State::AtBarrier) {
      ++at_barrier;
      if (!first_barrier) first_barrier = &f;
    } else if (f.state == State::AtWarp) {
      ++at_warp;
    }
  }
  std::ostringstream s;
  if (at_warp > 0) {
    for (unsigned w = 0; w < r.warps.size(); ++w) {
      for (const Pending& p : r.warps[w].pending) {
        const unsigned missing = p.mask & ~p.arrived;
        s << "deadlock: " << op_name(p.op) << " at " << site(p.file, p.line) << " in warp " << w
          << " waits for lanes " << lanes_string(missing) << " of mask " << lanes_string(p.mask)
          << ", which";
        for (int l = 0; l < 32; ++l) {
          if (!(missing >> l & 1u)) continue;
          const unsigned t = w * 32 + l;
          if (t >= r.nthreads) {
            s << " do not exist (the block has " << r.nthreads << " threads)";
          } else if (r.fibers[t].state == State::Done) {
            s << " exited (first: lane " << l << ")";
          } else if (r.fibers[t].state == State::AtBarrier) {
            s << " wait at __syncthreads at "
              << site(r.fibers[t].wait_file, r.fibers[t].wait_line) << " (first: lane " << l << ")";
          } else {
            s << " wait at another warp collective (first: lane " << l << ")";
          }
          break;
        }
        return s.str();
      }
    }
    return "deadlock: threads wait at a warp collective that cannot complete";
  }
  if (at_barrier > 0 && done > 0) {
    s << "divergent __syncthreads: " << thread_name(*first_barrier) << " waits at "
      << site(first_barrier->wait_file, first_barrier->wait_line) << " but " << done
      << " threads of the block exited without reaching it (first: " << thread_name(*first_done)
      << ")";
    return s.str();
  }
  for (unsigned t = 0; t < r.nthreads; ++t) {
    const Fiber& f = r.fibers[t];
    if (f.state == State::AtBarrier &&
        (f.wait_line != first_barrier->wait_line ||
         std::strcmp(f.wait_file, first_barrier->wait_file) != 0)) {
      s << "divergent __syncthreads: " << thread_name(*first_barrier) << " waits at "
        << site(first_barrier->wait_file, first_barrier->wait_line) << ", "
        << thread_name(f) << " at " << site(f.wait_file, f.wait_line);
      return s.str();
    }
  }
  return "";
}

void poison_shared(Run& r) {
  for (const auto& v : r.shared) std::memset(v.first, kPoison, v.second);
}

void run_block(Run& r, uint3 block_idx, uint3 grid, uint3 block, std::mt19937_64& rng) {
  for (unsigned t = 0; t < r.nthreads; ++t) {
    Fiber& f = r.fibers[t];
    f.ctx.thread_idx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
    f.ctx.block_idx = block_idx;
    f.ctx.block_dim = block;
    f.ctx.grid_dim = grid;
    f.ctx.linear = t;
    f.ctx.warp = t / 32;
    f.ctx.lane = t % 32;
    f.state = State::Runnable;
    init_fiber(f);
  }
  for (unsigned w = 0; w < r.warps.size(); ++w) {
    r.warps[w].pending.clear();
    const unsigned lanes = std::min(32u, r.nthreads - w * 32);
    r.warps[w].present = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  }
  poison_shared(r);
  for (;;) {
    const std::vector<unsigned> order = make_order(r.nthreads, schedule().threads, rng);
    for (unsigned t : order) {
      Fiber& f = r.fibers[t];
      if (f.state != State::Runnable) continue;
      resume(f);
      if (!r.error.empty()) throw Error(r.where + ": " + r.error);
    }
    bool all_done = true, any_runnable = false;
    for (unsigned t = 0; t < r.nthreads; ++t) {
      all_done = all_done && r.fibers[t].state == State::Done;
      any_runnable = any_runnable || r.fibers[t].state == State::Runnable;
    }
    if (all_done) return;
    if (any_runnable) continue;
    const std::string why = blocked_reason(r);
    if (!why.empty()) throw Error(r.where + ": " + why);
    for (unsigned t = 0; t < r.nthreads; ++t) r.fibers[t].state = State::Runnable;
    ++stats().barriers;
  }
}

}  // namespace

namespace detail {

void fail(const std::string& what) {
  Run& r = run();
  if (r.current == nullptr) throw Error(what);
  r.error = thread_name(*r.current) + ": " + what;
  r.current->state = State::Failed;
  to_scheduler();
  std::abort();  // a failed thread is never resumed
}

void syncthreads(int line, const char* file) {
  Run& r = run();
  Fiber* f = r.current;
  if (f == nullptr) throw Error("__syncthreads called outside a kernel");
  f->state = State::AtBarrier;
  f->wait_line = line;
  f->wait_file = file;
  to_scheduler();
}

uint64_t warp_collective(int line, const char* file, WarpOp op, unsigned mask, uint64_t value,
                         int param, int width) {
  Run& r = run();
  Fiber* f = r.current;
  if (f == nullptr) throw Error("warp collective called outside a kernel");
  ++stats().warp_collectives;
  Warp& w = r.warps[f->ctx.warp];
  const unsigned lane = f->ctx.lane, bit = 1u << lane;
  auto here = [&] { return std::string(op_name(op)) + " at " + site(file, line); };
  if (!(mask & bit)) fail(here() + ": the calling lane " + std::to_string(lane) + " is not in mask " + lanes_string(mask));
  if (mask & ~w.present) {
    fail(here() + ": mask " + lanes_string(mask) + " names lanes " + lanes_string(mask & ~w.present) +
         " that do not exist in this block of " + std::to_string(r.nthreads) + " threads");
  }
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fail(here() + ": width " + std::to_string(width) + " is not a power of 2 in [1, 32]");
  }
  Pending* p = nullptr;
  for (Pending& q : w.pending) {
    if (q.mask & bit) {
      p = &q;
      break;
    }
    if (q.mask & mask) {
      fail(here() + " with mask " + lanes_string(mask) + " overlaps " + op_name(q.op) + " at " +
           site(q.file, q.line) + " with mask " + lanes_string(q.mask));
    }
  }
  if (p == nullptr) {
    w.pending.push_back(Pending{line, file, op, mask, 0, width});
    p = &w.pending.back();
  } else if (p->line != line || std::strcmp(p->file, file) != 0 || p->op != op ||
             p->mask != mask || p->width != width) {
    fail("divergent warp collective: lane " + std::to_string(lane) + " calls " + here() +
         " (mask " + lanes_string(mask) + ", width " + std::to_string(width) +
         ") while lanes " + lanes_string(p->arrived) + " wait at " + op_name(p->op) + " at " +
         site(p->file, p->line) + " (mask " + lanes_string(p->mask) + ", width " +
         std::to_string(p->width) + ")");
  }
  w.value[lane] = value;
  w.param[lane] = param;
  p->arrived |= bit;
  if (p->arrived != p->mask) {
    f->state = State::AtWarp;
    to_scheduler();
    return f->result;
  }
  // The last lane completes the collective for everyone.
  const Pending done = *p;
  w.pending.erase(w.pending.begin() + (p - w.pending.data()));
  uint64_t ballot = 0;
  for (int l = 0; l < 32; ++l) {
    if ((done.mask >> l & 1u) && w.value[l] != 0) ballot |= 1ull << l;
  }
  for (int l = 0; l < 32; ++l) {
    if (!(done.mask >> l & 1u)) continue;
    Fiber& lf = r.fibers[f->ctx.warp * 32 + l];
    const int seg = l & ~(done.width - 1);
    int src = l;
    switch (done.op) {
      case WarpOp::ShflIdx: src = seg + (w.param[l] & (done.width - 1)); break;
      case WarpOp::ShflUp: src = l - seg >= w.param[l] ? l - w.param[l] : l; break;
      case WarpOp::ShflDown: src = l - seg + w.param[l] < done.width ? l + w.param[l] : l; break;
      case WarpOp::ShflXor:
        src = l ^ w.param[l];
        if (src >= seg + done.width || src < 0 || src > 31) src = l;
        break;
      default: break;
    }
    uint64_t res = 0;
    switch (done.op) {
      case WarpOp::Ballot: res = ballot; break;
      case WarpOp::Any: res = ballot != 0; break;
      case WarpOp::All: res = ballot == done.mask; break;
      case WarpOp::SyncWarp: res = 0; break;
      default:
        if (!(done.mask >> src & 1u)) {
          fail(here() + ": lane " + std::to_string(l) + " reads lane " + std::to_string(src) +
               ", which is not in mask " + lanes_string(done.mask));
        }
        res = w.value[src];
    }
    lf.result = res;
    if (&lf != f) lf.state = State::Runnable;
  }
  return f->result;
}

void check_vector_access(const void* ptr, size_t bytes, bool write) {
  ++stats().vector_accesses;
  const char* what = write ? "vector store" : "vector load";
  const auto p = reinterpret_cast<uintptr_t>(ptr);
  if (p % bytes != 0) {
    fail(std::to_string(bytes) + "-byte " + what + " at " + std::to_string(p % bytes) +
         " bytes off alignment: " + describe_address(ptr));
  }
  Memory& m = memory();
  std::string why;
  {
    std::lock_guard<std::mutex> lock(m.mutex);
    const Buffer* b = buffer_of_locked(m, p);
    if (b != nullptr && p >= reinterpret_cast<uintptr_t>(b->data) &&
        p + bytes <= reinterpret_cast<uintptr_t>(b->data) + b->bytes) {
      return;
    }
    why = describe_locked(m, ptr);
  }
  fail(std::to_string(bytes) + "-byte " + what + " out of bounds: " + why);
}

bool register_shared(void* ptr, size_t bytes, const char* /*name*/) {
  run().shared.emplace_back(ptr, bytes);
  std::memset(ptr, kPoison, bytes);
  return true;
}

}  // namespace detail

void launch(const Kernel& kernel, uint3 grid, uint3 block, unsigned dynamic_shared_bytes,
            void** args) {
  const unsigned long long threads =
      static_cast<unsigned long long>(block.x) * block.y * block.z;
  auto bad = [&](const std::string& why) {
    throw Error("launching '" + kernel.name + "' with grid (" + std::to_string(grid.x) + ", " +
                std::to_string(grid.y) + ", " + std::to_string(grid.z) + "), block (" +
                std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
                std::to_string(block.z) + "): " + why);
  };
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 || block.z == 0)
    bad("every dimension must be positive");
  if (threads > kMaxThreads) bad("more than 1024 threads per block");
  if (block.z > 64) bad("block.z above 64");
  if (threads > kernel.max_threads)
    bad("more threads than the kernel's __launch_bounds__ (" + std::to_string(kernel.max_threads) + ")");
  if (grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) bad("grid above the limits");
  if (dynamic_shared_bytes != 0) bad("dynamic shared memory is not emulated");

  std::lock_guard<std::mutex> lock(launch_mutex());
  Run& r = run();
  r.kernel = &kernel;
  r.args = args;
  r.nthreads = static_cast<unsigned>(threads);
  if (r.fibers.size() < r.nthreads) r.fibers.resize(r.nthreads);
  r.warps.assign((r.nthreads + 31) / 32, Warp());
  r.error.clear();
  ++stats().launches;

  const unsigned long long nblocks = static_cast<unsigned long long>(grid.x) * grid.y * grid.z;
  std::mt19937_64 rng(schedule().seed * 0x9e3779b97f4a7c15ull + stats().launches);
  std::vector<unsigned long long> blocks(nblocks);
  std::iota(blocks.begin(), blocks.end(), 0ull);
  if (schedule().blocks == Order::Reverse) std::reverse(blocks.begin(), blocks.end());
  if (schedule().blocks == Order::Random) std::shuffle(blocks.begin(), blocks.end(), rng);

  FaultHandlers handlers;
  volatile unsigned long long current_block = 0;
  if (sigsetjmp(fault_jump, 1) != 0) {
    in_launch = 0;
    std::ostringstream s;
    const unsigned long long b = current_block;
    s << "kernel '" << kernel.name << "' block " << b << ": "
      << (run().current ? thread_name(*run().current) : std::string("a thread")) << ": "
      << (fault_signal == SIGBUS ? "bus error" : "invalid memory access") << " at "
      << fault_address << ", " << describe_address(fault_address)
      << " (a guard page, or a thread stack overflow)";
    run().current = nullptr;
    detail::current_thread = nullptr;
    throw Error(s.str());
  }
  in_launch = 1;
  try {
    for (unsigned long long lb : blocks) {
      current_block = lb;
      const uint3 bi{static_cast<unsigned>(lb % grid.x),
                     static_cast<unsigned>((lb / grid.x) % grid.y),
                     static_cast<unsigned>(lb / (static_cast<unsigned long long>(grid.x) * grid.y))};
      std::ostringstream where;
      where << "kernel '" << kernel.name << "' block (" << bi.x << "," << bi.y << "," << bi.z << ")";
      r.where = where.str();
      run_block(r, bi, grid, block, rng);
      ++stats().blocks;
      stats().threads += r.nthreads;
    }
  } catch (...) {
    in_launch = 0;
    r.current = nullptr;
    detail::current_thread = nullptr;
    throw;
  }
  in_launch = 0;
  check_device_buffers();
}

}  // namespace slowed_emu

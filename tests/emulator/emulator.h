#pragma once

// slowed's host emulator of its CUDA kernel sources (docs/emulator.md).
//
// The kernel sources are plain strings without CUDA headers, so the text NVRTC compiles also
// compiles as host C++17 against cuda_shim.h (generate_kernels.cpp writes those files at build
// time from the library's own kernel registry). This core runs them: each CUDA thread is a
// cooperative fiber with its own stack, blocks run one at a time, `__syncthreads` is a block
// barrier that reports deadlock and divergence, warp collectives wait for every lane of their
// mask, `__shared__` variables are poisoned at every block start, 16-byte vector accesses are
// checked for alignment and bounds, and device buffers sit between guard pages. Thread and
// block order are selectable (forward, reverse, seeded random) so that tests can show results do
// not depend on them. No torch here: the torch glue is torch_device.h.

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace slowed_emu {

/// CUDA's uint3 / dim3 (fields only).
struct uint3 {
  unsigned x = 1, y = 1, z = 1;
};

/// A kernel bug or a launch error found by the emulator (message names kernel, block, thread).
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The order in which the scheduler resumes threads (every round) and runs blocks.
enum class Order { Forward, Reverse, Random };
const char* order_name(Order order);

struct Schedule {
  Order threads = Order::Forward;
  Order blocks = Order::Forward;
  uint64_t seed = 1;  ///< for Order::Random
};
/// The schedule every launch uses (tests change it).
Schedule& schedule();

/// One emulated entry point, registered by the generated code.
struct Kernel {
  std::string identity;  ///< slowed::cuda::KernelSource::identity() of the variant compiled
  std::string name;      ///< the extern "C" name
  void (*invoke)(void** args) = nullptr;  ///< unpacks cuLaunchKernel-style args and calls it
  unsigned max_threads = 1024;            ///< __launch_bounds__, else the hardware limit
};

void register_kernel(const Kernel& kernel);  ///< replaces an entry of the same identity and name
const Kernel* find_kernel(const std::string& identity, const std::string& name);
std::vector<const Kernel*> registered_kernels();

/// Registers the kernels linked into this program (`register_linked`: the generated
/// `slowed_emu_register_generated`), then, when $SLOWED_EMU_KERNELS names a shared library, that
/// library's kernels over them (how scripts/mutate_kernels.py runs altered kernel text). Runs once
/// per process.
void load_kernels(void (*register_linked)());

/// Counters since start (tests and docs report them).
struct Stats {
  uint64_t launches = 0, blocks = 0, threads = 0, barriers = 0, warp_collectives = 0,
           vector_accesses = 0, context_switches = 0;
};
Stats& stats();

/// Runs `kernel` on grid x block threads with `args` as cuLaunchKernel takes them, synchronously.
/// Checks what the driver checks (block size, launch bounds, grid limits, dynamic shared memory).
/// Throws Error for a launch error or a kernel bug; afterwards checks the device buffers' guard
/// bytes.
void launch(const Kernel& kernel, uint3 grid, uint3 block, unsigned dynamic_shared_bytes,
            void** args);

// ---- device memory ---------------------------------------------------------------------------

/// A buffer between two inaccessible guard pages, its end on the upper guard page and its start
/// 16-byte aligned (the bytes between the lower guard page and the start, and any below 16 after
/// the end, are filled with 0xFF and checked after every launch). Contents start as 0xFF bytes
/// (NaN in every float type), as memory from cudaMalloc holds no defined values.
void* device_alloc(size_t bytes);
void device_free(void* ptr);
size_t device_buffers_live();
/// Checks the guard bytes of every live buffer; throws Error naming a buffer that was written
/// out of bounds.
void check_device_buffers();
/// "12 bytes past the end of device buffer #3 (4096 bytes at 0x...)", or "not in any device
/// buffer".
std::string describe_address(const void* ptr);

// ---- fp16 conversions of PTX cvt (the generator replaces the inline PTX with these) ----------
float cvt_f32_f16(unsigned short h);
unsigned short cvt_rn_f16_f32(float f);  ///< round to nearest even, NaN -> 0x7FFF

namespace detail {

/// The running thread, as the kernel sees it.
struct ThreadContext {
  uint3 thread_idx, block_idx, block_dim, grid_dim;
  unsigned linear = 0, warp = 0, lane = 0;
};
extern ThreadContext* current_thread;

enum class WarpOp { ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All, SyncWarp };

void syncthreads(int line, const char* file);
/// Waits for every lane of `mask` at the same collective, then returns this lane's result.
uint64_t warp_collective(int line, const char* file, WarpOp op, unsigned mask, uint64_t value,
                         int param, int width);
/// Checks one vector access of `bytes` bytes at `ptr` (alignment, inside one device buffer).
void check_vector_access(const void* ptr, size_t bytes, bool write);
/// Registers a __shared__ variable (poisoned now and at every block start). Returns true.
bool register_shared(void* ptr, size_t bytes, const char* name);
/// Ends the launch with `what` (from inside a kernel thread).
[[noreturn]] void fail(const std::string& what);

}  // namespace detail
}  // namespace slowed_emu

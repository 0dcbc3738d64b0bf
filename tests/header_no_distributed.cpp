// The public headers compiled as against a LibTorch without distributed support: this file's
// target undefines TorchConfig's USE_DISTRIBUTED / USE_C10D_* (tests/CMakeLists.txt), so
// slowed/dist/process_group.h must declare nothing c10d and the rest must not need it.
#include <slowed/dist/process_group.h>
#include <slowed/slowed.h>

#ifdef USE_DISTRIBUTED
#error "USE_DISTRIBUTED should be undefined in this translation unit"
#endif

namespace {
struct Local final : slowed::dist::Communicator {
  int64_t rank() const override { return 0; }
  int64_t world_size() const override { return 1; }
  void all_reduce_sum(at::Tensor&) override {}
};
}  // namespace

// A communicator still plugs in without c10d.
slowed::EntropyMaskedCrossEntropyOptions slowed_header_no_distributed_options() {
  return slowed::EntropyMaskedCrossEntropyOptions().process_group(std::make_shared<Local>());
}

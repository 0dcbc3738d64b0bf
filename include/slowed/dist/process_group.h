#pragma once

// c10d process groups as slowed communicators: include this header (only where LibTorch has
// distributed support) to pass a c10d::ProcessGroup, or one backend of it (ProcessGroupGloo,
// ProcessGroupNCCL), to EntropyMaskedCrossEntropyOptions::process_group. Without distributed
// support in LibTorch (TorchConfig's USE_DISTRIBUTED undefined) the header declares nothing
// beyond slowed/dist/communicator.h. See docs/distributed.md.

#include <slowed/dist/communicator.h>

#ifdef USE_DISTRIBUTED

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <c10/util/Exception.h>

#include <exception>
#include <type_traits>
#include <utility>
#include <vector>

namespace slowed {
namespace dist {

/// A Communicator over a c10d group (`Group` is c10d::ProcessGroup or c10d::Backend, or a class
/// derived from one). The sum is one c10d all-reduce; waiting on its work blocks the host on
/// Gloo and orders the current CUDA stream on NCCL (no host synchronization). A peer that died
/// or sent a tensor of another size surfaces as the c10d error, within the group's timeout.
template <class Group>
class ProcessGroupCommunicator final : public Communicator {
 public:
  explicit ProcessGroupCommunicator(c10::intrusive_ptr<Group> group) : group_(std::move(group)) {
    TORCH_CHECK(group_, "process_group: expected a process group, got a null pointer");
  }
  int64_t rank() const override { return group_->getRank(); }
  int64_t world_size() const override { return group_->getSize(); }
  void all_reduce_sum(at::Tensor& t) override {
    TORCH_CHECK(t.is_contiguous(), "all_reduce_sum: expected a contiguous tensor");
    std::vector<at::Tensor> tensors{t};
    c10d::AllreduceOptions options;
    options.reduceOp = c10d::ReduceOp::SUM;
    try {
      group_->allreduce(tensors, options)->wait();
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "slowed: the all-reduce across ranks failed on rank ", rank(), " of ",
                  world_size(), " (", t.numel(), " ", t.scalar_type(),
                  " values; a peer died, timed out, or called with other options or a process "
                  "group of another size): ", e.what());
    }
  }
  const c10::intrusive_ptr<Group>& group() const { return group_; }

 private:
  c10::intrusive_ptr<Group> group_;
};

template <class T>
struct CommunicatorFrom<c10::intrusive_ptr<T>,
                        std::enable_if_t<std::is_base_of<c10d::ProcessGroup, T>::value ||
                                         std::is_base_of<c10d::Backend, T>::value>> {
  static std::shared_ptr<Communicator> make(const c10::intrusive_ptr<T>& group) {
    return std::make_shared<ProcessGroupCommunicator<T>>(group);
  }
};

/// The communicator of a c10d group, for code that wants the object itself.
template <class T>
std::shared_ptr<Communicator> communicator(const c10::intrusive_ptr<T>& group) {
  return CommunicatorFrom<c10::intrusive_ptr<T>>::make(group);
}

}  // namespace dist
}  // namespace slowed

#endif  // USE_DISTRIBUTED

#pragma once

// The one collective the library needs across data-parallel ranks (a sum, in place), as a small
// interface with no c10d dependency: single-process users never include torch's distributed
// headers, and the library compiles against a LibTorch built without distributed support.
// slowed/dist/process_group.h adapts a c10d::ProcessGroup (or Backend) to it. See
// docs/distributed.md.

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <type_traits>

namespace slowed {
namespace dist {

/// How the caller combines parameter gradients across ranks after backward.
enum class GradientReduction {
  /// Summed (all-reduce with ReduceOp::SUM): the loss's gradient is d(global loss)/d(local
  /// inputs), and the sum over ranks is the gradient of the global batch. Default.
  Sum,
  /// Averaged (all-reduce with ReduceOp::AVG, or SUM then / world size, as DDP does): the loss
  /// scales its gradient (not its value) by the world size so that the average is the gradient
  /// of the global batch.
  Mean,
};

/// A group of ranks that can sum a tensor across its members.
///
/// Every rank of the group must make the same calls in the same order with tensors of the same
/// shape and dtype; an implementation reports a peer that does not (or has died) as an error
/// within its timeout. On CUDA the sum must be ordered on the current stream without a host
/// synchronization (c10d's NCCL work does this).
class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int64_t rank() const = 0;
  virtual int64_t world_size() const = 0;
  /// Replaces `t` (contiguous) by the elementwise sum of every rank's `t`.
  virtual void all_reduce_sum(at::Tensor& t) = 0;
};

namespace detail {
template <class T>
struct dependent_false : std::false_type {};
}  // namespace detail

/// How a group object becomes a Communicator; specialized for std::shared_ptr<Communicator>
/// below and, in slowed/dist/process_group.h, for c10d's ProcessGroup and Backend.
template <class Group, class = void>
struct CommunicatorFrom {
  static_assert(detail::dependent_false<Group>::value,
                "process_group: expected a std::shared_ptr<slowed::dist::Communicator>, or a "
                "c10::intrusive_ptr to a c10d::ProcessGroup or c10d::Backend after "
                "#include <slowed/dist/process_group.h>");
};

template <class T>
struct CommunicatorFrom<std::shared_ptr<T>,
                        std::enable_if_t<std::is_base_of<Communicator, T>::value>> {
  static std::shared_ptr<Communicator> make(const std::shared_ptr<T>& group) { return group; }
};

template <>
struct CommunicatorFrom<std::nullptr_t> {
  static std::shared_ptr<Communicator> make(std::nullptr_t) { return nullptr; }
};

}  // namespace dist
}  // namespace slowed

#pragma once

// Data parallelism for slowed_distill on c10d (Gloo on CPU, NCCL on CUDA): the rank and world
// from the standard environment variables (torchrun's, or set by hand), a TCPStore rendezvous,
// bucketed gradient sums, sums of counters, strings gathered to rank 0. One process (WORLD_SIZE
// unset or 1) needs none of it and creates no group. See docs/distributed.md.

#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace slowed_distill {

/// Where this process stands among the ranks of the run, read from the environment.
struct RankEnvironment {
  int rank = 0;
  int world = 1;
  int local_rank = 0;
  std::string master_addr;
  int master_port = 0;
  bool agent_store = false;  ///< torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE)
  int restart_count = 0;     ///< TORCHELASTIC_RESTART_COUNT
  /// A c10d group is formed: world > 1, or WORLD_SIZE and MASTER_ADDR given (a launcher's
  /// single rank). Otherwise one plain process.
  bool group = false;
};

/// Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (and torchrun's
/// TORCHELASTIC_USE_AGENT_STORE, TORCHELASTIC_RESTART_COUNT) from `getenv`; throws c10::Error
/// naming the variable for a value that is not an integer in range, or a world > 1 without a
/// master address and port. No variables: one process.
RankEnvironment read_rank_environment(const std::function<const char*(const char*)>& getenv);

/// The ranks of one run and the collectives the trainer needs. Without a group (one plain
/// process) every collective is the identity and nothing is created.
class DataParallel {
 public:
  /// Joins the run described by `env` on `device` ("cpu": Gloo, "cuda": NCCL, the device index
  /// being the local rank); every blocking step (rendezvous, each collective) fails with a clear
  /// error after `timeout` instead of waiting for a dead or missing peer.
  DataParallel(const RankEnvironment& env, const std::string& device, std::chrono::milliseconds timeout);
  ~DataParallel();
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  int rank() const { return env_.rank; }
  int world() const { return env_.world; }
  bool is_main() const { return env_.rank == 0; }
  /// The device this rank trains on: `device`, with the local rank as index on CUDA.
  const std::string& device() const { return device_; }

  /// Sums the gradients of `params` over the ranks, in place, in flattened buckets of at most
  /// `bucket_bytes` with two buckets in flight (one summing while the next is packed).
  void sum_gradients(const std::vector<torch::Tensor>& params, int64_t bucket_bytes = int64_t(25) << 20);
  /// Sums `values` over the ranks (small counters: losses, token counts, accuracies).
  std::vector<double> sum(const std::vector<double>& values);
  /// Rank 0 gets every rank's `mine` in rank order (through the store); the others get {}.
  std::vector<std::string> gather_to_main(const std::string& key, const std::string& mine);
  /// Throws unless every rank passes the same `values` (names say what each is).
  void check_same(const std::vector<int64_t>& values, const std::vector<const char*>& names);
  /// Waits for every rank.
  void barrier();

 private:
  struct Impl;
  RankEnvironment env_;
  std::string device_;
  std::unique_ptr<Impl> impl_;
};

/// A 64-bit fingerprint of the values of `params` (rank-independent), to check that every rank
/// starts from the same weights.
int64_t parameter_fingerprint(const std::vector<torch::Tensor>& params);

}  // namespace slowed_distill

#include "slowed_distill/distributed.h"

#include <slowed/dist/global_mask.h>
#include <slowed/dist/process_group.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <utility>

#ifdef USE_DISTRIBUTED
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#if defined(USE_C10D_GLOO) && !defined(SLOWED_DISTILL_NO_GLOO)
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#if defined(USE_C10D_NCCL) && __has_include(<nccl.h>)
#define SLOWED_DISTILL_NCCL 1
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#endif

namespace slowed_distill {
namespace {

int env_int(const std::function<const char*(const char*)>& getenv, const char* name, int fallback,
            int lo, int hi) {
  const char* v = getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  errno = 0;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  TORCH_CHECK(errno == 0 && end != v && *end == '\0' && x >= lo && x <= hi, name,
              ": expected an integer in [", lo, ", ", hi, "], got '", v, "'");
  return static_cast<int>(x);
}

bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

}  // namespace

RankEnvironment read_rank_environment(const std::function<const char*(const char*)>& getenv) {
  RankEnvironment e;
  constexpr int kMaxRanks = 1 << 15;  // slowed::dist's agreement check is exact below this
  e.world = env_int(getenv, "WORLD_SIZE", 1, 1, kMaxRanks);
  e.rank = env_int(getenv, "RANK", 0, 0, e.world - 1);
  e.local_rank = env_int(getenv, "LOCAL_RANK", e.rank, 0, kMaxRanks - 1);
  e.restart_count = env_int(getenv, "TORCHELASTIC_RESTART_COUNT", 0, 0, std::numeric_limits<int>::max());
  const char* agent = getenv("TORCHELASTIC_USE_AGENT_STORE");
  e.agent_store = agent != nullptr && (std::string(agent) == "True" || std::string(agent) == "1");
  // A launcher's single rank (torchrun --nproc-per-node 1) still forms a group of one when it
  // gives a master address: the collectives then run through c10d, as with more ranks.
  const char* world_var = getenv("WORLD_SIZE");
  const char* addr_var = getenv("MASTER_ADDR");
  e.group = e.world > 1 || (world_var != nullptr && *world_var != '\0' && addr_var != nullptr && *addr_var != '\0');
  if (e.group) {
    const char* addr = addr_var;
    TORCH_CHECK(addr != nullptr && *addr != '\0',
                "MASTER_ADDR: expected the address of rank 0's host for WORLD_SIZE ", e.world,
                ", got nothing (torchrun sets it; by hand: MASTER_ADDR=127.0.0.1)");
    e.master_addr = addr;
    TORCH_CHECK(getenv("MASTER_PORT") != nullptr, "MASTER_PORT: expected a TCP port for WORLD_SIZE ",
                e.world, ", got nothing (torchrun sets it; by hand: MASTER_PORT=29500)");
    e.master_port = env_int(getenv, "MASTER_PORT", 0, 1, 65535);
  }
  return e;
}

#ifdef USE_DISTRIBUTED

struct DataParallel::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> group;
  std::shared_ptr<slowed::dist::Communicator> communicator;
  std::chrono::milliseconds timeout;
};

DataParallel::DataParallel(const RankEnvironment& env, const std::string& device,
                           std::chrono::milliseconds timeout)
    : env_(env), device_(device) {
  const bool cuda = device.rfind("cuda", 0) == 0;
  if (cuda && env.group) device_ = "cuda:" + std::to_string(env.local_rank);
  if (!env.group) return;
  TORCH_CHECK(timeout.count() > 0, "--dist-timeout: expected a positive number of seconds");
  impl_ = std::make_unique<Impl>();
  impl_->timeout = timeout;
  c10d::TCPStoreOptions so;
  so.port = static_cast<std::uint16_t>(env.master_port);
  so.timeout = timeout;
  if (env.agent_store) {
    // torchrun's agent hosts the store; its workers are clients under a per-attempt prefix, as
    // torch.distributed's own env:// rendezvous does.
    so.isServer = false;
    so.numWorkers = std::nullopt;
    impl_->store = c10::make_intrusive<c10d::PrefixStore>(
        "/worker/attempt_" + std::to_string(env.restart_count),
        c10::make_intrusive<c10d::TCPStore>(env.master_addr, so));
  } else {
    so.isServer = env.rank == 0;
    so.numWorkers = static_cast<std::size_t>(env.world);
    so.waitWorkers = true;
    impl_->store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
  }
  impl_->store->setTimeout(timeout);
  if (cuda) {
#ifdef SLOWED_DISTILL_NCCL
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = timeout;
    impl_->group = c10::make_intrusive<c10d::ProcessGroupNCCL>(impl_->store, env.rank, env.world, options);
#else
    TORCH_CHECK(false, "--device ", device, ": data parallelism on CUDA needs LibTorch with NCCL "
                "(USE_C10D_NCCL) and nccl.h at build time; this build has neither");
#endif
  } else {
#if defined(USE_C10D_GLOO) && !defined(SLOWED_DISTILL_NO_GLOO)
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
    if (ifname != nullptr && *ifname != '\0') {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
    } else if (is_loopback(env.master_addr)) {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    } else {
      options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    impl_->group = c10::make_intrusive<c10d::ProcessGroupGloo>(impl_->store, env.rank, env.world, options);
#else
    TORCH_CHECK(false, "--device cpu: data parallelism on CPU needs LibTorch with Gloo (USE_C10D_GLOO)");
#endif
  }
  impl_->communicator = slowed::dist::communicator(impl_->group);
  // Every rank must agree on the world (a rank started with another WORLD_SIZE would have failed
  // the rendezvous above within the timeout; this names the case that got through).
  check_same({env.world}, {"WORLD_SIZE"});
}

DataParallel::~DataParallel() = default;

void DataParallel::sum_gradients(const std::vector<torch::Tensor>& params, int64_t bucket_bytes) {
  if (!impl_) return;
  std::vector<torch::Tensor> grads;
  for (const auto& p : params) {
    // A parameter without a gradient on this rank (no token reached it) still takes part.
    if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
    grads.push_back(p.grad());
  }
  // Buckets of consecutive gradients of one dtype; two in flight: bucket i sums while bucket i+1
  // is packed, then i is unpacked.
  struct Bucket {
    std::vector<size_t> members;
    torch::Tensor flat;
    c10::intrusive_ptr<c10d::Work> work;
  };
  auto finish = [&](Bucket& b) {
    try {
      b.work->wait();
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "the gradient sum across ranks failed on rank ", env_.rank, " of ",
                  env_.world, " (a peer died or timed out): ", e.what());
    }
    int64_t off = 0;
    for (size_t i : b.members) {
      const int64_t n = grads[i].numel();
      grads[i].copy_(b.flat.narrow(0, off, n).view_as(grads[i]));
      off += n;
    }
  };
  std::vector<Bucket> in_flight;
  size_t i = 0;
  while (i < grads.size()) {
    Bucket b;
    int64_t bytes = 0;
    const auto dtype = grads[i].scalar_type();
    while (i < grads.size() && grads[i].scalar_type() == dtype &&
           (b.members.empty() || bytes + grads[i].nbytes() <= static_cast<size_t>(bucket_bytes))) {
      bytes += static_cast<int64_t>(grads[i].nbytes());
      b.members.push_back(i++);
    }
    std::vector<torch::Tensor> parts;
    for (size_t m : b.members) parts.push_back(grads[m].reshape({-1}));
    b.flat = torch::cat(parts);
    std::vector<torch::Tensor> one{b.flat};
    b.work = impl_->group->allreduce(one);
    in_flight.push_back(std::move(b));
    if (in_flight.size() == 2) {
      finish(in_flight.front());
      in_flight.erase(in_flight.begin());
    }
  }
  for (auto& b : in_flight) finish(b);
}

std::vector<double> DataParallel::sum(const std::vector<double>& values) {
  if (!impl_) return values;
  torch::Tensor t = torch::tensor(values, torch::kDouble).to(torch::Device(device_));
  impl_->communicator->all_reduce_sum(t);
  t = t.cpu();
  return std::vector<double>(t.data_ptr<double>(), t.data_ptr<double>() + t.numel());
}

std::vector<std::string> DataParallel::gather_to_main(const std::string& key, const std::string& mine) {
  if (!impl_) return {mine};
  const std::string prefix = "slowed_distill/" + key + "/";
  impl_->store->set(prefix + std::to_string(env_.rank), std::vector<uint8_t>(mine.begin(), mine.end()));
  std::vector<std::string> out;
  if (is_main()) {
    for (int r = 0; r < env_.world; ++r) {
      const auto bytes = impl_->store->get(prefix + std::to_string(r));  // waits up to the timeout
      out.emplace_back(bytes.begin(), bytes.end());
    }
  }
  barrier();  // rank 0 has read every part before anyone moves on
  if (is_main()) {
    for (int r = 0; r < env_.world; ++r) impl_->store->deleteKey(prefix + std::to_string(r));
  }
  return out;
}

void DataParallel::check_same(const std::vector<int64_t>& values, const std::vector<const char*>& names) {
  if (!impl_) return;
  slowed::dist::check_same_on_all_ranks(values, names, torch::Device(device_), *impl_->communicator);
}

void DataParallel::barrier() {
  if (!impl_) return;
  // A one-element sum: unlike Backend::barrier it needs no device guess on NCCL.
  sum({0.0});
}

#else  // no distributed support in this LibTorch

struct DataParallel::Impl {};

DataParallel::DataParallel(const RankEnvironment& env, const std::string& device, std::chrono::milliseconds)
    : env_(env), device_(device) {
  TORCH_CHECK(!env.group, "WORLD_SIZE ", env.world,
              ": data parallelism needs LibTorch built with distributed support (USE_DISTRIBUTED)");
}
DataParallel::~DataParallel() = default;
void DataParallel::sum_gradients(const std::vector<torch::Tensor>&, int64_t) {}
std::vector<double> DataParallel::sum(const std::vector<double>& values) { return values; }
std::vector<std::string> DataParallel::gather_to_main(const std::string&, const std::string& mine) {
  return {mine};
}
void DataParallel::check_same(const std::vector<int64_t>&, const std::vector<const char*>&) {}
void DataParallel::barrier() {}

#endif

int64_t parameter_fingerprint(const std::vector<torch::Tensor>& params) {
  torch::NoGradGuard no_grad;
  // FNV-1a over the parameters' bytes in order, 8 at a time (then the tail): equal weights give
  // equal fingerprints on every rank whatever its threads, at a word per multiply (the 2 GB of
  // a 0.5B-parameter fp32 model take a fraction of a second, not seconds).
  uint64_t h = 1469598103934665603ull;
  auto mix = [&h](uint64_t x) {
    h ^= x;
    h *= 1099511628211ull;
  };
  for (const auto& p : params) {
    torch::Tensor c = p.detach().contiguous().cpu();
    const auto* b = static_cast<const unsigned char*>(c.data_ptr());
    const size_t n = c.nbytes();
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      uint64_t word;
      std::memcpy(&word, b + i, 8);
      mix(word);
    }
    for (; i < n; ++i) mix(b[i]);
  }
  return static_cast<int64_t>(h);
}

}  // namespace slowed_distill

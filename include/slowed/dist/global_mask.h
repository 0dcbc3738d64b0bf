#pragma once

// Low-Entropy Masking across data-parallel ranks: the ratio-mode threshold as an exact global
// order statistic, and the counts and sums that normalize the loss, computed with fixed-size
// sums over a Communicator: no host synchronization, no tensor whose size depends on another
// rank. docs/distributed.md gives the cost.

#include <slowed/dist/communicator.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <vector>

namespace slowed {
namespace dist {
namespace detail {

/// Order-preserving keys of fp32 values, as int64 in [0, 2^32): x < y (as floats, with
/// -0 < +0) exactly when key(x) < key(y); every NaN maps to one key above +inf's, as sorting
/// puts NaN last.
inline at::Tensor sortable_keys(const at::Tensor& values) {
  at::Tensor h = values.to(at::kFloat).contiguous();
  at::Tensor bits = h.view(at::kInt).to(at::kLong) & int64_t(0xffffffff);
  at::Tensor negative = bits >= int64_t(0x80000000);
  at::Tensor key = at::where(negative, int64_t(0xffffffff) - bits, bits + int64_t(0x80000000));
  return at::where(at::isnan(h), at::full({}, int64_t(0xffc00000), key.options()), key);
}

/// The fp32 value of a key from `sortable_keys` (0-dim).
inline at::Tensor value_of_key(const at::Tensor& key) {
  at::Tensor bits = at::where(key >= int64_t(0x80000000), key - int64_t(0x80000000),
                              int64_t(0xffffffff) - key);
  at::Tensor signed_bits = at::where(bits >= int64_t(0x80000000), bits - (int64_t(1) << 32), bits);
  return signed_bits.to(at::kInt).reshape({1}).view(at::kFloat).reshape({});
}

}  // namespace detail

/// Ratio mode over the union of every rank's tokens: k = floor(q * n_valid) with n_valid the
/// global count of valid tokens, and the threshold is the (k+1)-th smallest entry of the global
/// sequence in which invalid tokens stand as +inf (the single-process rule, which sorts the same
/// sequence); +inf when k = n_valid. Exact: a 4-digit radix select on the entries' 32-bit order
/// keys, one sum of 257 (first digit: 258) int64 counts per digit. `decision_entropy` and
/// `valid` are [N] on one device (N may differ between ranks, and may be 0).
inline at::Tensor global_ratio_threshold(const at::Tensor& decision_entropy, const at::Tensor& valid,
                                         double mask_ratio, Communicator& group) {
  auto i64 = valid.options().dtype(at::kLong);
  const at::Tensor inf_key =
      detail::sortable_keys(at::full({}, std::numeric_limits<float>::infinity(),
                                     valid.options().dtype(at::kFloat)));
  at::Tensor keys = at::where(valid, detail::sortable_keys(decision_entropy), inf_key);
  at::Tensor digits_range = at::arange(256, i64);
  at::Tensor prefix = at::zeros({}, i64);
  at::Tensor k, n_valid, remaining;
  for (int pass = 0; pass < 4; ++pass) {
    const int64_t shift = 24 - 8 * pass;
    at::Tensor digit = at::bitwise_and(at::bitwise_right_shift(keys, shift), 255);
    if (pass > 0) {
      // Entries outside the prefix chosen so far go to a bin past the 256 digits.
      at::Tensor same = at::bitwise_right_shift(keys, shift + 8) ==
                        at::bitwise_right_shift(prefix, shift + 8);
      digit = at::where(same, digit, at::full({}, int64_t(256), i64));
    }
    at::Tensor hist = at::zeros({pass == 0 ? 258 : 257}, i64);
    hist.narrow(0, 0, 257).scatter_add_(0, digit, at::ones_like(digit));
    if (pass == 0) hist.narrow(0, 257, 1).copy_(valid.sum().reshape({1}));
    group.all_reduce_sum(hist);
    at::Tensor counts = hist.narrow(0, 0, 256);
    if (pass == 0) {
      n_valid = hist[257];
      k = at::floor(n_valid.to(at::kDouble) * mask_ratio).to(at::kLong);
      // k < n_valid <= the global number of entries whenever the threshold is finite.
      remaining = k.clamp_max((counts.sum() - 1).clamp_min(0));
    }
    at::Tensor chosen = (counts.cumsum(0) <= remaining).sum().clamp_max(255);
    remaining = remaining - at::where(digits_range < chosen, counts, at::zeros({}, i64)).sum();
    prefix = prefix + at::bitwise_left_shift(chosen, shift);
  }
  at::Tensor inf = at::full({}, std::numeric_limits<float>::infinity(),
                            valid.options().dtype(at::kFloat));
  return at::where(k >= n_valid, inf, detail::value_of_key(prefix));
}

/// Checks that every rank of `group` passes the same `values` (one per name in `names`) and
/// raises an error naming the first that differs otherwise: the calls that follow can then rely
/// on every rank making the same sums. One sum of a fixed-size int64 tensor on `device`
/// (whatever the values, so ranks that disagree still agree on it) and one host read.
inline void check_same_on_all_ranks(const std::vector<int64_t>& values,
                                    const std::vector<const char*>& names, const at::Device& device,
                                    Communicator& group) {
  TORCH_INTERNAL_ASSERT(values.size() == names.size());
  // Each value as four 16-bit pieces p; all ranks agree exactly when (sum p)^2 = W * sum p^2
  // for every piece (equality in Cauchy-Schwarz), exact in int64 for W < 2^15 ranks.
  const int64_t f = static_cast<int64_t>(values.size());
  std::vector<int64_t> host(2 * 4 * f + 1, 0);
  for (int64_t i = 0; i < f; ++i) {
    const uint64_t u = static_cast<uint64_t>(values[i]);
    for (int64_t j = 0; j < 4; ++j) {
      const int64_t piece = static_cast<int64_t>((u >> (16 * j)) & 0xffff);
      host[4 * i + j] = piece;
      host[4 * f + 4 * i + j] = piece * piece;
    }
  }
  host[8 * f] = 1;  // counts the ranks that took part
  at::Tensor t = at::tensor(host, at::TensorOptions().dtype(at::kLong)).to(device);
  group.all_reduce_sum(t);
  at::Tensor back = t.cpu();
  const int64_t* r = back.data_ptr<int64_t>();
  const int64_t world = group.world_size();
  TORCH_CHECK(r[8 * f] == world, "process_group: expected ", world, " ranks in the sum, got ",
              r[8 * f]);
  for (int64_t i = 0; i < f; ++i) {
    for (int64_t j = 0; j < 4; ++j) {
      const int64_t sum = r[4 * i + j], squares = r[4 * f + 4 * i + j];
      TORCH_CHECK(sum * sum == world * squares, "process_group: expected every rank to call with "
                  "the same ", names[i], ", got ", values[i], " on rank ", group.rank(),
                  " and another value on another rank (every rank of the group must make the same "
                  "call with the same options)");
    }
  }
}

/// Global sums of a call's per-rank totals, in one fp64 sum over the group: counts stay exact
/// up to 2^53 tokens. Every input is 0-dim on one device; the outputs too.
struct GlobalTotals {
  at::Tensor n_valid;      ///< int64
  at::Tensor n_kept;       ///< int64
  at::Tensor entropy_sum;  ///< fp64: sum of the valid tokens' current entropies
  at::Tensor loss_sum;     ///< fp64: sum of the kept tokens' losses
};

inline GlobalTotals global_totals(const at::Tensor& n_valid, const at::Tensor& n_kept,
                                  const at::Tensor& entropy_sum, const at::Tensor& loss_sum,
                                  Communicator& group) {
  at::Tensor v = at::stack({n_valid.to(at::kDouble), n_kept.to(at::kDouble),
                            entropy_sum.to(at::kDouble), loss_sum.to(at::kDouble)})
                     .contiguous();
  group.all_reduce_sum(v);
  return {v[0].to(at::kLong), v[1].to(at::kLong), v[2], v[3]};
}

}  // namespace dist
}  // namespace slowed

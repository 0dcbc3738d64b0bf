#include "common/generate.h"

#include <c10/util/Exception.h>

#include <algorithm>

namespace slowed_examples {

std::pair<torch::Tensor, torch::Tensor> left_pad(const std::vector<std::vector<int64_t>>& prompts,
                                                 int64_t pad_token_id, torch::Device device) {
  TORCH_CHECK(!prompts.empty(), "left_pad: no prompts");
  size_t len = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    TORCH_CHECK(!prompts[i].empty(), "left_pad: prompt ", i, " is empty");
    len = std::max(len, prompts[i].size());
  }
  const int64_t b = static_cast<int64_t>(prompts.size()), l = static_cast<int64_t>(len);
  auto ids = torch::full({b, l}, pad_token_id, torch::kLong);
  auto mask = torch::zeros({b, l}, torch::kLong);
  auto ia = ids.accessor<int64_t, 2>();
  auto ma = mask.accessor<int64_t, 2>();
  for (int64_t i = 0; i < b; ++i) {
    const int64_t off = l - static_cast<int64_t>(prompts[i].size());
    for (size_t j = 0; j < prompts[i].size(); ++j) {
      ia[i][off + static_cast<int64_t>(j)] = prompts[i][j];
      ma[i][off + static_cast<int64_t>(j)] = 1;
    }
  }
  return {ids.to(device), mask.to(device)};
}

std::vector<std::vector<int64_t>> generate_greedy(CausalLM& model,
                                                  const std::vector<std::vector<int64_t>>& prompts,
                                                  const GenerateOptions& options) {
  const size_t b = prompts.size();
  TORCH_CHECK(b > 0, "generate_greedy: no prompts");
  TORCH_CHECK(options.max_new_tokens >= 0, "generate_greedy: max_new_tokens must be >= 0, got ",
              options.max_new_tokens);
  TORCH_CHECK(options.stop_tokens_per_sequence.empty() ||
                  options.stop_tokens_per_sequence.size() == b,
              "generate_greedy: stop_tokens_per_sequence has ",
              options.stop_tokens_per_sequence.size(), " entries for ", b, " prompts");
  TORCH_CHECK(options.max_new_tokens_per_sequence.empty() ||
                  options.max_new_tokens_per_sequence.size() == b,
              "generate_greedy: max_new_tokens_per_sequence has ",
              options.max_new_tokens_per_sequence.size(), " entries for ", b, " prompts");
  const int64_t vocab = model.config().vocab_size;
  for (size_t i = 0; i < b; ++i)
    for (int64_t t : prompts[i])
      TORCH_CHECK(t >= 0 && t < vocab, "generate_greedy: prompt ", i, " has token id ", t,
                  " outside [0, ", vocab, ")");

  std::vector<int64_t> budget(b, options.max_new_tokens);
  if (!options.max_new_tokens_per_sequence.empty()) budget = options.max_new_tokens_per_sequence;
  std::vector<std::vector<int64_t>> stops(b, options.stop_tokens);
  for (size_t i = 0; i < options.stop_tokens_per_sequence.size(); ++i)
    stops[i].insert(stops[i].end(), options.stop_tokens_per_sequence[i].begin(),
                    options.stop_tokens_per_sequence[i].end());

  std::vector<std::vector<int64_t>> out(b);
  // Rows of the running batch -> prompt index. Prompts with no budget never enter; finished
  // rows leave the batch (and the cache), so the remaining ones do not pay for them.
  std::vector<size_t> row_of;
  std::vector<std::vector<int64_t>> batch;
  for (size_t i = 0; i < b; ++i) {
    if (budget[i] > 0) {
      row_of.push_back(i);
      batch.push_back(prompts[i]);
    }
  }
  if (row_of.empty()) return out;

  torch::NoGradGuard no_grad;
  const torch::Device device = model.parameters().front().device();
  auto padded = left_pad(batch, options.pad_token_id, device);
  torch::Tensor mask = padded.second;
  KVCache cache;
  ForwardOptions fo;
  fo.cache = &cache;
  fo.logits_to_keep = 1;
  fo.attention_mask = mask;
  torch::Tensor logits = model.forward(padded.first, fo);  // [rows, 1, V]
  while (true) {
    torch::Tensor next = logits.select(1, 0).argmax(-1);  // [rows]
    const torch::Tensor host = next.to(torch::kCPU);
    const auto acc = host.accessor<int64_t, 1>();
    std::vector<int64_t> keep;
    std::vector<size_t> keep_of;
    for (size_t r = 0; r < row_of.size(); ++r) {
      const size_t i = row_of[r];
      const int64_t tok = acc[static_cast<int64_t>(r)];
      out[i].push_back(tok);
      const bool stop = std::find(stops[i].begin(), stops[i].end(), tok) != stops[i].end();
      if (!stop && static_cast<int64_t>(out[i].size()) < budget[i]) {
        keep.push_back(static_cast<int64_t>(r));
        keep_of.push_back(i);
      }
    }
    if (keep.empty()) break;
    if (keep.size() < row_of.size()) {
      const auto idx = torch::tensor(keep, torch::kLong).to(device);
      cache.select_rows(idx);
      mask = mask.index_select(0, idx);
      next = next.index_select(0, idx);
    }
    row_of = std::move(keep_of);
    mask = torch::cat({mask, torch::ones({mask.size(0), 1}, mask.options())}, 1);
    fo.attention_mask = mask;
    logits = model.forward(next.unsqueeze(1), fo);
  }
  return out;
}

}  // namespace slowed_examples

// The drop-in: one include, a wrapped optimizer, the masked loss.
#include <slowed/slowed.h>
#include <torch/torch.h>

#include <iostream>

int main() {
  torch::manual_seed(0);
  torch::nn::Linear head(16, 32);
  slowed::SlowTuningOptimizer<torch::optim::AdamW> opt(
      head->parameters(), torch::optim::AdamWOptions(1e-2), slowed::SlowTuningOptions().scale(0.5));
  slowed::EntropyMaskedCrossEntropy loss_fn(
      slowed::EntropyMaskedCrossEntropyOptions().entropy_threshold(0.1));
  auto x = torch::randn({8, 16});
  auto y = torch::randint(0, 32, {8});
  double first = 0, last = 0;
  for (int i = 0; i < 20; ++i) {
    opt.zero_grad();
    auto loss = loss_fn(head(x), y);
    loss.backward();
    opt.step();
    (i == 0 ? first : last) = loss.item<double>();
  }
  std::cout << "loss " << first << " -> " << last << ", drift "
            << opt.stats().global_relative_drift << "\n";
  return last < first ? 0 : 1;
}

// minimal_trainer: a plain LibTorch training loop for a small causal LM, with slowed dropped in.
// The only slowed-specific lines are marked "slowed:": the include, the optimizer wrapper, the
// loss, and the two statistics printed per step.
//
// Data: synthetic sequences x_{t+1} = (x_t + k) mod V with a random start and a random stride
// k per sequence. Once the model has seen two tokens the rest is certain, so as it learns, the
// entropy of those positions falls and Low-Entropy Masking drops them from the loss: the kept
// fraction printed per step goes down while the loss on the uncertain tokens keeps training.

#include <slowed/slowed.h>  // slowed: the one include
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace {

struct Config {
  int64_t steps = 300, batch = 32, seq_len = 24, vocab = 48, dim = 64, layers = 2, heads = 4;
  double lr = 3e-3, scale = 0.5, threshold = 0.3;
  uint64_t seed = 0;
  std::string device = "cpu";
};

struct BlockImpl : torch::nn::Module {
  BlockImpl(int64_t dim, int64_t heads)
      : ln1(register_module("ln1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim})))),
        attn(register_module("attn", torch::nn::MultiheadAttention(
                                         torch::nn::MultiheadAttentionOptions(dim, heads)))),
        ln2(register_module("ln2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim})))),
        fc1(register_module("fc1", torch::nn::Linear(dim, 4 * dim))),
        fc2(register_module("fc2", torch::nn::Linear(4 * dim, dim))) {}

  torch::Tensor forward(torch::Tensor x, const torch::Tensor& causal_mask) {  // x [T, B, D]
    auto h = ln1(x);
    x = x + std::get<0>(attn->forward(h, h, h, /*key_padding_mask=*/{}, /*need_weights=*/false, causal_mask));
    return x + fc2(torch::gelu(fc1(ln2(x))));
  }
  torch::nn::LayerNorm ln1;
  torch::nn::MultiheadAttention attn;
  torch::nn::LayerNorm ln2;
  torch::nn::Linear fc1, fc2;
};
TORCH_MODULE(Block);

struct TinyLMImpl : torch::nn::Module {
  explicit TinyLMImpl(const Config& c)
      : tok(register_module("tok", torch::nn::Embedding(c.vocab, c.dim))),
        pos(register_module("pos", torch::nn::Embedding(c.seq_len, c.dim))),
        ln(register_module("ln", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.dim})))),
        head(register_module("head", torch::nn::Linear(c.dim, c.vocab))) {
    for (int64_t i = 0; i < c.layers; ++i)
      blocks.push_back(register_module("block" + std::to_string(i), Block(c.dim, c.heads)));
  }

  torch::Tensor forward(const torch::Tensor& ids) {  // ids [B, T] -> logits [B, T, V]
    const int64_t T = ids.size(1);
    auto positions = torch::arange(T, ids.options());
    auto x = (tok(ids) + pos(positions)).transpose(0, 1);  // [T, B, D]
    auto mask = torch::full({T, T}, -std::numeric_limits<float>::infinity(), x.options()).triu(1);
    for (auto& b : blocks) x = b->forward(x, mask);
    return head(ln(x)).transpose(0, 1);
  }
  torch::nn::Embedding tok, pos;
  std::vector<Block> blocks;
  torch::nn::LayerNorm ln;
  torch::nn::Linear head;
};
TORCH_MODULE(TinyLM);

// A batch of arithmetic sequences [B, T + 1]: inputs are [:, :-1], targets [:, 1:].
torch::Tensor make_batch(const Config& c, const torch::Device& device) {
  auto start = torch::randint(0, c.vocab, {c.batch, 1}, torch::kLong);
  auto stride = torch::randint(1, 4, {c.batch, 1}, torch::kLong);
  auto t = torch::arange(c.seq_len + 1, torch::kLong).unsqueeze(0);
  return ((start + stride * t) % c.vocab).to(device);
}

void usage() {
  std::printf(
      "usage: minimal_trainer [--steps N] [--batch B] [--lr LR] [--scale S] [--threshold H]\n"
      "                       [--seed N] [--device cpu|cuda]\n"
      "Trains a small causal LM on synthetic sequences with SlowTuningOptimizer<AdamW>\n"
      "(step scale S) and EntropyMaskedCrossEntropy (entropy threshold H nats).\n");
}

template <class T>
T parse_number(const std::string& option, const std::string& text) {
  size_t used = 0;
  T value{};
  try {
    if constexpr (std::is_floating_point_v<T>) value = static_cast<T>(std::stod(text, &used));
    else value = static_cast<T>(std::stoll(text, &used));
  } catch (const std::logic_error&) {
    used = 0;
  }
  if (used == 0 || used != text.size())
    throw std::invalid_argument(option + ": expected a number, got '" + text + "'");
  return value;
}

Config parse(int argc, char** argv) {
  Config c;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      usage();
      std::exit(0);
    }
    if (i + 1 >= argc) throw std::invalid_argument(a + ": expected a value");
    const std::string v = argv[++i];
    if (a == "--steps") c.steps = parse_number<int64_t>(a, v);
    else if (a == "--batch") c.batch = parse_number<int64_t>(a, v);
    else if (a == "--lr") c.lr = parse_number<double>(a, v);
    else if (a == "--scale") c.scale = parse_number<double>(a, v);
    else if (a == "--threshold") c.threshold = parse_number<double>(a, v);
    else if (a == "--seed") c.seed = parse_number<uint64_t>(a, v);
    else if (a == "--device") c.device = v;
    else throw std::invalid_argument("unknown option " + a + " (see --help)");
  }
  if (c.steps < 1) throw std::invalid_argument("--steps: expected >= 1, got " + std::to_string(c.steps));
  if (c.batch < 1) throw std::invalid_argument("--batch: expected >= 1, got " + std::to_string(c.batch));
  if (c.device != "cpu" && c.device != "cuda")
    throw std::invalid_argument("--device: expected cpu or cuda, got '" + c.device + "'");
  if (c.device == "cuda" && !torch::cuda::is_available())
    throw std::invalid_argument("--device cuda: no CUDA device is available");
  return c;
}

}  // namespace

int main(int argc, char** argv) try {
  const Config c = parse(argc, argv);
  torch::manual_seed(c.seed);
  const torch::Device device(c.device);
  TinyLM model(c);
  model->to(device);

  // slowed: the optimizer wrapper (AdamW with Slow Tuning) ...
  slowed::SlowTuningOptimizer<torch::optim::AdamW> opt(
      model->parameters(), torch::optim::AdamWOptions(c.lr).weight_decay(0.05),
      slowed::SlowTuningOptions().scale(c.scale));
  // slowed: ... and the masked loss (Low-Entropy Masking).
  slowed::EntropyMaskedCrossEntropy loss_fn(
      slowed::EntropyMaskedCrossEntropyOptions().entropy_threshold(c.threshold));

  std::printf("%5s %9s %6s %8s %8s\n", "step", "loss", "kept", "entropy", "drift");
  const auto t0 = std::chrono::steady_clock::now();
  double first_loss = 0, last_loss = 0;
  for (int64_t step = 0; step < c.steps; ++step) {
    auto seq = make_batch(c, device);
    auto inputs = seq.narrow(1, 0, c.seq_len), targets = seq.narrow(1, 1, c.seq_len);
    opt.zero_grad();
    auto loss = loss_fn(model->forward(inputs), targets);
    loss.backward();
    opt.step();
    last_loss = loss.item<double>();
    if (step == 0) first_loss = last_loss;
    if (step % 10 == 0 || step + 1 == c.steps) {
      const auto& st = loss_fn.last_stats();  // slowed: kept fraction and entropy
      std::printf("%5lld %9.4f %6.3f %8.4f %8.5f\n", static_cast<long long>(step), last_loss,
                  st.kept_fraction.item<double>(), st.mean_entropy.item<double>(),
                  opt.stats().global_relative_drift);  // slowed: drift from the start
    }
  }
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("trained %lld steps in %.1f s on %s: loss %.4f -> %.4f\n",
              static_cast<long long>(c.steps), secs, c.device.c_str(), first_loss, last_loss);
  return 0;
} catch (const c10::Error& e) {
  std::fprintf(stderr, "minimal_trainer: %s\n", e.what_without_backtrace());
  return 2;
} catch (const std::exception& e) {
  std::fprintf(stderr, "minimal_trainer: %s\n", e.what());
  return 2;
}

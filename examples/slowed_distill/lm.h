#pragma once

// The student language model as the reproduction program sees it: a causal LM, its tokenizer
// and chat template, behind one small interface (implemented with examples/common).

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace slowed_distill {

/// A training sequence: chat(prompt) + response + end-of-turn, truncated to a maximum length.
/// The loss covers positions [prompt_len, ids.size()) (response tokens only).
struct TrainSequence {
  std::vector<int64_t> ids;
  int64_t prompt_len = 0;
};

class LanguageModel {
 public:
  virtual ~LanguageModel() = default;

  /// Logits [B, T, V] for right-padded ids [B, T], in the parameters' dtype (bf16 under
  /// autocast).
  virtual torch::Tensor forward(const torch::Tensor& ids) = 0;
  /// Logits [N, V] at the flat positions `positions` (int64 [N], b * T + t) only: the LM head
  /// skips every other position (training needs the response positions only).
  virtual torch::Tensor forward(const torch::Tensor& ids, const torch::Tensor& positions) = 0;
  /// The LM head's input at the same positions: the final-norm hidden states [N, D]. With
  /// head_weight() it feeds a fused linear loss, so training never materializes the logits.
  virtual torch::Tensor forward_hidden(const torch::Tensor& ids, const torch::Tensor& positions) = 0;
  /// The LM head's weight [V, D] (the input embedding when tied); the head has no bias.
  virtual torch::Tensor head_weight() = 0;
  virtual std::vector<torch::Tensor> parameters() = 0;
  /// Stops training the input embedding and the LM head (requires_grad false), as LoRA-style
  /// fine-tuning leaves them; the transformer blocks and norms stay trainable.
  virtual void freeze_embeddings() = 0;
  virtual torch::Device device() const = 0;
  virtual int64_t pad_id() const = 0;

  /// User turn `prompt`, assistant turn `response`, in the model's chat template, at most
  /// `max_len` tokens (the response's tail is cut). Empty when the prompt leaves fewer than 16
  /// response tokens.
  virtual TrainSequence encode_example(const std::string& prompt, const std::string& response,
                                       int64_t max_len) const = 0;
  /// Greedy continuations of the user turns `prompts` (chat template with the assistant header),
  /// batched with left padding; stops at end-of-turn or after `max_new_tokens`.
  virtual std::vector<std::string> generate(const std::vector<std::string>& prompts,
                                            int64_t max_new_tokens, int64_t batch_size) = 0;

  /// Model weights to/from an archive (checkpoints).
  virtual void save(torch::serialize::OutputArchive& archive) const = 0;
  virtual void load(torch::serialize::InputArchive& archive) = 0;
  /// Train/eval mode (dropout is not used; kept for completeness).
  virtual void train(bool on) = 0;
};

/// Loads a model: a .gguf file or an HF folder (config.json, *.safetensors, tokenizer.json).
/// `smoke` replaces the weights by a tiny random model of the same tokenizer (tests).
std::unique_ptr<LanguageModel> load_language_model(const std::string& path, torch::Device device,
                                                   bool smoke, uint64_t seed);

}  // namespace slowed_distill

#pragma once

// The model half of LanguageModel for any examples/common CausalLM: the forwards, the head
// weight, the parameters, freezing the embeddings and the train mode. The program's student
// (lm.cpp) adds the tokenizer, chat template and generation; tests/test_distill.cpp uses it over
// a tiny random model, so the test trains through the program's own forwarding and freezing.

#include "common/model.h"
#include "slowed_distill/lm.h"

#include <memory>
#include <utility>
#include <vector>

namespace slowed_distill {

class CausalLMStudent : public LanguageModel {
 public:
  explicit CausalLMStudent(std::shared_ptr<slowed_examples::CausalLM> model) : model_(std::move(model)) {}

  torch::Tensor forward(const torch::Tensor& ids) override { return model_->forward(ids); }
  torch::Tensor forward(const torch::Tensor& ids, const torch::Tensor& positions) override {
    return model_->forward(ids, at_positions(positions));
  }
  torch::Tensor forward_hidden(const torch::Tensor& ids, const torch::Tensor& positions) override {
    return model_->forward_hidden(ids, at_positions(positions));
  }
  torch::Tensor head_weight() override { return model_->output_embeddings(); }
  std::vector<torch::Tensor> parameters() override { return model_->parameters(); }
  void freeze_embeddings() override {
    for (auto& p : model_->named_parameters())
      if (p.key() == "lm_head.weight" || p.value().is_same(model_->input_embeddings()))
        p.value().set_requires_grad(false);
  }
  void train(bool on) override { model_->train(on); }

 protected:
  static slowed_examples::ForwardOptions at_positions(const torch::Tensor& positions) {
    slowed_examples::ForwardOptions o;
    o.output_positions = positions;
    return o;
  }

  std::shared_ptr<slowed_examples::CausalLM> model_;
};

}  // namespace slowed_distill

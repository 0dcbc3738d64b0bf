// The supported architectures: one record each (model_internal.h's `Architecture`), defined next
// to its modules in model_<arch>.cpp. A new architecture adds its file and one line here.

#include "common/model_internal.h"

#include <c10/util/Exception.h>

namespace slowed_examples {
namespace detail {

const Architecture& llama_architecture();  // model_llama.cpp
const Architecture& qwen2_architecture();  // model_llama.cpp
const Architecture& bloom_architecture();  // model_bloom.cpp

const std::vector<const Architecture*>& architectures() {
  static const std::vector<const Architecture*> all = {
      &llama_architecture(),
      &qwen2_architecture(),
      &bloom_architecture(),
  };
  return all;
}

const Architecture* find_architecture(const std::string& name) {
  for (const Architecture* a : architectures())
    if (a->name == name) return a;
  return nullptr;
}

const Architecture& architecture_or_throw(const std::string& name, const std::string& where) {
  const Architecture* a = find_architecture(name);
  if (a == nullptr) {
    std::string known;
    for (const Architecture* k : architectures()) known += (known.empty() ? "" : ", ") + k->name;
    TORCH_CHECK(false, where, "unsupported architecture '", name, "' (supported: ", known, ")");
  }
  return *a;
}

std::string architecture_of_hf_class(const std::string& hf_class) {
  for (const Architecture* a : architectures())
    for (const auto& c : a->hf_classes)
      if (c == hf_class) return a->name;
  return hf_class;
}

}  // namespace detail
}  // namespace slowed_examples

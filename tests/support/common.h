#pragma once

// Small helpers that several test programs share: tensor norms and differences in float64, a
// temporary file removed at scope exit, the CUDA skip. Test-only header: everything has internal
// linkage.

#include <catch2/catch.hpp>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

namespace {

/// The 2-norm of `t`, computed in float64 on the CPU.
double norm64(const torch::Tensor& t) {
  return torch::linalg_vector_norm(t.detach().to(torch::kCPU, torch::kDouble), 2, c10::nullopt,
                                   false, c10::nullopt)
      .item<double>();
}

/// max |a - b| over the elements, in float64 on the CPU.
double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64).cpu() - b.to(torch::kFloat64).cpu()).abs().max().item<double>();
}

/// Fresh leaf copies of `ps` that require grad.
std::vector<torch::Tensor> clone_params(const std::vector<torch::Tensor>& ps) {
  std::vector<torch::Tensor> out;
  for (const auto& p : ps) out.push_back(p.detach().clone().requires_grad_(true));
  return out;
}

/// A file path for this test process (in the temporary directory, named after the process id and
/// `name`), removed at scope exit.
struct TempFile {
  std::string path;
  explicit TempFile(const std::string& name)
      : path((std::filesystem::temp_directory_path() /
              ("slowed_test_" + std::to_string(::getpid()) + "_" + name))
                 .string()) {}
  ~TempFile() { std::remove(path.c_str()); }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
};

/// True when a CUDA device is there; otherwise false, with a warning that the case was skipped.
bool cuda_or_warn() {
  if (torch::cuda::is_available()) return true;
  WARN("no CUDA device: skipped");
  return false;
}

}  // namespace

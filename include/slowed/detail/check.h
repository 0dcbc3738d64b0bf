#pragma once

// Small helpers for validating arguments at the public boundary. Messages always name the
// argument, the expectation and what was given (see docs/api.md, "Errors").

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>
#include <string>

namespace slowed {
namespace detail {

inline std::string shape_string(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << '[';
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << ']';
  return os.str();
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

inline void check_finite_option(double value, const char* name) {
  TORCH_CHECK(std::isfinite(value), name, ": expected a finite number, got ", value);
}

}  // namespace detail
}  // namespace slowed

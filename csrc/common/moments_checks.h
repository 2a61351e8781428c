// Input validation shared by the CPU and CUDA `riformer::moments` kernels, so
// both backends reject the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace riformer {

inline void check_moments_input(const at::Tensor& x, c10::DeviceType expected) {
  TORCH_CHECK(x.dim() == 4,
              "riformer::moments: expected a 4-D (N, C, H, W) tensor, got a ",
              x.dim(), "-D tensor of shape ", x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 ||
                  st == at::kDouble,
              "riformer::moments: expected a float32, float16, bfloat16 or "
              "float64 tensor, got ", st);
  TORCH_CHECK(x.device().type() == expected,
              "riformer::moments: this kernel expects a ", expected,
              " tensor, got a tensor on ", x.device());
  TORCH_CHECK(x.size(2) * x.size(3) > 0 || x.size(0) * x.size(1) == 0,
              "riformer::moments: H*W must be positive (moments of an empty "
              "set are undefined), got shape ", x.sizes());
}

// float64 input keeps float64 statistics; every other dtype accumulates and
// returns float32.
inline at::ScalarType moments_acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace riformer

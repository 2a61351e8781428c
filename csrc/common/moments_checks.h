// Input validation shared by the CPU and CUDA `riformer::moments` kernels, so
// both backends reject the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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

// What both moments kernels start from: the checked input in a layout they read
// natively (NCHW or channels_last; any other strides are copied to NCHW) and the
// two (N, C) outputs in the accumulation dtype.
struct MomentsProblem {
  at::Tensor x;
  bool channels_last;
  at::Tensor mean;
  at::Tensor var;
};

inline MomentsProblem prepare_moments(const at::Tensor& x_in, c10::DeviceType expected) {
  check_moments_input(x_in, expected);
  const auto options = x_in.options().dtype(moments_acc_dtype(x_in));
  MomentsProblem p{x_in, false, at::empty({x_in.size(0), x_in.size(1)}, options),
                   at::empty({x_in.size(0), x_in.size(1)}, options)};
  if (!p.x.is_contiguous()) {
    if (p.x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
      p.channels_last = true;
    } else {
      p.x = p.x.contiguous();
    }
  }
  return p;
}

}  // namespace riformer

// CUDA binding of riformer::moments: checks, allocation and launches. The kernels and the launch
// plan are in moments_kernels.cuh (plain CUDA, also built against the emulator).
//
// Headers: c10/cuda/CUDAStream.h and CUDAGuard.h only; ATen/cuda/CUDAContext.h
// would pull cusparse.h (not on the default include path) and costs time.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "../common/moments_checks.h"
#include "moments_kernels.cuh"

namespace riformer {
namespace {

using namespace moments_kernels;

int sm_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max(sms, 1);
}

template <typename scalar_t, typename acc_t>
void moments_cuda_impl(const at::Tensor& x, bool channels_last,
                       at::Tensor& mean, at::Tensor& var) {
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t T = x.size(2) * x.size(3);
  const int64_t rows = N * C;
  const scalar_t* X = x.const_data_ptr<scalar_t>();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device());

  const MomentsPlan plan = plan_moments(N, C, T, channels_last, sm_count(x.get_device()));
  const int64_t K = plan.K;
  TORCH_CHECK(plan.blocks < (int64_t(1) << 31),
              "riformer::moments: input too large for one launch (", plan.blocks,
              " blocks)");

  at::Tensor part_buf = at::empty({rows * K * 3}, mean.options());
  auto* part = reinterpret_cast<Moments<acc_t>*>(part_buf.mutable_data_ptr<acc_t>());

  const dim3 block(plan.threads_x, plan.threads_y);
  if (!channels_last) {
    moments_partial_nchw<scalar_t, acc_t>
        <<<static_cast<unsigned>(plan.blocks), block, 0, stream>>>(X, T, K, part);
  } else {
    moments_partial_cl<scalar_t, acc_t>
        <<<static_cast<unsigned>(plan.blocks), block, 0, stream>>>(X, T, C, K, plan.CG,
                                                                   part);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  moments_merge<scalar_t, acc_t><<<static_cast<unsigned>(plan.merge_blocks), kMaxThreads,
                                   0, stream>>>(X, T, part, rows, C, K, channels_last,
                                   nullptr, mean.mutable_data_ptr<acc_t>(),
                                   var.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
std::tuple<at::Tensor, at::Tensor> moments_cuda(const at::Tensor& x_in) {
  MomentsProblem p = prepare_moments(x_in, c10::DeviceType::CUDA);
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor mean = p.mean, var = p.var;
  if (mean.numel() == 0) return {mean, var};
  const at::Tensor& x = p.x;
  const bool channels_last = p.channels_last;

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "riformer_moments_cuda", [&] {
        using acc_t =
            std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        moments_cuda_impl<scalar_t, acc_t>(x, channels_last, mean, var);
      });
  return {mean, var};
}

}  // namespace

TORCH_LIBRARY_IMPL(riformer, CUDA, m) {
  m.impl("moments", &moments_cuda);
}

}  // namespace riformer

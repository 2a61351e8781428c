// CUDA binding of riformer::mlp_forward and riformer::mlp_forward_save_u: checks, allocation
// and launches on the current stream, no host synchronisation (CUDA-graph capturable). The
// kernels and their launch plan are in mlp_forward_kernels.cuh (plain CUDA, also built against
// the SIMT emulator, which is how they are tested on machines without a GPU).
//
// The op contract is the CPU kernels' (csrc/ops.cpp): out in x's memory format; out_mean /
// out_var (N, C) in the statistics dtype when emit_moments, else (0, C); u (N, Hd, H, W) in
// the GEMMs' dtype (x's, or the weights' half dtype with float32 x: the mixed-precision mode)
// and x's memory format. Here the moments come from the MLP kernel's epilogue (per-tile
// partials of the stored values) and one merge launch. Large C takes the two-GEMM path
// (plan_mlp: prefer_two_gemm), with an (N, T, Hd) scratch for h.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <tuple>
#include <type_traits>

#include "binding.h"
#include "mlp_forward_kernels.cuh"
#include "moments_kernels.cuh"

namespace riformer {
namespace {

using namespace mlp_cuda;
using namespace cuda_binding;

at::Tensor coeff(const at::Tensor& t, const at::Tensor& x, int64_t N, int64_t C,
                 at::ScalarType acc, const char* name, const char* op) {
  check_device(t, x, name, op);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == C, "riformer::", op, ": ", name,
              " must have shape (", N, ", ", C, "), got ", t.sizes());
  return t.to(acc).contiguous();
}

template <typename Kernel, typename Args>
void launch_one(Kernel* kernel, unsigned grid_y, int64_t smem, const Args& p, const MlpPlan& plan,
                int device, cudaStream_t stream, const char* op) {
  allow_smem(kernel, smem, device, op);
  kernel<<<dim3(plan.grid_x, grid_y), kThreads, size_t(smem), stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The plan's launches: one fused kernel, or the hidden then the output kernel of the two-GEMM
// path (stream order makes h complete before the second reads it).
template <typename scalar_t, typename acc_t, typename op_t>
void launch(const MlpForwardArgs<scalar_t, acc_t, op_t>& p, const MlpPlan& plan, int device,
            cudaStream_t stream, const char* op) {
  if constexpr (std::is_same_v<acc_t, float> && sizeof(op_t) == 2) {
    if (plan.mma) {
      if (plan.two_gemm) {
        launch_one(mlp_forward_mma_kernel<scalar_t, kHidden, op_t>, plan.grid_y_hidden,
                   plan.smem_hidden, p, plan, device, stream, op);
        launch_one(mlp_forward_mma_kernel<scalar_t, kOutput, op_t>, plan.grid_y, plan.smem, p,
                   plan, device, stream, op);
      } else {
        launch_one(mlp_forward_mma_kernel<scalar_t, kFused, op_t>, plan.grid_y, plan.smem, p,
                   plan, device, stream, op);
      }
      return;
    }
  }
  if (plan.two_gemm) {
    launch_one(mlp_forward_kernel<scalar_t, acc_t, kHidden, op_t>, plan.grid_y_hidden,
               plan.smem_hidden, p, plan, device, stream, op);
    launch_one(mlp_forward_kernel<scalar_t, acc_t, kOutput, op_t>, plan.grid_y, plan.smem, p,
               plan, device, stream, op);
  } else {
    launch_one(mlp_forward_kernel<scalar_t, acc_t, kFused, op_t>, plan.grid_y, plan.smem, p,
               plan, device, stream, op);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_forward_impl(
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& a,
    const at::Tensor& b, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2, const at::Tensor& l2, bool emit_moments, bool save_u,
    const char* op) {
  const bool cl = channels_last_of(x, op);
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "riformer::", op, ": supports float32, float64, float16 and bfloat16, got ", st);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), T = x.size(2) * x.size(3);
  TORCH_CHECK(w1.dim() >= 1, "riformer::", op, ": w1 must have the hidden units as rows");
  const int64_t Hd = w1.size(0);
  TORCH_CHECK(Hd > 0, "riformer::", op, ": the MLP has no hidden units");
  const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor mean = at::empty({emit_moments ? N : 0, C}, x.options().dtype(acc));
  at::Tensor var = at::empty({emit_moments ? N : 0, C}, x.options().dtype(acc));
  // The GEMMs' dtype: x's, or the half weights' in the mixed-precision mode, where u (a GEMM
  // output) and the two-GEMM path's h (a GEMM operand) are kept in it too.
  const at::ScalarType gemm = gemm_dtype(w1, w2, x, op);
  at::Tensor u = at::empty({save_u ? N : 0, Hd, x.size(2), x.size(3)},
                           x.options().dtype(gemm).memory_format(fmt));
  if (N * C == 0) return {out, mean, var, u};
  TORCH_CHECK(T > 0, "riformer::", op, ": H*W must be positive, got ", x.sizes());
  const at::Tensor Ac = coeff(A, x, N, C, acc, "A", op), Bc = coeff(B, x, N, C, acc, "B", op);
  const at::Tensor ac = coeff(a, x, N, C, acc, "a", op), bc = coeff(b, x, N, C, acc, "b", op);
  const at::Tensor l2c = coeff(l2, x, N, C, acc, "l2", op);
  const at::Tensor w1c = param(w1, x, Hd, C, "w1", op, gemm);
  const at::Tensor w2c = param(w2, x, C, Hd, "w2", op, gemm);
  const at::Tensor b1c = param(b1, x, Hd, 1, "b1", op, st);
  const at::Tensor b2c = param(b2, x, C, 1, "b2", op, st);

  // The plan follows the GEMM operand type (as the emulated entry's).
  const int elem = int(c10::elementSize(gemm));
  const MlpPlan plan = plan_mlp(N, C, Hd, T, elem, elem == 2);
  TORCH_CHECK(plan.grid_x < (1u << 31), "riformer::", op, ": input too large for one launch");
  at::Tensor part = at::empty({emit_moments ? N * plan.tiles * C * 3 : 0}, x.options().dtype(acc));
  at::Tensor shift = at::empty({emit_moments ? N * C : 0}, x.options().dtype(acc));
  at::Tensor hidden = at::empty({plan.scratch}, x.options().dtype(gemm));   // two-GEMM path's h
  const int device = x.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);

  dispatch_io_and_gemm(st, gemm, "riformer_mlp_forward_cuda", [&](auto io_tag, auto gemm_tag) {
    using scalar_t = typename decltype(io_tag)::type;    // ATen's types
    using gemm_t = typename decltype(gemm_tag)::type;
    using kernel_t = typename KernelType<scalar_t>::type;   // the kernels' (CUDA's half types)
    using op_kernel_t = typename KernelType<gemm_t>::type;
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    MlpForwardArgs<kernel_t, acc_t, op_kernel_t> p{};
    p.x = reinterpret_cast<const kernel_t*>(x.const_data_ptr<scalar_t>());
    p.out = reinterpret_cast<kernel_t*>(out.mutable_data_ptr<scalar_t>());
    p.N = N;
    p.C = C;
    p.Hd = Hd;
    p.T = T;
    p.sn = x.stride(0);
    p.sc = x.stride(1);
    p.st = cl ? x.stride(3) : 1;
    p.tiles = plan.tiles;
    p.A = Ac.const_data_ptr<acc_t>();
    p.B = Bc.const_data_ptr<acc_t>();
    p.a = ac.const_data_ptr<acc_t>();
    p.b = bc.const_data_ptr<acc_t>();
    p.l2 = l2c.const_data_ptr<acc_t>();
    p.w1 = reinterpret_cast<const op_kernel_t*>(w1c.const_data_ptr<gemm_t>());
    p.b1 = reinterpret_cast<const kernel_t*>(b1c.const_data_ptr<scalar_t>());
    p.w2 = reinterpret_cast<const op_kernel_t*>(w2c.const_data_ptr<gemm_t>());
    p.b2 = reinterpret_cast<const kernel_t*>(b2c.const_data_ptr<scalar_t>());
    p.u = save_u ? reinterpret_cast<op_kernel_t*>(u.mutable_data_ptr<gemm_t>()) : nullptr;
    p.u_sj = cl ? 1 : T;
    p.u_st = cl ? Hd : 1;
    p.part = emit_moments ? reinterpret_cast<Moments<acc_t>*>(part.mutable_data_ptr<acc_t>())
                          : nullptr;
    p.shift = emit_moments ? shift.mutable_data_ptr<acc_t>() : nullptr;
    p.h = plan.two_gemm ? reinterpret_cast<op_kernel_t*>(hidden.mutable_data_ptr<gemm_t>())
                        : nullptr;
    launch(p, plan, device, stream, op);
    if (emit_moments) {
      using namespace moments_kernels;
      const int64_t rows = N * C, warps = kMaxThreads / kWarp;
      // x's type only types the unused x pointer (the shifts are given): ATen's, which
      // converts to float without the CUDA half conversions torch builds switch off.
      moments_merge<scalar_t, acc_t><<<unsigned((rows + warps - 1) / warps), kMaxThreads, 0,
                                       stream>>>(
          static_cast<const scalar_t*>(nullptr), T, p.part, rows, C, plan.tiles, true, p.shift,
          mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, mean, var, u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_forward_cuda(
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& a,
    const at::Tensor& b, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2, const at::Tensor& l2, bool emit_moments) {
  auto [out, mean, var, u] =
      mlp_forward_impl(x, A, B, a, b, w1, b1, w2, b2, l2, emit_moments, false, "mlp_forward");
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_forward_save_u_cuda(
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& a,
    const at::Tensor& b, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2, const at::Tensor& l2, bool emit_moments) {
  return mlp_forward_impl(x, A, B, a, b, w1, b1, w2, b2, l2, emit_moments, true,
                          "mlp_forward_save_u");
}

}  // namespace

TORCH_LIBRARY_IMPL(riformer, CUDA, m) {
  m.impl("mlp_forward", &mlp_forward_cuda);
  m.impl("mlp_forward_save_u", &mlp_forward_save_u_cuda);
}

}  // namespace riformer

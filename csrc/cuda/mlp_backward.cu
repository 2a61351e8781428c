// CUDA binding of the fused MLP backward (mlp_backward_kernels.cuh, docs/design.md section 3):
// riformer::cuda_mlp_backward_weights_and_sums (phase 1) and riformer::cuda_mlp_backward_dx
// (phase 2), with the signatures and outputs of the emulated ops riformer_cuda_emu::* of
// riformer_kernels/backends/cuda_emu.py, so the `cuda` kernel set calls one or the other by the
// input's device with the same arguments. Checks, allocation through the caching allocator and
// launches on the current stream; no host synchronisation (CUDA-graph capturable).
//
// The launch sequence is the emulated entry points' (csrc/emu/emulated_kernels.cpp), kernel for
// kernel: the same split plan (plan_splits), grids, block size, shared-memory sizes, scratch
// slots and FFMA / mma choice, so the fixed reduction orders -- and with them the bits -- are
// those the emulator tests. Phase 1: partials (FFMA, or mma for fp16/bf16 where mma_eligible),
// then the weights and sums reductions. Phase 2: the dx kernel (FFMA or mma, the same rule).
// Every kernel template the bindings can launch is instantiated by these launches (the GPU build
// report lists them: 4 FFMA kernels x 6 type pairs -- the 4 dtypes and the mixed-precision mode's
// fp32 activations with fp16/bf16 weights -- and 2 mma kernels x 2 half dtypes).

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "binding.h"
#include "mlp_backward_kernels.cuh"

namespace riformer {
namespace {

using namespace cuda_binding;
using namespace mlp_bwd_cuda;

// The operands both phases share, checked and in the layouts the kernels read.
struct Operands {
  at::Tensor x, g, u;        // u undefined: recompute it
  at::Tensor w1, b1, w2, b2;  // contiguous, w1/w2 4-byte aligned in `gemm`, b1/b2 in x's dtype
  at::ScalarType gemm = at::kFloat;   // the GEMMs' dtype: x's, or half in the mixed mode
  bool channels_last = false;
  bool mma = false;
  int64_t N = 0, C = 0, Hd = 0, T = 0;
  at::ScalarType acc = at::kFloat;
};

// Before the device guard, which takes x's device: the op reaches this kernel when any of its
// tensors is on a CUDA device, so x itself may not be.
void check_x_on_cuda(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), "riformer::", op, ": expected CUDA tensors, x is on ", x.device());
}

Operands prepare(const at::Tensor& g, const at::Tensor& x_in, const at::Tensor& w1,
                 const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                 const std::optional<at::Tensor>& u, const char* op) {
  TORCH_CHECK(x_in.dim() == 4, "riformer::", op, ": expected a 4-D (N, C, H, W) x, got ",
              x_in.sizes());
  const auto st = x_in.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "riformer::", op, ": supports float32, float64, float16 and bfloat16, got ", st);
  Operands o;
  // As the emulated path: NCHW or channels_last read as they are, any other strides copied to
  // NCHW (the pipeline's prepare_input already hands over one of the two).
  o.x = x_in.is_contiguous() || x_in.is_contiguous(at::MemoryFormat::ChannelsLast)
            ? x_in
            : x_in.contiguous();
  o.channels_last = channels_last_of(o.x, op);
  o.N = o.x.size(0);
  o.C = o.x.size(1);
  o.T = o.x.size(2) * o.x.size(3);
  TORCH_CHECK(o.T > 0 || o.N * o.C == 0, "riformer::", op, ": H*W must be positive, got ",
              o.x.sizes());
  o.acc = st == at::kDouble ? at::kDouble : at::kFloat;

  TORCH_CHECK(g.sizes() == o.x.sizes() && g.scalar_type() == st && g.device() == o.x.device(),
              "riformer::", op, ": g is ", g.sizes(), " ", g.scalar_type(), " on ", g.device(),
              "; expected x's ", o.x.sizes(), " ", st, " on ", o.x.device());
  // The kernels read g with x's strides: a g in another layout is copied into x's (an
  // empty_like of a dense x keeps its strides exactly, size-1 dimensions included).
  o.g = g.strides() == o.x.strides() ? g : at::empty_like(o.x).copy_(g);

  TORCH_CHECK(w1.dim() >= 1, "riformer::", op, ": w1 must have the hidden units as rows, got ",
              w1.sizes());
  o.Hd = w1.size(0);
  TORCH_CHECK(o.Hd > 0, "riformer::", op, ": the MLP has no hidden units");
  o.gemm = gemm_dtype(w1, w2, o.x, op);
  o.w1 = param(w1, o.x, o.Hd, o.C, "w1", op, o.gemm);
  o.b1 = param(b1, o.x, o.Hd, 1, "b1", op, st);
  o.w2 = param(w2, o.x, o.C, o.Hd, "w2", op, o.gemm);
  o.b2 = param(b2, o.x, o.C, 1, "b2", op, st);

  if (u.has_value() && u->defined()) {
    const at::Tensor& s = *u;
    TORCH_CHECK(s.dim() == 4 && s.size(0) == o.N && s.size(1) == o.Hd &&
                    s.size(2) == o.x.size(2) && s.size(3) == o.x.size(3) &&
                    s.scalar_type() == o.gemm && s.device() == o.x.device(),
                "riformer::", op, ": u is ", s.sizes(), " ", s.scalar_type(), " on ", s.device(),
                "; expected (", o.N, ", ", o.Hd, ", ", o.x.size(2), ", ", o.x.size(3), ") ",
                o.gemm, " (the weights' dtype) on ", o.x.device());
    // The kernels index u by (sample, hidden unit, token) strides: either dense layout works;
    // others are copied hidden-fastest, the layout the forward saves.
    o.u = s.is_contiguous() || s.is_contiguous(at::MemoryFormat::ChannelsLast)
              ? s
              : s.contiguous(at::MemoryFormat::ChannelsLast);
  }
  // The emulated entry point's choice ('auto'): tensor cores for fp16/bf16 with C and Hd
  // multiples of 16, FFMA otherwise (the mixed mode included: x is fp32 there).
  o.mma = (st == at::kHalf || st == at::kBFloat16) && o.gemm == st && mma_eligible(o.C, o.Hd);
  return o;
}

// (N, C) coefficients in the statistics dtype, as the emulated ops take them (no silent cast:
// a wrong dtype is a caller's bug).
at::Tensor coeff(const at::Tensor& t, const Operands& o, const char* name, const char* op) {
  check_device(t, o.x, name, op);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == o.N && t.size(1) == o.C, "riformer::", op, ": ",
              name, " has shape ", t.sizes(), ", expected (", o.N, ", ", o.C, ")");
  TORCH_CHECK(t.scalar_type() == o.acc, "riformer::", op, ": ", name, " is ", t.scalar_type(),
              ", expected ", o.acc, " (the statistics dtype of ", o.x.scalar_type(), ")");
  return t.contiguous();
}

// The fields both phases fill alike (emulated_kernels.cpp, backward_args): shapes, strides, the
// split plan, the phase-1 coefficients and the weights.
// scalar_t, gemm_t: ATen's types of the activations and of the GEMM operands.
template <typename scalar_t, typename gemm_t, typename acc_t,
          typename kernel_t = typename KernelType<scalar_t>::type,
          typename op_kernel_t = typename KernelType<gemm_t>::type>
MlpBackwardArgs<kernel_t, acc_t, op_kernel_t> args_of(const Operands& o, const SplitPlan& plan,
                                                      const at::Tensor& mean, const at::Tensor& A,
                                                      const at::Tensor& B, const at::Tensor& l2) {
  MlpBackwardArgs<kernel_t, acc_t, op_kernel_t> p{};
  p.x = reinterpret_cast<const kernel_t*>(o.x.const_data_ptr<scalar_t>());
  p.g = reinterpret_cast<const kernel_t*>(o.g.const_data_ptr<scalar_t>());
  p.u = o.u.defined() ? reinterpret_cast<const op_kernel_t*>(o.u.const_data_ptr<gemm_t>())
                      : nullptr;
  p.N = o.N;
  p.C = o.C;
  p.Hd = o.Hd;
  p.T = o.T;
  p.sn = o.x.stride(0);
  p.sc = o.x.stride(1);
  p.st = o.channels_last ? o.x.stride(3) : 1;
  if (o.u.defined()) {
    p.usn = o.u.stride(0);
    p.usc = o.u.stride(1);
    // the one stride of t = h W + w (H and W collapse in either dense layout)
    p.ust = o.u.size(3) > 1 ? o.u.stride(3) : o.u.stride(2);
  }
  p.tiles = plan.tiles;
  p.tiles_per_split = plan.tiles_per_split;
  p.splits = plan.splits;
  p.hchunks = (o.Hd + kHid - 1) / kHid;
  p.A = A.const_data_ptr<acc_t>();
  p.B = B.const_data_ptr<acc_t>();
  p.mean = mean.const_data_ptr<acc_t>();
  p.l2 = l2.const_data_ptr<acc_t>();
  p.w1 = reinterpret_cast<const op_kernel_t*>(o.w1.const_data_ptr<gemm_t>());
  p.b1 = reinterpret_cast<const kernel_t*>(o.b1.const_data_ptr<scalar_t>());
  p.w2 = reinterpret_cast<const op_kernel_t*>(o.w2.const_data_ptr<gemm_t>());
  p.b2 = reinterpret_cast<const kernel_t*>(o.b2.const_data_ptr<scalar_t>());
  return p;
}

SplitPlan plan_of(const Operands& o) {
  return plan_splits(o.N, o.T, o.C, o.Hd, int64_t(o.x.element_size()),
                     o.acc == at::kDouble ? 8 : 4);
}

unsigned grid_dim(int64_t v, int64_t limit, const char* what, const char* op) {
  TORCH_CHECK(v >= 1 && v <= limit, "riformer::", op, ": input too large for one launch (",
              what, " = ", v, ", at most ", limit, ")");
  return unsigned(v);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename Kernel, typename Args>
void launch(Kernel* kernel, dim3 grid, int64_t smem, const Args& p, int device,
            cudaStream_t stream, const char* op) {
  if (smem > 0) allow_smem(kernel, smem, device, op);
  kernel<<<grid, kThreads, size_t(smem), stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The launches of each phase, as the emulated entry points make them. Function templates, so
// `if constexpr` discards the mma launches for fp32/fp64 (in the dispatch lambda it would not,
// and nvcc would reference mma kernels of those types).
template <typename scalar_t, typename acc_t, typename op_t>
void launch_phase1(const MlpBackwardArgs<scalar_t, acc_t, op_t>& p, bool mma, dim3 grid,
                   dim3 grid_w, dim3 grid_s, int device, cudaStream_t stream, const char* op) {
  bool launched = false;
  if constexpr (std::is_same_v<acc_t, float> && sizeof(scalar_t) == 2 &&
                std::is_same_v<scalar_t, op_t>) {
    if (mma) {
      launch(mlp_backward_partials_mma_kernel<scalar_t>, grid, partials_mma_smem_bytes(p.C), p,
             device, stream, op);
      launched = true;
    }
  }
  if (!launched)
    launch(mlp_backward_partials_kernel<scalar_t, acc_t, op_t>, grid,
           partials_smem_bytes(p.C, int64_t(sizeof(acc_t))), p, device, stream, op);
  // Stream order: the reductions start once every partial is written.
  launch(mlp_backward_weights_kernel<scalar_t, acc_t, op_t>, grid_w, 0, p, device, stream, op);
  launch(mlp_backward_sums_kernel<scalar_t, acc_t, op_t>, grid_s, 0, p, device, stream, op);
}

template <typename scalar_t, typename acc_t, typename op_t>
void launch_phase2(const MlpBackwardArgs<scalar_t, acc_t, op_t>& p, bool mma, dim3 grid,
                   int device, cudaStream_t stream, const char* op) {
  if constexpr (std::is_same_v<acc_t, float> && sizeof(scalar_t) == 2 &&
                std::is_same_v<scalar_t, op_t>) {
    if (mma) {
      launch(mlp_backward_dx_mma_kernel<scalar_t>, grid, dx_mma_smem_bytes(p.C), p, device,
             stream, op);
      return;
    }
  }
  launch(mlp_backward_dx_kernel<scalar_t, acc_t, op_t>, grid,
         dx_smem_bytes(p.C, int64_t(sizeof(acc_t))), p, device, stream, op);
}

constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1, kMaxGridYZ = 65535;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> weights_and_sums_cuda(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& l2, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, const std::optional<at::Tensor>& u) {
  const char* op = "cuda_mlp_backward_weights_and_sums";
  check_x_on_cuda(x, op);
  c10::cuda::CUDAGuard guard(x.device());
  const Operands o = prepare(g, x, w1, b1, w2, b2, u, op);
  const at::Tensor meanc = coeff(mean, o, "mean", op), Ac = coeff(A, o, "A", op);
  const at::Tensor Bc = coeff(B, o, "B", op), l2c = coeff(l2, o, "l2", op);
  const auto opts = o.x.options().dtype(o.acc);
  at::Tensor dw1 = at::empty({o.Hd, o.C}, opts), db1 = at::empty({o.Hd}, opts);
  at::Tensor dw2 = at::empty({o.C, o.Hd}, opts), db2 = at::empty({o.C}, opts);
  at::Tensor sums = at::empty({5, o.N, o.C}, opts);
  if (o.N * o.C == 0) {   // sums over no tokens
    for (at::Tensor* t : {&dw1, &db1, &dw2, &db2, &sums}) t->zero_();
    return {dw1, db1, dw2, db2, sums};
  }
  const SplitPlan plan = plan_of(o);
  const int64_t hchunks = ceil_div(o.Hd, kHid), pairs = plan.splits + o.N;
  const dim3 grid1(grid_dim(plan.splits, kMaxGridX, "splits", op),
                   grid_dim(hchunks, kMaxGridYZ, "hidden chunks", op),
                   grid_dim(ceil_div(o.C, kCh), kMaxGridYZ, "channel chunks", op));
  const dim3 grid_s(grid_dim(ceil_div(o.N * o.C, kThreads), kMaxGridX, "sum blocks", op));
  // The phase-1 scratch in one allocation, carved in MlpBackwardArgs' order: per split dw1p,
  // dw2p (Hd C each) and db1p (Hd); per (split, sample) pair sgp, sgxp (C each); per (pair,
  // hidden chunk) sdzp, sdzxp, sgop (C each). Every slot a reduction reads is written first.
  // With one split there are no weight partials: phase 1 writes dw1, dw2, db1 in place
  // (weights_in_place, below).
  const int64_t wsplits = plan.splits == 1 ? 0 : plan.splits;
  const int64_t sizes[8] = {wsplits * o.Hd * o.C, wsplits * o.C * o.Hd,
                            wsplits * o.Hd,       pairs * o.C,
                            pairs * o.C,              pairs * hchunks * o.C,
                            pairs * hchunks * o.C,    pairs * hchunks * o.C};
  int64_t total = 0;
  for (int64_t s : sizes) total += s;
  at::Tensor scratch = at::empty({total}, opts);
  const int device = o.x.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);

  dispatch_io_and_gemm(o.x.scalar_type(), o.gemm, "riformer_cuda_mlp_backward_weights_and_sums",
                       [&](auto io_tag, auto gemm_tag) {
    using scalar_t = typename decltype(io_tag)::type;
    using gemm_t = typename decltype(gemm_tag)::type;
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto p = args_of<scalar_t, gemm_t, acc_t>(o, plan, meanc, Ac, Bc, l2c);
    acc_t* part[8];
    acc_t* next = scratch.mutable_data_ptr<acc_t>();
    for (int i = 0; i < 8; ++i) {
      part[i] = next;
      next += sizes[i];
    }
    acc_t* out[5] = {dw1.mutable_data_ptr<acc_t>(), db1.mutable_data_ptr<acc_t>(),
                     dw2.mutable_data_ptr<acc_t>(), db2.mutable_data_ptr<acc_t>(),
                     sums.mutable_data_ptr<acc_t>()};
    set_phase1_buffers(&p, part, out);
    const dim3 grid_w(grid_dim(ceil_div(weights_elements(p), kThreads), kMaxGridX,
                               "weight-gradient blocks", op));
    launch_phase1(p, o.mma, grid1, grid_w, grid_s, device, stream, op);
  });
  return {dw1, db1, dw2, db2, sums};
}

at::Tensor dx_cuda(const at::Tensor& g, const at::Tensor& x, const at::Tensor& mean,
                   const at::Tensor& A, const at::Tensor& B, const at::Tensor& l2,
                   const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                   const at::Tensor& b2, const at::Tensor& P, const at::Tensor& Q,
                   const at::Tensor& R, const at::Tensor& S, const std::optional<at::Tensor>& u) {
  const char* op = "cuda_mlp_backward_dx";
  check_x_on_cuda(x, op);
  c10::cuda::CUDAGuard guard(x.device());
  const Operands o = prepare(g, x, w1, b1, w2, b2, u, op);
  const at::Tensor meanc = coeff(mean, o, "mean", op), Ac = coeff(A, o, "A", op);
  const at::Tensor Bc = coeff(B, o, "B", op), l2c = coeff(l2, o, "l2", op);
  const at::Tensor Pc = coeff(P, o, "P", op), Qc = coeff(Q, o, "Q", op);
  const at::Tensor Rc = coeff(R, o, "R", op), Sc = coeff(S, o, "S", op);
  at::Tensor dx = at::empty_like(o.x);   // x's strides, as the kernel writes them
  if (o.x.numel() == 0) return dx;
  const SplitPlan plan = plan_of(o);
  const dim3 grid(grid_dim(o.N * plan.tiles, kMaxGridX, "token tiles", op),
                  grid_dim(ceil_div(o.C, kCh), kMaxGridYZ, "channel chunks", op));
  const int device = o.x.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);

  dispatch_io_and_gemm(o.x.scalar_type(), o.gemm, "riformer_cuda_mlp_backward_dx",
                       [&](auto io_tag, auto gemm_tag) {
    using scalar_t = typename decltype(io_tag)::type;
    using gemm_t = typename decltype(gemm_tag)::type;
    using kernel_t = typename KernelType<scalar_t>::type;
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto p = args_of<scalar_t, gemm_t, acc_t>(o, plan, meanc, Ac, Bc, l2c);
    p.P = Pc.const_data_ptr<acc_t>();
    p.Q = Qc.const_data_ptr<acc_t>();
    p.R = Rc.const_data_ptr<acc_t>();
    p.S = Sc.const_data_ptr<acc_t>();
    p.dx = reinterpret_cast<kernel_t*>(dx.mutable_data_ptr<scalar_t>());
    launch_phase2(p, o.mma, grid, device, stream, op);
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(riformer, CUDA, m) {
  m.impl("cuda_mlp_backward_weights_and_sums", &weights_and_sums_cuda);
  m.impl("cuda_mlp_backward_dx", &dx_cuda);
}

}  // namespace riformer

// Entry points of the emulated build of the CUDA kernels (RIFORMER_CUDA_EMULATE=1).
//
// riformer_kernels/backends/cuda_emu.py compiles this file with the flags of csrc/emu/FLAGS
// plus -fPIC -shared into a shared library and calls these extern "C" functions through ctypes.
// It includes the kernel headers of csrc/cuda (the same sources nvcc compiles) and launches them
// with riformer::emu::launch; no torch headers, so the build takes seconds. Tensors arrive as
// raw host pointers with sizes and strides; the Python side checks dtypes, devices and layouts,
// and allocates every output.
//
// Every function returns 0, or 1 with the emulator's message (a failed check names the kernel,
// block, thread and address) in err.

#include <cstdint>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "../cuda/mlp_forward_kernels.cuh"
#include "../cuda/moments_kernels.cuh"

namespace {

// dtype codes shared with cuda_emu.py (_DTYPE_CODES)
enum DType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

void report(const char* what, char* err, size_t errlen) {
  if (err == nullptr || errlen == 0) return;
  std::strncpy(err, what, errlen - 1);
  err[errlen - 1] = '\0';
}

template <typename F>
int guarded(F&& f, char* err, size_t errlen) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    report(e.what(), err, errlen);
  } catch (...) {
    report("unknown C++ exception", err, errlen);
  }
  return 1;
}

template <typename T>
struct Tag { using type = T; };

// Calls f(Tag<scalar_t>, Tag<acc_t>, Tag<op_t>) for the (activations, weights) dtype codes the
// MLP kernels take: one dtype for both, or the mixed-precision mode's fp32 activations with
// fp16/bf16 weights (MlpForwardArgs). Anything else is refused naming the codes.
template <typename F>
void dispatch_mlp_types(int dtype, int wdtype, const char* what, F&& f) {
  if (dtype == wdtype) {
    switch (dtype) {
      case kF32: f(Tag<float>{}, Tag<float>{}, Tag<float>{}); return;
      case kF64: f(Tag<double>{}, Tag<double>{}, Tag<double>{}); return;
      case kF16: f(Tag<__half>{}, Tag<float>{}, Tag<__half>{}); return;
      case kBF16: f(Tag<__nv_bfloat16>{}, Tag<float>{}, Tag<__nv_bfloat16>{}); return;
      default: break;
    }
  } else if (dtype == kF32 && wdtype == kF16) {
    f(Tag<float>{}, Tag<float>{}, Tag<__half>{});
    return;
  } else if (dtype == kF32 && wdtype == kBF16) {
    f(Tag<float>{}, Tag<float>{}, Tag<__nv_bfloat16>{});
    return;
  }
  throw std::invalid_argument(std::string(what) + ": unsupported dtype codes (activations " +
                              std::to_string(dtype) + ", weights " + std::to_string(wdtype) +
                              ")");
}

#define RIFORMER_MLP_TYPES(s, a, o)        \
  using scalar_t = typename decltype(s)::type; \
  using acc_t = typename decltype(a)::type;    \
  using op_t = typename decltype(o)::type

// dims[0..6] as every MLP entry point receives them: N, C, Hd, T and x's strides sn, sc, st.
template <typename Args>
void unpack_shape(Args& p, const int64_t* dims) {
  p.N = dims[0];
  p.C = dims[1];
  p.Hd = dims[2];
  p.T = dims[3];
  p.sn = dims[4];
  p.sc = dims[5];
  p.st = dims[6];
}

template <typename scalar_t, typename acc_t>
void run_moments(const void* x, int64_t N, int64_t C, int64_t T, bool channels_last, int sms,
                 void* mean, void* var) {
  using namespace riformer;
  using namespace riformer::moments_kernels;
  const MomentsPlan plan = plan_moments(N, C, T, channels_last, sms);
  // Poisoned (NaN in every field), so a partial the first stage failed to write shows up.
  std::vector<Moments<acc_t>> part(size_t(N * C * plan.K));
  std::memset(static_cast<void*>(part.data()), 0xff, part.size() * sizeof(Moments<acc_t>));
  const auto* X = static_cast<const scalar_t*>(x);
  if (!channels_last)
    emu::launch(moments_partial_nchw<scalar_t, acc_t>, dim3(unsigned(plan.blocks)),
                dim3(plan.threads_x, plan.threads_y), 0, X, T, plan.K, part.data());
  else
    emu::launch(moments_partial_cl<scalar_t, acc_t>, dim3(unsigned(plan.blocks)),
                dim3(plan.threads_x, plan.threads_y), 0, X, T, C, plan.K, plan.CG, part.data());
  emu::launch(moments_merge<scalar_t, acc_t>, dim3(unsigned(plan.merge_blocks)),
              dim3(kMaxThreads), 0, X, T, static_cast<const Moments<acc_t>*>(part.data()), N * C,
              C, plan.K, channels_last, static_cast<const acc_t*>(nullptr),
              static_cast<acc_t*>(mean), static_cast<acc_t*>(var));
}

template <typename scalar_t, typename acc_t, typename op_t>
void run_mlp_forward(const void* x, void* out, const int64_t* dims, const void* const* coeffs,
                     const void* const* weights, bool mma, int two_gemm, void* u, void* mean,
                     void* var) {
  using namespace riformer;
  using namespace riformer::mlp_cuda;
  MlpForwardArgs<scalar_t, acc_t, op_t> p;
  p.x = static_cast<const scalar_t*>(x);
  p.out = static_cast<scalar_t*>(out);
  unpack_shape(p, dims);
  // The plan follows the GEMM operand type (the mixed mode plans as its half weights).
  const MlpPlan plan = plan_mlp(p.N, p.C, p.Hd, p.T, int(sizeof(op_t)), sizeof(op_t) == 2,
                                mma ? 1 : 0, two_gemm);
  p.tiles = plan.tiles;
  p.A = static_cast<const acc_t*>(coeffs[0]);
  p.B = static_cast<const acc_t*>(coeffs[1]);
  p.a = static_cast<const acc_t*>(coeffs[2]);
  p.b = static_cast<const acc_t*>(coeffs[3]);
  p.l2 = static_cast<const acc_t*>(coeffs[4]);
  p.w1 = static_cast<const op_t*>(weights[0]);
  p.b1 = static_cast<const scalar_t*>(weights[1]);
  p.w2 = static_cast<const op_t*>(weights[2]);
  p.b2 = static_cast<const scalar_t*>(weights[3]);
  p.u = static_cast<op_t*>(u);
  p.u_sj = dims[7];
  p.u_st = dims[8];
  // Epilogue partials and shifts, poisoned (NaN) so a partial no CTA wrote shows in the merge.
  const bool moments = mean != nullptr;
  std::vector<Moments<acc_t>> part(moments ? size_t(p.N * p.tiles * p.C) : 0);
  std::vector<acc_t> shift(moments ? size_t(p.N * p.C) : 0);
  std::memset(static_cast<void*>(part.data()), 0xff, part.size() * sizeof(Moments<acc_t>));
  std::memset(static_cast<void*>(shift.data()), 0xff, shift.size() * sizeof(acc_t));
  p.part = moments ? part.data() : nullptr;
  p.shift = moments ? shift.data() : nullptr;
  auto merge = [&] {
    if (!moments) return;
    using namespace riformer::moments_kernels;
    const int64_t rows = p.N * p.C, warps = kMaxThreads / kWarp;
    emu::launch(moments_merge<scalar_t, acc_t>, dim3(unsigned((rows + warps - 1) / warps)),
                dim3(kMaxThreads), 0, static_cast<const scalar_t*>(nullptr), p.T,
                static_cast<const Moments<acc_t>*>(part.data()), rows, p.C, p.tiles, true,
                static_cast<const acc_t*>(shift.data()), static_cast<acc_t*>(mean),
                static_cast<acc_t*>(var));
  };
  // The two-GEMM path's hidden activations, poisoned like every scratch buffer here.
  std::vector<op_t> h(size_t(plan.scratch));
  std::memset(static_cast<void*>(h.data()), 0xff, h.size() * sizeof(op_t));
  p.h = plan.two_gemm ? h.data() : nullptr;
  const dim3 grid(plan.grid_x, plan.grid_y), grid_hidden(plan.grid_x, plan.grid_y_hidden);
  if constexpr (std::is_same_v<acc_t, float> && sizeof(op_t) == 2) {
    if (mma) {
      // The kernel loads weight pairs as 32-bit words; the emulator does not check global
      // memory, so the alignment a GPU would fault on is checked here.
      if (reinterpret_cast<uintptr_t>(p.w1) % 4 || reinterpret_cast<uintptr_t>(p.w2) % 4)
        throw std::invalid_argument("the mma MLP kernel needs w1 and w2 4-byte aligned");
      if (!mma_eligible(p.C, p.Hd))
        throw std::invalid_argument("the mma MLP kernel needs C and the hidden size to be "
                                    "multiples of 16");
      if (plan.two_gemm) {
        emu::launch(mlp_forward_mma_kernel<scalar_t, kHidden, op_t>, grid_hidden,
                    dim3(kThreads), size_t(plan.smem_hidden), p);
        emu::launch(mlp_forward_mma_kernel<scalar_t, kOutput, op_t>, grid, dim3(kThreads),
                    size_t(plan.smem), p);
      } else {
        emu::launch(mlp_forward_mma_kernel<scalar_t, kFused, op_t>, grid, dim3(kThreads),
                    size_t(plan.smem), p);
      }
      merge();
      return;
    }
  }
  if (mma) throw std::invalid_argument("the mma MLP kernel takes float16 or bfloat16 weights");
  if (plan.two_gemm) {
    emu::launch(mlp_forward_kernel<scalar_t, acc_t, kHidden, op_t>, grid_hidden, dim3(kThreads),
                size_t(plan.smem_hidden), p);
    emu::launch(mlp_forward_kernel<scalar_t, acc_t, kOutput, op_t>, grid, dim3(kThreads),
                size_t(plan.smem), p);
  } else {
    emu::launch(mlp_forward_kernel<scalar_t, acc_t, kFused, op_t>, grid, dim3(kThreads),
                size_t(plan.smem), p);
  }
  merge();
}


}  // namespace

extern "C" {

// Bumped whenever a signature below changes; cuda_emu.py refuses a library of another version.
int riformer_emu_abi_version() { return 6; }

void riformer_emu_set_seed(uint64_t seed) { riformer::emu::set_seed(seed); }

// Global-memory byte counting (riformer::emu::count_global_bytes): on = 1 clears the log and
// counts every later launch; entry i of the log as its kernel name and six counts (read and
// write requests, per-CTA distinct, per-launch distinct).
void riformer_emu_count_bytes(int on) { riformer::emu::count_global_bytes(on != 0); }
int64_t riformer_emu_bytes_log_size() {
  return int64_t(riformer::emu::global_bytes_log().size());
}
int riformer_emu_bytes_log_entry(int64_t i, char* name, size_t len, uint64_t* counts) {
  const auto& log = riformer::emu::global_bytes_log();
  if (i < 0 || size_t(i) >= log.size()) return 1;
  const auto& e = log[size_t(i)];
  report(e.kernel.c_str(), name, len);
  const uint64_t c[6] = {e.read_requests, e.write_requests, e.read_per_cta,
                         e.write_per_cta, e.read_distinct, e.write_distinct};
  for (int k = 0; k < 6; ++k) counts[k] = c[k];
  return 0;
}

// Bytes of dynamic shared memory of the FFMA (mma = 0) or mma (mma = 1) MLP kernel; -1 when
// the mma kernel cannot run the shape or dtype.
// The MLP launch plan for a shape: kernel, path and dynamic shared memory per launch.
// mma / two_gemm: -1 lets plan_mlp choose, 0/1 force. out: {mma, two_gemm, smem,
// smem_hidden, launches, tokens per CTA}; returns -1 when a forced mma cannot run the shape or dtype.
int riformer_emu_mlp_plan(int64_t C, int64_t Hd, int dtype, int mma, int two_gemm,
                          int64_t* out) {
  using namespace riformer::mlp_cuda;
  const bool half = dtype == kF16 || dtype == kBF16;
  const bool can_mma = half && mma_eligible(C, Hd);
  if (mma == 1 && !can_mma) return -1;
  const int elem = dtype == kF64 ? 8 : dtype == kF32 ? 4 : 2;
  const MlpPlan pl = plan_mlp(1, C, Hd, 1, elem, half, mma < 0 ? int(can_mma) : mma, two_gemm);
  out[0] = pl.mma;
  out[1] = pl.two_gemm;
  out[2] = pl.smem;
  out[3] = pl.smem_hidden;
  out[4] = pl.two_gemm ? 2 : 1;
  out[5] = pl.mma ? kMmaTokens : kTokens;
  return 0;
}

int riformer_emu_moments(int dtype, const void* x, int64_t N, int64_t C, int64_t T,
                         int channels_last, int sms, void* mean, void* var, char* err,
                         size_t errlen) {
  return guarded([&] {
    switch (dtype) {
      case kF32: run_moments<float, float>(x, N, C, T, channels_last, sms, mean, var); break;
      case kF64: run_moments<double, double>(x, N, C, T, channels_last, sms, mean, var); break;
      case kF16: run_moments<__half, float>(x, N, C, T, channels_last, sms, mean, var); break;
      case kBF16:
        run_moments<__nv_bfloat16, float>(x, N, C, T, channels_last, sms, mean, var);
        break;
      default: throw std::invalid_argument("riformer_emu_moments: unknown dtype code");
    }
  }, err, errlen);
}

// dims: N, C, Hd, T, sn, sc, st, u_sj, u_st (u's hidden and token strides). coeffs: A, B, a, b, l2 ((N, C) contiguous, statistics dtype).
// weights: w1 (Hd, C), b1, w2 (C, Hd), b2, contiguous; b1, b2 in x's dtype (`dtype`), w1, w2 in
// `wdtype`: x's, or fp16/bf16 for fp32 x (the mixed-precision mode; u is then in wdtype too).
// mma = 1: the tensor-core kernels (float16/bfloat16 only). two_gemm: -1 the large-C rule
// (prefer_two_gemm), 0 the fused kernel, 1 the two-GEMM path. u: (N, T, Hd) saved pre-activation
// or null; mean, var: (N, C) moments of out in the statistics dtype, or null (not computed).
int riformer_emu_mlp_forward(int dtype, int wdtype, const void* x, void* out,
                             const int64_t* dims, const void* const* coeffs,
                             const void* const* weights, int mma, int two_gemm, void* u,
                             void* mean, void* var, char* err, size_t errlen) {
  return guarded([&] {
    dispatch_mlp_types(dtype, wdtype, "riformer_emu_mlp_forward", [&](auto s, auto a, auto o) {
      RIFORMER_MLP_TYPES(s, a, o);
      run_mlp_forward<scalar_t, acc_t, op_t>(x, out, dims, coeffs, weights, mma != 0, two_gemm,
                                             u, mean, var);
    });
  }, err, errlen);
}

}  // extern "C"

// =============================================================================================
// The MLP backward (csrc/cuda/mlp_backward_kernels.cuh; issue 12). Kept in its own section at
// the end of the file, apart from the forward's entry points above.
// =============================================================================================

#include "../cuda/mlp_backward_kernels.cuh"

namespace {

// dims: N, C, Hd, T, sn, sc, st, usn, usc, ust, tiles_per_split (0: the plan's rule), mma
// (1: the tensor-core kernels; fp16/bf16 with C and Hd multiples of 16).
// coeffs: A, B, mean, l2, then P, Q, R, S for phase 2 ((N, C) contiguous, statistics dtype).
// weights: w1 (Hd, C), b1, w2 (C, Hd), b2 (contiguous, x's dtype).
template <typename scalar_t, typename acc_t, typename op_t>
riformer::mlp_bwd_cuda::MlpBackwardArgs<scalar_t, acc_t, op_t> backward_args(
    const void* x, const void* g, const void* u, const int64_t* dims, const void* const* coeffs,
    const void* const* weights) {
  using namespace riformer::mlp_bwd_cuda;
  MlpBackwardArgs<scalar_t, acc_t, op_t> p{};
  p.x = static_cast<const scalar_t*>(x);
  p.g = static_cast<const scalar_t*>(g);
  p.u = static_cast<const op_t*>(u);
  unpack_shape(p, dims);
  p.usn = dims[7];
  p.usc = dims[8];
  p.ust = dims[9];
  const SplitPlan plan = plan_splits(p.N, p.T, p.C, p.Hd, sizeof(scalar_t), sizeof(acc_t), dims[10]);
  p.tiles = plan.tiles;
  p.tiles_per_split = plan.tiles_per_split;
  p.splits = plan.splits;
  p.hchunks = (p.Hd + kHid - 1) / kHid;
  p.A = static_cast<const acc_t*>(coeffs[0]);
  p.B = static_cast<const acc_t*>(coeffs[1]);
  p.mean = static_cast<const acc_t*>(coeffs[2]);
  p.l2 = static_cast<const acc_t*>(coeffs[3]);
  p.w1 = static_cast<const op_t*>(weights[0]);
  p.b1 = static_cast<const scalar_t*>(weights[1]);
  p.w2 = static_cast<const op_t*>(weights[2]);
  p.b2 = static_cast<const scalar_t*>(weights[3]);
  return p;
}

unsigned ceil_div(int64_t a, int64_t b) { return unsigned((a + b - 1) / b); }

// Whether the tensor-core kernels run (mma != 0), refusing what they cannot run. The mma
// kernels load weight pairs as 32-bit words or 16-bit halves; the emulator does not check
// global memory, so the alignment a GPU would fault on is checked here.
template <typename scalar_t, typename acc_t, typename op_t, typename Args>
bool use_backward_mma(const Args& p, int64_t mma) {
  using namespace riformer::mlp_bwd_cuda;
  if (!mma) return false;
  if (!(std::is_same_v<acc_t, float> && sizeof(scalar_t) == 2 && std::is_same_v<scalar_t, op_t>))
    throw std::invalid_argument("the mma backward kernels take float16 or bfloat16 activations "
                                "and weights (the mixed-precision mode runs the FFMA kernels)");
  if (reinterpret_cast<uintptr_t>(p.w1) % 4 || reinterpret_cast<uintptr_t>(p.w2) % 4)
    throw std::invalid_argument("the mma backward kernels need w1 and w2 4-byte aligned");
  if (!mma_eligible(p.C, p.Hd))
    throw std::invalid_argument("the mma backward kernels need C and the hidden size to be "
                                "multiples of 16");
  return true;
}

// partials (see MlpBackwardArgs): dw1p, dw2p, db1p (per split: `riformer_emu_mlp_backward_splits`
// of them; unused with one split, see weights_in_place), sgp, sgxp (per pair: splits + N), sdzp,
// sdzxp, sgop (per pair and hidden chunk); outs: dw1, db1, dw2, db2, sums.
template <typename scalar_t, typename acc_t, typename op_t>
void run_mlp_backward_phase1(const void* x, const void* g, const void* u, const int64_t* dims,
                             const void* const* coeffs, const void* const* weights,
                             void* const* partials, void* const* outs) {
  using namespace riformer;
  using namespace riformer::mlp_bwd_cuda;
  auto p = backward_args<scalar_t, acc_t, op_t>(x, g, u, dims, coeffs, weights);
  set_phase1_buffers(&p, reinterpret_cast<acc_t* const*>(partials),
                     reinterpret_cast<acc_t* const*>(outs));
  const dim3 grid(unsigned(p.splits), unsigned(p.hchunks), ceil_div(p.C, kCh));
  bool launched = false;
  if (use_backward_mma<scalar_t, acc_t, op_t>(p, dims[11])) {
    if constexpr (std::is_same_v<acc_t, float> && sizeof(scalar_t) == 2 &&
                  std::is_same_v<scalar_t, op_t>) {
      emu::launch(mlp_backward_partials_mma_kernel<scalar_t>, grid, dim3(kThreads),
                  size_t(partials_mma_smem_bytes(p.C)), p);
      launched = true;
    }
  }
  if (!launched)
    emu::launch(mlp_backward_partials_kernel<scalar_t, acc_t, op_t>, grid, dim3(kThreads),
                size_t(partials_smem_bytes(p.C, sizeof(acc_t))), p);
  emu::launch(mlp_backward_weights_kernel<scalar_t, acc_t, op_t>,
              dim3(ceil_div(weights_elements(p), kThreads)), dim3(kThreads), 0, p);
  emu::launch(mlp_backward_sums_kernel<scalar_t, acc_t, op_t>,
              dim3(ceil_div(p.N * p.C, kThreads)), dim3(kThreads), 0, p);
}

template <typename scalar_t, typename acc_t, typename op_t>
void run_mlp_backward_dx(const void* x, const void* g, const void* u, const int64_t* dims,
                         const void* const* coeffs, const void* const* weights, void* dx) {
  using namespace riformer;
  using namespace riformer::mlp_bwd_cuda;
  auto p = backward_args<scalar_t, acc_t, op_t>(x, g, u, dims, coeffs, weights);
  p.P = static_cast<const acc_t*>(coeffs[4]);
  p.Q = static_cast<const acc_t*>(coeffs[5]);
  p.R = static_cast<const acc_t*>(coeffs[6]);
  p.S = static_cast<const acc_t*>(coeffs[7]);
  p.dx = static_cast<scalar_t*>(dx);
  const dim3 grid(unsigned(p.N * p.tiles), ceil_div(p.C, kCh));
  if (use_backward_mma<scalar_t, acc_t, op_t>(p, dims[11])) {
    if constexpr (std::is_same_v<acc_t, float> && sizeof(scalar_t) == 2 &&
                  std::is_same_v<scalar_t, op_t>) {
      emu::launch(mlp_backward_dx_mma_kernel<scalar_t>, grid, dim3(kThreads),
                  size_t(dx_mma_smem_bytes(p.C)), p);
      return;
    }
  }
  emu::launch(mlp_backward_dx_kernel<scalar_t, acc_t, op_t>, grid, dim3(kThreads),
              size_t(dx_smem_bytes(p.C, sizeof(acc_t))), p);
}

}  // namespace

extern "C" {

// Dynamic shared memory of the larger of the two backward kernels that use it, FFMA (mma = 0)
// or tensor-core (mma = 1); -1 when the mma kernels cannot run the shape or dtype.
int64_t riformer_emu_mlp_backward_smem_bytes(int64_t C, int64_t Hd, int dtype, int mma) {
  using namespace riformer::mlp_bwd_cuda;
  int64_t a, b;
  if (mma) {
    if ((dtype != kF16 && dtype != kBF16) || !mma_eligible(C, Hd)) return -1;
    a = partials_mma_smem_bytes(C);
    b = dx_mma_smem_bytes(C);
  } else {
    const int64_t acc = dtype == kF64 ? 8 : 4;
    a = partials_smem_bytes(C, acc);
    b = dx_smem_bytes(C, acc);
  }
  return a > b ? a : b;
}

// Number of splits (partial slots) phase 1 uses for this shape and dtype.
int64_t riformer_emu_mlp_backward_splits(int64_t N, int64_t T, int64_t C, int64_t Hd, int dtype,
                                         int64_t tiles_per_split) {
  const int64_t scalar = dtype == kF64 ? 8 : dtype == kF32 ? 4 : 2, acc = dtype == kF64 ? 8 : 4;
  return riformer::mlp_bwd_cuda::plan_splits(N, T, C, Hd, scalar, acc, tiles_per_split).splits;
}

// dtype: x's, g's and the biases'; wdtype: w1's, w2's and the saved u's (x's, or fp16/bf16 for
// fp32 x: the mixed-precision mode, which runs the FFMA kernels).
int riformer_emu_mlp_backward_phase1(int dtype, int wdtype, const void* x, const void* g,
                                     const void* u, const int64_t* dims,
                                     const void* const* coeffs, const void* const* weights,
                                     void* const* partials, void* const* outs, char* err,
                                     size_t errlen) {
  return guarded([&] {
    dispatch_mlp_types(dtype, wdtype, "riformer_emu_mlp_backward_phase1",
                       [&](auto s, auto a, auto o) {
      RIFORMER_MLP_TYPES(s, a, o);
      run_mlp_backward_phase1<scalar_t, acc_t, op_t>(x, g, u, dims, coeffs, weights, partials,
                                                     outs);
    });
  }, err, errlen);
}

int riformer_emu_mlp_backward_dx(int dtype, int wdtype, const void* x, const void* g,
                                 const void* u, const int64_t* dims, const void* const* coeffs,
                                 const void* const* weights, void* dx, char* err, size_t errlen) {
  return guarded([&] {
    dispatch_mlp_types(dtype, wdtype, "riformer_emu_mlp_backward_dx", [&](auto s, auto a, auto o) {
      RIFORMER_MLP_TYPES(s, a, o);
      run_mlp_backward_dx<scalar_t, acc_t, op_t>(x, g, u, dims, coeffs, weights, dx);
    });
  }, err, errlen);
}

}  // extern "C"

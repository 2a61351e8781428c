// Helpers the torch bindings of the MLP kernels share (mlp_forward.cu, mlp_backward.cu): the
// kernels are written for CUDA's half types and take raw pointers; these map ATen's types onto
// them, check the operands the same way and opt in to large dynamic shared memory. A `.h`, not
// a `.cuh`: it includes torch headers, and the emulated build (which hashes csrc/cuda/*.cuh)
// never reads it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace riformer {
namespace cuda_binding {

// ATen's half types and the CUDA ones the kernels are written for: same bits.
template <typename T>
struct KernelType { using type = T; };
template <>
struct KernelType<at::Half> { using type = __half; };
template <>
struct KernelType<at::BFloat16> { using type = __nv_bfloat16; };

// True for channels_last, false for NCHW; raises for a tensor the kernels cannot index with
// one token stride (callers that accept other strides copy first).
inline bool channels_last_of(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 4, "riformer::", op, ": expected a 4-D (N, C, H, W) input, got ",
              x.sizes());
  TORCH_CHECK(x.is_cuda(), "riformer::", op, ": expected a CUDA tensor, got ", x.device());
  if (x.is_contiguous()) return false;
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "riformer::", op,
              ": x must be contiguous in NCHW or channels_last order (got strides ",
              x.strides(), ")");
  return true;
}

inline void check_device(const at::Tensor& t, const at::Tensor& x, const char* name,
                         const char* op) {
  TORCH_CHECK(t.device() == x.device(), "riformer::", op, ": ", name, " is on ", t.device(),
              ", x on ", x.device());
}

template <typename T>
struct Tag { using type = T; };

// The dtype of the MLP's GEMMs, from the weights: x's, or float16/bfloat16 for float32 x (the
// mixed-precision mode autocast runs: fp32 activations and biases around half GEMM operands;
// the kernels' op_t).
inline at::ScalarType gemm_dtype(const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& x,
                                 const char* op) {
  const at::ScalarType io = x.scalar_type(), gemm = w1.scalar_type();
  TORCH_CHECK(gemm == io || (io == at::kFloat && (gemm == at::kHalf || gemm == at::kBFloat16)),
              "riformer::", op, ": w1 has dtype ", gemm, "; the kernels take the weights in x's "
              "dtype (", io, "), or in float16/bfloat16 for float32 x (the mixed-precision mode)");
  TORCH_CHECK(w2.scalar_type() == gemm, "riformer::", op, ": w2 has dtype ", w2.scalar_type(),
              ", expected w1's ", gemm);
  return gemm;
}

// Calls f(Tag<io>, Tag<gemm>) with the ATen types of the activations and of the GEMM operands:
// the four one-dtype pairs, or float32 with float16/bfloat16 (checked by gemm_dtype first).
template <typename F>
void dispatch_io_and_gemm(at::ScalarType io, at::ScalarType gemm, const char* name, F&& f) {
  if (io == gemm) {
    switch (io) {
      case at::kFloat: return f(Tag<float>{}, Tag<float>{});
      case at::kDouble: return f(Tag<double>{}, Tag<double>{});
      case at::kHalf: return f(Tag<at::Half>{}, Tag<at::Half>{});
      case at::kBFloat16: return f(Tag<at::BFloat16>{}, Tag<at::BFloat16>{});
      default: break;
    }
  } else if (io == at::kFloat && gemm == at::kHalf) {
    return f(Tag<float>{}, Tag<at::Half>{});
  } else if (io == at::kFloat && gemm == at::kBFloat16) {
    return f(Tag<float>{}, Tag<at::BFloat16>{});
  }
  TORCH_CHECK(false, name, ": no kernels for ", io, " activations with ", gemm, " weights");
}

// A weight or bias in `dtype` (the kernels read the biases as x's type, the weights as the
// GEMMs' type), contiguous.
inline at::Tensor param(const at::Tensor& w, const at::Tensor& x, int64_t rows, int64_t cols,
                        const char* name, const char* op, at::ScalarType dtype) {
  check_device(w, x, name, op);
  TORCH_CHECK(w.dim() >= 1 && w.numel() == rows * cols && w.size(0) == rows, "riformer::", op,
              ": ", name, " must have ", rows, " x ", cols, " elements in ", rows,
              " rows, got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == dtype, "riformer::", op, ": ", name, " has dtype ",
              w.scalar_type(), ", expected ", dtype);
  // The mma kernels read weight pairs as 32-bit words: a fresh contiguous copy is aligned, a
  // view at an odd element offset is not.
  at::Tensor c = w.contiguous().reshape({rows, cols});
  if (reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 4 != 0) c = c.clone();
  return c;
}

// Kernels asking for more than the default 48 KiB of dynamic shared memory must opt in; the
// device's opt-in limit is checked first so an oversized CTA raises with its byte count instead
// of failing the launch.
template <typename Kernel>
void allow_smem(Kernel* kernel, int64_t bytes, int device, const char* op) {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= optin, "riformer::", op, ": C needs ", bytes,
              " bytes of shared memory per CTA, more than this GPU's ", optin);
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(bytes)));
}

}  // namespace cuda_binding
}  // namespace riformer

// nvcc instantiations of the fused MLP forward kernel (mlp_forward_kernels.cuh), so the GPU build
// report (riformer_kernels.tools.gpu_build_report, which compiles csrc/cuda/*.cu with
// -Xptxas -v) lists its registers, spills and shared memory per architecture. There is no torch
// binding yet: the kernel runs through the emulator only (riformer_kernels/backends/cuda_emu.py),
// so setup.py does not compile this file into the extension.

#include "mlp_forward_kernels.cuh"

namespace riformer {
namespace mlp_cuda {

template __global__ void mlp_forward_kernel<float, float>(MlpForwardArgs<float, float>);
template __global__ void mlp_forward_kernel<double, double>(MlpForwardArgs<double, double>);
template __global__ void mlp_forward_kernel<__half, float>(MlpForwardArgs<__half, float>);
template __global__ void mlp_forward_kernel<__nv_bfloat16, float>(
    MlpForwardArgs<__nv_bfloat16, float>);

template __global__ void mlp_forward_mma_kernel<__half>(MlpForwardArgs<__half, float>);
template __global__ void mlp_forward_mma_kernel<__nv_bfloat16>(MlpForwardArgs<__nv_bfloat16, float>);

}  // namespace mlp_cuda
}  // namespace riformer

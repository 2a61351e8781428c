// nvcc instantiations of the fused MLP backward kernels (mlp_backward_kernels.cuh), so the GPU
// build report (riformer_kernels.tools.gpu_build_report, which compiles csrc/cuda/*.cu with
// -Xptxas -v) lists their registers, spills and shared memory per architecture. Like
// mlp_forward.cu there is no torch binding yet: the kernels run through the emulator only
// (riformer_kernels/backends/cuda_emu.py), so setup.py does not compile this file.

#include "mlp_backward_kernels.cuh"

namespace riformer {
namespace mlp_bwd_cuda {

#define RIFORMER_BWD_INSTANTIATE(S, A)                                                       \
  template __global__ void mlp_backward_partials_kernel<S, A>(MlpBackwardArgs<S, A>);       \
  template __global__ void mlp_backward_weights_kernel<S, A>(MlpBackwardArgs<S, A>);        \
  template __global__ void mlp_backward_sums_kernel<S, A>(MlpBackwardArgs<S, A>);           \
  template __global__ void mlp_backward_dx_kernel<S, A>(MlpBackwardArgs<S, A>);

RIFORMER_BWD_INSTANTIATE(float, float)
RIFORMER_BWD_INSTANTIATE(double, double)
RIFORMER_BWD_INSTANTIATE(__half, float)
RIFORMER_BWD_INSTANTIATE(__nv_bfloat16, float)

template __global__ void mlp_backward_partials_mma_kernel<__half>(MlpBackwardArgs<__half, float>);
template __global__ void mlp_backward_partials_mma_kernel<__nv_bfloat16>(
    MlpBackwardArgs<__nv_bfloat16, float>);
template __global__ void mlp_backward_dx_mma_kernel<__half>(MlpBackwardArgs<__half, float>);
template __global__ void mlp_backward_dx_mma_kernel<__nv_bfloat16>(
    MlpBackwardArgs<__nv_bfloat16, float>);

#undef RIFORMER_BWD_INSTANTIATE

}  // namespace mlp_bwd_cuda
}  // namespace riformer

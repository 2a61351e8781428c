"""The `cuda` backend: hand-written CUDA kernels in csrc/cuda.

Without RIFORMER_CUDA_EMULATE=1 it is registered with the reason it cannot run blocks (the
compiled extension has the moments kernel only; the fused MLP kernel has no torch binding yet).

With RIFORMER_CUDA_EMULATE=1 set before riformer_kernels is imported, it is a
`pipeline.KernelSet` whose kernels are the csrc/cuda sources built against the SIMT emulator
(`cuda_emu`) and run on CPU tensors, for inference:

* moments: the two-stage split moments kernels (per-(n,c) mean and variance; `merge` is the
  identity, as for the cpu kernel set);
* mlp_forward: the fused MLP forward kernel (csrc/cuda/mlp_forward_kernels.cuh); the output's
  moments, when the next block asks for them, come from its epilogue (per-tile partials of the
  stored values, merged by the moments merge kernel), and u is saved when recompute=False.

* backward (training): csrc/cuda/mlp_backward_kernels.cuh -- phase 1 (the MLP weight
  gradients and the five per-(n,c) sums, from per-split partials reduced in a fixed order:
  bitwise deterministic; u read from the forward's saved u with recompute=False, else
  recomputed) and phase 2 (dx, recomputing u, du and dz per token tile).

`auto` never
picks the emulated kernels (dispatch.AUTO_ORDER has no `cuda` for CPU tensors): it is a test
vehicle, orders of magnitude slower than the cpu kernels; ask for it with use_backend('cuda').
"""
from __future__ import annotations

import torch

from .. import _ext
from ..dispatch import Backend, register_backend
from ..pipeline import KernelSet, Partials, Phase1, register_kernel_set
from . import cuda_emu

BACKWARD_MISSING = "the cuda backward is issue 12"


def _is_training_call(block, x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or
                                        any(p.requires_grad for p in block.parameters()))


def _supports(block, x: torch.Tensor) -> str | None:
    if x.device.type != 'cpu':
        return (f"the emulated cuda kernels run on CPU tensors (input is on {x.device}); the "
                f"compiled CUDA build has no fused MLP binding yet")
    if x.dtype not in cuda_emu.SUPPORTED_DTYPES:
        return f"the cuda kernels take float32/float64/float16/bfloat16, not {x.dtype}"
    training = _is_training_call(block, x)
    if block.mlp.fc1.weight.shape[0] < 1:
        return "the MLP has no hidden units"
    c = x.shape[1]
    smem = cuda_emu.mlp_smem_bytes(c, x.dtype, block.mlp.fc1.weight.shape[0])
    if smem > cuda_emu.MAX_DYNAMIC_SMEM:
        return (f"C={c} in {x.dtype} needs {smem} bytes of shared memory per CTA (the MLP kernel "
                f"keeps z for all C channels of its token tile), over {cuda_emu.MAX_DYNAMIC_SMEM}")
    if training:
        smem = cuda_emu.mlp_backward_smem_bytes(c, x.dtype, block.mlp.fc1.weight.shape[0])
        if smem > cuda_emu.MAX_DYNAMIC_SMEM:
            return (f"training at C={c} in {x.dtype}: the backward kernels need {smem} bytes of "
                    f"shared memory per CTA (z and l2 g of all C channels of a token tile), over "
                    f"{cuda_emu.MAX_DYNAMIC_SMEM}")
    return None


def _prepare_input(x: torch.Tensor) -> torch.Tensor:
    # The kernels read NCHW or channels_last; any other strides are copied to NCHW.
    return x if cuda_emu.layout(x) is not None else x.contiguous()


def _moments(x: torch.Tensor) -> Partials:
    mean, var = cuda_emu.moments_op(x)
    return Partials(mean, var, 0)


def _mlp_forward(x, cf, l2, w1, b1, w2, b2, save_u: bool, emit_moments: bool):
    w1, w2 = (w.reshape(w.shape[0], -1) for w in (w1, w2))
    out, mean, var, u = cuda_emu.mlp_forward_op(x, cf.A, cf.B, cf.a, cf.b, l2, w1, b1, w2, b2,
                                                save_u, emit_moments)
    return out, mean, var, (u if save_u else None)


def _grad_in_x_layout(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # The backward kernels read g with x's strides.
    if g.stride() == x.stride():
        return g
    fmt = (torch.channels_last if cuda_emu.layout(x) == 'channels_last'
           else torch.contiguous_format)
    return g.contiguous(memory_format=fmt)


def _backward_weights_and_sums(g, sv) -> Phase1:
    g = _grad_in_x_layout(g, sv.x)
    dw1, db1, dw2, db2, sums = cuda_emu.mlp_backward_weights_and_sums_op(
        g, sv.x, sv.mean, sv.A, sv.B, sv.l2, sv.w1, sv.b1, sv.w2, sv.b2, sv.u)
    return Phase1(sums, db2, (dw1, db1, dw2), (g,))


def _backward_dx(g, sv, p1: Phase1, bc):
    (g,) = p1.carry
    # Phase 2 recomputes u even when the forward saved it (as the triton backend does): one
    # GEMM per tile there instead of reading u, 4 |x| of traffic. Phase 1 reads the saved u,
    # which spares it the u GEMM once per channel chunk.
    dx = cuda_emu.mlp_backward_dx_op(g, sv.x, sv.mean, sv.A, sv.B, sv.l2, sv.w1, sv.b1, sv.w2,
                                     sv.b2, bc.P, bc.Q, bc.R, bc.S, None)
    return dx, p1.weights


if cuda_emu.ENABLED:
    KERNELS = KernelSet(
        'cuda', availability=cuda_emu.availability, supports=_supports,
        prepare_input=_prepare_input, moments=_moments,
        merge=lambda m1, m2, tokens, span: (m1, m2), mlp_forward=_mlp_forward,
        output_span=lambda out: 0, backward_weights_and_sums=_backward_weights_and_sums,
        backward_dx=_backward_dx)
    register_kernel_set(KERNELS)
else:
    register_backend(Backend('cuda', availability=lambda: _ext.native_availability('CUDA')))

"""The `triton` kernel set: Triton kernels of the fused block, run by `riformer_kernels.pipeline`.

* moments: the split `moments_partials` kernel (per-span partial means and M2s, merged in a
  fixed order by `forward.merge_partials` -> `fold.merge_moments`).
* mlp_forward: `forward.mlp_forward` (flash MLP, or two fused GEMMs for large C; `forward.py`
  docstring), which also writes the partial moments of the stored output: chained statistics.
* phase 1 / phase 2: `backward.py` (small C: one weight-gradient launch with the sums, then dx
  with dz recomputed per tile; large C: hidden/du scratch and dz, then the weight gradients with
  dx fused in).

Modules: `forward.py` / `backward.py` (launch rules, configurations, torch.library custom ops in
the `riformer_triton` namespace, GPU build specs), `backward_kernels.py` (the backward's
@triton.jit kernels; the forward's are in `forward.py`).
"""
from __future__ import annotations

import torch

from ...pipeline import KernelSet, Partials, Phase1, register_kernel_set

try:
    from . import backward as tbw
    from . import forward as tfw
    IMPORT_ERROR: str | None = None
except ImportError as err:  # triton missing or broken
    tfw = tbw = None
    IMPORT_ERROR = f"triton could not be imported ({err})"


def _availability() -> str | None:
    if tfw is None:
        return IMPORT_ERROR
    if not torch.cuda.is_available() and not tfw.INTERPRET:
        return ("no CUDA device is visible to torch and TRITON_INTERPRET=1 was not set before "
                "riformer_kernels was imported")
    return None


def _supports(block, x: torch.Tensor) -> str | None:
    if x.dtype not in tfw.SUPPORTED_DTYPES:
        return f"the triton kernels take float32/float16/bfloat16, not {x.dtype}"
    if x.device.type == 'cpu':
        if not tfw.INTERPRET:
            return "CPU tensors run the triton kernels only under TRITON_INTERPRET=1"
    elif x.device.type != 'cuda':
        return f"the triton kernels run on CUDA tensors, not {x.device.type}"
    if block.mlp.fc1.weight.shape[0] < 1:
        return "the MLP has no hidden units"
    c = x.shape[1]
    if tfw.MAX_CHANNELS is not None and c > tfw.MAX_CHANNELS:
        return f"the fused MLP kernels take C <= {tfw.MAX_CHANNELS}, not C={c}"
    if x.device.type == 'cuda':
        # Every config the rule picks (flash where MLP_TILES has a spill-free tile, else the
        # two-GEMM path) is in GPU_BUILD_SPECS; this guards a rule change that breaks that.
        cfg = tfw.mlp_config(x.shape[0], c, x.shape[2] * x.shape[3], x.dtype)
        if not cfg['spill_free']:
            return (f"no spill-free MLP config for C={c} in {x.dtype} on the GPU "
                    f"(see forward.mlp_path)")
    return None


def _prepare_input(x: torch.Tensor) -> torch.Tensor:
    # H and W that do not collapse into one token stride: the only layout this copies.
    return x.contiguous() if tfw.token_strides(x) is None else x


def _moments(x: torch.Tensor) -> Partials:
    pmean, pm2 = tfw.moments_partials(x)
    n, c, h, w = x.shape
    return Partials(pmean, pm2, tfw.moments_config(n, c, h * w)['span'])


def _mlp_forward(x, cf, l2, w1, b1, w2, b2, save_u: bool, emit_moments: bool):
    # The epilogue always takes the partial moments (they are part of every kernel variant the
    # build report compiles), so they are returned whether or not the caller asked.
    out, pmean, pm2, u = tfw.mlp_forward(
        x, cf.A.contiguous(), cf.B.contiguous(), cf.a.contiguous(), cf.b.contiguous(), l2,
        w1, b1, w2, b2, save_u=save_u)
    return out, pmean, pm2, (u if save_u else None)


def _output_span(out: torch.Tensor) -> int:
    n, c, h, w = out.shape
    return tfw.mlp_config(n, c, h * w, out.dtype)['span']


def _phase_args(sv):
    return (sv.mean, sv.A, sv.B, sv.w1, sv.b1, sv.w2, sv.b2, sv.l2, sv.u)


def _backward_weights_and_sums(g, sv) -> Phase1:
    """Large C: kernels A and B (the hidden/du scratch, dz, the sums); small C: one launch of
    the weight-gradient kernel with the sums (dz never written)."""
    ops = torch.ops.riformer_triton
    if tbw._large_path(sv.x.shape[1], sv.w1.dtype):
        dz, sums, db2, hs, dus, db1p = ops.backward_dz(g, sv.x, *_phase_args(sv))
        return Phase1(sums, db2, None, (dz, hs, dus, db1p))
    dw1, db1, dw2, db2, sums = ops.backward_weights_sums(g, sv.x, *_phase_args(sv))
    return Phase1(sums, db2, (dw1, db1, dw2), ())


def _backward_dx(g, sv, p1: Phase1, bc):
    """Large C: the weight gradients from the scratch with dx fused in; small C: dx with dz
    recomputed per token tile."""
    ops = torch.ops.riformer_triton
    if p1.weights is None:
        dz, hs, dus, db1p = p1.carry
        dw1, db1, dw2, dx = ops.backward_weights_dx(g, sv.x, dz, *_phase_args(sv), hs, dus,
                                                    db1p, bc.P, bc.Q, bc.R, bc.S)
        return dx, (dw1, db1, dw2)
    return ops.backward_dx(g, sv.x, *_phase_args(sv), bc.P, bc.Q, bc.R, bc.S), p1.weights


KERNELS = KernelSet(
    'triton', availability=_availability, supports=_supports, prepare_input=_prepare_input,
    moments=_moments, merge=lambda m1, m2, tokens, span: tfw.merge_partials(m1, m2, tokens, span),
    mlp_forward=_mlp_forward, output_span=_output_span,
    backward_weights_and_sums=_backward_weights_and_sums, backward_dx=_backward_dx,
    # fp32 x / out / g / dz / dx with half weights: the dot dtype is the weights' (forward.py
    # `_dot_flags`, backward.py `_prepare`).
    mixed_precision=(torch.float16, torch.bfloat16))
register_kernel_set(KERNELS)

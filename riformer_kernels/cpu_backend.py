"""The `cpu` backend: the folded block on the CPU in the extension's C++ kernels.

Forward (csrc/cpu): `riformer::moments` (one read of x) -> `fold.fold_coefficients` (O(N*C), the
one copy of the algebra) -> `riformer::mlp_forward`, which runs the MLP over cache-sized token
tiles (z = A x + B, fc1 GEMM, exact GELU, fc2 GEMM, epilogue a x + b + l2 o) and writes `out`.

Training: `CpuBlockFunction` saves x and O(N*C) statistics (recompute=True), or also the hidden
pre-activation u (recompute=False, `riformer::mlp_forward_save_u`). Its backward is DESIGN.md
section 3: `riformer::mlp_backward` (phase 1: dz, the MLP's weight gradients and five per-(n,c)
sums) -> `fold.backward_coefficients` -> `riformer::input_grad` (phase 2: dx). The Function's
inputs are x and the folded per-channel quantities (s, t, l1, l2, g2, beta2) plus the MLP
weights; autograd carries the O(C) gradients back to the training-form parameters (norm1, the
affine mixer, the layer scales and the drop-path factors) through `BlockParams.scale_shift` and
`fold.per_sample_scale`.

Memory mode: `riformer_kernels.set_recompute(True|False|None)` globally, else the block's
`recompute` attribute (default True); see `dispatch.recompute_for`.
"""
from __future__ import annotations

import torch

from . import _ext, fold
from .dispatch import Backend, recompute_for, register_backend
from .params import BlockParams

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_OPS = ('moments', 'mlp_forward', 'mlp_forward_save_u', 'mlp_backward', 'input_grad')


def _availability() -> str | None:
    if _ext.LOAD_ERROR is not None:
        return _ext.LOAD_ERROR
    missing = [op for op in _OPS if not _ext.has_kernel(op, 'CPU')]
    if missing:
        return f"the extension has no CPU kernels for {missing} in this build"
    if not torch.backends.mkl.is_available():
        return "torch was built without MKL, whose GEMMs the cpu kernels call"
    return None


def _supports(block, x: torch.Tensor) -> str | None:
    if x.device.type != 'cpu':
        return f"the cpu backend runs CPU tensors only (input is on {x.device})"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"the cpu kernels support float32, bfloat16 and float64, not {x.dtype}"
    if torch.is_autocast_enabled('cpu'):
        return "autocast is enabled; the fused backends take explicit dtypes (reference runs it)"
    if block.training and block.mlp.drop.p > 0:
        return (f"dropout p={block.mlp.drop.p} inside the MLP is not fused into the cpu kernels "
                f"(the torch backend applies it)")
    return None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    # NCHW wins where both hold (C == 1 or H*W == 1): the kernels make the same choice.
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def block_statistics(x: torch.Tensor):
    """Per-(n,c) mean and population variance of x (fp32; fp64 for fp64 input)."""
    return torch.ops.riformer.moments(x)


class CpuBlockFunction(torch.autograd.Function):
    """out = block(x) from the folded inputs. Differentiable inputs: x, s, t, l1 (N,C),
    l2 (N,C), g2, beta2, w1, b1, w2, b2; then eps1, eps2 and save_u (bool)."""

    @staticmethod
    def forward(ctx, x, s, t, l1, l2, g2, beta2, w1, b1, w2, b2, eps1, eps2, save_u):
        mean, var = block_statistics(x)
        cf = fold.fold_coefficients(mean, var, s, t, l1, g2, beta2, eps1, eps2)
        if save_u:
            out, _, _, u = torch.ops.riformer.mlp_forward_save_u(
                x, cf.A, cf.B, cf.a, cf.b, w1, b1, w2, b2, l2, False)
        else:
            out, _, _ = torch.ops.riformer.mlp_forward(
                x, cf.A, cf.B, cf.a, cf.b, w1, b1, w2, b2, l2, False)
            u = None
        # x, O(N*C) statistics and the parameters; u only when asked to (recompute=False).
        ctx.save_for_backward(x, mean, var, *cf, s, t, l1, l2, g2, w1, b1, w2, b2, u)
        ctx.hw = x.shape[2] * x.shape[3]
        return out

    @staticmethod
    def backward(ctx, g):
        (x, mean, var, a, b, A, B, mu1, r1, ybar, mu2, r2,
         s, t, l1, l2, g2, w1, b1, w2, b2, u) = ctx.saved_tensors
        cf = fold.FoldCoefficients(a, b, A, B, mu1, r1, ybar, mu2, r2)
        g = g.contiguous(memory_format=_memory_format(x))
        dz, dw1, db1, dw2, db2, sums = torch.ops.riformer.mlp_backward(
            g, x, mean, A, B, w1, b1, w2, b2, l2, u)
        bc = fold.backward_coefficients(sums, mean, var, cf, s, t, l1, g2, ctx.hw)
        dx = torch.ops.riformer.input_grad(g, dz, x, mean, bc.P, bc.Q, bc.R, bc.S)
        return (dx, bc.d_s.to(s.dtype), bc.d_t.to(t.dtype), bc.d_l1.to(l1.dtype),
                bc.d_l2.to(l2.dtype), bc.d_g2.to(g2.dtype), bc.d_beta2.to(g2.dtype),
                dw1.reshape(w1.shape).to(w1.dtype), db1.to(b1.dtype),
                dw2.reshape(w2.shape).to(w2.dtype), db2.to(b2.dtype), None, None, None)


def block_forward(x: torch.Tensor, p: BlockParams, dp1: torch.Tensor | None,
                  dp2: torch.Tensor | None, recompute: bool = True) -> torch.Tensor:
    """The fused block on CPU tensors. dp1/dp2: per-sample drop-path factors (N,) or None."""
    if _memory_format(x) == torch.contiguous_format and not x.is_contiguous():
        x = x.contiguous()          # a strided view: the kernels read NCHW or channels_last
    n = x.shape[0]
    sd = fold.stats_dtype(x.dtype)
    s, t = p.scale_shift()
    l1 = fold.per_sample_scale(p.ls1, dp1, n, sd)
    l2 = fold.per_sample_scale(p.ls2, dp2, n, sd)
    args = (x, s, t, l1, l2, p.g2, p.beta2, p.w1, p.b1, p.w2, p.b2, p.eps1, p.eps2)
    if torch.is_grad_enabled() and any(v.requires_grad for v in args[:11]):
        return CpuBlockFunction.apply(*args, not recompute)
    # Inference: the same kernels without the autograd bookkeeping.
    mean, var = block_statistics(x)
    cf = fold.fold_coefficients(mean, var, s, t, l1, p.g2, p.beta2, p.eps1, p.eps2)
    out, _, _ = torch.ops.riformer.mlp_forward(x, cf.A, cf.B, cf.a, cf.b, p.w1, p.b1, p.w2, p.b2,
                                               l2, False)
    return out


def _forward(block, x, dp1, dp2):
    return block_forward(x, BlockParams.of(block), dp1, dp2, recompute_for(block))


register_backend(Backend('cpu', availability=_availability, supports=_supports,
                         forward=_forward))

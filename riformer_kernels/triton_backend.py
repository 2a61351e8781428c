"""The `triton` backend: registration, the autograd Function and chained statistics.

Forward per block: channel moments (the `moments_partials` kernel, or the partial moments the
previous block's MLP kernel left on its output: *chaining*) -> `fold.merge_moments` ->
`fold.fold_coefficients` (O(N*C), the one copy of the algebra) -> `fused_mlp_forward`.

Chained statistics: the output of a triton block carries a `ChainedMoments` record (an attribute
of the output tensor, so it lives and dies with it) holding the partial moments of exactly the
values written, plus the tensor's `_version`, data_ptr, shape, stride and dtype at that moment.
A block whose input carries a record that still matches all five uses it and skips its
statistics pass; any in-place change (which bumps `_version`), a view, a copy or a different
tensor (for example the stage's downsampling conv output) does not match, so the block computes
its own moments. Stale statistics are therefore never used. Chaining is off under torch.compile
(tensor attributes are not traced); the op-level path is the same otherwise.

Training: the autograd Function saves x and O(N*C) statistics only (mean, var, the fold
coefficients, l1, l2) plus the parameters; with recompute=False (per block, per model or
`rk.set_recompute`) also the hidden pre-activation u. Its backward is the fused one of
DESIGN.md section 3: `triton_backward.fused_backward` (phase 1, `fold.backward_coefficients`
-- the shared algebra --, phase 2).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import fold
from .dispatch import Backend, recompute_for, register_backend
from .params import BlockParams

try:
    from . import triton_backward as tbw
    from . import triton_forward as tfw
    IMPORT_ERROR: str | None = None
except ImportError as err:  # triton missing or broken
    tfw = tbw = None
    IMPORT_ERROR = f"triton could not be imported ({err})"

_CHAIN_ATTR = '_riformer_chained_moments'


class ChainedMoments(NamedTuple):
    pmean: torch.Tensor   # (N, P, C) fp32 partial means of the tensor's values
    pm2: torch.Tensor     # (N, P, C) fp32 partial M2s
    span: int             # tokens per partial (the last one may have fewer)
    version: int
    data_ptr: int
    shape: tuple
    stride: tuple
    dtype: torch.dtype


def _chaining_enabled() -> bool:
    return not torch.compiler.is_compiling()


def attach_chained_moments(out: torch.Tensor, pmean, pm2, span: int) -> None:
    if not _chaining_enabled():
        return
    setattr(out, _CHAIN_ATTR, ChainedMoments(pmean, pm2, span, out._version, out.data_ptr(),
                                             tuple(out.shape), out.stride(), out.dtype))


def chained_moments(x: torch.Tensor) -> ChainedMoments | None:
    """The partial moments recorded on x if they still describe x's current values, else None."""
    if not _chaining_enabled():
        return None
    rec = getattr(x, _CHAIN_ATTR, None)
    if rec is None:
        return None
    if (rec.version != x._version or rec.data_ptr != x.data_ptr() or rec.shape != tuple(x.shape)
            or rec.stride != x.stride() or rec.dtype != x.dtype):
        return None
    return rec


def block_statistics(x: torch.Tensor, chain: ChainedMoments | None):
    """Per-(n,c) mean and variance of x in fp32: from the chain when given, else a moments pass."""
    t = x.shape[2] * x.shape[3]
    if chain is not None:
        return tfw.merge_partials(chain.pmean, chain.pm2, t, chain.span)
    pmean, pm2 = tfw.moments_partials(x)
    span = tfw.moments_config(x.shape[0], x.shape[1], t)['span']
    return tfw.merge_partials(pmean, pm2, t, span)


class SavedForBackward(NamedTuple):
    """What the training forward keeps: x, O(N*C) statistics, the block's inputs."""
    x: torch.Tensor
    mean: torch.Tensor   # (N, C) fp32 channel moments of x
    var: torch.Tensor
    A: torch.Tensor      # (N, C) fold coefficients (fold.FoldCoefficients fields)
    B: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    mu1: torch.Tensor    # (N, 1)
    r1: torch.Tensor
    ybar: torch.Tensor   # (N, C)
    mu2: torch.Tensor    # (N, 1)
    r2: torch.Tensor
    l1f: torch.Tensor    # (N, C) fp32 layer scales x drop-path factors
    l2f: torch.Tensor
    # the Function's differentiable inputs after x, in order
    s: torch.Tensor
    t: torch.Tensor
    l1: torch.Tensor
    l2: torch.Tensor
    g2: torch.Tensor
    beta2: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    u: torch.Tensor | None = None   # (N, 4C, H, W) pre-GELU hidden, only when recompute=False

    def coefficients(self) -> fold.FoldCoefficients:
        return fold.FoldCoefficients(self.a, self.b, self.A, self.B, self.mu1, self.r1,
                                     self.ybar, self.mu2, self.r2)


class TritonBlockFunction(torch.autograd.Function):
    """out, partial moments of out = block(x). Inputs after x are differentiable except the
    chained partials, the eps/span scalars and `save_u` (recompute=False: keep u for backward)."""

    @staticmethod
    def forward(ctx, x, s, t, l1, l2, g2, beta2, w1, b1, w2, b2, eps1, eps2,
                chain_pmean, chain_pm2, chain_span, save_u):
        tt = x.shape[2] * x.shape[3]
        if chain_pmean is not None:
            mean, var = tfw.merge_partials(chain_pmean, chain_pm2, tt, chain_span)
        else:
            mean, var = block_statistics(x, None)
        l1f, l2f = l1.float(), l2.float()
        cf = fold.fold_coefficients(mean, var, s, t, l1f, g2, beta2, eps1, eps2)
        out, pmean, pm2, u = tfw.mlp_forward(
            x, cf.A.contiguous(), cf.B.contiguous(), cf.a.contiguous(), cf.b.contiguous(),
            l2f, w1, b1, w2, b2, save_u=save_u)
        ctx.mark_non_differentiable(pmean, pm2)
        # x and O(N*C) statistics (and u when asked): what the fused backward needs
        # (DESIGN.md section 3). The parameters are saved too; they are alive anyway.
        ctx.save_for_backward(x, mean, var, cf.A, cf.B, cf.a, cf.b, cf.mu1, cf.r1, cf.ybar,
                              cf.mu2, cf.r2, l1f, l2f, s, t, l1, l2, g2, beta2, w1, b1, w2, b2,
                              *((u,) if save_u else ()))
        ctx.hw = tt
        return out, pmean, pm2

    @staticmethod
    def backward(ctx, g, _g_pmean, _g_pm2):
        saved = SavedForBackward(*ctx.saved_tensors)
        grads = _backward_fused(ctx, g, saved)
        grads = tuple(gr if need else None for gr, need in zip(grads, ctx.needs_input_grad[:11]))
        return (*grads, None, None, None, None, None, None)


def _backward_fused(ctx, g, sv: SavedForBackward):
    """The fused backward from the saved statistics (DESIGN.md section 3): phase 1 (weight
    gradients and the per-(n,c) sums), the shared coefficient algebra, phase 2 (dx); see
    `triton_backward.fused_backward`. Returns the gradients of the Function's 11 differentiable
    inputs."""
    def coefficients(sums):
        return fold.backward_coefficients(sums, sv.mean, sv.var, sv.coefficients(), sv.s, sv.t,
                                          sv.l1f, sv.g2, ctx.hw)

    dx, dw1, db1, dw2, db2, bc = tbw.fused_backward(g, sv.x, sv.mean, sv.A, sv.B, sv.w1, sv.b1,
                                                    sv.w2, sv.b2, sv.l2f, sv.u, coefficients)
    return (dx, bc.d_s.to(sv.s.dtype), bc.d_t.to(sv.t.dtype), bc.d_l1.to(sv.l1.dtype),
            bc.d_l2.to(sv.l2.dtype), bc.d_g2.to(sv.g2.dtype), bc.d_beta2.to(sv.beta2.dtype),
            dw1.reshape(sv.w1.shape).to(sv.w1.dtype), db1.to(sv.b1.dtype),
            dw2.reshape(sv.w2.shape).to(sv.w2.dtype), db2.to(sv.b2.dtype))


def _availability() -> str | None:
    if tfw is None:
        return IMPORT_ERROR
    if not torch.cuda.is_available() and not tfw.INTERPRET:
        return ("no CUDA device is visible to torch and TRITON_INTERPRET=1 was not set before "
                "riformer_kernels was imported")
    return None


def _supports(block, x: torch.Tensor) -> str | None:
    if torch.is_autocast_enabled(x.device.type):
        return "autocast is enabled; the fused backends take explicit dtypes (reference runs it)"
    if x.dtype not in tfw.SUPPORTED_DTYPES:
        return f"the triton kernels take float32/float16/bfloat16, not {x.dtype}"
    if x.device.type == 'cpu':
        if not tfw.INTERPRET:
            return "CPU tensors run the triton kernels only under TRITON_INTERPRET=1"
    elif x.device.type != 'cuda':
        return f"the triton kernels run on CUDA tensors, not {x.device.type}"
    if block.training and block.mlp.drop.p > 0:
        return "MLP dropout is active in training; the fused kernels do not draw dropout masks"
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
                    f"(see triton_forward.mlp_path)")
    return None


def block_forward(x: torch.Tensor, p: BlockParams, dp1=None, dp2=None,
                  recompute: bool = True) -> torch.Tensor:
    """One block through the Triton kernels; chains statistics when x carries valid ones.
    recompute=False saves the hidden pre-activation u for the backward (when one will run)."""
    if tfw.token_strides(x) is None:
        # H and W do not collapse into one token stride: the only layout this copies.
        x = x.contiguous()
    n = x.shape[0]
    s, t = p.scale_shift()
    l1 = fold.per_sample_scale(p.ls1, dp1, n, torch.float32)
    l2 = fold.per_sample_scale(p.ls2, dp2, n, torch.float32)
    chain = chained_moments(x)
    cargs = (chain.pmean, chain.pm2, chain.span) if chain is not None else (None, None, 0)
    save_u = not recompute and torch.is_grad_enabled() and any(
        v.requires_grad for v in [x] + p.tensors())
    out, pmean, pm2 = TritonBlockFunction.apply(x, s, t, l1, l2, p.g2, p.beta2, p.w1, p.b1,
                                                p.w2, p.b2, p.eps1, p.eps2, *cargs, save_u)
    span = tfw.mlp_config(n, x.shape[1], x.shape[2] * x.shape[3], x.dtype)['span']
    attach_chained_moments(out, pmean, pm2, span)
    return out


def _forward(block, x, dp1, dp2):
    return block_forward(x, BlockParams.of(block), dp1, dp2, recompute_for(block))


register_backend(Backend('triton', availability=_availability, supports=_supports,
                         forward=_forward))

"""The fused block pipeline, once, for every kernel backend (cpu, triton, later cuda).

A kernel backend is a `KernelSet`: a few kernels behind a small typed interface. Everything
around them lives here and nowhere else:

    forward   x -> (layout the kernels read) -> per-(n,c) statistics, from the chained partial
              moments x carries or a moments pass -> fold.fold_coefficients (the one copy of the
              algebra, docs/design.md section 2) -> the MLP kernel, which also returns the
              partial moments of its output (chained into the next block, section 4)
    training  one autograd Function (`FusedBlockFunction`): saves x and O(N*C) statistics, plus
              the hidden pre-activation u when recompute=False; backward = phase 1 (weight
              gradients and the five per-(n,c) sums) -> fold.backward_coefficients -> phase 2
              (dx) (section 3). The O(C) gradients reach the training-form parameters (norm1,
              the affine mixer, layer scales, drop-path factors) through autograd of
              `BlockParams.scale_shift` and `fold.per_sample_scale`, outside the Function.

The `torch` backend is deliberately not a kernel set: it is the fold in plain PyTorch ops,
differentiated by autograd, and so an independent check of this pipeline.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from . import fold
from .dispatch import Backend, recompute_for, register_backend
from .params import BlockParams


class Partials(NamedTuple):
    """Statistics of a tensor in a kernel set's own form; `KernelSet.merge` turns them into
    per-(n,c) mean and variance. (cpu: the mean and variance themselves; triton: per-span
    partial means and M2s, `span` tokens each.)"""
    m1: torch.Tensor
    m2: torch.Tensor
    span: int


class Saved(NamedTuple):
    """What the training forward keeps for the backward: x, O(N*C) statistics and the block's
    inputs (the parameters are alive anyway); u only with recompute=False."""
    x: torch.Tensor
    mean: torch.Tensor    # (N, C) channel moments of x, statistics dtype
    var: torch.Tensor
    A: torch.Tensor       # (N, C) fold coefficients (fold.FoldCoefficients fields)
    B: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    mu1: torch.Tensor     # (N, 1)
    r1: torch.Tensor
    ybar: torch.Tensor    # (N, C)
    mu2: torch.Tensor     # (N, 1)
    r2: torch.Tensor
    # the Function's differentiable inputs after x, in order
    s: torch.Tensor
    t: torch.Tensor
    l1: torch.Tensor      # (N, C) layer scale 1 x drop-path factor, statistics dtype
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


class Phase1(NamedTuple):
    """Result of a kernel set's phase 1: the (5, N, C) sums fold.backward_coefficients takes,
    db2, the MLP weight gradients when phase 1 produced them (else None: phase 2 does), and
    whatever the kernel set hands from phase 1 to phase 2 (`carry`, opaque here)."""
    sums: torch.Tensor
    db2: torch.Tensor
    weights: tuple | None      # (dw1, db1, dw2)
    carry: tuple


@dataclass(frozen=True)
class KernelSet:
    """The kernels of one backend, called by the pipeline only.

    availability() -> None when usable in this process, else why not.
    supports(block, x) -> None when the kernels can run this call, else why not (the checks
        every kernel set shares -- MLP dropout, autocast's mixed precision -- are the
        pipeline's). Under autocast x is a stand-in in the dtype the kernels will see: fp32 in
        the mixed-precision mode (`mixed_precision` below), else the autocast dtype.
    prepare_input(x) -> x in a layout the kernels read (a copy only where they cannot).
    moments(x) -> Partials of x.
    merge(m1, m2, tokens, span) -> (mean, var), each (N, C) in the statistics dtype.
    mlp_forward(x, coeffs, l2, w1, b1, w2, b2, save_u, emit_moments) -> (out, m1, m2, u or
        None): out = a x + b + l2 (W2 GELU(W1 (A x + B) + b1) + b2) and the Partials fields of
        out; empty m1/m2 when the kernel set skips them for emit_moments=False (a kernel set
        whose moments come free may return them anyway).
    output_span(out) -> the `span` of the partials mlp_forward returned for out.
    backward_weights_and_sums(g, saved) -> Phase1.
    backward_dx(g, saved, phase1, coeffs: fold.BackwardCoefficients) -> (dx, (dw1, db1, dw2)).
    auto_declines(block, x) -> None, or why `auto` should run the next backend instead although
        these kernels can run the call (they were measured slower than it for this call's class);
        a backend asked for by name runs regardless. Under autocast x is the stand-in `supports`
        gets (`autocast_plan` tells the mixed mode apart).
    mixed_precision: the GEMM-operand dtypes the kernels take with fp32 activations: x, out,
        grad_out, dz and dx in fp32, the MLP weights (and so the dot operands z, h, dO, du) in
        that dtype, fp32 accumulation. Autocast over an fp32 block needs it (the reference
        under autocast keeps its residual stream in fp32: fp32 layer scales promote it); a
        kernel set without it declines those calls, so `auto` runs the next backend.
    """
    name: str
    availability: Callable[[], str | None]
    supports: Callable[[object, torch.Tensor], str | None]
    prepare_input: Callable
    moments: Callable
    merge: Callable
    mlp_forward: Callable
    output_span: Callable
    backward_weights_and_sums: Callable
    backward_dx: Callable
    auto_declines: Callable[[object, torch.Tensor], str | None] = lambda block, x: None
    mixed_precision: tuple = ()


_KERNEL_SETS: dict[str, KernelSet] = {}


def register_kernel_set(kernels: KernelSet) -> None:
    """Make `kernels` a backend of `riformer_kernels.dispatch` that runs through this pipeline."""
    _KERNEL_SETS[kernels.name] = kernels
    register_backend(Backend(
        kernels.name, availability=kernels.availability,
        # The kernel set judges the call in the dtype its kernels will see (under autocast: the
        # mixed mode's fp32, or the autocast dtype itself for a block in that dtype).
        supports=lambda block, x: (_shared_supports(block, x) or _autocast_supports(kernels,
                                                                                    block, x)
                                   or kernels.supports(block, _kernel_input_proxy(block, x))),
        auto_declines=lambda block, x: kernels.auto_declines(block,
                                                             _kernel_input_proxy(block, x)),
        note=_autocast_note,
        forward=lambda block, x, dp1, dp2: _block_call(kernels, block, x, dp1, dp2)))


def kernel_set(name: str) -> KernelSet:
    return _KERNEL_SETS[name]


# ---------------------------------------------------------------------------------------------
# autocast

def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run a conv on x in, or None when autocast is off for x's device
    or leaves x alone (autocast never casts float64 operands)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device) or x.dtype == torch.float64:
        return None
    return torch.get_autocast_dtype(device)


class AutocastPlan(NamedTuple):
    """How a fused block runs a call under autocast. io: the dtype of x, the output and every
    activation-sized tensor of the residual stream (grad_out, dz, dx) -- the reference's output
    dtype under autocast, x's dtype promoted with the layer scales' (fp32 for an fp32 block,
    whatever x is); gemm: the MLP weights' and so the dot operands' dtype, autocast's. mixed:
    they differ (the kernel set's mixed-precision mode)."""
    io: torch.dtype
    gemm: torch.dtype

    @property
    def mixed(self) -> bool:
        return self.io != self.gemm


def autocast_plan(block, x: torch.Tensor) -> AutocastPlan | None:
    """The plan of a call under autocast, or None when autocast leaves it alone."""
    gemm = autocast_dtype(x)
    if gemm is None:
        return None
    io = torch.promote_types(torch.promote_types(x.dtype, block.layer_scale_1.dtype),
                             block.layer_scale_2.dtype)
    return AutocastPlan(io, gemm)


def _autocast_supports(ks: KernelSet, block, x: torch.Tensor) -> str | None:
    plan = autocast_plan(block, x)
    if plan is None or not plan.mixed:
        return None
    gemm = str(plan.gemm).replace('torch.', '')
    if plan.io != torch.float32:
        return (f"autocast {gemm} with {plan.io} activations: the fused kernels' mixed mode "
                f"keeps the residual stream in float32 only")
    if plan.gemm not in ks.mixed_precision:
        return (f"autocast {gemm}: the {ks.name} kernels have no mixed-precision mode with "
                f"{gemm} GEMM operands, which autocast needs (the reference under autocast keeps "
                f"its residual stream in float32: its fp32 layer scales promote it)")
    return None


def _kernel_input_proxy(block, x: torch.Tensor) -> torch.Tensor:
    """x itself, or under autocast a stand-in with x's shape and device in the dtype the
    kernels will read (the plan's io dtype; an expanded one-element tensor: nothing of x's size
    is allocated just to ask)."""
    plan = autocast_plan(block, x)
    if plan is None or plan.io == x.dtype:
        return x
    proxy = x.new_empty((1, 1, 1, 1), dtype=plan.io).expand(x.shape)
    return proxy.requires_grad_(x.requires_grad) if x.requires_grad else proxy


def _autocast_note(block, x: torch.Tensor) -> str | None:
    plan = autocast_plan(block, x)
    if plan is None:
        return None
    name, io = (str(d).replace('torch.', '') for d in (plan.gemm, plan.io))
    if not plan.mixed:
        return (f"autocast {name}: the block and x are {name}: the kernels run in {name}; the "
                f"statistics and the fold stay fp32; they run with autocast disabled")
    cast_in = (f" (the {str(x.dtype).replace('torch.', '')} input is cast to {io} "
               f"first)") if x.dtype != plan.io else ""
    return (f"autocast {name}: the MLP weights (fc1, fc2) are cast to {name} as autocast casts "
            f"a conv's, and the MLP's GEMMs run on {name} operands with fp32 accumulation; x, "
            f"the output, the residual stream and its gradients stay {io}{cast_in}, as in the "
            f"reference under autocast; the statistics, the fold and the O(C) parameters stay "
            f"fp32; the kernels run with autocast disabled and return {io}")


def _block_call(ks: KernelSet, block, x: torch.Tensor, dp1, dp2) -> torch.Tensor:
    p = BlockParams.of(block)
    plan = autocast_plan(block, x)
    if plan is None:
        return block_forward(ks, x, p, dp1, dp2, recompute_for(block),
                             getattr(block, 'chain_statistics', False))
    # Under autocast: what autocast does to the block's two convs (fc1, fc2), done once for the
    # fused MLP: their weights in the autocast dtype, so every GEMM operand is (z, h and the
    # backward's dO and du are rounded to the weights' dtype inside the kernels, as autocast
    # rounds the convs' inputs). The residual stream stays in the plan's io dtype: the
    # reference under autocast returns fp32 for an fp32 block (x + l1 * mixer is promoted by
    # the fp32 layer scales), so x is read, and out, dz and dx written, in fp32. The biases
    # stay fp32 (the kernels add them to fp32 accumulators; autocast would round them to the
    # autocast dtype: this is at least as accurate). The casts are inside autograd, so the
    # gradients reach the fp32 parameters (and x) in their own dtype. The statistics run in
    # fp32 (fold.stats_dtype) and the norm/mixer/layer-scale parameters enter the fold in fp32.
    # A half input (a stage's first block after a conv under autocast) is cast to fp32 here:
    # one extra pass over x there only, since every fused block returns fp32 -- its successor's
    # cast is a no-op and the chained statistics it attached still match.
    p = dataclasses.replace(p, w1=p.w1.to(plan.gemm), w2=p.w2.to(plan.gemm))
    if not plan.mixed:
        p = dataclasses.replace(p, b1=p.b1.to(plan.gemm), b2=p.b2.to(plan.gemm))
    with torch.autocast(x.device.type, enabled=False):
        return block_forward(ks, x.to(plan.io), p, dp1, dp2, recompute_for(block),
                             getattr(block, 'chain_statistics', False))


def _shared_supports(block, x: torch.Tensor) -> str | None:
    if block.training and block.mlp.drop.p > 0:
        return (f"dropout p={block.mlp.drop.p} inside the MLP is active in training; the fused "
                f"kernels do not draw dropout masks (the torch backend applies it)")
    return None


# ---------------------------------------------------------------------------------------------
# chained statistics (docs/design.md section 4)

_CHAIN_ATTR = '_riformer_chained_moments'


class ChainedMoments(NamedTuple):
    """The partial moments of exactly the values a fused block wrote into its output, with the
    identity of that tensor at the time: a block whose input still matches uses them and skips
    its statistics pass. Any in-place change (bumps `_version`), a view, a copy or another
    tensor does not match, so stale statistics are never used."""
    kernels: str
    partials: Partials
    version: int
    data_ptr: int
    shape: tuple
    stride: tuple
    dtype: torch.dtype


def _chaining_enabled() -> bool:
    # Tensor attributes are not traced by torch.compile: there every block computes its moments.
    return not torch.compiler.is_compiling()


def attach_chained_moments(out: torch.Tensor, kernels: str, partials: Partials) -> None:
    if _chaining_enabled():
        setattr(out, _CHAIN_ATTR, ChainedMoments(kernels, partials, out._version, out.data_ptr(),
                                                 tuple(out.shape), out.stride(), out.dtype))


def chained_moments(x: torch.Tensor, kernels: str) -> Partials | None:
    """The partials recorded on x by kernel set `kernels` if they still describe x, else None."""
    if not _chaining_enabled():
        return None
    rec = getattr(x, _CHAIN_ATTR, None)
    if rec is None or rec.kernels != kernels:
        return None
    if (rec.version != x._version or rec.data_ptr != x.data_ptr() or rec.shape != tuple(x.shape)
            or rec.stride != x.stride() or rec.dtype != x.dtype):
        return None
    return rec.partials


# ---------------------------------------------------------------------------------------------
# forward and the autograd Function

def _statistics(ks: KernelSet, x: torch.Tensor, chain: Partials | None):
    m1, m2, span = chain if chain is not None else ks.moments(x)
    return ks.merge(m1, m2, x.shape[2] * x.shape[3], span)


def _fused_forward(ks: KernelSet, x, s, t, l1, l2, g2, beta2, w1, b1, w2, b2, eps1, eps2,
                   chain: Partials | None, save_u: bool, emit_moments: bool):
    """(out, out m1, out m2, u, mean, var, fold coefficients) of one block."""
    mean, var = _statistics(ks, x, chain)
    cf = fold.fold_coefficients(mean, var, s, t, l1, g2, beta2, eps1, eps2)
    out, m1, m2, u = ks.mlp_forward(x, cf, l2, w1, b1, w2, b2, save_u, emit_moments)
    return out, m1, m2, u, mean, var, cf


class FusedBlockFunction(torch.autograd.Function):
    """out, out's partial moments = block(x) through kernel set `kernels` (a registered name).

    Differentiable inputs: x, s, t, l1 (N,C), l2 (N,C), g2, beta2, w1, b1, w2, b2. Then eps1,
    eps2, the chained partials of x (m1, m2, span; None, None, 0 without), the kernel set's
    name, save_u (recompute=False: keep u for the backward) and emit_moments (the output feeds
    another fused block)."""

    @staticmethod
    def forward(ctx, x, s, t, l1, l2, g2, beta2, w1, b1, w2, b2, eps1, eps2,
                chain_m1, chain_m2, chain_span, kernels, save_u, emit_moments):
        ks = kernel_set(kernels)
        chain = Partials(chain_m1, chain_m2, chain_span) if chain_m1 is not None else None
        out, m1, m2, u, mean, var, cf = _fused_forward(ks, x, s, t, l1, l2, g2, beta2, w1, b1,
                                                       w2, b2, eps1, eps2, chain, save_u,
                                                       emit_moments)
        ctx.mark_non_differentiable(m1, m2)
        ctx.save_for_backward(x, mean, var, cf.A, cf.B, cf.a, cf.b, cf.mu1, cf.r1, cf.ybar,
                              cf.mu2, cf.r2, s, t, l1, l2, g2, beta2, w1, b1, w2, b2,
                              *((u,) if save_u else ()))
        ctx.kernels = kernels
        return out, m1, m2

    @staticmethod
    def backward(ctx, g, _g_m1, _g_m2):
        ks = kernel_set(ctx.kernels)
        sv = Saved(*ctx.saved_tensors)
        hw = sv.x.shape[2] * sv.x.shape[3]
        p1 = ks.backward_weights_and_sums(g, sv)
        bc = fold.backward_coefficients(p1.sums, sv.mean, sv.var, sv.coefficients(), sv.s, sv.t,
                                        sv.l1, sv.g2, hw)
        dx, (dw1, db1, dw2) = ks.backward_dx(g, sv, p1, bc)
        grads = (dx, bc.d_s.to(sv.s.dtype), bc.d_t.to(sv.t.dtype), bc.d_l1.to(sv.l1.dtype),
                 bc.d_l2.to(sv.l2.dtype), bc.d_g2.to(sv.g2.dtype), bc.d_beta2.to(sv.beta2.dtype),
                 dw1.reshape(sv.w1.shape).to(sv.w1.dtype), db1.to(sv.b1.dtype),
                 dw2.reshape(sv.w2.shape).to(sv.w2.dtype), p1.db2.to(sv.b2.dtype))
        grads = tuple(gr if need else None for gr, need in zip(grads, ctx.needs_input_grad[:11]))
        return (*grads, None, None, None, None, None, None, None, None)


class EmptyBatchFunction(torch.autograd.Function):
    """A batch of N=0 samples: an empty output, an empty dx and zero gradients for every
    parameter (each is a sum over no samples), as the reference gives, without launching a
    kernel (launch rules divide by N; a CUDA grid of zero blocks is invalid)."""

    @staticmethod
    def forward(ctx, x, *params):
        ctx.shapes = [(v.shape, v.dtype, v.device) for v in params]
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return (torch.zeros_like(g), *(torch.zeros(shape, dtype=dtype, device=device)
                                       for shape, dtype, device in ctx.shapes))


def block_forward(ks: KernelSet, x: torch.Tensor, p: BlockParams, dp1=None, dp2=None,
                  recompute: bool = True, chain_statistics: bool = False) -> torch.Tensor:
    """One block through kernel set `ks`. dp1/dp2: per-sample drop-path factors (N,) or None.
    recompute=False saves the hidden pre-activation u for the backward (when one will run).
    chain_statistics: the output is the next fused block's input, so ask the kernels for its
    moments (docs/design.md section 4); the output carries them when the kernels produced them."""
    x = ks.prepare_input(x)
    s, t, l1, l2 = p.fold_inputs(x.shape[0], fold.stats_dtype(x.dtype), dp1, dp2)
    chain = chained_moments(x, ks.name)
    args = (x, s, t, l1, l2, p.g2, p.beta2, p.w1, p.b1, p.w2, p.b2)
    if x.shape[0] == 0:       # a shape, not a value: no sync, a static branch when compiled
        return EmptyBatchFunction.apply(*args)
    if torch.is_grad_enabled() and any(v.requires_grad for v in args):
        cargs = chain if chain is not None else (None, None, 0)
        out, m1, m2 = FusedBlockFunction.apply(*args, p.eps1, p.eps2, *cargs, ks.name,
                                               not recompute, chain_statistics)
    else:
        # Inference: the same kernels without the autograd bookkeeping.
        out, m1, m2 = _fused_forward(ks, *args, p.eps1, p.eps2, chain, False,
                                     chain_statistics)[:3]
    if m1.numel():
        attach_chained_moments(out, ks.name, Partials(m1, m2, ks.output_span(out)))
    return out

"""The `torch` backend: the folded block in PyTorch ops, differentiated by autograd.

One statistics pass (channel moments), the O(N*C) fold of `riformer_kernels.fold`, then the MLP
on z = A x + B and the epilogue out = a x + b + l2 o. It runs on any device and dtype torch
supports and is the fallback every kernel backend is compared with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import fold
from ..dispatch import Backend, register_backend
from ..params import BlockParams


def block_forward(x: torch.Tensor, p: BlockParams, dp1: torch.Tensor | None,
                  dp2: torch.Tensor | None, dropout_p: float, training: bool) -> torch.Tensor:
    """Fused-algebra forward of one block. dp1/dp2: per-sample drop-path factors (N,) or None."""
    mean, var = fold.channel_moments(x)
    sd = mean.dtype
    s, t, l1, l2 = p.fold_inputs(x.shape[0], sd, dp1, dp2)
    cf = fold.fold_coefficients(mean, var, s, t, l1, p.g2, p.beta2, p.eps1, p.eps2)

    def per_channel(v):
        return v[:, :, None, None]

    # The elementwise maps run in the statistics dtype (fp32 for half inputs) and round once.
    xs = x.to(sd)
    z = (per_channel(cf.A) * xs + per_channel(cf.B)).to(x.dtype)
    h = F.gelu(F.conv2d(z, p.w1, p.b1))
    if dropout_p > 0 and training:
        h = F.dropout(h, dropout_p, True)
    o = F.conv2d(h, p.w2, p.b2)
    if dropout_p > 0 and training:
        o = F.dropout(o, dropout_p, True)
    out = per_channel(cf.a) * xs + per_channel(cf.b) + per_channel(l2) * o.to(sd)
    return out.to(x.dtype)


def _supports(block, x: torch.Tensor) -> str | None:
    if torch.is_autocast_enabled(x.device.type):
        return "autocast is enabled; the fused backends take explicit dtypes (reference runs it)"
    return None


def _forward(block, x, dp1, dp2):
    return block_forward(x, BlockParams.of(block), dp1, dp2, block.mlp.drop.p, block.training)


register_backend(Backend('torch', availability=lambda: None, supports=_supports, forward=_forward))

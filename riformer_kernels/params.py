"""A block's parameters as the fused backends see them, in either form.

The training form carries norm1 and the affine mixer; the deploy form carries `norm_reparam`.
Both reduce to one (s, t) pair (docs/design.md section 1), computed here inside autograd so the
gradients of g1, b1, w_aff and b_aff flow through it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import fold
from .reference import fused_scale_shift


@dataclass
class BlockParams:
    w1: torch.Tensor          # (4C, C, 1, 1)
    b1: torch.Tensor          # (4C,)
    w2: torch.Tensor          # (C, 4C, 1, 1)
    b2: torch.Tensor          # (C,)
    ls1: torch.Tensor         # (C,)
    ls2: torch.Tensor         # (C,)
    g2: torch.Tensor          # norm2 weight (C,)
    beta2: torch.Tensor       # norm2 bias (C,)
    eps1: float
    eps2: float
    # training form
    g1: torch.Tensor | None = None
    beta1: torch.Tensor | None = None
    w_aff: torch.Tensor | None = None   # (C, 1, 1, 1)
    b_aff: torch.Tensor | None = None
    # deploy form
    s_reparam: torch.Tensor | None = None
    t_reparam: torch.Tensor | None = None

    @property
    def deploy(self) -> bool:
        return self.s_reparam is not None

    def scale_shift(self):
        """(s, t) of the single GroupNorm equal to norm1 then the affine mixer.

        Training form: computed in at least fp32 (the kernels take s, t in fp32 anyway). In a
        half dtype the product g1 (w - 1) and its gradients d g1 = d s (w - 1), d w = d s g1 +
        d t b1 would each be rounded to the half dtype once more than the reference's own
        GroupNorm-then-affine backward rounds them. Measured (triton backend, C=32, six draws
        per dtype, error vs fp64 over the reference's own): worst 3.28x (bf16) / 2.56x (fp16),
        on norm1.bias, with (s, t) in the half dtype; 1.00x / 1.71x with them in fp32.
        (Converting a model to the deploy form still uses reference.fused_scale_shift in the
        parameters' dtype, as upstream does.)"""
        if self.deploy:
            return self.s_reparam, self.t_reparam
        dt = torch.promote_types(self.g1.dtype, torch.float32)
        return fused_scale_shift(*(v.to(dt) for v in (self.g1, self.beta1, self.w_aff,
                                                        self.b_aff)))

    def fold_inputs(self, n: int, dtype: torch.dtype, dp1=None, dp2=None):
        """(s, t, l1, l2): `scale_shift` and the per-sample layer scales (N, C) in `dtype` (the
        statistics dtype), with the drop-path factors dp1/dp2 (N,) folded in when given."""
        s, t = self.scale_shift()
        return (s, t, fold.per_sample_scale(self.ls1, dp1, n, dtype),
                fold.per_sample_scale(self.ls2, dp2, n, dtype))

    def tensors(self):
        return [v for v in vars(self).values() if isinstance(v, torch.Tensor)]

    @classmethod
    def of(cls, block) -> "BlockParams":
        common = dict(
            w1=block.mlp.fc1.weight, b1=block.mlp.fc1.bias,
            w2=block.mlp.fc2.weight, b2=block.mlp.fc2.bias,
            ls1=block.layer_scale_1, ls2=block.layer_scale_2,
            g2=block.norm2.weight, beta2=block.norm2.bias, eps2=block.norm2.eps)
        if hasattr(block, 'norm_reparam'):
            nr = block.norm_reparam
            return cls(eps1=nr.eps, s_reparam=nr.weight, t_reparam=nr.bias, **common)
        return cls(eps1=block.norm1.eps, g1=block.norm1.weight, beta1=block.norm1.bias,
                   w_aff=block.token_mixer.affine.weight, b_aff=block.token_mixer.affine.bias,
                   **common)

"""The upstream RIFormer block, module by module: the oracle every backend is tested against.

This mirrors OpenMMLab mmpretrain's `RIFormerBlock` (and the PoolFormer `Mlp`/`PatchEmbed` it
reuses): the same submodules, the same `state_dict` keys, the same operation order, so that an
upstream checkpoint loads as it is and produces the same numbers. Nothing here is fused; the
fused backends live in their own modules and are selected by `riformer_kernels.dispatch`.
"""
from __future__ import annotations

import torch
from torch import nn

GN_EPS = 1e-5  # nn.GroupNorm's default, which upstream's build_norm_layer('GN') keeps


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth per sample, as mmcv's `drop_path`: x / keep * floor(keep + U[0,1))."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
    return x.div(keep_prob) * random_tensor.floor()


def drop_path_factors(n: int, drop_prob: float, dtype: torch.dtype, device) -> torch.Tensor:
    """The per-sample factors `drop_path` multiplies by, drawn with the same RNG call.

    Fused backends fold these into the layer scales; drawing them exactly like `drop_path`
    (same shape, dtype and order) makes a fused block reproduce the reference's masks under the
    same seed.
    """
    keep_prob = 1.0 - drop_prob
    random_tensor = keep_prob + torch.rand((n, 1, 1, 1), dtype=dtype, device=device)
    return (random_tensor.floor() / keep_prob).reshape(n)


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.1):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class Affine(nn.Module):
    """The training-time token mixer: a depthwise 1x1 conv minus its input (key `affine`)."""

    def __init__(self, in_features: int):
        super().__init__()
        self.affine = nn.Conv2d(in_features, in_features, kernel_size=1, stride=1, padding=0,
                                groups=in_features, bias=True)

    def forward(self, x):
        return self.affine(x) - x


class Mlp(nn.Module):
    """1x1-conv MLP: fc1 -> GELU (exact erf) -> dropout -> fc2 -> dropout."""

    def __init__(self, in_features: int, hidden_features: int | None = None,
                 out_features: int | None = None, drop: float = 0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_features, out_features, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        x = self.drop(x)
        return x


class PatchEmbed(nn.Module):
    """Strided conv embedding (stem and between-stage downsampling), key `proj`."""

    def __init__(self, patch_size=16, stride=16, padding=0, in_chans=3, embed_dim=768):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride,
                              padding=padding)
        self.norm = nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x))


def group_norm_1(dim: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=1, num_channels=dim, eps=GN_EPS)


def add_channel_mlp_branch(block: nn.Module, dim: int, mlp_ratio: float, drop: float,
                           drop_path: float, layer_scale_init_value: float) -> None:
    """The parts every MetaFormer block of this package shares, with upstream's names: norm2,
    the 1x1-conv MLP, drop path and the two layer scales (RIFormer and the PoolFormer teacher
    differ only in their token mixer)."""
    block.norm2 = group_norm_1(dim)
    block.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), drop=drop)
    block.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
    block.layer_scale_1 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
    block.layer_scale_2 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
    block.dim = dim


def reference_block_forward(block, x: torch.Tensor) -> torch.Tensor:
    """Upstream `RIFormerBlock.forward`, verbatim in meaning and operation order."""
    ls1 = block.layer_scale_1.unsqueeze(-1).unsqueeze(-1)
    ls2 = block.layer_scale_2.unsqueeze(-1).unsqueeze(-1)
    if hasattr(block, 'norm_reparam'):
        x = x + block.drop_path(ls1 * block.norm_reparam(x))
    else:
        x = x + block.drop_path(ls1 * block.token_mixer(block.norm1(x)))
    x = x + block.drop_path(ls2 * block.mlp(block.norm2(x)))
    return x


def fused_scale_shift(g1, beta1, w_aff, b_aff):
    """Scale and shift of the one GroupNorm equal to `affine(norm1(x)) - norm1(x)`.

    affine(n) - n = (w - 1) * n + b_aff and n = g1 * xhat + beta1, so the pair is one GroupNorm
    with weight g1 * (w - 1) and bias beta1 * (w - 1) + b_aff. Computed in the parameters' dtype,
    in upstream's order, so a converted model matches upstream's `switch_to_deploy` bit for bit.
    """
    w_minus_1 = w_aff.reshape(-1) - 1
    return g1 * w_minus_1, beta1 * w_minus_1 + b_aff


def fuse_norm_and_affine(norm: nn.GroupNorm, token_mixer: Affine):
    return fused_scale_shift(norm.weight, norm.bias, token_mixer.affine.weight,
                             token_mixer.affine.bias)

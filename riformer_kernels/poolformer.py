"""The distillation teacher: PoolFormer, a MetaFormer whose token mixer is average pooling.

Same stage layout, widths and `state_dict` keys as RIFormer (`models.py`) apart from the mixer:
the block's token mixer is `avgpool3x3(n) - n` (stride 1, padding 1, padding not counted in the
average), which has no parameters, so a PoolFormer checkpoint has every RIFormer key except
`token_mixer.affine.*`. `student_from_teacher` builds the RIFormer of the same shape and copies
every shared weight. The teacher runs in plain PyTorch ops (no fused backend): it is trained
once and then only evaluated.
"""
from __future__ import annotations

import torch
from torch import nn

from .capture import MixerIO
from .models import RIFormer, RIFormerClassifier
from .reference import add_channel_mlp_branch, group_norm_1


class Pooling(nn.Module):
    """avgpool(x) - x over a pool_size x pool_size window, stride 1, padding excluded."""

    def __init__(self, pool_size: int = 3):
        super().__init__()
        if pool_size < 1 or pool_size % 2 == 0:
            raise ValueError(f"pool_size must be an odd positive integer, got {pool_size}")
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2,
                                 count_include_pad=False)

    def forward(self, x):
        return self.pool(x) - x


class PoolFormerBlock(nn.Module):
    """norm1 -> pooling mixer -> layer scale -> residual -> norm2 -> MLP -> layer scale ->
    residual. The constructor takes RIFormerBlock's arguments so `models.basic_blocks` builds
    either; `deploy=True` is refused (no re-parameterised form) and `recompute` is ignored
    (unfused)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop: float = 0.0,
                 drop_path: float = 0.0, layer_scale_init_value: float = 1e-5,
                 deploy: bool = False, recompute: bool = True, pool_size: int = 3):
        super().__init__()
        if deploy:
            raise ValueError("a PoolFormer block has no deploy form (its pooling mixer is not "
                             "a per-channel affine map); convert its student instead")
        self.norm1 = group_norm_1(dim)
        self.token_mixer = Pooling(pool_size)
        add_channel_mlp_branch(self, dim, mlp_ratio, drop, drop_path, layer_scale_init_value)
        self.deploy = False
        self.chain_statistics = False   # set by basic_blocks; meaningless here
        # Lists that `capture.capture_mixer_io` opened on this block: each forward appends its
        # (norm1(x), mixer output) to every one of them.
        self.mixer_sinks: list[list] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"PoolFormerBlock expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"PoolFormerBlock(dim={self.dim}) expects an (N, {self.dim}, H, W) "
                             f"input, got shape {tuple(x.shape)}")
        ls1 = self.layer_scale_1[:, None, None]
        ls2 = self.layer_scale_2[:, None, None]
        n1 = self.norm1(x)
        mix = self.token_mixer(n1)
        if self.mixer_sinks:
            for sink in self.mixer_sinks:
                sink.append(MixerIO(n1, mix))
        x = x + self.drop_path(ls1 * mix)
        return x + self.drop_path(ls2 * self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def _student_config(**kwargs) -> dict:
    """The constructor arguments a student copies: all but `init_weights` (how the teacher was
    initialised says nothing about the student, whose affine mixers keep the training init)."""
    kwargs.pop('init_weights', None)
    return kwargs


class PoolFormer(RIFormer):
    """The PoolFormer backbone: RIFormer's constructor, stages and keys with pooling blocks.
    Remembers its constructor arguments (`config`) so its student can be built alike."""
    block_type = PoolFormerBlock

    def __init__(self, arch='s12', **kwargs):
        if kwargs.get('deploy'):
            raise ValueError("PoolFormer has no deploy form")
        super().__init__(arch, **kwargs)
        self.config = _student_config(arch=arch, **kwargs)

    def switch_to_deploy(self):
        raise ValueError("PoolFormer has no deploy form (the pooling mixer is not re-"
                         "parameterisable); switch its student (student_from_teacher) instead")


class PoolFormerClassifier(RIFormerClassifier):
    """PoolFormer backbone -> global average pooling -> linear head (keys as RIFormerClassifier)."""
    backbone_type = PoolFormer

    def __init__(self, arch='s12', num_classes=1000, **backbone_kwargs):
        super().__init__(arch, num_classes=num_classes, **backbone_kwargs)
        self.config = _student_config(arch=arch, num_classes=num_classes, **backbone_kwargs)

    def switch_to_deploy(self):
        self.backbone.switch_to_deploy()


def student_from_teacher(teacher: nn.Module, copy_weights: bool = True, **overrides) -> nn.Module:
    """The RIFormer (classifier) with the teacher's architecture, every weight but the affine
    token mixers copied from `teacher` (a PoolFormer or PoolFormerClassifier). The affine mixers
    keep the student's own initialisation (upstream's training init: weight ~ N(0, 0.02), bias
    0). `overrides` replace constructor arguments (e.g. drop_path_rate); the student is built
    in training form and on the teacher's device and dtype."""
    if isinstance(teacher, PoolFormerClassifier):
        student_type = RIFormerClassifier
    elif isinstance(teacher, PoolFormer):
        student_type = RIFormer
    else:
        raise TypeError(f"student_from_teacher expects a PoolFormer or PoolFormerClassifier, "
                        f"got {type(teacher).__name__}")
    config = dict(teacher.config, **overrides)
    if config.get('deploy'):
        raise ValueError("build the student in training form; switch_to_deploy it after training")
    ref = next(teacher.parameters())
    student = student_type(**config).to(device=ref.device, dtype=ref.dtype)
    if copy_weights:
        result = student.load_state_dict(teacher.state_dict(), strict=False)
        odd = [k for k in result.missing_keys if '.token_mixer.affine.' not in k]
        if odd or result.unexpected_keys:
            raise ValueError(f"teacher and student do not share their keys: missing "
                             f"{odd}, unexpected {result.unexpected_keys}")
    return student

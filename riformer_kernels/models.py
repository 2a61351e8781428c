"""Whole models with upstream (mmpretrain) structure and keys, and checkpoint loading.

`RIFormer` is the backbone (`patch_embed.proj`, `network.{i}`, `norm{idx}`); `RIFormerClassifier`
adds global average pooling and a linear head (`backbone.*`, `head.fc.*`), like upstream's
ImageClassifier with a GlobalAveragePooling neck and a LinearClsHead.
"""
from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .block import RIFormerBlock
from .reference import PatchEmbed, fused_scale_shift, group_norm_1

ARCH_SETTINGS = {
    's12': dict(layers=[2, 2, 6, 2], embed_dims=[64, 128, 320, 512],
                mlp_ratios=[4, 4, 4, 4], layer_scale_init_value=1e-5),
    's24': dict(layers=[4, 4, 12, 4], embed_dims=[64, 128, 320, 512],
                mlp_ratios=[4, 4, 4, 4], layer_scale_init_value=1e-5),
    's36': dict(layers=[6, 6, 18, 6], embed_dims=[64, 128, 320, 512],
                mlp_ratios=[4, 4, 4, 4], layer_scale_init_value=1e-6),
    'm36': dict(layers=[6, 6, 18, 6], embed_dims=[96, 192, 384, 768],
                mlp_ratios=[4, 4, 4, 4], layer_scale_init_value=1e-6),
    'm48': dict(layers=[8, 8, 24, 8], embed_dims=[96, 192, 384, 768],
                mlp_ratios=[4, 4, 4, 4], layer_scale_init_value=1e-6),
}


def basic_blocks(dim, index, layers, mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0,
                 layer_scale_init_value=1e-5, deploy=False, recompute=True,
                 block_type=RIFormerBlock) -> nn.Sequential:
    """One stage; drop-path rates grow linearly with the block's depth in the whole network.
    `block_type`: RIFormerBlock, or the PoolFormer teacher's block (same constructor)."""
    blocks = []
    for block_idx in range(layers[index]):
        block_dpr = drop_path_rate * (block_idx + sum(layers[:index])) / (sum(layers) - 1)
        blocks.append(block_type(dim, mlp_ratio=mlp_ratio, drop=drop_rate, drop_path=block_dpr,
                                    layer_scale_init_value=layer_scale_init_value, deploy=deploy,
                                    recompute=recompute))
    # Every block but the stage's last feeds the next block: its kernels hand on the moments of
    # its output (chained statistics, docs/design.md section 4).
    for block in blocks[:-1]:
        block.chain_statistics = True
    return nn.Sequential(*blocks)


def init_weights_(module: nn.Module, std: float = 0.02) -> nn.Module:
    """Upstream's training initialisation, in place: every Conv2d/Linear weight from a normal
    of standard deviation `std` truncated to [-2, 2] (upstream's bounds are absolute values, so
    at std 0.02 they never bind), biases 0; every GroupNorm weight 1, bias 0. Layer scales keep
    their `layer_scale_init_value`."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2.0, b=2.0)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


class RIFormer(nn.Module):
    """The RIFormer backbone. Returns a tuple of normalised features at `out_indices`.

    Upstream's arguments, plus `recompute` (the fused backends' training memory mode of every
    block; see RIFormerBlock) and `init_weights` (default True: upstream's training
    initialisation, `init_weights_`; loading a checkpoint afterwards replaces it)."""
    arch_settings = ARCH_SETTINGS
    block_type = RIFormerBlock

    def __init__(self, arch='s12', in_channels=3, out_indices=-1, drop_rate=0.0,
                 drop_path_rate=0.0, frozen_stages=-1, deploy=False, recompute=True,
                 in_patch_size=7, in_stride=4, in_pad=2,
                 down_patch_size=3, down_stride=2, down_pad=1, init_weights=True):
        super().__init__()
        if isinstance(arch, str):
            if arch not in self.arch_settings:
                raise ValueError(f"unknown arch {arch!r}; choose one of "
                                 f"{sorted(self.arch_settings)} or pass a dict")
            arch = self.arch_settings[arch]
        elif isinstance(arch, Mapping):
            missing = {'layers', 'embed_dims'} - set(arch)
            if missing:
                raise ValueError(f"an arch dict needs the keys {sorted(missing)}")
        else:
            raise TypeError(f"arch must be a name or a dict, got {type(arch).__name__}")
        layers = list(arch['layers'])
        embed_dims = list(arch['embed_dims'])
        mlp_ratios = list(arch.get('mlp_ratios', [4, 4, 4, 4]))
        layer_scale_init_value = arch.get('layer_scale_init_value', 1e-5)
        self.embed_dims = embed_dims

        self.patch_embed = PatchEmbed(patch_size=in_patch_size, stride=in_stride,
                                      padding=in_pad, in_chans=in_channels,
                                      embed_dim=embed_dims[0])
        network = []
        for i in range(len(layers)):
            network.append(basic_blocks(embed_dims[i], i, layers, mlp_ratio=mlp_ratios[i],
                                        drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                                        layer_scale_init_value=layer_scale_init_value,
                                        deploy=deploy, recompute=recompute,
                                        block_type=self.block_type))
            if i >= len(layers) - 1:
                break
            if embed_dims[i] != embed_dims[i + 1]:
                network.append(PatchEmbed(patch_size=down_patch_size, stride=down_stride,
                                          padding=down_pad, in_chans=embed_dims[i],
                                          embed_dim=embed_dims[i + 1]))
        self.network = nn.ModuleList(network)

        if isinstance(out_indices, int):
            out_indices = [out_indices]
        if not isinstance(out_indices, Sequence):
            raise TypeError(f"out_indices must be an int or a sequence, got {type(out_indices)}")
        out_indices = list(out_indices)
        # Upstream counts network entries (4 stages + 3 downsamplings = 7) for negative indices.
        for i, index in enumerate(out_indices):
            if index < 0:
                out_indices[i] = 7 + index
                if out_indices[i] < 0:
                    raise ValueError(f"invalid out_indices {index}")
        self.out_indices = out_indices
        for i_layer in self.out_indices:
            self.add_module(f'norm{i_layer}', group_norm_1(embed_dims[(i_layer + 1) // 2]))
        self.frozen_stages = frozen_stages
        self._freeze_stages()
        self.deploy = deploy
        if init_weights:
            self.init_weights()

    def init_weights(self, std: float = 0.02):
        """Upstream's training initialisation (`init_weights_`), in place; returns self."""
        return init_weights_(self, std)

    def forward(self, x, normalize: bool = True):
        """The features at `out_indices`, each through its output norm `norm{idx}` (with
        `normalize=False`: without it, for a head that normalises after pooling)."""
        x = self.patch_embed(x)
        outs = []
        for idx, block in enumerate(self.network):
            x = block(x)
            if idx in self.out_indices:
                outs.append(getattr(self, f'norm{idx}')(x) if normalize else x)
        return tuple(outs)

    def _freeze_stages(self):
        # As upstream: `frozen_stages` counts entries of `network` (stages and downsamplings).
        if self.frozen_stages >= 0:
            self.patch_embed.eval()
            for param in self.patch_embed.parameters():
                param.requires_grad = False
        for i in range(0, self.frozen_stages + 1):
            module = self.network[i]
            module.eval()
            for param in module.parameters():
                param.requires_grad = False
            if i in self.out_indices:
                norm_layer = getattr(self, f'norm{i}')
                norm_layer.eval()
                for param in norm_layer.parameters():
                    param.requires_grad = False

    def train(self, mode=True):
        super().train(mode)
        self._freeze_stages()
        return self

    def switch_to_deploy(self):
        for m in self.modules():
            if isinstance(m, RIFormerBlock):
                m.switch_to_deploy()
        self.deploy = True


class LinearClsHead(nn.Module):
    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, feats):
        return self.fc(feats)


class RIFormerClassifier(nn.Module):
    """Backbone -> global average pooling of the last output -> linear head; returns logits.

    `head_norm` says where the last output norm (`backbone.norm{out_indices[-1]}`, a GroupNorm
    with one group) sits: 'before_pool' (default; mmpretrain's RIFormer and PoolFormer: the
    backbone normalises its (N, C, H, W) output, then the neck averages it) or 'after_pool'
    (timm's MetaFormer head: average first, then normalise the (N, C) vector over its channels,
    a LayerNorm, which on a 1x1 map is the same GroupNorm). The two are different functions
    (normalising does not commute with averaging over positions), so a teacher converted from
    timm (`rk.poolformer_from_timm`) uses 'after_pool'. `head_norm_eps` replaces that norm's
    eps (timm's head LayerNorm uses 1e-6, the GroupNorms 1e-5); None keeps 1e-5. Same keys in
    both modes."""

    backbone_type = RIFormer
    HEAD_NORMS = ('before_pool', 'after_pool')

    def __init__(self, arch='s12', num_classes=1000, init_weights=True,
                 head_norm='before_pool', head_norm_eps=None, **backbone_kwargs):
        super().__init__()
        if head_norm not in self.HEAD_NORMS:
            raise ValueError(f"head_norm must be one of {self.HEAD_NORMS}, got {head_norm!r}")
        self.backbone = self.backbone_type(arch, init_weights=init_weights, **backbone_kwargs)
        in_channels = self.backbone.embed_dims[-1]
        self.head = LinearClsHead(num_classes, in_channels)
        self.head_norm = head_norm
        if head_norm_eps is not None:
            self.output_norm().eps = float(head_norm_eps)
        if init_weights:
            init_weights_(self.head)

    def output_norm(self) -> nn.GroupNorm:
        """The norm of the last output the head reads (`backbone.norm{out_indices[-1]}`)."""
        return getattr(self.backbone, f'norm{self.backbone.out_indices[-1]}')

    def init_weights(self, std: float = 0.02):
        """Upstream's training initialisation of backbone and head (`init_weights_`); returns
        self."""
        return init_weights_(self, std)

    def forward(self, x):
        if self.head_norm == 'after_pool':
            feats = self.backbone(x, normalize=False)[-1]
            pooled = nn.functional.adaptive_avg_pool2d(feats, 1)
            return self.head(self.output_norm()(pooled).flatten(1))
        feats = self.backbone(x)[-1]
        pooled = nn.functional.adaptive_avg_pool2d(feats, 1).flatten(1)  # upstream's GAP neck
        return self.head(pooled)

    def switch_to_deploy(self):
        self.backbone.switch_to_deploy()


MODEL_NAMES = tuple(f'riformer_{a}' for a in ARCH_SETTINGS)


def create_model(name: str, num_classes: int | None = None, checkpoint=None,
                 deploy: bool = False, **kwargs) -> RIFormerClassifier:
    """`riformer_s12` ... `riformer_m48` as a classifier; optionally load an upstream checkpoint.

    `num_classes`: None takes the checkpoint's (its `head.fc.weight` rows), else 1000. Given
    and different from a checkpoint's head (fine-tuning: a 1000-class ImageNet checkpoint into a
    K-class model), the backbone is loaded exactly and the head keeps its fresh initialisation;
    a HeadNotLoadedWarning names the skipped keys (timm's behaviour). Every other key must
    match as in `load_checkpoint(strict=True)`.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
    state = None
    if checkpoint is not None:
        state = _read_state_dict(checkpoint, weights_only=True)
        if num_classes is None:
            head = _head_weight(state)
            num_classes = 1000 if head is None else int(head.shape[0])
    if num_classes is None:
        num_classes = 1000
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    model = RIFormerClassifier(name[len('riformer_'):], num_classes=num_classes, deploy=deploy,
                               **kwargs)
    if state is not None:
        _load_checkpoint(model, state, strict=True, weights_only=True,
                         skip_mismatched_head=True, stacklevel=3)
    return model


# ---------------------------------------------------------------------------------------------
# Checkpoints

_IGNORED_PREFIXES = ('data_preprocessor.',)
# The classifier head (upstream's LinearClsHead): the only keys a fine-tuning load may skip.
HEAD_PREFIX = 'head.'


class HeadNotLoadedWarning(UserWarning):
    """A checkpoint's classifier head did not fit the model's (another number of classes, or
    no head in the file) and was skipped; the model keeps its fresh head. `keys`: the skipped
    model keys."""

    def __init__(self, message: str, keys=()):
        super().__init__(message)
        self.keys = list(keys)


def _head_weight(state: Mapping):
    """The `head.fc.weight` of a state dict read by `_read_state_dict`, or None."""
    return state.get('head.fc.weight')


def _read_state_dict(source, weights_only: bool) -> dict:
    if isinstance(source, (str, os.PathLike)):
        try:
            source = torch.load(source, map_location='cpu', weights_only=weights_only)
        except Exception as err:  # pickle errors carry no hint about the fix
            if weights_only:
                raise ValueError(f"could not load {source!r} with weights_only=True ({err}); if "
                                 f"you trust the file, pass weights_only=False") from err
            raise
    if not isinstance(source, Mapping):
        raise TypeError(f"a checkpoint must be a mapping, got {type(source).__name__}")
    for key in ('state_dict', 'model'):
        if key in source and isinstance(source[key], Mapping):
            source = source[key]
            break
    state = {}
    for key, value in source.items():
        if key.startswith('module.'):   # saved from DistributedDataParallel
            key = key[len('module.'):]
        if not key.startswith(_IGNORED_PREFIXES):
            state[key] = value
    return state


def _match_prefixes(state: dict, model: nn.Module) -> dict:
    """Map checkpoint keys onto the model: classifier <-> backbone-only files."""
    is_classifier = isinstance(model, RIFormerClassifier)
    has_backbone_prefix = any(k.startswith('backbone.') for k in state)
    if is_classifier and not has_backbone_prefix:
        return {f'backbone.{k}': v for k, v in state.items()}
    if not is_classifier and has_backbone_prefix:
        # A backbone takes the backbone part of a classifier checkpoint; the head is not its own.
        return {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    return state


def _convert_to_deploy_form(state: dict, model: nn.Module) -> dict:
    """Fold each training-form block (norm1 + token_mixer) whose model block is deploy form."""
    expected = model.state_dict()
    state = dict(state)
    for key in list(state):
        if not key.endswith('.token_mixer.affine.weight'):
            continue
        prefix = key[:-len('token_mixer.affine.weight')]
        if prefix + 'norm_reparam.weight' not in expected:
            continue
        try:
            g1 = state.pop(prefix + 'norm1.weight')
            beta1 = state.pop(prefix + 'norm1.bias')
            w_aff = state.pop(prefix + 'token_mixer.affine.weight')
            b_aff = state.pop(prefix + 'token_mixer.affine.bias')
        except KeyError as err:
            raise ValueError(f"checkpoint block {prefix!r} has a token mixer but no "
                             f"{err.args[0]!r}; cannot convert it to the deploy form") from err
        s, t = fused_scale_shift(g1, beta1, w_aff, b_aff)
        state[prefix + 'norm_reparam.weight'] = s
        state[prefix + 'norm_reparam.bias'] = t
    return state


def load_checkpoint(model: nn.Module, path_or_state_dict, strict: bool = True,
                    weights_only: bool = True, skip_mismatched_head: bool = False) -> nn.Module:
    """Load an upstream checkpoint (file or dict) into a RIFormer / RIFormerClassifier / block.

    Accepts a `state_dict` entry or a bare dict, with or without `backbone.`/`head.` prefixes, in
    training or deploy form; a training-form checkpoint loaded into a deploy-form model is
    converted. A deploy-form checkpoint cannot fill a training-form model (norm1 and the affine
    mixer are not recoverable from their product). All missing, unexpected and mis-shaped keys
    are reported together in one error.

    `skip_mismatched_head` (fine-tuning with another number of classes; what `create_model`
    does): classifier head keys (`head.*`) that are mis-shaped or absent from the checkpoint
    are left out, the model keeps its own head, and a HeadNotLoadedWarning names them. Every
    other key is checked as without it.
    """
    return _load_checkpoint(model, path_or_state_dict, strict, weights_only,
                            skip_mismatched_head, stacklevel=3)


def _load_checkpoint(model, path_or_state_dict, strict, weights_only, skip_mismatched_head,
                     stacklevel):
    """load_checkpoint's work; `stacklevel` makes the warning point at the user's call (through
    load_checkpoint or create_model)."""
    state = _read_state_dict(path_or_state_dict, weights_only)
    state = _match_prefixes(state, model)
    state = _convert_to_deploy_form(state, model)
    expected = model.state_dict()
    skipped, skipped_keys = [], []
    if skip_mismatched_head and isinstance(model, RIFormerClassifier):
        head = [k for k in expected if k.startswith(HEAD_PREFIX)]
        # All of the head or none of it: a weight from the file beside a fresh bias is no
        # head at all.
        if any(k not in state or tuple(state[k].shape) != tuple(expected[k].shape)
               for k in head):
            skipped = [f"{k} (checkpoint {tuple(state[k].shape)}, model "
                       f"{tuple(expected[k].shape)})" if k in state else
                       f"{k} (not in the checkpoint)" for k in head]
            skipped_keys = head
            state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
            expected = {k: v for k, v in expected.items() if not k.startswith(HEAD_PREFIX)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model "
                        f"{tuple(expected[k].shape)}" for k in set(state) & set(expected)
                        if tuple(state[k].shape) != tuple(expected[k].shape))
    problems = []
    if strict and missing:
        problems.append(f"missing keys ({len(missing)}): {missing}")
    if strict and unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    if mis_shaped:
        problems.append(f"shape mismatches ({len(mis_shaped)}): {mis_shaped}")
    if problems:
        hint = ""
        if any(k.endswith(('norm1.weight', 'token_mixer.affine.weight')) for k in missing) and \
                any(k.endswith('norm_reparam.weight') for k in unexpected):
            hint = (" (the checkpoint is deploy form and the model training form: build the "
                    "model with deploy=True)")
        raise ValueError("checkpoint does not match the model" + hint + ":\n  " +
                         "\n  ".join(problems))
    if skipped:   # said only once the rest is known to load
        warnings.warn(HeadNotLoadedWarning(
            "checkpoint head does not fit the model's; kept the model's fresh head, skipped: "
            + ", ".join(skipped), skipped_keys), stacklevel=stacklevel)
    # Every key in `expected` has been checked above; only skipped head keys are not loaded.
    model.load_state_dict({k: v for k, v in state.items() if k in expected},
                          strict=strict and len(expected) == len(model.state_dict()))
    return model


_STAGE_KEY = re.compile(r'(?:backbone\.)?network\.(\d+)\.(\d+)\.norm2\.weight')


def describe_checkpoint(path_or_state_dict, weights_only: bool = True) -> dict:
    """What a RIFormer classifier or backbone checkpoint holds, from its keys and shapes alone:
    `arch` (a name of ARCH_SETTINGS when layers, widths and MLP ratios are one of them, else
    a dict for RIFormer(arch=...)), `num_classes` (None for a backbone-only file), `deploy`,
    `in_channels` and `in_patch_size` of the stem, `out_indices` (the output norms present).
    The stem's stride and padding are not in the weights: upstream's defaults are assumed.
    Raises ValueError for a file without RIFormer stages."""
    state = _read_state_dict(path_or_state_dict, weights_only)
    blocks: dict[int, set] = {}
    for key in state:
        m = _STAGE_KEY.fullmatch(key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks:
        raise ValueError("the checkpoint has no RIFormer stages (no network.{i}.{j}.norm2 "
                         "keys); is it a RIFormer checkpoint?")
    prefix = 'backbone.' if any(k.startswith('backbone.') for k in state) else ''
    stages = sorted(blocks)
    layers = [len(blocks[i]) for i in stages]
    embed_dims = [int(state[f'{prefix}network.{i}.0.norm2.weight'].numel()) for i in stages]
    mlp_ratios = [state[f'{prefix}network.{i}.0.mlp.fc1.weight'].shape[0] / d
                  for i, d in zip(stages, embed_dims)]
    arch = dict(layers=layers, embed_dims=embed_dims, mlp_ratios=mlp_ratios)
    for name, setting in ARCH_SETTINGS.items():
        if (setting['layers'], setting['embed_dims'], setting['mlp_ratios']) == (
                layers, embed_dims, mlp_ratios):
            arch = name
            break
    stem = state.get(f'{prefix}patch_embed.proj.weight')
    head = _head_weight(state)
    norms = sorted(int(m.group(1)) for k in state
                   if (m := re.fullmatch(re.escape(prefix) + r'norm(\d+)\.weight', k)))
    return dict(arch=arch, num_classes=None if head is None else int(head.shape[0]),
                deploy=any('.norm_reparam.' in k for k in state),
                in_channels=None if stem is None else int(stem.shape[1]),
                in_patch_size=None if stem is None else int(stem.shape[-1]),
                out_indices=tuple(norms) or None)

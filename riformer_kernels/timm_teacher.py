"""Loading timm's PoolFormer (v1) classifiers as distillation teachers.

timm (>= 0.9) builds `poolformer_s12` ... `poolformer_m48` from its generic MetaFormer class, with
keys of its own: `stem.conv`, `stages.{i}.downsample.conv`, `stages.{i}.blocks.{j}.*`,
`head.norm`, `head.fc`. `poolformer_from_timm` builds the `PoolFormerClassifier` of the same
widths, depths and MLP ratio and fills every tensor through an explicit key map:

    timm                                   ours (PoolFormerClassifier)
    stem.conv.{weight,bias}                backbone.patch_embed.proj.*
    stages.{i}.downsample.conv.*  (i>0)    backbone.network.{2i-1}.proj.*
    stages.{i}.blocks.{j}.norm1.*          backbone.network.{2i}.{j}.norm1.*      (norm2 alike)
    stages.{i}.blocks.{j}.mlp.fc1.*        backbone.network.{2i}.{j}.mlp.fc1.*    (fc2 alike)
    stages.{i}.blocks.{j}.layer_scale1.scale   backbone.network.{2i}.{j}.layer_scale_1 (2 alike)
    head.norm.{weight,bias}                backbone.norm6.*
    head.fc.{weight,bias}                  head.fc.*

Every key of both sides must be mapped (otherwise ValueError naming the keys left over).
The one difference in function is the head: timm averages the last feature map, then applies
its LayerNorm (eps 1e-6) to the pooled vector; mmpretrain's layout (ours by default) applies the
GroupNorm to the map, then averages. The converted teacher is therefore built with
`head_norm='after_pool', head_norm_eps=<timm's eps>` and computes what the timm model computes
(checked in fp64 by tests/test_timm_teacher.py). timm itself is not imported here.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from .poolformer import PoolFormerClassifier
from .reference import GN_EPS

_BLOCK_KEY = re.compile(r'^stages\.(\d+)\.blocks\.(\d+)\.(.+)$')
_BLOCK_PARTS = {
    'norm1.weight': 'norm1.weight', 'norm1.bias': 'norm1.bias',
    'norm2.weight': 'norm2.weight', 'norm2.bias': 'norm2.bias',
    'mlp.fc1.weight': 'mlp.fc1.weight', 'mlp.fc1.bias': 'mlp.fc1.bias',
    'mlp.fc2.weight': 'mlp.fc2.weight', 'mlp.fc2.bias': 'mlp.fc2.bias',
    'layer_scale1.scale': 'layer_scale_1', 'layer_scale2.scale': 'layer_scale_2',
}


def _refuse(why: str):
    raise ValueError(f"not a timm PoolFormer (v1) classifier that maps onto "
                     f"rk.PoolFormerClassifier: {why}")


def _check_timm_modules(model: nn.Module):
    """Structure checks a state_dict cannot show: mixers, activations, norms, head pooling."""
    stages = getattr(model, 'stages', None)
    if not isinstance(getattr(model, 'stem', None), nn.Module) or stages is None:
        _refuse(f"{type(model).__name__} has no `stem` and `stages` (a timm MetaFormer has both)")
    for i, stage in enumerate(stages):      # the mixer first: the most telling difference
        for j, blk in enumerate(stage.blocks):
            mixer = blk.token_mixer
            if type(mixer).__name__ != 'Pooling' or \
                    not isinstance(getattr(mixer, 'pool', None), nn.AvgPool2d):
                _refuse(f"stages.{i}.blocks.{j}.token_mixer is {type(mixer).__name__}, not "
                        f"pooling (convformer/caformer and other mixers have no PoolFormer form)")
    conv = model.stem.conv
    if (conv.kernel_size, conv.stride, conv.padding) != ((7, 7), (4, 4), (2, 2)):
        _refuse(f"stem conv is k{conv.kernel_size} s{conv.stride} p{conv.padding}, "
                f"not 7/4/2")
    if not isinstance(model.stem.norm, nn.Identity):
        _refuse(f"stem has a norm ({type(model.stem.norm).__name__})")
    for i, stage in enumerate(stages):
        ds = stage.downsample
        if i > 0:
            if isinstance(ds, nn.Identity):
                _refuse(f"stage {i} has no downsampling")
            if not isinstance(ds.norm, nn.Identity):
                _refuse(f"stage {i} downsampling has a norm ({type(ds.norm).__name__})")
            c = ds.conv
            if (c.kernel_size, c.stride, c.padding) != ((3, 3), (2, 2), (1, 1)):
                _refuse(f"stage {i} downsampling conv is k{c.kernel_size} s{c.stride} "
                        f"p{c.padding}, not 3/2/1")
        for j, blk in enumerate(stage.blocks):
            where = f"stages.{i}.blocks.{j}"
            mixer = blk.token_mixer
            pool = mixer.pool
            if (pool.kernel_size, pool.stride, pool.padding, pool.count_include_pad) not in (
                    (3, 1, 1, False), ((3, 3), (1, 1), (1, 1), False)):
                _refuse(f"{where}.token_mixer pools k{pool.kernel_size} s{pool.stride} "
                        f"p{pool.padding} count_include_pad={pool.count_include_pad}, "
                        f"not 3/1/1 without padding")
            for name in ('norm1', 'norm2'):
                norm = getattr(blk, name)
                if not isinstance(norm, nn.GroupNorm) or norm.num_groups != 1 or \
                        norm.eps != GN_EPS:
                    _refuse(f"{where}.{name} is {norm!r}, not a one-group GroupNorm with eps "
                            f"{GN_EPS}")
            act = blk.mlp.act
            if not isinstance(act, nn.GELU) or act.approximate != 'none':
                _refuse(f"{where}.mlp.act is {act!r}, not the exact GELU")
            if not isinstance(blk.mlp.norm, nn.Identity):
                _refuse(f"{where}.mlp has a norm ({type(blk.mlp.norm).__name__})")
            for name in ('res_scale1', 'res_scale2'):
                if not isinstance(getattr(blk, name, nn.Identity()), nn.Identity):
                    _refuse(f"{where}.{name} is a residual scale (PoolFormer v2)")
    head = model.head
    if getattr(head.global_pool, 'pool_type', 'avg') != 'avg':
        _refuse(f"head pools with {head.global_pool.pool_type!r}, not 'avg'")
    if not isinstance(head.norm, nn.LayerNorm) or tuple(head.norm.normalized_shape) != \
            (model.num_features,):
        _refuse(f"head.norm is {head.norm!r}, not a LayerNorm over the channels")
    if not isinstance(head.fc, nn.Linear):
        _refuse(f"head.fc is {type(head.fc).__name__}, not one Linear layer (MLP heads "
                f"have no counterpart)")
    return float(head.norm.eps)


def _shape_of(state: Mapping) -> dict:
    """Widths, depths, MLP ratio and class count from the timm keys and shapes."""
    if 'stem.conv.weight' not in state:
        _refuse("no `stem.conv.weight` key (a timm MetaFormer state_dict has one)")
    n_stages = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)))
    if n_stages != 4:
        _refuse(f"{n_stages} stages, not 4")
    depths = [1 + max(int(m.group(2)) for k in state
                      if (m := _BLOCK_KEY.match(k)) and int(m.group(1)) == i)
              for i in range(n_stages)]
    dims = [state[f'stages.{i}.blocks.0.norm1.weight'].shape[0] if
            f'stages.{i}.blocks.0.norm1.weight' in state else _refuse(f"stage {i} has no norm1")
            for i in range(n_stages)]
    if any(a == b for a, b in zip(dims, dims[1:])):
        _refuse(f"widths {dims} repeat (no downsampling between equal widths)")
    hidden = {state[f'stages.{i}.blocks.{j}.mlp.fc1.weight'].shape[0] / dims[i]
              for i in range(n_stages) for j in range(depths[i])
              if f'stages.{i}.blocks.{j}.mlp.fc1.weight' in state}
    if len(hidden) != 1 or int(next(iter(hidden))) != next(iter(hidden)):
        _refuse(f"MLP ratios {sorted(hidden)} are not one integer")
    if 'head.fc.weight' not in state:
        _refuse("no `head.fc.weight` (a classifier with one Linear head is needed)")
    arch = dict(layers=depths, embed_dims=dims, mlp_ratios=[int(next(iter(hidden)))] * 4)
    return dict(arch=arch, num_classes=state['head.fc.weight'].shape[0])


def timm_key_map(state: Mapping, ours: Mapping) -> dict:
    """{timm key: our key} for every key of `state` that has a counterpart in `ours` (our
    PoolFormerClassifier's state_dict); the caller checks for leftovers on either side."""
    # Our network entries in order: stage Sequentials at even, downsamplings at odd indices.
    mapping = {'stem.conv.weight': 'backbone.patch_embed.proj.weight',
               'stem.conv.bias': 'backbone.patch_embed.proj.bias',
               'head.norm.weight': 'backbone.norm6.weight',
               'head.norm.bias': 'backbone.norm6.bias',
               'head.fc.weight': 'head.fc.weight', 'head.fc.bias': 'head.fc.bias'}
    for key in state:
        if m := _BLOCK_KEY.match(key):
            i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            if rest in _BLOCK_PARTS:
                mapping[key] = f'backbone.network.{2 * i}.{j}.{_BLOCK_PARTS[rest]}'
        elif m := re.match(r'^stages\.(\d+)\.downsample\.conv\.(weight|bias)$', key):
            i = int(m.group(1))
            if i > 0:
                mapping[key] = f'backbone.network.{2 * i - 1}.proj.{m.group(2)}'
    return {k: v for k, v in mapping.items() if k in state and v in ours}


def poolformer_from_timm(source, head_norm_eps: float | None = None) -> PoolFormerClassifier:
    """Our `PoolFormerClassifier` computing what timm's `poolformer_*` (v1) classifier computes.

    `source`: a timm model (e.g. `timm.create_model('poolformer_s12')`; its modules are checked:
    pooling mixers, exact GELU, one-group GroupNorms, no residual scales or downsampling norms,
    an average-pool + LayerNorm + Linear head) or its `state_dict` (then only keys and shapes
    are checked; `head_norm_eps` gives timm's head LayerNorm eps, default 1e-6). Widths, depths,
    MLP ratio and class count are read from the weights. The result has
    `head_norm='after_pool'` (see RIFormerClassifier: timm normalises after pooling), is in eval
    mode, on the source's device and dtype. Raises ValueError for any structure that does not map
    (convformer, caformer, poolformer v2, MLP heads, ...) and for keys left over on either side.
    """
    if isinstance(source, nn.Module):
        eps = _check_timm_modules(source)
        if head_norm_eps is not None and head_norm_eps != eps:
            raise ValueError(f"head_norm_eps={head_norm_eps} contradicts the model's head "
                             f"LayerNorm eps {eps}")
        state = source.state_dict()
    elif isinstance(source, Mapping):
        state = dict(source)
        eps = 1e-6 if head_norm_eps is None else float(head_norm_eps)
        if any(k.startswith('stages.') and ('token_mixer.' in k or 'res_scale' in k)
               for k in state):
            odd = sorted(k for k in state if 'token_mixer.' in k or 'res_scale' in k)
            _refuse(f"keys of a non-pooling mixer or residual scales: {odd[:4]}")
    else:
        raise TypeError(f"poolformer_from_timm expects a timm model or its state_dict, got "
                        f"{type(source).__name__}")
    shape = _shape_of(state)
    teacher = PoolFormerClassifier(shape['arch'], num_classes=shape['num_classes'],
                                   init_weights=False, head_norm='after_pool', head_norm_eps=eps)
    ours = teacher.state_dict()
    mapping = timm_key_map(state, ours)
    left_timm = sorted(set(state) - set(mapping))
    left_ours = sorted(set(ours) - set(mapping.values()))
    if left_timm or left_ours:
        raise ValueError(f"timm keys without a counterpart ({len(left_timm)}): {left_timm}; "
                         f"our keys not filled ({len(left_ours)}): {left_ours}")
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(ours[v].shape)}"
           for k, v in mapping.items() if tuple(state[k].shape) != tuple(ours[v].shape)]
    if bad:
        raise ValueError(f"shape mismatches ({len(bad)}): {bad}")
    ref = state['stem.conv.weight']
    teacher = teacher.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        teacher.load_state_dict({v: state[k] for k, v in mapping.items()}, strict=True)
    return teacher.eval()

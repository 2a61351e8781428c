"""`rk.convert`: put the fused `RIFormerBlock` in place of every upstream-style RIFormer block.

An upstream-style block is any module with exactly the parameter names of mmpretrain's
`RIFormerBlock` in one of its two forms (training: norm1, token_mixer.affine, norm2, mlp.fc1,
mlp.fc2, layer_scale_1/2; deploy: norm_reparam instead of norm1 and the mixer). Such a module is
replaced only when it also computes what upstream's block computes; otherwise `convert` raises a
ValueError naming the module and the difference, and changes nothing. Two checks:

* structure: one-group `nn.GroupNorm`s with affine parameters, a depthwise 1x1 affine conv with
  bias, 1x1 fc1/fc2 convs with biases, exact-erf `nn.GELU`, `nn.Dropout`, a drop path that is
  the identity or a per-sample stochastic depth with a `drop_prob`;
* computation: the module's own forward, run on a small fp64 probe with random parameters of
  order one (layer scales included: upstream's 1e-5 would hide a wrong branch) through
  `torch.func.functional_call`, must equal upstream's forward (reference.py) on the same
  parameters to rounding. This catches what the structure cannot show: a different residual
  order, a mixer that does not subtract its input, a GroupNorm subclass with its own eps
  handling, a tanh GELU behind another class.

The fused block shares the original's modules and parameters (the same GroupNorm and Conv2d
objects, the same layer-scale Parameters: an optimizer built before the conversion keeps
training them), keeps its form, its eps values and its training/eval mode, and has the same
state_dict keys. Hooks registered on the original block module itself (not on its children,
which are shared) do not carry over.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import dispatch
from .block import RIFormerBlock
from .reference import DropPath, reference_block_forward

_COMMON = ('norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight',
           'mlp.fc2.bias', 'layer_scale_1', 'layer_scale_2')
TRAINING_FORM_NAMES = frozenset(_COMMON + ('norm1.weight', 'norm1.bias',
                                           'token_mixer.affine.weight',
                                           'token_mixer.affine.bias'))
DEPLOY_FORM_NAMES = frozenset(_COMMON + ('norm_reparam.weight', 'norm_reparam.bias'))
# Parameter names that only a RIFormer block has (a PoolFormer block shares the rest): a
# module with these but not exactly one of the two sets is refused, not skipped.
_DISTINCTIVE = ('token_mixer.affine.weight', 'norm_reparam.weight')

# fp64 probe: the same ops in a possibly different order agree to ~1e-15; the differences the
# probe exists to catch are far larger (tanh vs erf GELU ~1e-4, eps 1e-5 vs 1e-6 ~1e-6).
_PROBE_TOL = 1e-10


def convert(model: nn.Module, backend: str = 'auto'):
    """Replace every upstream-style RIFormer block in `model` with `rk.RIFormerBlock`, in place.

    Returns (model, number of blocks replaced); `model` itself is returned replaced when it is
    such a block. The fused blocks share the original parameters and keep the form (training
    or deploy). `backend`: 'auto', or a backend name every converted block then asks for (its
    `backend` attribute; `rk.use_backend` and RIFORMER_BACKEND still override it); a named
    backend that is not usable in this process raises BackendUnavailableError here.
    Blocks that already are `rk.RIFormerBlock` are left as they are (not counted).

    Raises ValueError, before changing anything, when a module has a RIFormer block's
    parameter names but not its computation (see the module docstring), naming it and why."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    if backend != 'auto':
        reason = dispatch.get_backend(backend).availability()   # ValueError for a bad name
        if reason is not None:
            raise dispatch.BackendUnavailableError(f"backend {backend!r} is not usable: {reason}")
    # Find and check everything first, so a refusal leaves the model untouched.
    found = []                                   # (parent or None, child name, path, module)
    _collect(model, None, None, '', found)
    fused = {id(m): _fused_block(m, path, backend) for _, _, path, m in found}
    if found and found[0][0] is None:          # the model itself is such a block
        return fused[id(model)], 1
    for parent, name, _, module in found:
        setattr(parent, name, fused[id(module)])
    _chain_sequential_neighbours(model, fused)
    return model, len(fused)          # a block reachable by two paths is one block


def _collect(module, parent, name, path, found) -> None:
    if isinstance(module, RIFormerBlock):
        return
    if _is_candidate(module, path or type(module).__name__):
        found.append((parent, name, path or '<root>', module))
        return
    for child_name, child in module.named_children():
        _collect(child, module, child_name, f"{path}.{child_name}" if path else child_name, found)


def _is_candidate(module: nn.Module, path: str) -> bool:
    names = frozenset(n for n, _ in module.named_parameters())
    if names in (TRAINING_FORM_NAMES, DEPLOY_FORM_NAMES):
        return True
    if any(n in names for n in _DISTINCTIVE) and {'layer_scale_1', 'mlp.fc1.weight'} <= names:
        form = TRAINING_FORM_NAMES if 'token_mixer.affine.weight' in names else DEPLOY_FORM_NAMES
        extra, missing = sorted(names - form), sorted(form - names)
        raise ValueError(f"{path} ({type(module).__name__}) looks like a RIFormer block but its "
                         f"parameters differ from upstream's: extra {extra}, missing {missing}; "
                         f"convert cannot know what they do")
    return False


def _refuse(path, module, why):
    raise ValueError(f"cannot convert {path} ({type(module).__name__}): {why}; it has a RIFormer "
                     f"block's parameter names but computes something else")


def _check_group_norm(path, block, attr, dim):
    norm = getattr(block, attr)
    if type(norm) is not nn.GroupNorm:
        _refuse(path, block, f"{attr} is {type(norm).__name__}, not nn.GroupNorm (a subclass or "
                f"another norm may normalise differently)")
    if norm.num_groups != 1:
        _refuse(path, block, f"{attr} has num_groups={norm.num_groups}; the fused block's "
                f"GroupNorms have one group (statistics over C, H and W)")
    if norm.num_channels != dim or not norm.affine:
        _refuse(path, block, f"{attr} is GroupNorm({norm.num_groups}, {norm.num_channels}, "
                f"affine={norm.affine}), expected {dim} channels with affine parameters")


def _check_conv(path, block, attr, conv, cin, cout, groups):
    if type(conv) is not nn.Conv2d:
        _refuse(path, block, f"{attr} is {type(conv).__name__}, not nn.Conv2d")
    shape = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
             conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
    want = (cin, cout, (1, 1), (1, 1), (0, 0), (1, 1), groups, True, 'zeros')
    if shape != want:
        _refuse(path, block, f"{attr} is {conv}, expected a 1x1 conv {cin}->{cout} with "
                f"groups={groups}, stride 1, no padding and a bias")


def _drop_path_prob(path, block) -> float:
    dp = block.drop_path
    if type(dp) is nn.Identity:
        return 0.0
    prob = getattr(dp, 'drop_prob', None)
    if not isinstance(prob, (int, float)) or not 0 <= prob < 1:
        _refuse(path, block, f"drop_path is {type(dp).__name__} without a drop_prob in [0, 1)")
    if getattr(dp, 'scale_by_keep', True) is not True:
        _refuse(path, block, "drop_path does not rescale kept samples by 1/keep_prob "
                "(scale_by_keep=False)")
    return float(prob)


def _check_structure(path, block):
    """The block's dim, deploy flag, dropout p and drop-path probability, after
    checking every submodule is what upstream builds."""
    dim = block.layer_scale_1.shape[0]
    deploy = hasattr(block, 'norm_reparam')
    buffers = [name for name, _ in block.named_buffers()]
    if buffers:
        _refuse(path, block, f"it has buffers {buffers[:4]}, which upstream's block has not")
    if block.layer_scale_1.shape != (dim,) or block.layer_scale_2.shape != (dim,):
        _refuse(path, block, f"layer scales of shapes {tuple(block.layer_scale_1.shape)}, "
                f"{tuple(block.layer_scale_2.shape)}; expected ({dim},)")
    for attr in (('norm_reparam',) if deploy else ('norm1',)) + ('norm2',):
        _check_group_norm(path, block, attr, dim)
    if not deploy:
        if set(dict(block.token_mixer.named_children())) != {'affine'}:
            _refuse(path, block, "token_mixer has submodules besides `affine`")
        _check_conv(path, block, 'token_mixer.affine', block.token_mixer.affine, dim, dim, dim)
    mlp = block.mlp
    if set(dict(mlp.named_children())) != {'fc1', 'act', 'fc2', 'drop'}:
        _refuse(path, block, f"mlp has submodules {sorted(dict(mlp.named_children()))}, expected "
                f"fc1, act, fc2, drop")
    hidden = mlp.fc1.out_channels
    _check_conv(path, block, 'mlp.fc1', mlp.fc1, dim, hidden, 1)
    _check_conv(path, block, 'mlp.fc2', mlp.fc2, hidden, dim, 1)
    if type(mlp.act) is not nn.GELU or mlp.act.approximate != 'none':
        what = (f"nn.GELU(approximate={mlp.act.approximate!r})" if isinstance(mlp.act, nn.GELU)
                else type(mlp.act).__name__)
        _refuse(path, block, f"mlp.act is {what}; the fused kernels compute the exact erf GELU")
    if type(mlp.drop) is not nn.Dropout:
        _refuse(path, block, f"mlp.drop is {type(mlp.drop).__name__}, not nn.Dropout")
    return dim, deploy, float(mlp.drop.p), _drop_path_prob(path, block)


def _check_computation(path, block, fused) -> None:
    """Run the module's own forward and upstream's on one fp64 probe with random parameters
    (eval mode: no random masks), on the CPU whatever device the model is on."""
    g = torch.Generator().manual_seed(0)
    params = {}
    for name, p in block.named_parameters():
        if name.startswith('layer_scale'):
            v = 0.5 + torch.rand(p.shape, generator=g, dtype=torch.float64)
        elif name.endswith('weight') and 'norm' in name:
            v = 1 + 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64)
        else:
            v = torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(
                p[0].numel() if p.dim() > 1 else 4)
        params[name] = v
    x = torch.randn((2, fused.dim, 3, 2), generator=g, dtype=torch.float64) * 1.5 + 0.3
    modes = [(m, m.training) for m in block.modules()]
    try:
        block.eval()
        with torch.no_grad():
            try:
                got = torch.func.functional_call(block, params, (x,))
            except Exception as err:   # noqa: BLE001  (any failure means: not upstream's block)
                _refuse(path, block, f"its forward failed on a probe input ({err})")
            want = reference_block_forward(_ProbeView(block, params), x)
    finally:
        for m, mode in modes:
            m.training = mode
    if not isinstance(got, torch.Tensor) or got.shape != x.shape:
        _refuse(path, block, "its forward does not return a tensor of its input's shape")
    err = ((got - want).abs().max() / want.abs().max()).item()
    if not err <= _PROBE_TOL:
        _refuse(path, block, f"its forward differs from upstream RIFormerBlock's on a probe "
                f"input (relative difference {err:.2e}; a different norm, activation, residual "
                f"or mixer)")


class _ProbeView:
    """Upstream's submodules built from the probe parameters, for reference_block_forward."""

    def __init__(self, block, params):
        dim = block.layer_scale_1.shape[0]
        self.layer_scale_1 = params['layer_scale_1']
        self.layer_scale_2 = params['layer_scale_2']
        self.drop_path = nn.Identity()

        def norm(prefix, eps):
            return lambda x: nn.functional.group_norm(x, 1, params[prefix + '.weight'],
                                                      params[prefix + '.bias'], eps)
        if hasattr(block, 'norm_reparam'):
            self.norm_reparam = norm('norm_reparam', block.norm_reparam.eps)
        else:
            self.norm1 = norm('norm1', block.norm1.eps)
            w, b = params['token_mixer.affine.weight'], params['token_mixer.affine.bias']
            self.token_mixer = lambda x: nn.functional.conv2d(x, w, b, groups=dim) - x
        self.norm2 = norm('norm2', block.norm2.eps)

        def mlp(x):
            h = nn.functional.gelu(nn.functional.conv2d(x, params['mlp.fc1.weight'],
                                                        params['mlp.fc1.bias']))
            return nn.functional.conv2d(h, params['mlp.fc2.weight'], params['mlp.fc2.bias'])
        self.mlp = mlp


def _fused_block(block: nn.Module, path: str, backend: str) -> RIFormerBlock:
    dim, deploy, drop, drop_path = _check_structure(path, block)
    # Built on the meta device (no memory), then given the original's modules and parameters.
    with torch.device('meta'):
        fused = RIFormerBlock(dim, mlp_ratio=1.0, drop=drop, drop_path=drop_path, deploy=deploy)
    _check_computation(path, block, fused)
    if deploy:
        fused.norm_reparam = block.norm_reparam
    else:
        fused.norm1 = block.norm1
        fused.token_mixer.affine = block.token_mixer.affine
    fused.norm2 = block.norm2
    fused.mlp.fc1, fused.mlp.fc2, fused.mlp.drop = block.mlp.fc1, block.mlp.fc2, block.mlp.drop
    fused.layer_scale_1, fused.layer_scale_2 = block.layer_scale_1, block.layer_scale_2
    fused.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
    fused.train(block.training)
    fused.backend = backend
    return fused


def _chain_sequential_neighbours(model, fused) -> None:
    """Inside an nn.Sequential, a converted block followed by another converted block hands it
    the moments of its output (chained statistics, as rk.RIFormer's stages do); the next block
    checks they still describe its input, so this only saves work."""
    converted = {id(f) for f in fused.values()}
    for seq in model.modules():
        if isinstance(seq, nn.Sequential):
            items = list(seq)
            for a, b in zip(items, items[1:]):
                if id(a) in converted and id(b) in converted:
                    a.chain_statistics = True

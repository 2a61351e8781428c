"""ONNX export of RIFormer models in deploy form, as standard ONNX operators.

`export_onnx(model, path, input_shape)` exports a deep copy of `model` (the caller's model is not
touched): every RIFormerBlock is switched to deploy form (norm1 + affine mixer -> norm_reparam)
and replaced by the reference computation of the deploy block, and every one-group GroupNorm by
explicit reductions over (C, H, W): ReduceMean, Sub, Mul, ReduceMean, Add, Sqrt, Reciprocal.
No fused kernel and no custom operator reaches the file, and by default no
`GroupNormalization` node either: the operator's scale was per group until opset 21 and some
runtimes still compute GroupNormalization(num_groups=1) per channel (NVIDIA/TensorRT issue
4756), a different function. `group_norm_node=True` keeps torch's GroupNorm lowering
(GroupNormalization at opset >= 21) for runtimes known to compute it right.

Before the file appears at `path` it is run with onnxruntime on a random input and compared
with the caller's model run by the float64 reference; a mismatch raises and leaves no file
(docs/deployment.md: the tolerances, the node counts).
"""
from __future__ import annotations

import collections
import copy
import os
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from . import dispatch
from .atomic import replacing
from .block import RIFormerBlock
from .reference import reference_block_forward
from .testing import rel_err

DEFAULT_OPSET = 18
# torch.onnx's exporter (torch.export + onnxscript) emits opset 18 and newer.
MIN_OPSET = 18
# GroupNormalization has per-channel scale and bias from opset 21 on; opset 18's per-group
# scale cannot express a one-group norm's per-channel weight.
GROUP_NORM_NODE_MIN_OPSET = 21
# fp32 onnxruntime logits against the float64 reference of the caller's model: max |error| /
# max |logit|. fp32 rounding through S12 (12 blocks, random order-one weights) measures
# 4e-7 to 8e-7 (docs/deployment.md); a per-channel norm is off by 0.6 to 1.0.
RTOL = 1e-5
_STANDARD_DOMAINS = ('', 'ai.onnx')


class ExportError(RuntimeError):
    """The exported file did not reproduce the model (or could not be run); nothing was written."""


@dataclass
class OnnxExport:
    """What `export_onnx` wrote and measured."""
    path: str
    opset: int
    node_count: int
    op_histogram: dict[str, int]
    max_rel_err: float               # worst output, onnxruntime fp32 vs the float64 reference
    checked_batches: tuple[int, ...]
    dynamic_batch: bool
    input_name: str = 'input'
    output_names: tuple[str, ...] = field(default_factory=tuple)

    def summary(self) -> str:
        ops = ', '.join(f'{k} {v}' for k, v in sorted(self.op_histogram.items(),
                                                         key=lambda kv: (-kv[1], kv[0])))
        return (f"{self.path}: opset {self.opset}, {self.node_count} nodes ({ops}); "
                f"onnxruntime vs float64 reference at batch {list(self.checked_batches)}: "
                f"max relative error {self.max_rel_err:.2e} (limit {RTOL:.0e})")


class ExplicitGroupNorm(nn.Module):
    """nn.GroupNorm as explicit reductions: mean and two-pass (centred) variance over each
    group's (C/G, H, W) values. Two passes like torch's kernel, not E[x^2] - E[x]^2, which
    cancels in fp32 for inputs with a large mean."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.num_groups = norm.num_groups
        self.eps = norm.eps
        self.affine = norm.affine
        if norm.affine:
            self.weight = norm.weight
            self.bias = norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_groups == 1:
            xg, dims = x, tuple(range(1, x.dim()))
        else:
            xg, dims = x.reshape(x.shape[0], self.num_groups, -1), (2,)
        mean = xg.mean(dims, keepdim=True)
        d = xg - mean
        var = (d * d).mean(dims, keepdim=True)
        xhat = (d * torch.rsqrt(var + self.eps)).reshape(x.shape)
        if not self.affine:
            return xhat
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return xhat * self.weight.reshape(shape) + self.bias.reshape(shape)


class ReferenceDeployBlock(nn.Module):
    """A deploy-form RIFormerBlock's submodules and layer scales, run by
    `reference.reference_block_forward` (upstream's computation): what the exporter traces
    instead of the dispatching block."""

    def __init__(self, block: RIFormerBlock):
        super().__init__()
        if not block.deploy:
            raise ValueError("ReferenceDeployBlock takes a deploy-form block")
        self.norm_reparam = block.norm_reparam
        self.norm2 = block.norm2
        self.mlp = block.mlp
        self.drop_path = block.drop_path
        self.layer_scale_1 = block.layer_scale_1
        self.layer_scale_2 = block.layer_scale_2
        self.dim = block.dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference_block_forward(self, x)


def export_module(model: nn.Module, group_norm_node: bool = False) -> nn.Module:
    """A float32 CPU eval-mode deep copy of `model` in deploy form, made of plain torch ops:
    every RIFormerBlock replaced by a ReferenceDeployBlock and (unless `group_norm_node`) every
    nn.GroupNorm by an ExplicitGroupNorm. `model` itself is not changed."""
    module = copy.deepcopy(model).float().cpu().eval()
    if isinstance(module, RIFormerBlock):
        module.switch_to_deploy()
        module = ReferenceDeployBlock(module)
    for m in list(module.modules()):
        for name, child in list(m._modules.items()):
            if isinstance(child, RIFormerBlock):
                child.switch_to_deploy()
                m._modules[name] = ReferenceDeployBlock(child)
    if not group_norm_node:
        if isinstance(module, nn.GroupNorm):
            return ExplicitGroupNorm(module)
        for m in list(module.modules()):
            for name, child in list(m._modules.items()):
                if isinstance(child, nn.GroupNorm):
                    m._modules[name] = ExplicitGroupNorm(child)
    return module


def _check_input_shape(input_shape) -> tuple[int, ...]:
    if isinstance(input_shape, torch.Size):
        input_shape = tuple(input_shape)
    if not isinstance(input_shape, (tuple, list)):
        raise TypeError(f"input_shape must be a tuple (N, C, H, W) of ints, got "
                        f"{type(input_shape).__name__}")
    if len(input_shape) != 4:
        raise ValueError(f"input_shape must have 4 entries (N, C, H, W), got {len(input_shape)}: "
                         f"{tuple(input_shape)}")
    for v in input_shape:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"input_shape entries must be ints, got {tuple(input_shape)}")
        if v < 1:
            raise ValueError(f"input_shape entries must be positive, got {tuple(input_shape)}")
    return tuple(input_shape)


def _expected_channels(model: nn.Module) -> int | None:
    if isinstance(model, RIFormerBlock):
        return model.dim
    embed = getattr(getattr(model, 'backbone', model), 'patch_embed', None)
    proj = getattr(embed, 'proj', None)
    return proj.in_channels if isinstance(proj, nn.Conv2d) else None


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out):
        return list(out)
    raise TypeError(f"the model must return a tensor or a tuple of tensors, got "
                    f"{type(out).__name__}")


class _Named(nn.Module):
    """Gives the graph input its name (`input`) and flattens a tuple output."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, input):  # noqa: A002 (the ONNX input's name)
        out = self.module(input)
        return tuple(out) if isinstance(out, (tuple, list)) else out


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401  (torch.onnx's exporter translates through it)
    except ImportError as err:
        raise ImportError(f"export_onnx needs onnx, onnxruntime and onnxscript ({err}); "
                          f"pip install 'riformer_kernels[export]'") from err


def export_onnx(model: nn.Module, path, input_shape: Sequence[int], opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True, group_norm_node: bool = False,
                seed: int = 0) -> OnnxExport:
    """Export `model` (a RIFormerClassifier, RIFormer backbone, RIFormerBlock or any module
    holding RIFormerBlocks, either form) in deploy form to the ONNX file `path`.

    `input_shape` (N, C, H, W): the example input, and the shape the file is checked at.
    `dynamic_batch`: the batch axis is symbolic (`batch`); the check then also runs batch N+1.
    `group_norm_node`: emit GroupNormalization nodes (opset >= 21) instead of explicit
    reductions. `seed`: the random check input. Returns an `OnnxExport` (node count, op
    histogram, measured error); raises ExportError, and writes nothing, when onnxruntime's
    output differs from the float64 reference of `model` by more than RTOL (relative to the
    largest output) or the graph holds a non-standard operator or an unwanted
    GroupNormalization.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    shape = _check_input_shape(input_shape)
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"opset must be an int, got {type(opset).__name__}")
    _require_onnx()
    import onnx
    import onnxruntime as ort
    max_opset = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= max_opset:
        raise ValueError(f"opset must be between {MIN_OPSET} (torch.onnx's exporter) and "
                         f"{max_opset} (this onnx), got {opset}")
    if group_norm_node and opset < GROUP_NORM_NODE_MIN_OPSET:
        raise ValueError(f"group_norm_node needs opset >= {GROUP_NORM_NODE_MIN_OPSET} (before "
                         f"it GroupNormalization's scale is per group, not per channel); got "
                         f"opset {opset}")
    channels = _expected_channels(model)
    if channels is not None and shape[1] != channels:
        raise ValueError(f"input_shape {shape} has {shape[1]} channels but the model takes "
                         f"{channels}")

    # The truth: the caller's model as given (either form), float64, upstream's op-by-op path.
    truth_model = copy.deepcopy(model).double().cpu().eval()
    g = torch.Generator().manual_seed(seed)
    batches = (shape[0], shape[0] + 1) if dynamic_batch else (shape[0],)
    inputs = [torch.randn((n,) + shape[1:], generator=g, dtype=torch.float64) for n in batches]
    try:
        with torch.no_grad(), dispatch.use_backend('reference'):
            truths = [_flatten(truth_model(x)) for x in inputs]
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"the model cannot run an input of shape {shape}: {err}") from err
    del truth_model

    module = _Named(export_module(model, group_norm_node)).eval()
    # torch.export specialises a dimension of size 1 to a constant, so a dynamic batch is
    # traced at batch 2 or more; the check below still runs the requested batch.
    example = torch.randn((max(shape[0], 2) if dynamic_batch else shape[0],) + shape[1:])
    output_names = ['logits'] if len(truths[0]) == 1 else [f'output{i}'
                                                            for i in range(len(truths[0]))]
    kwargs = {}
    if dynamic_batch:
        kwargs['dynamic_shapes'] = {'input': {0: torch.export.Dim('batch')}}

    with replacing(path, suffix='.onnx') as tmp:
        try:
            torch.onnx.export(module, (example,), tmp, dynamo=True, opset_version=opset,
                              input_names=['input'], output_names=output_names,
                              external_data=False, verbose=False, **kwargs)
        except Exception as err:
            raise ExportError(f"torch.onnx.export failed: {err}") from err
        graph = onnx.load(tmp)
        try:
            onnx.checker.check_model(graph)
        except onnx.checker.ValidationError as err:
            raise ExportError(f"onnx.checker rejects the exported file: {err}") from err
        histogram = dict(collections.Counter(n.op_type for n in graph.graph.node))
        foreign = sorted({f'{n.domain}::{n.op_type}' for n in graph.graph.node
                          if n.domain not in _STANDARD_DOMAINS})
        if foreign:
            raise ExportError(f"the graph holds non-standard operators {foreign}; nothing "
                              f"written")
        n_gn = histogram.get('GroupNormalization', 0)
        if not group_norm_node and n_gn:
            raise ExportError(f"the graph holds {n_gn} GroupNormalization nodes although "
                              f"group_norm_node=False; nothing written")
        try:
            session = ort.InferenceSession(tmp, providers=['CPUExecutionProvider'])
        except Exception as err:
            raise ExportError(f"onnxruntime {ort.__version__} cannot load the file at opset "
                              f"{opset}: {err}") from err
        worst = 0.0
        for x, truth in zip(inputs, truths):
            got = session.run(None, {'input': x.float().numpy()})
            if len(got) != len(truth):
                raise ExportError(f"the file has {len(got)} outputs, the model {len(truth)}")
            for name, a, b in zip(output_names, got, truth):
                if tuple(a.shape) != tuple(b.shape):
                    raise ExportError(f"output {name!r} at batch {x.shape[0]}: onnxruntime "
                                      f"shape {tuple(a.shape)}, model {tuple(b.shape)}")
                if not torch.isfinite(torch.from_numpy(a)).all():
                    raise ExportError(f"output {name!r} at batch {x.shape[0]}: onnxruntime "
                                      f"returned non-finite values")
                worst = max(worst, rel_err(torch.from_numpy(a), b))
        if not worst <= RTOL:
            raise ExportError(f"onnxruntime's output differs from the model's (float64 "
                              f"reference) by {worst:.3e} relative to the largest output, more "
                              f"than {RTOL:.0e}; nothing written")
    return OnnxExport(os.fspath(path), opset, len(graph.graph.node), histogram, worst, batches,
                      dynamic_batch, 'input', tuple(output_names))

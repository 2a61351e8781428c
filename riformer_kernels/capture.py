"""Recording a model's intermediates for distillation: token-mixer inputs/outputs, stage outputs.

`capture_mixer_io(model)` makes every block of `model` record its token mixer's input and output
in forward order while the context is open. For a fused RIFormer block neither tensor exists
inside the block (docs/design.md section 2: norm1 and the mixer are folded into per-(n,c)
coefficients), so they are formed here from the block's input x and the same statistics the fold
uses:

    input  = norm1(x)                     = g1 r1 x + (beta1 - g1 mu1 r1)
    output = affine(norm1(x)) - norm1(x)  = s r1 x + (t - s mu1 r1)

with (mu1, r1) = fold.group_statistics of the channel moments of x and (s, t) =
BlockParams.scale_shift() (docs/design.md section 1). Both are torch ops, so they are
differentiable with respect to x and norm1/affine parameters, and the block's own output is
computed by its backend exactly as without the capture (one extra statistics read of x, in torch,
per captured block). PoolFormer blocks (the teacher) record the tensors they compute anyway.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from . import fold
from .block import RIFormerBlock
from .params import BlockParams


class MixerIO(NamedTuple):
    """One block's token-mixer input norm1(x) and output mixer(norm1(x)), each (N, C, H, W)."""
    input: torch.Tensor
    output: torch.Tensor


def riformer_mixer_io(block: RIFormerBlock, x: torch.Tensor) -> MixerIO:
    """The token mixer's input and output of a training-form RIFormer block for input x,
    from x's channel moments and the block's parameters (see the module docstring)."""
    if block.deploy:
        raise ValueError("this RIFormer block is in deploy form: it has no token mixer whose "
                         "input and output could be recorded (capture before switch_to_deploy)")
    p = BlockParams.of(block)
    mean, var = fold.channel_moments(x)
    sd = mean.dtype
    mu1, r1 = fold.group_statistics(mean, var, p.eps1)
    s, t = p.scale_shift()
    in_scale, in_shift = fold.group_norm_map(mu1, r1, p.g1.to(sd), p.beta1.to(sd))
    out_scale, out_shift = fold.group_norm_map(mu1, r1, s.to(sd), t.to(sd))
    xs = x.to(sd)
    mixer_in = in_scale[:, :, None, None] * xs + in_shift[:, :, None, None]
    mixer_out = out_scale[:, :, None, None] * xs + out_shift[:, :, None, None]
    return MixerIO(mixer_in.to(x.dtype), mixer_out.to(x.dtype))


def _mixer_blocks(model: nn.Module):
    from .poolformer import PoolFormerBlock
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, (RIFormerBlock, PoolFormerBlock))]
    return found


@contextmanager
def capture_mixer_io(model: nn.Module):
    """`with capture_mixer_io(model) as records:` -- every forward of `model` inside the block
    appends one `MixerIO` per RIFormer/PoolFormer block, in forward order, to `records` (two
    forwards append two rounds). Works with every backend; the recorded tensors are part of the
    autograd graph. Raises ValueError if `model` has no such block or a RIFormer block is in
    deploy form (there is no mixer)."""
    from .poolformer import PoolFormerBlock
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture_mixer_io expects an nn.Module, got {type(model).__name__}")
    blocks = _mixer_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no RIFormer or PoolFormer block to capture")
    deploy = [name or '<model>' for name, m in blocks if getattr(m, 'deploy', False)]
    if deploy:
        raise ValueError(f"blocks {deploy[:3]}{' ...' if len(deploy) > 3 else ''} are in deploy "
                         f"form: they have no token mixer to capture")
    records: list[MixerIO] = []

    def hook(block, args, kwargs, _out):
        records.append(riformer_mixer_io(block, args[0] if args else kwargs['x']))

    handles = []
    sinks = []
    try:
        for _, m in blocks:
            if isinstance(m, PoolFormerBlock):
                m.mixer_sinks.append(records)
                sinks.append(m)
            else:
                handles.append(m.register_forward_hook(hook, with_kwargs=True))
        yield records
    finally:
        for h in handles:
            h.remove()
        for m in sinks:
            m.mixer_sinks.remove(records)


def _stages(model: nn.Module):
    backbone = getattr(model, 'backbone', model)
    network = getattr(backbone, 'network', None)
    if network is None:
        raise ValueError(f"{type(model).__name__} is not a RIFormer/PoolFormer backbone or "
                         f"classifier (no `network`)")
    return [m for m in network if isinstance(m, nn.Sequential)]


@contextmanager
def capture_stage_outputs(model: nn.Module):
    """`with capture_stage_outputs(model) as feats:` -- each forward appends the output of every
    stage (the last block of `network.0/2/4/6`, before any output norm), in order."""
    records: list[torch.Tensor] = []
    handles = [stage.register_forward_hook(lambda _m, _a, out: records.append(out))
               for stage in _stages(model)]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()

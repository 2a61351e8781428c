"""Helpers for checking a backend against the reference: used by the selftest, the benchmarks'
correctness gate and the test suite, so they draw parameters and measure errors the same way."""
from __future__ import annotations

import torch


def randomize_(module: torch.nn.Module, generator: torch.Generator | None = None,
               layer_scale=(0.5, 1.5)) -> torch.nn.Module:
    """Give every parameter random values of order one, in place; returns the module.

    Upstream initialises layer scales to 1e-5 (or 1e-6), which makes a block nearly the
    identity: a check on such a block could not see an error in either branch. Layer scales are
    drawn uniformly from `layer_scale`; norm weights from 1 + 0.3 N(0, 1), away from zero, so
    gradient magnitudes are comparable across parameters; everything else N(0, 1) / sqrt(fan-in).
    """
    lo, hi = layer_scale
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(('layer_scale_1', 'layer_scale_2')):
                p.copy_(lo + (hi - lo) * torch.rand(p.shape, generator=generator, dtype=p.dtype))
            elif 'norm' in name and name.endswith('weight'):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 4
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) / fan_in ** 0.5)
    return module


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: relative to the tensor's scale, not per element
    (per-element ratios explode where the truth crosses zero)."""
    # both to the CPU in fp64: the operands may live on different devices (a CUDA result
    # against a CPU truth); fp64 holds every fp32/fp16/bf16 value exactly.
    actual = actual.detach().to('cpu', torch.float64)
    expected = expected.detach().to('cpu', torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values in the result"
    scale = expected.abs().max().item()
    return (actual - expected).abs().max().item() / (scale if scale > 0 else 1.0)

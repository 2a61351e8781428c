"""Launch every Triton kernel on its input's device.

Triton's launcher takes the *current* CUDA device and stream, not the tensors': a tensor on
cuda:1 while cuda:0 is current would be launched on the wrong device (and stream). Every
`riformer_triton` custom op therefore runs its body under `device_of(x)` (all of an op's
tensors share one device). CPU tensors (the interpreter) need no guard. The fake
implementations allocate with `new_empty`/`empty_like`, so they keep the input's device too.
"""
from __future__ import annotations

import contextlib

import torch


def device_of(x: torch.Tensor):
    """`torch.cuda.device(x.device)` for a CUDA tensor, else a no-op context."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()

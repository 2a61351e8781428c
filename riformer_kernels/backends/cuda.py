"""The `cuda` backend: hand-written CUDA kernels in csrc/cuda (today the moments kernel only).

Registered so that `rk.available_backends()` says why it cannot run blocks yet; its block
kernels will be a `pipeline.KernelSet` like the cpu and triton ones.
"""
from __future__ import annotations

from .. import _ext
from ..dispatch import Backend, register_backend

register_backend(Backend('cuda', availability=lambda: _ext.native_availability('CUDA')))

"""Registration of the kernel backends (`triton`, `cuda`, `cpu`) with their availability.

Each backend reports precisely why it cannot run (missing package, missing build, no device), so
`rk.available_backends()` and `rk.explain_dispatch()` can say it. Backends whose kernels are not
written yet are registered as unusable with that reason rather than left out.
"""
from __future__ import annotations

from . import _ext
from .dispatch import Backend, register_backend


def _cuda_availability():
    return _ext.native_availability('CUDA')


register_backend(Backend('cuda', availability=_cuda_availability))

# The cpu backend (riformer_kernels.cpu_backend) registers itself.
from . import cpu_backend  # noqa: E402,F401

# The triton backend registers itself (as unusable, with the reason, when triton is missing).
from . import triton_backend  # noqa: E402,F401

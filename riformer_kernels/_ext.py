"""Loading the compiled extension `riformer_kernels._C` without ever failing the package import.

The C++/CUDA ops live in the `riformer` op namespace (csrc/ops.cpp). When the extension is
missing (a source checkout that was not built, a failed build) the package still imports; the
backends that need it report why they are unusable.

RIFORMER_EXTENSION_PATH=/path/to/_C.so loads that build of the extension instead of the
installed one (for testing other builds, e.g. the baseline-only one of RIFORMER_CPU_ISA_DISPATCH=0;
one process can hold only one, since both register the same ops).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import torch


def _import_extension():
    path = os.environ.get('RIFORMER_EXTENSION_PATH', '').strip()
    if not path:
        # import_module, not `from . import _C`: when the .so is absent the error then names it.
        return importlib.import_module('riformer_kernels._C')
    if not os.path.isfile(path):
        raise ImportError(f"RIFORMER_EXTENSION_PATH={path!r} is not a file")
    spec = importlib.util.spec_from_file_location('riformer_kernels._C', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules['riformer_kernels._C'] = module
    return module


try:
    _C = _import_extension()  # registers torch.ops.riformer.*
    LOAD_ERROR: str | None = None
except ImportError as err:  # depends on the build
    _C = None
    LOAD_ERROR = f"the compiled extension riformer_kernels._C could not be imported ({err})"


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether `riformer::<op>` has a kernel for `dispatch_key` ('CPU' or 'CUDA') in this build."""
    if _C is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"riformer::{op}", dispatch_key)
    except RuntimeError:
        return False


def native_availability(dispatch_key: str) -> str | None:
    """Why the fused native backend for `dispatch_key` cannot run here, or None if it can."""
    if _C is None:
        return LOAD_ERROR
    if dispatch_key == 'CUDA' and not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    missing = [op for op in ('moments', 'mlp_forward', 'mlp_backward', 'input_grad')
               if not has_kernel(op, dispatch_key)]
    if missing:
        return (f"the extension has no {dispatch_key} kernels for {missing} in this build"
                + (" (built without CUDA?)" if dispatch_key == 'CUDA' and
                   not has_kernel('moments', 'CUDA') else ""))
    return None

"""Helpers the tests share. Tolerances live in the tests that use them, with their reasons.

This module also decides where the Triton kernel tests run (`KERNEL_DEVICE`) and switches the
Triton interpreter and the CUDA emulator on for CPU runs; tests/conftest.py imports it before
anything else imports riformer_kernels, because the @triton.jit kernels read TRITON_INTERPRET
when they are defined and the `cuda` backend reads RIFORMER_CUDA_EMULATE at import.
"""
import copy
import os

import torch


def _kernel_test_device() -> torch.device:
    """The one place that decides the device of every Triton kernel test.

    * RIFORMER_TEST_DEVICE, when set (e.g. `cuda:1`, or `cuda` for a CUDA emulator that torch
      sees as a CUDA device): the hook for devices the rule below does not know.
    * else CUDA when torch sees a CUDA device: the kernels are compiled and run for real;
    * else CPU, with the Triton interpreter (TRITON_INTERPRET=1, set below).
    """
    name = os.environ.get('RIFORMER_TEST_DEVICE')
    if name:
        return torch.device(name)
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


KERNEL_DEVICE = _kernel_test_device()
if KERNEL_DEVICE.type == 'cpu':
    os.environ.setdefault('TRITON_INTERPRET', '1')
    # Likewise the CUDA kernels: without a GPU the `cuda` backend runs the csrc/cuda sources
    # through the SIMT emulator on CPU tensors (read when riformer_kernels is imported).
    os.environ.setdefault('RIFORMER_CUDA_EMULATE', '1')
# Whether the `cuda` kernel set runs emulated in this test session.
CUDA_EMULATED = os.environ.get('RIFORMER_CUDA_EMULATE', '0') not in ('', '0')
# Whether the Triton kernels are interpreted (numpy on the host) rather than compiled for a GPU.
INTERPRETER = os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')
# Compiled kernels on a CUDA device: what the GPU-only tests (marker `gpu`) need.
COMPILED_GPU_KERNELS = KERNEL_DEVICE.type == 'cuda' and not INTERPRETER

import riformer_kernels as rk  # noqa: E402  (after TRITON_INTERPRET is decided)
# the tests import both from here
from riformer_kernels.testing import randomize_, rel_err  # noqa: E402,F401
from torch.func import functional_call  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402


def make_block(dim, deploy=False, dtype=torch.float64, device='cpu', **kwargs):
    """A randomised block; its values are drawn on the CPU (the same on every device), then
    moved to `device`."""
    block = rk.RIFormerBlock(dim, deploy=deploy, **kwargs)
    return randomize_(block).to(dtype).to(device)


def run_block(block, x, backend, grad_out=None):
    """Output and the gradients of x and every parameter (name -> grad) under `backend`."""
    block = copy.deepcopy(block)
    x = x.detach().clone().requires_grad_(True)
    with rk.use_backend(backend):
        out = block(x)
    if grad_out is None:
        return out.detach(), None
    out.backward(grad_out)
    grads = {'x': x.grad}
    grads.update({n: p.grad for n, p in block.named_parameters()})
    return out.detach(), grads


def saved_for_backward_bytes(block, x, backend) -> int:
    """Unique storages autograd keeps for a backward of block(x) under `backend`, parameters
    excluded (they live anyway)."""
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), rk.use_backend(backend):
        block(x)
    return sum(storages.values())


def random_input(shape, dtype=torch.float64, channels_last=False, offset=0.0, device='cpu'):
    """Drawn on the CPU in fp64 and rounded there (the same values on every device), then
    moved to `device`."""
    x = torch.randn(shape, dtype=torch.float64) * 1.5 + 0.3 + offset
    x = x.to(dtype).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def check_same_seed_as_reference(block, x, backend, tol, seed=7):
    """Under the same seed, `backend` draws the reference's random masks (drop path, dropout):
    output and every gradient agree with the reference within `tol`, and the masks were active
    (the training output differs from the eval-mode one)."""
    g = torch.randn(x.shape, dtype=torch.float64).to(x.dtype).to(x.device)
    torch.manual_seed(seed)
    out_ref, grads_ref = run_block(block, x, 'reference', g)
    torch.manual_seed(seed)
    out, grads = run_block(block, x, backend, g)
    assert rel_err(out, out_ref) <= tol
    for k in grads_ref:
        assert rel_err(grads[k], grads_ref[k]) <= tol, k
    assert not torch.allclose(out_ref, run_block(copy.deepcopy(block).eval(), x, 'reference')[0])


def on_kernel_device(make):
    """`make` (make_block or random_input) with device=KERNEL_DEVICE: what the triton test
    modules build every tensor with."""
    def made(*args, **kwargs):
        kwargs.setdefault('device', KERNEL_DEVICE)
        return make(*args, **kwargs)
    made.__name__ = made.__qualname__ = make.__name__
    made.__doc__ = make.__doc__
    return made


def gradcheck_block(block, backend, shape=(2, 6, 3, 2)) -> bool:
    """torch.autograd.gradcheck of x and every parameter of an fp64 `block` run by `backend`.

    Tighter than gradcheck's defaults (atol 1e-5, rtol 1e-3): in fp64 the finite differences at
    eps 1e-6 are good to ~1e-9, and the analytic gradients are exact up to rounding."""
    names = [n for n, _ in block.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in block.parameters()]
    x = random_input(shape).requires_grad_(True)

    def f(x, *ps):
        with rk.use_backend(backend):
            return functional_call(block, dict(zip(names, ps)), (x,))

    return torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


def large_offset_errors(backend):
    """(error of `backend`, error of the reference, the fp32 block, the fp64 input): in fp32 on
    x + 1e4, both against the fp64 reference. The fold must not lose more precision to the
    offset than the reference does."""
    block32 = make_block(16, dtype=torch.float32)
    x64 = random_input((2, 16, 6, 6), offset=1e4)
    truth = run_block(copy.deepcopy(block32).double(), x64, 'reference')[0]
    x32 = x64.float()
    return (rel_err(run_block(block32, x32, backend)[0], truth),
            rel_err(run_block(block32, x32, 'reference')[0], truth), block32, x64)


class OpLog(TorchDispatchMode):
    """Every op dispatched while active: `ops` (names in order), `counts` (name -> calls) and
    `host_to_device` (ops that turned host data into a device tensor: a CPU tensor in and a
    CUDA tensor out, or `aten.lift_fresh`, which makes a tensor from Python data)."""
    def __init__(self):
        super().__init__()
        self.ops, self.counts, self.host_to_device = [], {}, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        self.ops.append(name)
        self.counts[name] = self.counts.get(name, 0) + 1
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if 'lift_fresh' in name or (any(t.device.type == 'cpu' for t in ins)
                                    and any(t.device.type == 'cuda' for t in outs)):
            self.host_to_device.append(name)
        return out

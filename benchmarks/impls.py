"""The implementations compared, how each one runs a step, and the correctness check before timing.

Implementations:
  eager       the reference block (training form, upstream's module-by-module computation)
  deploy      the reference block after `switch_to_deploy()` (forward only: it is an inference form)
  compile     `torch.compile` of the reference computation (inductor, static shapes); the first
              call's time, compilation included, is reported separately and the timing is warm
  fused-NAME  the block run by fused backend NAME through `rk.use_backend(NAME)`, one row for every
              backend `rk.available_backends()` reports usable on the benchmark's device
  auto        what a user gets by default: `rk.use_backend('auto')` picks per block (the fused
              backend, or the reference for a block whose class was measured slower fused);
              only when asked for with --impl
"""
from __future__ import annotations

import copy
import functools
import os
import time
from dataclasses import dataclass

import torch

import riformer_kernels as rk
from riformer_kernels import dispatch
from riformer_kernels.reference import reference_block_forward
from riformer_kernels import testing
from riformer_kernels.testing import randomize_  # noqa: F401  (micro, model_bench)

MODES = ('forward', 'train')
BASE_IMPLS = ('eager', 'deploy', 'compile')


@dataclass
class Impl:
    name: str
    kind: str                     # 'eager' | 'deploy' | 'compile' | 'fused'
    backend: str | None = None    # for 'fused'
    skip_reason: str | None = None

    def supports_mode(self, mode: str) -> str | None:
        if self.kind == 'deploy' and mode == 'train':
            return "the deploy form is for inference (its parameters differ from the training form)"
        return None


def discover_impls(device: torch.device, requested=None) -> tuple[list[Impl], dict]:
    """The implementations to run, filtered by `requested` names, and {name: reason} for the
    fused backends left out.

    A fused backend runs when it is usable on `device`. The Triton backend on a CPU-only machine
    runs in the interpreter, a test vehicle far too slow to time at real shapes, so it is left out
    there unless asked for by name. A backend asked for by name that cannot run gets rows that
    say why.
    """
    impls = [Impl(name, name) for name in BASE_IMPLS]
    for name, info in rk.available_backends().items():
        if name == 'reference':
            continue
        impl = Impl(f'fused-{name}', 'fused', name)
        if not info.usable:
            impl.skip_reason = info.reason
        elif dispatch.get_backend(name).forward is None:
            impl.skip_reason = "reports itself usable but is registered without a forward"
        elif name == 'cuda' and device.type != 'cuda':
            impl.skip_reason = "CUDA kernels need a CUDA device"
        elif name == 'cpu' and device.type != 'cpu':
            impl.skip_reason = "the cpu backend runs CPU tensors only"
        elif name == 'triton' and device.type == 'cpu' and not (requested and
                                                                 impl.name in requested):
            impl.skip_reason = ("on the CPU Triton runs only in its interpreter (a test vehicle); "
                                "not timed unless asked for with --impl fused-triton")
        impls.append(impl)
    if requested and 'auto' in requested:
        impls.append(Impl('auto', 'fused', 'auto'))
    if requested:
        known = {i.name for i in impls} | {'auto'}
        unknown = [r for r in requested if r not in known]
        if unknown:
            raise SystemExit(f"unknown --impl {unknown}; choose from {sorted(known)}")
        impls = [i for i in impls if i.name in requested]
    left_out = {i.name: i.skip_reason for i in impls if i.skip_reason and not requested}
    return [i for i in impls if requested or not i.skip_reason], left_out


def make_forward(impl: Impl, module: torch.nn.Module, is_block: bool):
    """(module, fn) where fn(x) runs `impl`'s forward of `module` (a block or a model).

    The module is a private copy (deploy converts it in place)."""
    module = copy.deepcopy(module)
    if impl.kind == 'deploy':
        module.switch_to_deploy()
    if impl.kind == 'compile':
        if is_block:
            compiled = torch.compile(functools.partial(reference_block_forward, module),
                                     dynamic=False)
            return module, compiled
        compiled_model = torch.compile(module, dynamic=False)

        def run_compiled(x):
            with rk.use_backend('reference'):
                return compiled_model(x)
        return module, run_compiled
    backend = impl.backend if impl.kind == 'fused' else 'reference'

    def run(x):
        with rk.use_backend(backend):
            return module(x)
    return module, run


class Runner:
    """One implementation, one mode, fixed inputs: a `step()` to time and a checked first call."""

    def __init__(self, impl: Impl, module, x, mode: str, backward, is_block: bool,
                 x_requires_grad: bool):
        self.impl, self.mode = impl, mode
        self.module, self.fn = make_forward(impl, module, is_block)
        self.module.train(mode == 'train')
        self.backward = backward
        self.x = x.detach().clone().requires_grad_(mode == 'train' and x_requires_grad)
        self.params = [p for p in self.module.parameters() if p.requires_grad]

    def forward(self):
        return self.fn(self.x)

    def step(self):
        if self.mode == 'forward':
            with torch.no_grad():
                return self.fn(self.x)
        self.x.grad = None
        for p in self.params:
            p.grad = None
        out = self.fn(self.x)
        self.backward(out)
        return out

    def first_call(self):
        """Run once (compiling, for `compile`); returns (seconds, output, {name: grad})."""
        sync(self.x.device)
        t0 = time.perf_counter()
        out = self.step()
        sync(self.x.device)
        seconds = time.perf_counter() - t0
        grads = None
        if self.mode == 'train':
            grads = {'x': self.x.grad} if self.x.requires_grad else {}
            grads.update({n: p.grad for n, p in self.module.named_parameters()
                          if p.requires_grad})
        return seconds, out.detach(), grads


def sync(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Correctness

def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """`riformer_kernels.testing.rel_err`, with a shape mismatch or a non-finite value counted
    as infinitely wrong (the benchmark reports the row as failed instead of stopping)."""
    try:
        return testing.rel_err(actual, expected)
    except AssertionError:
        return float('inf')


def compare(out, grads, ref_out, ref_grads) -> tuple[float, str]:
    """The largest relative error over the output and every gradient, and the tensor it is on."""
    worst, where = rel_err(out, ref_out), 'output'
    if grads is not None and ref_grads is not None:
        for name, ref in ref_grads.items():
            got = grads.get(name)
            if got is None:
                return float('inf'), f"grad {name} missing"
            err = rel_err(got, ref)
            if err > worst:
                worst, where = err, f"grad {name}"
    return worst, where


def tolerance(dtype: torch.dtype, eager_err: float) -> float:
    """fp32/fp64: 1e-4 relative, the project's bar, whatever eager scores. Half precision: twice
    the error of the eager reference run in the same dtype (what that dtype costs anyway), as
    flash-attention's Triton layer-norm tests do."""
    if dtype in (torch.float32, torch.float64):
        return 1e-4
    return 2 * eager_err


def reference_result(module, x, mode: str, backward, x_requires_grad: bool):
    """The float64 reference output and gradients (the oracle every implementation is checked
    against, eager included)."""
    impl = Impl('eager', 'eager')
    module64 = copy.deepcopy(module).to(torch.float64)
    runner = Runner(impl, module64, x.to(torch.float64), mode, backward, is_block=True,
                    x_requires_grad=x_requires_grad)
    _, out, grads = runner.first_call()
    return out, grads


def backend_supports(impl: Impl, module, x) -> str | None:
    if impl.kind != 'fused' or impl.backend == 'auto':
        return None
    backend = dispatch.get_backend(impl.backend)
    return backend.availability() or backend.supports(module, x)

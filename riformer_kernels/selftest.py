"""Quick end-to-end check of every usable backend on this machine against the float64 reference.

    python -m riformer_kernels.selftest [--device cpu|cuda] [--quick] [--interpreter]
                                        [--emulated]

For each backend `available_backends()` reports usable on the device (on CPU tensors the
interpreter-run triton backend only with --interpreter and the emulated cuda backend only with
--emulated: both are slow test vehicles), one block per case -- training and deploy form, NCHW
and channels_last, both memory modes, a drop-path draw, a small C (the flash / fused paths) and
a large one (two-GEMM / large-C paths) -- is run forward and backward, and the output and every
gradient are compared with the reference in float64 on the same parameters and input (with a
drop path: the reference in the backend's dtype, so both draw the same masks). A backend that
declines training (its `supports` says why) runs the same cases forward only, under no_grad,
and the line says so. Each line also names what `auto` would choose for the case. Then, for
each kernel set with a mixed-precision mode, an fp32 block under `torch.autocast` on the
device in each autocast dtype the kernel set declares (CPU: bf16, and fp16 where declared; CUDA:
fp16 and bf16), forward and backward against the same float64 reference: the output must stay
float32 (the reference's dtype under autocast). fp32 must agree to 1e-4 relative to each
tensor's scale; half precision (bf16, fp16 where the backend takes it, and the autocast cases)
to 3e-2. Prints one line per case and exits
1 if any case fails, 0 otherwise. Not a replacement for the test suite: a smoke test that fits
in seconds, so a freshly built install (or a GPU lent for minutes) can be checked at once.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

import riformer_kernels as rk
from riformer_kernels import dispatch, pipeline
from riformer_kernels.testing import randomize_, rel_err

# Relative to each tensor's scale, over the output and every gradient. fp32: the project's fp32
# gradient contract (1e-4; outputs meet 1e-5). Half precision: a smoke test's bound, not the
# suite's rule (which is twice the reference's own error over several seeds): bf16 has 8
# mantissa bits (2^-8 = 3.9e-3 per rounding) and the block rounds its output, the hidden and the
# gradients, so its error against fp64 is several such steps (1.1e-2 measured here at worst);
# a wrong kernel is off by order one. fp64: exact up to rounding.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2,
             torch.float64: 1e-10}
DTYPES = {'cpu': (torch.float32, torch.bfloat16, torch.float64),
          'triton': (torch.float32, torch.bfloat16, torch.float16),
          'cuda': (torch.float32, torch.float16, torch.bfloat16),
          'torch': (torch.float32,)}


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _run(block, x, g, backend, seed, train: bool, autocast: torch.dtype | None = None):
    block = copy.deepcopy(block)
    x = x.detach().clone().requires_grad_(train)
    torch.manual_seed(seed)
    with rk.use_backend(backend), torch.set_grad_enabled(train), _autocast(x.device, autocast):
        out = block(x)
    if not train:
        return out, {}
    out.backward(g)
    grads = {'x': x.grad, **{n: p.grad for n, p in block.named_parameters()}}
    return out, grads


def training_declined(backend: str, block, x: torch.Tensor,
                      autocast: torch.dtype | None = None) -> str | None:
    """Why `backend` does not train this block (its own `supports` on a grad-requiring input),
    or None when it does."""
    with torch.enable_grad(), _autocast(x.device, autocast):
        return dispatch.get_backend(backend).supports(block, x.detach().requires_grad_(True))


def autocast_dtypes(backend: str, device: torch.device) -> tuple:
    """The autocast dtypes whose mixed-precision mode `backend`'s kernel set declares, among
    those autocast runs on `device` (CPU autocast: bf16 and fp16; CUDA: fp16 and bf16)."""
    try:
        declared = pipeline.kernel_set(backend).mixed_precision
    except KeyError:   # not a kernel set (the torch fold, the reference)
        return ()
    order = ((torch.bfloat16, torch.float16) if device.type == 'cpu'
             else (torch.float16, torch.bfloat16))
    return tuple(d for d in order if d in declared)


def check_case(backend, device, dtype, c, hw, deploy, channels_last, recompute, drop_path,
               gen, autocast: torch.dtype | None = None) -> tuple[float, float, str, str | None]:
    """(worst relative error over output and gradients, its tolerance, what `auto` chooses,
    why the case ran forward only or None). autocast: run the fp32 block (dtype float32) under
    torch.autocast in that dtype; the tolerance is then the autocast dtype's."""
    block = randomize_(rk.RIFormerBlock(c, deploy=deploy, drop_path=drop_path,
                                        recompute=recompute), gen).train()
    x = torch.randn(4, c, hw, hw, generator=gen, dtype=torch.float64) * 1.5 + 0.3
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    xd = x.to(device, dtype)
    if channels_last:
        xd = xd.contiguous(memory_format=torch.channels_last)
    bd = copy.deepcopy(block).to(device, dtype)
    forward_only = training_declined(backend, bd, xd, autocast)
    train = forward_only is None
    with torch.set_grad_enabled(train), _autocast(device, autocast):
        auto = dispatch.choose_backend(bd, xd.requires_grad_(train)).backend.name
    # Drop-path masks are drawn in the block's dtype: with a drop path the reference runs in the
    # backend's dtype (same seed, same draws, the same masks), else in float64.
    ref_dtype = dtype if drop_path > 0 else torch.float64
    ref_out, ref_grads = _run(copy.deepcopy(block).to(device, ref_dtype),
                              x.to(device, ref_dtype), g.to(device, ref_dtype), 'reference',
                              seed=1, train=train)
    out, grads = _run(bd, xd, g.to(device, dtype), backend, seed=1, train=train,
                      autocast=autocast)
    if autocast is not None and out.dtype != torch.float32:
        raise TypeError(f"under autocast the block returned {out.dtype}; the reference "
                        f"returns float32 (its residual stream)")
    # rel_err raises on a non-finite value or a shape mismatch: the case is then reported FAIL
    worst = max([rel_err(out, ref_out)] + [rel_err(grads[k], ref_grads[k]) for k in ref_grads])
    return worst, TOLERANCE[autocast or dtype], auto, forward_only


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', choices=('cpu', 'cuda'),
                        default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--interpreter', action='store_true',
                        help="also run the triton backend on CPU tensors (needs "
                             "TRITON_INTERPRET=1 before the import; slow)")
    parser.add_argument('--emulated', action='store_true',
                        help="also run the cuda backend on CPU tensors through the SIMT emulator "
                             "(needs RIFORMER_CUDA_EMULATE=1 before the import; slow)")
    parser.add_argument('--quick', action='store_true', help="one dtype per backend")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"riformer_kernels {rk.__version__} | torch {torch.__version__} | device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == 'cuda' else ''))
    backends = []
    for name, info in rk.available_backends().items():
        if name == 'reference' or not info.usable:
            print(f"  skip {name}: {info.reason if not info.usable else 'the oracle'}")
            continue
        if name == 'triton' and device.type == 'cpu' and not args.interpreter:
            print("  skip triton on CPU tensors: the interpreter is a test vehicle (--interpreter)")
            continue
        if name == 'cuda' and device.type == 'cpu' and not args.emulated:
            # Usable on CPU tensors only under RIFORMER_CUDA_EMULATE=1: the emulator checks
            # every launch, slowly.
            print("  skip cuda on CPU tensors: the emulated kernels are a test vehicle "
                  "(--emulated)")
            continue
        if name == 'cpu' and device.type != 'cpu':
            continue
        backends.append(name)
    failures, cases, forward_only = 0, 0, {}
    gen = torch.Generator().manual_seed(0)
    for backend in backends:
        dtypes = DTYPES.get(backend, (torch.float32,))
        mixed = autocast_dtypes(backend, device)
        # (dtype, autocast): the backend's own dtypes, then fp32 blocks under autocast
        runs = [(d, None) for d in (dtypes[:1] if args.quick else dtypes)]
        runs += [(torch.float32, d) for d in (mixed[:1] if args.quick else mixed)]
        for dtype, autocast in runs:
            for c, hw in ((32, 7), (320, 3)):
                if backend == 'cuda' and device.type == 'cpu' and c > 64:
                    # Emulated, a C = 320 case takes minutes on one core (measured about 3 min
                    # forward + backward); the kernel tests cover several channel chunks.
                    print(f"  skip cuda C={c} on CPU tensors: too slow emulated")
                    continue
                cases_here = ((False, False, True, 0.0), (True, True, False, 0.0),
                              (False, True, True, 0.5))
                # Under autocast one case per width: the mixed mode, both forms and layouts
                # are the suite's (tests/test_autocast.py).
                for deploy, channels_last, recompute, drop_path in (
                        cases_here[:1] if autocast is not None else cases_here):
                    start = time.perf_counter()
                    try:
                        err, tol, auto, fwd_only = check_case(
                            backend, device, dtype, c, hw, deploy, channels_last, recompute,
                            drop_path, gen, autocast)
                        ok = err <= tol
                        detail = (f"max rel err {err:.2e} (tol {tol:.0e}) auto->{auto}"
                                  + (" (forward only)" if fwd_only else ''))
                        if fwd_only:
                            forward_only[backend] = fwd_only
                    except Exception as exc:  # report every case, not only the first failure
                        ok, detail = False, f"{type(exc).__name__}: {exc}"[:300]
                    cases += 1
                    failures += not ok
                    form = 'deploy' if deploy else 'train'
                    layout = 'channels_last' if channels_last else 'nchw'
                    mode = 'recompute' if recompute else 'save-u'
                    label = (str(dtype)[6:] if autocast is None
                             else f"autocast {str(autocast)[6:]}")
                    print(f"  {'ok  ' if ok else 'FAIL'} {backend:7s} {label:9s} C={c:<4d}"
                          f"{hw}x{hw} {form:6s} {layout:13s} {mode:9s} drop_path={drop_path}"
                          f"  {detail}  {time.perf_counter() - start:.1f}s", flush=True)
    for backend, why in forward_only.items():
        print(f"  {backend} ran forward only: {why}")
    print(f"{cases - failures} passed, {failures} failed")
    return 1 if failures or not cases else 0


if __name__ == '__main__':
    sys.exit(main())

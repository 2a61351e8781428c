"""Resources of the Triton kernels that actually launched, read from the compiled kernels.

    python -m riformer_kernels.tools.launched_kernels [--batch 8] [--dtypes bf16,fp32]
                                                      [--json FILE]

Runs the triton backend's forward and training step at the S12 stage shapes (C, HxW) = (64,
56x56), (128, 28x28), (320, 14x14), (512, 7x7), NCHW and channels_last, both memory modes,
then walks the kernel caches of every @triton.jit function of the backend and prints, per
compiled variant: the kernel, its constexprs and launch specialisation (the signature with
Triton's divisibility/equal-to-1 attributes), num_warps/num_stages, registers, spill bytes and
shared memory as the driver reports them after loading (`n_regs`, `n_spills`,
`metadata.shared`), and the count of vectorised and scalar global loads in its PTX. This is the
ground truth the GPU build report (`riformer_kernels.tools.gpu_build_report`, compiled ahead
of time without a GPU) must agree with. Needs a CUDA device; under TRITON_INTERPRET=1 nothing
is compiled, so it only runs the workload at small shapes (a dry run) and says so.
Exit status 1 if any launched variant spills.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from ..atomic import replacing
from .gpu_build_report import ptx_global_loads   # the same PTX count as the report

S12_STAGES = ((64, 56), (128, 28), (320, 14), (512, 7))
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def run_workload(device, dtypes, batch: int, stages=S12_STAGES) -> int:
    """Forward and training step of one randomised block per (stage, dtype, layout, mode)."""
    import riformer_kernels as rk

    runs = 0
    for c, hw in stages:
        for dtype in dtypes:
            block = rk.RIFormerBlock(c).to(device, dtype).train()
            with torch.no_grad():
                for p in block.parameters():
                    p.normal_(0, 0.5)
            for channels_last in (False, True):
                x = torch.randn(batch, c, hw, hw, device=device, dtype=dtype)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                x.requires_grad_(True)
                for recompute in (True, False):
                    block.recompute = recompute
                    with rk.use_backend('triton'):
                        block(x).float().square().mean().backward()
                    runs += 1
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return runs


def _jit_functions():
    import triton

    from ..backends.triton import backward_kernels, forward
    for module in (forward, backward_kernels):
        for name, obj in vars(module).items():
            if isinstance(obj, triton.runtime.jit.JITFunction):
                yield name, obj


def _by_name(fn, mapping) -> dict:
    """Triton keys constexprs and attributes by argument index paths, e.g. (3,): names."""
    out = {}
    for key, value in (mapping or {}).items():
        if isinstance(key, tuple) and len(key) == 1 and isinstance(key[0], int):
            key = fn.arg_names[key[0]]
        out[str(key)] = repr(value)
    return out


def collect() -> list[dict]:
    """One row per compiled variant in the kernel caches (any device)."""
    rows = []
    for name, fn in _jit_functions():
        for caches in getattr(fn, 'device_caches', {}).values():
            kernel_cache = caches[0]          # (kernel_cache, ..., binder) across Triton 3.x
            for kernel in list(kernel_cache.values()):
                if not hasattr(kernel, 'metadata'):
                    continue                  # an async compile still pending
                src = kernel.src
                md = kernel.metadata
                rows.append(dict(
                    kernel=name,
                    constexprs=_by_name(fn, getattr(src, 'constants', {})),
                    signature={str(k): str(v) for k, v in getattr(src, 'signature', {}).items()},
                    attrs=_by_name(fn, getattr(src, 'attrs', {})),
                    num_warps=md.num_warps, num_stages=getattr(md, 'num_stages', None),
                    arch=str(getattr(md.target, 'arch', '')),
                    registers=getattr(kernel, 'n_regs', None),
                    spills=getattr(kernel, 'n_spills', None), smem=md.shared,
                    **ptx_global_loads(kernel.asm['ptx'])))
    return rows


def _write_json(path: str, rows) -> None:
    """Atomically: a half-written file never replaces a good one."""
    with replacing(path) as tmp, open(tmp, 'w') as f:
        json.dump(rows, f, indent=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--dtypes', default='bf16,fp32')
    parser.add_argument('--json', help="write the rows to this file")
    args = parser.parse_args(argv)
    from ..backends.triton import forward

    dtypes = [DTYPES[d] for d in args.dtypes.split(',')]
    if forward.INTERPRET or not torch.cuda.is_available():
        runs = run_workload(torch.device('cpu'), dtypes[:1], 1, stages=((16, 3), (320, 2)))
        print(f"dry run: {runs} forward+backward runs under the interpreter; nothing is "
              f"compiled there, so there are no launched-kernel resources to read")
        rows = []
    else:
        runs = run_workload(torch.device('cuda'), dtypes, args.batch)
        rows = collect()
        for r in sorted(rows, key=lambda r: (r['kernel'], r['registers'] or 0)):
            consts = ' '.join(f"{k}={v}" for k, v in r['constexprs'].items()) or '-'
            print(f"{r['kernel']:26s} sm_{r['arch']:3s} w{r['num_warps']} regs {r['registers']} "
                  f"spills {r['spills']} smem {r['smem']} ld vector/scalar {r['ld_vector']}/"
                  f"{r['ld_scalar']} cp.async {r['cp_async']}  {consts}")
        print(f"{len(rows)} launched variants from {runs} forward+backward runs")
    if args.json:
        _write_json(args.json, rows)
    return 1 if any(r['spills'] for r in rows) else 0


if __name__ == '__main__':
    sys.exit(main())

"""Compile every GPU kernel for real GPUs (no GPU needed) and report registers, spills, smem.

    python -m riformer_kernels.tools.gpu_build_report [--archs 80 90] [--skip-cuda]
                                               [--only TEXT ...] [--json FILE]

Exit status: 0 when everything compiled with no spills (and no local-memory stack); 1 on a
compile failure or any spill; the table says which.

Triton kernels are discovered from a registry: each kernel module defines

    GPU_BUILD_SPECS = [(jit_fn, signature, constexprs, description[, options]), ...]

* `jit_fn`: the `@triton.jit` function;
* `signature`: {argument name: Triton type string} for the runtime arguments, e.g.
  {'x_ptr': '*fp16', 'C': 'i32'} (constexpr arguments may be left out: they are added);
* `constexprs`: {argument name: value} for every `tl.constexpr` argument;
* `description`: a short human name of the config (kernel, block sizes, dtype, warps);
* `options` (optional): compile options such as {'num_warps': 8, 'num_stages': 2}.

One entry per config the module's launch rule can choose, so the report covers everything that
can run. Modules read: `riformer_kernels.backends.triton.forward` and, when importable,
`riformer_kernels.backends.triton.backward` (any later module can be added to `SPEC_MODULES`). CUDA C++
kernels (csrc/cuda/*.cu) are added through `riformer_kernels.tools.nvcc_report.compile_cuda_report`
when that module exists.

The compile runs in a subprocess with TRITON_INTERPRET unset (the kernels must be defined with
the interpreter off), targets GPUTarget('cuda', arch, 32), and reads the resources with the
`ptxas -v` shipped in triton's nvidia backend on the generated PTX (registers, spill
stores/loads, stack) and from the compiled kernel's metadata (shared memory).
"""
from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SPEC_MODULES = ('riformer_kernels.backends.triton.forward', 'riformer_kernels.backends.triton.backward')
REQUIRED_SPEC_MODULES = ('riformer_kernels.backends.triton.forward',)
_ROOT = Path(__file__).resolve().parents[2]   # the repository (csrc/ beside the package)

_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")


def collect_specs(modules=SPEC_MODULES):
    """[(module name, spec tuple)] from every importable module's GPU_BUILD_SPECS."""
    specs = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            if name in REQUIRED_SPEC_MODULES:
                raise
            continue
        for spec in getattr(mod, 'GPU_BUILD_SPECS', ()):
            specs.append((name, spec))
    return specs


def _ptxas():
    import triton
    return str(Path(triton.__file__).parent / 'backends' / 'nvidia' / 'bin' / 'ptxas')


def ptxas_resources(ptx: str) -> dict:
    """Registers, spills and stack of the (single) kernel in `ptx`, from `ptxas -v`."""
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.MULTILINE).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, 'k.ptx')
        src.write_text(ptx)
        res = subprocess.run([_ptxas(), '-v', f'--gpu-name={arch}', str(src), '-o',
                              str(Path(tmp, 'k.cubin'))], capture_output=True, text=True,
                             timeout=300)
    text = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text[-2000:]}")
    frame, used = _FRAME.search(text), _USED.search(text)
    return dict(ptx_arch=arch, registers=int(used.group(1)) if used else 0,
                stack=int(frame.group(1)), spill_stores=int(frame.group(2)),
                spill_loads=int(frame.group(3)))


def compile_spec(spec, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, constexprs, desc = spec[:4]
    options = dict(spec[4]) if len(spec) > 4 else {}
    sig = dict(signature)
    for k in constexprs:
        sig.setdefault(k, 'constexpr')
    # The signature must list the arguments in the function's order.
    sig = {k: sig[k] for k in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget('cuda', arch, 32),
                            options=options)
    row = dict(kernel=fn.__name__, config=desc, arch=f'sm_{arch}',
               smem=int(kernel.metadata.shared), num_warps=kernel.metadata.num_warps)
    row.update(ptxas_resources(kernel.asm['ptx']))
    return row


def _selected(spec, only) -> bool:
    return not only or any(o in spec[3] or o in spec[0].__name__ for o in only)


def _worker(archs, only):
    rows, ok = [], True
    for module, spec in collect_specs():
        if not _selected(spec, only):
            continue
        for arch in archs:
            try:
                row = compile_spec(spec, arch)
                row['module'] = module
            except Exception as err:  # report every failure, not only the first
                ok = False
                row = dict(kernel=spec[0].__name__, config=spec[3], arch=f'sm_{arch}',
                           module=module, error=f"{type(err).__name__}: {err}"[:2000])
            print(json.dumps(row), flush=True)
            rows.append(row)
    return ok


def run_triton_report(archs=(80, 90), only=None) -> list[dict]:
    """Compile in a fresh interpreter with TRITON_INTERPRET unset; rows as dicts."""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    cmd = [sys.executable, '-m', 'riformer_kernels.tools.gpu_build_report', '--worker',
           '--archs', *map(str, archs)] + (['--only', *only] if only else [])
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(_ROOT))
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith('{')]
    if res.returncode != 0 and not any('error' in r for r in rows):
        rows.append(dict(kernel='(worker)', config='', arch='', module='',
                         error=f"worker exited {res.returncode}: {res.stderr[-3000:]}"))
    return rows


def run_cuda_report(archs=(80, 90)) -> list[dict]:
    try:
        nvcc_report = importlib.import_module('riformer_kernels.tools.nvcc_report')
    except ImportError:
        return []
    sources = sorted(glob.glob(str(_ROOT / 'csrc' / 'cuda' / '*.cu')))
    if not sources:
        return []
    try:
        rows = nvcc_report.compile_cuda_report(sources, archs=tuple(str(a) for a in archs))
    except Exception as err:
        return [dict(kernel='(nvcc)', config='', arch='', module='csrc/cuda',
                     error=f"{type(err).__name__}: {err}"[:2000])]
    out = []
    for r in rows:
        row = dict(r)
        row.setdefault('config', 'cuda')
        row.setdefault('module', 'csrc/cuda')
        out.append(row)
    return out


def row_failed(row: dict) -> bool:
    return ('error' in row or row.get('spill_stores', 0) > 0 or row.get('spill_loads', 0) > 0)


def format_table(rows) -> str:
    head = f"{'kernel':22} {'config':48} {'arch':7} {'regs':>4} {'spill st/ld':>11} " \
           f"{'stack':>5} {'smem':>7}"
    lines = [head, '-' * len(head)]
    for r in rows:
        if 'error' in r:
            lines.append(f"{r['kernel'][:22]:22} {r['config'][:48]:48} {r['arch']:7} "
                         f"COMPILE ERROR: {r['error'].splitlines()[0][:200]}")
            continue
        spill = f"{r.get('spill_stores', 0)}/{r.get('spill_loads', 0)}"
        lines.append(f"{r['kernel'][:22]:22} {str(r.get('config', ''))[:48]:48} {r['arch']:7} "
                     f"{r.get('registers', 0):4d} {spill:>11} {r.get('stack', 0):5d} "
                     f"{r.get('smem', 0):7d}")
    return '\n'.join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description='GPU build report: registers, spills, smem')
    ap.add_argument('--archs', nargs='+', type=int, default=[80, 90])
    ap.add_argument('--skip-cuda', action='store_true', help='Triton kernels only')
    ap.add_argument('--only', nargs='+', default=None,
                    help='only specs whose kernel name or config contains one of these texts')
    ap.add_argument('--json', default=None, help='also write the rows to this file')
    ap.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return 0 if _worker(a.archs, a.only) else 1
    rows = run_triton_report(a.archs, a.only)
    if not a.skip_cuda:
        rows += run_cuda_report(a.archs)
    print(format_table(rows))
    failed = [r for r in rows if row_failed(r)]
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if not rows:
        print("no kernels compiled")
        return 1
    print(f"\n{len(rows)} kernel builds, {len(failed)} failed (compile error or spills)")
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())

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



# ---------------------------------------------------------------------------------------------
# launched variants: what Triton's launcher compiles for the shapes users run
#
# The real launch code (forward.py's `_launch_*`, backward.py's op implementations) runs on
# `meta` tensors with every kernel object replaced by a recorder, so each launch gives
# (kernel, positional args, keyword args). Triton's own binder (`create_function_from_signature`
# with `native_specialize_impl`, what `JITFunction.run` calls) turns those into the signature,
# the constexprs (integers equal to 1 included, unless do_not_specialize) and the attributes
# (`tt.divisibility` 16 for integers % 16 == 0 and pointers with data_ptr % 16 == 0); the key
# (kernel, signature, constexprs, attrs, num_warps, num_stages) is what Triton caches a
# compiled kernel under, so distinct keys are distinct kernels.
#
# Data pointers: a tensor's allocation is taken as 16-byte aligned (torch's CUDA caching
# allocator aligns blocks to 512 bytes), so a pointer is aligned iff its storage offset in bytes
# is a multiple of 16 (views with offsets; none of the launches below passes one).

STAGE_ARCHS = ('s12', 's24', 's36', 'm36', 'm48')
RESOLUTIONS = (224, 384)              # input pixels; stage i has a (res / 4 / 2^i)^2 token grid
BATCHES = (1, 8, 64, 256)
LAYOUTS = ('nchw', 'cl')
_FWD_KERNELS = ('moments_kernel', 'fused_mlp_kernel', 'mlp_gemm1_kernel', 'mlp_gemm2_kernel')
_INTERP_FLAGS = ('DOT_FP32', 'DOT_F32', 'ROUND_BF16')     # interpreter-only: False on a GPU
# Output tiles (M, N) of each tl.dot per kernel, as constexpr names: a warp owns a multiple of
# 16x16 of an MMA's output, so num_warps > (M/16)(N/16) leaves warps duplicating that dot.
DOT_TILES = {
    'fused_mlp_kernel': (('BLOCK_T', 'BLOCK_H'), ('BLOCK_T', 'BLOCK_C')),
    'mlp_gemm1_kernel': (('BLOCK_T', 'BLOCK_H'),),
    'mlp_gemm2_kernel': (('BLOCK_T', 'BLOCK_C'),),
    '_mlp_dx_kernel': (('BLOCK_T', 'BLOCK_H'), ('BLOCK_T', 'BLOCK_C')),
    '_mlp_weight_grad_kernel': (('BLOCK_H', 'BLOCK_W'), ('BLOCK_T', 'BLOCK_H')),
    '_mlp_hidden_kernel': (('BLOCK_T', 'BLOCK_H'),),
    '_mlp_dz_chunk_kernel': (('BLOCK_T', 'BLOCK_C'),),
}


def stage_shapes(archs=STAGE_ARCHS, resolutions=RESOLUTIONS):
    """{(C, H, W): ['s12@224 stage 1', ...]} of every RIFormer stage (models.ARCH_SETTINGS)."""
    from riformer_kernels.models import ARCH_SETTINGS
    out = {}
    for arch in archs:
        for res in resolutions:
            for i, c in enumerate(ARCH_SETTINGS[arch]['embed_dims']):
                side = res // 4 // 2 ** i
                out.setdefault((c, side, side), []).append(f"{arch}@{res} stage {i + 1}")
    return out


class _Pointer:
    """What the binder sees of a tensor: its dtype and an address that is 16-byte aligned iff
    the view's byte offset is (allocations themselves aligned)."""

    def __init__(self, t):
        self.dtype = t.dtype
        self._ptr = (1 << 20) + t.storage_offset() * t.element_size()

    def data_ptr(self):
        return self._ptr


def _binder(fn):
    import inspect
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import KernelParam, create_function_from_signature
    py = fn.fn
    dns = getattr(fn, 'do_not_specialize', None)
    dns_oa = getattr(fn, 'do_not_specialize_on_alignment', None)
    if dns is None:       # InterpretedFunction keeps the decorator's arguments in kwargs
        dns = (getattr(fn, 'kwargs', {}) or {}).get('do_not_specialize') or ()
        dns_oa = (getattr(fn, 'kwargs', {}) or {}).get('do_not_specialize_on_alignment') or ()
    sig = inspect.signature(py)
    params = [KernelParam(i, p, i in dns or p.name in dns, i in (dns_oa or ()) or p.name in
                          (dns_oa or ())) for i, p in enumerate(sig.parameters.values())]
    return create_function_from_signature(sig, params, BaseBackend)


def launch_key(fn, args, kwargs):
    """(signature, constexprs, attrs, options) Triton's launcher derives from one launch:
    signature {name: type}, constexprs {name: value}, attrs {name: [['tt.divisibility', 16]]}
    (names instead of Triton's index paths), options {num_warps, num_stages}."""
    import torch
    from triton.backends.compiler import BaseBackend
    wrap = lambda v: _Pointer(v) if isinstance(v, torch.Tensor) else v
    binder = _binder(fn)
    bound, spec, options = binder(*map(wrap, args), **{k: wrap(v) for k, v in kwargs.items()})
    names = list(bound)
    sig, const, attrs = {}, {}, {}
    for name, (ty, attr) in zip(names, spec):
        sig[name] = ty
        if ty == 'constexpr':
            const[name] = bound[name]
        elif isinstance(attr, str):
            parsed = BaseBackend.parse_attr(attr)
            if parsed:
                attrs[name] = parsed
    for k in _INTERP_FLAGS:
        if k in const:
            const[k] = False
    opts = {k: options[k] for k in ('num_warps', 'num_stages') if k in options}
    return sig, const, attrs, opts


def _freeze(d):
    return tuple(sorted((k, repr(v)) for k, v in d.items()))


class _Recorder:
    def __init__(self, fn, sink, context):
        self.fn, self.sink, self.context = fn, sink, context

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((self.fn, args, kwargs, dict(self.context)))
        return launch


def record_launches(calls):
    """Run `calls()` (which calls the real launch code) with every kernel of forward.py and
    backward.py recorded instead of launched; [(kernel, args, kwargs, context)]. The modules'
    INTERPRET flag is off meanwhile, so the launch code picks the GPU's dot flags."""
    from riformer_kernels.backends.triton import backward as tb
    from riformer_kernels.backends.triton import forward as tf
    sink, context = [], {}
    saved = []
    try:
        for mod, names in ((tf, _FWD_KERNELS), (tb, tuple(tb._STRIDE_ARGS))):
            saved.append((mod, 'INTERPRET', mod.INTERPRET))
            mod.INTERPRET = False
            for name in names:
                saved.append((mod, name, getattr(mod, name)))
                setattr(mod, name, _Recorder(getattr(mod, name), sink, context))
        calls(context)
    finally:
        for mod, name, value in reversed(saved):
            setattr(mod, name, value)
    return sink


def _block_calls(n, c, hh, ww, dtype, layout, context, label):
    """One block's forward (with and without u) and both backward memory modes as the pipeline
    runs them (pipeline.py / backends/triton/__init__.py), on meta tensors. `dtype` is a torch
    dtype, or (x's dtype, the GEMM dtype) for autocast's mixed-precision calls: fp32 x, g and
    biases, the MLP weights in the GEMM dtype (pipeline.AutocastPlan)."""
    import torch
    from riformer_kernels.backends.triton import backward as tb
    from riformer_kernels.backends.triton import forward as tf
    dtype, gemm_dtype = dtype if isinstance(dtype, tuple) else (dtype, dtype)
    meta = dict(device='meta')
    fmt = torch.channels_last if layout == 'cl' else torch.contiguous_format
    x = torch.empty((n, c, hh, ww), dtype=dtype, **meta).contiguous(memory_format=fmt)
    g = torch.empty_like(x)
    hid = 4 * c
    f32 = lambda *s: torch.empty(s, dtype=torch.float32, **meta)
    w1 = torch.empty((hid, c, 1, 1), dtype=gemm_dtype, **meta)
    w2 = torch.empty((c, hid, 1, 1), dtype=gemm_dtype, **meta)
    b1, b2 = torch.empty(hid, dtype=dtype, **meta), torch.empty(c, dtype=dtype, **meta)
    A, B, a, b, mean = (f32(n, c) for _ in range(5))
    P, Q, R, S = (f32(n, c) for _ in range(4))
    # l2: layer scale expanded over samples (stride 0), or times per-sample drop-path factors
    for l2, dp in ((f32(1, c).expand(n, c), ''), (f32(n, c), ' drop-path')):
        us = {}
        for save_u in (False, True):
            context.update(shape=label, phase='forward' + (' +u' if save_u else '') + dp)
            tf._launch_moments(x)
            us[save_u] = tf._launch_mlp(x, A, B, a, b, l2, w1, b1, w2, b2, save_u)[3]
        for save_u in (False, True):
            u = us[True] if save_u else None
            context.update(shape=label, phase='backward' + (' u_saved' if save_u else '') + dp)
            args = (mean, A, B, w1, b1, w2, b2, l2, u)
            if tb._large_path(c, gemm_dtype):
                dz, _, _, hs, dus, db1p = tb._backward_dz_impl(g, x, *args)
                tb._backward_weights_dx_impl(g, x, dz, *args, hs, dus, db1p, P, Q, R, S)
            else:
                tb._backward_weights_sums_impl(g, x, *args)
                tb._backward_dx_impl(g, x, *args, P, Q, R, S)
        if not dp:     # entry points outside the training step (mlp_backward, input_grad)
            context.update(shape=label, phase='api')
            tb._mlp_backward_impl(g, x, mean, A, B, w1, b1, w2, b2, l2, None)
            tb._input_grad_impl(g, torch.empty_like(x), x, mean, P, Q, R, S)


def _short(v):
    return {True: 'T', False: 'F'}.get(v, v) if isinstance(v, bool) else v


def describe_variant(fn_name, sig, const, attrs, opts):
    """Short config text: dtype, layout, block constexprs, modes, warps/stages, and the runtime
    ints/pointers *without* divisibility 16 (the unaligned ones) in brackets."""
    x_ty = next((sig[k] for k in ('x_ptr', 'p_ptr') if k in sig), '')
    dtype = x_ty.lstrip('*') if x_ty != 'constexpr' else ''
    w_ty = sig.get('w1_ptr', sig.get('w2_ptr', '')).lstrip('*')
    if dtype and w_ty and w_ty != dtype:      # autocast's mixed precision: x fp32, weights half
        dtype += f'+w{w_ty}'
    unit_c = [k for k in ('stride_xc', 'sxc', 'sgc') if const.get(k) == 1]
    unit_t = [k for k in ('stride_xt', 'sxt', 'sgt') if const.get(k) == 1]
    stride = lambda k: k.startswith('stride_') or (len(k) == 3 and k[0] == 's')
    layout = 'cl' if unit_c else ('nchw' if unit_t else '-')
    blocks = ' '.join(f"{k.replace('BLOCK_', '')}{v}" for k, v in const.items()
                      if k.startswith('BLOCK'))
    flags = ' '.join(f"{k}={_short(v)}" for k, v in const.items()
                     if k in ('SAVE_U', 'HAS_U', 'SCRATCH', 'SUMS', 'FUSE_DX') and v)
    prec = const.get('INPUT_PRECISION', const.get('PRECISION'))
    ones = [k for k, v in const.items() if v == 1 and not isinstance(v, bool)
            and not stride(k) and not k.startswith('BLOCK')]
    plain = [k for k, t in sig.items() if t != 'constexpr' and k not in attrs
             and not t.startswith(('fp', 'bf', 'u1'))]
    text = f"{dtype} {layout} {blocks}"
    if flags:
        text += ' ' + flags
    if prec == 'tf32x3':
        text += ' tf32x3'
    text += f" w{opts.get('num_warps', 4)}s{opts.get('num_stages', 3)}"
    if ones:
        text += ' =1:' + ','.join(ones)
    text += ' [' + ','.join(plain) + ']'
    return text


def launched_variants(shapes=None, batches=BATCHES, dtypes=None, layouts=LAYOUTS):
    """Distinct kernels the launcher compiles for `shapes` ({(C, H, W): [labels]}, default every
    stage of every model, `stage_shapes`) x batches x dtypes x layouts, forward and backward,
    both memory modes. A list of dicts: kernel (the jit function), name, signature, constexprs,
    attrs, options, desc, and `shapes` (every 'label N=.. dtype layout phase' producing it).
    Pure: nothing is compiled or launched."""
    import torch
    shapes = stage_shapes() if shapes is None else shapes
    # Plain dtypes and autocast's mixed calls (fp32 x, half GEMM operands).
    dtypes = dtypes or (torch.float32, torch.float16, torch.bfloat16,
                        (torch.float32, torch.float16), (torch.float32, torch.bfloat16))
    names = {torch.float32: 'fp32', torch.float16: 'fp16', torch.bfloat16: 'bf16'}

    def tn(dtype):
        return '+'.join(names[d] for d in dtype) if isinstance(dtype, tuple) else names[dtype]

    def calls(context):
        for (c, hh, ww), labels in shapes.items():
            for n in batches:
                for dtype in dtypes:
                    for layout in layouts:
                        label = f"{labels[0]} N={n} {tn(dtype)} {layout} ({c}x{hh}x{ww})"
                        _block_calls(n, c, hh, ww, dtype, layout, context, label)

    variants = {}
    for fn, args, kwargs, ctx in record_launches(calls):
        sig, const, attrs, opts = launch_key(fn, args, kwargs)
        key = (fn.__name__, _freeze(sig), _freeze(const), _freeze(attrs), _freeze(opts))
        v = variants.get(key)
        if v is None:
            v = variants[key] = dict(kernel=fn, name=fn.__name__, signature=sig, constexprs=const,
                                     attrs=attrs, options=opts, shapes=[],
                                     desc=describe_variant(fn.__name__, sig, const, attrs, opts))
        where = f"{ctx.get('shape')} {ctx.get('phase')}"
        if where not in v['shapes']:
            v['shapes'].append(where)
    out = sorted(variants.values(), key=lambda v: (v['name'], v['desc']))
    for v in out:
        v['warp_tiles'] = warp_tiles(v['name'], v['constexprs'])
    return out


def warp_tiles(name, const):
    """Smallest number of 16x16 output tiles among the kernel's dots (None: no dot)."""
    dots = DOT_TILES.get(name)
    if not dots:
        return None
    return min((const[m] // 16) * (const[n] // 16) for m, n in dots)


def _variant_spec(v):
    """The variant as a (fn, signature, constexprs, description, options, attrs) build spec."""
    return (v['kernel'], v['signature'], v['constexprs'], v['desc'], v['options'], v['attrs'])


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
    options = dict(spec[4]) if len(spec) > 4 and spec[4] else {}
    attrs = spec[5] if len(spec) > 5 else {}
    sig = dict(signature)
    for k in constexprs:
        sig.setdefault(k, 'constexpr')
    # The signature must list the arguments in the function's order.
    sig = {k: sig[k] for k in fn.arg_names}
    index = {k: (fn.arg_names.index(k),) for k in fn.arg_names}
    src = ASTSource(fn, sig, {index[k]: v for k, v in constexprs.items()},
                    {index[k]: v for k, v in attrs.items()})
    kernel = triton.compile(src, target=GPUTarget('cuda', arch, 32), options=options)
    row = dict(kernel=fn.__name__, config=desc, arch=f'sm_{arch}',
               smem=int(kernel.metadata.shared), num_warps=kernel.metadata.num_warps)
    row.update(ptxas_resources(kernel.asm['ptx']))
    row.update(ptx_global_loads(kernel.asm['ptx']))
    return row


_LD = re.compile(r"^\s*(?:@!?%p\d+\s+)?ld\.global((?:\.\w+)*)\s", re.MULTILINE)
_CP_ASYNC = re.compile(r"^\s*(?:@!?%p\d+\s+)?cp\.async\.(?:ca|cg)\.shared\.global", re.MULTILINE)
_TMA = re.compile(r"^\s*(?:@!?%p\d+\s+)?cp\.async\.bulk", re.MULTILINE)


def ptx_global_loads(ptx: str) -> dict:
    """Static global-load instructions in the PTX: vector (ld.global.v2/.v4), scalar (plain
    ld.global), asynchronous copies to shared memory (cp.async, 4-16 bytes each) and TMA bulk
    copies (cp.async.bulk)."""
    vec = scalar = 0
    for m in _LD.finditer(ptx):
        if '.v2' in m.group(1) or '.v4' in m.group(1) or '.v8' in m.group(1):
            vec += 1
        else:
            scalar += 1
    return dict(ld_vector=vec, ld_scalar=scalar, cp_async=len(_CP_ASYNC.findall(ptx)),
                tma=len(_TMA.findall(ptx)))


def _selected(spec, only) -> bool:
    full = f"{spec[0].__name__} {spec[3]}"
    return not only or any(o in full for o in only)


def _build_list(mode, only):
    """[(module or 'launched', spec)] to compile: the launched variants (default) or the modules'
    GPU_BUILD_SPECS (mode 'specs': one config per table entry, no alignment attributes)."""
    if mode == 'specs':
        items = collect_specs()
    else:
        items = [('launched', _variant_spec(v) + (v,)) for v in launched_variants()]
    return [(m, s) for m, s in items if _selected(s, only)]


_JOBS = []


def _compile_job(i):
    module, spec, arch = _JOBS[i]
    try:
        row = compile_spec(spec, arch)
    except Exception as err:  # report every failure, not only the first
        row = dict(kernel=spec[0].__name__, config=spec[3], arch=f'sm_{arch}',
                   error=f"{type(err).__name__}: {err}"[:2000])
    row['module'] = module
    if len(spec) > 6:
        v = spec[6]
        row['warp_tiles'] = v['warp_tiles']
        row['shapes'] = len(v['shapes'])
        row['example'] = v['shapes'][0]
    return row


def _worker(archs, only, mode='launched', jobs=1):
    import multiprocessing
    _JOBS[:] = [(m, s, a) for m, s in _build_list(mode, only) for a in archs]
    ok = True
    if jobs > 1 and len(_JOBS) > 1:
        pool = multiprocessing.get_context('fork').Pool(jobs)
        rows = pool.imap(_compile_job, range(len(_JOBS)))
    else:
        pool, rows = None, map(_compile_job, range(len(_JOBS)))
    for row in rows:
        ok = ok and 'error' not in row
        print(json.dumps(row), flush=True)
    if pool is not None:
        pool.close()
    return ok


def run_triton_report(archs=(80, 90), only=None, mode='launched', jobs=1) -> list[dict]:
    """Compile in a fresh interpreter with TRITON_INTERPRET unset; rows as dicts."""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    cmd = [sys.executable, '-m', 'riformer_kernels.tools.gpu_build_report', '--worker',
           '--archs', *map(str, archs), '--jobs', str(jobs)] + (['--only', *only] if only else [])
    if mode == 'specs':
        cmd.append('--specs')
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(_ROOT))
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith('{')]
    if res.returncode != 0 and not any('error' in r for r in rows):
        rows.append(dict(kernel='(worker)', config='', arch='', module='',
                         error=f"worker exited {res.returncode}: {res.stderr[-3000:]}"))
    return rows


def list_launched(only=None) -> str:
    """The launched variants (no compile): kernel, config, the number of (shape, batch, dtype,
    layout, phase) launches producing it and the first of them."""
    lines = []
    for v in launched_variants():
        if _selected(_variant_spec(v), only):
            lines.append(f"{v['name']:24} {v['desc']}\n    {len(v['shapes'])} launches, e.g. "
                         f"{v['shapes'][0]}")
    lines.append(f"{len(lines)} launched variants")
    return '\n'.join(lines)


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
    return ('error' in row or row.get('spill_stores', 0) > 0 or row.get('spill_loads', 0) > 0
            or row.get('stack', 0) > 0)


def warps_duplicate(row: dict) -> bool:
    """More warps than 16x16 output tiles in one of the kernel's dots (see DOT_TILES)."""
    tiles = row.get('warp_tiles')
    return tiles is not None and row.get('num_warps', 0) > tiles


def format_table(rows) -> str:
    head = f"{'kernel':22} {'config':64} {'arch':6} {'regs':>4} {'spill st/ld':>11} " \
           f"{'stack':>5} {'smem':>6} {'ld v/s':>7} {'cp.as':>5} {'tiles/w':>7}"
    lines = [head, '-' * len(head)]
    for r in rows:
        if 'error' in r:
            lines.append(f"{r['kernel'][:22]:22} {r['config'][:64]:64} {r['arch']:6} "
                         f"COMPILE ERROR: {r['error'].splitlines()[0][:200]}")
            continue
        spill = f"{r.get('spill_stores', 0)}/{r.get('spill_loads', 0)}"
        loads = f"{r.get('ld_vector', 0)}/{r.get('ld_scalar', 0)}" if 'ld_scalar' in r else ''
        tw = ''
        if r.get('warp_tiles') is not None:
            tw = f"{r['warp_tiles']}/{r.get('num_warps', 0)}" + ('!' if warps_duplicate(r) else '')
        lines.append(f"{r['kernel'][:22]:22} {str(r.get('config', ''))[:64]:64} {r['arch']:6} "
                     f"{r.get('registers', 0):4d} {spill:>11} {r.get('stack', 0):5d} "
                     f"{r.get('smem', 0):6d} {loads:>7} {r.get('cp_async', 0):5d} {tw:>7}")
    return '\n'.join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description='GPU build report: registers, spills, smem')
    ap.add_argument('--archs', nargs='+', type=int, default=[80, 90])
    ap.add_argument('--skip-cuda', action='store_true', help='Triton kernels only')
    ap.add_argument('--only', nargs='+', default=None,
                    help='only variants whose kernel name or config contains one of these texts')
    ap.add_argument('--json', default=None, help='also write the rows to this file')
    ap.add_argument('--launched', action='store_true',
                    help='list the launched variants and the shapes producing them; no compile')
    ap.add_argument('--specs', action='store_true',
                    help="compile the modules' GPU_BUILD_SPECS (no alignment) instead of the "
                         "launched variants")
    ap.add_argument('--jobs', type=int, default=1, help='parallel compiles')
    ap.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    mode = 'specs' if a.specs else 'launched'
    if a.worker:
        return 0 if _worker(a.archs, a.only, mode, a.jobs) else 1
    if a.launched:
        print(list_launched(a.only))
        return 0
    rows = run_triton_report(a.archs, a.only, mode, a.jobs)
    if not a.skip_cuda:
        rows += run_cuda_report(a.archs)
    print(format_table(rows))
    failed = [r for r in rows if row_failed(r)]
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if not rows:
        print("no kernels compiled")
        return 1
    dup = sum(warps_duplicate(r) for r in rows)
    print(f"\n{len(rows)} kernel builds, {len(failed)} failed (compile error, spills or stack); "
          f"{dup} with more warps than 16x16 tiles in a dot ('!')")
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())

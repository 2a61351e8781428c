"""The CUDA kernels of csrc/cuda run on the CPU through the SIMT emulator (RIFORMER_CUDA_EMULATE=1).

Set RIFORMER_CUDA_EMULATE=1 before importing riformer_kernels (as TRITON_INTERPRET=1 for
Triton): the `cuda` kernel set then runs on CPU tensors, every kernel launch going through
csrc/emu/cuda_emu.h, which checks shared-memory races, uninitialised reads, barrier misuse and
bounds as it runs. It is slow (a test tool, not a fast path).

The build: csrc/emu/emulated_kernels.cpp (extern "C" launch wrappers that include the kernel
headers csrc/cuda/*.cuh, the very sources nvcc compiles) is compiled by g++ with the flags of
csrc/emu/FLAGS plus -fPIC -shared, at first use, into a shared library loaded with ctypes. The
library is cached under $RIFORMER_EMU_CACHE (default ~/.cache/riformer_kernels/emu), named by a
hash of every source it depends on, the flags and the compiler's version: a changed kernel
rebuilds, an unchanged one loads in milliseconds. It is written to a temporary name in the
cache directory and renamed into place (os.replace), so a concurrent or interrupted build never
leaves a partial library under the final name.

The wrappers here take CPU tensors, check them (ValueError/TypeError naming the problem),
allocate the outputs NaN-poisoned and pass data pointers, sizes and strides to the library.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import NamedTuple

import torch

from ..atomic import replacing

ENV_FLAG = 'RIFORMER_CUDA_EMULATE'
ENABLED = os.environ.get(ENV_FLAG, '0') not in ('', '0')
ABI_VERSION = 6

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / 'csrc'
ENTRY = CSRC / 'emu' / 'emulated_kernels.cpp'
# What a GPU would be sized as: the moments launch plan splits H*W by the SM count, so the
# emulator runs the split such a GPU gets (an H100 SXM has 132 SMs).
DEFAULT_SMS = 132
# The emulator's dynamic shared memory limit (227 KiB, as on sm_90).
MAX_DYNAMIC_SMEM = 227 * 1024

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
SUPPORTED_DTYPES = tuple(_DTYPE_CODES)
# The weight dtypes of the mixed-precision mode (fp32 activations; what autocast runs,
# riformer_kernels.pipeline.AutocastPlan): the GEMMs' operand dtype differs from x's.
MIXED_WEIGHT_DTYPES = (torch.float16, torch.bfloat16)

_lock = threading.Lock()   # one launch at a time: the emulator's state is process-wide
_lib = None


def compiler() -> str | None:
    return shutil.which(os.environ.get('CXX', 'g++'))


def availability() -> str | None:
    """None when the `cuda` kernel set runs emulated in this process, else why not."""
    if not ENABLED:
        return f"{ENV_FLAG}=1 was not set before riformer_kernels was imported"
    return build_availability()


def build_availability() -> str | None:
    """None when the emulated build can be made here, else why not. The wrappers below work
    without RIFORMER_CUDA_EMULATE (the kernel tests call them directly); the variable decides
    only whether the `cuda` backend runs blocks through them."""
    if not ENTRY.is_file():
        return f"the kernel sources (csrc/) are not next to the package (looked for {ENTRY})"
    if compiler() is None:
        return "no C++ compiler (g++) found: the emulated build compiles csrc/cuda with it"
    return None


def _sources() -> list[Path]:
    # Everything the build reads: a change in any of them must change the cache key.
    files = [CSRC / 'emu' / 'FLAGS', CSRC / 'emu' / 'cuda_emu.h', CSRC / 'emu' / 'gcc_wrap.py',
             ENTRY]
    files += sorted((CSRC / 'cuda').glob('*.cuh'))
    files += sorted((CSRC / 'common').glob('*.h'))
    return files


def _flags() -> list[str]:
    return (CSRC / 'emu' / 'FLAGS').read_text().split() + ['-fPIC', '-shared']


def cache_dir() -> Path:
    env = os.environ.get('RIFORMER_EMU_CACHE')
    return Path(env) if env else Path.home() / '.cache' / 'riformer_kernels' / 'emu'


def build_key() -> str:
    cxx = compiler()
    h = hashlib.sha256()
    version = subprocess.run([cxx, '--version'], capture_output=True, text=True).stdout
    for part in (cxx, version, ' '.join(_flags()), str(ABI_VERSION)):
        h.update(part.encode() + b'\0')
    for f in _sources():
        h.update(str(f.relative_to(ROOT)).encode() + b'\0' + f.read_bytes() + b'\0')
    return h.hexdigest()[:24]


def library_path() -> Path:
    """Where the library for the current sources lives (built there by `build` if missing)."""
    return cache_dir() / f'riformer_emu_{build_key()}.so'


def build() -> Path:
    """Compile the emulated kernels unless the cache already holds this exact build."""
    why = build_availability()
    if why is not None:
        raise RuntimeError(f"the emulated CUDA build is unavailable: {why}")
    path = library_path()
    if path.is_file():
        return path
    with replacing(path, suffix='.so') as tmp:
        # FLAGS names its files relative to the repository root: compile from there.
        cmd = [compiler()] + _flags() + [str(ENTRY.relative_to(ROOT)), '-o', tmp]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"the emulated CUDA build failed:\n{' '.join(cmd)}\n"
                               f"{r.stderr[-6000:]}")
    return path


def library():
    """The loaded library (built at the first call)."""
    global _lib
    with _lock:
        if _lib is None:
            lib = ctypes.CDLL(str(build()))
            if lib.riformer_emu_abi_version() != ABI_VERSION:
                raise RuntimeError("the emulated CUDA library has another ABI version")
            i64, ptr, cstr = ctypes.c_int64, ctypes.c_void_p, ctypes.c_char_p
            lib.riformer_emu_moments.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ctypes.c_int,
                                                 ctypes.c_int, ptr, ptr, cstr, ctypes.c_size_t]
            lib.riformer_emu_mlp_forward.argtypes = [ctypes.c_int, ctypes.c_int, ptr, ptr, ptr,
                                                     ptr, ptr, ctypes.c_int, ctypes.c_int, ptr,
                                                     ptr, ptr, cstr, ctypes.c_size_t]
            lib.riformer_emu_mlp_plan.argtypes = [i64, i64, ctypes.c_int, ctypes.c_int,
                                                  ctypes.c_int, ctypes.POINTER(i64)]
            lib.riformer_emu_set_seed.argtypes = [ctypes.c_uint64]
            lib.riformer_emu_count_bytes.argtypes = [ctypes.c_int]
            lib.riformer_emu_bytes_log_size.restype = i64
            lib.riformer_emu_bytes_log_entry.argtypes = [i64, cstr, ctypes.c_size_t,
                                                         ctypes.POINTER(ctypes.c_uint64)]
            _lib = lib
        return _lib


class EmulatorError(RuntimeError):
    """The emulated library failed a launch: an emulator check (race, uninitialised shared
    read, barrier, bounds) or a launch it refused (the message says which)."""


def _call(fn, *args):
    err = ctypes.create_string_buffer(4096)
    with _lock:
        rc = fn(*args, err, len(err))
    if rc != 0:
        raise EmulatorError(err.value.decode(errors='replace'))


def set_seed(seed: int) -> None:
    """Base seed of the emulator's thread scheduling order (results must not depend on it)."""
    lib = library()
    with _lock:
        lib.riformer_emu_set_seed(int(seed))


class LaunchBytes(NamedTuple):
    """Global-memory bytes of one emulated launch, in three models (csrc/emu/cuda_emu.h,
    LaunchBytes): every request; distinct bytes per CTA, summed; distinct bytes of the launch
    (the DRAM model the Triton counter uses)."""
    kernel: str
    read_requests: int
    write_requests: int
    read_per_cta: int
    write_per_cta: int
    read_distinct: int
    write_distinct: int


class _ByteLog(list):
    """Filled with a LaunchBytes per launch when the `counting_global_bytes` block ends."""


@contextlib.contextmanager
def counting_global_bytes():
    """Count the global-memory traffic of every emulated launch inside the block:

        with cuda_emu.counting_global_bytes() as log:
            cuda_emu.mlp_forward(...)
        sum(e.read_distinct + e.write_distinct for e in log)

    Global: every access that is neither shared memory nor the thread's own stack."""
    lib = library()
    log = _ByteLog()
    with _lock:
        lib.riformer_emu_count_bytes(1)
    try:
        yield log
    finally:
        with _lock:
            lib.riformer_emu_count_bytes(0)
            name = ctypes.create_string_buffer(512)
            counts = (ctypes.c_uint64 * 6)()
            for i in range(lib.riformer_emu_bytes_log_size()):
                lib.riformer_emu_bytes_log_entry(i, name, len(name), counts)
                log.append(LaunchBytes(name.value.decode(errors='replace'), *counts))


def _check_x(x, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{what}: expected a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.device.type != 'cpu':
        raise ValueError(f"{what}: the emulated CUDA kernels take CPU tensors, got {x.device}")
    if x.dtype not in _DTYPE_CODES:
        raise TypeError(f"{what}: expected float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.shape[2] * x.shape[3] == 0 and x.shape[0] * x.shape[1] > 0:
        raise ValueError(f"{what}: H*W must be positive, got shape {tuple(x.shape)}")


def layout(x: torch.Tensor) -> str | None:
    """'nchw' or 'channels_last' when the kernels read x as it is, else None (copy first).
    NCHW wins where both hold (C == 1 or H*W == 1), as in the other backends."""
    if x.is_contiguous():
        return 'nchw'
    if x.is_contiguous(memory_format=torch.channels_last):
        return 'channels_last'
    return None


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gemm_dtype(what: str, x: torch.Tensor, weights: dict) -> torch.dtype:
    """The dtype the MLP's GEMMs run in: the weights' (w1 and w2 alike), which is x's, or
    fp16/bf16 for fp32 x (the mixed-precision mode). The biases are always in x's dtype (they
    are added to fp32 accumulators). Raises TypeError naming the offending tensor otherwise."""
    w1 = weights['w1']
    op = w1.dtype if isinstance(w1, torch.Tensor) else x.dtype
    if op != x.dtype and not (x.dtype == torch.float32 and op in MIXED_WEIGHT_DTYPES):
        op = x.dtype   # not a mode the kernels have: report against x's dtype below
    for name, t in weights.items():
        if not isinstance(t, torch.Tensor):
            continue   # the shape checks name it
        want = op if name in ('w1', 'w2') else x.dtype
        if t.dtype != want or t.device != x.device:
            mixed = (f" (or both fp16/bf16 for float32 x: the mixed-precision mode)"
                     if name in ('w1', 'w2') else "")
            raise TypeError(f"{what}: {name} is {t.dtype} on {t.device}; the kernels take it in "
                            f"{want} on {x.device}: w1 and w2 in x's dtype{mixed}, b1 and b2 "
                            f"in x's dtype")
    return op


def moments(x: torch.Tensor, sms: int = DEFAULT_SMS):
    """Per-(n,c) mean and population variance over H*W (statistics dtype), by the two-stage
    moments kernels of csrc/cuda/moments_kernels.cuh, launched as on a GPU with `sms` SMs."""
    _check_x(x, 'moments')
    if not isinstance(sms, int) or sms < 1:
        raise ValueError(f"moments: sms must be a positive int, got {sms!r}")
    lay = layout(x)
    if lay is None:
        x = x.contiguous()
        lay = 'nchw'
    n, c, h, w = x.shape
    sd = stats_dtype(x.dtype)
    mean = torch.full((n, c), float('nan'), dtype=sd)
    var = torch.full((n, c), float('nan'), dtype=sd)
    if mean.numel() == 0:
        return mean, var
    _call(library().riformer_emu_moments, _DTYPE_CODES[x.dtype], x.data_ptr(), n, c, h * w,
          int(lay == 'channels_last'), sms, mean.data_ptr(), var.data_ptr())
    return mean, var


MLP_KERNELS = ('auto', 'ffma', 'mma')
MLP_PATHS = ('auto', 'fused', 'two_gemm')


class MlpPlan(NamedTuple):
    """How the MLP forward runs a shape (csrc/cuda/mlp_forward_kernels.cuh, plan_mlp): the
    kernel ('mma' tensor cores or 'ffma'), the path ('fused': one launch; 'two_gemm': a hidden
    launch writing h, then an output launch), and the dynamic shared memory per CTA of the
    fused/output launch and of the hidden launch (0 when fused), and the tokens a CTA takes
    (the token tile of the output's partial moments)."""
    kernel: str
    path: str
    smem: int
    smem_hidden: int
    tile_tokens: int


def mlp_plan(c: int, hidden: int, dtype: torch.dtype, kernel: str = 'auto',
             path: str = 'auto') -> MlpPlan:
    """The plan a launch of this shape gets. kernel 'auto': tensor cores where they can run
    (fp16/bf16 with C and hidden multiples of 16); path 'auto': the large-C rule
    (prefer_two_gemm)."""
    if kernel not in MLP_KERNELS:
        raise ValueError(f"unknown MLP kernel {kernel!r}; choose one of {MLP_KERNELS}")
    if path not in MLP_PATHS:
        raise ValueError(f"unknown MLP path {path!r}; choose one of {MLP_PATHS}")
    if dtype not in _DTYPE_CODES:
        raise TypeError(f"the cuda kernels take float32/float64/float16/bfloat16, not {dtype}")
    lib = library()
    out = (ctypes.c_int64 * 6)()
    mma = {'auto': -1, 'ffma': 0, 'mma': 1}[kernel]
    two = {'auto': -1, 'fused': 0, 'two_gemm': 1}[path]
    if lib.riformer_emu_mlp_plan(c, hidden, _DTYPE_CODES[dtype], mma, two, out) != 0:
        raise ValueError(f"the mma MLP kernel takes float16/bfloat16 with C and the hidden size "
                         f"multiples of 16, not {dtype} with C={c}, hidden={hidden}")
    return MlpPlan('mma' if out[0] else 'ffma', 'two_gemm' if out[1] else 'fused', int(out[2]),
                   int(out[3]), int(out[5]))


def mlp_kernel(c: int, hidden: int, dtype: torch.dtype, kernel: str = 'auto') -> str:
    """Which MLP kernel runs: 'mma' or 'ffma' (see `mlp_plan`)."""
    return mlp_plan(c, hidden, dtype, kernel).kernel


def mlp_smem_bytes(c: int, dtype: torch.dtype, hidden: int | None = None,
                   kernel: str = 'auto', path: str = 'auto') -> int:
    """The largest dynamic shared memory per CTA among the launches of this shape's plan."""
    plan = mlp_plan(c, 4 * c if hidden is None else hidden, dtype, kernel, path)
    return max(plan.smem, plan.smem_hidden)


class MlpForward(NamedTuple):
    """What `mlp_forward` returns: the output; its per-(n,c) mean and population variance
    (statistics dtype; empty unless emit_moments); the saved pre-activation u (N, Hd, H, W)
    channels_last in x's dtype (None unless save_u)."""
    out: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    u: torch.Tensor | None


def mlp_forward(x, A, B, a, b, l2, w1, b1, w2, b2, kernel: str = 'auto', save_u: bool = False,
                emit_moments: bool = False, path: str = 'auto') -> MlpForward:
    """out = a x + b + l2 (W2 GELU(W1 (A x + B) + b1) + b2) by csrc/cuda/mlp_forward_kernels.cuh.

    kernel: 'auto' (mma where `mlp_kernel` allows, else ffma), 'ffma' or 'mma'.
    path: 'auto' (the large-C rule), 'fused' or 'two_gemm' (see `mlp_plan`).
    save_u: also return u = W1 (A x + B) + b1, rounded to x's dtype.
    emit_moments: also return out's moments, reduced by the kernel's epilogue from the stored
    values (per-tile partials) and merged by the moments merge kernel.

    x: (N, C, H, W), NCHW or channels_last (other strides are copied); the output has x's
    layout. A, B, a, b, l2: (N, C) in the statistics dtype (fp64 for fp64 x, else fp32).
    w1: (Hd, C) or (Hd, C, 1, 1); b1: (Hd,); w2: (C, Hd) or (C, Hd, 1, 1); b2: (C,), in x's dtype;
    or, for float32 x, w1 and w2 in float16/bfloat16 (the mixed-precision mode: the GEMMs run on
    operands of that dtype, x, out and the biases stay fp32, u is saved in the weights' dtype).
    """
    _check_x(x, 'mlp_forward')
    if layout(x) is None:
        x = x.contiguous()
    n, c, h, w = x.shape
    sd = stats_dtype(x.dtype)
    w1 = w1.reshape(w1.shape[0], -1) if w1.dim() == 4 else w1
    w2 = w2.reshape(w2.shape[0], -1) if w2.dim() == 4 else w2
    hd = w1.shape[0] if w1.dim() == 2 else -1
    expect = {'w1': (w1, (hd, c)), 'b1': (b1, (hd,)), 'w2': (w2, (c, hd)), 'b2': (b2, (c,))}
    for name, (t, shape) in expect.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"mlp_forward: {name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape or hd < 1:
            raise ValueError(f"mlp_forward: {name} has shape {tuple(t.shape)}, expected {shape} "
                             f"for C={c} and {hd} hidden units")
    op = gemm_dtype('mlp_forward', x, {k: t for k, (t, _) in expect.items()})
    coeffs = {'A': A, 'B': B, 'a': a, 'b': b, 'l2': l2}
    for name, t in coeffs.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"mlp_forward: {name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != (n, c):
            raise ValueError(f"mlp_forward: {name} has shape {tuple(t.shape)}, expected {(n, c)}")
        if t.dtype != sd or t.device != x.device:
            raise TypeError(f"mlp_forward: {name} is {t.dtype} on {t.device}, expected {sd} on "
                            f"{x.device} (the statistics dtype of {x.dtype})")
    plan = mlp_plan(c, hd, op, kernel, path)   # the plan follows the GEMM operand dtype
    which = plan.kernel
    smem = max(plan.smem, plan.smem_hidden)
    if smem > MAX_DYNAMIC_SMEM:
        raise ValueError(f"mlp_forward: C={c} needs {smem} bytes of shared memory per CTA, more "
                         f"than the {MAX_DYNAMIC_SMEM} a CTA can have")
    for name, flag in (('save_u', save_u), ('emit_moments', emit_moments)):
        if not isinstance(flag, bool):
            raise TypeError(f"mlp_forward: {name} must be a bool, got {type(flag).__name__}")
    out = torch.empty_like(x)
    out.fill_(float('nan'))   # poisoned: an element the kernel fails to write stays NaN
    if out.stride() != x.stride():
        raise ValueError(f"mlp_forward: output strides {out.stride()} differ from the input's "
                         f"{x.stride()}")
    # Poisoned like out; u is (N, Hd, H, W) with the hidden index fastest (the kernel writes
    # (N, T, Hd)), the layout the Triton backend saves it in too.
    u = (torch.full((n, h, w, hd), float('nan'), dtype=op).permute(0, 3, 1, 2)
         if save_u else None)
    mean, var = (torch.full((n, c) if emit_moments else (0,), float('nan'), dtype=sd)
                 for _ in range(2))
    if x.numel() == 0:
        return MlpForward(out, mean, var, u)
    keep = [t.contiguous() for t in (A, B, a, b, l2, w1, b1, w2, b2)]
    if which == 'mma':
        # The mma kernel reads weight pairs as 32-bit words: a view starting at an odd element
        # would be a misaligned load on the device (the emulator does not check global memory).
        keep[5], keep[7] = (t if t.data_ptr() % 4 == 0 else t.clone() for t in (keep[5], keep[7]))
    dims = (ctypes.c_int64 * 9)(n, c, hd, h * w, x.stride(0), x.stride(1),
                                x.stride(3) if layout(x) == 'channels_last' else 1,
                                1 if save_u else 0, hd if save_u else 0)
    ptrs_c = (ctypes.c_void_p * 5)(*[t.data_ptr() for t in keep[:5]])
    ptrs_w = (ctypes.c_void_p * 4)(*[t.data_ptr() for t in keep[5:]])
    _call(library().riformer_emu_mlp_forward, _DTYPE_CODES[x.dtype], _DTYPE_CODES[op],
          x.data_ptr(), out.data_ptr(), dims, ptrs_c, ptrs_w, int(which == 'mma'),
          int(plan.path == 'two_gemm'),
          u.data_ptr() if save_u else None, mean.data_ptr() if emit_moments else None,
          var.data_ptr() if emit_moments else None)
    return MlpForward(out, mean, var, u)


# ---------------------------------------------------------------------------------------------
# custom ops: what the `cuda` kernel set calls, so torch.compile / torch.export see opaque ops
# with fake implementations, and the bytes-moved counter counts their kernels (through the
# emulator) instead of the wrappers' host-side allocations.

def _out_like(x: torch.Tensor) -> torch.Tensor:
    fmt = torch.channels_last if layout(x) == 'channels_last' else torch.contiguous_format
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)


@torch.library.custom_op('riformer_cuda_emu::moments', mutates_args=())
def moments_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`moments` as a custom op."""
    return moments(x)


@moments_op.register_fake
def _(x):
    n, c = x.shape[:2]
    sd = stats_dtype(x.dtype)
    return x.new_empty((n, c), dtype=sd), x.new_empty((n, c), dtype=sd)


@torch.library.custom_op('riformer_cuda_emu::mlp_forward', mutates_args=())
def mlp_forward_op(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, a: torch.Tensor,
                   b: torch.Tensor, l2: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                   w2: torch.Tensor, b2: torch.Tensor, save_u: bool, emit_moments: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`mlp_forward` (kernel 'auto') as a custom op: (out, mean, var, u), u empty unless
    save_u, mean/var empty unless emit_moments."""
    r = mlp_forward(x, A, B, a, b, l2, w1, b1, w2, b2, save_u=save_u, emit_moments=emit_moments)
    u = r.u if save_u else x.new_empty((0,))
    return r.out, r.mean, r.var, u


@mlp_forward_op.register_fake
def _(x, A, B, a, b, l2, w1, b1, w2, b2, save_u, emit_moments):
    n, c, h, w = x.shape
    hd = w1.shape[0]
    sd = stats_dtype(x.dtype)
    mean, var = (x.new_empty((n, c) if emit_moments else (0,), dtype=sd) for _ in range(2))
    u = (torch.empty((n, hd, h, w), dtype=w1.dtype, device=x.device,
                     memory_format=torch.channels_last) if save_u else x.new_empty((0,)))
    return _out_like(x), mean, var, u


# =============================================================================================
# The MLP backward (csrc/cuda/mlp_backward_kernels.cuh; issue 12). Its own section: the
# signatures are set here (`_backward_library`), not in `library()`.

_backward_ready = False


def _backward_library():
    """The loaded library with the backward entry points' signatures set."""
    global _backward_ready
    lib = library()
    with _lock:
        if not _backward_ready:
            i64, ptr, cstr, sz = ctypes.c_int64, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
            lib.riformer_emu_mlp_backward_smem_bytes.argtypes = [i64, i64, ctypes.c_int,
                                                                 ctypes.c_int]
            lib.riformer_emu_mlp_backward_smem_bytes.restype = i64
            lib.riformer_emu_mlp_backward_splits.argtypes = [i64, i64, i64, i64, ctypes.c_int,
                                                             i64]
            lib.riformer_emu_mlp_backward_splits.restype = i64
            lib.riformer_emu_mlp_backward_phase1.argtypes = [ctypes.c_int, ctypes.c_int, ptr, ptr,
                                                             ptr, ptr, ptr, ptr, ptr, ptr, cstr,
                                                             sz]
            lib.riformer_emu_mlp_backward_dx.argtypes = [ctypes.c_int, ctypes.c_int, ptr, ptr,
                                                         ptr, ptr, ptr, ptr, ptr, cstr, sz]
            _backward_ready = True
    return lib


def mlp_backward_kernel(c: int, hidden: int, dtype: torch.dtype, kernel: str = 'auto') -> str:
    """Which backward kernels run: 'mma' (tensor cores; fp16/bf16 with C and hidden multiples
    of 16) where they can under 'auto', else 'ffma'."""
    if kernel not in MLP_KERNELS:
        raise ValueError(f"unknown MLP backward kernel {kernel!r}; choose one of {MLP_KERNELS}")
    can_mma = _backward_library().riformer_emu_mlp_backward_smem_bytes(
        c, hidden, _DTYPE_CODES[dtype], 1) >= 0
    if kernel == 'mma' and not can_mma:
        raise ValueError(f"the mma backward kernels take float16/bfloat16 with C and the hidden "
                         f"size multiples of 16, not {dtype} with C={c}, hidden={hidden}")
    if kernel == 'auto':
        return 'mma' if can_mma else 'ffma'
    return kernel


def mlp_backward_smem_bytes(c: int, dtype: torch.dtype, hidden: int | None = None,
                            kernel: str = 'auto') -> int:
    """Dynamic shared memory per CTA of the backward kernels `kernel` picks (the larger of
    phase 1 and phase 2)."""
    hidden = 4 * c if hidden is None else hidden
    which = mlp_backward_kernel(c, hidden, dtype, kernel)
    return _backward_library().riformer_emu_mlp_backward_smem_bytes(
        c, hidden, _DTYPE_CODES[dtype], int(which == 'mma'))


def mlp_backward_splits(n: int, tokens: int, c: int, hidden: int, dtype: torch.dtype,
                        tiles_per_split: int = 0) -> int:
    """How many partial slots phase 1 writes (a function of the shape and dtype only)."""
    return _backward_library().riformer_emu_mlp_backward_splits(
        n, tokens, c, hidden, _DTYPE_CODES[dtype], tiles_per_split)


def _token_stride(t: torch.Tensor) -> int:
    """The one stride of the token index t = h * W + w of a 4-D tensor whose H and W collapse
    (callers make sure they do)."""
    return t.stride(3) if t.shape[3] > 1 else t.stride(2)


def _check_backward_inputs(what, g, x, coeffs: dict, weights: dict, u, kernel):
    """Checks shared by both backward wrappers; returns (g, x, hidden, u) with g in x's
    layout and u in a layout the kernels read (or None)."""
    _check_x(x, what)
    if layout(x) is None:
        x = x.contiguous()
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{what}: g must be a torch.Tensor, got {type(g).__name__}")
    if g.shape != x.shape or g.dtype != x.dtype or g.device != x.device:
        raise ValueError(f"{what}: g is {tuple(g.shape)} {g.dtype} on {g.device}; expected x's "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}")
    if g.stride() != x.stride():
        # the kernels read g with x's strides
        g = g.contiguous(memory_format=torch.channels_last if layout(x) == 'channels_last'
                         else torch.contiguous_format)
        if g.stride() != x.stride():
            raise ValueError(f"{what}: g's strides {g.stride()} cannot match x's {x.stride()}")
    n, c, h, w = x.shape
    sd = stats_dtype(x.dtype)
    w1, w2 = weights['w1'], weights['w2']
    if isinstance(w1, torch.Tensor) and w1.dim() == 4:
        weights['w1'] = w1 = w1.reshape(w1.shape[0], -1)
    if isinstance(w2, torch.Tensor) and w2.dim() == 4:
        weights['w2'] = w2 = w2.reshape(w2.shape[0], -1)
    hd = w1.shape[0] if isinstance(w1, torch.Tensor) and w1.dim() == 2 else -1
    shapes = {'w1': (hd, c), 'b1': (hd,), 'w2': (c, hd), 'b2': (c,)}
    for name, t in weights.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shapes[name] or hd < 1:
            raise ValueError(f"{what}: {name} has shape {tuple(t.shape)}, expected "
                             f"{shapes[name]} for C={c} and {hd} hidden units")
    op = gemm_dtype(what, x, weights)
    for name, t in coeffs.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != (n, c):
            raise ValueError(f"{what}: {name} has shape {tuple(t.shape)}, expected {(n, c)}")
        if t.dtype != sd or t.device != x.device:
            raise TypeError(f"{what}: {name} is {t.dtype} on {t.device}, expected {sd} on "
                            f"{x.device} (the statistics dtype of {x.dtype})")
    if u is not None:
        if not isinstance(u, torch.Tensor):
            raise TypeError(f"{what}: u must be a torch.Tensor or None, got {type(u).__name__}")
        if tuple(u.shape) != (n, hd, h, w) or u.dtype != op or u.device != x.device:
            raise ValueError(f"{what}: u is {tuple(u.shape)} {u.dtype} on {u.device}; expected "
                             f"{(n, hd, h, w)} {op} (the weights' dtype) on {x.device}")
        if layout(u) is None:
            u = u.contiguous(memory_format=torch.channels_last)
    # By x's dtype: the mixed mode (fp32 x) runs the FFMA kernels.
    which = mlp_backward_kernel(c, hd, x.dtype, kernel)
    smem = mlp_backward_smem_bytes(c, x.dtype, hd, which)
    if smem > MAX_DYNAMIC_SMEM:
        raise ValueError(f"{what}: C={c} in {x.dtype} needs {smem} bytes of shared memory per "
                         f"CTA (z and l2 g of all C channels of a 32-token tile), more than the "
                         f"{MAX_DYNAMIC_SMEM} a CTA can have")
    return g, x, hd, u, which, op


def _backward_weights(weights, which):
    keep = [t.contiguous() for t in (weights['w1'], weights['b1'], weights['w2'], weights['b2'])]
    if which == 'mma':
        # The mma kernels read W1 pairs as 32-bit words: a view starting at an odd element would
        # be a misaligned load on the device (the emulator does not check global memory).
        keep[0], keep[2] = (t if t.data_ptr() % 4 == 0 else t.clone() for t in (keep[0], keep[2]))
    return keep


def _backward_dims(x, hd, u, which, tiles_per_split=0):
    n, c, h, w = x.shape
    st = x.stride(3) if layout(x) == 'channels_last' else 1
    us = (u.stride(0), u.stride(1), _token_stride(u)) if u is not None else (0, 0, 0)
    return (ctypes.c_int64 * 12)(n, c, hd, h * w, x.stride(0), x.stride(1), st, *us,
                                 tiles_per_split, int(which == 'mma'))


def _nan(*shape, dtype):
    return torch.full(shape, float('nan'), dtype=dtype)


def mlp_backward_weights_and_sums(g, x, mean, A, B, l2, w1, b1, w2, b2, u=None,
                                  tiles_per_split: int = 0, kernel: str = 'auto'):
    """Phase 1 of the block's backward (docs/design.md section 3) by
    csrc/cuda/mlp_backward_kernels.cuh: (dw1 (Hd, C), db1 (Hd,), dw2 (C, Hd), db2 (C,),
    sums (5, N, C)), all in the statistics dtype, db2 = sum_t l2 g (the l2 factor included, as
    the other kernel sets return it).

    g, x: (N, C, H, W) in x's dtype (g is read in x's layout; copied there if it differs).
    w1, w2 in x's dtype, or fp16/bf16 for fp32 x (the mixed-precision mode, run by the FFMA
    kernels); b1, b2 in x's dtype.
    mean, A, B, l2: (N, C), statistics dtype. u: the saved pre-activation (N, Hd, H, W), in the
    weights' dtype, or None
    (recompute it). tiles_per_split > 0 overrides the split plan (tests). kernel: 'auto' (mma
    where `mlp_backward_kernel` allows, else ffma), 'ffma' or 'mma'."""
    what = 'mlp_backward_weights_and_sums'
    weights = {'w1': w1, 'b1': b1, 'w2': w2, 'b2': b2}
    g, x, hd, u, which, op = _check_backward_inputs(
        what, g, x, {'mean': mean, 'A': A, 'B': B, 'l2': l2}, weights, u, kernel)
    if not isinstance(tiles_per_split, int) or tiles_per_split < 0:
        raise ValueError(f"{what}: tiles_per_split must be an int >= 0, got {tiles_per_split!r}")
    n, c, h, w = x.shape
    sd = stats_dtype(x.dtype)
    outs = [_nan(hd, c, dtype=sd), _nan(hd, dtype=sd), _nan(c, hd, dtype=sd), _nan(c, dtype=sd),
            _nan(5, n, c, dtype=sd)]
    if n == 0 or c == 0:
        for o in outs:
            o.zero_()   # sums over no tokens
        return tuple(outs)
    splits = mlp_backward_splits(n, h * w, c, hd, x.dtype, tiles_per_split)
    pairs, hchunks = splits + n, -(-hd // 64)
    # Scratch, poisoned too: a partial phase 1 fails to write reaches every output it feeds
    # (pair slots no (split, sample) pair uses are never read).
    # With one split phase 1 writes dw1, dw2, db1 in place (weights_in_place): no partials.
    wsplits = 0 if splits == 1 else splits
    partials = [_nan(wsplits, hd, c, dtype=sd), _nan(wsplits, c, hd, dtype=sd),
                _nan(wsplits, hd, dtype=sd), _nan(pairs, c, dtype=sd), _nan(pairs, c, dtype=sd),
                *(_nan(pairs, hchunks, c, dtype=sd) for _ in range(3))]
    keep_c = [t.contiguous() for t in (A, B, mean, l2)]
    keep_w = _backward_weights(weights, which)
    ptrs_c = (ctypes.c_void_p * 4)(*[t.data_ptr() for t in keep_c])
    ptrs_w = (ctypes.c_void_p * 4)(*[t.data_ptr() for t in keep_w])
    ptrs_p = (ctypes.c_void_p * 8)(*[t.data_ptr() for t in partials])
    ptrs_o = (ctypes.c_void_p * 5)(*[t.data_ptr() for t in outs])
    _call(_backward_library().riformer_emu_mlp_backward_phase1, _DTYPE_CODES[x.dtype],
          _DTYPE_CODES[op], x.data_ptr(), g.data_ptr(), u.data_ptr() if u is not None else None,
          _backward_dims(x, hd, u, which, tiles_per_split), ptrs_c, ptrs_w, ptrs_p, ptrs_o)
    return tuple(outs)


def mlp_backward_dx(g, x, mean, A, B, l2, w1, b1, w2, b2, P, Q, R, S, u=None,
                    kernel: str = 'auto') -> torch.Tensor:
    """Phase 2: dx = P g + Q dz + R (x - m) + S, dz = W1^T ((W2^T l2 g) GELU'(u)) recomputed
    per token tile (u too, unless given); in x's dtype and layout. P, Q, R, S: (N, C),
    statistics dtype (fold.backward_coefficients). kernel: as for phase 1."""
    what = 'mlp_backward_dx'
    weights = {'w1': w1, 'b1': b1, 'w2': w2, 'b2': b2}
    coeffs = {'mean': mean, 'A': A, 'B': B, 'l2': l2, 'P': P, 'Q': Q, 'R': R, 'S': S}
    g, x, hd, u, which, op = _check_backward_inputs(what, g, x, coeffs, weights, u, kernel)
    dx = torch.empty_like(x)
    dx.fill_(float('nan'))   # poisoned: an element the kernel fails to write stays NaN
    if dx.stride() != x.stride():
        raise ValueError(f"{what}: output strides {dx.stride()} differ from x's {x.stride()}")
    if x.numel() == 0:
        return dx
    keep_c = [t.contiguous() for t in (A, B, mean, l2, P, Q, R, S)]
    keep_w = _backward_weights(weights, which)
    ptrs_c = (ctypes.c_void_p * 8)(*[t.data_ptr() for t in keep_c])
    ptrs_w = (ctypes.c_void_p * 4)(*[t.data_ptr() for t in keep_w])
    _call(_backward_library().riformer_emu_mlp_backward_dx, _DTYPE_CODES[x.dtype],
          _DTYPE_CODES[op], x.data_ptr(),
          g.data_ptr(), u.data_ptr() if u is not None else None, _backward_dims(x, hd, u, which),
          ptrs_c, ptrs_w, dx.data_ptr())
    return dx


# Custom ops of the backward, as the forward's above: what the `cuda` kernel set calls, so
# torch.compile sees opaque ops with fake implementations and the bytes-moved counter counts the
# kernels, not the wrappers' allocations and poisoning.

@torch.library.custom_op('riformer_cuda_emu::mlp_backward_weights_and_sums', mutates_args=())
def mlp_backward_weights_and_sums_op(
        g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
        l2: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
        u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor]:
    """`mlp_backward_weights_and_sums` (kernel 'auto') as a custom op."""
    return mlp_backward_weights_and_sums(g, x, mean, A, B, l2, w1, b1, w2, b2, u=u)


@mlp_backward_weights_and_sums_op.register_fake
def _(g, x, mean, A, B, l2, w1, b1, w2, b2, u):
    n, c = x.shape[:2]
    hd = w1.shape[0]
    sd = stats_dtype(x.dtype)
    return (x.new_empty((hd, c), dtype=sd), x.new_empty((hd,), dtype=sd),
            x.new_empty((c, hd), dtype=sd), x.new_empty((c,), dtype=sd),
            x.new_empty((5, n, c), dtype=sd))


@torch.library.custom_op('riformer_cuda_emu::mlp_backward_dx', mutates_args=())
def mlp_backward_dx_op(g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, A: torch.Tensor,
                       B: torch.Tensor, l2: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                       w2: torch.Tensor, b2: torch.Tensor, P: torch.Tensor, Q: torch.Tensor,
                       R: torch.Tensor, S: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
    """`mlp_backward_dx` (kernel 'auto') as a custom op."""
    return mlp_backward_dx(g, x, mean, A, B, l2, w1, b1, w2, b2, P, Q, R, S, u=u)


@mlp_backward_dx_op.register_fake
def _(g, x, mean, A, B, l2, w1, b1, w2, b2, P, Q, R, S, u):
    return _out_like(x)

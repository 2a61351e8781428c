"""The `cpu` kernel set: the fused block's kernels in the extension's C++ (csrc/cpu).

Run by `riformer_kernels.pipeline` (statistics, fold, autograd, chaining live there):

* moments: `riformer::moments` (one read of x; per-(n,c) mean and variance, fp32 -- fp64 for
  fp64 input). Its partials are the mean and variance themselves (`merge` is the identity).
* mlp_forward: `riformer::mlp_forward` / `mlp_forward_save_u` run the MLP over cache-sized token
  tiles (z = A x + B, fc1 GEMM, exact GELU, fc2 GEMM, epilogue a x + b + l2 o) and, when the
  block's output feeds another block (emit_moments), the moments of the output they stored:
  the next block's statistics.
* phase 1: `riformer::mlp_backward` (dz, the MLP's weight gradients, the five per-(n,c) sums);
  phase 2: `riformer::input_grad` (dx = P g + Q dz + R (x - m) + S).

Layouts: NCHW-contiguous and channels_last are read natively; any other strides are copied to
NCHW first. dtypes: float32, bfloat16, float64; and float32 activations with bfloat16 weights
(the mixed-precision mode autocast runs: bf16 GEMM operands, fp32 residual stream).

ISA levels (csrc/cpu/isa.h): the tile code is compiled for baseline x86-64, AVX2 (x86-64-v3) and
AVX-512 (x86-64-v4); each kernel call runs the copy of min(what the CPU supports, the cap).
`cpu_isa_info()` reports the levels, `use_cpu_isa(level)` sets the cap (RIFORMER_CPU_ISA sets it
for a whole process).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _ext
from ..dispatch import recompute_for
from ..pipeline import KernelSet, Partials, Phase1, autocast_plan, register_kernel_set

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_OPS = ('moments', 'mlp_forward', 'mlp_forward_save_u', 'mlp_backward', 'input_grad')


def _find_unavailability() -> str | None:
    if _ext.LOAD_ERROR is not None:
        return _ext.LOAD_ERROR
    missing = [op for op in _OPS if not _ext.has_kernel(op, 'CPU')]
    if missing:
        return f"the extension has no CPU kernels for {missing} in this build"
    if not torch.backends.mkl.is_available():
        return "torch was built without MKL, whose GEMMs the cpu kernels call"
    return None


# Fixed for the process once the extension is loaded: computed once, so that dispatch (which
# torch.compile traces) reads a Python value instead of calling into the dispatcher per call.
_UNAVAILABLE = _find_unavailability()


def _availability() -> str | None:
    return _UNAVAILABLE


ISA_LEVELS = ('baseline', 'avx2', 'avx512')


class CpuIsa(NamedTuple):
    """The cpu kernels' instruction-set levels in this process.

    supported: the highest level this CPU (and this build) can run; cap: the limit set by
    `use_cpu_isa` or RIFORMER_CPU_ISA (default: the highest level built); active: min(supported,
    cap), what the next kernel call runs; last_run: the level the latest kernel call ran at
    ('none' before the first); built: the highest level compiled into the extension ('baseline'
    in builds with RIFORMER_CPU_ISA_DISPATCH=0 and on non-x86 CPUs); gemm: the fp32 GEMM route
    at the active level ('onednn-brgemm' at avx512 where it runs, else 'mkl-sgemm')."""
    supported: str
    cap: str
    active: str
    last_run: str
    built: str
    gemm: str


def _native():
    if _ext._C is None:
        raise RuntimeError(f"the cpu kernels are not available: {_ext.LOAD_ERROR}")
    return _ext._C


def cpu_isa_info() -> CpuIsa:
    """The levels the cpu kernels run at (see `CpuIsa`). Raises ValueError when RIFORMER_CPU_ISA
    names no level, RuntimeError when the extension is not built."""
    return CpuIsa(*_native().cpu_isa())


class use_cpu_isa:
    """Cap the ISA level of the cpu kernels: `rk.use_cpu_isa('avx2')` sets the cap for the process;
    `with rk.use_cpu_isa('baseline'):` sets it for the block and restores the previous cap on exit.
    A cap above what the CPU supports is allowed and means "no cap" (active = supported). MKL's
    GEMMs pick their own code path (MKL_ENABLE_INSTRUCTIONS is MKL's knob); the cap decides
    everything else, the GEMM route included."""

    def __init__(self, level: str):
        if not isinstance(level, str):
            raise TypeError(f"use_cpu_isa expects a level name, got {type(level).__name__}")
        if level not in ISA_LEVELS:
            raise ValueError(f"unknown ISA level {level!r}; choose one of {ISA_LEVELS}")
        self._previous = _native().set_cpu_isa_cap(level)
        _refresh_active_level()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _native().set_cpu_isa_cap(self._previous)
        _refresh_active_level()
        return False


# The active level as a Python value, for dispatch (which torch.compile traces: a call into the
# extension there would break the graph). Set at import and by use_cpu_isa, the only ways the
# level changes; None until known (an invalid RIFORMER_CPU_ISA raises at first use instead).
_ACTIVE_LEVEL: str | None = None


def _refresh_active_level() -> None:
    global _ACTIVE_LEVEL
    _ACTIVE_LEVEL = None
    if _ext._C is not None:
        try:
            _ACTIVE_LEVEL = cpu_isa_info().active
        except ValueError:
            pass


def _active_level() -> str:
    return _ACTIVE_LEVEL if _ACTIVE_LEVEL is not None else cpu_isa_info().active


_refresh_active_level()


def _supports(block, x: torch.Tensor) -> str | None:
    if x.device.type != 'cpu':
        return f"the cpu backend runs CPU tensors only (input is on {x.device})"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"the cpu kernels support float32, bfloat16 and float64, not {x.dtype}"
    return None


class SlowerClass(NamedTuple):
    """A class of calls for which the benchmarks measured these kernels slower than the eager
    reference (`auto` then runs the reference; a backend asked for by name runs anyway).
    The shape class is samples of fewer than `max_tokens` tokens (H*W) with at least
    `min_channels` channels: the short-sample tiles of S12's stages 3-4, where the step is
    GEMM-bound and a recomputing backward runs one or two GEMMs more than eager's six."""
    levels: tuple        # ISA paths (cpu_isa_info().active) it was measured on
    dtypes: tuple        # torch dtypes
    mode: str            # 'train' or 'forward'
    recompute: bool | None   # the memory mode, or None for both
    min_channels: int
    max_tokens: int
    measured: str        # what was measured, where


_AVX2 = ("AMD EPYC with AVX2, 2 threads, batch 8, S12 shapes at 224px: "
         "benchmarks/results/cpu_s12_{}.md")
_CAPPED = ("the same AVX2 EPYC capped at baseline (RIFORMER_CPU_ISA=baseline): "
           "benchmarks/results/cpu_s12_{}.md")
_AVX512 = ("AMD EPYC with AVX-512, 2 threads, batch 8, S12 shapes at 224px, measured before "
           "this table existed: benchmarks/results/{}.md")
_ALL = 2 ** 62    # no token limit: the class is every sample length
_F32 = (torch.float32,)

# Every class of calls the benchmarks measured slower than eager (2 threads; the `cpu` vs eager
# ratio per S12 stage in the `measured` text). Not listed: bf16 (8-30x faster than eager on AVX2,
# whose eager bf16 has no native support), fp64 (not benchmarked), and every forward but the one
# below. Why training at stages 3-4 stays slower: it is GEMM-bound (eager runs at 1.2-1.3x the
# GEMM floor) and a recomputing backward runs a seventh GEMM (fc1 again) and, on samples under
# 128 tokens, an eighth (W2 h for the layer-scale gradient); see docs/kernels.md. The baseline
# path adds unvectorised elementwise passes, which costs stage 2 as well.
SLOWER_THAN_REFERENCE: tuple = (
    SlowerClass(('avx2',), _F32, 'train', True, 256, 384,
                "stage 3 0.94x, stage 4 0.81x eager; " + _AVX2.format('avx2')),
    SlowerClass(('avx2',), _F32, 'train', False, 512, 384,
                "stage 4 0.89x eager; " + _AVX2.format('avx2_saveu')),
    SlowerClass(('baseline',), _F32, 'train', True, 128, _ALL,
                "stages 2-4 0.90x, 0.86x, 0.78x eager; " + _CAPPED.format('baseline')),
    SlowerClass(('baseline',), _F32, 'train', False, 128, _ALL,
                "stages 2-4 0.97x, 0.97x, 0.85x eager; " + _CAPPED.format('baseline_saveu')),
    SlowerClass(('avx512',), _F32, 'train', True, 256, 384,
                "stage 3 0.91x, stage 4 0.75x eager; " + _AVX512.format('cpu_s12_recompute')),
    SlowerClass(('avx512',), _F32, 'train', False, 512, 384,
                "stage 4 0.79x eager; " + _AVX512.format('cpu_s12')),
    SlowerClass(('avx512',), _F32, 'forward', None, 512, 384,
                "stage 4 0.98x eager; " + _AVX512.format('cpu_s12')),
)


def _is_training_call(block, x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or
                                        any(p.requires_grad for p in block.parameters()))


def _auto_declines(block, x: torch.Tensor) -> str | None:
    if not SLOWER_THAN_REFERENCE:
        return None
    plan = autocast_plan(block, x)
    if plan is not None and plan.mixed:
        # The classes were measured for plain calls against the eager reference in the same
        # dtype. A mixed-precision call (autocast) is another class: against the reference under
        # autocast (bf16 convs, which this AVX2 CPU emulates) it measured 7-30x faster for a
        # training step at S12 stage 1 and 3 shapes (docs/kernels.md, "Mixed precision"), so no
        # class of it is declined.
        return None
    mode = 'train' if _is_training_call(block, x) else 'forward'
    recompute = recompute_for(block)
    level = _active_level()
    channels, tokens = x.shape[1], x.shape[2] * x.shape[3]
    for cls in SLOWER_THAN_REFERENCE:
        if (level in cls.levels and x.dtype in cls.dtypes and cls.mode == mode
                and cls.min_channels <= channels
                and tokens < cls.max_tokens and cls.recompute in (None, recompute)):
            memory = '' if cls.recompute is None else f", recompute={recompute}"
            tokens_text = '' if cls.max_tokens >= _ALL else f" with H*W < {cls.max_tokens}"
            return (f"measured slower than the reference here ({mode}{memory}, "
                    f"{str(x.dtype).replace('torch.', '')}, C >= {cls.min_channels}"
                    f"{tokens_text}, ISA path {level}: {cls.measured}); "
                    f"rk.use_backend('cpu') runs it anyway")
    return None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    # NCHW wins where both hold (C == 1 or H*W == 1): the kernels make the same choice.
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _prepare_input(x: torch.Tensor) -> torch.Tensor:
    if _memory_format(x) == torch.contiguous_format and not x.is_contiguous():
        x = x.contiguous()          # a strided view: the kernels read NCHW or channels_last
    return x


def _moments(x: torch.Tensor):
    mean, var = torch.ops.riformer.moments(x)
    return Partials(mean, var, 0)


def _merge(mean, var, tokens: int, span: int):
    return mean, var


def _mlp_forward(x, cf, l2, w1, b1, w2, b2, save_u: bool, emit_moments: bool):
    # The output moments cost one more pass over each tile (8-12% of an isolated block's
    # forward at S12 stages 1-2, measured): only when the next block will use them.
    if save_u:
        return torch.ops.riformer.mlp_forward_save_u(x, cf.A, cf.B, cf.a, cf.b, w1, b1, w2, b2,
                                                     l2, emit_moments)
    out, mean, var = torch.ops.riformer.mlp_forward(x, cf.A, cf.B, cf.a, cf.b, w1, b1, w2, b2,
                                                    l2, emit_moments)
    return out, mean, var, None


def _backward_weights_and_sums(g, sv) -> Phase1:
    g = g.contiguous(memory_format=_memory_format(sv.x))
    dz, dw1, db1, dw2, db2, sums = torch.ops.riformer.mlp_backward(
        g, sv.x, sv.mean, sv.A, sv.B, sv.w1, sv.b1, sv.w2, sv.b2, sv.l2, sv.u)
    return Phase1(sums, db2, (dw1, db1, dw2), (g, dz))


def _backward_dx(g, sv, p1: Phase1, bc):
    g, dz = p1.carry
    return torch.ops.riformer.input_grad(g, dz, sv.x, sv.mean, bc.P, bc.Q, bc.R, bc.S), p1.weights


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations of the C++ ops: output shapes, dtypes and memory formats without
# running the kernels, for torch.compile / torch.export tracing and torch.library.opcheck. They
# mirror csrc/cpu: statistics and weight gradients in the accumulation dtype (fp32; fp64 for
# fp64), activation-shaped outputs in x's dtype and memory format (NCHW where both hold).

def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _like(x, channels=None, dtype=None):
    shape = (x.shape[0], x.shape[1] if channels is None else channels, x.shape[2], x.shape[3])
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device,
                       memory_format=_memory_format(x))


def _stats(x, rows=None):
    n = x.shape[0] if rows is None else rows
    return x.new_empty((n, x.shape[1]), dtype=_acc_dtype(x))


def _register_fakes():
    lib = 'riformer::'

    @torch.library.register_fake(lib + 'moments')
    def _(x):
        return _stats(x), _stats(x)

    @torch.library.register_fake(lib + 'mlp_forward')
    def _(x, A, B, a, b, w1, b1, w2, b2, l2, emit_moments):
        rows = x.shape[0] if emit_moments else 0
        return _like(x), _stats(x, rows), _stats(x, rows)

    @torch.library.register_fake(lib + 'mlp_forward_save_u')
    def _(x, A, B, a, b, w1, b1, w2, b2, l2, emit_moments):
        rows = x.shape[0] if emit_moments else 0
        # u is GEMM-side: in w1's dtype (bf16 with fp32 x in the mixed-precision mode)
        return _like(x), _stats(x, rows), _stats(x, rows), _like(x, w1.shape[0], w1.dtype)

    @torch.library.register_fake(lib + 'mlp_backward')
    def _(grad_out, x, mean, A, B, w1, b1, w2, b2, l2, u_saved):
        hidden, channels, acc = w1.shape[0], x.shape[1], _acc_dtype(x)
        return (_like(x), x.new_empty((hidden, channels), dtype=acc),
                x.new_empty((hidden,), dtype=acc), x.new_empty((channels, hidden), dtype=acc),
                x.new_empty((channels,), dtype=acc),
                x.new_empty((5, x.shape[0], channels), dtype=acc))

    @torch.library.register_fake(lib + 'input_grad')
    def _(grad_out, dz, x, mean, P, Q, R, S):
        return _like(x)


if _ext._C is not None:
    _register_fakes()


KERNELS = KernelSet(
    'cpu', availability=_availability, supports=_supports, prepare_input=_prepare_input,
    moments=_moments, merge=_merge, mlp_forward=_mlp_forward, output_span=lambda out: 0,
    backward_weights_and_sums=_backward_weights_and_sums, backward_dx=_backward_dx,
    auto_declines=_auto_declines,
    # csrc/cpu's mixed instantiation: fp32 activations around MKL's bf16 x bf16 -> fp32 GEMM
    # (no fp16 GEMM route in the kernels, so CPU autocast in fp16 declines).
    mixed_precision=(torch.bfloat16,))
register_kernel_set(KERNELS)

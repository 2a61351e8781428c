"""The `cuda` backend: hand-written CUDA kernels in csrc/cuda, as a `pipeline.KernelSet`.

The same kernel sources run two ways, chosen per call by the input's device:

* CUDA tensors: the compiled extension's CUDA implementations of riformer::moments,
  riformer::mlp_forward / mlp_forward_save_u and the backward's riformer::cuda_mlp_backward_*
  (csrc/cuda/*.cu), on the current stream;
* CPU tensors, when RIFORMER_CUDA_EMULATE=1 was set before riformer_kernels was imported: the
  same sources built against the SIMT emulator (`cuda_emu`), whose checks (races, uninitialised
  shared memory, barriers, bounds) run with every launch. A test vehicle, orders of magnitude
  slower than the cpu kernels: `auto` never picks it (dispatch.AUTO_ORDER has no `cuda` for CPU
  tensors); ask for it with use_backend('cuda').

Kernels: moments (the two-stage split moments; `merge` is the identity, as for the cpu kernel
set) and mlp_forward (the fused MLP, csrc/cuda/mlp_forward_kernels.cuh), whose epilogue also
reduces the output's moments when the next block chains them, and saves u for a backward that
reads it (recompute=False).

Training (autograd): the backward kernels (csrc/cuda/mlp_backward_kernels.cuh) -- phase 1, the
MLP weight gradients and the five per-(n,c) sums from per-split partials reduced in a fixed
order (bitwise deterministic; u read from the forward's saved u with recompute=False, else
recomputed), and phase 2, dx (recomputing u, du and dz per token tile). On CUDA tensors they run
through the compiled ops riformer::cuda_mlp_backward_weights_and_sums / ::cuda_mlp_backward_dx
(csrc/cuda/mlp_backward.cu), on CPU tensors through the emulated ops
riformer_cuda_emu::mlp_backward_weights_and_sums / ::mlp_backward_dx: the same arguments, the
same launch sequence and split plan, so the same fixed reduction orders. Both have fake
implementations, so torch.compile traces a training step on either device. The compiled
backward has been compiled (0 spills) and traced on fake CUDA tensors, not yet run on a GPU.

Autocast (`pipeline.AutocastPlan`, `mixed_precision` below): fp32 activations around fp16/bf16
GEMMs -- the kernels' `op_t` -- with the weights cast by the pipeline; the forward on tensor
cores where the shape allows, the backward in FFMA on fp32 activations (docs/kernels.md, "Mixed
precision").

On GPUs `auto` keeps `triton` first and `cuda` second (dispatch.AUTO_ORDER): the CUDA kernels
have been run only under the emulator, never timed on a GPU; the order changes when a GPU
measurement says so (docs/kernels.md).
"""
from __future__ import annotations

import torch

from .. import _ext
from ..pipeline import KernelSet, Partials, Phase1, autocast_plan, register_kernel_set
from . import cuda_emu

# The compiled ops the kernel set calls on CUDA tensors (csrc/cuda/*.cu).
COMPILED_OPS = ('moments', 'mlp_forward', 'mlp_forward_save_u',
                'cuda_mlp_backward_weights_and_sums', 'cuda_mlp_backward_dx')


def _is_training_call(block, x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or
                                        any(p.requires_grad for p in block.parameters()))


def _probe_compiled() -> str | None:
    """None when the compiled CUDA kernels, forward and backward, can run on CUDA tensors here."""
    if _ext._C is None:
        return _ext.LOAD_ERROR
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    missing = [op for op in COMPILED_OPS if not _ext.has_kernel(op, 'CUDA')]
    if missing:
        return f"the extension has no CUDA kernels for {missing} (built without CUDA?)"
    return None


# Both availabilities are probed once, at import, and kept as Python values: dispatch runs
# inside torch.compile's trace, which cannot follow file-system or dispatcher queries.
_COMPILED = _probe_compiled()
_EMULATED = cuda_emu.availability()
# Shared memory per (C, hidden, dtype), from the emulated library's plan; filled eagerly (a
# compiled trace only reads it, see _supports).
_SMEM: dict = {}
_BACKWARD_SMEM: dict = {}   # the same for the backward kernels (training calls)


def _compiled_availability() -> str | None:
    return _COMPILED


def _availability() -> str | None:
    compiled = _compiled_availability()
    if compiled is None:
        return None
    if not cuda_emu.ENABLED:
        return (f"{compiled} (set {cuda_emu.ENV_FLAG}=1 before importing riformer_kernels to run "
                f"the kernels emulated on CPU tensors)")
    return None if _EMULATED is None else f"{compiled}; the emulated build: {_EMULATED}"


def _probed(cache: dict, key: tuple, probe) -> int | None:
    """Shared-memory bytes of (C, hidden, dtype) from the emulated library's plan, cached: a
    compiled trace cannot call the library, so it only reads what eager calls probed (None
    when nothing was: the launch itself then refuses an oversized CTA)."""
    if key not in cache:
        if torch.compiler.is_compiling():
            return None
        c, hidden, dtype = key
        cache[key] = probe(c, dtype, hidden)
    return cache[key]


def _supports(block, x: torch.Tensor) -> str | None:
    if x.device.type == 'cuda':
        why = _compiled_availability()
        if why is not None:
            return why
    elif x.device.type == 'cpu':
        if not cuda_emu.ENABLED:
            return (f"the cuda kernels take CUDA tensors; CPU tensors run them emulated only "
                    f"with {cuda_emu.ENV_FLAG}=1 set before import")
        if _EMULATED is not None:
            return _EMULATED
    else:
        return f"the cuda kernels take CUDA tensors (or CPU tensors emulated), not {x.device}"
    if x.dtype not in cuda_emu.SUPPORTED_DTYPES:
        return f"the cuda kernels take float32/float64/float16/bfloat16, not {x.dtype}"
    training = _is_training_call(block, x)
    if block.mlp.fc1.weight.shape[0] < 1:
        return "the MLP has no hidden units"
    if x.is_cuda:
        # The bindings check shared memory against the GPU's own opt-in limit (and raise naming
        # the bytes); the emulated plan's answers are for the emulator's 227 KiB.
        return None
    c, hidden = x.shape[1], block.mlp.fc1.weight.shape[0]
    # The forward's plan follows the GEMM operand dtype: under autocast (x here is the fp32
    # stand-in of the mixed-precision mode) the autocast dtype; the backward's follows x's.
    plan = autocast_plan(block, x)
    gemm = plan.gemm if plan is not None and plan.mixed else x.dtype
    smem = _probed(_SMEM, (c, hidden, gemm), cuda_emu.mlp_smem_bytes)
    if smem is not None and smem > cuda_emu.MAX_DYNAMIC_SMEM:
        return (f"C={c} in {x.dtype} needs {smem} bytes of shared memory per CTA (the MLP kernel "
                f"keeps z for all C channels of its token tile), over {cuda_emu.MAX_DYNAMIC_SMEM}")
    if training:
        smem = _probed(_BACKWARD_SMEM, (c, hidden, x.dtype), cuda_emu.mlp_backward_smem_bytes)
        if smem is not None and smem > cuda_emu.MAX_DYNAMIC_SMEM:
            return (f"training at C={c} in {x.dtype}: the backward kernels need {smem} bytes of "
                    f"shared memory per CTA (z and l2 g of all C channels of a token tile), over "
                    f"{cuda_emu.MAX_DYNAMIC_SMEM}")
    return None


def _prepare_input(x: torch.Tensor) -> torch.Tensor:
    # The kernels read NCHW or channels_last; any other strides are copied to NCHW.
    return x if cuda_emu.layout(x) is not None else x.contiguous()


def _moments(x: torch.Tensor) -> Partials:
    if x.is_cuda:
        mean, var = torch.ops.riformer.moments(x)
    else:
        mean, var = cuda_emu.moments_op(x)
    return Partials(mean, var, 0)


def _mlp_forward(x, cf, l2, w1, b1, w2, b2, save_u: bool, emit_moments: bool):
    w1, w2 = (w.reshape(w.shape[0], -1) for w in (w1, w2))
    if x.is_cuda:
        ops = torch.ops.riformer
        args = (x, cf.A, cf.B, cf.a, cf.b, w1, b1, w2, b2, l2, emit_moments)
        if save_u:
            return tuple(ops.mlp_forward_save_u(*args))
        return (*ops.mlp_forward(*args), None)
    out, mean, var, u = cuda_emu.mlp_forward_op(x, cf.A, cf.B, cf.a, cf.b, l2, w1, b1, w2, b2,
                                                save_u, emit_moments)
    return out, mean, var, (u if save_u else None)


def _grad_in_x_layout(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # The backward kernels read g with x's strides.
    if g.stride() == x.stride():
        return g
    fmt = (torch.channels_last if cuda_emu.layout(x) == 'channels_last'
           else torch.contiguous_format)
    return g.contiguous(memory_format=fmt)


def _backward_weights_and_sums(g, sv) -> Phase1:
    g = _grad_in_x_layout(g, sv.x)
    # The compiled op and the emulated one take the same arguments and return the same outputs.
    op = (torch.ops.riformer.cuda_mlp_backward_weights_and_sums if g.is_cuda
          else cuda_emu.mlp_backward_weights_and_sums_op)
    dw1, db1, dw2, db2, sums = op(g, sv.x, sv.mean, sv.A, sv.B, sv.l2, sv.w1, sv.b1, sv.w2,
                                  sv.b2, sv.u)
    return Phase1(sums, db2, (dw1, db1, dw2), (g,))


def _backward_dx(g, sv, p1: Phase1, bc):
    (g,) = p1.carry
    # Phase 2 recomputes u even when the forward saved it (as the triton backend does): one
    # GEMM per tile there instead of reading u, 4 |x| of traffic. Phase 1 reads the saved u,
    # which spares it the u GEMM once per channel chunk.
    op = torch.ops.riformer.cuda_mlp_backward_dx if g.is_cuda else cuda_emu.mlp_backward_dx_op
    dx = op(g, sv.x, sv.mean, sv.A, sv.B, sv.l2, sv.w1, sv.b1, sv.w2, sv.b2, bc.P, bc.Q, bc.R,
            bc.S, None)
    return dx, p1.weights


# Fake implementations of the compiled backward ops (the forward's are registered with the cpu
# kernel set's, backends/cpu.py): shapes, dtypes and strides as csrc/cuda/mlp_backward.cu makes
# them, so torch.compile / torch.export trace a training step on CUDA tensors.
def _register_backward_fakes():
    lib = 'riformer::'

    @torch.library.register_fake(lib + 'cuda_mlp_backward_weights_and_sums')
    def _(g, x, mean, A, B, l2, w1, b1, w2, b2, u):
        n, c = x.shape[:2]
        hd = w1.shape[0]
        sd = cuda_emu.stats_dtype(x.dtype)
        return (x.new_empty((hd, c), dtype=sd), x.new_empty((hd,), dtype=sd),
                x.new_empty((c, hd), dtype=sd), x.new_empty((c,), dtype=sd),
                x.new_empty((5, n, c), dtype=sd))

    @torch.library.register_fake(lib + 'cuda_mlp_backward_dx')
    def _(g, x, mean, A, B, l2, w1, b1, w2, b2, P, Q, R, S, u):
        # The binding writes dx with the strides of x as it reads it: x itself when NCHW or
        # channels_last (empty_like keeps a dense tensor's strides), else its NCHW copy.
        if cuda_emu.layout(x) is None:
            return torch.empty_like(x, memory_format=torch.contiguous_format)
        return torch.empty_like(x)


# An extension built before these ops existed has no schemas for them (the kernel set then
# reports them missing, _probe_compiled).
if _ext._C is not None and hasattr(torch.ops.riformer, 'cuda_mlp_backward_dx'):
    _register_backward_fakes()


KERNELS = KernelSet(
    'cuda', availability=_availability, supports=_supports,
    prepare_input=_prepare_input, moments=_moments,
    merge=lambda m1, m2, tokens, span: (m1, m2), mlp_forward=_mlp_forward,
    output_span=lambda out: 0, backward_weights_and_sums=_backward_weights_and_sums,
    backward_dx=_backward_dx,
    # fp32 activations around fp16/bf16 GEMMs (MlpForwardArgs' op_t): the forward on tensor
    # cores where the shape allows (z and h rounded as the reference under autocast rounds
    # them), the backward in FFMA on fp32 activations with the weights widened on load
    # (csrc/cuda/mlp_backward_kernels.cuh, "Arithmetic").
    mixed_precision=(torch.float16, torch.bfloat16))
register_kernel_set(KERNELS)

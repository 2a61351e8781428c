"""Triton kernels of the fused block's backward (docs/design.md section 3): phase 1, phase 2.

The training backward (`riformer_kernels.pipeline`, through the triton kernel set) runs phase 1
(weight gradients and the five per-(n,c) sums the norms need), the coefficients
(fold.backward_coefficients) and phase 2 (dx = P g + Q dz + R (x - m) + S) with these ops. Two paths, chosen by C (`_large_path`:
C > SMALL_PATH_MAX_CHANNELS = 256; fp32: C > SMALL_PATH_MAX_CHANNELS_FP32 = 128).

Small C (<= 256; fp32 <= 128), recompute, nothing of size 4C*T is stored, dz is never written:

* Phase 1, `_mlp_weight_grad_kernel` with SUMS, one program per (hidden chunk, channel chunk,
  token split): recomputes u (or reads u_saved) and du for its hidden chunk over the tiles of its
  split, accumulates dW1, dW2, db1 of its chunk in registers (one partial per split: weight
  gradients cannot be accumulated per token tile without float atomics or a 4C*C partial per
  tile), and the per-(n,c) sums of its channel chunk. Sum dz, sum dz (x - m) and sum g o are
  linear in the hidden units, so each hidden chunk contributes its share from the du and h it
  already holds (two small dots per tile); splits never straddle samples, so the sums stay in
  registers and are flushed once per (sample, split). One launch: x and g are read once.
* Phase 2, `_mlp_dx_kernel`, one program per token tile of one sample: recomputes
  dz = W1^T ((W2^T dO) GELU'(W1 z + b1)) over hidden chunks with a C-wide fp32 dz accumulator
  in registers (C bounded: `_DX_CONFIGS`) and writes dx. Recomputing dz (3 GEMMs per tile)
  replaces writing it in phase 1 and reading it back (2 |x|), and dx gets the fp32 dz rather
  than one rounded to a half dtype. It recomputes u also when the forward saved it
  (recompute=False saves u for phase 1, where u would otherwise be recomputed per channel
  chunk): one GEMM per tile instead of reading 4 |x|.
  The backward thus moves x and g twice and dx once: 5 |x| (forward 3: 8 |x| per training step).

Large C (> 256, fp32 > 128: S12 stages 3-4, M36/M48 C in {320, 384, 512, 768}, in fp32 also
C=192), no C-wide register tile; h and du make one round trip through a transient (N, 4C, T)
scratch in the compute dtype:

* A `_mlp_hidden_kernel`, one program per (token tile, hidden chunk): u and dh with C streamed in
  BLOCK_K chunks (the same `_hidden_tile_grads` the small path's weight-gradient kernel uses),
  writes h and du to the scratch and sum_t du (fp32) as db1 partials.
* B `_mlp_dz_chunk_kernel`, one program per (token tile, channel chunk): dz = W1^T du and
  o = W2 h + b2 over the hidden chunks of the scratch; dz (x's dtype) and the tile's five
  partial sums (`_store_dz_and_sums`).
* W `_mlp_weight_grad_kernel` with SCRATCH (and FUSE_DX after the coefficients): dW1 = du z^T,
  dW2 = dO h^T from the scratch (no recompute); the programs of hidden chunk 0 then write dx
  from x, g, dz. The sums are not taken here as on the small path: with C >= 320 there are
  >= 20 hidden chunks, and per-chunk sums partials at 7x7 tokens would outweigh x itself.
  dz is written in x's dtype: read once more, its sums reduced in-kernel from the fp32 value.

Every reduction across programs is two-stage in a fixed order (`_sum_partials_kernel` loops over
the partials sequentially): no float atomics, bitwise-equal results from run to run on one GPU
model with one build (torch, Triton, driver). The number of splits depends only on the shapes
(not on the device's SM count), so the reduction order is the same on every GPU; but different
architectures compile the dots to different MMA instructions (and the compiler may contract
differently per target and per kernel variant), so the bits may differ across GPU models and
between variants of a kernel: only the tolerances of the tests hold there.

Other entry points: `mlp_backward` (phase 1 with dz itself; on the small path dz comes from the
phase-2 kernel with (P, Q, R, S) = (0, 1, 0, 0)) and `input_grad` (`_input_grad_kernel`: phase 2
alone from a given dz), for tests and callers that want the pieces.

Mixed precision (what autocast runs; `riformer_kernels.pipeline.AutocastPlan`): x, g, dz and
dx fp32 with w1/w2 in a half dtype. Every config and path follows the weights' dtype (the dots'),
the activation pointers are fp32. The two GEMMs on the way from g to dz run on two-term operands
(SPLIT): dh = W2^T (dO_hi + dO_lo) and dz = W1^T (du_hi + du_lo), each term in the half dtype
(`backward_kernels._split`), so those products carry ~2^-16 relative error instead of the half
dtype's rounding of dO and du, which dominated the error of the O(C) gradients (sums of dz with
heavy cancellation; measured in the interpreter at C=32, fp32 input: one draw reached 2.07x the
reference-under-autocast's error without the split; with it the worst of 40 draws (20 per form)
is 1.53x). Cost: one more dot for dh
and one for dz per tile on the small path (and for the sums' dz share in the weight-gradient
kernel); on the large path the du scratch is fp32 (kernel B splits it in registers), the same
bytes as the two half terms.

Interpreter (TRITON_INTERPRET=1, read at import): bf16 `tl.dot` is broken there, so the dots run
in fp32 on operands rounded to bf16 values first (`backward_kernels._operand`), the operands a
GPU's bf16 dots see; fp32 -> bf16 casts truncate there, so stores to bf16 (dz, dx and the large
path's bf16 h/du scratch) round to nearest even by integer arithmetic instead, and stores to fp32
(the mixed mode's dz and dx) are exact.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .backward_kernels import (WEIGHT_GRAD_RUNTIME_INTS, _input_grad_kernel, _mlp_dx_kernel,
                               _mlp_dz_chunk_kernel, _mlp_hidden_kernel,
                               _mlp_weight_grad_kernel, _sum_partials_kernel)
from .device_guard import device_of

INTERPRET = os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')

# Programs the weight-gradient kernel aims for (hidden chunks x channel chunks x token splits).
# A constant rather than the device's SM count, so the reduction order depends on shapes only.
_WEIGHT_GRAD_PROGRAMS = 512

_TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_TL_NAME = {torch.float32: 'fp32', torch.float16: 'fp16', torch.bfloat16: 'bf16'}

# ---------------------------------------------------------------------------------------------
# configurations: every one of them is listed in GPU_BUILD_SPECS and compiled with 0 spills

def _pow2_channels(c: int) -> int:
    return max(16, triton.next_power_of_2(c))


# Path rule (see `_large_path`): C <= SMALL_PATH_MAX_CHANNELS takes the small path, whose dz
# kernel keeps (BLOCK_T x next_pow2(C)) fp32 accumulators in registers for the whole hidden loop
# and recomputes u/du in the weight-gradient kernel: nothing of size 4C*T touches memory. Above
# it, that kernel spills (BLOCK_C=512 had no 0-spill configuration) and would also pad C=320 to
# 512, so the large path streams C in chunks and round-trips h and du through a transient
# (N, 4C, T) scratch instead (2 tensors of 4C*T in the compute dtype, freed after phase 1; not
# saved for backward).
SMALL_PATH_MAX_CHANNELS = 256
# fp32 (IEEE dots on FMA units, whole K slices in registers): BLOCK_C=256 compiled as launched
# for NCHW input (token stride 1 constant) spilled in every configuration tried (8 warps:
# 544-612 bytes; 16 warps: 4-44 bytes), so fp32 with C in (128, 256] takes the large path too
# (both layouts, so NCHW and channels_last inputs get the same kernels and summation order).
SMALL_PATH_MAX_CHANNELS_FP32 = 128

# BLOCK_C (next power of two of C, >= 16) -> (BLOCK_T, BLOCK_H, num_warps, num_stages) of
# _mlp_dx_kernel. Its dz accumulator is BLOCK_T * BLOCK_C fp32 in registers for the whole hidden
# loop, plus x, g, z, dO and a W1 and a W2 chunk. Chosen by compiling for sm_80/sm_90 and
# reading ptxas' spill counts (the GPU build report): every entry has 0 spill bytes. (Chosen
# for the earlier dz kernel, which also kept o in registers; BLOCK_C=512 spilled there in the
# configurations tried, BLOCK_T=BLOCK_H=16 with 8 or 16 warps, hence the path rule above.)
# BLOCK_C=256 is fp16/bf16 only (SMALL_PATH_MAX_CHANNELS_FP32).
# 4 warps (was 8): a 16x32 tile of the u / dh dots is two 16x16 MMA tiles, so 8 warps left 6 of
# them duplicating it; compiled as launched (aligned, gpu_build_report) 4 warps are spill-free
# (C<=256 T16 H32 w4: 206-236 registers, was H16 w8).
_DX_CONFIGS = {16: (16, 32, 4, 3), 32: (16, 32, 4, 3), 64: (16, 32, 4, 3), 128: (16, 32, 4, 3),
               256: (16, 32, 4, 1)}
# fp32 exceptions, found once the specs compiled the kernels as launched (unit strides constant):
# C<=32 (16, 32, 8, 3) spilled 4 bytes at sm_80 in channels_last with u_saved; C<=64 spilled
# 24 bytes at sm_90 in NCHW without u (and (16, 16, 8, 3) 8 bytes in channels_last; (16, 32, 8,
# 2) 16 bytes in NCHW); C<=128 (16, 32, 8, 3) spilled 20 bytes at sm_90 in NCHW without u (dx
# kernel), (16, 32, 8, 2) is clean. Applied to both layouts (same summation order for both).
# Compiled as launched (with Triton's divisibility-16 attributes), (16, 16, 8, 2) at C<=64 spilled
# 8 bytes at sm_80 in NCHW; (16, 32, 4, 2) is spill-free (72-80 registers) and halves the warps
# duplicating the 16x32 dots.
# C<=128 keeps 8 warps: with 4, the launched NCHW variant spilled 600 bytes at sm_90.
_DX_CONFIGS_FP32 = {32: (16, 32, 4, 2), 64: (16, 32, 4, 2), 128: (16, 32, 8, 2)}
# _mlp_weight_grad_kernel, small path (recompute or u_saved, with the sums: SUMS):
# (BLOCK_T, BLOCK_H, BLOCK_W = BLOCK_K, num_warps). 4 warps or 64-wide tiles spilled before the
# sums were added. With SUMS (two more (BLOCK_T, BLOCK_W) dot results per tile), BLOCK_T=32 spilled
# in fp16/bf16 (BLOCK_W=32 with u: 72-128 bytes; BLOCK_W=16 with u at sm_90: 24-32 bytes), so
# half takes BLOCK_T=16 (clean for both widths). fp32 BLOCK_W=32: (16, 32) spilled 8 bytes at
# sm_90 (NCHW, no u), (16, 16) is clean; fp32 BLOCK_W=16 (C <= 16): (16, 64) spilled 16-32
# bytes at sm_90, (16, 32) is clean.
_WG_BLOCK_T, _WG_BLOCK_H, _WG_BLOCK_W, _WG_WARPS = 16, 32, 32, 8
_WG_BLOCK_T_FP32 = {16: 16, 32: 16}
_WG_BLOCK_H_FP32 = {16: 32, 32: 16}
# Large-C path: one configuration per (kernel, dtype) for every C (C is streamed, so C only
# changes loop trip counts), each checked spill-free (u_saved both ways) by GPU_BUILD_SPECS.
# fp32 runs IEEE fp32 dots (FMA, no tensor cores) and needs smaller tiles than fp16/bf16.
#   'hidden': _mlp_hidden_kernel (BLOCK_T, BLOCK_H, BLOCK_K, num_warps, num_stages)
#   'dz':     _mlp_dz_chunk_kernel (BLOCK_T, BLOCK_C, BLOCK_H, num_warps, num_stages)
#   'wg':     _mlp_weight_grad_kernel in scratch mode (BLOCK_T, BLOCK_H, BLOCK_W, num_warps)
_LARGE_CONFIGS = {
    # fp32 'hidden' BLOCK_K 16: with 32 the launched NCHW variants spilled 4 bytes at sm_90
    torch.float32: dict(hidden=(64, 32, 16, 4, 2), dz=(64, 64, 16, 8, 2), wg=(32, 32, 32, 8)),
    torch.float16: dict(hidden=(64, 32, 32, 4, 2), dz=(64, 64, 32, 8, 2), wg=(32, 64, 64, 8)),
    torch.bfloat16: dict(hidden=(64, 32, 32, 4, 2), dz=(64, 64, 32, 8, 2), wg=(32, 64, 64, 8)),
}
_SUM_BLOCK, _SUM_WARPS = 512, 4
# 8 warps: with 4, the launched fp16 NCHW variant (every channel stride divisible by 16)
# spilled 28 bytes at sm_90.
_INPUT_GRAD_BLOCK_T, _INPUT_GRAD_BLOCK_C, _INPUT_GRAD_WARPS = 32, 32, 8


def _small_path_max(dtype: torch.dtype) -> int:
    """Largest C of the small path (read at call time, so tests can move the thresholds)."""
    if dtype == torch.float32:
        return min(SMALL_PATH_MAX_CHANNELS, SMALL_PATH_MAX_CHANNELS_FP32)
    return SMALL_PATH_MAX_CHANNELS


def _large_path(c: int, dtype: torch.dtype) -> bool:
    """The documented path rule."""
    return c > _small_path_max(dtype)


# The config lookups take the activation layout ('nchw' | 'cl') too: every (dtype, layout)
# is compiled as launched by GPU_BUILD_SPECS; no entry needs a per-layout value at present.

def _dx_config(c: int, dtype: torch.dtype, layout: str):
    """_mlp_dx_kernel: (BLOCK_T, BLOCK_C, BLOCK_H, num_warps, num_stages)."""
    bc = _pow2_channels(c)
    table = _DX_CONFIGS
    if dtype == torch.float32:
        table = {**_DX_CONFIGS, **_DX_CONFIGS_FP32}
    bt, bh, warps, stages = table[bc]
    return bt, bc, bh, warps, stages


def _wg_config(c: int, dtype: torch.dtype, layout: str):
    """Recompute-mode weight-gradient config: (BLOCK_T, BLOCK_H, BLOCK_W, BLOCK_K, warps)."""
    bw = min(_WG_BLOCK_W, _pow2_channels(c))
    bt = _WG_BLOCK_T_FP32.get(bw, _WG_BLOCK_T) if dtype == torch.float32 else _WG_BLOCK_T
    bh = _WG_BLOCK_H_FP32.get(bw, _WG_BLOCK_H) if dtype == torch.float32 else _WG_BLOCK_H
    return bt, bh, bw, bw, _WG_WARPS


def _large_config(dtype: torch.dtype, layout: str) -> dict:
    """Large-C path: {'hidden': ..., 'dz': ..., 'wg': ...} (see _LARGE_CONFIGS)."""
    return dict(_LARGE_CONFIGS[dtype])


def _dot_f32(dtype: torch.dtype) -> bool:
    # The interpreter's bf16 tl.dot returns garbage (ENVIRONMENT.md).
    return INTERPRET and dtype == torch.bfloat16


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get IEEE fp32 dots (not TF32): the fp32 contract is 1e-4 relative error.
    return 'ieee' if dtype == torch.float32 else 'tf32'


def _round_bf16(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# launches

def _empty(shape, dtype, device):
    """Every output of this module is allocated here (tests fill it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _empty_like(x: torch.Tensor):
    """Same shape, dtype and memory format as x (NCHW or channels_last)."""
    return torch.empty_like(x)


def _token_strides(t: torch.Tensor):
    """(stride_n, stride_c, stride_token) of an (N, C, H, W) tensor whose H, W flatten to one
    token axis: true of NCHW-contiguous and channels_last tensors."""
    n, c, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    if h > 1 and w > 1 and sh != w * sw:
        raise ValueError(f"H and W of a tensor with strides {t.stride()} do not flatten to one "
                         "token axis; pass an NCHW-contiguous or channels_last tensor")
    return sn, sc, (sw if w > 1 else sh)


def _canonical(t: torch.Tensor) -> torch.Tensor:
    """t itself when its H, W flatten to one token axis and its token stride (NCHW) or channel
    stride (channels_last) is 1, else an NCHW-contiguous copy. Every tensor the kernels address
    through strides goes through here: those are the two layouts GPU_BUILD_SPECS compiles
    (Triton turns an integer argument equal to 1 into a compile-time constant at launch)."""
    try:
        _, sc, st = _token_strides(t)
    except ValueError:
        return t.contiguous()
    return t if 1 in (sc, st) else t.contiguous()


def _layout(t: torch.Tensor) -> str:
    """'nchw' (token stride 1) or 'cl' (channel stride 1) of a `_canonical` tensor."""
    return 'nchw' if _token_strides(t)[2] == 1 else 'cl'


def _as_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t in `like`'s layout (a copy only when they differ): g, dz of another layout than x
    would launch a kernel variant with unit strides in mixed places, which no spec covers."""
    t = _canonical(t)
    if _layout(t) == _layout(like):
        return t
    fmt = torch.channels_last if _layout(like) == 'cl' else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def _hidden_contiguous(u: torch.Tensor) -> torch.Tensor:
    """u_saved with hidden stride 1 (channels_last, the layout forward.py saves it in);
    another layout is copied to it."""
    try:
        if _token_strides(u)[1] == 1:
            return u
    except ValueError:
        pass
    return u.contiguous(memory_format=torch.channels_last)


def _check_floating(name, t, dtypes=tuple(_TORCH_TO_TL)):
    if t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; the triton backward takes {dtypes}")


def _sum_partials(p: torch.Tensor, outer: int, splits: int, inner: int) -> torch.Tensor:
    """(outer, splits, inner) fp32 -> (outer, inner), summed over splits in a fixed order.
    One split is its own sum: no launch (a large-C weight gradient often has one split)."""
    if splits == 1:
        return p.view(outer, inner)
    out = _empty((outer, inner), torch.float32, p.device)
    grid = (outer, triton.cdiv(inner, _SUM_BLOCK))
    _sum_partials_kernel[grid](p, out, splits, inner, BLOCK=_SUM_BLOCK, num_warps=_SUM_WARPS)
    return out


def _prepare(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved):
    """Checks the phase-1 inputs; the launch arguments shared by every phase-1 kernel."""
    if x.dim() != 4 or g.shape != x.shape:
        raise ValueError(f"x and g must both be (N, C, H, W); got {tuple(x.shape)}, "
                         f"{tuple(g.shape)}")
    n, c, hh, ww = x.shape
    hid = w1.shape[0]
    cdt = w1.dtype
    for name, t in (('x', x), ('g', g), ('w1', w1), ('w2', w2), ('b1', b1), ('b2', b2)):
        _check_floating(name, t)
    # One dtype for x and g and one for w1 and w2 (the dots'): the same, or fp32 activations
    # with half weights (the mixed-precision mode autocast runs; dz and dx are then fp32).
    mixed = _is_mixed(x, w1)
    if not (x.dtype == g.dtype and cdt == w2.dtype and (x.dtype == cdt or mixed)):
        raise ValueError(f"x, g, w1, w2 must share one dtype, or x and g be float32 with w1 "
                         f"and w2 in one half dtype; got {x.dtype}, {g.dtype}, {w1.dtype}, "
                         f"{w2.dtype}")
    if tuple(w1.shape[:2]) != (hid, c) or tuple(w2.shape[:2]) != (c, hid):
        raise ValueError(f"w1 {tuple(w1.shape)} / w2 {tuple(w2.shape)} do not match C={c}")
    if u_saved is not None and (tuple(u_saved.shape) != (n, hid, hh, ww) or u_saved.dtype != cdt):
        raise ValueError(f"u_saved must be ({n}, {hid}, {hh}, {ww}) {cdt}; got "
                         f"{tuple(u_saved.shape)} {u_saved.dtype}")
    T = hh * ww
    x = _canonical(x)
    g = _as_layout(g, x)
    has_u = u_saved is not None
    u = _hidden_contiguous(u_saved) if has_u else x     # x: a placeholder pointer, never read
    a = dict(
        n=n, c=c, T=T, hid=hid, dev=x.device, has_u=has_u, layout=_layout(x),
        x=x, g=g, u=u, sx=_token_strides(x), sg=_token_strides(g),
        su=_token_strides(u) if has_u else (0, 0, 0),
        w1=w1.reshape(hid, c).contiguous(), w2=w2.reshape(c, hid).contiguous(),
        b1=b1.contiguous(), b2=b2.contiguous(),
        dot_f32=_dot_f32(cdt), prec=_precision(cdt),
        round_bf16=_round_bf16(cdt) or _round_bf16(x.dtype), split=mixed)
    a.update(zip(('mean', 'A', 'B', 'l2'),
                 (v.to(torch.float32).contiguous() for v in (mean, A, B, l2))))
    return a


def _db2(a, sums):
    """db2 = sum_{n,t} l2 g = sum_n l2 * SG: from the sums, in a fixed order over n."""
    return _sum_partials((a['l2'] * sums[0]).contiguous(), 1, a['n'], a['c']).view(a['c'])


def _reduce_weight_partials(a, dw1p, dw2p, db1p, wsplits, bsplits):
    hid, c = a['hid'], a['c']
    dw1 = _sum_partials(dw1p, 1, wsplits, hid * c).view(hid, c, 1, 1)
    dw2 = _sum_partials(dw2p, 1, wsplits, hid * c).view(c, hid, 1, 1)
    db1 = _sum_partials(db1p, 1, bsplits, hid).view(hid)
    if bsplits == 1:
        db1 = db1.clone()       # else a view of a partials buffer (maybe an op's input: alias)
    return dw1, db1, dw2


# --- small path: phase 1 = one weight-gradient launch with the sums (SUMS); phase 2 recomputes
# dz per token tile (`_mlp_dx_kernel`). The backward moves x and g twice and dx once: 5 |x|.

def _weights_sums_small(a):
    """Phase 1 of the small path: (dw1, db1, dw2, db2, sums) from one weight-gradient launch."""
    n, c = a['n'], a['c']
    dw1p, dw2p, db1p, wsplits, part, slots = _launch_weight_grad(
        a, *_wg_config(c, a['w1'].dtype, a['layout']), sums=True)
    sums = _sum_partials(part, 5 * n, slots, c).view(5, n, c)
    dw1, db1, dw2 = _reduce_weight_partials(a, dw1p, dw2p, db1p, wsplits, wsplits)
    return dw1, db1, dw2, _db2(a, sums), sums


def _dx_small(a, P, Q, R, S):
    """Phase 2 of the small path: dx = P g + Q dz + R (x - m) + S with dz recomputed (from x,
    also when u_saved is given)."""
    n, c = a['n'], a['c']
    bt, bc, bh, warps, stages = _dx_config(c, a['w1'].dtype, a['layout'])
    x = a['x']
    dx = _empty_like(x)
    tiles = triton.cdiv(a['T'], bt)
    P, Q, R, S = (v.to(torch.float32).expand(n, c).contiguous() for v in (P, Q, R, S))
    _mlp_dx_kernel[(n * tiles,)](
        x, a['g'], a['mean'], a['A'], a['B'], a['l2'], a['w1'], a['b1'], a['w2'],
        P, Q, R, S, dx, c, a['T'], a['hid'], tiles,
        *a['sx'], *a['sg'], *_token_strides(dx),
        BLOCK_T=bt, BLOCK_C=bc, BLOCK_H=bh, DOT_F32=a['dot_f32'],
        PRECISION=a['prec'], ROUND_BF16=a['round_bf16'], SPLIT=a['split'], num_warps=warps,
        num_stages=stages)
    return dx


# --- large path: phase 1 = kernels A (scratch) and B (dz, sums); the weight-gradient kernel
# reads the scratch, with phase 2 fused in (FUSE_DX) in the autograd backward.

def _weights_large(a, scratch, fuse=None):
    """dw1, db1, dw2 from the scratch (and dx when `fuse` = dict(dz, P, Q, R, S, dx))."""
    hs, dus, db1p = scratch
    bt, bh, bw, warps = _large_config(a['w1'].dtype, a['layout'])['wg']
    dw1p, dw2p, _, wsplits, _, _ = _launch_weight_grad(a, bt, bh, bw, bw, warps, hs, dus,
                                                       fuse=fuse)
    return _reduce_weight_partials(a, dw1p, dw2p, db1p, wsplits, db1p.shape[0])


def _require_path(a, large: bool, op: str):
    if _large_path(a['c'], a['w1'].dtype) != large:
        which = 'large' if large else 'small'
        raise ValueError(f"{op} is the {which}-C path's (C={a['c']} {a['w1'].dtype} takes the "
                         f"other one; see _large_path)")


def _mlp_backward_impl(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved):
    a = _prepare(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved)
    if _large_path(a['c'], w1.dtype):
        dz, part, tiles, scratch = _phase1_large(a)
        sums = _sum_partials(part, 5 * a['n'], tiles, a['c']).view(5, a['n'], a['c'])
        dw1, db1, dw2 = _weights_large(a, scratch)
        return dz, dw1, db1, dw2, _db2(a, sums), sums
    dw1, db1, dw2, db2, sums = _weights_sums_small(a)
    # dz through the phase-2 kernel with (P, Q, R, S) = (0, 1, 0, 0): exactly dz.
    zero, one = (torch.full((1, 1), v, dtype=torch.float32, device=a['dev']) for v in (0., 1.))
    dz = _dx_small(a, zero, one, zero, zero)
    return dz, dw1, db1, dw2, db2, sums


def _dus_dtype(cdt: torch.dtype, split: bool) -> torch.dtype:
    """The du scratch's dtype: the compute dtype, or fp32 in the mixed-precision mode (SPLIT),
    whose kernel B splits du into two half terms in registers (one fp32 read instead of two
    half ones: the same bytes)."""
    return torch.float32 if split else cdt


def _is_mixed(x: torch.Tensor, w1: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and w1.dtype in (torch.float16, torch.bfloat16)


def _scratch_shapes(n, c, T, hid, dtype):
    """Shapes of the large path's scratch `backward_dz` hands to `backward_weights_dx`: (hs,
    dus, db1 partials)."""
    tiles_a = triton.cdiv(T, _large_config(dtype, 'nchw')['hidden'][0])
    return (n, hid, T), (n, hid, T), (n * tiles_a, hid)


def _backward_weights_sums_impl(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved):
    a = _prepare(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved)
    _require_path(a, False, 'backward_weights_sums')
    return _weights_sums_small(a)


def _backward_dx_impl(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved, P, Q, R, S):
    a = _prepare(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved)
    _require_path(a, False, 'backward_dx')
    return _dx_small(a, P, Q, R, S)


def _backward_dz_impl(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved):
    a = _prepare(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved)
    _require_path(a, True, 'backward_dz')
    dz, part, tiles, scratch = _phase1_large(a)
    sums = _sum_partials(part, 5 * a['n'], tiles, a['c']).view(5, a['n'], a['c'])
    return (dz, sums, _db2(a, sums), *scratch)


def _backward_weights_dx_impl(g, x, dz, mean, A, B, w1, b1, w2, b2, l2, u_saved, hs, dus, db1p,
                              P, Q, R, S):
    a = _prepare(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved)
    _require_path(a, True, 'backward_weights_dx')
    if dz.shape != x.shape:
        raise ValueError(f"dz must have x's shape {tuple(x.shape)}; got {tuple(dz.shape)}")
    _check_floating('dz', dz)
    want = _scratch_shapes(a['n'], a['c'], a['T'], a['hid'], w1.dtype)
    if tuple(tuple(t.shape) for t in (hs, dus, db1p)) != want:
        raise ValueError("hs, dus, db1p must be the scratch backward_dz returned")
    x = a['x']
    dx = _empty_like(x)
    fuse = dict(dz=_as_layout(dz, x), dx=dx)
    fuse.update(zip('PQRS', (v.to(torch.float32).contiguous() for v in (P, Q, R, S))))
    dw1, db1, dw2 = _weights_large(a, (hs, dus, db1p), fuse)
    return dw1, db1, dw2, dx


def weight_grad_splits(n: int, tiles: int, programs_per_split: int, x_bytes: int,
                       partial_bytes: int):
    """How the weight-gradient kernel splits the N * tiles token tiles:
    (splits, tiles_per_split, splits_per_sample, samples_per_split) (`split_layout`).

    Aims at _WEIGHT_GRAD_PROGRAMS programs with each split's partials (`partial_bytes`,
    written and read back) under a quarter of |x| in all. Depends on the shapes only (not the
    device): the same bits on every GPU."""
    want = max(1, min(n * tiles, triton.cdiv(_WEIGHT_GRAD_PROGRAMS, programs_per_split),
                      x_bytes // (4 * partial_bytes)))
    return split_layout(n, tiles, want)


def split_layout(n: int, tiles: int, want: int):
    """About `want` splits of N samples x `tiles` token tiles that never straddle a sample
    boundary: ranges of one sample's tiles (want >= N) or groups of whole samples."""
    if want >= n:
        per_sample = min(tiles, want // n)
        tps = triton.cdiv(tiles, per_sample)
        per_sample = triton.cdiv(tiles, tps)            # no empty split
        return n * per_sample, tps, per_sample, 1
    samples = triton.cdiv(n, want)
    return triton.cdiv(n, samples), samples * tiles, 1, samples


def _launch_weight_grad(a, bt, bh, bw, bk, warps, hs=None, dus=None, fuse=None, sums=False):
    """_mlp_weight_grad_kernel over (hidden chunks, channel chunks, token splits); recompute
    mode, or scratch mode when the (N, HID, T) scratch hs/dus is given. Returns the fp32
    partials dw1p (S, HID, C), dw2p (S, C, HID), db1p (S, HID) (None in scratch mode), S, and
    with `sums` the sums' partials (5, N, SLOTS, C) and SLOTS (else None, 0).
    `fuse` (dz, P, Q, R, S, dx in x's layout): FUSE_DX, dx written by the same launch.
    Unused pointers get x or a['mean'] as placeholders (x's layout: the same unit strides in
    every variant); none is read."""
    n, c, T, hid, dev = a['n'], a['c'], a['T'], a['hid'], a['dev']
    scratch = hs is not None
    n_hb, n_cb = triton.cdiv(hid, bh), triton.cdiv(c, bw)
    tiles = triton.cdiv(T, bt)
    x = a['x']
    splits, tps, per_sample, samples = weight_grad_splits(
        n, tiles, n_hb * n_cb, x.numel() * x.element_size(), 2 * hid * c * 4)
    dw1p = _empty((splits, hid, c), torch.float32, dev)
    dw2p = _empty((splits, c, hid), torch.float32, dev)
    db1p = None if scratch else _empty((splits, hid), torch.float32, dev)
    slots = n_hb * per_sample if sums else 0
    part = _empty((5, n, slots, c), torch.float32, dev) if sums else None
    # scratch mode reads h and du from the scratch, never u: no u pointer or strides (HAS_U and
    # u's strides would only make another specialisation of the same code).
    has_u = a['has_u'] and not scratch
    m = a['mean']
    if fuse is None:
        dz, dx, pqrs = x, x, (m, m, m, m)
    else:
        dz, dx, pqrs = fuse['dz'], fuse['dx'], tuple(fuse[k] for k in 'PQRS')
    _mlp_weight_grad_kernel[(n_hb, n_cb, splits)](
        x, a['g'], a['u'] if has_u else x, a['A'], a['B'], a['l2'], a['w1'], a['b1'], a['w2'],
        a['b2'], hs if scratch else x, dus if scratch else x, dw1p, dw2p,
        dw1p if scratch else db1p, part if sums else m,
        dz, m, *pqrs, dx,
        n, c, T, hid, tiles, tps, per_sample, samples, *a['sx'], *a['sg'],
        *(a['su'] if has_u else (0, 0, 0)), *_token_strides(dz), *_token_strides(dx),
        HAS_U=has_u, SCRATCH=scratch, SUMS=sums, FUSE_DX=fuse is not None, BLOCK_T=bt,
        BLOCK_H=bh, BLOCK_W=bw, BLOCK_K=bk, DOT_F32=a['dot_f32'], PRECISION=a['prec'],
        ROUND_BF16=a['round_bf16'], SPLIT=a['split'], num_warps=warps)
    return dw1p, dw2p, db1p, splits, part, slots


def _phase1_large(a):
    """C > SMALL_PATH_MAX_CHANNELS: no C-wide register tile.

    A (_mlp_hidden_kernel): h, du per (token tile, hidden chunk), C streamed in BLOCK_K chunks,
      written to the scratch; sum_t du per tile into fp32 db1 partials.
    B (_mlp_dz_chunk_kernel): dz = W1^T du, o = W2 h + b2 per (token tile, C chunk) from the
      scratch; dz and the five partial sums (the small path's epilogue).
    W (_mlp_weight_grad_kernel, scratch mode): dW1 = du z^T, dW2 = dO h^T from the scratch,
      launched by `_weights_phase` (after the coefficients when dx is fused into it).
    Returns dz, the sums' partials, their tile count and the scratch (hs, dus, db1 partials).

    Scratch dtype = the compute dtype (w1's): h and du enter every GEMM that reads them (dz, o,
    dW1, dW2) rounded to that dtype, exactly as the small path rounds them before its dots
    (du.to(cdt), h.to(cdt)), so the two paths differ only in summation order; db1 is summed
    from the fp32 du in kernel A, also as in the small path. fp32 scratch would add no accuracy
    to those GEMMs and double the scratch traffic (2 x 4C*T written once, read twice).

    Cost against docs/design.md's "store nothing of size 4C*T": the scratch is 8 |x| of transient
    memory (freed after kernel W; never saved for backward) and 8 |x| written + 16 |x| read,
    unless it stays in L2 (S12 stage 4 at 7x7, N=64, bf16: 2 x 19 MB). Not measured on a GPU.
    """
    n, c, T, hid, dev = a['n'], a['c'], a['T'], a['hid'], a['dev']
    x = a['x']
    hs = _empty((n, hid, T), a['w1'].dtype, dev)
    dus = _empty((n, hid, T), _dus_dtype(a['w1'].dtype, a['split']), dev)

    cfg = _large_config(a['w1'].dtype, a['layout'])
    bt, bh, bk, warps, stages = cfg['hidden']
    tiles_a, n_hb = triton.cdiv(T, bt), triton.cdiv(hid, bh)
    db1p = _empty((n * tiles_a, hid), torch.float32, dev)
    _mlp_hidden_kernel[(n * tiles_a * n_hb,)](
        x, a['g'], a['u'], a['A'], a['B'], a['l2'], a['w1'], a['b1'], a['w2'], hs, dus, db1p,
        c, T, hid, tiles_a, n_hb, *a['sx'], *a['sg'], *a['su'],
        HAS_U=a['has_u'], BLOCK_T=bt, BLOCK_H=bh, BLOCK_K=bk, DOT_F32=a['dot_f32'],
        PRECISION=a['prec'], ROUND_BF16=a['round_bf16'], SPLIT=a['split'], num_warps=warps,
        num_stages=stages)

    bt, bc, bh, warps, stages = cfg['dz']
    tiles, n_cb = triton.cdiv(T, bt), triton.cdiv(c, bc)
    dz = _empty_like(x)
    part = _empty((5, n, tiles, c), torch.float32, dev)
    _mlp_dz_chunk_kernel[(n * tiles * n_cb,)](
        x, a['g'], a['mean'], a['w1'], a['w2'], a['b2'], hs, dus, dz, part,
        n, c, T, hid, tiles, n_cb, *a['sx'], *a['sg'], *_token_strides(dz),
        BLOCK_T=bt, BLOCK_C=bc, BLOCK_H=bh, DOT_F32=a['dot_f32'], PRECISION=a['prec'],
        ROUND_BF16=a['round_bf16'], SPLIT=a['split'], num_warps=warps, num_stages=stages)

    return dz, part, tiles, (hs, dus, db1p)


def _input_grad_impl(g, dz, x, mean, P, Q, R, S):
    if not (g.shape == dz.shape == x.shape) or x.dim() != 4:
        raise ValueError(f"g, dz, x must be one (N, C, H, W) shape; got {tuple(g.shape)}, "
                         f"{tuple(dz.shape)}, {tuple(x.shape)}")
    for name, t in (('g', g), ('dz', dz), ('x', x)):
        _check_floating(name, t)
    n, c, hh, ww = x.shape
    T = hh * ww
    x = _canonical(x)
    g, dz = _as_layout(g, x), _as_layout(dz, x)
    mean, P, Q, R, S = (v.to(torch.float32).contiguous() for v in (mean, P, Q, R, S))
    dx = _empty_like(x)
    tiles = triton.cdiv(T, _INPUT_GRAD_BLOCK_T)
    _input_grad_kernel[(n * tiles, triton.cdiv(c, _INPUT_GRAD_BLOCK_C))](
        g, dz, x, mean, P, Q, R, S, dx, c, T, tiles,
        *_token_strides(g), *_token_strides(dz), *_token_strides(x), *_token_strides(dx),
        BLOCK_T=_INPUT_GRAD_BLOCK_T, BLOCK_C=_INPUT_GRAD_BLOCK_C, ROUND_BF16=_round_bf16(dx.dtype),
        num_warps=_INPUT_GRAD_WARPS)
    return dx


# ---------------------------------------------------------------------------------------------
# torch.library ops (no graph break under torch.compile) and the public launch functions

@torch.library.custom_op('riformer_triton::mlp_backward', mutates_args=())
def _mlp_backward_op(g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, A: torch.Tensor,
                     B: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                     b2: torch.Tensor, l2: torch.Tensor, u_saved: Optional[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                torch.Tensor, torch.Tensor]:
    with device_of(x):
        return _mlp_backward_impl(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved)


def _fake_weight_grads_and_sums(x, w1):
    """Fake (dw1, db1, dw2, db2, sums): fp32, the parameter shapes and (5, N, C)."""
    n, c = x.shape[:2]
    hid = w1.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    return (x.new_empty((hid, c, 1, 1), **f32), x.new_empty((hid,), **f32),
            x.new_empty((c, hid, 1, 1), **f32), x.new_empty((c,), **f32),
            x.new_empty((5, n, c), **f32))


@_mlp_backward_op.register_fake
def _(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved):
    return (torch.empty_like(x), *_fake_weight_grads_and_sums(x, w1))


@torch.library.custom_op('riformer_triton::input_grad', mutates_args=())
def _input_grad_op(g: torch.Tensor, dz: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                   P: torch.Tensor, Q: torch.Tensor, R: torch.Tensor, S: torch.Tensor
                   ) -> torch.Tensor:
    with device_of(x):
        return _input_grad_impl(g, dz, x, mean, P, Q, R, S)


@_input_grad_op.register_fake
def _(g, dz, x, mean, P, Q, R, S):
    return torch.empty_like(x)


@torch.library.custom_op('riformer_triton::backward_weights_sums', mutates_args=())
def _backward_weights_sums_op(g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                              A: torch.Tensor, B: torch.Tensor, w1: torch.Tensor,
                              b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                              l2: torch.Tensor, u_saved: Optional[torch.Tensor]
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor]:
    with device_of(x):
        return _backward_weights_sums_impl(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved)


@_backward_weights_sums_op.register_fake
def _(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved):
    return _fake_weight_grads_and_sums(x, w1)


@torch.library.custom_op('riformer_triton::backward_dx', mutates_args=())
def _backward_dx_op(g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, A: torch.Tensor,
                    B: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                    b2: torch.Tensor, l2: torch.Tensor, u_saved: Optional[torch.Tensor],
                    P: torch.Tensor, Q: torch.Tensor, R: torch.Tensor, S: torch.Tensor
                    ) -> torch.Tensor:
    with device_of(x):
        return _backward_dx_impl(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved, P, Q, R, S)


@_backward_dx_op.register_fake
def _(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved, P, Q, R, S):
    return torch.empty_like(x)


@torch.library.custom_op('riformer_triton::backward_dz', mutates_args=())
def _backward_dz_op(g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, A: torch.Tensor,
                    B: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                    b2: torch.Tensor, l2: torch.Tensor, u_saved: Optional[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor, torch.Tensor]:
    with device_of(x):
        return _backward_dz_impl(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved)


@_backward_dz_op.register_fake
def _(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved):
    n, c, hh, ww = x.shape
    hid = w1.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    hs, dus, db1p = _scratch_shapes(n, c, hh * ww, hid, w1.dtype)
    return (torch.empty_like(x), x.new_empty((5, n, c), **f32), x.new_empty((c,), **f32),
            x.new_empty(hs, dtype=w1.dtype),
            x.new_empty(dus, dtype=_dus_dtype(w1.dtype, _is_mixed(x, w1))),
            x.new_empty(db1p, **f32))


@torch.library.custom_op('riformer_triton::backward_weights_dx', mutates_args=())
def _backward_weights_dx_op(g: torch.Tensor, x: torch.Tensor, dz: torch.Tensor,
                            mean: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                            w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                            b2: torch.Tensor, l2: torch.Tensor, u_saved: Optional[torch.Tensor],
                            hs: torch.Tensor, dus: torch.Tensor, db1p: torch.Tensor,
                            P: torch.Tensor, Q: torch.Tensor, R: torch.Tensor, S: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with device_of(x):
        return _backward_weights_dx_impl(g, x, dz, mean, A, B, w1, b1, w2, b2, l2, u_saved,
                                         hs, dus, db1p, P, Q, R, S)


@_backward_weights_dx_op.register_fake
def _(g, x, dz, mean, A, B, w1, b1, w2, b2, l2, u_saved, hs, dus, db1p, P, Q, R, S):
    c = x.shape[1]
    hid = w1.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    return (x.new_empty((hid, c, 1, 1), **f32), x.new_empty((hid,), **f32),
            x.new_empty((c, hid, 1, 1), **f32), torch.empty_like(x))


def backward_weights_sums(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved=None):
    """Small-C phase 1 (one launch of the weight-gradient kernel in SUMS mode). Returns
    (dw1, db1, dw2, db2, sums) as `mlp_backward` does; dz is not computed."""
    return torch.ops.riformer_triton.backward_weights_sums(g, x, mean, A, B, w1, b1, w2, b2, l2,
                                                           u_saved)


def backward_dx(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved, P, Q, R, S):
    """Small-C phase 2: dx = P g + Q dz + R (x - m) + S with dz recomputed per token tile.
    P, Q, R, S: (N, C) (or broadcastable to it). dx in x's dtype and memory format."""
    return torch.ops.riformer_triton.backward_dx(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved,
                                                 P, Q, R, S)


def backward_dz(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved=None):
    """Large-C phase 1 (kernels A and B). Returns (dz, sums, db2, hs, dus, db1p): dz, sums, db2
    as `mlp_backward`; hs, dus, db1p the scratch, to be handed to `backward_weights_dx`."""
    return torch.ops.riformer_triton.backward_dz(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved)


def backward_weights_dx(g, x, dz, mean, A, B, w1, b1, w2, b2, l2, u_saved, hs, dus, db1p,
                        P, Q, R, S):
    """Large-C second half: the weight-gradient kernel on the scratch with phase 2 fused in
    (FUSE_DX). P, Q, R, S: (N, C) coefficients of dx = P g + Q dz + R (x - m) + S. Returns
    (dw1, db1, dw2, dx); dx in x's dtype and memory format."""
    return torch.ops.riformer_triton.backward_weights_dx(g, x, dz, mean, A, B, w1, b1, w2, b2,
                                                         l2, u_saved, hs, dus, db1p, P, Q, R, S)


def mlp_backward(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved=None):
    """Phase 1 of the block backward with dz itself: (dz, dw1, db1, dw2, db2, sums). The
    training backward (the pipeline) never materialises dz on the small path; this entry
    point does (through the phase-2 kernel with (P, Q, R, S) = (0, 1, 0, 0)), for callers and
    tests that want it.

    g = dL/dout and x: (N, C, H, W), NCHW or channels_last, fp32/fp16/bf16, one dtype shared
    with w1/w2. mean, A, B, l2: (N, C) (l2 = layer_scale_2 times the drop-path factor).
    w1 (4C, C, 1, 1), b1 (4C,), w2 (C, 4C, 1, 1), b2 (C,). u_saved: optional (N, 4C, H, W)
    fc1 output in the compute dtype; given, GEMM1 is skipped. dz: x's dtype and memory format;
    dw1, db1, dw2, db2: fp32 with the parameter shapes; sums (5, N, C) fp32 =
    [sum g, sum g (x - m), sum dz, sum dz (x - m), sum g o] over tokens.
    """
    return torch.ops.riformer_triton.mlp_backward(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved)


def input_grad(g, dz, x, mean, P, Q, R, S):
    """Phase 2: dx = P g + Q dz + R (x - m) + S, in x's dtype and memory format."""
    return torch.ops.riformer_triton.input_grad(g, dz, x, mean, P, Q, R, S)


# ---------------------------------------------------------------------------------------------
# ahead-of-time build specs for every configuration the launches can use
#
# A spec must be the kernel Triton compiles at launch, and Triton's launcher turns every integer
# argument equal to 1 into a compile-time constant. So each spec is given per activation layout
# (x, g, dz, dx share one after `_canonical` / `_as_layout`): NCHW has its token strides
# (sxt, sgt, szt, sdt) == 1, channels_last ('/cl' in the description) its channel strides; u_saved
# is always hidden-contiguous (suc == 1, `_hidden_contiguous`), and without u its strides are 0
# (not specialised). Weights are addressed without stride arguments (contiguous by the launch).
# tests/test_triton_backward.py (test_gpu_build_specs_are_the_kernels_launched) records real
# launches and checks each is exactly one spec, whose constant-1 arguments are exactly those
# the launcher specialises to 1. Not modelled: sizes equal to 1 in degenerate shapes (N=1, H=W=1,
# a single token split), except TILES=1 of the large path's kernels A and B (every token of a
# sample in one tile: 7x7 stages), which is its own spec; and Triton's divisibility-by-16 hints
# (the report compiles the unaligned worst case, as forward.py's specs do).

# (n, c, token) stride arguments of each tensor a kernel addresses through strides.
_STRIDE_ARGS = {
    '_mlp_dx_kernel': dict(x=('sxn', 'sxc', 'sxt'), g=('sgn', 'sgc', 'sgt'),
                           dx=('sdn', 'sdc', 'sdt')),
    '_mlp_weight_grad_kernel': dict(x=('sxn', 'sxc', 'sxt'), g=('sgn', 'sgc', 'sgt'),
                                    u=('sun', 'suc', 'sut'), dz=('szn', 'szc', 'szt'),
                                    dx=('sdn', 'sdc', 'sdt')),
    '_mlp_hidden_kernel': dict(x=('sxn', 'sxc', 'sxt'), g=('sgn', 'sgc', 'sgt'),
                               u=('sun', 'suc', 'sut')),
    '_mlp_dz_chunk_kernel': dict(x=('sxn', 'sxc', 'sxt'), g=('sgn', 'sgc', 'sgt'),
                                 dz=('szn', 'szc', 'szt')),
    '_input_grad_kernel': dict(g=('sgn', 'sgc', 'sgt'), dz=('szn', 'szc', 'szt'),
                               x=('sxn', 'sxc', 'sxt'), dx=('sdn', 'sdc', 'sdt')),
    '_sum_partials_kernel': {},
}
_LAYOUTS = ('nchw', 'cl')


def _unit_args(fn, layout: str, has_u: bool):
    """The stride arguments of `fn` equal to 1 at launch for activations in `layout`."""
    ones = []
    for role, (_, sc, st) in _STRIDE_ARGS[fn.__name__].items():
        if role == 'u':
            if has_u:
                ones.append(sc)
        else:
            ones.append(st if layout == 'nchw' else sc)
    return ones


def _spec(fn, name, tn, constexprs, layout, has_u, config, options, ones=(), io=None):
    """(jit_fn, signature, constexprs, description, options): the tuple gpu_build_report reads.
    The arguments equal to 1 at launch (`_unit_args` and `ones`) become constexpr 1; `options`
    (num_warps, num_stages) must match the launch, or the report checks another kernel than the
    one that runs. io: the activations' type where it differs from `tn` (the dots' type): the
    mixed-precision mode, fp32 x, g, dz, dx and biases."""
    pointer_types = _ptrs(tn, [k for k in fn.arg_names if k.endswith('_ptr')], io)
    const = dict(constexprs)
    for k in [*_unit_args(fn, layout, has_u), *ones]:
        const[k] = 1
    sig = {}
    for arg in fn.arg_names:
        if arg in const:
            sig[arg] = 'constexpr'
        elif arg in pointer_types:
            sig[arg] = '*' + pointer_types[arg]
        else:
            sig[arg] = 'i32'
    tag = '/cl' if layout == 'cl' else ''
    mixed = f" {io} with {tn} dots" if io not in (None, tn) else f" {tn}"
    desc = f"{name}{tag}{mixed} {config} num_warps={options['num_warps']}"
    if 'num_stages' in options:
        desc += f" num_stages={options['num_stages']}"
    return (fn, sig, const, desc, options)


def _ptrs(tn, names, io=None):
    """Pointer types: the weights, u and the scratch in the dots' type `tn`; the activations
    and biases in `io` (default `tn`); the rest fp32. In the mixed mode (io differs) the du
    scratch is fp32 (`_dus_dtype`)."""
    dot_side = {'u_ptr', 'w1_ptr', 'w2_ptr', 'hs_ptr'} | ({'dus_ptr'} if io in (None, tn)
                                                         else set())
    io_side = {'x_ptr', 'g_ptr', 'b1_ptr', 'b2_ptr', 'dz_ptr', 'dx_ptr'}
    io = tn if io is None else io
    return {k: (tn if k in dot_side else io if k in io_side else 'fp32') for k in names}


def _small_path_specs(dtype, layout, io=None):
    tn, prec = _TL_NAME[dtype], _precision(dtype)
    specs = []
    for bc in _DX_CONFIGS:
        if bc > _pow2_channels(_small_path_max(dtype)):
            continue            # never launched: that C takes the large path in this dtype
        bt, _, bh, warps, stages = _dx_config(bc, dtype, layout)
        const = dict(BLOCK_T=bt, BLOCK_C=bc, BLOCK_H=bh, DOT_F32=False, PRECISION=prec,
                     ROUND_BF16=False, SPLIT=io is not None)
        specs.append(_spec(
            _mlp_dx_kernel, 'mlp_dx', tn, const, layout, False,
            f"C<={bc} BLOCK_T={bt} BLOCK_H={bh}", {'num_warps': warps, 'num_stages': stages},
            io=io))
        for has_u in (False, True):
            wbt, wbh, wbw, wbk, wwarps = _wg_config(bc, dtype, layout)
            const = dict(HAS_U=has_u, SCRATCH=False, SUMS=True, FUSE_DX=False, BLOCK_T=wbt,
                         BLOCK_H=wbh, BLOCK_W=wbw, BLOCK_K=wbk, DOT_F32=False, PRECISION=prec,
                         ROUND_BF16=False, SPLIT=io is not None)
            specs.append(_spec(
                _mlp_weight_grad_kernel, 'mlp_weight_grad', tn, const, layout, has_u,
                f"C<={_pow2_channels(_small_path_max(dtype))} u_saved={has_u} sums "
                f"BLOCK_T={wbt} BLOCK_H={wbh} BLOCK_W={wbw} BLOCK_K={wbk}",
                {'num_warps': wwarps}, io=io))
    return specs


def _large_path_specs(dtype, layout, io=None):
    """The large-C path's kernel configurations for one dtype and layout (any C > 256); kernels
    A and B also with TILES == 1 (T <= BLOCK_T, e.g. 7x7 tokens)."""
    tn, prec = _TL_NAME[dtype], _precision(dtype)
    specs = []
    cfg = _large_config(dtype, layout)
    bt, bh, bk, warps, stages = cfg['hidden']
    for has_u in (False, True):
        const = dict(HAS_U=has_u, BLOCK_T=bt, BLOCK_H=bh, BLOCK_K=bk, DOT_F32=False,
                     PRECISION=prec, ROUND_BF16=False, SPLIT=io is not None)
        for one_tile in (False, True):
            specs.append(_spec(
                _mlp_hidden_kernel, 'mlp_hidden', tn, const, layout, has_u,
                f"C>256 u_saved={has_u}{' TILES=1' if one_tile else ''} BLOCK_T={bt} "
                f"BLOCK_H={bh} BLOCK_K={bk}", {'num_warps': warps, 'num_stages': stages},
                ones=('TILES',) if one_tile else (), io=io))
    bt, bc, bh, warps, stages = cfg['dz']
    const = dict(BLOCK_T=bt, BLOCK_C=bc, BLOCK_H=bh, DOT_F32=False, PRECISION=prec,
                 ROUND_BF16=False, SPLIT=io is not None)
    for one_tile in (False, True):
        specs.append(_spec(
            _mlp_dz_chunk_kernel, 'mlp_dz_chunk', tn, const, layout, False,
            f"C>256{' TILES=1' if one_tile else ''} BLOCK_T={bt} BLOCK_C={bc} BLOCK_H={bh}",
            {'num_warps': warps, 'num_stages': stages}, ones=('TILES',) if one_tile else (),
            io=io))
    bt, bh, bw, warps = cfg['wg']
    for fuse in (False, True):
        const = dict(HAS_U=False, SCRATCH=True, SUMS=False, FUSE_DX=fuse, BLOCK_T=bt,
                     BLOCK_H=bh, BLOCK_W=bw, BLOCK_K=bw, DOT_F32=False, PRECISION=prec,
                     ROUND_BF16=False, SPLIT=io is not None)
        specs.append(_spec(
            _mlp_weight_grad_kernel, 'mlp_weight_grad', tn, const, layout, False,
            f"C>256 scratch fuse_dx={fuse} BLOCK_T={bt} BLOCK_H={bh} BLOCK_W={bw}",
            {'num_warps': warps}, io=io))
    return specs


def _build_specs():
    specs = []
    for dtype, tn in _TL_NAME.items():
        for layout in _LAYOUTS:
            specs += _small_path_specs(dtype, layout)
            specs += _large_path_specs(dtype, layout)
            const = dict(BLOCK_T=_INPUT_GRAD_BLOCK_T, BLOCK_C=_INPUT_GRAD_BLOCK_C,
                         ROUND_BF16=False)
            specs.append(_spec(
                _input_grad_kernel, 'input_grad', tn, const, layout, False,
                f"BLOCK_T={_INPUT_GRAD_BLOCK_T} BLOCK_C={_INPUT_GRAD_BLOCK_C}",
                {'num_warps': _INPUT_GRAD_WARPS}))
    # The mixed-precision mode (autocast): fp32 activations with half weights, on the half
    # configs (the backward's configs and path follow the weights' dtype). Its input_grad is
    # the fp32 kernel above.
    for dtype in (torch.float16, torch.bfloat16):
        for layout in _LAYOUTS:
            specs += _small_path_specs(dtype, layout, io='fp32')
            specs += _large_path_specs(dtype, layout, io='fp32')
    specs.append(_spec(_sum_partials_kernel, 'sum_partials', 'fp32', dict(BLOCK=_SUM_BLOCK),
                       'nchw', False, f"BLOCK={_SUM_BLOCK}", {'num_warps': _SUM_WARPS}))
    # One spec per distinct compiled kernel (C<=32..256 share the weight-gradient config).
    unique = {}
    for spec in specs:
        unique.setdefault(spec[3], spec)
    return list(unique.values())


GPU_BUILD_SPECS = _build_specs()

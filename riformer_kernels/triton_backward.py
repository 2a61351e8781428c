"""Triton kernels of the fused block's backward (DESIGN.md section 3): phase 1, phase 2.

`fused_backward` runs phase 1 (weight gradients and the five per-(n,c) sums the norms need),
the coefficients (a caller's function of the sums: fold.backward_coefficients in the autograd
backward) and phase 2 (dx = P g + Q dz + R (x - m) + S). Two paths, chosen by C (`_large_path`:
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

Large C (> 256, fp32 > 128: S12 stages 3-4, M36: C in {320, 384, 512, 768}), no C-wide register
tile; h and du make one round trip through a transient (N, 4C, T) scratch in the compute dtype:

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
the partials sequentially): no float atomics, bitwise-equal results from run to run. The number of
splits depends only on the shapes (not on the device), so results are also equal across GPUs.

Other entry points: `mlp_backward` (phase 1 with dz itself; on the small path dz comes from the
phase-2 kernel with (P, Q, R, S) = (0, 1, 0, 0)) and `input_grad` (`_input_grad_kernel`: phase 2
alone from a given dz), for tests and callers that want the pieces.

Interpreter (TRITON_INTERPRET=1, read at import): bf16 `tl.dot` is broken there, so dot operands
are kept in fp32 (the interpreter's bf16 results are then slightly *more* accurate than a GPU's);
fp32 -> bf16 casts truncate there, so stores (dz, dx and the large path's bf16 h/du scratch)
round to nearest even by integer arithmetic instead: the interpreter rounds the scratch as a GPU
does, and reads it back to fp32 dot operands.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')

# Programs the weight-gradient kernel aims for (hidden chunks x channel chunks x token splits).
# A constant rather than the device's SM count, so the reduction order depends on shapes only.
_WEIGHT_GRAD_PROGRAMS = 512

_TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_TL_NAME = {torch.float32: 'fp32', torch.float16: 'fp16', torch.bfloat16: 'bf16'}


# ---------------------------------------------------------------------------------------------
# jit helpers

@triton.jit
def _gelu_and_grad(u):
    """Exact (erf) GELU and its derivative."""
    cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
    pdf = tl.exp(-0.5 * u * u) * 0.3989422804014327
    return u * cdf, cdf + u * pdf


@triton.jit
def _round_for_store(v, ROUND_BF16: tl.constexpr):
    """fp32 value ready to be cast to the output dtype.

    With ROUND_BF16 (interpreter only, whose fp32->bf16 cast truncates) round to nearest even
    in integer arithmetic, so the cast after it is exact.
    """
    if ROUND_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v


# ---------------------------------------------------------------------------------------------
# shared pieces of the phase-1 kernels

@triton.jit
def _hidden_tile_grads(
    x_ptr, g_ptr, u_ptr, A_ptr, B_ptr, l2_ptr, w1_ptr, b1_ptr, w2_ptr,
    n, n64, offs_t, mt, offs_h, mh, C, HID,
    sxn, sxc, sxt, sgn, sgc, sgt, sun, suc, sut,
    HAS_U: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """h = GELU(u) and du = (W2^T dO) GELU'(u), fp32 (BLOCK_T, BLOCK_H), of one token tile and
    one hidden chunk, streaming C in BLOCK_K chunks (no C-wide tile): u = W1_chunk z + b1 with
    z = A x + B built chunk by chunk (or u read from u_saved), dh = W2_chunk^T dO, dO = l2 g.
    du is 0 on masked tokens (g is loaded as 0 there)."""
    if DOT_F32:
        cdt = tl.float32
    else:
        cdt = w1_ptr.dtype.element_ty
    offs_k = tl.arange(0, BLOCK_K)
    if HAS_U:
        u = tl.load(u_ptr + n64 * sun + offs_t[:, None] * sut + offs_h[None, :] * suc,
                    mask=mt[:, None] & mh[None, :], other=0.0).to(tl.float32)
    else:
        u = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            ck = k0 + offs_k
            mk = ck < C
            mtk = mt[:, None] & mk[None, :]
            a_k = tl.load(A_ptr + n * C + ck, mask=mk, other=0.0)
            b_k = tl.load(B_ptr + n * C + ck, mask=mk, other=0.0)
            x_k = tl.load(x_ptr + n64 * sxn + offs_t[:, None] * sxt + ck[None, :] * sxc,
                          mask=mtk, other=0.0).to(tl.float32)
            z_k = tl.where(mtk, a_k[None, :] * x_k + b_k[None, :], 0.0).to(cdt)
            w1_k = tl.load(w1_ptr + offs_h[:, None] * C + ck[None, :],
                           mask=mh[:, None] & mk[None, :], other=0.0).to(cdt)
            u += tl.dot(z_k, tl.trans(w1_k), input_precision=PRECISION)
        b1 = tl.load(b1_ptr + offs_h, mask=mh, other=0.0).to(tl.float32)
        u += b1[None, :]
    dh = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ck = k0 + offs_k
        mk = ck < C
        l2_k = tl.load(l2_ptr + n * C + ck, mask=mk, other=0.0)
        g_k = tl.load(g_ptr + n64 * sgn + offs_t[:, None] * sgt + ck[None, :] * sgc,
                      mask=mt[:, None] & mk[None, :], other=0.0).to(tl.float32)
        w2_k = tl.load(w2_ptr + ck[:, None] * HID + offs_h[None, :],
                       mask=mk[:, None] & mh[None, :], other=0.0).to(cdt)
        dh += tl.dot((l2_k[None, :] * g_k).to(cdt), w2_k, input_precision=PRECISION)
    h, dgelu = _gelu_and_grad(u)
    return h, dh * dgelu


@triton.jit
def _store_dz_and_sums(
    dz, o, x, g, mean, b2, dz_ptr, part_ptr, n64, offs_t, offs_c, mt, mc, row, N, C, TILES,
    szn, szc, szt, ROUND_BF16: tl.constexpr,
):
    """Epilogue of kernel B on a (token tile, channel block): o += b2, store dz, and the
    tile's five partial sums [g, g (x-m), dz, dz (x-m), g o] into part (5, N, TILES, C) at row
    `row` = n * TILES + tile. x and g are fp32 and 0 outside the mask."""
    m2 = mt[:, None] & mc[None, :]
    o += b2[None, :]
    tl.store(dz_ptr + n64 * szn + offs_t[:, None] * szt + offs_c[None, :] * szc,
             _round_for_store(dz, ROUND_BF16).to(dz_ptr.dtype.element_ty), mask=m2)
    xc = tl.where(m2, x - mean[None, :], 0.0)
    dz = tl.where(m2, dz, 0.0)
    base = part_ptr + row * C + offs_c
    stride_k = N * TILES * C
    tl.store(base, tl.sum(g, 0), mask=mc)
    tl.store(base + stride_k, tl.sum(g * xc, 0), mask=mc)
    tl.store(base + 2 * stride_k, tl.sum(dz, 0), mask=mc)
    tl.store(base + 3 * stride_k, tl.sum(dz * xc, 0), mask=mc)
    tl.store(base + 4 * stride_k, tl.sum(g * o, 0), mask=mc)


@triton.jit
def _load_tile_z_and_d_o(x_ptr, g_ptr, A_ptr, B_ptr, l2_ptr, n, n64, offs_t, offs_c, mask_c,
                         mask2, C, sxn, sxc, sxt, sgn, sgc, sgt, cdt: tl.constexpr):
    """x and g of a (tokens, channels) tile in fp32 (0 outside mask2) and what the MLP backward
    starts from: z = A x + B (the norm2 input) and dO = l2 g, both in the dot dtype `cdt`.
    g is 0 on masked tokens and channels, so dO and everything derived from it vanish there."""
    a_c = tl.load(A_ptr + n * C + offs_c, mask=mask_c, other=0.0)
    b_c = tl.load(B_ptr + n * C + offs_c, mask=mask_c, other=0.0)
    l2 = tl.load(l2_ptr + n * C + offs_c, mask=mask_c, other=0.0)
    x = tl.load(x_ptr + n64 * sxn + offs_t[:, None] * sxt + offs_c[None, :] * sxc,
                mask=mask2, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + n64 * sgn + offs_t[:, None] * sgt + offs_c[None, :] * sgc,
                mask=mask2, other=0.0).to(tl.float32)
    z = tl.where(mask2, a_c[None, :] * x + b_c[None, :], 0.0).to(cdt)
    return x, g, z, (l2[None, :] * g).to(cdt)


@triton.jit
def _dx_tile(g, dz, x, P_ptr, Q_ptr, R_ptr, S_ptr, mean_ptr, pc, mc):
    """Phase 2 on a (tokens, channels) tile: dx = P g + Q dz + R (x - m) + S, fp32. pc: the
    (n, c) offsets of the tile's channels into the (N, C) coefficients; mc their mask."""
    mean = tl.load(mean_ptr + pc, mask=mc, other=0.0)
    p = tl.load(P_ptr + pc, mask=mc, other=0.0)
    q = tl.load(Q_ptr + pc, mask=mc, other=0.0)
    r = tl.load(R_ptr + pc, mask=mc, other=0.0)
    s = tl.load(S_ptr + pc, mask=mc, other=0.0)
    return p[None, :] * g + q[None, :] * dz + r[None, :] * (x - mean[None, :]) + s[None, :]


# ---------------------------------------------------------------------------------------------
# kernels: small-C path (C <= SMALL_PATH_MAX_CHANNELS)

@triton.jit
def _mlp_dx_kernel(
    x_ptr, g_ptr, mean_ptr, A_ptr, B_ptr, l2_ptr, w1_ptr, b1_ptr, w2_ptr,
    P_ptr, Q_ptr, R_ptr, S_ptr, dx_ptr,
    C, T, HID, TILES,
    sxn, sxc, sxt, sgn, sgc, sgt, sdn, sdc, sdt,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """Phase 2 of the small path, one program per token tile of one sample: recompute
    dz = W1^T ((W2^T dO) GELU'(u)) over the hidden chunks (z = A x + B, u = W1 z + b1,
    dO = l2 g) and write dx = P g + Q dz + R (x - m) + S. dz never leaves the chip:
    recomputing it (3 GEMMs per tile) replaces writing it in phase 1 and reading it back here
    (2 |x| of traffic). u is recomputed even when the forward saved it (recompute=False): that
    GEMM runs once per tile here (the weight-gradient kernel, which reads u_saved, would repeat
    it per channel chunk), and reading u would cost 4 |x|. With (P, Q, R, S) = (0, 1, 0, 0) the
    output is dz itself (exactly: 0 * g + 1 * dz + 0 * (x - m) + 0), which is how
    `mlp_backward` returns dz."""
    pid = tl.program_id(0)
    n = pid // TILES
    tile = pid - n * TILES
    n64 = n.to(tl.int64)
    if DOT_F32:
        cdt = tl.float32
    else:
        cdt = w1_ptr.dtype.element_ty

    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, BLOCK_C)
    mt = offs_t < T
    mc = offs_c < C
    m2 = mt[:, None] & mc[None, :]

    x, g, z, d_o = _load_tile_z_and_d_o(x_ptr, g_ptr, A_ptr, B_ptr, l2_ptr, n, n64, offs_t,
                                        offs_c, mc, m2, C, sxn, sxc, sxt, sgn, sgc, sgt, cdt)

    dz = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for h0 in range(0, HID, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mh = offs_h < HID
        mw = mh[:, None] & mc[None, :]
        # W1[j, c] and W2[c, j], both as (hidden, channel) tiles.
        w1 = tl.load(w1_ptr + offs_h[:, None] * C + offs_c[None, :], mask=mw, other=0.0).to(cdt)
        w2t = tl.load(w2_ptr + offs_c[None, :] * HID + offs_h[:, None], mask=mw, other=0.0).to(cdt)
        b1 = tl.load(b1_ptr + offs_h, mask=mh, other=0.0).to(tl.float32)
        u = tl.dot(z, tl.trans(w1), input_precision=PRECISION) + b1[None, :]
        _, dgelu = _gelu_and_grad(u)
        dh = tl.dot(d_o, tl.trans(w2t), input_precision=PRECISION)
        dz += tl.dot((dh * dgelu).to(cdt), w1, input_precision=PRECISION)

    dx = _dx_tile(g, dz, x, P_ptr, Q_ptr, R_ptr, S_ptr, mean_ptr, n * C + offs_c, mc)
    tl.store(dx_ptr + n64 * sdn + offs_t[:, None] * sdt + offs_c[None, :] * sdc,
             _round_for_store(dx, ROUND_BF16).to(dx_ptr.dtype.element_ty), mask=m2)


# The split shape arguments are 1 in most launches and larger in others; Triton would compile a
# separate kernel for each (it turns integer arguments equal to 1 into constants), so they are
# kept runtime values: one compiled variant, the one GPU_BUILD_SPECS checks. (Named here too:
# the interpreter's function object does not keep the list.)
WEIGHT_GRAD_RUNTIME_INTS = ('TILES_PER_SPLIT', 'SPLITS_PER_SAMPLE', 'SAMPLES_PER_SPLIT')


@triton.jit(do_not_specialize=WEIGHT_GRAD_RUNTIME_INTS)
def _mlp_weight_grad_kernel(
    x_ptr, g_ptr, u_ptr, A_ptr, B_ptr, l2_ptr,
    w1_ptr, b1_ptr, w2_ptr, b2_ptr, hs_ptr, dus_ptr, dw1_ptr, dw2_ptr, db1_ptr, part_ptr,
    dz_ptr, mean_ptr, P_ptr, Q_ptr, R_ptr, S_ptr, dx_ptr,
    N, C, T, HID, TILES, TILES_PER_SPLIT, SPLITS_PER_SAMPLE, SAMPLES_PER_SPLIT,
    sxn, sxc, sxt, sgn, sgc, sgt, sun, suc, sut, szn, szc, szt, sdn, sdc, sdt,
    HAS_U: tl.constexpr, SCRATCH: tl.constexpr, SUMS: tl.constexpr, FUSE_DX: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """dW1 = du z^T, dW2 = dO h^T (and db1 = sum du unless SCRATCH) of one (hidden chunk,
    channel chunk) over the token tiles of one split; one fp32 partial per split.

    Splits never straddle a sample boundary: a split is either a range of tiles of one sample
    (SPLITS_PER_SAMPLE > 1) or whole samples (SAMPLES_PER_SPLIT >= 1), so per-(n, c) sums can
    be kept in registers and flushed once per (sample, split).

    SCRATCH (large-C path): h and du are read from the (N, HID, T) scratch the hidden kernel
    wrote (compute dtype); db1 then comes from that kernel's fp32 partials. Otherwise (small-C
    path) they are recomputed per tile (`_hidden_tile_grads`).

    SUMS (small-C path, phase 1 complete in this one launch): also the five per-(n, c) sums of
    the norms' backward, for this program's channel chunk. Sum dz, sum dz (x - m) and sum g o
    are linear in the hidden units (dz = sum_j W1[j, :]^T du_j, o = sum_j W2[:, j] h_j + b2),
    so each hidden chunk adds its share: dz_part = du W1[chunk, chunk_c], o_part =
    h W2[chunk_c, chunk]^T, from the du and h already in registers. The programs of hidden
    chunk 0 also carry sum g, sum g (x - m) and the b2 term of sum g o; the others store 0 there
    so all five reduce alike. part: (5, N, HIDDEN_CHUNKS * SPLITS_PER_SAMPLE, C), slot
    hb * SPLITS_PER_SAMPLE + (split within the sample). dz itself is never written (phase 2
    recomputes it).

    FUSE_DX (large-C path, phase 2 fused in): the programs of hidden chunk 0 (which between them
    cover every (channel chunk, token tile) once) then loop once more over their split's token
    tiles and write dx = P g + Q dz + R (x - m) + S of their channel chunk: x and g tiles they
    have just read (L2) plus dz. A separate loop, not the weight loop's body: there it spilled
    ((32, 16) tiles, cl fp16/bf16 at sm_80, fp32 at sm_90). Pointers and strides a variant does
    not use are placeholders."""
    hb = tl.program_id(0)
    cb = tl.program_id(1)
    split = tl.program_id(2)
    if DOT_F32:
        cdt = tl.float32
    else:
        cdt = w1_ptr.dtype.element_ty

    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    mh = offs_h < HID
    offs_w = cb * BLOCK_W + tl.arange(0, BLOCK_W)
    mw = offs_w < C

    acc_w1 = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
    acc_w2 = tl.zeros([BLOCK_W, BLOCK_H], dtype=tl.float32)
    acc_b1 = tl.zeros([BLOCK_H], dtype=tl.float32)
    group = split // SPLITS_PER_SAMPLE
    part_in_sample = split - group * SPLITS_PER_SAMPLE
    first_sample = group * SAMPLES_PER_SPLIT
    start = first_sample * TILES + part_in_sample * TILES_PER_SPLIT
    end = tl.minimum(start + TILES_PER_SPLIT,
                     tl.minimum(first_sample + SAMPLES_PER_SPLIT, N) * TILES)
    if SUMS:
        s_g = tl.zeros([BLOCK_W], dtype=tl.float32)
        s_gx = tl.zeros([BLOCK_W], dtype=tl.float32)
        s_dz = tl.zeros([BLOCK_W], dtype=tl.float32)
        s_dzx = tl.zeros([BLOCK_W], dtype=tl.float32)
        s_go = tl.zeros([BLOCK_W], dtype=tl.float32)
        slots = tl.num_programs(0) * SPLITS_PER_SAMPLE
        slot = hb * SPLITS_PER_SAMPLE + part_in_sample
        first_chunk = hb == 0
        b2_w = tl.load(b2_ptr + offs_w, mask=mw, other=0.0).to(tl.float32)
    for i in range(start, end):
        n = i // TILES
        n64 = n.to(tl.int64)
        offs_t = (i - n * TILES) * BLOCK_T + tl.arange(0, BLOCK_T)
        mt = offs_t < T
        if SCRATCH:
            sp = n64 * HID * T + offs_h[None, :] * T + offs_t[:, None]
            mth = mt[:, None] & mh[None, :]
            h = tl.load(hs_ptr + sp, mask=mth, other=0.0).to(cdt)
            du = tl.load(dus_ptr + sp, mask=mth, other=0.0).to(cdt)
        else:
            h, du = _hidden_tile_grads(
                x_ptr, g_ptr, u_ptr, A_ptr, B_ptr, l2_ptr, w1_ptr, b1_ptr, w2_ptr,
                n, n64, offs_t, mt, offs_h, mh, C, HID,
                sxn, sxc, sxt, sgn, sgc, sgt, sun, suc, sut,
                HAS_U, BLOCK_T, BLOCK_H, BLOCK_K, DOT_F32, PRECISION)
            acc_b1 += tl.sum(du, 0)

        mtw = mt[:, None] & mw[None, :]
        x_w, g_w, z_w, d_o_w = _load_tile_z_and_d_o(
            x_ptr, g_ptr, A_ptr, B_ptr, l2_ptr, n, n64, offs_t, offs_w, mw, mtw, C,
            sxn, sxc, sxt, sgn, sgc, sgt, cdt)
        acc_w1 += tl.dot(tl.trans(du.to(cdt)), z_w, input_precision=PRECISION)
        acc_w2 += tl.dot(tl.trans(d_o_w), h.to(cdt), input_precision=PRECISION)
        if SUMS:
            # W1[chunk, chunk_c] and W2[chunk_c, chunk]^T as (hidden, channel) tiles.
            mhw = mh[:, None] & mw[None, :]
            w1_hw = tl.load(w1_ptr + offs_h[:, None] * C + offs_w[None, :], mask=mhw,
                            other=0.0).to(cdt)
            w2_hw = tl.load(w2_ptr + offs_w[None, :] * HID + offs_h[:, None], mask=mhw,
                            other=0.0).to(cdt)
            dz_part = tl.dot(du.to(cdt), w1_hw, input_precision=PRECISION)
            o_part = tl.dot(h.to(cdt), w2_hw, input_precision=PRECISION)
            mean_w = tl.load(mean_ptr + n * C + offs_w, mask=mw, other=0.0)
            xc = tl.where(mtw, x_w - mean_w[None, :], 0.0)
            s_g += tl.sum(g_w, 0)
            s_gx += tl.sum(g_w * xc, 0)
            s_dz += tl.sum(dz_part, 0)       # 0 on masked tokens: du is
            s_dzx += tl.sum(dz_part * xc, 0)
            s_go += tl.sum(g_w * o_part, 0)
            # Flush at the sample's last tile or the split's last tile, whichever comes first.
            flush = (i - n * TILES == TILES - 1) | (i == end - 1)
            if flush:
                base = part_ptr + (n64 * slots + slot) * C + offs_w
                stride_k = N * slots * C
                tl.store(base, tl.where(first_chunk, s_g, 0.0), mask=mw)
                tl.store(base + stride_k, tl.where(first_chunk, s_gx, 0.0), mask=mw)
                tl.store(base + 2 * stride_k, s_dz, mask=mw)
                tl.store(base + 3 * stride_k, s_dzx, mask=mw)
                tl.store(base + 4 * stride_k,
                         s_go + tl.where(first_chunk, b2_w * s_g, 0.0), mask=mw)
                s_g = tl.zeros([BLOCK_W], dtype=tl.float32)
                s_gx = tl.zeros([BLOCK_W], dtype=tl.float32)
                s_dz = tl.zeros([BLOCK_W], dtype=tl.float32)
                s_dzx = tl.zeros([BLOCK_W], dtype=tl.float32)
                s_go = tl.zeros([BLOCK_W], dtype=tl.float32)
    split64 = split.to(tl.int64)
    tl.store(dw1_ptr + split64 * HID * C + offs_h[:, None] * C + offs_w[None, :], acc_w1,
             mask=mh[:, None] & mw[None, :])
    tl.store(dw2_ptr + split64 * HID * C + offs_w[:, None] * HID + offs_h[None, :], acc_w2,
             mask=mw[:, None] & mh[None, :])
    if not SCRATCH:
        if cb == 0:
            tl.store(db1_ptr + split64 * HID + offs_h, acc_b1, mask=mh)
    if FUSE_DX:
        if hb == 0:
            # Its own loop, after the accumulators are stored: nothing of the weight-gradient
            # loop is live here. The x and g tiles were read by this program moments ago (L2).
            for i in range(start, end):
                n = i // TILES
                n64 = n.to(tl.int64)
                offs_t = (i - n * TILES) * BLOCK_T + tl.arange(0, BLOCK_T)
                mtw = (offs_t < T)[:, None] & mw[None, :]
                x_w = tl.load(x_ptr + n64 * sxn + offs_t[:, None] * sxt + offs_w[None, :] * sxc,
                              mask=mtw, other=0.0).to(tl.float32)
                g_w = tl.load(g_ptr + n64 * sgn + offs_t[:, None] * sgt + offs_w[None, :] * sgc,
                              mask=mtw, other=0.0).to(tl.float32)
                dz_w = tl.load(dz_ptr + n64 * szn + offs_t[:, None] * szt + offs_w[None, :] * szc,
                               mask=mtw, other=0.0).to(tl.float32)
                dx = _dx_tile(g_w, dz_w, x_w, P_ptr, Q_ptr, R_ptr, S_ptr, mean_ptr,
                              n * C + offs_w, mw)
                tl.store(dx_ptr + n64 * sdn + offs_t[:, None] * sdt + offs_w[None, :] * sdc,
                         _round_for_store(dx, ROUND_BF16).to(dx_ptr.dtype.element_ty), mask=mtw)


# ---------------------------------------------------------------------------------------------
# kernels: large-C path (C > SMALL_PATH_MAX_CHANNELS); no C-wide register tile anywhere

@triton.jit
def _mlp_hidden_kernel(
    x_ptr, g_ptr, u_ptr, A_ptr, B_ptr, l2_ptr, w1_ptr, b1_ptr, w2_ptr,
    hs_ptr, dus_ptr, db1p_ptr,
    C, T, HID, TILES, HBLOCKS,
    sxn, sxc, sxt, sgn, sgc, sgt, sun, suc, sut,
    HAS_U: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """Kernel A, one program per (token tile of one sample, hidden chunk), the hidden chunk
    varying fastest (neighbouring programs share the x and g tile in L2): h and du of the chunk
    into the (N, HID, T) scratch (compute dtype) and sum_t du (fp32) into the db1 partials
    (N * TILES, HID)."""
    pid = tl.program_id(0)
    hb = pid % HBLOCKS
    row = pid // HBLOCKS            # n * TILES + tile
    n = row // TILES
    n64 = n.to(tl.int64)
    offs_t = (row - n * TILES) * BLOCK_T + tl.arange(0, BLOCK_T)
    mt = offs_t < T
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    mh = offs_h < HID
    h, du = _hidden_tile_grads(
        x_ptr, g_ptr, u_ptr, A_ptr, B_ptr, l2_ptr, w1_ptr, b1_ptr, w2_ptr,
        n, n64, offs_t, mt, offs_h, mh, C, HID,
        sxn, sxc, sxt, sgn, sgc, sgt, sun, suc, sut,
        HAS_U, BLOCK_T, BLOCK_H, BLOCK_K, DOT_F32, PRECISION)
    sp = n64 * HID * T + offs_h[None, :] * T + offs_t[:, None]
    mth = mt[:, None] & mh[None, :]
    tl.store(hs_ptr + sp, _round_for_store(h, ROUND_BF16).to(hs_ptr.dtype.element_ty), mask=mth)
    tl.store(dus_ptr + sp, _round_for_store(du, ROUND_BF16).to(dus_ptr.dtype.element_ty),
             mask=mth)
    tl.store(db1p_ptr + row.to(tl.int64) * HID + offs_h, tl.sum(du, 0), mask=mh)


@triton.jit
def _mlp_dz_chunk_kernel(
    x_ptr, g_ptr, mean_ptr, w1_ptr, w2_ptr, b2_ptr, hs_ptr, dus_ptr, dz_ptr, part_ptr,
    N, C, T, HID, TILES, CBLOCKS,
    sxn, sxc, sxt, sgn, sgc, sgt, szn, szc, szt,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """Kernel B, one program per (token tile of one sample, channel chunk), the channel chunk
    varying fastest: dz_chunk = W1^T du and o_chunk = W2 h + b2 over the hidden chunks of the
    scratch, then the shared epilogue (dz and the five partial sums of the chunk)."""
    pid = tl.program_id(0)
    cb = pid % CBLOCKS
    row = pid // CBLOCKS            # n * TILES + tile
    n = row // TILES
    n64 = n.to(tl.int64)
    if DOT_F32:
        cdt = tl.float32
    else:
        cdt = w1_ptr.dtype.element_ty
    offs_t = (row - n * TILES) * BLOCK_T + tl.arange(0, BLOCK_T)
    mt = offs_t < T
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < C

    dz = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    o = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for h0 in range(0, HID, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mh = offs_h < HID
        mw = mh[:, None] & mc[None, :]
        sp = n64 * HID * T + offs_h[None, :] * T + offs_t[:, None]
        mth = mt[:, None] & mh[None, :]
        du = tl.load(dus_ptr + sp, mask=mth, other=0.0).to(cdt)
        h = tl.load(hs_ptr + sp, mask=mth, other=0.0).to(cdt)
        w1 = tl.load(w1_ptr + offs_h[:, None] * C + offs_c[None, :], mask=mw, other=0.0).to(cdt)
        w2t = tl.load(w2_ptr + offs_c[None, :] * HID + offs_h[:, None], mask=mw, other=0.0).to(cdt)
        dz += tl.dot(du, w1, input_precision=PRECISION)
        o += tl.dot(h, w2t, input_precision=PRECISION)

    m2 = mt[:, None] & mc[None, :]
    mean = tl.load(mean_ptr + n * C + offs_c, mask=mc, other=0.0)
    b2 = tl.load(b2_ptr + offs_c, mask=mc, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + n64 * sxn + offs_t[:, None] * sxt + offs_c[None, :] * sxc,
                mask=m2, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + n64 * sgn + offs_t[:, None] * sgt + offs_c[None, :] * sgc,
                mask=m2, other=0.0).to(tl.float32)
    _store_dz_and_sums(dz, o, x, g, mean, b2, dz_ptr, part_ptr, n64, offs_t, offs_c, mt, mc,
                       row, N, C, TILES, szn, szc, szt, ROUND_BF16)


# ---------------------------------------------------------------------------------------------
# kernels shared by both paths

@triton.jit
def _sum_partials_kernel(p_ptr, out_ptr, S, INNER, BLOCK: tl.constexpr):
    """out[o, i] = sum_s p[o, s, i], summed sequentially in s: a fixed order."""
    outer = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INNER
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    base = p_ptr + outer * S * INNER + offs
    for s in range(0, S):
        acc += tl.load(base + s * INNER, mask=mask, other=0.0)
    tl.store(out_ptr + outer * INNER + offs, acc, mask=mask)


@triton.jit
def _input_grad_kernel(
    g_ptr, dz_ptr, x_ptr, mean_ptr, P_ptr, Q_ptr, R_ptr, S_ptr, dx_ptr,
    C, T, TILES,
    sgn, sgc, sgt, szn, szc, szt, sxn, sxc, sxt, sdn, sdc, sdt,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """Phase 2 alone, elementwise from a given dz (the `input_grad` entry point)."""
    pid = tl.program_id(0)
    n = pid // TILES
    n64 = n.to(tl.int64)
    offs_t = (pid - n * TILES) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mt = offs_t < T
    mc = offs_c < C
    m2 = mt[:, None] & mc[None, :]
    t2 = offs_t[:, None]
    c2 = offs_c[None, :]
    g = tl.load(g_ptr + n64 * sgn + t2 * sgt + c2 * sgc, mask=m2, other=0.0).to(tl.float32)
    dz = tl.load(dz_ptr + n64 * szn + t2 * szt + c2 * szc, mask=m2, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + n64 * sxn + t2 * sxt + c2 * sxc, mask=m2, other=0.0).to(tl.float32)
    dx = _dx_tile(g, dz, x, P_ptr, Q_ptr, R_ptr, S_ptr, mean_ptr, n * C + offs_c, mc)
    tl.store(dx_ptr + n64 * sdn + t2 * sdt + c2 * sdc,
             _round_for_store(dx, ROUND_BF16).to(dx_ptr.dtype.element_ty), mask=m2)


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
# reading ptxas' spill counts (aot_resource_report): every entry has 0 spill bytes. (Chosen
# for the earlier dz kernel, which also kept o in registers; BLOCK_C=512 spilled there in the
# configurations tried, BLOCK_T=BLOCK_H=16 with 8 or 16 warps, hence the path rule above.)
# BLOCK_C=256 is fp16/bf16 only (SMALL_PATH_MAX_CHANNELS_FP32).
_DX_CONFIGS = {16: (16, 32, 8, 3), 32: (16, 32, 8, 3), 64: (16, 32, 8, 3), 128: (16, 32, 8, 3),
               256: (16, 16, 8, 1)}
# fp32 exceptions, found once the specs compiled the kernels as launched (unit strides constant):
# C<=32 (16, 32, 8, 3) spilled 4 bytes at sm_80 in channels_last with u_saved; C<=64 spilled
# 24 bytes at sm_90 in NCHW without u (and (16, 16, 8, 3) 8 bytes in channels_last; (16, 32, 8,
# 2) 16 bytes in NCHW); C<=128 (16, 32, 8, 3) spilled 20 bytes at sm_90 in NCHW without u (dx
# kernel), (16, 32, 8, 2) is clean. Applied to both layouts (same summation order for both).
_DX_CONFIGS_FP32 = {32: (16, 32, 8, 2), 64: (16, 16, 8, 2), 128: (16, 32, 8, 2)}
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
    torch.float32: dict(hidden=(64, 32, 32, 4, 2), dz=(64, 64, 16, 8, 2), wg=(32, 32, 32, 8)),
    torch.float16: dict(hidden=(64, 32, 32, 4, 2), dz=(64, 64, 32, 8, 2), wg=(32, 64, 64, 8)),
    torch.bfloat16: dict(hidden=(64, 32, 32, 4, 2), dz=(64, 64, 32, 8, 2), wg=(32, 64, 64, 8)),
}
_SUM_BLOCK, _SUM_WARPS = 512, 4
_INPUT_GRAD_BLOCK_T, _INPUT_GRAD_BLOCK_C, _INPUT_GRAD_WARPS = 32, 32, 4


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
    """u_saved with hidden stride 1 (channels_last, the layout triton_forward saves it in);
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
    if not (x.dtype == g.dtype == cdt == w2.dtype):
        raise ValueError(f"x, g, w1, w2 must share one dtype; got {x.dtype}, {g.dtype}, "
                         f"{w1.dtype}, {w2.dtype}")
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
        dot_f32=_dot_f32(cdt), prec=_precision(cdt), round_bf16=_round_bf16(cdt))
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
        PRECISION=a['prec'], ROUND_BF16=a['round_bf16'], num_warps=warps, num_stages=stages)
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
                         f"other one; see _large_path); use fused_backward")


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
        ROUND_BF16=a['round_bf16'], num_warps=warps)
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

    Cost against DESIGN.md's "store nothing of size 4C*T": the scratch is 8 |x| of transient
    memory (freed after kernel W; never saved for backward) and 8 |x| written + 16 |x| read,
    unless it stays in L2 (S12 stage 4 at 7x7, N=64, bf16: 2 x 19 MB). Not measured on a GPU.
    """
    n, c, T, hid, dev = a['n'], a['c'], a['T'], a['hid'], a['dev']
    x = a['x']
    hs = _empty((n, hid, T), a['w1'].dtype, dev)
    dus = _empty((n, hid, T), a['w1'].dtype, dev)

    cfg = _large_config(a['w1'].dtype, a['layout'])
    bt, bh, bk, warps, stages = cfg['hidden']
    tiles_a, n_hb = triton.cdiv(T, bt), triton.cdiv(hid, bh)
    db1p = _empty((n * tiles_a, hid), torch.float32, dev)
    _mlp_hidden_kernel[(n * tiles_a * n_hb,)](
        x, a['g'], a['u'], a['A'], a['B'], a['l2'], a['w1'], a['b1'], a['w2'], hs, dus, db1p,
        c, T, hid, tiles_a, n_hb, *a['sx'], *a['sg'], *a['su'],
        HAS_U=a['has_u'], BLOCK_T=bt, BLOCK_H=bh, BLOCK_K=bk, DOT_F32=a['dot_f32'],
        PRECISION=a['prec'], ROUND_BF16=a['round_bf16'], num_warps=warps, num_stages=stages)

    bt, bc, bh, warps, stages = cfg['dz']
    tiles, n_cb = triton.cdiv(T, bt), triton.cdiv(c, bc)
    dz = _empty_like(x)
    part = _empty((5, n, tiles, c), torch.float32, dev)
    _mlp_dz_chunk_kernel[(n * tiles * n_cb,)](
        x, a['g'], a['mean'], a['w1'], a['w2'], a['b2'], hs, dus, dz, part,
        n, c, T, hid, tiles, n_cb, *a['sx'], *a['sg'], *_token_strides(dz),
        BLOCK_T=bt, BLOCK_C=bc, BLOCK_H=bh, DOT_F32=a['dot_f32'], PRECISION=a['prec'],
        ROUND_BF16=a['round_bf16'], num_warps=warps, num_stages=stages)

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
    return _backward_dz_impl(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved)


@_backward_dz_op.register_fake
def _(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved):
    n, c, hh, ww = x.shape
    hid = w1.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    hs, dus, db1p = _scratch_shapes(n, c, hh * ww, hid, w1.dtype)
    return (torch.empty_like(x), x.new_empty((5, n, c), **f32), x.new_empty((c,), **f32),
            x.new_empty(hs, dtype=w1.dtype), x.new_empty(dus, dtype=w1.dtype),
            x.new_empty(db1p, **f32))


@torch.library.custom_op('riformer_triton::backward_weights_dx', mutates_args=())
def _backward_weights_dx_op(g: torch.Tensor, x: torch.Tensor, dz: torch.Tensor,
                            mean: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                            w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                            b2: torch.Tensor, l2: torch.Tensor, u_saved: Optional[torch.Tensor],
                            hs: torch.Tensor, dus: torch.Tensor, db1p: torch.Tensor,
                            P: torch.Tensor, Q: torch.Tensor, R: torch.Tensor, S: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_weights_dx_impl(g, x, dz, mean, A, B, w1, b1, w2, b2, l2, u_saved,
                                     hs, dus, db1p, P, Q, R, S)


@_backward_weights_dx_op.register_fake
def _(g, x, dz, mean, A, B, w1, b1, w2, b2, l2, u_saved, hs, dus, db1p, P, Q, R, S):
    c = x.shape[1]
    hid = w1.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    return (x.new_empty((hid, c, 1, 1), **f32), x.new_empty((hid,), **f32),
            x.new_empty((c, hid, 1, 1), **f32), torch.empty_like(x))


def fused_backward(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved, coefficients):
    """The block's fused backward (DESIGN.md section 3): phase 1, the coefficients, phase 2.

    `coefficients(sums)` maps the (5, N, C) sums to an object with P, Q, R, S ((N, C), e.g.
    fold.backward_coefficients); it runs between the phases (in autograd-visible torch ops).
    Returns (dx, dw1, db1, dw2, db2, coefficients(sums)).

    Small C: `backward_weights_sums` (one launch: weight gradients and the sums, dz never
    written) -> coefficients -> `backward_dx` (dz recomputed per tile, dx written): x and g
    read twice, dx written once, 5 |x|. Large C: `backward_dz` (kernels A and B: scratch, dz,
    sums) -> coefficients -> `backward_weights_dx` (weights from the scratch, dx fused in)."""
    args = (mean, A, B, w1, b1, w2, b2, l2, u_saved)
    if _large_path(x.shape[1], w1.dtype):
        dz, sums, db2, hs, dus, db1p = torch.ops.riformer_triton.backward_dz(g, x, *args)
        bc = coefficients(sums)
        dw1, db1, dw2, dx = torch.ops.riformer_triton.backward_weights_dx(
            g, x, dz, *args, hs, dus, db1p, bc.P, bc.Q, bc.R, bc.S)
    else:
        dw1, db1, dw2, db2, sums = torch.ops.riformer_triton.backward_weights_sums(g, x, *args)
        bc = coefficients(sums)
        dx = torch.ops.riformer_triton.backward_dx(g, x, *args, bc.P, bc.Q, bc.R, bc.S)
    return dx, dw1, db1, dw2, db2, bc


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
    training backward (`fused_backward`) never materialises dz on the small path; this entry
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
# (the report compiles the unaligned worst case, as triton_forward's specs do).

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


def _spec(fn, name, tn, constexprs, layout, has_u, config, options, ones=()):
    """(jit_fn, signature, constexprs, description, options): the tuple gpu_build_report reads.
    The arguments equal to 1 at launch (`_unit_args` and `ones`) become constexpr 1; `options`
    (num_warps, num_stages) must match the launch, or the report checks another kernel than the
    one that runs."""
    pointer_types = _ptrs(tn, [k for k in fn.arg_names if k.endswith('_ptr')])
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
    desc = f"{name}{tag} {tn} {config} num_warps={options['num_warps']}"
    if 'num_stages' in options:
        desc += f" num_stages={options['num_stages']}"
    return (fn, sig, const, desc, options)


def _ptrs(tn, names):
    """Pointer types: the activations/weights/scratch in the io dtype, the rest fp32."""
    io = {'x_ptr', 'g_ptr', 'u_ptr', 'w1_ptr', 'b1_ptr', 'w2_ptr', 'b2_ptr', 'hs_ptr', 'dus_ptr',
          'dz_ptr', 'dx_ptr'}
    return {k: (tn if k in io else 'fp32') for k in names}


def _small_path_specs(dtype, layout):
    tn, prec = _TL_NAME[dtype], _precision(dtype)
    specs = []
    for bc in _DX_CONFIGS:
        if bc > _pow2_channels(_small_path_max(dtype)):
            continue            # never launched: that C takes the large path in this dtype
        bt, _, bh, warps, stages = _dx_config(bc, dtype, layout)
        const = dict(BLOCK_T=bt, BLOCK_C=bc, BLOCK_H=bh, DOT_F32=False, PRECISION=prec,
                     ROUND_BF16=False)
        specs.append(_spec(
            _mlp_dx_kernel, 'mlp_dx', tn, const, layout, False,
            f"C<={bc} BLOCK_T={bt} BLOCK_H={bh}", {'num_warps': warps, 'num_stages': stages}))
        for has_u in (False, True):
            wbt, wbh, wbw, wbk, wwarps = _wg_config(bc, dtype, layout)
            const = dict(HAS_U=has_u, SCRATCH=False, SUMS=True, FUSE_DX=False, BLOCK_T=wbt,
                         BLOCK_H=wbh, BLOCK_W=wbw, BLOCK_K=wbk, DOT_F32=False, PRECISION=prec,
                         ROUND_BF16=False)
            specs.append(_spec(
                _mlp_weight_grad_kernel, 'mlp_weight_grad', tn, const, layout, has_u,
                f"C<={_pow2_channels(_small_path_max(dtype))} u_saved={has_u} sums "
                f"BLOCK_T={wbt} BLOCK_H={wbh} BLOCK_W={wbw} BLOCK_K={wbk}",
                {'num_warps': wwarps}))
    return specs


def _large_path_specs(dtype, layout):
    """The large-C path's kernel configurations for one dtype and layout (any C > 256); kernels
    A and B also with TILES == 1 (T <= BLOCK_T, e.g. 7x7 tokens)."""
    tn, prec = _TL_NAME[dtype], _precision(dtype)
    specs = []
    cfg = _large_config(dtype, layout)
    bt, bh, bk, warps, stages = cfg['hidden']
    for has_u in (False, True):
        const = dict(HAS_U=has_u, BLOCK_T=bt, BLOCK_H=bh, BLOCK_K=bk, DOT_F32=False,
                     PRECISION=prec, ROUND_BF16=False)
        for one_tile in (False, True):
            specs.append(_spec(
                _mlp_hidden_kernel, 'mlp_hidden', tn, const, layout, has_u,
                f"C>256 u_saved={has_u}{' TILES=1' if one_tile else ''} BLOCK_T={bt} "
                f"BLOCK_H={bh} BLOCK_K={bk}", {'num_warps': warps, 'num_stages': stages},
                ones=('TILES',) if one_tile else ()))
    bt, bc, bh, warps, stages = cfg['dz']
    const = dict(BLOCK_T=bt, BLOCK_C=bc, BLOCK_H=bh, DOT_F32=False, PRECISION=prec,
                 ROUND_BF16=False)
    for one_tile in (False, True):
        specs.append(_spec(
            _mlp_dz_chunk_kernel, 'mlp_dz_chunk', tn, const, layout, False,
            f"C>256{' TILES=1' if one_tile else ''} BLOCK_T={bt} BLOCK_C={bc} BLOCK_H={bh}",
            {'num_warps': warps, 'num_stages': stages}, ones=('TILES',) if one_tile else ()))
    bt, bh, bw, warps = cfg['wg']
    for fuse in (False, True):
        const = dict(HAS_U=False, SCRATCH=True, SUMS=False, FUSE_DX=fuse, BLOCK_T=bt,
                     BLOCK_H=bh, BLOCK_W=bw, BLOCK_K=bw, DOT_F32=False, PRECISION=prec,
                     ROUND_BF16=False)
        specs.append(_spec(
            _mlp_weight_grad_kernel, 'mlp_weight_grad', tn, const, layout, False,
            f"C>256 scratch fuse_dx={fuse} BLOCK_T={bt} BLOCK_H={bh} BLOCK_W={bw}",
            {'num_warps': warps}))
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
    specs.append(_spec(_sum_partials_kernel, 'sum_partials', 'fp32', dict(BLOCK=_SUM_BLOCK),
                       'nchw', False, f"BLOCK={_SUM_BLOCK}", {'num_warps': _SUM_WARPS}))
    # One spec per distinct compiled kernel (C<=32..256 share the weight-gradient config).
    unique = {}
    for spec in specs:
        unique.setdefault(spec[3], spec)
    return list(unique.values())


GPU_BUILD_SPECS = _build_specs()


# ---------------------------------------------------------------------------------------------
# ahead-of-time resource check (no GPU needed; run with the interpreter off)

_USED = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def aot_resource_report(archs=(80, 90), specs=None):
    """Compile every spec for each sm_<arch> and run the wheel's ptxas -v on the PTX: registers,
    stack frame and spill bytes per (spec, arch). No GPU needed; interpreter must be off.

    ptxas -v, not cuobjdump -res-usage: the latter's LOCAL column reads 0 while ptxas reports
    spill stores into the stack frame.
    """
    import subprocess
    import tempfile

    if INTERPRET:
        raise RuntimeError("compile with TRITON_INTERPRET unset (the kernels were defined for "
                           "the interpreter in this process)")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptxas = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'ptxas')
    rows = []
    for spec in (GPU_BUILD_SPECS if specs is None else specs):
        fn, sig, const, desc, options = spec
        for arch in archs:
            k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget('cuda', arch, 32),
                               options=options)
            assert k.asm['cubin'], desc
            with tempfile.NamedTemporaryFile('w', suffix='.ptx') as f:
                f.write(k.asm['ptx'])
                f.flush()
                sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
                log = subprocess.run([ptxas, f"-arch={sm}", '-v', f.name, '-o', os.devnull],
                                     capture_output=True, text=True, check=True).stderr
            frame = _FRAME.search(log)
            rows.append(dict(kernel=desc, arch=f"sm_{arch}", regs=int(_USED.search(log).group(1)),
                             stack=int(frame.group(1)), spill_stores=int(frame.group(2)),
                             spill_loads=int(frame.group(3)), shared=k.metadata.shared))
    return rows


if __name__ == '__main__':
    import sys

    archs = tuple(int(a) for a in sys.argv[1:]) or (80, 90)
    for row in aot_resource_report(archs):
        print(f"{row['arch']}  regs {row['regs']:3d}  stack {row['stack']:3d}  "
              f"spill {row['spill_stores']:3d}/{row['spill_loads']:3d}  smem {row['shared']:6d}  "
              f"{row['kernel']}", flush=True)

"""Triton forward kernels of the fused block (docs/design.md sections 2-3), their launch rules and ops.

Kernels:

* `moments_kernel`: per-(n,c) partial mean and M2 of x over token spans, a split reduction over
  a (span, channel block, sample) grid, so a batch of 2 still gives hundreds of programs. Inside a
  program, tiles are merged with Chan's formula; across programs the partials are merged by
  `fold.merge_moments` in a fixed order (deterministic, no atomics).
* `fused_mlp_kernel` ("flash MLP"): per token tile, z = A x + B in registers, then for each hidden
  chunk h = GELU(W1 z + b1) (exact erf) and acc += W2 h, so the 4C-wide hidden never leaves the
  chip; epilogue out = a x + b + l2 (acc + b2), stored in x's dtype and layout, plus the partial
  moments of the *stored* (rounded) out per token span: the next block's statistics (chaining).
  It keeps a [BLOCK_T, next_pow2(C)] fp32 accumulator and the z tile in registers.
* The two-GEMM path, no C-wide register tile: `mlp_gemm1_kernel` (grid: sample x token tile x
  hidden tile; K-loop over C in masked BLOCK_K chunks, so C=320 is not padded to 512; prologue
  z = A x + B built per chunk; writes h = GELU(W1 z + b1) and optionally u = W1 z + b1 to
  token-major (N, 4C, H, W) channels_last buffers in the weights' dtype) and `mlp_gemm2_kernel` (grid:
  sample x token span x channel tile; K-loop over 4C; the flash kernel's epilogue and partial
  moments, shared as the `_epilogue_and_moments` helper, so chaining works identically). Cost:
  the hidden makes one round trip, 2 x 4C/C = 8 |x| more traffic than the flash kernel (plus x
  read twice), in exchange for MMA-sized tiles at any C.

Tensors are addressed through (n, c, t) strides with t = h*W + w, which NCHW-contiguous and
channels_last both satisfy, so both layouts are read and written natively.

Path rule (`mlp_path`, `mlp_config`): the flash kernel where `MLP_TILES` has a tile for
(BLOCK_C = next_pow2(C), operand kind), else the two-GEMM path. `MLP_TILES` holds only tiles that
compile with zero spills for sm_80 and sm_90 in all four variants the backend can launch (NCHW or
channels_last, with or without saving u) -- the basis of the rule is "never launch a spilling
kernel", and the two-GEMM configs are spill-free at every C. With the current tables:

    fp16/bf16: flash for C <= 128 (BLOCK_C 16/32/64/128: tokens 128/64/32/16), two-GEMM above:
               S12/S24/S36 C = 64, 128 flash, 320, 512 two-GEMM; M36/M48 C = 96 flash,
               192, 384, 768 two-GEMM
    fp32:      flash for C <= 64 (tokens 32/16/16; IEEE dots),
               two-GEMM above: S12 C = 64 flash, 128, 320, 512 two-GEMM

Registers sm_80/sm_90 (NCHW / channels_last, without -> with u; all 0 spills, `python -m
riformer_kernels.tools.gpu_build_report --skip-cuda --only fused_mlp mlp_gemm`):

    flash half C<=16 T128 H32 w8    214/196 -> 255/245 ; cl 128/139 -> 220/208   smem 6-13 KB
    flash half C<=32 T64 H32 w8     242/204 -> 255/249 ; cl 179/139 -> 222/175   smem 8-10 KB
    flash half C<=64 T32 H64 w8     231/254 -> 255/254 ; cl 202/208 -> 216/240   smem 20 KB
    flash half C<=128 T16 H16 w8    218/214 -> 238/234 ; cl 173/181 -> 182/182   smem 12 KB
    flash fp32 C<=16 T32 H32 w8     126/124 -> 170/166 ; cl 100/100 -> 158/158   smem 14 KB
    flash fp32 C<=32 T16 H16 w8     125/108 -> 128/128 ; cl  80/80  -> 128/122   smem 11 KB
    gemm1 half T128 H64 K64 w8      204/194 -> 204/193 ; cl 255/255 -> 255/254   smem 25 KB
    gemm1 fp32 T64 H64 K16 w8        96/96  -> 100/90  ; cl 128/108 -> 156/122   smem 20 KB
                                    (now T32: see GEMM1_TILES)
    gemm2 half T64 C64 K32 w8       255/255            ; cl 174/176                smem 16 KB
    gemm2 fp32 T64 C32 K16 w8       182/188            ; cl 128/128                smem 12 KB

Compiled as launched (`python -m riformer_kernels.tools.gpu_build_report`, default mode: the
variants Triton's launcher builds for every S12..M48 stage at 224/384 px, N = 1, 8, 64, 256,
with its divisibility-16 attributes on aligned pointers and integers), unaligned spec table
above -> launched aligned variant, sm_80/sm_90, 0 spills:

    flash half C<=64 T32 H64 w8 NCHW    231/254 regs 20 KB, no cp.async -> 168/128 regs 40 KB,
                                        12 cp.async, ld.global vector/scalar 2/6
    flash half C<=128 T16 H16 w8 -> T32 H32 w4 (each warp owns one 16x16 tile of both dots;
                                        8 warps duplicated the single 16x16 tile 8 times):
                                        198-255 regs, 42 KB, 24 cp.async
    flash fp32 C<=64 T16 H16 w8 3xTF32 -> IEEE (spill-free once aligned: 100-128 regs, 21 KB;
                                        the 3xTF32 choice rested on the unaligned variant)
    gemm1 half T128 H64 K64 w8 cl C=320 14x14   255/255 regs 25 KB -> 128/128 regs,
                                        66.5/89 KB smem, 24 cp.async

Why the flash kernel needs so many registers (and why the earlier table was optimistic):
Triton's launcher turns an integer argument equal to 1 into a compile-time constant, so the
kernel that runs for an NCHW tensor has stride_xt == 1 baked in (channels_last: stride_xc == 1).
The earlier build specs compiled a variant with every stride a runtime value, which never runs;
compiled the way it runs, most earlier tiles spilled (e.g. half C<=128 T32 H16 w4: 48/360 bytes
at sm_80/sm_90, half C<=512 T16: 1336/688, fp32 C<=32 T64: 84 at sm_90). The specs now carry those
constants. The register cost itself comes from (1) the epilogue's per-tile moments, a reduction
over tokens in a token-contiguous layout (NCHW): one butterfly shuffle chain per channel held by
the thread (~400 shfl per 64x64 tile), (2) unvectorised loads: the report cannot give Triton the
divisible-by-16 facts the launcher adds for aligned pointers and strides, so it compiles scalar
loads with one 64-bit address per element (the worst case; aligned runtime shapes get fewer),
and (3) for fp32, 'ieee' dots run on FMA units with whole K-slices of both operands in
registers (BLOCK_K 16 keeps that at 2 x 16 x 4 values). num_stages 1/2 did not help (the dot
operands are staged in shared memory by cp.async, not in registers).

Partial-moment spans (SUBTILES token tiles per program): grow while >= 528 programs remain (4
per SM of a 132-SM H100), up to 512 tokens; then to at least 128 tokens while >= 132 programs
remain; then to at least 64 tokens whenever that removes partials (merge traffic ~11/span |x|).
Moments kernel: BLOCK_C = min(next_pow2(C), 32), BLOCK_T = 4096 // BLOCK_C (a 4096-element
fp32 tile = 32 registers/thread at 4 warps), SUBTILES by the same rule up to 2048 tokens.

Every entry point is a `torch.library.custom_op` with a fake implementation (namespace
`riformer_triton`): `moments_partials`, `fused_mlp_forward` (the rule's path), `mlp_forward`
(save_u and a forced path), `mlp_hidden` / `mlp_output` (the two GEMMs alone). The interpreter
(TRITON_INTERPRET=1) runs the same kernels on CPU tensors; there `tl.dot` on bf16 is wrong and
fp32->bf16 casts truncate, so bf16 operands are upcast to fp32 for the dot after being rounded to
bf16 precision (round-to-nearest-even done in integer arithmetic), and bf16 stores (out, h, u) are
rounded the same way first, which reproduces the GPU's numerics.

Mixed precision (what autocast runs): fp32 x and out with half weights. The dots run in the
weights' dtype (`dot_dtype` = w1's: z and h are rounded to it, h and u are stored in it), the
epilogue reads x and writes out in fp32, so the residual stream is never rounded to the half
dtype. The launch configuration follows x's dtype (the fp32 tiles: their shapes are valid half
MMA shapes, K a multiple of 16; and the partials' span stays a function of the output alone,
which `KernelSet.output_span` needs); the dot flags follow the weights'. GPU_BUILD_SPECS list the
mixed variants; their spill counts have not been checked on a GPU yet.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ... import fold
from .device_guard import device_of

INTERPRET = os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')
TARGET_PROGRAMS = 4 * 132   # 4 programs per SM of an H100 SXM

_TORCH_TO_TL = {torch.float32: 'fp32', torch.float16: 'fp16', torch.bfloat16: 'bf16'}
SUPPORTED_DTYPES = tuple(_TORCH_TO_TL)


def _empty(shape, dtype, device, memory_format=torch.contiguous_format):
    """Allocation point of every kernel output (tests patch it to fill with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


# ---------------------------------------------------------------------------------------------
# kernels

@triton.jit
def _round_to_bf16(v):
    """fp32 -> nearest-even bf16 value, still as fp32 (the interpreter's cast truncates)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    bits = (bits >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot_operand(v, dot_dtype: tl.constexpr, DOT_FP32: tl.constexpr, ROUND_BF16: tl.constexpr):
    """An fp32 tile as the A operand of a dot: dot_dtype (the weights' dtype) on a GPU, fp32
    rounded to bf16 precision when the interpreter's bf16 dot is avoided, plain fp32 for fp32
    weights."""
    if DOT_FP32:
        if ROUND_BF16:
            if dot_dtype == tl.bfloat16:
                v = _round_to_bf16(v)
    else:
        v = v.to(dot_dtype)
    return v


@triton.jit
def _rounded_for(v, dst_dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    """v ready to be cast to dst_dtype: rounded to nearest-even bf16 first where ROUND_BF16 (the
    interpreter, whose fp32 -> bf16 cast truncates) and dst_dtype is bf16; unchanged for any
    other destination (fp32 out and dx of the mixed-precision mode: no rounding at all)."""
    if ROUND_BF16:
        if dst_dtype == tl.bfloat16:
            v = _round_to_bf16(v)
    return v


@triton.jit
def _store_rounded(ptrs, v, mask, ROUND_BF16: tl.constexpr):
    """Store an fp32 tile in the pointer's dtype, rounding to nearest even (also interpreted)."""
    dst = ptrs.dtype.element_ty
    tl.store(ptrs, _rounded_for(v, dst, ROUND_BF16).to(dst), mask=mask)


@triton.jit
def _gelu(u):
    return 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))


@triton.jit
def _epilogue_and_moments(acc, x_ptrs, o_ptrs, mask, mask_t, a, b, l2, b2, count, mean, m2,
                          ROUND_BF16: tl.constexpr):
    """out = a x + b + l2 (acc + b2) for one [BLOCK_T, BLOCK_C] tile, stored in out's dtype, and
    Chan's merge of the tile's moments of the *stored* (rounded) values into (count, mean, m2).
    Shared by the flash kernel and the two-GEMM output kernel, so chained statistics are the
    same whichever path wrote a block's output."""
    # x is re-read here (an L1/L2 hit: the program loaded it for z) rather than kept live
    # through the hidden loop, which would cost BLOCK_T*BLOCK_C/threads more registers.
    xv = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    out = a[None, :] * xv + b[None, :] + l2[None, :] * (acc + b2[None, :])
    out_io = _rounded_for(out, o_ptrs.dtype.element_ty, ROUND_BF16).to(o_ptrs.dtype.element_ty)
    tl.store(o_ptrs, out_io, mask=mask)
    # Moments of the value the next block will read, i.e. after rounding to out's dtype.
    ov = out_io.to(tl.float32)
    return _merge_tile_moments(tl.where(mask, ov, 0.0), mask, mask_t, count, mean, m2)


@triton.jit
def _merge_tile_moments(v, mask, mask_t, count, mean, m2):
    """Chan's merge of one [BLOCK_T, BLOCK_C] tile into the running per-channel (count, mean,
    m2). The tile's own moments take two passes over the values held in registers, so nothing
    cancels like E[x^2] - E[x]^2; `v` must be 0 where `mask` is false."""
    n_tile = tl.sum(mask_t.to(tl.float32), axis=0)
    tile_mean = tl.sum(v, axis=0) / tl.maximum(n_tile, 1.0)
    d = tl.where(mask, v - tile_mean[None, :], 0.0)
    tile_m2 = tl.sum(d * d, axis=0)
    total = count + n_tile
    w = n_tile / tl.maximum(total, 1.0)
    delta = tile_mean - mean
    return total, mean + delta * w, m2 + tile_m2 + delta * delta * count * w


@triton.jit
def _no_moments(BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """The running (count, mean, m2) of a program's token span before its first tile."""
    count = tl.sum(tl.zeros([BLOCK_T], tl.float32), axis=0)
    return count, tl.zeros([BLOCK_C], tl.float32), tl.zeros([BLOCK_C], tl.float32)


@triton.jit
def _span_tile(pid_p, subtiles, s, T, mask_c, BLOCK_T: tl.constexpr):
    """Token offsets, token mask and (token, channel) mask of tile `s` of span `pid_p`."""
    offs_t = (pid_p * subtiles + s) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    return offs_t, mask_t, mask_t[:, None] & mask_c[None, :]


@triton.jit
def moments_kernel(x_ptr, mean_ptr, m2_ptr, C, T, n_parts, subtiles,
                   stride_xn, stride_xc, stride_xt,
                   BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_n = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    base = x_ptr + pid_n.to(tl.int64) * stride_xn
    count, mean, m2 = _no_moments(BLOCK_T, BLOCK_C)
    for s in range(0, subtiles):
        offs_t, mask_t, mask = _span_tile(pid_p, subtiles, s, T, mask_c, BLOCK_T)
        xv = tl.load(base + offs_t[:, None] * stride_xt + offs_c[None, :] * stride_xc,
                     mask=mask, other=0.0).to(tl.float32)
        count, mean, m2 = _merge_tile_moments(xv, mask, mask_t, count, mean, m2)
    dst = (pid_n * n_parts + pid_p) * C + offs_c
    tl.store(mean_ptr + dst, mean, mask=mask_c)
    tl.store(m2_ptr + dst, m2, mask=mask_c)


@triton.jit
def fused_mlp_kernel(x_ptr, out_ptr, u_ptr, A_ptr, B_ptr, a_ptr, b_ptr, l2_ptr,
                     w1_ptr, b1_ptr, w2_ptr, b2_ptr, pmean_ptr, pm2_ptr,
                     C, T, HID, n_parts, subtiles,
                     stride_xn, stride_xc, stride_xt, stride_on, stride_oc, stride_ot,
                     stride_un, stride_ut,
                     stride_l2n, stride_w1h, stride_w1c, stride_w2c, stride_w2h,
                     BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                     DOT_FP32: tl.constexpr, ROUND_BF16: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr, SAVE_U: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    nc = pid_n * C + offs_c
    A = tl.load(A_ptr + nc, mask=mask_c, other=0.0)
    B = tl.load(B_ptr + nc, mask=mask_c, other=0.0)
    a = tl.load(a_ptr + nc, mask=mask_c, other=0.0)
    b = tl.load(b_ptr + nc, mask=mask_c, other=0.0)
    l2 = tl.load(l2_ptr + pid_n * stride_l2n + offs_c, mask=mask_c, other=0.0)
    b2 = tl.load(b2_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    x_base = x_ptr + pid_n.to(tl.int64) * stride_xn
    o_base = out_ptr + pid_n.to(tl.int64) * stride_on
    u_base = u_ptr + pid_n.to(tl.int64) * stride_un
    # The dots run in the weights' dtype; x and out may be wider (fp32 under autocast).
    dot_dtype = w1_ptr.dtype.element_ty

    count, mean, m2 = _no_moments(BLOCK_T, BLOCK_C)
    # A runtime loop: registers do not grow with the number of tiles a program takes.
    for s in range(0, subtiles):
        offs_t, mask_t, mask = _span_tile(pid_p, subtiles, s, T, mask_c, BLOCK_T)
        x_ptrs = x_base + offs_t[:, None] * stride_xt + offs_c[None, :] * stride_xc
        xv = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        # Padded channels must be exactly zero: they are the K extent of the first dot.
        z = tl.where(mask_c[None, :], A[None, :] * xv + B[None, :], 0.0)
        z = _dot_operand(z, dot_dtype, DOT_FP32, ROUND_BF16)
        acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
        for h0 in range(0, HID, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < HID
            w1 = tl.load(w1_ptr + offs_h[None, :] * stride_w1h + offs_c[:, None] * stride_w1c,
                         mask=mask_c[:, None] & mask_h[None, :], other=0.0)
            bias1 = tl.load(b1_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
            w2 = tl.load(w2_ptr + offs_c[None, :] * stride_w2c + offs_h[:, None] * stride_w2h,
                         mask=mask_h[:, None] & mask_c[None, :], other=0.0)
            if DOT_FP32:
                w1 = w1.to(tl.float32)
                w2 = w2.to(tl.float32)
            u = tl.dot(z, w1, input_precision=INPUT_PRECISION) + bias1[None, :]
            if SAVE_U:
                _store_rounded(u_base + offs_t[:, None] * stride_ut + offs_h[None, :], u,
                               mask_t[:, None] & mask_h[None, :], ROUND_BF16)
            h = _dot_operand(_gelu(u), dot_dtype, DOT_FP32, ROUND_BF16)
            acc = tl.dot(h, w2, acc, input_precision=INPUT_PRECISION)
        count, mean, m2 = _epilogue_and_moments(
            acc, x_ptrs, o_base + offs_t[:, None] * stride_ot + offs_c[None, :] * stride_oc,
            mask, mask_t, a, b, l2, b2, count, mean, m2, ROUND_BF16)
    dst = (pid_n * n_parts + pid_p) * C + offs_c
    tl.store(pmean_ptr + dst, mean, mask=mask_c)
    tl.store(pm2_ptr + dst, m2, mask=mask_c)


@triton.jit
def _program_tile(n_fast, n_tiles):
    """(fast index, sample, tile) of this program in a 1-D grid of N x n_tiles x n_fast
    programs, the fast index varying fastest (programs that run together share a tile)."""
    pid = tl.program_id(0)
    rest = pid // n_fast
    return pid % n_fast, rest // n_tiles, rest % n_tiles


@triton.jit
def mlp_gemm1_kernel(x_ptr, h_ptr, u_ptr, A_ptr, B_ptr, w1_ptr, b1_ptr,
                     C, T, HID, n_ttiles, n_htiles,
                     stride_xn, stride_xc, stride_xt, stride_hn, stride_ht,
                     stride_w1h, stride_w1c,
                     BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                     DOT_FP32: tl.constexpr, ROUND_BF16: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr, SAVE_U: tl.constexpr):
    """Two-GEMM path, GEMM 1 with the fold as prologue: h = GELU(W1 (A x + B) + b1) for one
    (sample, token tile, hidden tile), K-loop over C in BLOCK_K chunks (masked: C need not be a
    power of two). h (and u = W1 z + b1 when SAVE_U) go to token-major buffers (hidden stride 1:
    an (N, HID, H, W) channels_last tensor), in the weights' dtype (the dot dtype: x's, or
    the half dtype of the mixed-precision mode)."""
    # hidden tiles fastest: programs running together share the x tile (L2) and differ in W1
    pid_h, pid_n, pid_t = _program_tile(n_htiles, n_ttiles)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < HID
    offs_k = tl.arange(0, BLOCK_K)
    x_base = x_ptr + pid_n.to(tl.int64) * stride_xn
    dot_dtype = w1_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    for k0 in range(0, C, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < C
        A = tl.load(A_ptr + pid_n * C + kk, mask=mask_k, other=0.0)
        B = tl.load(B_ptr + pid_n * C + kk, mask=mask_k, other=0.0)
        xv = tl.load(x_base + offs_t[:, None] * stride_xt + kk[None, :] * stride_xc,
                     mask=mask_t[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        # channels past C must be exactly zero: they are part of the dot's K extent
        z = tl.where(mask_k[None, :], A[None, :] * xv + B[None, :], 0.0)
        z = _dot_operand(z, dot_dtype, DOT_FP32, ROUND_BF16)
        w1 = tl.load(w1_ptr + offs_h[None, :] * stride_w1h + kk[:, None] * stride_w1c,
                     mask=mask_k[:, None] & mask_h[None, :], other=0.0)
        if DOT_FP32:
            w1 = w1.to(tl.float32)
        acc = tl.dot(z, w1, acc, input_precision=INPUT_PRECISION)
    bias1 = tl.load(b1_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    u = acc + bias1[None, :]
    offs = pid_n.to(tl.int64) * stride_hn + offs_t[:, None] * stride_ht + offs_h[None, :]
    mask = mask_t[:, None] & mask_h[None, :]
    if SAVE_U:
        _store_rounded(u_ptr + offs, u, mask, ROUND_BF16)
    _store_rounded(h_ptr + offs, _gelu(u), mask, ROUND_BF16)


@triton.jit
def mlp_gemm2_kernel(h_ptr, x_ptr, out_ptr, a_ptr, b_ptr, l2_ptr, w2_ptr, b2_ptr,
                     pmean_ptr, pm2_ptr,
                     C, T, HID, n_parts, n_ctiles, subtiles,
                     stride_hn, stride_ht, stride_xn, stride_xc, stride_xt,
                     stride_on, stride_oc, stride_ot, stride_l2n, stride_w2c, stride_w2h,
                     BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                     DOT_FP32: tl.constexpr, ROUND_BF16: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr):
    """Two-GEMM path, GEMM 2 with the block epilogue: out = a x + b + l2 (W2 h + b2) for one
    (sample, token span, channel tile), K-loop over the hidden dim; `subtiles` token tiles per
    program, whose moments are merged into one partial per (n, span, c) like the flash kernel's."""
    # channel tiles fastest: programs running together share the h tile (L2)
    pid_c, pid_n, pid_p = _program_tile(n_ctiles, n_parts)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    nc = pid_n * C + offs_c
    a = tl.load(a_ptr + nc, mask=mask_c, other=0.0)
    b = tl.load(b_ptr + nc, mask=mask_c, other=0.0)
    l2 = tl.load(l2_ptr + pid_n * stride_l2n + offs_c, mask=mask_c, other=0.0)
    b2 = tl.load(b2_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    h_base = h_ptr + pid_n.to(tl.int64) * stride_hn
    x_base = x_ptr + pid_n.to(tl.int64) * stride_xn
    o_base = out_ptr + pid_n.to(tl.int64) * stride_on
    offs_k = tl.arange(0, BLOCK_K)

    count, mean, m2 = _no_moments(BLOCK_T, BLOCK_C)
    for s in range(0, subtiles):
        offs_t = (pid_p * subtiles + s) * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = offs_t < T
        acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
        for k0 in range(0, HID, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < HID
            hv = tl.load(h_base + offs_t[:, None] * stride_ht + kk[None, :],
                         mask=mask_t[:, None] & mask_k[None, :], other=0.0)
            w2 = tl.load(w2_ptr + offs_c[None, :] * stride_w2c + kk[:, None] * stride_w2h,
                         mask=mask_k[:, None] & mask_c[None, :], other=0.0)
            if DOT_FP32:
                hv = hv.to(tl.float32)
                w2 = w2.to(tl.float32)
            acc = tl.dot(hv, w2, acc, input_precision=INPUT_PRECISION)
        mask = mask_t[:, None] & mask_c[None, :]
        count, mean, m2 = _epilogue_and_moments(
            acc, x_base + offs_t[:, None] * stride_xt + offs_c[None, :] * stride_xc,
            o_base + offs_t[:, None] * stride_ot + offs_c[None, :] * stride_oc,
            mask, mask_t, a, b, l2, b2, count, mean, m2, ROUND_BF16)
    dst = (pid_n * n_parts + pid_p) * C + offs_c
    tl.store(pmean_ptr + dst, mean, mask=mask_c)
    tl.store(pm2_ptr + dst, m2, mask=mask_c)


# ---------------------------------------------------------------------------------------------
# launch rules

# Flash-MLP tiles per (BLOCK_C, operand kind): (BLOCK_T, BLOCK_H, num_warps). Only spill-free
# (checked on the launched, aligned variants since gpu_build_report compiles what launches: half
# C<=128 T32 H32 w4 and IEEE fp32 C<=64 T16 H16 w8 are spill-free there).
# entries: a (BLOCK_C, kind) that is absent takes the two-GEMM path (`mlp_path`). Numbers: see
# the module docstring and `python -m riformer_kernels.tools.gpu_build_report --only fused_mlp`.
# (BLOCK_C, operand kind) -> (BLOCK_T, BLOCK_H, num_warps[, fp32 dot precision]). fp32 dots are
# 'ieee' unless a tile names 'tf32x3': three TF32 tensor-core products (hi*hi + hi*lo + lo*hi)
# that keep fp32-level accuracy (~2^-21 relative per product, far inside the 1e-5 contract)
# with MMA operand layouts instead of FMA K-slices. No tile uses it now: fp32 C<=64 took it when
# the report compiled unaligned variants ('ieee' T16 H16 w8 spilled 24-40 bytes there); compiled
# as launched (aligned), 'ieee' T16 H16 w8 is spill-free (100-128 registers).
MLP_TILES = {
    (16, 'half'): (128, 32, 8), (32, 'half'): (64, 32, 8), (64, 'half'): (32, 64, 8),
    (128, 'half'): (32, 32, 4),
    (16, 'fp32'): (32, 32, 8), (32, 'fp32'): (16, 16, 8), (64, 'fp32'): (16, 16, 8),
}
# Two-GEMM tiles per operand kind. GEMM 1: (BLOCK_T, BLOCK_H, BLOCK_K over C, num_warps);
# GEMM 2: (BLOCK_T, BLOCK_C, BLOCK_K over the hidden dim, num_warps).
# fp32 BLOCK_T 32 (was 64): the launched channels_last variant at 7x7 (one token tile, n_ttiles
# == 1 constant) spilled 4 bytes at sm_90; 4 warps spilled 12 bytes in NCHW. (32, 64, 16, 8) is
# spill-free in every launched variant at 40-72 registers.
GEMM1_TILES = {'fp32': (32, 64, 16, 8), 'half': (128, 64, 64, 8)}
GEMM2_TILES = {'fp32': (64, 32, 16, 8), 'half': (64, 64, 32, 8)}
MIN_PARTIAL_SPAN = 128   # tokens per partial moment: bounds the merge traffic to ~11/128 |x|
SPAN_FLOOR = 64          # spans grow to this even below one program per SM: <= ~11/64 |x|
MLP_PATHS = ('flash', 'two_gemm')


def _subtiles(programs, block_t: int, max_span: int) -> int:
    """Token tiles per program. Grow while >= TARGET_PROGRAMS remain (4 per SM of an H100),
    then up to MIN_PARTIAL_SPAN tokens while >= one program per SM (132) remains, then up to
    SPAN_FLOOR tokens regardless."""
    s = 1
    while s * 2 * block_t <= max_span and programs(s * 2) >= TARGET_PROGRAMS:
        s *= 2
    while s * block_t < MIN_PARTIAL_SPAN and programs(s * 2) >= TARGET_PROGRAMS // 4:
        s *= 2
    # Small token tiles (16) on small grids would otherwise leave 16-token spans, whose merge
    # (fold.merge_moments) moves ~11/16 |x|: grow while that still removes partials.
    while s * block_t < SPAN_FLOOR and programs(s * 2) < programs(s):
        s *= 2
    return s


def moments_config(n: int, c: int, t: int) -> dict:
    block_c = min(triton.next_power_of_2(c), 32)
    block_t = 4096 // block_c
    c_blocks = triton.cdiv(c, block_c)
    sub = _subtiles(lambda s: n * c_blocks * triton.cdiv(t, block_t * s), block_t, 2048)
    span = block_t * sub
    return dict(BLOCK_C=block_c, BLOCK_T=block_t, SUBTILES=sub, span=span,
                n_parts=triton.cdiv(t, span), c_blocks=c_blocks, num_warps=4)


def _kind(dtype: torch.dtype) -> str:
    return 'fp32' if dtype == torch.float32 else 'half'


def _flash_block_c(c: int) -> int:
    return max(16, triton.next_power_of_2(c))


def mlp_path(c: int, dtype: torch.dtype) -> str:
    """The rule: the flash kernel where MLP_TILES has a (spill-free) tile for (next_pow2(C),
    dtype kind), else the two-GEMM path."""
    return 'flash' if (_flash_block_c(c), _kind(dtype)) in MLP_TILES else 'two_gemm'


def mlp_config(n: int, c: int, t: int, dtype: torch.dtype, path: str | None = None) -> dict:
    """Launch configuration of the MLP forward; `path` None or 'auto' applies `mlp_path`."""
    if path in (None, 'auto'):
        path = mlp_path(c, dtype)
    kind = _kind(dtype)
    if path == 'flash':
        block_c = _flash_block_c(c)
        if (block_c, kind) not in MLP_TILES:
            raise ValueError(f"no flash-MLP tile for C={c} in {dtype} (MLP_TILES)")
        block_t, block_h, num_warps, *precision = MLP_TILES[(block_c, kind)]
        sub = _subtiles(lambda s: n * triton.cdiv(t, block_t * s), block_t, 512)
        span = block_t * sub
        return dict(path=path, BLOCK_T=block_t, BLOCK_C=block_c, BLOCK_H=block_h, SUBTILES=sub,
                    span=span, n_parts=triton.cdiv(t, span), num_warps=num_warps,
                    fp32_precision=precision[0] if precision else 'ieee', spill_free=True)
    if path != 'two_gemm':
        raise ValueError(f"path must be 'auto' or one of {MLP_PATHS}, not {path!r}")
    bt1, bh, bk1, w1 = GEMM1_TILES[kind]
    bt2, bc, bk2, w2 = GEMM2_TILES[kind]
    c_tiles = triton.cdiv(c, bc)
    sub = _subtiles(lambda s: n * triton.cdiv(t, bt2 * s) * c_tiles, bt2, 512)
    span = bt2 * sub
    return dict(path=path, gemm1=dict(BLOCK_T=bt1, BLOCK_H=bh, BLOCK_K=bk1, num_warps=w1),
                gemm2=dict(BLOCK_T=bt2, BLOCK_C=bc, BLOCK_K=bk2, num_warps=w2),
                BLOCK_T=bt2, SUBTILES=sub, span=span, n_parts=triton.cdiv(t, span),
                c_tiles=c_tiles, spill_free=True)


MAX_CHANNELS = None   # no limit: C beyond the flash tiles takes the two-GEMM path


def _dot_flags(dtype: torch.dtype, fp32_precision: str = 'ieee', io_dtype=None) -> dict:
    """Constexprs of a launch whose dots run in `dtype` (the weights') on activations in
    `io_dtype` (default: the same; fp32 in the mixed-precision mode). fp32 must not silently
    become plain tf32 (1e-5 accuracy contract); bf16 dots are broken in the interpreter, so
    there they run in fp32 on bf16-rounded operands. ROUND_BF16 (interpreter, bf16 anywhere):
    round before every cast to bf16, which the interpreter truncates; `_rounded_for` applies it
    only where the destination is bf16, so fp32 outputs of the mixed mode are stored exact."""
    io_dtype = dtype if io_dtype is None else io_dtype
    bf16_dot_interp = INTERPRET and dtype == torch.bfloat16
    return dict(DOT_FP32=dtype == torch.float32 or bf16_dot_interp,
                ROUND_BF16=INTERPRET and torch.bfloat16 in (dtype, io_dtype),
                INPUT_PRECISION=fp32_precision if dtype == torch.float32 else 'tf32')


def token_strides(x: torch.Tensor):
    """(n, c, t) strides of a 4-D tensor whose H and W collapse into one token axis, else None."""
    sn, sc, sh, sw = x.stride()
    if x.shape[2] > 1 and x.shape[3] > 1 and sh != x.shape[3] * sw:
        return None
    if x.shape[3] == 1:
        return sn, sc, sh
    return sn, sc, sw


def output_format(x: torch.Tensor):
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def partial_counts(t: int, span: int, n_parts: int, device) -> torch.Tensor:
    """Number of tokens behind each partial: `span`, except a shorter last one. Shape (1, P, 1).

    Built on the device (arange and a clamp: kernels, exact in fp32 below 2^24 tokens), not from
    a host list: `torch.tensor(list, device=cuda)` is a blocking pageable copy every forward and
    raises under CUDA-graph capture."""
    first = torch.arange(n_parts, dtype=torch.float32, device=device) * span
    return (t - first).clamp_(max=span).view(1, n_parts, 1)


def merge_partials(pmean: torch.Tensor, pm2: torch.Tensor, t: int, span: int):
    """(N, P, C) partial means / M2s -> per-(n,c) mean and population variance, via fold."""
    n_parts = pmean.shape[1]
    if n_parts == 1:
        return pmean[:, 0], pm2[:, 0] / t
    return fold.merge_moments(partial_counts(t, span, n_parts, pmean.device), pmean, pm2, dim=1)


# ---------------------------------------------------------------------------------------------
# custom ops

def _launch_moments(x: torch.Tensor):
    n, c, h, w = x.shape
    t = h * w
    cfg = moments_config(n, c, t)
    pmean = _empty((n, cfg['n_parts'], c), torch.float32, x.device)
    pm2 = _empty((n, cfg['n_parts'], c), torch.float32, x.device)
    sn, sc, st = token_strides(x)
    grid = (cfg['n_parts'], cfg['c_blocks'], n)
    moments_kernel[grid](x, pmean, pm2, c, t, cfg['n_parts'], cfg['SUBTILES'], sn, sc, st,
                         BLOCK_C=cfg['BLOCK_C'], BLOCK_T=cfg['BLOCK_T'],
                         num_warps=cfg['num_warps'])
    return pmean, pm2


@torch.library.custom_op('riformer_triton::moments_partials', mutates_args=())
def moments_partials(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(n, span, c) partial means and M2s of x (fp32); spans per `moments_config`."""
    with device_of(x):
        return _launch_moments(x)


@moments_partials.register_fake
def _(x):
    n, c, h, w = x.shape
    p = moments_config(n, c, h * w)['n_parts']
    return x.new_empty((n, p, c), dtype=torch.float32), x.new_empty((n, p, c), dtype=torch.float32)


def _hidden_buffer(x: torch.Tensor, hid: int, dtype=None) -> torch.Tensor:
    """(N, HID, H, W) channels_last (token-major, hidden stride 1) in `dtype` (the weights'
    dtype: h and u are dot-side tensors) or x's: the h scratch and the saved u. Token stride
    HID (a multiple of 16 for C % 4 == 0)."""
    n, _, hh, ww = x.shape
    return _empty((n, hid, hh, ww), dtype or x.dtype, x.device, memory_format=torch.channels_last)


def _no_u(x: torch.Tensor) -> torch.Tensor:
    return _empty((0,), x.dtype, x.device)


def _launch_gemm1(x, A, B, w1, b1, save_u: bool, cfg: dict):
    """GEMM 1 of the two-GEMM path: (h, u) with h = GELU(u), u = W1 (A x + B) + b1."""
    n, c, hh, ww = x.shape
    t = hh * ww
    hid = w1.shape[0]
    g = cfg['gemm1']
    h = _hidden_buffer(x, hid, w1.dtype)
    u = _hidden_buffer(x, hid, w1.dtype) if save_u else _no_u(x)
    n_ttiles, n_htiles = triton.cdiv(t, g['BLOCK_T']), triton.cdiv(hid, g['BLOCK_H'])
    mlp_gemm1_kernel[(n * n_ttiles * n_htiles,)](
        x, h, u if save_u else h, A, B, w1, b1, c, t, hid, n_ttiles, n_htiles,
        *token_strides(x), hid * t, hid, w1.stride(0), w1.stride(1),
        BLOCK_T=g['BLOCK_T'], BLOCK_H=g['BLOCK_H'], BLOCK_K=g['BLOCK_K'],
        num_warps=g['num_warps'], SAVE_U=save_u, **_dot_flags(w1.dtype, io_dtype=x.dtype))
    return h, u


def _launch_gemm2(h, x, a, b, l2, w2, b2, cfg: dict):
    """GEMM 2 of the two-GEMM path: out = a x + b + l2 (W2 h + b2) and its partial moments."""
    n, c, hh, ww = x.shape
    t = hh * ww
    hid = w2.shape[1]
    g = cfg['gemm2']
    out = _empty(x.shape, x.dtype, x.device, memory_format=output_format(x))
    pmean = _empty((n, cfg['n_parts'], c), torch.float32, x.device)
    pm2 = _empty((n, cfg['n_parts'], c), torch.float32, x.device)
    mlp_gemm2_kernel[(n * cfg['n_parts'] * cfg['c_tiles'],)](
        h, x, out, a, b, l2, w2, b2, pmean, pm2, c, t, hid, cfg['n_parts'], cfg['c_tiles'],
        cfg['SUBTILES'], hid * t, hid, *token_strides(x), *token_strides(out),
        l2.stride(0), w2.stride(0), w2.stride(1),
        BLOCK_T=g['BLOCK_T'], BLOCK_C=g['BLOCK_C'], BLOCK_K=g['BLOCK_K'],
        num_warps=g['num_warps'], **_dot_flags(w2.dtype, io_dtype=x.dtype))
    return out, pmean, pm2


def _launch_flash(x, A, B, a, b, l2, w1, b1, w2, b2, save_u: bool, cfg: dict):
    n, c, hh, ww = x.shape
    t = hh * ww
    hid = w1.shape[0]
    out = _empty(x.shape, x.dtype, x.device, memory_format=output_format(x))
    pmean = _empty((n, cfg['n_parts'], c), torch.float32, x.device)
    pm2 = _empty((n, cfg['n_parts'], c), torch.float32, x.device)
    u = _hidden_buffer(x, hid, w1.dtype) if save_u else _no_u(x)
    fused_mlp_kernel[(cfg['n_parts'], n)](
        x, out, u if save_u else out, A, B, a, b, l2, w1, b1, w2, b2, pmean, pm2,
        c, t, hid, cfg['n_parts'], cfg['SUBTILES'], *token_strides(x), *token_strides(out),
        hid * t, hid, l2.stride(0), w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1),
        BLOCK_T=cfg['BLOCK_T'], BLOCK_C=cfg['BLOCK_C'], BLOCK_H=cfg['BLOCK_H'],
        num_warps=cfg['num_warps'], SAVE_U=save_u,
        **_dot_flags(w1.dtype, cfg['fp32_precision'], io_dtype=x.dtype))
    return out, pmean, pm2, u


def _check_dtypes(x, w1, w2):
    """x's dtype is the weights' (w1 = w2), or fp32 with half weights: the mixed-precision mode
    (x, out and the epilogue in fp32, the dots on half operands: what autocast runs)."""
    if w1.dtype != w2.dtype or not (x.dtype == w1.dtype or (
            x.dtype == torch.float32 and w1.dtype in (torch.float16, torch.bfloat16))):
        raise ValueError(f"x {x.dtype} with w1 {w1.dtype}, w2 {w2.dtype}: the weights share one "
                         f"dtype, x's or a half dtype with fp32 x (mixed precision)")


def _launch_mlp(x, A, B, a, b, l2, w1, b1, w2, b2, save_u=False, path=None):
    """The MLP forward by `mlp_config`'s path: (out, pmean, pm2, u or an empty tensor). The
    launch configuration follows x's dtype (so the partials' span is a function of the output
    alone, `KernelSet.output_span`); the dot flags follow the weights' dtype."""
    _check_dtypes(x, w1, w2)
    n, c, hh, ww = x.shape
    cfg = mlp_config(n, c, hh * ww, x.dtype, path)
    if cfg['path'] == 'flash':
        return _launch_flash(x, A, B, a, b, l2, w1, b1, w2, b2, save_u, cfg)
    h, u = _launch_gemm1(x, A, B, w1, b1, save_u, cfg)
    out, pmean, pm2 = _launch_gemm2(h, x, a, b, l2, w2, b2, cfg)
    return out, pmean, pm2, u


def _fake_mlp(x, w1, save_u, path):
    n, c, h, w = x.shape
    p = mlp_config(n, c, h * w, x.dtype, path)['n_parts']
    out = torch.empty_like(x, memory_format=output_format(x))
    u = (x.new_empty((n, w1.shape[0], h, w), dtype=w1.dtype).contiguous(
        memory_format=torch.channels_last) if save_u else x.new_empty((0,)))
    return (out, x.new_empty((n, p, c), dtype=torch.float32),
            x.new_empty((n, p, c), dtype=torch.float32), u)


@torch.library.custom_op('riformer_triton::fused_mlp_forward', mutates_args=())
def fused_mlp_forward(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, a: torch.Tensor,
                      b: torch.Tensor, l2: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                      w2: torch.Tensor, b2: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out = a x + b + l2 (W2 GELU(W1 (A x + B) + b1) + b2) and the partial moments of out,
    by the path `mlp_path` picks (flash or two-GEMM).

    A, B, a, b: (N, C) fp32 contiguous; l2: (N, C) fp32 with unit channel stride (its sample
    stride may be 0); w1 (HID, C, 1, 1), w2 (C, HID, 1, 1) in x's dtype, or in a half dtype
    with fp32 x (the mixed-precision mode); biases in any float dtype (read as fp32).
    """
    with device_of(x):
        return _launch_mlp(x, A, B, a, b, l2, w1, b1, w2, b2)[:3]


@fused_mlp_forward.register_fake
def _(x, A, B, a, b, l2, w1, b1, w2, b2):
    return _fake_mlp(x, w1, False, None)[:3]


@torch.library.custom_op('riformer_triton::mlp_forward', mutates_args=())
def mlp_forward(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, a: torch.Tensor,
                b: torch.Tensor, l2: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                w2: torch.Tensor, b2: torch.Tensor, save_u: bool = False, path: str = 'auto'
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fused_mlp_forward` with options: returns (out, pmean, pm2, u). save_u: also write
    u = W1 z + b1 (pre-GELU) as an (N, HID, H, W) channels_last tensor in w1's dtype (what
    `backward.mlp_backward(u_saved=...)` takes), else u is an empty tensor. path:
    'auto' (the rule, `mlp_path`), 'flash' or 'two_gemm'."""
    with device_of(x):
        return _launch_mlp(x, A, B, a, b, l2, w1, b1, w2, b2, save_u, path)


@mlp_forward.register_fake
def _(x, A, B, a, b, l2, w1, b1, w2, b2, save_u=False, path='auto'):
    return _fake_mlp(x, w1, save_u, path)


@torch.library.custom_op('riformer_triton::mlp_hidden', mutates_args=())
def mlp_hidden(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, w1: torch.Tensor,
               b1: torch.Tensor, save_u: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GEMM 1 of the two-GEMM path alone: (h, u), h = GELU(u), u = W1 (A x + B) + b1, both
    (N, HID, H, W) channels_last in w1's dtype; u is empty unless save_u."""
    n, c, hh, ww = x.shape
    with device_of(x):
        return _launch_gemm1(x, A, B, w1, b1, save_u,
                             mlp_config(n, c, hh * ww, x.dtype, 'two_gemm'))


@mlp_hidden.register_fake
def _(x, A, B, w1, b1, save_u=False):
    n, _, h, w = x.shape
    hid = x.new_empty((n, w1.shape[0], h, w), dtype=w1.dtype).contiguous(
        memory_format=torch.channels_last)
    return hid, (torch.empty_like(hid) if save_u else x.new_empty((0,)))


@torch.library.custom_op('riformer_triton::mlp_output', mutates_args=())
def mlp_output(h: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               l2: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GEMM 2 of the two-GEMM path alone: out = a x + b + l2 (W2 h + b2) and the partial
    moments of out (spans per `mlp_config(..., path='two_gemm')`). h as `mlp_hidden` gives it."""
    n, c, hh, ww = x.shape
    with device_of(x):
        if tuple(h.stride()[1:]) != (1, ww * h.shape[1], h.shape[1]):
            h = h.contiguous(memory_format=torch.channels_last)
        return _launch_gemm2(h, x, a, b, l2, w2, b2,
                             mlp_config(n, c, hh * ww, x.dtype, 'two_gemm'))


@mlp_output.register_fake
def _(h, x, a, b, l2, w2, b2):
    return _fake_mlp(x, h, False, 'two_gemm')[:3]


# ---------------------------------------------------------------------------------------------
# GPU build specs (read by riformer_kernels.tools.gpu_build_report; format documented there)
#
# The specs reproduce what Triton's launcher compiles: an integer argument equal to 1 becomes a
# compile-time constant, so every spec comes in the two layouts the backend launches, NCHW
# (token stride 1) and channels_last (channel stride 1, description marked '/cl'), with unit
# weight strides (contiguous fc1/fc2 weights). Alignment (Triton's divisibility-by-16
# specialisation) is not given to the report, so it compiles the unaligned worst case: scalar
# loads, one 64-bit pointer per element. Runtime kernels with aligned shapes use fewer registers.

_I32 = 'i32'


def _layout_consts(sig: dict, const: dict, channels_last: bool, names):
    """Move the arguments that are 1 at launch from the signature to the constants."""
    unit = [f'stride_{t}c' for t in names] if channels_last else [f'stride_{t}t' for t in names]
    for k in unit + ['stride_w1c', 'stride_w2h']:
        if k in sig:
            del sig[k]
            const[k] = 1


def _flags(dtype: torch.dtype, fp32_precision: str = 'ieee') -> dict:
    return dict(DOT_FP32=dtype == torch.float32, ROUND_BF16=False,
                INPUT_PRECISION=fp32_precision if dtype == torch.float32 else 'tf32')


def _mixed_tag(dtype, dot) -> str:
    return '' if dot == dtype else f" dots {_TORCH_TO_TL[dot]}"


def _mlp_spec(block_c: int, dtype: torch.dtype, channels_last: bool, save_u: bool, dot=None):
    """dtype: x's (the activations'); dot: the weights' where they differ (the mixed-precision
    mode: fp32 activations and biases, half weights and u, the config of fp32 x)."""
    dot = dtype if dot is None else dot
    cfg = mlp_config(1, block_c, 1, dtype, 'flash')
    tl_t, tl_w = _TORCH_TO_TL[dtype], _TORCH_TO_TL[dot]
    sig = {'x_ptr': f'*{tl_t}', 'out_ptr': f'*{tl_t}', 'u_ptr': f'*{tl_w}', 'A_ptr': '*fp32',
           'B_ptr': '*fp32', 'a_ptr': '*fp32', 'b_ptr': '*fp32', 'l2_ptr': '*fp32',
           'w1_ptr': f'*{tl_w}', 'b1_ptr': f'*{tl_t}', 'w2_ptr': f'*{tl_w}', 'b2_ptr': f'*{tl_t}',
           'pmean_ptr': '*fp32', 'pm2_ptr': '*fp32'}
    sig.update({k: _I32 for k in ('C', 'T', 'HID', 'n_parts', 'subtiles', 'stride_xn',
                                  'stride_xc', 'stride_xt', 'stride_on', 'stride_oc',
                                  'stride_ot', 'stride_un', 'stride_ut', 'stride_l2n',
                                  'stride_w1h', 'stride_w1c', 'stride_w2c', 'stride_w2h')})
    const = dict(BLOCK_T=cfg['BLOCK_T'], BLOCK_C=block_c, BLOCK_H=cfg['BLOCK_H'],
                 SAVE_U=save_u, **_flags(dot, cfg['fp32_precision']))
    _layout_consts(sig, const, channels_last, 'xo')
    tag = ('/cl' if channels_last else '') + ('+u' if save_u else '')
    desc = (f"fused_mlp{tag} C<={block_c} {tl_t}{_mixed_tag(dtype, dot)} T{cfg['BLOCK_T']} "
            f"H{cfg['BLOCK_H']} w{cfg['num_warps']}")
    return fused_mlp_kernel, sig, const, desc, dict(num_warps=cfg['num_warps'])


def _gemm1_spec(dtype: torch.dtype, channels_last: bool, save_u: bool, dot=None):
    dot = dtype if dot is None else dot
    bt, bh, bk, warps = GEMM1_TILES[_kind(dtype)]
    tl_t, tl_w = _TORCH_TO_TL[dtype], _TORCH_TO_TL[dot]
    sig = {'x_ptr': f'*{tl_t}', 'h_ptr': f'*{tl_w}', 'u_ptr': f'*{tl_w}', 'A_ptr': '*fp32',
           'B_ptr': '*fp32', 'w1_ptr': f'*{tl_w}', 'b1_ptr': f'*{tl_t}'}
    sig.update({k: _I32 for k in ('C', 'T', 'HID', 'n_ttiles', 'n_htiles', 'stride_xn',
                                  'stride_xc', 'stride_xt', 'stride_hn', 'stride_ht',
                                  'stride_w1h', 'stride_w1c')})
    const = dict(BLOCK_T=bt, BLOCK_H=bh, BLOCK_K=bk, SAVE_U=save_u, **_flags(dot))
    _layout_consts(sig, const, channels_last, 'x')
    tag = ('/cl' if channels_last else '') + ('+u' if save_u else '')
    desc = f"mlp_gemm1{tag} {tl_t}{_mixed_tag(dtype, dot)} T{bt} H{bh} K{bk} w{warps}"
    return mlp_gemm1_kernel, sig, const, desc, dict(num_warps=warps)


def _gemm2_spec(dtype: torch.dtype, channels_last: bool, dot=None):
    dot = dtype if dot is None else dot
    bt, bc, bk, warps = GEMM2_TILES[_kind(dtype)]
    tl_t, tl_w = _TORCH_TO_TL[dtype], _TORCH_TO_TL[dot]
    sig = {'h_ptr': f'*{tl_w}', 'x_ptr': f'*{tl_t}', 'out_ptr': f'*{tl_t}', 'a_ptr': '*fp32',
           'b_ptr': '*fp32', 'l2_ptr': '*fp32', 'w2_ptr': f'*{tl_w}', 'b2_ptr': f'*{tl_t}',
           'pmean_ptr': '*fp32', 'pm2_ptr': '*fp32'}
    sig.update({k: _I32 for k in ('C', 'T', 'HID', 'n_parts', 'n_ctiles', 'subtiles',
                                  'stride_hn', 'stride_ht', 'stride_xn', 'stride_xc',
                                  'stride_xt', 'stride_on', 'stride_oc', 'stride_ot',
                                  'stride_l2n', 'stride_w2c', 'stride_w2h')})
    const = dict(BLOCK_T=bt, BLOCK_C=bc, BLOCK_K=bk, **_flags(dot))
    _layout_consts(sig, const, channels_last, 'xo')
    desc = (f"mlp_gemm2{'/cl' if channels_last else ''} {tl_t}{_mixed_tag(dtype, dot)} T{bt} "
            f"C{bc} K{bk} w{warps}")
    return mlp_gemm2_kernel, sig, const, desc, dict(num_warps=warps)


def _moments_spec(block_c: int, dtype: torch.dtype, channels_last: bool):
    tl_t = _TORCH_TO_TL[dtype]
    sig = {'x_ptr': f'*{tl_t}', 'mean_ptr': '*fp32', 'm2_ptr': '*fp32'}
    sig.update({k: _I32 for k in ('C', 'T', 'n_parts', 'subtiles', 'stride_xn', 'stride_xc',
                                  'stride_xt')})
    const = dict(BLOCK_C=block_c, BLOCK_T=4096 // block_c)
    _layout_consts(sig, const, channels_last, 'x')
    tag = '/cl' if channels_last else ''
    return (moments_kernel, sig, const,
            f"moments{tag} C-block {block_c} {tl_t} T{4096 // block_c} w4", dict(num_warps=4))


def _gpu_build_specs():
    """One spec per config the launch rules can pick, in both layouts, with and without u."""
    specs = []
    for dtype in SUPPORTED_DTYPES:
        for cl in (False, True):
            for block_c, kind in MLP_TILES:
                if kind == _kind(dtype):
                    for save_u in (False, True):
                        specs.append(_mlp_spec(block_c, dtype, cl, save_u))
            for save_u in (False, True):
                specs.append(_gemm1_spec(dtype, cl, save_u))
            specs.append(_gemm2_spec(dtype, cl))
            # moments: every C-block the rule can pick (16 for C<=16, else 32)
            for block_c in (16, 32):
                specs.append(_moments_spec(block_c, dtype, cl))
    # The mixed-precision mode (autocast): fp32 activations with half weights, launched with
    # fp32 x's configs (`mlp_config` follows x's dtype) and half dots.
    for dot in (torch.float16, torch.bfloat16):
        for cl in (False, True):
            for block_c, kind in MLP_TILES:
                if kind == 'fp32':
                    for save_u in (False, True):
                        specs.append(_mlp_spec(block_c, torch.float32, cl, save_u, dot))
            for save_u in (False, True):
                specs.append(_gemm1_spec(torch.float32, cl, save_u, dot))
            specs.append(_gemm2_spec(torch.float32, cl, dot))
    return specs


GPU_BUILD_SPECS = _gpu_build_specs()

"""The @triton.jit kernels of the fused block's backward (docs/design.md section 3).

Launch rules, configurations and the torch.library ops that call these live in `backward.py`;
its docstring describes the two paths (small C: one weight-gradient launch with the sums, then
the dx kernel recomputing dz; large C: hidden/du scratch, dz chunks, weight gradients with dx
fused in). Every kernel here is compiled for sm_80/sm_90 by the GPU build report from
`backward.GPU_BUILD_SPECS`.
"""
import triton
import triton.language as tl

from .forward import _round_to_bf16   # the one nearest-even fp32 -> bf16 rounding

# ---------------------------------------------------------------------------------------------
# jit helpers

@triton.jit
def _gelu_and_grad(u):
    """Exact (erf) GELU and its derivative."""
    cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
    pdf = tl.exp(-0.5 * u * u) * 0.3989422804014327
    return u * cdf, cdf + u * pdf


@triton.jit
def _round_for_store(v, dst_dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    """fp32 value cast to the output dtype `dst_dtype`.

    With ROUND_BF16 (interpreter only, whose fp32->bf16 cast truncates) a bf16 destination is
    rounded to nearest even in integer arithmetic first, so the cast after it is exact; any
    other destination (fp32 dz / dx of the mixed-precision mode) is cast as it is.
    """
    if ROUND_BF16:
        if dst_dtype == tl.bfloat16:
            v = _round_to_bf16(v)
    return v.to(dst_dtype)


@triton.jit
def _operand(v, cdt: tl.constexpr, ROUND_BF16: tl.constexpr):
    """An fp32 tile as a dot operand in the compute dtype `cdt`. Where the interpreter's bf16
    dot is avoided (bf16 weights: cdt is fp32 and ROUND_BF16 set), v is rounded to bf16 values
    (nearest even, in integer arithmetic), so the interpreted dots see the operands a GPU's
    bf16 dots do."""
    if ROUND_BF16:
        if cdt == tl.float32:
            v = _round_to_bf16(v)
    return v.to(cdt)


@triton.jit
def _split(v, cdt: tl.constexpr, ROUND_BF16: tl.constexpr):
    """A two-term dot operand v = hi + lo, both in `cdt` (lo: the rounding remainder of hi):
    two dots on them give the product to ~2^-16 relative in bf16. SPLIT (the mixed-precision
    mode) uses it for dO and du on the way to dz: see backward.py's docstring."""
    hi = _operand(v, cdt, ROUND_BF16)
    return hi, _operand(v - hi.to(tl.float32), cdt, ROUND_BF16)


# ---------------------------------------------------------------------------------------------
# shared pieces of the phase-1 kernels

@triton.jit
def _hidden_tile_grads(
    x_ptr, g_ptr, u_ptr, A_ptr, B_ptr, l2_ptr, w1_ptr, b1_ptr, w2_ptr,
    n, n64, offs_t, mt, offs_h, mh, C, HID,
    sxn, sxc, sxt, sgn, sgc, sgt, sun, suc, sut,
    HAS_U: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr,
    SPLIT: tl.constexpr,
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
            z_k = _operand(tl.where(mtk, a_k[None, :] * x_k + b_k[None, :], 0.0), cdt,
                           ROUND_BF16)
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
        if SPLIT:
            do_hi, do_lo = _split(l2_k[None, :] * g_k, cdt, ROUND_BF16)
            dh += tl.dot(do_hi, w2_k, input_precision=PRECISION)
            dh += tl.dot(do_lo, w2_k, input_precision=PRECISION)
        else:
            dh += tl.dot(_operand(l2_k[None, :] * g_k, cdt, ROUND_BF16), w2_k,
                         input_precision=PRECISION)
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
             _round_for_store(dz, dz_ptr.dtype.element_ty, ROUND_BF16), mask=m2)
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
                         mask2, C, sxn, sxc, sxt, sgn, sgc, sgt, cdt: tl.constexpr,
                         ROUND_BF16: tl.constexpr):
    """x and g of a (tokens, channels) tile in fp32 (0 outside mask2) and what the MLP backward
    starts from: z = A x + B (the norm2 input) and dO = l2 g, both in the dot dtype `cdt`,
    and dO's rounding remainder (`_split`; dead code unless a SPLIT caller uses it).
    g is 0 on masked tokens and channels, so dO and everything derived from it vanish there."""
    a_c = tl.load(A_ptr + n * C + offs_c, mask=mask_c, other=0.0)
    b_c = tl.load(B_ptr + n * C + offs_c, mask=mask_c, other=0.0)
    l2 = tl.load(l2_ptr + n * C + offs_c, mask=mask_c, other=0.0)
    x = tl.load(x_ptr + n64 * sxn + offs_t[:, None] * sxt + offs_c[None, :] * sxc,
                mask=mask2, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + n64 * sgn + offs_t[:, None] * sgt + offs_c[None, :] * sgc,
                mask=mask2, other=0.0).to(tl.float32)
    z = _operand(tl.where(mask2, a_c[None, :] * x + b_c[None, :], 0.0), cdt, ROUND_BF16)
    d_o, d_o_lo = _split(l2[None, :] * g, cdt, ROUND_BF16)
    return x, g, z, d_o, d_o_lo


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
    SPLIT: tl.constexpr,
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

    x, g, z, d_o, d_o_lo = _load_tile_z_and_d_o(x_ptr, g_ptr, A_ptr, B_ptr, l2_ptr, n, n64, offs_t,
                                        offs_c, mc, m2, C, sxn, sxc, sxt, sgn, sgc, sgt, cdt,
                                        ROUND_BF16)

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
        if SPLIT:
            dh += tl.dot(d_o_lo, tl.trans(w2t), input_precision=PRECISION)
            du_hi, du_lo = _split(dh * dgelu, cdt, ROUND_BF16)
            dz += tl.dot(du_hi, w1, input_precision=PRECISION)
            dz += tl.dot(du_lo, w1, input_precision=PRECISION)
        else:
            dz += tl.dot(_operand(dh * dgelu, cdt, ROUND_BF16), w1, input_precision=PRECISION)

    dx = _dx_tile(g, dz, x, P_ptr, Q_ptr, R_ptr, S_ptr, mean_ptr, n * C + offs_c, mc)
    tl.store(dx_ptr + n64 * sdn + offs_t[:, None] * sdt + offs_c[None, :] * sdc,
             _round_for_store(dx, dx_ptr.dtype.element_ty, ROUND_BF16), mask=m2)


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
    SPLIT: tl.constexpr,
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
                HAS_U, BLOCK_T, BLOCK_H, BLOCK_K, DOT_F32, PRECISION, ROUND_BF16, SPLIT)
            acc_b1 += tl.sum(du, 0)

        mtw = mt[:, None] & mw[None, :]
        x_w, g_w, z_w, d_o_w, _ = _load_tile_z_and_d_o(
            x_ptr, g_ptr, A_ptr, B_ptr, l2_ptr, n, n64, offs_t, offs_w, mw, mtw, C,
            sxn, sxc, sxt, sgn, sgc, sgt, cdt, ROUND_BF16)
        # (scratch h and du are stored rounded already: rounding again changes nothing)
        du_op = _operand(du, cdt, ROUND_BF16)
        h_op = _operand(h, cdt, ROUND_BF16)
        acc_w1 += tl.dot(tl.trans(du_op), z_w, input_precision=PRECISION)
        acc_w2 += tl.dot(tl.trans(d_o_w), h_op, input_precision=PRECISION)
        if SUMS:
            # W1[chunk, chunk_c] and W2[chunk_c, chunk]^T as (hidden, channel) tiles.
            mhw = mh[:, None] & mw[None, :]
            w1_hw = tl.load(w1_ptr + offs_h[:, None] * C + offs_w[None, :], mask=mhw,
                            other=0.0).to(cdt)
            w2_hw = tl.load(w2_ptr + offs_w[None, :] * HID + offs_h[:, None], mask=mhw,
                            other=0.0).to(cdt)
            dz_part = tl.dot(du_op, w1_hw, input_precision=PRECISION)
            if SPLIT:
                du_lo = _operand(du - du_op.to(tl.float32), cdt, ROUND_BF16)
                dz_part += tl.dot(du_lo, w1_hw, input_precision=PRECISION)
            o_part = tl.dot(h_op, w2_hw, input_precision=PRECISION)
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
                         _round_for_store(dx, dx_ptr.dtype.element_ty, ROUND_BF16), mask=mtw)


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
    SPLIT: tl.constexpr,
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
        HAS_U, BLOCK_T, BLOCK_H, BLOCK_K, DOT_F32, PRECISION, ROUND_BF16, SPLIT)
    sp = n64 * HID * T + offs_h[None, :] * T + offs_t[:, None]
    mth = mt[:, None] & mh[None, :]
    tl.store(hs_ptr + sp, _round_for_store(h, hs_ptr.dtype.element_ty, ROUND_BF16), mask=mth)
    tl.store(dus_ptr + sp, _round_for_store(du, dus_ptr.dtype.element_ty, ROUND_BF16), mask=mth)
    tl.store(db1p_ptr + row.to(tl.int64) * HID + offs_h, tl.sum(du, 0), mask=mh)


@triton.jit
def _mlp_dz_chunk_kernel(
    x_ptr, g_ptr, mean_ptr, w1_ptr, w2_ptr, b2_ptr, hs_ptr, dus_ptr, dz_ptr, part_ptr,
    N, C, T, HID, TILES, CBLOCKS,
    sxn, sxc, sxt, sgn, sgc, sgt, szn, szc, szt,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr,
    SPLIT: tl.constexpr,
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
        h = tl.load(hs_ptr + sp, mask=mth, other=0.0).to(cdt)
        w1 = tl.load(w1_ptr + offs_h[:, None] * C + offs_c[None, :], mask=mw, other=0.0).to(cdt)
        w2t = tl.load(w2_ptr + offs_c[None, :] * HID + offs_h[:, None], mask=mw, other=0.0).to(cdt)
        if SPLIT:
            # du's scratch is fp32 here: split into the two terms in registers
            du_hi, du_lo = _split(tl.load(dus_ptr + sp, mask=mth, other=0.0), cdt, ROUND_BF16)
            dz += tl.dot(du_hi, w1, input_precision=PRECISION)
            dz += tl.dot(du_lo, w1, input_precision=PRECISION)
        else:
            du = tl.load(dus_ptr + sp, mask=mth, other=0.0).to(cdt)
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
             _round_for_store(dx, dx_ptr.dtype.element_ty, ROUND_BF16), mask=m2)
